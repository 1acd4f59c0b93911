//! A Ctrl-C that a finalizer swallowed, given back to the program.
//!
//! CPython runs a signal's Python handler at the first check after the
//! signal arrives, in whichever frame runs then. When that frame is a
//! finalizer (a `__del__` the garbage collector or a dropped reference
//! runs, a weakref callback), the handler's `KeyboardInterrupt` is handed
//! to `sys.unraisablehook`, printed as "Exception ignored", and the program
//! goes on: a wait that starts or resumes after it never sees the Ctrl-C.
//! pyo3 drops deferred references when a thread re-attaches, so a wait's
//! own wake-up can be that moment.
//!
//! [`UnraisableHook`] wraps the hook: it passes each report on, then, for a
//! `KeyboardInterrupt` in the main thread, trips SIGINT again. It is
//! written in Rust because Python bytecode run after the re-trip would
//! handle the signal inside the hook and lose it once more.

use pyo3::exceptions::PyKeyboardInterrupt;
use pyo3::prelude::*;
use pyo3::types::PyType;

#[pyclass(module = "shoal._core", frozen)]
pub(crate) struct UnraisableHook {
    /// The hook this one wraps (Python's default, pytest's, a user's).
    #[pyo3(get)]
    previous: Py<PyAny>,
    /// `threading.main_thread().ident`: Python runs signal handlers there only.
    main: u64,
}

fn thread_ident(py: Python<'_>) -> PyResult<u64> {
    py.import("_thread")?.call_method0("get_ident")?.extract()
}

#[pymethods]
impl UnraisableHook {
    fn __call__(&self, py: Python<'_>, report: &Bound<'_, PyAny>) -> PyResult<()> {
        let passed_on = self.previous.call1(py, (report,));
        let ctrl_c = report
            .getattr("exc_type")?
            .downcast::<PyType>()
            .is_ok_and(|t| t.is_subclass_of::<PyKeyboardInterrupt>().unwrap_or(false));
        if ctrl_c && thread_ident(py)? == self.main {
            // SAFETY: attached to the interpreter; a no-op unless Python
            // handles SIGINT. Nothing runs after it in this hook.
            unsafe { pyo3::ffi::PyErr_SetInterruptEx(libc::SIGINT) };
        }
        passed_on.map(drop)
    }
}

/// Wraps `sys.unraisablehook` in an [`UnraisableHook`] unless it already
/// is one. Idempotent; a hook set later (a test runner's) replaces it, and
/// the next call wraps that one.
#[pyfunction]
pub(crate) fn guard_interrupts(py: Python<'_>) -> PyResult<()> {
    let sys = py.import("sys")?;
    let current = sys.getattr("unraisablehook")?;
    if current.is_instance_of::<UnraisableHook>() {
        return Ok(());
    }
    let main: u64 = py
        .import("threading")?
        .call_method0("main_thread")?
        .getattr("ident")?
        .extract()?;
    let hook = UnraisableHook {
        previous: current.unbind(),
        main,
    };
    sys.setattr("unraisablehook", Py::new(py, hook)?)
}
