//! `MemoryPolicy`: a worker's memory rules (`shoal_core::memory`), for the
//! store that measures and acts (`_store.py`).

use super::*;
use shoal_core::memory;

/// What to do at one measurement (see `shoal_core::memory::Decision`).
#[pyclass(module = "shoal._core", frozen, get_all)]
pub(crate) struct MemoryDecision {
    trim: bool,
    spill: bool,
    pause: bool,
    past_restart: bool,
    restart: bool,
}

/// A worker's memory policy: spill, pause and restart at fractions of its
/// limit (`TARGET`, `SPILL`, `PAUSE`, `TERMINATE`).
#[pyclass(module = "shoal._core", frozen)]
pub(crate) struct MemoryPolicy(memory::MemoryPolicy);

#[pymethods]
impl MemoryPolicy {
    #[new]
    fn new(limit: u64, can_restart: bool) -> Self {
        MemoryPolicy(memory::MemoryPolicy::new(limit, can_restart))
    }

    /// What to do with `process` bytes of process memory, `managed` of them
    /// results held in memory.
    fn decide(&self, process: u64, managed: u64) -> MemoryDecision {
        let d = self.0.decide(process, managed);
        MemoryDecision {
            trim: d.trim,
            spill: d.spill,
            pause: d.pause,
            past_restart: d.past_restart,
            restart: d.restart,
        }
    }

    #[classattr]
    const TARGET: f64 = memory::TARGET;
    #[classattr]
    const SPILL: f64 = memory::SPILL;
    #[classattr]
    const PAUSE: f64 = memory::PAUSE;
    #[classattr]
    const TERMINATE: f64 = memory::TERMINATE;
}
