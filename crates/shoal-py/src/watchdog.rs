//! `Watchdog`: when a worker interrupts a running Python task and when it
//! gives up on one (`shoal_core::worker::interrupts`), for the executor's
//! watchdog thread that carries it out (`_worker.py`).
//!
//! The lock is never held while calling into Python, so an execution
//! thread holding the GIL never waits for a thread that waits for the GIL.

use super::*;
use shoal_core::worker::interrupts::{Act, Interrupts, Why};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

/// The watchdog's rules: stops, time limits, interrupts once, retries while
/// importing, and the stuck task that restarts the worker.
#[pyclass(module = "shoal._core", frozen)]
pub(crate) struct Watchdog {
    rules: std::sync::Mutex<Interrupts>,
    /// `Interrupts::watching`, readable without the lock (per task).
    watching: AtomicBool,
    /// `Interrupts::any_asked`, likewise: every task's start asks.
    asked: AtomicBool,
}

fn why_name(w: Why) -> &'static str {
    match w {
        Why::Cancelled => "cancelled",
        Why::TimeUp => "time-up",
    }
}

/// A stuck task: `(task, why, seconds waited, time limit)`.
type Stuck = (u64, &'static str, f64, f64);

impl Watchdog {
    fn with<R>(&self, f: impl FnOnce(&mut Interrupts) -> R) -> R {
        // A panic inside cannot leave the rules half changed in a way that
        // matters more than losing the watchdog: go on with them.
        let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        let r = f(&mut rules);
        self.watching.store(rules.watching(), Ordering::Relaxed);
        self.asked.store(rules.any_asked(), Ordering::Relaxed);
        r
    }
}

#[pymethods]
impl Watchdog {
    #[new]
    fn new(grace: f64) -> Self {
        Watchdog {
            rules: std::sync::Mutex::new(Interrupts::new(grace)),
            watching: AtomicBool::new(false),
            asked: AtomicBool::new(false),
        }
    }

    /// Whether a deadline or an interrupt is under way (tasks that end
    /// must then call `ended`).
    #[getter]
    fn watching(&self) -> bool {
        self.watching.load(Ordering::Relaxed)
    }

    /// Task `task` starts at `now` (monotonic seconds) with a time limit.
    fn limit(&self, task: u64, now: f64, limit: f64) {
        self.with(|r| r.limit(task, now, limit));
    }

    /// Whether a stop for `task` came before it started (it stops now).
    fn asked_before(&self, task: u64) -> bool {
        // The common case (no stop waiting) takes no lock.
        self.asked.load(Ordering::Relaxed) && self.with(|r| r.asked_before(task))
    }

    /// `task` ended on `thread`: whether an interrupt may be pending there
    /// (clear it).
    fn ended(&self, task: u64, thread: u64) -> bool {
        self.with(|r| r.ended(task, thread))
    }

    /// An interrupt was not raised: the thread was importing (try again),
    /// or no longer ran its task.
    fn not_raised(&self, thread: u64, importing: bool) {
        self.with(|r| r.not_raised(thread, importing));
    }

    /// The watchdog's turn: `stops` from the scheduler, `running` (task ->
    /// thread). Returns the interrupts to raise, `(thread, task, why)`, and
    /// a stuck task to report, if any.
    fn tick(
        &self,
        now: f64,
        stops: Vec<u64>,
        running: HashMap<u64, u64>,
    ) -> (Vec<(u64, u64, &'static str)>, Option<Stuck>) {
        let acts = self.with(|r| r.tick(now, &stops, |t| running.get(&t).copied()));
        let mut raise = Vec::new();
        let mut stuck = None;
        for a in acts {
            match a {
                Act::Raise { thread, task, why } => raise.push((thread, task, why_name(why))),
                Act::Stuck {
                    task,
                    why,
                    waited,
                    limit,
                } => stuck = Some((task, why_name(why), waited, limit)),
            }
        }
        (raise, stuck)
    }
}
