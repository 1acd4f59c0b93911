//! A worker's task bookkeeping as a state machine, free of I/O like the
//! scheduler [`Core`](crate::Core): orders from the scheduler, the worker's
//! fetches and its execution threads are events; what the worker must do
//! (send a report, abort a fetch) comes back as return values.
//!
//! Each order gets an *attempt* number. A fetch that ends, a cancel and a
//! steal apply to the attempt they were meant for, so an old fetch ending
//! after the task was cancelled and sent again can never drop or duplicate
//! the new order.
//!
//! Execution threads and memory are part of it too: a task waiting on other
//! tasks lends its thread (one more thread runs until it takes it back, then
//! one retires at its next take), and a worker whose memory is high starts
//! nothing new while anything runs.
//!
//! `T` is the task as the services hold it; `H` is a handle that aborts a
//! fetch in flight.

use rustc_hash::FxHashMap;
use std::collections::VecDeque;

// The worker's other rules, by concern.
pub mod fetch;
pub mod interrupts;
pub mod reports;
pub mod stops;
pub mod store;

/// Where an order stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Its inputs are being fetched from other workers.
    Fetching,
    /// Queued for an execution thread.
    Ready,
    /// An execution thread runs it.
    Running,
}

impl Phase {
    /// Its name in stories.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Fetching => "fetching",
            Phase::Ready => "ready",
            Phase::Running => "running",
        }
    }
}

/// One step in a task's life on this worker (see [`WorkerState::story`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// Task.
    pub task: u64,
    /// The order it concerns (0: none, e.g. a cancel for an unknown task).
    pub attempt: u64,
    /// What happened.
    pub event: &'static str,
    /// Where the order stands after it (None: gone from this worker).
    pub phase: Option<Phase>,
    /// When, by the clock the worker was given ([`WorkerState::with_clock`]).
    pub at_us: u64,
}

/// What [`WorkerState::take`] hands an execution thread.
#[derive(Debug, PartialEq, Eq)]
pub enum Take<T> {
    /// Tasks to run (now running: tell the scheduler), and results to drop.
    Work(Vec<T>, Vec<u64>),
    /// The scheduler asked the worker to stop.
    Shutdown,
    /// More threads run than are wanted (a lent thread was taken back):
    /// this one ends.
    Retire,
}

/// How a fetch of a task's inputs ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Fetched<T> {
    /// All inputs are here: the task is ready.
    Ok(T),
    /// Their holder answered that it lacks these inputs: the scheduler must
    /// recompute them.
    Missing(Vec<u64>),
    /// Their holder could not be reached for these inputs.
    Unreachable(Vec<u64>),
}

/// What the worker must tell the scheduler after a fetch ended.
#[derive(Debug, PartialEq, Eq)]
pub enum FetchReport {
    /// Nothing: the task is queued, or the order was cancelled meanwhile.
    None,
    /// The task was dropped; these inputs are missing at their holder.
    Missing(Vec<u64>),
    /// The task was dropped; these inputs' holder is unreachable.
    Unreachable(Vec<u64>),
}

struct Order<H> {
    attempt: u64,
    phase: Phase,
    /// Aborts the fetch while `phase` is Fetching.
    fetch: Option<H>,
}

/// The worker's orders: queued, fetching and running tasks.
pub struct WorkerState<T, H = ()> {
    /// The current order per task (not running yet).
    orders: FxHashMap<u64, Order<H>>,
    /// Ready orders in arrival order: `(task, attempt, task data)`. Entries
    /// of orders cancelled or stolen meanwhile are skipped when taken.
    ready: VecDeque<(u64, u64, T)>,
    /// Tasks an execution thread runs, with how many runs (a task cancelled
    /// while running may be sent again and run beside its old run).
    running: FxHashMap<u64, u32>,
    released: Vec<u64>,
    next_attempt: u64,
    closed: bool,
    /// Execution threads wanted (the configured ones plus those lent by
    /// waiting tasks) and running.
    threads_wanted: u32,
    threads_live: u32,
    /// Memory is above the pause fraction.
    paused: bool,
    log: VecDeque<Step>,
    log_capacity: usize,
    /// Stamps the log's steps (the caller's clock; none: 0).
    clock: fn() -> u64,
}

impl<T, H> Default for WorkerState<T, H> {
    fn default() -> Self {
        Self::new(1, 0)
    }
}

impl<T, H> WorkerState<T, H> {
    /// An empty worker with `nthreads` execution threads, keeping the last
    /// `log_capacity` steps for [`WorkerState::story`].
    pub fn new(nthreads: u32, log_capacity: usize) -> Self {
        WorkerState {
            orders: FxHashMap::default(),
            ready: VecDeque::new(),
            running: FxHashMap::default(),
            released: Vec::new(),
            next_attempt: 1,
            closed: false,
            threads_wanted: nthreads.max(1),
            threads_live: nthreads.max(1),
            paused: false,
            log: VecDeque::new(),
            log_capacity,
            clock: || 0,
        }
    }

    /// Steps of the story are stamped with `clock` (microseconds): the
    /// machine never reads a clock of its own.
    pub fn with_clock(mut self, clock: fn() -> u64) -> Self {
        self.clock = clock;
        self
    }

    fn record(&mut self, task: u64, attempt: u64, event: &'static str, phase: Option<Phase>) {
        if self.log_capacity == 0 {
            return;
        }
        if self.log.len() == self.log_capacity {
            self.log.pop_front();
        }
        self.log.push_back(Step {
            task,
            attempt,
            event,
            phase,
            at_us: (self.clock)(),
        });
    }

    fn next_attempt(&mut self) -> u64 {
        self.next_attempt += 1;
        self.next_attempt - 1
    }

    /// Replaces any earlier order for `task` with `attempt`; returns the
    /// earlier one's fetch handle, to abort.
    fn new_order(&mut self, task: u64, attempt: u64, phase: Phase, fetch: Option<H>) -> Option<H> {
        let old = self.orders.insert(
            task,
            Order {
                attempt,
                phase,
                fetch,
            },
        );
        old.and_then(|o| o.fetch)
    }

    /// An order whose inputs are all here: queued. Returns the fetch of an
    /// older order for the same task, if one was still running (abort it).
    pub fn compute(&mut self, task: u64, data: T) -> Option<H> {
        let attempt = self.next_attempt();
        let old = self.new_order(task, attempt, Phase::Ready, None);
        self.ready.push_back((task, attempt, data));
        self.record(task, attempt, "compute", Some(Phase::Ready));
        old
    }

    /// An order whose inputs must be fetched: `start` begins the fetch for
    /// the given attempt and returns its abort handle. Returns the fetch of
    /// an older order for the same task, if any (abort it).
    pub fn compute_fetching(&mut self, task: u64, start: impl FnOnce(u64) -> H) -> Option<H> {
        let attempt = self.next_attempt();
        let old = self.new_order(task, attempt, Phase::Fetching, Some(start(attempt)));
        self.record(task, attempt, "fetch", Some(Phase::Fetching));
        old
    }

    /// The fetch for `attempt` of `task` ended. An outcome for an order no
    /// longer current (cancelled, stolen, or replaced) is dropped.
    pub fn fetched(&mut self, task: u64, attempt: u64, outcome: Fetched<T>) -> FetchReport {
        let current = self
            .orders
            .get(&task)
            .is_some_and(|o| o.attempt == attempt && o.phase == Phase::Fetching);
        if !current {
            self.record(task, attempt, "stale-fetch", None);
            return FetchReport::None;
        }
        match outcome {
            Fetched::Ok(data) => {
                let o = self.orders.get_mut(&task).expect("current");
                o.phase = Phase::Ready;
                o.fetch = None;
                self.ready.push_back((task, attempt, data));
                self.record(task, attempt, "fetched", Some(Phase::Ready));
                FetchReport::None
            }
            Fetched::Missing(deps) => {
                self.orders.remove(&task);
                self.record(task, attempt, "missing", None);
                FetchReport::Missing(deps)
            }
            Fetched::Unreachable(deps) => {
                self.orders.remove(&task);
                self.record(task, attempt, "unreachable", None);
                FetchReport::Unreachable(deps)
            }
        }
    }

    /// The scheduler cancels `task`: an order not started is dropped (its
    /// fetch handle returned, to abort). A running task runs on; its report
    /// will be stale.
    pub fn cancel(&mut self, task: u64) -> Option<H> {
        match self.orders.remove(&task) {
            Some(o) => {
                self.record(task, o.attempt, "cancel", None);
                o.fetch
            }
            None => {
                self.record(task, 0, "cancel-ignored", None);
                None
            }
        }
    }

    /// The scheduler asks for these tasks back: those not started are given
    /// (first list: tell the scheduler), their fetches returned to abort.
    pub fn steal(&mut self, tasks: &[u64]) -> (Vec<u64>, Vec<H>) {
        let mut given = Vec::new();
        let mut aborts = Vec::new();
        for &task in tasks {
            match self.orders.remove(&task) {
                Some(o) => {
                    self.record(task, o.attempt, "stolen", None);
                    given.push(task);
                    aborts.extend(o.fetch);
                }
                None => self.record(task, 0, "steal-refused", None),
            }
        }
        (given, aborts)
    }

    /// The scheduler dropped these results: the next [`WorkerState::take`]
    /// hands them to the execution side.
    pub fn release(&mut self, results: impl IntoIterator<Item = u64>) {
        self.released.extend(results);
    }

    /// The scheduler was lost (a new one will place its tasks again):
    /// every order not started is dropped; returns their fetches to abort.
    /// Running tasks run on.
    pub fn forget_orders(&mut self) -> Vec<H> {
        let ids: Vec<u64> = self.orders.keys().copied().collect();
        let mut aborts = Vec::new();
        for task in ids {
            if let Some(o) = self.orders.remove(&task) {
                self.record(task, o.attempt, "forgotten", None);
                aborts.extend(o.fetch);
            }
        }
        aborts
    }

    /// Tasks an execution thread runs now.
    pub fn running_tasks(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.running.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// The scheduler asks the worker to stop.
    pub fn shutdown(&mut self) {
        self.closed = true;
    }

    /// A task waits on other tasks and lends its thread: one more thread
    /// is wanted, and the caller starts it. Returns the threads now wanted
    /// (tell the scheduler).
    pub fn lend_thread(&mut self) -> u32 {
        self.threads_wanted += 1;
        self.threads_live += 1;
        self.threads_wanted
    }

    /// The waiting task takes its thread back: one thread retires at its
    /// next [`WorkerState::take`]. Returns the threads now wanted.
    pub fn reclaim_thread(&mut self) -> u32 {
        self.threads_wanted = self.threads_wanted.saturating_sub(1).max(1);
        self.threads_wanted
    }

    /// Memory crossed the pause fraction (up: `true`) or fell back below it.
    /// Returns whether that changed anything (then tell the scheduler).
    /// While paused, no task starts while another runs: the worker still
    /// makes progress, one task at a time, and what finishes may free memory.
    pub fn set_paused(&mut self, paused: bool) -> bool {
        let changed = self.paused != paused;
        self.paused = paused;
        changed
    }

    /// Threads wanted and running now.
    pub fn threads(&self) -> (u32, u32) {
        (self.threads_wanted, self.threads_live)
    }

    /// An execution thread takes up to `max` ready tasks (now running) and
    /// the released results. None: nothing to do.
    pub fn take(&mut self, max: usize) -> Option<Take<T>> {
        if self.closed {
            return Some(Take::Shutdown);
        }
        if self.threads_live > self.threads_wanted {
            self.threads_live -= 1;
            return Some(Take::Retire);
        }
        // Paused: only when nothing runs does one task start.
        let max = match (self.paused, self.running.is_empty()) {
            (false, _) => max.max(1),
            (true, true) => 1,
            (true, false) => 0,
        };
        let mut tasks = Vec::new();
        while tasks.len() < max {
            let Some((task, attempt, data)) = self.ready.pop_front() else {
                break;
            };
            let current = self
                .orders
                .get(&task)
                .is_some_and(|o| o.attempt == attempt && o.phase == Phase::Ready);
            if !current {
                continue; // cancelled, stolen or replaced since it was queued
            }
            self.orders.remove(&task);
            *self.running.entry(task).or_default() += 1;
            self.record(task, attempt, "start", Some(Phase::Running));
            tasks.push(data);
        }
        if tasks.is_empty() && self.released.is_empty() {
            return None;
        }
        Some(Take::Work(tasks, std::mem::take(&mut self.released)))
    }

    /// An execution thread finished a run of `task` (its report follows).
    pub fn finished(&mut self, task: u64) {
        if let Some(n) = self.running.get_mut(&task) {
            *n -= 1;
            if *n == 0 {
                self.running.remove(&task);
            }
        }
        self.record(task, 0, "done", None);
    }

    /// Where the current order for `task` stands (Running if a run is on
    /// and no newer order waits).
    pub fn phase(&self, task: u64) -> Option<Phase> {
        match self.orders.get(&task) {
            Some(o) => Some(o.phase),
            None => self.running.contains_key(&task).then_some(Phase::Running),
        }
    }

    /// Orders not started (fetching or ready).
    pub fn n_waiting(&self) -> usize {
        self.orders.len()
    }

    /// Tasks running now.
    pub fn n_running(&self) -> usize {
        self.running.values().map(|&n| n as usize).sum()
    }

    /// The recorded steps of `task`, oldest first.
    pub fn story(&self, task: u64) -> Vec<Step> {
        self.log
            .iter()
            .filter(|s| s.task == task)
            .cloned()
            .collect()
    }

    /// Checks the bookkeeping; panics naming the first violation.
    pub fn check_invariants(&self) {
        let mut queued: FxHashMap<u64, u64> = FxHashMap::default();
        for &(task, attempt, _) in &self.ready {
            if self
                .orders
                .get(&task)
                .is_some_and(|o| o.attempt == attempt && o.phase == Phase::Ready)
            {
                assert!(
                    queued.insert(task, attempt).is_none(),
                    "task {task:x} queued twice"
                );
            }
        }
        for (task, o) in &self.orders {
            match o.phase {
                Phase::Ready => assert!(
                    queued.get(task) == Some(&o.attempt),
                    "task {task:x} ready but not queued"
                ),
                Phase::Fetching => assert!(
                    o.fetch.is_some(),
                    "task {task:x} fetching with no fetch to abort"
                ),
                Phase::Running => panic!("task {task:x}: a running order is not kept"),
            }
            assert!(
                o.attempt < self.next_attempt,
                "task {task:x}: attempt from the future"
            );
        }
        assert!(self.running.values().all(|&n| n > 0), "zero run count kept");
        assert!(self.threads_wanted >= 1, "no thread wanted");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type W = WorkerState<u64, u64>;

    fn w() -> W {
        WorkerState::new(1, 1000)
    }

    fn work(t: Option<Take<u64>>) -> Vec<u64> {
        match t {
            Some(Take::Work(tasks, _)) => tasks,
            Some(Take::Shutdown) => panic!("shutdown"),
            Some(Take::Retire) => panic!("retire"),
            None => Vec::new(),
        }
    }

    #[test]
    fn a_cancelled_fetch_then_a_new_order_without_fetch_runs_the_new_order() {
        // Defect: the cancelled set was keyed by task id alone, so the new
        // order (inputs now local) was dropped as if cancelled: a hang.
        let mut s = w();
        s.compute_fetching(7, |a| a);
        assert_eq!(s.cancel(7), Some(1), "the fetch is aborted");
        assert_eq!(s.compute(7, 70), None);
        s.check_invariants();
        assert_eq!(work(s.take(8)), vec![70]);
        // The old fetch ends late: dropped, nothing to report.
        assert_eq!(s.fetched(7, 1, Fetched::Ok(71)), FetchReport::None);
        assert_eq!(work(s.take(8)), Vec::<u64>::new());
        s.check_invariants();
    }

    #[test]
    fn a_stolen_fetch_sent_back_fetches_again_and_the_old_result_is_dropped() {
        let mut s = w();
        s.compute_fetching(7, |a| a);
        assert_eq!(s.steal(&[7]), (vec![7], vec![1]));
        assert_eq!(s.compute_fetching(7, |a| a), None);
        // The first fetch's outcome is not the new order's.
        assert_eq!(
            s.fetched(7, 1, Fetched::Missing(vec![3])),
            FetchReport::None
        );
        assert_eq!(s.phase(7), Some(Phase::Fetching));
        assert_eq!(s.fetched(7, 2, Fetched::Ok(72)), FetchReport::None);
        assert_eq!(work(s.take(8)), vec![72]);
        s.check_invariants();
    }

    #[test]
    fn a_paused_worker_starts_nothing_while_a_task_runs_then_one_at_a_time() {
        let mut s = w();
        for t in 1..=4 {
            s.compute(t, t * 10);
        }
        assert_eq!(work(s.take(1)), vec![10]);
        assert!(s.set_paused(true));
        assert!(!s.set_paused(true), "no change, nothing to report");
        assert_eq!(
            work(s.take(8)),
            Vec::<u64>::new(),
            "one runs: nothing starts"
        );
        s.finished(1);
        assert_eq!(work(s.take(8)), vec![20], "nothing runs: one starts");
        s.finished(2);
        assert!(s.set_paused(false));
        assert_eq!(work(s.take(8)), vec![30, 40]);
        s.check_invariants();
    }

    #[test]
    fn a_lent_thread_taken_back_retires_one_thread_at_its_next_take() {
        let mut s = w();
        s.compute(1, 10);
        assert_eq!(s.lend_thread(), 2);
        assert_eq!(s.threads(), (2, 2));
        assert_eq!(work(s.take(1)), vec![10]);
        assert_eq!(s.reclaim_thread(), 1);
        assert_eq!(s.take(1), Some(Take::Retire));
        assert_eq!(s.threads(), (1, 1));
        assert_eq!(s.take(1), None, "the last thread stays");
        assert_eq!(s.reclaim_thread(), 1, "never fewer than one");
        s.check_invariants();
    }

    #[test]
    fn a_running_task_is_neither_stolen_nor_cancelled_and_may_run_again() {
        let mut s = w();
        s.compute(1, 10);
        assert_eq!(work(s.take(1)), vec![10]);
        assert_eq!(s.steal(&[1]), (vec![], vec![]));
        assert_eq!(s.cancel(1), None);
        assert_eq!(s.phase(1), Some(Phase::Running));
        // Sent again while the old run goes on: both run.
        s.compute(1, 11);
        assert_eq!(s.phase(1), Some(Phase::Ready));
        assert_eq!(work(s.take(1)), vec![11]);
        assert_eq!(s.n_running(), 2);
        s.finished(1);
        s.finished(1);
        assert_eq!(s.phase(1), None);
        s.check_invariants();
        let events: Vec<&str> = s.story(1).iter().map(|x| x.event).collect();
        assert_eq!(
            events,
            [
                "compute",
                "start",
                "steal-refused",
                "cancel-ignored",
                "compute",
                "start",
                "done",
                "done"
            ]
        );
    }

    #[test]
    fn the_story_is_bounded_and_stamped_by_the_given_clock() {
        static NOW: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mut s: W = WorkerState::new(1, 4)
            .with_clock(|| NOW.fetch_add(10, std::sync::atomic::Ordering::Relaxed));
        s.compute(1, 10);
        s.compute(2, 20);
        assert_eq!(work(s.take(2)), vec![10, 20]);
        s.finished(1);
        let one: Vec<(&str, u64)> = s.story(1).iter().map(|x| (x.event, x.at_us)).collect();
        assert_eq!(
            one,
            [("start", 20), ("done", 40)],
            "the oldest step fell out"
        );
        assert_eq!(s.story(2)[0].phase.map(Phase::name), Some("ready"));
    }

    #[test]
    fn failed_fetches_are_reported_not_run() {
        let mut s = w();
        s.compute_fetching(1, |a| a);
        s.compute_fetching(2, |a| a);
        assert_eq!(
            s.fetched(1, 1, Fetched::Unreachable(vec![5])),
            FetchReport::Unreachable(vec![5])
        );
        assert_eq!(
            s.fetched(2, 2, Fetched::Missing(vec![6])),
            FetchReport::Missing(vec![6])
        );
        assert_eq!(s.take(8), None);
        assert_eq!(s.n_waiting(), 0);
    }

    #[test]
    fn released_results_and_shutdown_reach_the_execution_side() {
        let mut s = w();
        s.release([4, 5]);
        assert_eq!(s.take(1), Some(Take::Work(vec![], vec![4, 5])));
        assert_eq!(s.take(1), None);
        s.shutdown();
        assert_eq!(s.take(1), Some(Take::Shutdown));
    }

    /// Random orders, fetch outcomes, cancels and steals crossing on the
    /// wire: every order the scheduler still counts on runs exactly once,
    /// nothing cancelled or given back runs, nothing is lost.
    #[test]
    fn random_crossings_run_exactly_what_the_scheduler_counts_on() {
        for seed in 0..500 {
            random_crossings(seed);
        }
    }

    fn random_crossings(seed: u64) {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut s = w();
        // The scheduler's view: task -> order number it counts on (its
        // latest Compute not cancelled or given back).
        let mut expected: FxHashMap<u64, u64> = FxHashMap::default();
        // Fetches in flight: (task, attempt, order number).
        let mut fetches: Vec<(u64, u64, u64)> = Vec::new();
        let mut aborted: Vec<u64> = Vec::new();
        let mut ran: Vec<(u64, u64)> = Vec::new();
        let mut order = 0u64;
        for _ in 0..rng.usize(1..200) {
            let task = rng.u64(0..6);
            match rng.u32(0..10) {
                0..=2 => {
                    order += 1;
                    expected.insert(task, order);
                    let old = if rng.bool() {
                        s.compute(task, task * 1000 + order)
                    } else {
                        let old = s.compute_fetching(task, |a| a);
                        let attempt = s.orders[&task].attempt;
                        fetches.push((task, attempt, order));
                        old
                    };
                    aborted.extend(old);
                }
                3 => {
                    aborted.extend(s.cancel(task));
                    expected.remove(&task);
                }
                4 => {
                    let (given, aborts) = s.steal(&[task]);
                    aborted.extend(aborts);
                    if !given.is_empty() {
                        expected.remove(&task);
                    }
                }
                5..=6 if !fetches.is_empty() => {
                    let (task, attempt, order) = fetches.swap_remove(rng.usize(0..fetches.len()));
                    // An aborted fetch may still deliver (it raced the abort).
                    let outcome = match rng.u32(0..6) {
                        0 => Fetched::Missing(vec![99]),
                        1 => Fetched::Unreachable(vec![99]),
                        _ => Fetched::Ok(task * 1000 + order),
                    };
                    match s.fetched(task, attempt, outcome) {
                        FetchReport::None => {}
                        _ => {
                            // Dropped and reported: the scheduler places it again.
                            assert_eq!(expected.remove(&task), Some(order), "seed {seed}");
                        }
                    }
                }
                7 => {
                    s.set_paused(rng.u32(0..3) == 0);
                }
                8 => {
                    if rng.bool() {
                        s.lend_thread();
                    } else {
                        s.reclaim_thread();
                    }
                }
                _ => {
                    if let Some(Take::Work(tasks, _)) = s.take(rng.usize(1..3)) {
                        for d in tasks {
                            let (task, order) = (d / 1000, d % 1000);
                            assert_eq!(
                                expected.remove(&task),
                                Some(order),
                                "seed {seed}: ran an order the scheduler does not count on"
                            );
                            ran.push((task, order));
                            s.finished(task);
                        }
                    }
                }
            }
            s.check_invariants();
        }
        // Everything still expected completes: deliver fetches, then run
        // (threads lent and taken back retire on the way).
        for (task, attempt, order) in fetches {
            let _ = s.fetched(task, attempt, Fetched::Ok(task * 1000 + order));
        }
        loop {
            let tasks = match s.take(8) {
                Some(Take::Work(tasks, _)) => tasks,
                Some(Take::Retire) => continue,
                _ => break,
            };
            for d in tasks {
                let (task, order) = (d / 1000, d % 1000);
                assert_eq!(expected.remove(&task), Some(order), "seed {seed}");
                s.finished(task);
            }
        }
        assert!(
            expected.is_empty(),
            "seed {seed}: orders lost: {expected:?}"
        );
        assert_eq!(s.n_running(), 0);
        assert_eq!(s.n_waiting(), 0);
        let _ = (aborted, ran);
    }
}
