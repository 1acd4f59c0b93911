//! Command tasks run under the worker, and stopping what runs (cancels,
//! time limits, a task stuck in C code).

use super::*;

impl WorkerShared {
    /// Runs a command task on the calling thread (see [`crate::command`]):
    /// a stop from the scheduler reaches it through its flag.
    pub fn run_command(
        &self,
        task: u64,
        spec: &shoal_proto::CommandSpec,
        job: u32,
        cpus: u32,
        extra_env: &[(String, String)],
        time_limit: Option<Duration>,
    ) -> io::Result<crate::command::Outcome> {
        let flag = Arc::new((AtomicBool::new(false), AtomicU32::new(0)));
        {
            let mut st = self.stops.lock();
            if st.command_started(task, flag.clone()) {
                flag.0.store(true, Ordering::Release); // asked before it started
            }
            self.stops_asked.store(st.any_asked(), Ordering::Relaxed);
        }
        let out = crate::command::run(&crate::command::Run {
            spec,
            job,
            cpus,
            extra_env,
            time_limit,
            grace: self.stop_grace,
            stop: &flag.0,
            group: &flag.1,
        });
        self.stops.lock().command_ended(task);
        out
    }

    /// A task that runs here is to stop (cancelled).
    pub(crate) fn stop_running(&self, task: u64) {
        let mut st = self.stops.lock();
        match st.ask(task) {
            Stop::Command(flag) => flag.0.store(true, Ordering::Release),
            Stop::Python => {
                self.stops_asked.store(true, Ordering::Relaxed);
                self.stops_cv.notify_all();
            }
        }
    }

    /// Kills the process groups of the commands running here: called as
    /// this process exits, so that no program outlives its worker.
    pub fn kill_commands(&self) {
        for c in self.stops.lock().commands() {
            let g = c.1.load(Ordering::Acquire);
            if g != 0 {
                crate::command::signal_group(g, libc::SIGKILL);
            }
        }
    }

    /// For the Python watchdog: running tasks the scheduler asked to stop
    /// (waits up to `timeout`; empty on timeout).
    pub fn stop_requests(&self, timeout: Duration) -> Vec<u64> {
        let deadline = Instant::now() + timeout;
        let mut st = self.stops.lock();
        while !st.python_waiting() {
            if self.stops_cv.wait_until(&mut st, deadline).timed_out() {
                return Vec::new();
            }
        }
        st.python_requests()
    }

    /// A task told to stop does not (stuck in C code): report its failure,
    /// then ask the scheduler for a restart (it answers `Restart`, after
    /// which this process exits and its nanny starts a fresh one).
    pub fn report_stuck(&self, done: Done) {
        self.report(vec![done]);
        self.flush_locked(&mut self.unsent.lock());
        let _ = self.out().send(FromWorker::RestartMe);
    }
}
