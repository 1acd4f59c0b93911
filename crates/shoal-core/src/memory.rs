//! A worker's memory policy, as Dask's: fractions of its memory limit at
//! which it spills results to disk, stops taking work, and is restarted.
//! The worker measures (process memory, bytes of results it manages) and
//! acts (`python/shoal/_store.py`); what to do is decided here.

/// Managed results above this fraction of the limit: spill the oldest.
pub const TARGET: f64 = 0.6;
/// Process memory above this fraction: let go of kept free blocks, spill.
pub const SPILL: f64 = 0.7;
/// Process memory above this fraction: take no new work until below.
pub const PAUSE: f64 = 0.8;
/// Process memory above this fraction: restart the worker process (its
/// tasks run again elsewhere) rather than be killed by the kernel.
pub const TERMINATE: f64 = 0.95;

/// What a worker with `limit` bytes does at one measurement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Let go of freed shared-memory blocks kept for reuse, then measure
    /// again (they count as process memory).
    pub trim: bool,
    /// Spill the least recently used result, then measure again.
    pub spill: bool,
    /// Take no new work.
    pub pause: bool,
    /// Past the restart line.
    pub past_restart: bool,
    /// Restart the process now (past the line, and it can be restarted:
    /// a worker in a client's own process cannot).
    pub restart: bool,
}

/// The policy of one worker.
#[derive(Clone, Copy, Debug)]
pub struct MemoryPolicy {
    limit: u64,
    can_restart: bool,
}

impl MemoryPolicy {
    /// A worker limited to `limit` bytes (0: no limit, nothing is ever
    /// done); `can_restart`: it is a process of its own under a nanny.
    pub fn new(limit: u64, can_restart: bool) -> MemoryPolicy {
        MemoryPolicy { limit, can_restart }
    }

    /// What to do with `process` bytes of process memory, `managed` of
    /// them results the worker holds in memory.
    pub fn decide(&self, process: u64, managed: u64) -> Decision {
        if self.limit == 0 {
            return Decision::default();
        }
        let over = |fraction: f64| process as f64 > fraction * self.limit as f64;
        let past_restart = over(TERMINATE);
        Decision {
            trim: over(SPILL),
            spill: over(SPILL) || managed as f64 > TARGET * self.limit as f64,
            pause: over(PAUSE),
            past_restart,
            restart: past_restart && self.can_restart,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn each_line_in_turn() {
        let p = MemoryPolicy::new(10 * GIB, true);
        assert_eq!(p.decide(5 * GIB, GIB), Decision::default(), "well below");
        let d = p.decide(5 * GIB, 7 * GIB);
        assert!(
            d.spill && !d.trim && !d.pause,
            "many results held: spill them: {d:?}"
        );
        let d = p.decide(75 * GIB / 10, 0);
        assert!(
            d.spill && d.trim && !d.pause,
            "process over 70 %: trim and spill: {d:?}"
        );
        let d = p.decide(85 * GIB / 10, 0);
        assert!(d.spill && d.pause && !d.restart, "over 80 %: pause: {d:?}");
        let d = p.decide(96 * GIB / 10, 0);
        assert!(
            d.past_restart && d.restart && d.pause,
            "over 95 %: restart: {d:?}"
        );
    }

    #[test]
    fn no_limit_means_nothing_and_an_in_process_worker_is_never_restarted() {
        assert_eq!(
            MemoryPolicy::new(0, true).decide(u64::MAX, u64::MAX),
            Decision::default()
        );
        let d = MemoryPolicy::new(GIB, false).decide(GIB, 0);
        assert!(d.past_restart && !d.restart && d.pause, "{d:?}");
    }
}
