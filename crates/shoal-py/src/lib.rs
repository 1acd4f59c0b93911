//! # shoal._core: the PyO3 bindings
//!
//! The only crate that knows Python. It wraps the runtime's scheduler, client
//! and worker in small classes used by the pure-Python API in
//! `python/shoal/`. Every call that may block releases the GIL and wakes up
//! every 100 ms to let Python handle signals, so Ctrl-C always works.

mod numpy_alloc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use shoal_runtime::net::Secret;
use shoal_runtime::scheduler::{self};
use shoal_runtime::shm;
use std::path::PathBuf;
use std::time::{Duration, Instant};

mod buffers;
mod client_core;
mod cluster;
mod interrupts;
mod memory_policy;
mod refcounts;
mod watchdog;
mod worker_core;

use buffers::*;
use client_core::*;
use cluster::*;
use interrupts::*;
use memory_policy::*;
use refcounts::*;
use worker_core::*;

pyo3::create_exception!(
    _core,
    ShoalError,
    pyo3::exceptions::PyException,
    "Base class of Shoal's own errors."
);
pyo3::create_exception!(
    _core,
    SchedulerLostError,
    ShoalError,
    "The connection to the scheduler is gone."
);

const SLICE: Duration = Duration::from_millis(100);

fn deadline(timeout: Option<f64>) -> PyResult<Option<Instant>> {
    match timeout {
        None => Ok(None),
        Some(t) if t.is_finite() && t >= 0.0 => {
            Ok(Some(Instant::now() + shoal_runtime::duration::wait(t)))
        }
        Some(t) => Err(PyValueError::new_err(format!(
            "timeout must be a non-negative number of seconds, not {t}"
        ))),
    }
}

/// Runs `f` without the GIL in slices of at most 100 ms until it reports a
/// result, checking for signals (Ctrl-C) between slices.
fn blocking<T: Send>(
    py: Python<'_>,
    end: Option<Instant>,
    mut f: impl FnMut(Instant) -> Option<T> + Send,
) -> PyResult<Option<T>> {
    loop {
        let now = Instant::now();
        let slice_end = match end {
            Some(e) if e <= now + SLICE => e,
            _ => now + SLICE,
        };
        if let Some(v) = py.detach(|| f(slice_end)) {
            return Ok(Some(v));
        }
        py.check_signals()?;
        if end.is_some_and(|e| Instant::now() >= e) {
            return Ok(None);
        }
    }
}

/// The dashboard's access token for a cluster token (what `?token=` takes).
#[pyfunction]
fn dashboard_token(token: &str) -> PyResult<String> {
    let secret = Secret::from_token(token).map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(secret.dashboard_token())
}

/// Seconds in a duration a person typed (`"90"`, `"2.5"`, `"10m"`,
/// `"1h30m"`): the CLI's parser, so both take the same spellings.
#[pyfunction]
fn parse_duration(text: &str) -> PyResult<f64> {
    shoal_runtime::duration::parse(text)
        .map(|d| d.as_secs_f64())
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

/// The settings file in use (None if there is none); `ValueError` saying
/// what is wrong with it where it cannot be used.
#[pyfunction]
fn check_settings() -> PyResult<Option<String>> {
    shoal_runtime::settings::check()
        .map(|p| p.map(|p| p.display().to_string()))
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

/// The value of the `SHOAL_*` variable `name` (from the environment, else
/// the settings file), or its default ("" for none); `KeyError` for a name
/// not in `shoal_runtime::settings::VARS`.
#[pyfunction]
fn setting(name: &str) -> PyResult<String> {
    if shoal_runtime::settings::var(name).is_none() {
        return Err(pyo3::exceptions::PyKeyError::new_err(format!(
            "{name} is not one of Shoal's settings"
        )));
    }
    Ok(shoal_runtime::settings::value(name))
}

/// Every `SHOAL_*` variable: `(name, effective value, default, meaning,
/// origin)`, origin being `user`, `shoal` or `tests`.
#[pyfunction]
fn settings() -> Vec<(
    &'static str,
    String,
    &'static str,
    &'static str,
    &'static str,
)> {
    use shoal_runtime::settings::{value, Origin, VARS};
    VARS.iter()
        .map(|v| {
            let origin = match v.origin {
                Origin::User => "user",
                Origin::Shoal => "shoal",
                Origin::Tests => "tests",
            };
            (v.name, value(v.name), v.default, v.meaning, origin)
        })
        .collect()
}

/// One of the dashboard's embedded files: `index.html`, `app.js`, `app.css`
/// (a performance report inlines them).
#[pyfunction]
fn dashboard_asset(name: &str) -> PyResult<&'static str> {
    match name {
        "index.html" => Ok(scheduler::INDEX_HTML),
        "app.js" => Ok(scheduler::APP_JS),
        "app.css" => Ok(scheduler::APP_CSS),
        other => Err(PyValueError::new_err(format!(
            "the dashboard has index.html, app.js and app.css, not {other:?}"
        ))),
    }
}

/// Appends a line to this process's log ring (what `get_worker_logs`
/// returns; Python's `logging` records come here).
#[pyfunction]
fn log_line(line: String) {
    shoal_runtime::logs::push(line);
}

/// Runs the `shoal` command line; returns the exit code.
#[pyfunction]
#[pyo3(signature = (argv, python=None, package_path=None, executable=None))]
fn cli_main(
    py: Python<'_>,
    argv: Vec<String>,
    python: Option<String>,
    package_path: Option<String>,
    executable: Option<String>,
) -> i32 {
    py.detach(|| {
        shoal_cli::run(
            argv,
            shoal_cli::HostInfo {
                python,
                package_path,
                executable,
                check_worker_args: Some(check_worker_args),
            },
        )
    })
}

/// `shoal._worker.check_args`: the worker's own parsing of its arguments.
fn check_worker_args(args: &[String]) -> Result<(), String> {
    Python::attach(|py| {
        let wrong = py
            .import("shoal._worker")
            .and_then(|m| m.call_method1("check_args", (args.to_vec(),)))
            .map_err(|e| e.to_string())?;
        match wrong.extract::<Option<String>>() {
            Ok(None) => Ok(()),
            Ok(Some(why)) => Err(why),
            Err(e) => Err(e.to_string()),
        }
    })
}

/// This process's shared-memory segment directory, created (emptied if a
/// dead process with the same pid left one).
#[pyfunction]
fn segment_dir() -> PyResult<String> {
    use std::sync::atomic::{AtomicU32, Ordering};
    // Emptied once per process (a stale one of a dead process with our
    // pid); later calls must not delete what this process put there.
    static FRESH_FOR: AtomicU32 = AtomicU32::new(0);
    let pid = std::process::id();
    let d = shm::segment_dir(pid);
    if FRESH_FOR.swap(pid, Ordering::SeqCst) != pid {
        shm::create_own(&d)?;
    } else {
        std::fs::create_dir_all(&d)?;
    }
    Ok(d.to_string_lossy().into_owned())
}

/// This process's spill directory under `local` (default: the temporary
/// directory), created.
#[pyfunction]
#[pyo3(signature = (local=None))]
fn spill_dir(local: Option<PathBuf>) -> PyResult<String> {
    let d = shm::spill_dir(local.as_deref(), std::process::id());
    shm::create_own(&d)?;
    Ok(d.to_string_lossy().into_owned())
}

/// Removes the segment and spill directories of process `pid` (it exited).
#[pyfunction]
fn remove_process_dirs(pid: u32) {
    shm::remove_process(pid)
}

/// Removes the directories of this user's processes that no longer exist
/// (under `local` for spill directories); returns how many.
#[pyfunction]
#[pyo3(signature = (local=None))]
fn sweep(local: Option<PathBuf>) -> usize {
    shm::sweep(local.as_deref())
}

/// Returns the free memory of this process's C heaps to the system
/// (`shoal_runtime::malloc`); whether any was returned.
#[pyfunction]
fn malloc_trim(py: Python<'_>) -> bool {
    py.detach(shoal_runtime::malloc::trim)
}

/// Whether this process (or one it was forked from) has started Shoal's
/// I/O runtime: its workers can then not be forked from it (`_zygote`).
#[pyfunction]
fn runtime_started() -> bool {
    shoal_runtime::runtime_started()
}

/// Uses these PEM files for `tls://` connections of this process (the
/// site's CA, this process's certificate and key). Once per process.
#[pyfunction]
fn configure_tls(ca: PathBuf, cert: PathBuf, key: PathBuf) -> PyResult<()> {
    shoal_runtime::net::configure_tls(&ca, &cert, &key)
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    shoal_runtime::init_logging();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("PROTOCOL_VERSION", shoal_proto::PROTOCOL_VERSION)?;
    m.add("INLINE_LIMIT", shoal_proto::INLINE_LIMIT)?;
    m.add("EXIT_STOPPED", shoal_runtime::local::EXIT_STOPPED)?;
    m.add("EXIT_REFUSED", shoal_runtime::local::EXIT_REFUSED)?;
    m.add(
        "EXIT_SCHEDULER_SILENT",
        shoal_runtime::local::EXIT_SCHEDULER_SILENT,
    )?;
    m.add("ShoalError", m.py().get_type::<ShoalError>())?;
    m.add(
        "SchedulerLostError",
        m.py().get_type::<SchedulerLostError>(),
    )?;
    m.add_class::<Cluster>()?;
    m.add_class::<ClientCore>()?;
    m.add_class::<Outcome>()?;
    m.add_class::<WatcherPy>()?;
    m.add_class::<RefCounts>()?;
    m.add_class::<MemoryPolicy>()?;
    m.add_class::<MemoryDecision>()?;
    m.add_class::<WorkerCore>()?;
    m.add_class::<Frame>()?;
    m.add_class::<UnraisableHook>()?;
    m.add_class::<watchdog::Watchdog>()?;
    m.add_function(wrap_pyfunction!(guard_interrupts, m)?)?;
    m.add_function(wrap_pyfunction!(check_settings, m)?)?;
    m.add_function(wrap_pyfunction!(cli_main, m)?)?;
    m.add_function(wrap_pyfunction!(segment_dir, m)?)?;
    m.add_function(wrap_pyfunction!(spill_dir, m)?)?;
    m.add_function(wrap_pyfunction!(remove_process_dirs, m)?)?;
    m.add_function(wrap_pyfunction!(sweep, m)?)?;
    m.add_function(wrap_pyfunction!(malloc_trim, m)?)?;
    m.add_function(wrap_pyfunction!(runtime_started, m)?)?;
    m.add_function(wrap_pyfunction!(configure_tls, m)?)?;
    m.add_function(wrap_pyfunction!(dashboard_token, m)?)?;
    m.add_function(wrap_pyfunction!(parse_duration, m)?)?;
    m.add_function(wrap_pyfunction!(setting, m)?)?;
    m.add_function(wrap_pyfunction!(settings, m)?)?;
    m.add("MAX_DURATION", shoal_runtime::duration::MAX.as_secs_f64())?;
    m.add_function(wrap_pyfunction!(dashboard_asset, m)?)?;
    m.add_function(wrap_pyfunction!(log_line, m)?)?;
    m.add_function(wrap_pyfunction!(numpy_alloc::shm_allocator_install, m)?)?;
    m.add_function(wrap_pyfunction!(numpy_alloc::shm_allocator_use, m)?)?;
    m.add_function(wrap_pyfunction!(numpy_alloc::shm_locate, m)?)?;
    m.add_function(wrap_pyfunction!(numpy_alloc::shm_allocator_forked, m)?)?;
    m.add_function(wrap_pyfunction!(numpy_alloc::shm_publish, m)?)?;
    m.add_function(wrap_pyfunction!(numpy_alloc::shm_unpublish, m)?)?;
    m.add_function(wrap_pyfunction!(numpy_alloc::shm_publish_frame, m)?)?;
    m.add_function(wrap_pyfunction!(numpy_alloc::shm_reserve, m)?)?;
    m.add_function(wrap_pyfunction!(map_file, m)?)?;
    m.add_class::<Mapped>()?;
    m.add_function(wrap_pyfunction!(numpy_alloc::shm_allocator_stats, m)?)?;
    m.add_function(wrap_pyfunction!(numpy_alloc::shm_allocator_trim, m)?)?;
    Ok(())
}
