//! What a scheduler restarted after a crash decides while its peers come
//! back, free of I/O like the [`Core`](crate::Core).
//!
//! A scheduler started again from its journal has jobs' unfinished tasks
//! (*restored*), and workers and clients that reconnect (`--reconnect`,
//! `SHOAL_RECONNECT`). For a *recovery wait* it holds the restored tasks
//! back, so that:
//!
//! - a rejoined worker that still runs one *adopts* it (not run twice);
//! - a result a rejoined worker holds, or that a task of the lost
//!   scheduler's time reports, is kept as an *orphan* for a resumed client
//!   to claim (not computed again);
//! - a resumed client's messages are *held back* until the wait ends, so
//!   its resubmitted tasks find every rejoined worker's results.
//!
//! When the wait ends ([`Recovery::release`]) the restored tasks nobody
//! adopted go to the core, the held messages are handled in order, and then
//! ([`Recovery::drop_orphans`]) the results no client claimed are dropped by
//! their holders. Time is the caller's clock, in microseconds.
//!
//! `S` is a task's spec as the service keeps it, `V` a result's bytes, `M`
//! a client's message.

use rustc_hash::FxHashMap;
use std::collections::BTreeMap;

/// A result of the lost scheduler's time, kept for a client to claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Orphan<V> {
    /// A rejoined worker holds it.
    Held {
        /// The worker.
        worker: u32,
        /// Its size in bytes.
        size: u64,
    },
    /// Its value came inline with a report.
    Value(V),
}

/// What the end of the recovery wait hands the service.
#[derive(Debug, PartialEq, Eq)]
pub struct Released<S, M> {
    /// Restored tasks no rejoined worker adopted, by job (ascending), each
    /// job's in id order: submit them to run again.
    pub resubmit: Vec<(u32, Vec<S>)>,
    /// Resumed clients' held messages, client by client in the order they
    /// resumed: handle them now, then call [`Recovery::drop_orphans`].
    pub held: Vec<(u32, Vec<M>)>,
    /// Restored tasks that rejoined workers run (adopted).
    pub adopted: usize,
}

/// The recovery's bookkeeping (see the module's documentation).
pub struct Recovery<S, V, M> {
    /// Unfinished job tasks from the journal: task -> (job, spec).
    restored: FxHashMap<u64, (u32, S)>,
    /// Restored tasks a rejoined worker runs: task -> (worker, job, spec).
    adopted: FxHashMap<u64, (u32, u32, S)>,
    /// Results kept for resumed clients: task -> where.
    orphans: FxHashMap<u64, Orphan<V>>,
    /// Resumed clients' messages, in order, until the wait ends.
    held_back: Vec<(u32, Vec<M>)>,
    /// When the wait ends (None: not waiting).
    until_us: Option<u64>,
    /// How long a wait lasts.
    wait_us: u64,
}

impl<S, V, M> Recovery<S, V, M> {
    /// Nothing to recover; a wait, once begun, lasts `wait_us`.
    pub fn new(wait_us: u64) -> Self {
        Recovery {
            restored: FxHashMap::default(),
            adopted: FxHashMap::default(),
            orphans: FxHashMap::default(),
            held_back: Vec::new(),
            until_us: None,
            wait_us,
        }
    }

    /// Starts the recovery wait at `now_us`, unless one is on.
    pub fn begin_wait(&mut self, now_us: u64) {
        self.until_us.get_or_insert(now_us + self.wait_us);
    }

    /// The journal's unfinished tasks of `job`: held back until the wait
    /// ends. Call [`Recovery::begin_wait`] too.
    pub fn restore(&mut self, job: u32, tasks: impl IntoIterator<Item = (u64, S)>) {
        self.restored
            .extend(tasks.into_iter().map(|(id, spec)| (id, (job, spec))));
    }

    /// A recovery wait is on.
    pub fn waiting(&self) -> bool {
        self.until_us.is_some()
    }

    /// When the wait ends (the caller's clock), None while none is on.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.until_us
    }

    /// The wait is on and over at `now_us`: call [`Recovery::release`].
    pub fn due(&self, now_us: u64) -> bool {
        self.until_us.is_some_and(|t| now_us >= t)
    }

    /// `task` is a restored task (held back or adopted): its report is a
    /// job's outcome, not the core's.
    pub fn is_restored(&self, task: u64) -> bool {
        self.restored.contains_key(&task) || self.adopted.contains_key(&task)
    }

    /// A worker rejoined at `now_us` running `running` and holding `held`
    /// `(task, size)`: it adopts the restored tasks it runs, and its results
    /// wait for their clients. Starts the wait if none is on (a worker can
    /// rejoin a scheduler restarted without a journal: its clients may
    /// resume too).
    pub fn rejoined(
        &mut self,
        now_us: u64,
        worker: u32,
        running: &[u64],
        held: impl IntoIterator<Item = (u64, u64)>,
    ) {
        self.begin_wait(now_us);
        self.orphans.extend(
            held.into_iter()
                .map(|(id, size)| (id, Orphan::Held { worker, size })),
        );
        for &id in running {
            if let Some((job, spec)) = self.restored.remove(&id) {
                self.adopted.insert(id, (worker, job, spec));
            }
        }
    }

    /// A restored task's outcome arrived: it is done here. Returns its job
    /// (record the outcome there); None if it is not a restored task.
    pub fn ended(&mut self, task: u64) -> Option<u32> {
        if let Some((job, _)) = self.restored.remove(&task) {
            return Some(job);
        }
        self.adopted.remove(&task).map(|(_, job, _)| job)
    }

    /// A task the core does not know finished on `worker` (one of the lost
    /// scheduler's time): kept for its client while the wait is on. Returns
    /// whether it was kept (else it is no one's: ignore it).
    pub fn finished_unknown(
        &mut self,
        task: u64,
        worker: u32,
        size: u64,
        value: Option<V>,
    ) -> bool {
        if !self.waiting() {
            return false;
        }
        let orphan = match value {
            Some(v) => Orphan::Value(v),
            None => Orphan::Held { worker, size },
        };
        self.orphans.insert(task, orphan);
        true
    }

    /// A resumed client resubmits `task`: its result, if one is kept.
    pub fn claim(&mut self, task: u64) -> Option<Orphan<V>> {
        if self.orphans.is_empty() {
            return None;
        }
        self.orphans.remove(&task)
    }

    /// A worker left. Restored tasks it had adopted are held back again
    /// while the wait is on; after it, they are returned, by job, to submit
    /// now. Results it held are no longer there to claim.
    pub fn worker_lost(&mut self, worker: u32) -> Vec<(u32, Vec<S>)> {
        self.orphans
            .retain(|_, o| !matches!(o, Orphan::Held { worker: w, .. } if *w == worker));
        let lost: Vec<u64> = self
            .adopted
            .iter()
            .filter(|(_, a)| a.0 == worker)
            .map(|(&t, _)| t)
            .collect();
        let mut by_job: BTreeMap<u32, Vec<(u64, S)>> = BTreeMap::new();
        for t in lost {
            if let Some((_, job, spec)) = self.adopted.remove(&t) {
                if self.waiting() {
                    self.restored.insert(t, (job, spec));
                } else {
                    by_job.entry(job).or_default().push((t, spec));
                }
            }
        }
        sorted(by_job)
    }

    /// A message from client `client`. While the wait is on, a client that
    /// resumes (`resumes`: this message is its `Resume`) has it and all its
    /// later messages held back; returns the message if it is to be handled
    /// now.
    pub fn from_client(&mut self, client: u32, msg: M, resumes: bool) -> Option<M> {
        if let Some((_, held)) = self.held_back.iter_mut().find(|(c, _)| *c == client) {
            held.push(msg);
            return None;
        }
        if resumes && self.waiting() {
            self.held_back.push((client, vec![msg]));
            return None;
        }
        Some(msg)
    }

    /// Ends the wait: what is left to run, and the held messages.
    pub fn release(&mut self) -> Released<S, M> {
        self.until_us = None;
        let mut by_job: BTreeMap<u32, Vec<(u64, S)>> = BTreeMap::new();
        for (id, (job, spec)) in self.restored.drain() {
            by_job.entry(job).or_default().push((id, spec));
        }
        Released {
            resubmit: sorted(by_job),
            held: std::mem::take(&mut self.held_back),
            adopted: self.adopted.len(),
        }
    }

    /// After the held messages were handled: the results no client claimed,
    /// by holder (ascending, ids in order), for their holders to drop.
    /// Values that came inline are simply forgotten.
    pub fn drop_orphans(&mut self) -> Vec<(u32, Vec<u64>)> {
        let mut by_worker: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for (id, orphan) in self.orphans.drain() {
            if let Orphan::Held { worker, .. } = orphan {
                by_worker.entry(worker).or_default().push(id);
            }
        }
        by_worker
            .into_iter()
            .map(|(w, mut ids)| {
                ids.sort_unstable();
                (w, ids)
            })
            .collect()
    }

    /// Restored tasks held back, adopted, and results kept.
    pub fn counts(&self) -> (usize, usize, usize) {
        (self.restored.len(), self.adopted.len(), self.orphans.len())
    }
}

fn sorted<S>(by_job: BTreeMap<u32, Vec<(u64, S)>>) -> Vec<(u32, Vec<S>)> {
    by_job
        .into_iter()
        .map(|(job, mut tasks)| {
            tasks.sort_unstable_by_key(|t| t.0);
            (job, tasks.into_iter().map(|t| t.1).collect())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Specs are names; values and messages are strings.
    type R = Recovery<&'static str, &'static str, &'static str>;

    const WAIT: u64 = 3_000_000;

    fn restored() -> R {
        let mut r = R::new(WAIT);
        r.restore(2, [(21, "b1"), (20, "b0")]);
        r.restore(1, [(11, "a1"), (10, "a0"), (12, "a2")]);
        r.begin_wait(0);
        r
    }

    #[test]
    fn unclaimed_restored_tasks_run_again_by_job_in_id_order_when_the_wait_ends() {
        let mut r = restored();
        assert!(r.waiting() && !r.due(WAIT - 1) && r.due(WAIT));
        let out = r.release();
        assert_eq!(
            out.resubmit,
            vec![(1, vec!["a0", "a1", "a2"]), (2, vec!["b0", "b1"])]
        );
        assert_eq!(out.adopted, 0);
        assert!(!r.waiting() && !r.due(u64::MAX));
        assert_eq!(r.counts(), (0, 0, 0));
    }

    #[test]
    fn a_rejoined_worker_adopts_what_it_runs_and_its_reports_end_those_tasks() {
        let mut r = restored();
        r.rejoined(5, 7, &[11, 99], []);
        let out = r.release();
        assert_eq!(
            out.resubmit,
            vec![(1, vec!["a0", "a2"]), (2, vec!["b0", "b1"])]
        );
        assert_eq!(out.adopted, 1);
        assert!(r.is_restored(11), "adopted: still a job's task");
        assert_eq!(r.ended(11), Some(1));
        assert_eq!(r.ended(11), None, "a duplicate report is no one's");
        assert!(!r.is_restored(11));
    }

    #[test]
    fn an_adopting_worker_lost_during_the_wait_gives_its_tasks_back_to_the_wait() {
        let mut r = restored();
        r.rejoined(5, 7, &[10, 20], [(500, 64)]);
        assert_eq!(r.worker_lost(7), Vec::<(u32, Vec<&str>)>::new());
        assert_eq!(r.claim(500), None, "its results went with it");
        let out = r.release();
        assert_eq!(
            out.resubmit,
            vec![(1, vec!["a0", "a1", "a2"]), (2, vec!["b0", "b1"])]
        );
    }

    #[test]
    fn an_adopting_worker_lost_after_the_wait_has_its_tasks_run_again_at_once() {
        let mut r = restored();
        r.rejoined(5, 7, &[12, 10, 21], []);
        r.rejoined(6, 8, &[20], []);
        let _ = r.release();
        assert_eq!(
            r.worker_lost(7),
            vec![(1, vec!["a0", "a2"]), (2, vec!["b1"])]
        );
        assert_eq!(r.worker_lost(7), vec![], "once");
        assert!(r.is_restored(20), "the other worker's stays adopted");
    }

    #[test]
    fn a_resumed_client_claims_held_and_inline_results_and_the_rest_is_dropped() {
        let mut r = R::new(WAIT);
        assert!(!r.waiting());
        // A worker rejoins a scheduler restarted without a journal: the
        // wait begins with it.
        r.rejoined(100, 3, &[], [(1, 10), (2, 20), (3, 30)]);
        r.rejoined(200, 4, &[], [(4, 40)]);
        assert!(
            !r.due(WAIT + 99) && r.due(WAIT + 100),
            "the first rejoin set it"
        );
        assert!(r.finished_unknown(5, 4, 8, Some("v5")));
        assert!(r.finished_unknown(6, 4, 9, None));
        assert_eq!(
            r.claim(2),
            Some(Orphan::Held {
                worker: 3,
                size: 20
            })
        );
        assert_eq!(r.claim(5), Some(Orphan::Value("v5")));
        assert_eq!(r.claim(2), None, "claimed once");
        let _ = r.release();
        assert_eq!(r.drop_orphans(), vec![(3, vec![1, 3]), (4, vec![4, 6])]);
        assert_eq!(r.drop_orphans(), vec![]);
        assert!(
            !r.finished_unknown(7, 4, 1, None),
            "after the wait a task nobody knows is no one's"
        );
    }

    #[test]
    fn a_resuming_clients_messages_are_held_in_order_until_the_wait_ends() {
        let mut r = restored();
        assert_eq!(r.from_client(1, "hello", false), Some("hello"));
        assert_eq!(r.from_client(2, "resume2", true), None);
        assert_eq!(r.from_client(2, "submit2", false), None);
        assert_eq!(r.from_client(3, "resume3", true), None);
        assert_eq!(r.from_client(1, "other", false), Some("other"));
        assert_eq!(r.from_client(3, "submit3", false), None);
        let out = r.release();
        assert_eq!(
            out.held,
            vec![
                (2, vec!["resume2", "submit2"]),
                (3, vec!["resume3", "submit3"])
            ]
        );
        assert_eq!(
            r.from_client(4, "resume4", true),
            Some("resume4"),
            "no wait"
        );
    }

    /// Random rejoins, reports, losses and claims: every restored task is
    /// either resubmitted, adopted until its end, or ended, exactly once.
    #[test]
    fn random_recoveries_account_for_every_restored_task_once() {
        for seed in 0..300 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut r: Recovery<u64, u64, u64> = Recovery::new(WAIT);
            let n = rng.u64(1..40);
            r.restore(1, (0..n).map(|t| (t, t)));
            r.begin_wait(0);
            let mut seen: FxHashMap<u64, &str> = FxHashMap::default();
            let mark = |t: u64, how: &'static str, seen: &mut FxHashMap<u64, &str>| {
                assert!(
                    seen.insert(t, how).is_none(),
                    "seed {seed}: {t} {how} twice"
                );
            };
            for step in 0..rng.usize(1..80) {
                match rng.u32(0..5) {
                    0 => {
                        let running: Vec<u64> = (0..3).map(|_| rng.u64(0..n)).collect();
                        r.rejoined(step as u64, rng.u32(0..3), &running, []);
                    }
                    1 => {
                        let t = rng.u64(0..n);
                        if r.ended(t).is_some() {
                            mark(t, "ended", &mut seen);
                        }
                    }
                    2 => {
                        for (_, specs) in r.worker_lost(rng.u32(0..3)) {
                            specs.into_iter().for_each(|t| mark(t, "rerun", &mut seen));
                        }
                    }
                    // The service releases whenever a wait (a rejoin may
                    // begin a new one) is over.
                    3 if r.waiting() => {
                        for (_, specs) in r.release().resubmit {
                            specs.into_iter().for_each(|t| mark(t, "rerun", &mut seen));
                        }
                    }
                    _ => {}
                }
            }
            if r.waiting() {
                for (_, specs) in r.release().resubmit {
                    specs.into_iter().for_each(|t| mark(t, "rerun", &mut seen));
                }
            }
            for w in 0..3 {
                for (_, specs) in r.worker_lost(w) {
                    specs.into_iter().for_each(|t| mark(t, "rerun", &mut seen));
                }
            }
            assert_eq!(seen.len() as u64, n, "seed {seed}: {seen:?}");
            assert_eq!(r.counts().0 + r.counts().1, 0);
        }
    }
}
