//! # shoal-runtime: the services that drive the core
//!
//! * [`scheduler`]: accepts clients and workers, feeds their messages to
//!   `shoal_core::Core` and turns its actions into messages.
//! * [`worker`]: the Rust half of a worker process: scheduler connection,
//!   input fetching, result store and data server; Python threads pull tasks
//!   from it.
//! * [`client`]: a client's connection: submissions out, task states in,
//!   blocking waits for the Python API (called with the GIL released).
//! * [`local`]: starts and supervises the worker processes of an embedded cluster.
//! * [`shm`]: the directories of shared-memory segments and spilled data,
//!   and their cleanup when a process dies.
//! * [`hugeshm`]: huge pages for shared-memory files where tmpfs gives
//!   4 KiB pages (`MADV_COLLAPSE`).
//! * [`shm_pool`]: large NumPy allocations in shared memory from the start
//!   (a result's export then copies nothing).
//! * [`bufpool`]: warm buffers for frames received from other hosts.
//! * [`refcounts`]: a client's live futures per task, compactly.
//! * [`logs`]: this process's recent log lines (for `get_worker_logs`).
//!
//! The scheduler also serves the dashboard (HTTP, axum) on the same thread.
//!
//! Everything talks over real sockets ([`net`]), Unix or TCP, with the same
//! protocol whether the cluster is one laptop or many hosts. All async work
//! runs on one small tokio runtime per process ([`runtime`]); this crate never
//! touches Python.

#![warn(missing_docs, unreachable_pub)]

pub mod bufpool;
pub mod client;
pub mod clock;
pub mod command;
pub mod duration;
pub mod hugeshm;
pub mod local;
pub mod logs;
pub mod malloc;
pub mod net;
pub mod noop;
pub mod refcounts;
pub mod scheduler;
pub mod settings;
pub mod shm;
#[cfg(target_os = "linux")]
pub mod shm_pool;
pub mod slots;
pub mod transfer;
pub mod worker;
pub mod zygote;

use std::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

/// Sends this process's log events (`tracing`) to stderr, filtered by
/// `SHOAL_LOG` (`warn` by default; e.g. `SHOAL_LOG=info`,
/// `SHOAL_LOG=shoal_runtime::scheduler=debug`). Idempotent.
/// Events also go to [`logs`] (for `get_worker_logs` and the dashboard).
pub fn init_logging() {
    init_logging_with("warn");
}

/// [`init_logging`] with another default filter than `warn` (`shoal
/// scheduler` also logs workers joining and leaving, as Dask's does). Once
/// logging is set up, a later call changes the default (`SHOAL_LOG`, when
/// set, still wins): the Python module sets up logging as it loads, before
/// a command knows what it will be.
pub fn init_logging_with(default: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    type Handle = tracing_subscriber::reload::Handle<
        tracing_subscriber::EnvFilter,
        tracing_subscriber::Registry,
    >;
    static RELOAD: std::sync::OnceLock<Handle> = std::sync::OnceLock::new();
    let from_env =
        settings::raw("SHOAL_LOG").and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok());
    if let Some(h) = RELOAD.get() {
        if from_env.is_none() {
            let _ = h.reload(tracing_subscriber::EnvFilter::new(default));
        }
        return;
    }
    let filter = from_env.unwrap_or_else(|| tracing_subscriber::EnvFilter::new(default));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let _ = RELOAD.set(handle);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(logs::RingLayer)
        .try_init();
}
use std::sync::Mutex;

/// The process that made the last [`runtime`] (0: none yet).
static RUNTIME_PID: AtomicU32 = AtomicU32::new(0);

/// Whether this process, or one it was forked from, has made a
/// [`runtime`]: tokio's process-wide state (its signal pipe) is then
/// inherited, and a forked child's own runtime shares or lacks it.
pub fn runtime_started() -> bool {
    RUNTIME_PID.load(Ordering::Acquire) != 0
}

/// The process-wide I/O runtime: one thread is plenty for the control plane
/// and leaves the cores to the tasks.
///
/// A forked child (multiprocessing, joblib) inherits the runtime without its
/// thread, so a runtime belongs to the process that made it: a child gets a
/// fresh one. The parent's copy is leaked in the child (dropping it would
/// wait for threads that do not exist there).
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: AtomicPtr<tokio::runtime::Runtime> = AtomicPtr::new(std::ptr::null_mut());
    static MAKING: Mutex<()> = Mutex::new(());
    let pid = std::process::id();
    if RUNTIME_PID.load(Ordering::Acquire) == pid {
        // SAFETY: RT was published before PID (release order) and is never freed.
        return unsafe { &*RT.load(Ordering::Acquire) };
    }
    let _guard = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    if RUNTIME_PID.load(Ordering::Acquire) != pid {
        raise_fd_limit();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("shoal-io")
            .enable_all()
            .build()
            .expect("cannot start the tokio runtime");
        RT.store(Box::into_raw(Box::new(rt)), Ordering::Release);
        RUNTIME_PID.store(pid, Ordering::Release);
    }
    // SAFETY: as above.
    unsafe { &*RT.load(Ordering::Acquire) }
}

/// Raises this process's soft limit on open files to its hard limit: every
/// shared-memory block and mapped result holds a descriptor, and the usual
/// soft limit (1,024) is reached by about a thousand held arrays. Returns
/// the soft limit now in force.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    if lim.rlim_cur < lim.rlim_max {
        let wanted = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass; raising the soft limit
        // up to the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        } else {
            tracing::warn!(
                "cannot raise the open-file limit from {} to {}: {}",
                lim.rlim_cur,
                lim.rlim_max,
                std::io::Error::last_os_error()
            );
        }
    }
    lim.rlim_cur
}
