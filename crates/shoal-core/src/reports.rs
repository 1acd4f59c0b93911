//! Reports from workers about their tasks: started, finished, failed,
//! stolen or not, inputs that could not be fetched; and the clock's tick.

use super::*;

impl<S> Core<S> {
    /// A worker finished a task. `inline`: the result travelled with the
    /// message and the scheduler keeps it. Stale reports (the task was
    /// cancelled or moved meanwhile) are ignored: None; else the task's
    /// group (for the caller's records, without another lookup).
    pub fn handle_task_finished(
        &mut self,
        worker: WorkerId,
        task: TaskId,
        size: u64,
        inline: bool,
        duration_us: u64,
    ) -> Option<u32> {
        self.stimulus = "task-finished";
        self.stopped_running(worker, task);
        if !self.is_processing_on(task, worker) {
            return None;
        }
        self.progress(worker);
        let t = self.tasks.get_mut(&task).expect("processing");
        t.ran = true;
        let group = t.group;
        let g = &mut self.groups[group as usize];
        let d = duration_us as f64;
        g.mean_us = Some(g.mean_us.map_or(d, |m| 0.8 * m + 0.2 * d));
        g.counts.finished += 1;
        g.counts.total_us += duration_us;
        let location = if inline {
            Location::Inline
        } else {
            Location::Worker(worker)
        };
        self.set_state(task, TaskState::Memory { location, size });
        self.maybe_release(task);
        self.schedule();
        Some(group)
    }

    /// A worker reports that a task raised. Returns whether the report was
    /// taken (false: stale) and the task is now erred (true) or will retry.
    pub fn handle_task_failed(&mut self, worker: WorkerId, task: TaskId) -> Option<bool> {
        self.stimulus = "task-failed";
        self.stopped_running(worker, task);
        if !self.is_processing_on(task, worker) {
            return None;
        }
        self.progress(worker);
        let t = self.tasks.get_mut(&task).expect("processing");
        let erred = if let Some(r) = t.rare.as_mut().filter(|r| r.retries_left > 0) {
            r.retries_left -= 1;
            self.set_state(task, TaskState::Ready);
            false
        } else {
            self.set_erred(task, task, ErrorKind::Exception);
            true
        };
        self.schedule();
        Some(erred)
    }

    /// Time passes (microseconds, at or after [`Core::poll_timeout`]).
    /// Finds stalled workers and takes their queued tasks back for idle
    /// ones.
    pub fn handle_tick(&mut self, now_us: u64) {
        self.stimulus = "tick";
        self.set_clock(now_us);
        self.ticked_us = self.now_us;
        let steal_after = self.config.steal_after_us;
        let mut newly_stalled = false;
        for w in self.workers.values_mut() {
            let queued = w.busy() > w.nthreads;
            if !w.stalled && queued && self.now_us.saturating_sub(w.progress_us) >= steal_after {
                w.stalled = true;
                newly_stalled = true;
            }
        }
        if newly_stalled || self.workers.values().any(|w| w.stalled || w.paused) {
            self.steal();
        }
    }

    /// The time now (microseconds, `handle_tick`'s origin), without the
    /// tick's checks: the service sets it before each batch of events, so
    /// that what the core stamps (a worker's last progress, a time
    /// request's end) is exact however seldom it ticks. Never goes back.
    pub fn set_clock(&mut self, now_us: u64) {
        self.now_us = self.now_us.max(now_us);
    }

    /// When the core next needs [`Core::handle_tick`] (its clock), None
    /// while no rule waits on time (the service may then sleep until an
    /// event comes). A worker with tasks queued behind its running ones
    /// stalls `steal_after_us` after its last progress; while a stalled or
    /// paused worker has queued tasks and another worker a free thread,
    /// taking them back is retried every `steal_retry_us`. Costs a pass
    /// over the workers: call it once per batch of events, not per event.
    pub fn poll_timeout(&self) -> Option<u64> {
        let mut next: Option<u64> = None;
        let mut sooner = |t: u64| next = Some(next.map_or(t, |n| n.min(t)));
        let mut free = false;
        let mut to_steal = false;
        for w in self.workers.values() {
            let queued = w.busy() > w.nthreads;
            if queued && !w.stalled {
                sooner(w.progress_us + self.config.steal_after_us);
            }
            if w.stalled || w.paused {
                to_steal |= queued;
            } else {
                free |= w.busy() < w.nthreads;
            }
        }
        if to_steal && free {
            sooner(self.ticked_us + self.config.steal_retry_us);
        }
        next
    }

    /// A worker answers a steal request: `ok` means it had not started the
    /// task and dropped it, so the task can go elsewhere.
    pub fn handle_steal_reply(&mut self, worker: WorkerId, task: TaskId, ok: bool) {
        self.stimulus = "steal-reply";
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        let cancel = self.cancel_when_given.remove(&task);
        if !w.stealing.remove(&task) || !ok || !self.is_processing_on(task, worker) {
            return;
        }
        // Given back: it had not started.
        if let Some(w) = self.workers.get_mut(&worker) {
            w.running.remove(&task);
        }
        self.set_state(task, TaskState::Ready);
        if cancel {
            self.set_erred(task, task, ErrorKind::Cancelled);
        }
        self.schedule();
    }

    /// A worker's execution threads took these tasks. Only started tasks
    /// count against `max_kills` when the worker dies; a task no longer
    /// the worker's (cancelled while the order travelled) runs anyway and
    /// keeps its threads busy until it reports.
    pub fn handle_tasks_started(&mut self, worker: WorkerId, tasks: &[TaskId]) {
        self.stimulus = "tasks-started";
        for &id in tasks {
            let mine = self.is_processing_on(id, worker);
            let threads = self.tasks.get(&id).map_or(1, |t| t.threads());
            let Some(w) = self.workers.get_mut(&worker) else {
                return;
            };
            if mine {
                w.running.insert(id);
            } else if w.zombies.insert(id, threads).is_none() {
                w.zombie_threads += threads;
            }
        }
    }

    /// `worker` could not reach the holder of `deps` (inputs of `task`) and
    /// dropped the task: it is placed again. After `max_kills` such
    /// failures the inputs are taken as lost and recomputed (a dead holder
    /// is normally found sooner, by its silence).
    pub fn handle_fetch_failed(&mut self, worker: WorkerId, task: TaskId, deps: &[TaskId]) {
        self.stimulus = "fetch-failed";
        if !self.is_processing_on(task, worker) {
            return;
        }
        let t = self.tasks.get_mut(&task).expect("processing");
        t.fetch_fails = t.fetch_fails.saturating_add(1);
        if t.fetch_fails >= self.config.max_kills {
            t.fetch_fails = 0;
            self.handle_missing_data(worker, task, deps);
            return;
        }
        self.set_state(task, TaskState::Ready);
        self.schedule();
    }

    /// A report came for `task` from `worker`: it no longer runs there. A
    /// zombie's threads are free again.
    pub(crate) fn stopped_running(&mut self, worker: WorkerId, task: TaskId) {
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        w.running.remove(&task);
        if let Some(n) = w.zombies.remove(&task) {
            w.zombie_threads -= n;
            self.schedule();
        }
    }

    pub(crate) fn progress(&mut self, worker: WorkerId) {
        if let Some(w) = self.workers.get_mut(&worker) {
            w.progress_us = self.now_us;
            w.stalled = false;
        }
    }
}
