//! When a worker interrupts a running Python task, and when it gives up on
//! one: the watchdog's rules, free of the interpreter.
//!
//! A Python task is stopped by raising an exception in its thread (between
//! bytecodes), for a cancel from the scheduler or at its time limit. The
//! rules:
//!
//! - a task is interrupted once (a second exception could land in the
//!   handler of the first, or in the next task);
//! - not while its thread is inside an import (an import cut short leaves
//!   its modules half made for every later task): it is tried again at the
//!   next tick;
//! - a stop that arrives before the task runs here is remembered for a
//!   minute, and the task stops as it starts;
//! - a task still running `grace` seconds after its first interrupt is
//!   stuck outside Python code: the worker reports it failed and restarts,
//!   once.
//!
//! The executor owns the facts (which thread runs which task, which thread
//! is importing) and carries out the [`Act`]s; it tells the machine what it
//! did. Times are the caller's monotonic clock, in seconds.

use rustc_hash::FxHashMap;

/// Why a task is interrupted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// The scheduler cancelled it.
    Cancelled,
    /// It ran past its time limit.
    TimeUp,
}

/// What the executor must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Act {
    /// Raise `why` in `thread`, which runs `task` (unless it no longer
    /// does, or is importing: then tell [`Interrupts::not_raised`]).
    Raise {
        /// The thread.
        thread: u64,
        /// The task it runs.
        task: u64,
        /// Why.
        why: Why,
    },
    /// `task` did not stop `waited` seconds after its interrupt: report it
    /// failed and restart the worker process (asked once per process).
    Stuck {
        /// The task.
        task: u64,
        /// Why it was interrupted.
        why: Why,
        /// Seconds since the first interrupt.
        waited: f64,
        /// Its time limit in seconds (0: none).
        limit: f64,
    },
}

struct Pending {
    task: u64,
    /// When it was first tried.
    since: f64,
    why: Why,
    /// Raised (else: to try again, the thread was importing).
    sent: bool,
}

/// How long a stop for a task not running here is remembered.
const ASKED_FOR: f64 = 60.0;

/// The watchdog's bookkeeping (see the module's documentation).
pub struct Interrupts {
    grace: f64,
    /// Stops for tasks not running here yet: task -> when asked.
    asked: FxHashMap<u64, f64>,
    /// Running tasks with a time limit: task -> (deadline, limit).
    deadlines: FxHashMap<u64, (f64, f64)>,
    /// Interrupts under way, by thread.
    pending: FxHashMap<u64, Pending>,
    restarting: bool,
}

impl Interrupts {
    /// A task gets `grace` seconds after its interrupt before it counts as
    /// stuck.
    pub fn new(grace: f64) -> Self {
        Interrupts {
            grace,
            asked: FxHashMap::default(),
            deadlines: FxHashMap::default(),
            pending: FxHashMap::default(),
            restarting: false,
        }
    }

    /// Whether anything is watched (a deadline, an interrupt under way):
    /// the executor then tells the machine when tasks end, and ticks often.
    pub fn watching(&self) -> bool {
        !self.deadlines.is_empty() || !self.pending.is_empty()
    }

    /// `task` starts now (`now`) with a time limit of `limit` seconds.
    pub fn limit(&mut self, task: u64, now: f64, limit: f64) {
        self.deadlines.insert(task, (now + limit, limit));
    }

    /// `task` starts (after it registered as running): whether a stop was
    /// asked before it did (then it stops at once, uninterrupted).
    pub fn asked_before(&mut self, task: u64) -> bool {
        self.asked.remove(&task).is_some()
    }

    /// Whether any stop waits for its task to start (else
    /// [`Interrupts::asked_before`] is false for every task).
    pub fn any_asked(&self) -> bool {
        !self.asked.is_empty()
    }

    /// `task` ended on `thread` (after it unregistered): whether an
    /// interrupt meant for it may still be pending on the thread (clear it,
    /// so it cannot land in the next task).
    pub fn ended(&mut self, task: u64, thread: u64) -> bool {
        self.deadlines.remove(&task);
        self.pending.remove(&thread).is_some()
    }

    /// The executor did not raise an interrupt it was told to: the thread
    /// was importing (`importing`: try again at the next tick) or no longer
    /// runs the task (forget it).
    pub fn not_raised(&mut self, thread: u64, importing: bool) {
        if importing {
            if let Some(p) = self.pending.get_mut(&thread) {
                p.sent = false;
            }
        } else {
            self.pending.remove(&thread);
        }
    }

    /// The watchdog's turn at `now`: `stops` are the scheduler's stops
    /// since the last tick; `running(task)` is the thread running `task`
    /// now, if any.
    pub fn tick(
        &mut self,
        now: f64,
        stops: &[u64],
        running: impl Fn(u64) -> Option<u64>,
    ) -> Vec<Act> {
        let mut acts = Vec::new();
        for &task in stops {
            match running(task) {
                Some(thread) => self.interrupt(thread, task, Why::Cancelled, now, &mut acts),
                // Not started in Python yet: it stops as it starts.
                None => {
                    self.asked.insert(task, now);
                }
            }
        }
        // A stop that crossed its task's start (the task registered after
        // the caller looked, and asked before the stop was kept): it runs
        // now, so it is interrupted.
        let crossed: Vec<(u64, u64)> = self
            .asked
            .keys()
            .filter_map(|&t| running(t).map(|thread| (t, thread)))
            .collect();
        for (task, thread) in crossed {
            self.asked.remove(&task);
            self.interrupt(thread, task, Why::Cancelled, now, &mut acts);
        }
        let due: Vec<u64> = self
            .deadlines
            .iter()
            .filter(|(_, d)| now >= d.0)
            .map(|(&t, _)| t)
            .collect();
        for task in due {
            if let Some(thread) = running(task) {
                self.interrupt(thread, task, Why::TimeUp, now, &mut acts);
            }
        }
        let mut stuck = None;
        for (&thread, p) in self.pending.iter_mut() {
            if running(p.task) != Some(thread) {
                continue; // ended; `ended` clears it
            }
            if now >= p.since + self.grace {
                stuck.get_or_insert((p.task, p.why, now - p.since));
            } else if !p.sent {
                p.sent = true; // it was importing: again
                acts.push(Act::Raise {
                    thread,
                    task: p.task,
                    why: p.why,
                });
            }
        }
        if let (Some((task, why, waited)), false) = (stuck, self.restarting) {
            self.restarting = true;
            let limit = self.deadlines.get(&task).map_or(0.0, |d| d.1);
            acts.push(Act::Stuck {
                task,
                why,
                waited,
                limit,
            });
        }
        self.asked.retain(|_, &mut when| now - when <= ASKED_FOR);
        acts
    }

    fn interrupt(&mut self, thread: u64, task: u64, why: Why, now: f64, acts: &mut Vec<Act>) {
        match self.pending.get(&thread) {
            Some(p) if p.task == task => {} // once per task (a retry is the tick's)
            _ => {
                self.pending.insert(
                    thread,
                    Pending {
                        task,
                        since: now,
                        why,
                        sent: true,
                    },
                );
                acts.push(Act::Raise { thread, task, why });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raise(thread: u64, task: u64, why: Why) -> Act {
        Act::Raise { thread, task, why }
    }

    #[test]
    fn a_cancel_interrupts_its_running_task_once_and_a_stuck_one_restarts_once() {
        let mut w = Interrupts::new(5.0);
        let running = |t| (t == 1).then_some(100);
        assert_eq!(w.tick(0.0, &[1], running), [raise(100, 1, Why::Cancelled)]);
        assert!(w.watching());
        assert_eq!(w.tick(1.0, &[1], running), [], "once");
        let acts = w.tick(5.5, &[], running);
        assert_eq!(
            acts,
            [Act::Stuck {
                task: 1,
                why: Why::Cancelled,
                waited: 5.5,
                limit: 0.0
            }]
        );
        assert_eq!(w.tick(9.0, &[], running), [], "the restart is asked once");
    }

    #[test]
    fn a_stop_before_the_task_runs_stops_it_as_it_starts_within_a_minute() {
        let mut w = Interrupts::new(5.0);
        assert_eq!(w.tick(0.0, &[7, 8], |_| None), []);
        assert!(w.asked_before(7));
        assert!(!w.asked_before(7), "once");
        w.tick(61.0, &[], |_| None);
        assert!(!w.asked_before(8), "forgotten after a minute");
    }

    #[test]
    fn a_stop_that_crossed_its_tasks_start_interrupts_it_at_the_next_tick() {
        let mut w = Interrupts::new(5.0);
        // The caller looked before task 6 registered; it then asked before
        // the stop was kept, so nothing stopped it.
        assert_eq!(w.tick(0.0, &[6], |_| None), []);
        assert_eq!(
            w.tick(0.05, &[], |t| (t == 6).then_some(60)),
            [raise(60, 6, Why::Cancelled)]
        );
        assert!(!w.any_asked());
        assert_eq!(w.tick(0.1, &[], |t| (t == 6).then_some(60)), [], "once");
    }

    #[test]
    fn a_time_limit_interrupts_and_an_importing_thread_is_tried_again() {
        let mut w = Interrupts::new(5.0);
        w.limit(3, 0.0, 2.0);
        let running = |t| (t == 3).then_some(300);
        assert_eq!(w.tick(1.0, &[], running), []);
        assert_eq!(w.tick(2.0, &[], running), [raise(300, 3, Why::TimeUp)]);
        w.not_raised(300, true); // importing
        assert_eq!(w.tick(2.1, &[], running), [raise(300, 3, Why::TimeUp)]);
        // Stuck: its limit is in the report.
        match &w.tick(7.5, &[], running)[..] {
            [Act::Stuck { limit, why, .. }] => assert_eq!((*limit, *why), (2.0, Why::TimeUp)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_task_that_ends_clears_its_interrupt_and_the_next_task_starts_clean() {
        let mut w = Interrupts::new(5.0);
        w.limit(1, 0.0, 1.0);
        assert_eq!(
            w.tick(1.0, &[], |t| (t == 1).then_some(9)),
            [raise(9, 1, Why::TimeUp)]
        );
        assert!(w.ended(1, 9), "pending on the thread: clear it");
        assert!(!w.watching());
        // The same thread runs task 2: nothing carries over.
        assert_eq!(w.tick(10.0, &[], |t| (t == 2).then_some(9)), []);
        assert!(!w.ended(2, 9));
    }

    #[test]
    fn an_interrupt_for_a_thread_that_moved_on_is_forgotten() {
        let mut w = Interrupts::new(5.0);
        assert_eq!(
            w.tick(0.0, &[4], |_| Some(1)),
            [raise(1, 4, Why::Cancelled)]
        );
        w.not_raised(1, false); // it no longer ran task 4
        assert!(!w.watching());
        assert_eq!(w.tick(9.0, &[], |_| Some(1)), [], "no stuck report");
    }
}
