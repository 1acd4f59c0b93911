//! What the worker tells the scheduler: task reports (buffered, sent every
//! few milliseconds, kept until acknowledged), threads lent and taken back,
//! metrics, telemetry, profile samples and syncs.

use super::*;

impl WorkerShared {
    /// Buffers finished tasks' reports; sends the buffer once its oldest
    /// entry is `FLUSH_AFTER` old (one frame for many tiny tasks), here or
    /// from the flusher task.
    pub fn report(&self, done: Vec<Done>) {
        self.report_as(done, false);
    }

    /// Reports `done` and takes the next work, as an execution thread does
    /// between tasks. After a task of `FLUSH_AFTER` or more, what is
    /// buffered goes at once if work was taken (else the wait that follows
    /// sends it): see `WorkerShared::eager`.
    pub fn report_and_take(&self, done: Vec<Done>, max: usize) -> Option<Batch> {
        if let Some(last) = done.last() {
            let long = last.timing().duration_us >= FLUSH_AFTER.as_micros() as u64;
            self.eager.store(long, Ordering::Relaxed);
        }
        let eager = self.eager.load(Ordering::Relaxed);
        self.report_as(done, eager);
        let taken = self.take(&mut self.orders.lock(), max, eager);
        if eager && taken.is_some() {
            self.flush();
        }
        taken
    }

    /// `quiet`: the caller sends what is buffered itself, soon (the
    /// flusher is not woken).
    fn report_as(&self, done: Vec<Done>, quiet: bool) {
        if done.is_empty() {
            return;
        }
        {
            let mut orders = self.orders.lock();
            for d in &done {
                orders.finished(d.id());
            }
        }
        // Stops asked for tasks not seen running: rare, so the common case
        // reads one atomic instead of taking the lock.
        if self.stops_asked.load(Ordering::Relaxed) {
            let mut st = self.stops.lock();
            for d in &done {
                st.reported(d.id());
            }
            self.stops_asked.store(st.any_asked(), Ordering::Relaxed);
        }
        let mut unsent = self.unsent.lock();
        for d in done {
            let msg = match d {
                Done::Ok { id, value, timing } => {
                    let size = value.len() as u64;
                    // Small: inline (the scheduler keeps it); else kept here.
                    let value = if travels_inline(value.len(), INLINE_LIMIT) {
                        Some(value)
                    } else {
                        self.store.lock().finished(id, Stored::Bytes(value));
                        None
                    };
                    FromWorker::Finished {
                        id,
                        size,
                        value,
                        timing,
                    }
                }
                Done::File {
                    id,
                    path,
                    size,
                    timing,
                } => {
                    self.store
                        .lock()
                        .finished(id, Stored::File { path, len: size });
                    FromWorker::Finished {
                        id,
                        size,
                        value: None,
                        timing,
                    }
                }
                Done::Held { id, size, timing } => {
                    self.store.lock().finished(id, Stored::Held);
                    FromWorker::Finished {
                        id,
                        size,
                        value: None,
                        timing,
                    }
                }
                Done::Err {
                    id,
                    error,
                    text,
                    timing,
                } => FromWorker::Failed {
                    id,
                    error,
                    text,
                    timing,
                },
            };
            unsent.reports.push(msg);
        }
        if self.buffered(&mut unsent, quiet).elapsed() >= FLUSH_AFTER {
            self.flush_locked(&mut unsent);
        }
    }

    /// When the oldest unsent entry was buffered (now, for the first one:
    /// the flusher then sends it within `FLUSH_AFTER`).
    pub(crate) fn buffered(&self, unsent: &mut Unsent, quiet: bool) -> Instant {
        match unsent.since {
            Some(t) => t,
            None => {
                if !quiet {
                    self.unsent_first.notify_one();
                }
                *unsent.since.insert(Instant::now())
            }
        }
    }

    /// Blocks the calling (execution) thread while more than
    /// [`REPORT_BACKLOG`] bytes of reports wait to be written: a scheduler
    /// that reads slower than the worker produces slows the worker down.
    pub fn wait_room(&self) {
        self.out().wait_room(REPORT_BACKLOG, || false);
    }

    /// Whether reports wait beyond [`REPORT_BACKLOG`] (then call
    /// [`WorkerShared::wait_room`] without holding locks others need).
    pub fn backlogged(&self) -> bool {
        self.out().queued_bytes() > REPORT_BACKLOG
    }

    /// Sends buffered reports now.
    pub fn flush(&self) {
        self.flush_locked(&mut self.unsent.lock());
    }

    pub(crate) fn flush_locked(&self, unsent: &mut Unsent) {
        unsent.since = None;
        // All in one send: the writer takes them together (one frame, one
        // wake of the scheduler), not the first alone.
        let mut batch = Vec::with_capacity(unsent.reports.len() + 1);
        if !unsent.started.is_empty() {
            batch.push(FromWorker::Started(std::mem::take(&mut unsent.started)));
        }
        if self.reconnect.is_some() {
            // Kept until acknowledged: sent again if the scheduler is lost.
            let mut log = self.unacked.lock();
            for m in &unsent.reports {
                if matches!(m, FromWorker::Finished { .. } | FromWorker::Failed { .. }) {
                    log.sent(m.clone());
                }
            }
        }
        batch.append(&mut unsent.reports);
        let _ = self.out().send_all(batch);
    }

    /// The scheduler recorded the first `n` reports of this connection.
    pub(crate) fn acked(&self, n: u64) {
        self.unacked.lock().acked(n);
    }

    /// A task waits on other tasks and lends its thread: the caller starts
    /// one more execution thread; the scheduler counts one more.
    pub fn lend_thread(&self) {
        let n = self.orders.lock().lend_thread();
        self.send_threads(n);
    }

    /// The waiting task takes its thread back: one execution thread retires
    /// at its next take ([`Batch::Retire`]).
    pub fn reclaim_thread(&self) {
        let n = self.orders.lock().reclaim_thread();
        self.send_threads(n);
    }

    pub(crate) fn send_threads(&self, n: u32) {
        // Reports buffered before this go first: ordering with results.
        self.flush_locked(&mut self.unsent.lock());
        let _ = self.out().send(FromWorker::Threads(n));
    }

    /// Task `id`'s result cannot be pickled: the scheduler runs what takes
    /// it here (sent before the task's report).
    pub fn pin(&self, id: u64) {
        let _ = self.out().send(FromWorker::Pinned(id));
    }

    /// Elements `from..from + count` of careful batch `id` are done
    /// (`values`, pickled).
    pub fn progress(&self, id: u64, from: u32, count: u32, values: Bytes) {
        let _ = self.out().send(FromWorker::Progress {
            id,
            from,
            count,
            values,
        });
    }

    /// Asks the scheduler to retire this worker gracefully (SIGTERM): its
    /// needed results move to other workers, then it is told to stop.
    pub fn retire(&self) {
        self.flush_locked(&mut self.unsent.lock());
        let _ = self.out().send(FromWorker::RetireMe);
    }

    /// The memory manager's latest figures (travel with the next heartbeat;
    /// CPU and transfer figures are filled in here).
    pub fn set_metrics(&self, m: WorkerMetrics) {
        let mut cur = self.metrics.lock();
        *cur = WorkerMetrics {
            cpu: cur.cpu,
            bytes_in: cur.bytes_in,
            bytes_out: cur.bytes_out,
            ..m
        };
    }

    /// A transfer or spill, for the task stream (sent with the next heartbeat).
    pub fn record_activity(&self, a: Activity) {
        let mut t = self.telemetry.lock();
        // Bounded: a dashboard needs a picture, not every event of a storm.
        if t.activity.len() < 10_000 {
            t.activity.push(a);
        }
    }

    /// Profile samples `(group, folded stack, count)` from the sampler.
    pub fn add_profile(&self, samples: Vec<(String, String, u32)>) {
        self.telemetry.lock().profile.extend(samples);
    }

    pub(crate) fn take_telemetry(&self) -> Option<Telemetry> {
        let mut t = self.telemetry.lock();
        t.logs.extend(crate::logs::drain());
        if t.activity.is_empty() && t.profile.is_empty() && t.logs.is_empty() {
            return None;
        }
        Some(std::mem::take(&mut *t))
    }

    /// A profiler thread runs: syncs wait for its samples.
    pub fn set_sampler(&self, on: bool) {
        self.sampler.store(on, Ordering::Relaxed);
    }

    /// Changes when the scheduler asks for a sync: the profiler then hands
    /// over its samples and calls [`WorkerShared::synced`].
    pub fn sync_epoch(&self) -> u64 {
        self.sync_epoch.load(Ordering::Relaxed)
    }

    /// Answers the pending syncs: buffered reports, telemetry, then `Synced`.
    pub fn synced(&self) {
        let syncs = std::mem::take(&mut *self.syncs.lock());
        if syncs.is_empty() {
            return;
        }
        self.flush();
        if let Some(t) = self.take_telemetry() {
            let _ = self.out().send(FromWorker::Telemetry(t));
        }
        // Memory as of now, too (a report's last point).
        let m = {
            let mut m = self.metrics.lock();
            m.bytes_in = self.bytes_in.load(Ordering::Relaxed);
            m.bytes_out = self.bytes_out.load(Ordering::Relaxed);
            m.clone()
        };
        let _ = self.out().send(FromWorker::Heartbeat(m));
        for sid in syncs {
            let _ = self.out().send(FromWorker::Synced(sid));
        }
    }

    /// Tells the scheduler this worker's memory is above (true) or back
    /// below (false) its pause fraction.
    /// While paused, no task starts while another runs.
    pub fn set_paused(&self, paused: bool) {
        if !self.orders.lock().set_paused(paused) {
            return;
        }
        if !paused {
            self.cv.notify_all(); // threads held back may take work again
        }
        self.flush_locked(&mut self.unsent.lock());
        let _ = self.out().send(FromWorker::Paused(paused));
    }
}
