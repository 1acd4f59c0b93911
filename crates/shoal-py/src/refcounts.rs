//! `RefCounts`: a client's live futures per task.

use super::*;
use pyo3::types::PyList;

/// A client's count of live futures per task (`Client._refs`): 4 bytes a
/// task for its own (sequential) ids, where a dict entry costs 42.
#[pyclass(module = "shoal._core")]
pub(crate) struct RefCounts(shoal_runtime::refcounts::RefCounts);

#[pymethods]
impl RefCounts {
    #[new]
    fn new(client_id: u64) -> Self {
        RefCounts(shoal_runtime::refcounts::RefCounts::new(client_id))
    }

    /// `n` more futures of task `id`.
    fn incref(&mut self, id: u64, n: u32) {
        self.0.incref(id, n)
    }

    /// One more future of each task in `ids`.
    fn incref_many(&mut self, ids: Vec<u64>) {
        self.0.incref_many(ids)
    }

    /// One future fewer; True when it was the task's last.
    fn decref(&mut self, id: u64) -> bool {
        self.0.decref(id)
    }

    /// (Anything that is not a task id is not in it.)
    fn __contains__(&self, id: &Bound<'_, PyAny>) -> bool {
        id.extract::<u64>().is_ok_and(|id| self.0.contains(id))
    }

    fn __len__(&self) -> usize {
        self.0.len()
    }

    /// Tasks with live futures, in no order.
    fn ids(&self) -> Vec<u64> {
        self.0.ids()
    }

    /// Iterates over a snapshot of [`RefCounts::ids`].
    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyIterator>> {
        PyList::new(py, self.0.ids())?.try_iter()
    }
}
