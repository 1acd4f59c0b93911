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
//!
//! Everything talks over real sockets ([`net`]), Unix or TCP, with the same
//! protocol whether the cluster is one laptop or many hosts. All async work
//! runs on one small tokio runtime per process ([`runtime`]); this crate never
//! touches Python.

#![warn(missing_docs, unreachable_pub)]

pub mod client;
pub mod local;
pub mod net;
pub mod scheduler;
pub mod worker;

use std::sync::OnceLock;

/// The process-wide I/O runtime: one thread is plenty for the control plane
/// and leaves the cores to the tasks.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("shoal-io")
            .enable_all()
            .build()
            .expect("cannot start the tokio runtime")
    })
}
