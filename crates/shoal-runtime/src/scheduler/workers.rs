//! Messages from workers, heartbeats (and the silent dropped), and the
//! task orders sent to them.

use super::*;

impl State {
    pub(crate) fn worker_msg(&mut self, worker: u32, msg: FromWorker) {
        let wid = WorkerId(worker);
        if matches!(msg, FromWorker::Finished { .. } | FromWorker::Failed { .. }) {
            if let Some(w) = self.workers.get_mut(&worker) {
                w.reports += 1; // acknowledged at the next heartbeat
            }
            if !self.partials.is_empty() {
                // A careful batch ended: what it did is in its report now.
                if let FromWorker::Finished { id, .. } | FromWorker::Failed { id, .. } = &msg {
                    self.partials.remove(id);
                }
            }
        }
        match msg {
            FromWorker::Finished { id, .. } | FromWorker::Failed { id, .. }
                if self.recovery.is_restored(id) =>
            {
                let (outcome, text) = match msg {
                    FromWorker::Failed { text, .. } => (jobs::Outcome::Failed, Some(text)),
                    _ => (jobs::Outcome::Finished, None),
                };
                self.restored_ended(id, outcome, text);
            }
            FromWorker::Rejoin {
                running,
                reports,
                held,
            } => {
                tracing::info!(
                    "worker {worker} rejoined: {} tasks running, {} reports sent again, {} \
                     results held",
                    running.len(),
                    reports.len(),
                    held.len()
                );
                // Its results (and what it finishes meanwhile) are kept for
                // clients that come back; it adopts the restored tasks it runs.
                let now = self.clock_us();
                self.recovery.rejoined(now, worker, &running, held);
                for r in reports {
                    if matches!(r, FromWorker::Finished { .. } | FromWorker::Failed { .. }) {
                        self.worker_msg(worker, r);
                    }
                }
            }
            FromWorker::Finished {
                id,
                size,
                value,
                timing,
            } => {
                let inline = value.is_some();
                if let Some(group) = self.core.handle_task_finished(
                    wid,
                    TaskId(id),
                    size,
                    inline,
                    timing.duration_us,
                ) {
                    self.monitor.task(id, group, worker, timing, true, size);
                    if let Some(v) = value {
                        self.set_value(id, &v);
                    }
                    // Scattered data never runs again: drop its bytes here.
                    if let Some(spec) = self.core.spec_mut(TaskId(id)).filter(|s| !s.recompute) {
                        spec.args = Box::default();
                    }
                } else if self.core.state(TaskId(id)).is_none() {
                    // A task of the lost scheduler's time, finished since:
                    // its client may come back for it (during a recovery).
                    self.recovery.finished_unknown(id, worker, size, value);
                }
            }
            FromWorker::Failed {
                id,
                error,
                text,
                timing,
            } => {
                let group = self.core.task_group(TaskId(id)).unwrap_or(u32::MAX);
                if let Some(erred) = self.core.handle_task_failed(wid, TaskId(id)) {
                    self.monitor.task(id, group, worker, timing, false, 0);
                    if erred {
                        self.errors.insert(id, error);
                        self.monitor.error_text.insert(id, text);
                    }
                }
            }
            FromWorker::Telemetry(t) => {
                for a in &t.activity {
                    if a.kind == shoal_proto::ActivityKind::Transfer && a.task != 0 {
                        self.core
                            .handle_transfer(TaskId(a.task), a.bytes, a.duration_us);
                    }
                    let group = self.core.task_group(TaskId(a.task)).unwrap_or(u32::MAX);
                    self.monitor.activity(worker, a, group);
                }
                self.monitor.profile(t.profile);
                if !t.logs.is_empty() {
                    self.monitor.logs(worker, t.logs);
                }
            }
            FromWorker::Threads(n) => self.core.handle_worker_threads(wid, n),
            FromWorker::Story { query, steps } => self.worker_story(worker, query, steps),
            FromWorker::RestartMe => {
                if let Some(w) = self.workers.get(&worker) {
                    tracing::warn!(
                        "worker {} restarts: a task it was told to stop does not stop",
                        w.name
                    );
                    let _ = w.tx.send(ToWorker::Restart);
                }
                self.core.handle_worker_restarting(wid);
            }
            FromWorker::RetireMe => {
                if let Some(w) = self.workers.get(&worker) {
                    tracing::info!("worker {} retires (SIGTERM)", w.name);
                }
                self.core.handle_retire(wid);
            }
            FromWorker::Replicated { id, ok } => {
                self.core.handle_replicated(wid, TaskId(id), ok);
            }
            FromWorker::Heartbeat(m) => {
                self.monitor.heartbeat(worker, crate::clock::now_us(), &m);
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.metrics = m;
                }
            }
            FromWorker::Missing { task, deps } => {
                let deps: Vec<TaskId> = deps.into_iter().map(TaskId).collect();
                tracing::warn!("worker {worker} could not fetch {deps:?}: recomputing them");
                self.core.handle_missing_data(wid, TaskId(task), &deps);
            }
            FromWorker::Pinned(id) => self.core.handle_pinned(wid, TaskId(id)),
            FromWorker::Progress {
                id,
                from,
                count,
                values,
            } => {
                // Only from the run the core counts on, in order, while
                // small: anything else is dropped (the next run just does
                // more over again).
                let current = self.core.state(TaskId(id)) == Some(TaskState::Processing(wid));
                if current && self.careful.contains(&id) {
                    let p = self.partials.entry(id).or_default();
                    if p.next == from && p.bytes + values.len() <= PARTIAL_LIMIT {
                        p.next = from.saturating_add(count);
                        p.bytes += values.len();
                        p.parts.push(values);
                    }
                }
            }
            FromWorker::Paused(p) => {
                tracing::info!(
                    "worker {worker} {}",
                    if p { "paused (memory high)" } else { "resumed" }
                );
                self.core.handle_worker_paused(wid, p)
            }
            FromWorker::Stolen(ids) => {
                for id in ids {
                    self.core.handle_steal_reply(wid, TaskId(id), true);
                }
            }
            FromWorker::Synced(sid) => self.synced(sid, worker),
            FromWorker::Started(ids) => {
                let ids: Vec<TaskId> = ids.into_iter().map(TaskId).collect();
                self.core.handle_tasks_started(wid, &ids);
            }
            FromWorker::FetchFailed { task, deps } => {
                let deps: Vec<TaskId> = deps.into_iter().map(TaskId).collect();
                tracing::warn!("worker {worker} could not reach the holder of {deps:?}");
                self.core.handle_fetch_failed(wid, TaskId(task), &deps);
            }
        }
    }

    /// Every second: pings clients and workers, and lets go of those not
    /// heard from for the heartbeat timeout (dead, hung or cut off) or with
    /// over [`PEER_BACKLOG`] queued for them two beats running. A lost
    /// worker's tasks run elsewhere, its results are recomputed.
    pub(crate) fn heartbeat(&mut self, now: tokio::time::Instant) {
        for c in self.clients.values() {
            let _ = c.tx.send(ToClient::Ping);
        }
        let (timeout, limit) = (self.heartbeat_timeout, self.peer_backlog);
        // Why a peer is let go: silent (frozen, dead, cut off), or reading
        // slower than the cluster talks to it, so that what is queued for
        // it would grow without bound.
        let why = |last_seen: tokio::time::Instant, queued: usize, behind: &mut bool| {
            if now.saturating_duration_since(last_seen) > timeout {
                Some(format!("sent nothing for {timeout:?}"))
            } else if fell_behind(queued, behind, limit) {
                Some(format!(
                    "reads too slowly (over {limit} bytes queued for it for a second)"
                ))
            } else {
                None
            }
        };
        // A client let go: its connection closes at once (what was queued
        // for it is dropped), and what it wanted is released (detached work
        // runs on).
        let gone: Vec<(u32, String)> = self
            .clients
            .iter_mut()
            .filter_map(|(&id, c)| {
                Some((id, why(c.last_seen, c.tx.queued_bytes(), &mut c.behind)?))
            })
            .collect();
        for (id, reason) in gone {
            tracing::warn!("client {id} {reason}: letting it go");
            if let Some(c) = self.clients.remove(&id) {
                self.monitor.messages_out_gone += c.tx.sent();
                c.tx.close();
            }
            self.client_gone(id);
        }
        let gone: Vec<(u32, String)> = self
            .workers
            .iter_mut()
            .filter_map(|(&id, w)| {
                Some((id, why(w.last_seen, w.tx.queued_bytes(), &mut w.behind)?))
            })
            .collect();
        for (id, reason) in gone {
            if let Some(w) = self.workers.remove(&id) {
                self.monitor.messages_out_gone += w.tx.sent();
                // Its connection closes: if it is alive after all, it sees
                // that and exits.
                tracing::warn!(
                    "worker {} (pid {}) {reason}: taking it as lost",
                    w.name,
                    w.pid
                );
                w.tx.close();
            }
            self.synced_all(id);
            self.stories_worker_left(id);
            self.adopted_lost(id);
            self.core.handle_worker_lost(WorkerId(id));
            self.process();
        }
        for w in self.workers.values_mut() {
            let _ = w.tx.send(ToWorker::Ping);
            // What they reported is recorded (the journal was written
            // before this beat): they need not keep it for a rejoin.
            if w.reports > w.acked {
                w.acked = w.reports;
                let _ = w.tx.send(ToWorker::Ack(w.reports));
            }
        }
    }

    pub(crate) fn send_compute(&mut self, worker: WorkerId, task: TaskId) {
        let (Some(w), Some(spec)) = (self.workers.get(&worker.0), self.core.spec(task)) else {
            return;
        };
        let deps = self
            .core
            .deps(task)
            .iter()
            .filter_map(|d| {
                let source = match self.core.location(*d)? {
                    Location::Inline => DepSource::Inline(Bytes::copy_from_slice(self.value(d.0)?)),
                    // The core counts no result of a worker that left
                    // (a dying one's are dropped at once). Were it to, the
                    // input names no address: its fetch fails and the task
                    // is placed again, rather than run without it.
                    Location::Worker(h) => DepSource::Worker {
                        id: h.0,
                        addr: match self.workers.get(&h.0) {
                            Some(w) => w.data_addr.clone(),
                            None => {
                                tracing::error!(
                                    "task {:x}: its input {:x} is on worker {}, which left",
                                    task.0,
                                    d.0,
                                    h.0
                                );
                                String::new()
                            }
                        },
                    },
                };
                Some(Dep { id: d.0, source })
            })
            .collect();
        let group = self.group_of(task.0);
        let _ = w.tx.send(ToWorker::Compute {
            id: task.0,
            name: shoal_proto::task_name(spec.key.as_deref(), group, task.0),
            group: group.to_string(),
            kind: spec.kind,
            func: (*spec.func).clone(),
            args: Bytes::copy_from_slice(&spec.args),
            deps,
            resources: spec.rare().resources.to_vec(),
            time_limit_ms: spec.rare().time_limit_ms,
            job: self.jobs.job_of_task(task.0).unwrap_or(0),
            // (Both empty but after worker deaths: no lookup per task.)
            careful: !self.careful.is_empty() && self.careful.contains(&task.0),
            resume: if self.partials.is_empty() {
                Vec::new()
            } else {
                self.partials
                    .get(&task.0)
                    .map_or_else(Vec::new, |p| p.parts.clone())
            },
        });
    }
}

/// Worker deaths, judged by what their supervisors say they were running.
impl State {
    /// Worker `id` is gone: its tasks run again elsewhere. `running`: what
    /// its supervisor says its threads ran when it died (only those are to
    /// blame); None: not known (judged by what it reported started).
    pub(crate) fn worker_gone(&mut self, id: u32, running: Option<&[(u64, Option<u32>)]>) {
        self.dying.remove(&id);
        self.synced_all(id);
        self.stories_worker_left(id);
        self.adopted_lost(id);
        match running {
            Some(ran) => {
                // A batch's first death on record is not held against it:
                // it may just have run long while workers were killed. It
                // runs again saying which element runs, and only deaths at
                // the same element count (see `Core::handle_worker_died`).
                let mut blamed = Vec::with_capacity(ran.len());
                for &(task, item) in ran {
                    let batch = self
                        .core
                        .spec(TaskId(task))
                        .is_some_and(|s| s.kind == shoal_proto::TaskKind::Batch);
                    if batch && item.is_none() {
                        self.careful.insert(task);
                    } else {
                        blamed.push((TaskId(task), item));
                    }
                }
                self.core.handle_worker_died(WorkerId(id), &blamed);
            }
            None => self.core.handle_worker_lost(WorkerId(id)),
        }
        self.process();
    }

    /// A supervisor's word that its worker process `pid` died running
    /// `running`: before or after the worker's connection closed.
    pub(crate) fn obituary(&mut self, supervisor: u64, pid: u32, running: Vec<(u64, Option<u32>)>) {
        let dying = self
            .dying
            .iter()
            .find(|(_, d)| d.supervisor == supervisor && d.pid == pid)
            .map(|(&id, _)| id);
        let live = || {
            self.workers
                .iter()
                .find(|(_, w)| w.supervisor == supervisor && w.pid == pid)
                .map(|(&id, _)| id)
        };
        let Some(id) = dying.or_else(live) else {
            // Never joined (died starting up), or already judged.
            tracing::debug!("worker process {pid} died; not one of this scheduler's");
            return;
        };
        if let Some(w) = self.workers.remove(&id) {
            // The word came first; its connection's end comes after.
            self.monitor.worker_left(id);
            self.monitor.messages_out_gone += w.tx.sent();
            w.tx.close();
        }
        let name = self
            .monitor
            .worker_names
            .get(&id)
            .cloned()
            .unwrap_or_default();
        match running.as_slice() {
            [] => tracing::warn!("worker {name} (pid {pid}) died between tasks"),
            ran => tracing::warn!("worker {name} (pid {pid}) died running tasks {ran:?}"),
        }
        self.worker_gone(id, Some(&running));
    }

    /// Workers whose supervisors said nothing in time (gone with them, or
    /// cut off): judged by what they reported started.
    pub(crate) fn obituaries_overdue(&mut self, now: tokio::time::Instant) {
        let late: Vec<u32> = self
            .dying
            .iter()
            .filter(|(_, d)| now >= d.until)
            .map(|(&id, _)| id)
            .collect();
        for id in late {
            tracing::warn!("worker {id} left and its supervisor said nothing of it");
            self.worker_gone(id, None);
        }
    }
}
