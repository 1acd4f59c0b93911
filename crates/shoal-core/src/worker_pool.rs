//! Events of the worker pool: workers joining, leaving, pausing, retiring
//! (their data handed over), expiring, and what they offer.

use super::*;

impl<S> Core<S> {
    /// A worker joined with `nthreads` execution slots.
    pub fn handle_worker_added(&mut self, worker: WorkerId, nthreads: u32) {
        self.handle_worker_added_with(worker, nthreads, Vec::new());
    }

    /// A worker joined with these resources (`(resource id, amount)`).
    pub fn handle_worker_added_with(
        &mut self,
        worker: WorkerId,
        nthreads: u32,
        resources: Vec<(u32, f64)>,
    ) {
        self.stimulus = "worker-added";
        self.next_worker_seq += 1;
        let w = Worker {
            seq: self.next_worker_seq,
            load_key: None,
            nthreads: nthreads.max(1),
            assigned: FxHashSet::default(),
            has: FxHashSet::default(),
            queued_est_us: 0,
            progress_us: self.now_us,
            stalled: false,
            paused: false,
            retiring: None,
            move_failures: FxHashMap::default(),
            retired: false,
            stealing: FxHashSet::default(),
            resources_used: resources.iter().map(|&(r, _)| (r, 0.0)).collect(),
            resources,
            threads_used: 0,
            running: FxHashSet::default(),
            zombies: FxHashMap::default(),
            zombie_threads: 0,
            expires_us: None,
        };
        self.max_threads_seen = self.max_threads_seen.max(w.nthreads);
        if !w.resources.is_empty() && !self.offers_seen.contains(&w.resources) {
            self.offers_seen.push(w.resources.clone());
        }
        if let Some(old) = self.workers.insert(worker, w) {
            if let Some(k) = old.load_key {
                self.by_load.remove(&(k, old.seq, worker));
            }
        } else {
            self.worker_order.push(worker);
        }
        self.reindex(worker);
        self.schedule();
    }

    /// A worker offering one unit of this resource is on its way (an actor's
    /// process is starting): tasks that need it wait instead of failing.
    pub fn handle_resource_expected(&mut self, resource: u32) {
        self.stimulus = "resource-expected";
        let offer = vec![(resource, 1.0)];
        if !self.offers_seen.contains(&offer) {
            self.offers_seen.push(offer);
        }
    }

    /// The worker will leave at `at_us` (the core's clock: see
    /// [`Core::handle_tick`]), e.g. at its batch job's end: a task whose
    /// time request reaches past that is not placed there.
    pub fn handle_worker_expires(&mut self, worker: WorkerId, at_us: u64) {
        if let Some(w) = self.workers.get_mut(&worker) {
            w.expires_us = Some(at_us);
        }
    }

    /// No worker will offer this resource again (an actor is gone for good):
    /// tasks that need it, now or later, fail as unsatisfiable instead of
    /// waiting for a replacement.
    pub fn handle_resource_withdrawn(&mut self, resource: u32) {
        self.stimulus = "resource-withdrawn";
        self.offers_seen
            .retain(|o| !o.iter().any(|&(r, a)| r == resource && a > 0.0));
        let stuck: Vec<TaskId> = self
            .ready_constrained
            .iter()
            .map(|e| e.id)
            // The heap keeps stale entries (tasks forgotten or no longer
            // Ready since they were pushed): look them up, never index.
            .filter(|id| {
                self.tasks.get(id).is_some_and(|t| {
                    t.state == TaskState::Ready && t.resources().iter().any(|&(r, _)| r == resource)
                })
            })
            .collect();
        if !self
            .workers
            .values()
            .any(|w| w.resources.iter().any(|&(r, a)| r == resource && a > 0.0))
        {
            for id in stuck {
                self.set_erred(id, id, ErrorKind::Unsatisfiable);
            }
        }
        self.schedule();
    }

    /// `worker` could not fetch `deps` (inputs of `task`) from the worker
    /// the core thinks holds them: that worker does not have them. They are
    /// recomputed (scattered data is lost), and `task` waits for them again.
    pub fn handle_missing_data(&mut self, worker: WorkerId, task: TaskId, deps: &[TaskId]) {
        self.stimulus = "missing-data";
        for &d in deps {
            let Some(t) = self.tasks.get(&d) else {
                continue;
            };
            let TaskState::Memory {
                location: Location::Worker(h),
                ..
            } = t.state
            else {
                continue;
            };
            if h == worker || !t.dependents.contains(&task) {
                continue;
            }
            let needed = !t.wanted_by.is_empty() || t.pending_dependents > 0;
            let lost = t.once && needed;
            // Leaving memory sends `task` (and any other dependent being
            // fetched) back to Waiting.
            self.set_state(d, TaskState::Released);
            self.actions.push(Action::ReleaseData {
                worker: Some(h),
                task: d,
            });
            if lost {
                self.set_erred(d, d, ErrorKind::DataLost);
            } else if needed {
                self.recompute(d);
            } else {
                self.maybe_forget(d);
            }
        }
        // The worker dropped the task: if no input left memory above (a
        // stale report), it is placed again.
        if self.is_processing_on(task, worker) {
            self.set_state(task, TaskState::Ready);
        }
        self.schedule();
    }

    /// A client asks again about tasks it holds (its fetch of a result
    /// failed): those in memory or erred are reported again, the others
    /// will be when they get there.
    pub fn handle_where(&mut self, client: ClientId, tasks: &[TaskId]) {
        self.stimulus = "where";
        for &id in tasks {
            if self
                .tasks
                .get(&id)
                .is_some_and(|t| t.wanted_by.contains(&client))
            {
                self.notify_one(client, id);
            }
        }
    }

    /// Retires a worker gracefully: it gets no more work, its queued tasks
    /// go elsewhere, the results it holds that are still needed are copied
    /// to other workers ([`Action::Replicate`]); then [`Action::Retired`].
    /// With no other worker to take them, the results are left to be
    /// recomputed when it goes.
    pub fn handle_retire(&mut self, worker: WorkerId) {
        self.stimulus = "retire";
        if let Some(w) = self.workers.get_mut(&worker) {
            if w.retiring.is_none() && !w.retired {
                w.retiring = Some(FxHashMap::default());
                w.paused = true;
                self.retiring += 1;
                self.reindex(worker);
                self.steal();
                self.schedule();
            }
        }
    }

    /// Worker `to` copied `task`'s result (`ok`) or could not (then another
    /// copy is tried).
    pub fn handle_replicated(&mut self, to: WorkerId, task: TaskId, ok: bool) {
        self.stimulus = "replicated";
        let Some(t) = self.tasks.get(&task) else {
            return;
        };
        let TaskState::Memory {
            location: Location::Worker(from),
            size,
        } = t.state
        else {
            return;
        };
        let Some(moving) = self
            .workers
            .get_mut(&from)
            .and_then(|w| w.retiring.as_mut())
        else {
            return;
        };
        if moving.get(&task) != Some(&to) {
            return;
        }
        moving.remove(&task);
        if ok && self.workers.contains_key(&to) {
            // Same data, new holder: no dependent changes state.
            self.workers
                .get_mut(&from)
                .expect("retiring")
                .move_failures
                .remove(&task);
            self.tasks.get_mut(&task).expect("known").state = TaskState::Memory {
                location: Location::Worker(to),
                size,
            };
            self.workers
                .get_mut(&from)
                .expect("retiring")
                .has
                .remove(&task);
            self.workers.get_mut(&to).expect("checked").has.insert(task);
            self.actions.push(Action::ReleaseData {
                worker: Some(from),
                task,
            });
            // Clients holding it learn where it is now.
            for i in 0..self.tasks[&task].wanted_by.len() {
                let client = self.tasks[&task].wanted_by[i];
                self.notify_one(client, task);
            }
        } else if let Some(w) = self.workers.get_mut(&from) {
            *w.move_failures.entry(task).or_default() += 1;
        }
        self.schedule();
    }

    /// Moves needed results off retiring workers and lets go of those that
    /// are done (part of every `schedule`).
    pub(crate) fn retire_step(&mut self) {
        let retiring: Vec<WorkerId> = self
            .worker_order
            .iter()
            .copied()
            .filter(|w| self.workers[w].retiring.is_some())
            .collect();
        for wid in retiring {
            // Moves of results released meanwhile, or to workers gone, are off.
            let w = self.workers.get_mut(&wid).expect("listed");
            let has = &w.has;
            let alive: FxHashSet<WorkerId> = self.worker_order.iter().copied().collect();
            w.retiring
                .as_mut()
                .expect("retiring")
                .retain(|t, to| has.contains(t) && alive.contains(to));
            let w = &self.workers[&wid];
            let mut needed: Vec<TaskId> = w
                .has
                .iter()
                .copied()
                .filter(|id| {
                    let t = &self.tasks[id];
                    !t.wanted_by.is_empty() || t.pending_dependents > 0
                })
                .collect();
            needed.sort();
            let moving = w.retiring.as_ref().expect("retiring");
            let idle = w.assigned.is_empty();
            let max_tries = self.config.max_kills;
            let pending: Vec<TaskId> = needed
                .into_iter()
                .filter(|id| !moving.contains_key(id))
                .filter(|id| w.move_failures.get(id).copied().unwrap_or(0) < max_tries)
                .collect();
            // Targets: workers staying, fewest results held first.
            let mut targets: Vec<(usize, WorkerId)> = self
                .workers
                .iter()
                .filter(|(id, o)| **id != wid && o.retiring.is_none() && !o.retired)
                .map(|(id, o)| (o.has.len(), *id))
                .collect();
            targets.sort();
            if targets.is_empty() {
                // Nowhere to go: the results are recomputed after it leaves.
                if idle {
                    self.finish_retire(wid);
                }
                continue;
            }
            for (i, task) in pending.into_iter().enumerate() {
                let to = targets[i % targets.len()].1;
                let w = self.workers.get_mut(&wid).expect("retiring");
                w.retiring.as_mut().expect("retiring").insert(task, to);
                self.actions.push(Action::Replicate {
                    task,
                    from: wid,
                    to,
                });
            }
            let w = &self.workers[&wid];
            if idle && w.retiring.as_ref().is_some_and(|m| m.is_empty()) {
                self.finish_retire(wid);
            }
        }
    }

    pub(crate) fn finish_retire(&mut self, wid: WorkerId) {
        if let Some(w) = self.workers.get_mut(&wid) {
            if w.retiring.take().is_some() {
                self.retiring -= 1;
                w.retired = true;
                self.actions.push(Action::Retired { worker: wid });
            }
        }
    }

    /// A worker's memory crossed its pause fraction: while paused it gets no
    /// work, and its queued tasks are asked back (as from a stalled worker).
    pub fn handle_worker_paused(&mut self, worker: WorkerId, paused: bool) {
        self.stimulus = "worker-paused";
        if let Some(w) = self.workers.get_mut(&worker) {
            w.paused = paused || w.retiring.is_some() || w.retired;
            self.reindex(worker);
            if paused {
                self.steal();
            }
            self.schedule();
        }
    }

    /// A worker's number of execution threads changed: a task waiting on
    /// other tasks (`secede`) lends its thread, and takes it back after.
    pub fn handle_worker_threads(&mut self, worker: WorkerId, nthreads: u32) {
        self.stimulus = "worker-threads";
        if let Some(w) = self.workers.get_mut(&worker) {
            w.nthreads = nthreads.max(1);
            self.reindex(worker);
            self.schedule();
        }
    }

    /// A worker is gone (connection lost, process died). Its running tasks run
    /// again elsewhere; results only it held and still needed are recomputed.
    pub fn handle_worker_lost(&mut self, worker: WorkerId) {
        self.stimulus = "worker-lost";
        self.remove_worker(worker, Blame::Unknown);
    }

    /// A worker process died and its supervisor says which tasks its
    /// threads were running (from a slot the worker writes before each task
    /// and clears after): only those are suspects. Empty: it died between
    /// tasks (or still starting up) and no task is to blame. With a task,
    /// the element of a batch (`map`) that was running, when known: a batch
    /// fails only when its worker died at the same element each time, so
    /// a batch that merely ran long while workers were killed is not blamed.
    pub fn handle_worker_died(&mut self, worker: WorkerId, running: &[(TaskId, Option<u32>)]) {
        self.stimulus = "worker-died";
        self.remove_worker(worker, Blame::Exactly(running));
    }

    /// A worker's connection closed and its supervisor will say what it was
    /// running ([`Core::handle_worker_died`]), or the caller gives up
    /// waiting ([`Core::handle_worker_lost`]). Only the blame waits: it
    /// gets no work, and its results are gone now (no task is sent to
    /// fetch from it; those still needed are computed again at once).
    pub fn handle_worker_dying(&mut self, worker: WorkerId) {
        self.stimulus = "worker-dying";
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        w.paused = true;
        let held = std::mem::take(&mut w.has);
        self.reindex(worker);
        self.drop_held(worker, held);
        self.schedule();
    }

    /// A worker restarts on purpose (a task it was told to stop did not
    /// stop): as [`Core::handle_worker_lost`], but its other running tasks
    /// are not suspects (no kill is counted against them).
    pub fn handle_worker_restarting(&mut self, worker: WorkerId) {
        self.stimulus = "worker-restarting";
        self.remove_worker(worker, Blame::None);
    }

    pub(crate) fn remove_worker(&mut self, worker: WorkerId, blame: Blame<'_>) {
        let Some(w) = self.workers.remove(&worker) else {
            return;
        };
        self.worker_order.retain(|&x| x != worker);
        if let Some(k) = w.load_key {
            self.by_load.remove(&(k, w.seq, worker));
        }
        if w.retiring.is_some() {
            self.retiring -= 1;
        }
        let mut assigned: Vec<TaskId> = w.assigned.into_iter().collect();
        assigned.sort();
        // Only what ran there may have killed it. Unless its supervisor
        // said exactly what ran, that is what it reported started; with no
        // start report (it died at once, before the report left), every
        // assigned task is a suspect: a task that kills its worker
        // instantly still ends as KilledWorker.
        let unknown = w.running.is_empty();
        for id in assigned {
            let Some(t) = self.tasks.get_mut(&id) else {
                continue;
            };
            let suspect = match blame {
                Blame::None => None,
                Blame::Exactly(ran) => ran.iter().find(|r| r.0 == id).map(|r| r.1),
                Blame::Unknown => (unknown || w.running.contains(&id)).then_some(None),
            };
            match suspect {
                None => {}
                Some(None) => t.kills = t.kills.saturating_add(1),
                Some(Some(item)) => {
                    let rare = t.rare.get_or_insert_with(Default::default);
                    if rare.kill_item == Some(item) {
                        t.kills = t.kills.saturating_add(1);
                    } else {
                        // Another element than last time: progress, not
                        // the same crash again.
                        rare.kill_item = Some(item);
                        t.kills = 1;
                    }
                }
            }
            if t.once {
                self.set_erred(id, id, ErrorKind::DataLost);
            } else if t.kills
                >= match t.max_kills() {
                    0 => self.config.max_kills,
                    own => own,
                }
            {
                let kills = t.kills;
                self.set_erred(id, id, ErrorKind::KilledWorker(kills));
            } else {
                self.set_state(id, TaskState::Ready);
            }
        }
        self.drop_held(worker, w.has);
        self.schedule();
    }

    /// Results `worker` held are gone with it: those still needed are
    /// computed again (or fail, if they cannot be), the rest forgotten.
    fn drop_held(&mut self, worker: WorkerId, held: impl IntoIterator<Item = TaskId>) {
        let mut held: Vec<TaskId> = held.into_iter().collect();
        held.sort();
        for id in held {
            let Some(t) = self.tasks.get(&id) else {
                continue;
            };
            if !matches!(t.state, TaskState::Memory { location: Location::Worker(h), .. } if h == worker)
            {
                continue;
            }
            let needed = !t.wanted_by.is_empty() || t.pending_dependents > 0;
            let lost = t.once && needed;
            self.set_state(id, TaskState::Released);
            if lost {
                self.set_erred(id, id, ErrorKind::DataLost);
            } else if needed {
                self.recompute(id);
            } else {
                self.maybe_forget(id);
            }
        }
    }
}

/// Which of a leaving worker's tasks may have killed it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Blame<'a> {
    /// None: it left on purpose.
    None,
    /// Not known: those it reported started (all, if none was reported).
    Unknown,
    /// These, and only these, were running when it died (with the
    /// element of a batch, when known).
    Exactly(&'a [(TaskId, Option<u32>)]),
}
