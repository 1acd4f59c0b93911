//! Stopping tasks that run on a worker (a cancel, or the scheduler's
//! `Stop`): a command task's program is stopped through its flag; a Python
//! task is interrupted by the Python watchdog. A stop can arrive before the
//! task registers as either (it is between being taken and starting): it is
//! remembered, and the task stops as soon as it starts; its report forgets
//! it.
//!
//! `C` is a running command's stop handle.

use rustc_hash::{FxHashMap, FxHashSet};

/// What a stop asks of the services.
#[derive(Debug, PartialEq, Eq)]
pub enum Stop<'a, C> {
    /// Raise this command's stop flag.
    Command(&'a C),
    /// Wake the Python watchdog: [`Stops::python_requests`] has the task.
    Python,
}

/// Tasks asked to stop, and running commands.
pub struct Stops<C> {
    commands: FxHashMap<u64, C>,
    /// Asked to stop and not a registered command: a command that registers
    /// later stops at once; a Python task is in `python` too.
    asked: FxHashSet<u64>,
    /// For the Python watchdog.
    python: Vec<u64>,
}

impl<C> Default for Stops<C> {
    fn default() -> Self {
        Stops {
            commands: FxHashMap::default(),
            asked: FxHashSet::default(),
            python: Vec::new(),
        }
    }
}

impl<C> Stops<C> {
    /// The scheduler asks running task `task` to stop.
    pub fn ask(&mut self, task: u64) -> Stop<'_, C> {
        if self.commands.contains_key(&task) {
            return Stop::Command(&self.commands[&task]);
        }
        self.asked.insert(task);
        self.python.push(task);
        Stop::Python
    }

    /// Command task `task` starts with `handle`: returns whether it was
    /// asked to stop already (raise its flag at once).
    pub fn command_started(&mut self, task: u64, handle: C) -> bool {
        let asked = self.asked.remove(&task);
        self.commands.insert(task, handle);
        asked
    }

    /// Command task `task`'s program ended.
    pub fn command_ended(&mut self, task: u64) {
        self.commands.remove(&task);
    }

    /// Task `task` reported: a stop asked for it is moot.
    pub fn reported(&mut self, task: u64) {
        self.asked.remove(&task);
    }

    /// Whether any stop waits for its task (else reports need not look).
    pub fn any_asked(&self) -> bool {
        !self.asked.is_empty()
    }

    /// Python tasks to interrupt, since the last call.
    pub fn python_requests(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.python)
    }

    /// Whether the watchdog has requests waiting.
    pub fn python_waiting(&self) -> bool {
        !self.python.is_empty()
    }

    /// Running commands (to kill as the worker exits).
    pub fn commands(&self) -> impl Iterator<Item = &C> {
        self.commands.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_for_a_running_command_raises_its_flag() {
        let mut s = Stops::default();
        assert!(!s.command_started(1, "flag-1"));
        assert_eq!(s.ask(1), Stop::Command(&"flag-1"));
        assert!(!s.any_asked() && !s.python_waiting());
        s.command_ended(1);
        assert_eq!(s.commands().count(), 0);
    }

    #[test]
    fn a_stop_before_its_command_registers_stops_it_as_it_starts() {
        let mut s = Stops::default();
        assert_eq!(s.ask(2), Stop::Python, "not a command yet: both ways");
        assert!(s.any_asked());
        assert!(s.command_started(2, "flag-2"), "asked: stops at once");
        assert!(!s.any_asked());
        assert!(!s.command_started(3, "flag-3"));
    }

    #[test]
    fn python_tasks_reach_the_watchdog_and_a_report_forgets_the_stop() {
        let mut s: Stops<&str> = Stops::default();
        s.ask(4);
        s.ask(5);
        assert_eq!(s.python_requests(), vec![4, 5]);
        assert_eq!(s.python_requests(), Vec::<u64>::new());
        s.reported(4);
        assert!(s.any_asked());
        s.reported(5);
        assert!(!s.any_asked());
    }
}
