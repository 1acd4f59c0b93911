//! `Cluster`: the embedded scheduler and its supervised worker processes.

use super::*;
use pyo3::exceptions::PyOSError;
use shoal_runtime::local::{LocalCluster, Obituaries, WorkerCommand};
use shoal_runtime::net::{Address, Secret};
use shoal_runtime::runtime;
use shoal_runtime::scheduler::{self, SchedulerHandle};
use shoal_runtime::shm;
use shoal_runtime::zygote::Zygote;
use std::path::PathBuf;
use std::sync::Arc;

/// An embedded cluster: a scheduler on this process's I/O thread, listening
/// on a Unix socket in a private directory, and supervised worker processes.
#[pyclass(module = "shoal._core")]
pub(crate) struct Cluster {
    scheduler: Option<SchedulerHandle>,
    workers: Option<LocalCluster>,
    dir: Option<PathBuf>,
    #[pyo3(get)]
    address: String,
    /// The cluster's token: workers and clients must know it to join.
    #[pyo3(get)]
    token: String,
    /// The dashboard's URL without its token (None: no dashboard).
    #[pyo3(get)]
    dashboard: Option<String>,
}

#[pymethods]
impl Cluster {
    /// Starts the scheduler and `n_workers` processes running
    /// `program args... ADDRESS`; or, with `zygote` (its socket's
    /// descriptor, which this takes over, and its process id: see
    /// `shoal._zygote`), forked from it with `args[2:]... ADDRESS`.
    #[new]
    #[pyo3(signature = (n_workers, program, args, env, dashboard=None, zygote=None))]
    fn new(
        py: Python<'_>,
        n_workers: usize,
        program: String,
        args: Vec<String>,
        env: Vec<(String, String)>,
        dashboard: Option<String>,
        zygote: Option<(i32, u32)>,
    ) -> PyResult<Self> {
        // Owned first: closed (the zygote ends) whatever fails below.
        // SAFETY: the caller hands its descriptor over (`_zygote.start`
        // detaches it from its socket object).
        let zygote = zygote.map(|(fd, pid)| Arc::new(unsafe { Zygote::from_raw(fd, pid) }));
        py.detach(|| {
            let dir = shm::socket_dir()?;
            let addr = Address::Unix(dir.join("scheduler.sock"));
            // A fresh random token per cluster; workers get it in their
            // environment, never on a command line (visible to `ps`).
            let secret = Secret::random();
            let token = secret.token();
            let sched = runtime()
                .block_on(scheduler::start(
                    &addr,
                    secret.clone(),
                    dashboard.as_deref(),
                ))
                .inspect_err(|_| {
                    let _ = std::fs::remove_dir_all(&dir);
                })?;
            let address = sched.address.to_string();
            let dashboard = sched.dashboard.clone();
            let mut args = args;
            args.push(address.clone());
            let mut env = env;
            env.push(("SHOAL_TOKEN".into(), token.clone()));
            let cmd = WorkerCommand {
                program,
                args,
                env,
                reconnect: false,
                scheduler_elsewhere: false,
                obituaries: Some(Obituaries {
                    scheduler: sched.address.clone(),
                    secret: secret.clone(),
                }),
                zygote,
            };
            let workers = LocalCluster::start(cmd, n_workers)?;
            // A crashed scheduler closed every connection: stop replacing
            // the workers that exit because of it.
            let (crashed, stop_workers) = (sched.crashed(), workers.stopper());
            runtime().spawn(async move {
                crashed.await;
                stop_workers();
            });
            Ok::<_, std::io::Error>(Cluster {
                scheduler: Some(sched),
                workers: Some(workers),
                dir: Some(dir),
                address,
                token,
                dashboard,
            })
        })
        .map_err(|e| PyOSError::new_err(format!("cannot start the local cluster: {e}")))
    }

    /// Keeps `n` worker processes: starts more, or asks the newest to
    /// retire (see `LocalCluster::scale`); returns those asked.
    fn scale(&self, n: usize) -> Vec<u32> {
        self.workers.as_ref().map_or_else(Vec::new, |w| w.scale(n))
    }

    /// How many worker processes it keeps.
    fn target(&self) -> usize {
        self.workers.as_ref().map_or(0, LocalCluster::target)
    }

    /// Why it stopped starting workers, if it did.
    fn failure(&self) -> Option<String> {
        self.workers.as_ref().and_then(LocalCluster::failure)
    }

    /// Process ids of the live workers.
    fn worker_pids(&self) -> Vec<u32> {
        self.workers
            .as_ref()
            .map_or_else(Vec::new, LocalCluster::pids)
    }

    /// Asks the workers to exit, waits briefly, kills stragglers, stops the
    /// scheduler and removes the socket directory. Idempotent.
    fn close(&mut self, py: Python<'_>) {
        if let Some(s) = &self.scheduler {
            s.shutdown_workers();
        }
        if let Some(mut w) = self.workers.take() {
            py.detach(|| w.close());
        }
        if let Some(s) = self.scheduler.take() {
            s.stop();
        }
        if let Some(d) = self.dir.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(s) = &self.scheduler {
            s.shutdown_workers();
        }
        self.workers.take();
        if let Some(d) = self.dir.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
