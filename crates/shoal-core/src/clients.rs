//! Events from clients: submissions (cycles refused), releases, cancels,
//! detached and held tasks, adoption, a client gone.

use super::*;

impl<S> Core<S> {
    /// A client submitted tasks (in dependency order or not: a batch is taken
    /// whole). Every task of the batch is wanted by the client. A task whose id
    /// is already known just gains the client's interest.
    pub fn handle_submit(&mut self, client: ClientId, tasks: Vec<NewTask>)
    where
        S: Default,
    {
        let tasks = tasks.into_iter().map(|t| (t, S::default())).collect();
        self.handle_resubmit(client, tasks, &FxHashMap::default());
    }

    /// [`Core::handle_submit`] with each task's spec (dropped if the task
    /// is known already).
    pub fn handle_submit_specs(&mut self, client: ClientId, tasks: Vec<(NewTask, S)>) {
        self.handle_resubmit(client, tasks, &FxHashMap::default());
    }

    /// A client's tasks submitted again after the scheduler restarted under
    /// it. Those in `held` had finished before: their results are at the
    /// given place (a worker that rejoined, or inline) with the given size,
    /// and they start in memory instead of running again. A held place on
    /// a worker the core does not know is ignored (the task runs again).
    pub fn handle_resubmit(
        &mut self,
        client: ClientId,
        tasks: Vec<(NewTask, S)>,
        held: &FxHashMap<TaskId, (Location, u64)>,
    ) {
        self.stimulus = "submit";
        let mut fresh = Vec::with_capacity(tasks.len());
        // First pass: records, so deps inside the batch resolve in any order.
        for (nt, spec) in tasks {
            if let Some(t) = self.tasks.get_mut(&nt.id) {
                if !t.wanted_by.contains(&client) {
                    t.wanted_by.push(client);
                }
                // Kept only as an input's record (its result let go): wanted
                // again, it runs again.
                if t.state == TaskState::Released {
                    self.recompute(nt.id);
                }
                self.notify_one(client, nt.id);
                continue;
            }
            let g = nt.group as usize;
            if self.groups.len() <= g {
                self.groups.resize(g + 1, GroupStats::default());
            }
            self.groups[g].counts.released += 1;
            self.groups[g].counts.submitted += 1;
            self.tasks.insert(
                nt.id,
                Box::new(Task {
                    state: TaskState::Released,
                    deps: SmallVec::from_vec(nt.deps),
                    dependents: SmallVec::new(),
                    wanted_by: smallvec::smallvec![client],
                    waiting_on: 0,
                    pending_dependents: 0,
                    priority: nt.priority,
                    depth: 0,
                    group: nt.group,
                    est_us: 0,
                    kills: 0,
                    fetch_fails: 0,
                    once: !nt.recompute,
                    ran: false,
                    rare: {
                        let rare = TaskRare {
                            retries_left: nt.retries,
                            max_kills: nt.max_kills,
                            time_request_us: nt.time_request_us,
                            threads: if nt.threads > 1 { nt.threads } else { 0 },
                            resources: nt.resources.into_boxed_slice(),
                            kill_item: None,
                        };
                        (rare != TaskRare::default()).then(|| Box::new(rare))
                    },
                    spec,
                }),
            );
            fresh.push(nt.id);
        }
        // Second pass: link to dependencies, then start. Fresh records not
        // linked yet have depth UNLINKED: a dependency on one (a later task of
        // the batch, or itself) is the only way a cycle can form, since
        // known tasks never depend on fresh ones.
        const UNLINKED: u32 = u32::MAX;
        for &id in &fresh {
            self.tasks.get_mut(&id).expect("just inserted").depth = UNLINKED;
        }
        let mut out_of_order = false;
        for &id in &fresh {
            let deps = self.tasks[&id].deps.clone();
            let mut depth = 0;
            let mut missing = None;
            for &d in deps.iter() {
                match self.tasks.get_mut(&d) {
                    Some(dt) => {
                        dt.dependents.push(id);
                        if dt.depth == UNLINKED {
                            out_of_order = true;
                        } else {
                            depth = depth.max(dt.depth + 1);
                        }
                    }
                    None => missing = Some(d),
                }
            }
            self.tasks.get_mut(&id).expect("just inserted").depth = depth;
            if let Some(d) = missing {
                // Erred for good: it keeps only the links that exist.
                let linked = deps.iter().copied().filter(|x| self.tasks.contains_key(x));
                self.tasks.get_mut(&id).expect("just inserted").deps = linked.collect();
                self.set_erred(id, id, ErrorKind::MissingDependency(d));
            }
        }
        if out_of_order {
            for id in self.cyclic(&fresh) {
                if self.tasks[&id].state == TaskState::Released {
                    self.set_erred(id, id, ErrorKind::Cycle);
                }
            }
        }
        for &id in &fresh {
            let Some(&(location, size)) = held.get(&id) else {
                continue;
            };
            let usable = match location {
                Location::Inline => true,
                Location::Worker(w) => self.workers.get(&w).is_some_and(|w| !w.retired),
            };
            if usable && self.tasks[&id].state == TaskState::Released {
                self.tasks.get_mut(&id).expect("just inserted").ran = true;
                self.set_state(id, TaskState::Memory { location, size });
            }
        }
        for id in fresh {
            if self.tasks[&id].state == TaskState::Released {
                self.recompute(id);
            }
        }
        self.schedule();
    }

    /// The tasks of `fresh` on a cycle of dependencies among them, or
    /// downstream of one (Kahn's algorithm: what never becomes free).
    pub(crate) fn cyclic(&self, fresh: &[TaskId]) -> Vec<TaskId> {
        let mut indeg: FxHashMap<TaskId, usize> = fresh.iter().map(|&id| (id, 0)).collect();
        for &id in fresh {
            let n = self.tasks[&id]
                .deps
                .iter()
                .filter(|d| indeg.contains_key(d))
                .count();
            indeg.insert(id, n);
        }
        let mut free: Vec<TaskId> = fresh.iter().copied().filter(|id| indeg[id] == 0).collect();
        while let Some(id) = free.pop() {
            for dep in self.tasks[&id].dependents.iter() {
                if let Some(n) = indeg.get_mut(dep) {
                    if *n > 0 {
                        *n -= 1;
                        if *n == 0 {
                            free.push(*dep);
                        }
                    }
                }
            }
        }
        fresh.iter().copied().filter(|id| indeg[id] > 0).collect()
    }

    /// The client no longer holds these tasks' futures.
    pub fn handle_release(&mut self, client: ClientId, tasks: &[TaskId]) {
        self.stimulus = "release";
        for &id in tasks {
            let Some(t) = self.tasks.get_mut(&id) else {
                continue;
            };
            t.wanted_by.retain(|c| *c != client);
            if t.wanted_by.is_empty() {
                self.maybe_release(id);
                self.maybe_forget(id);
            }
        }
        self.schedule();
    }

    /// The client cancels these tasks: unfinished ones (and their unfinished
    /// dependents) end as cancelled. Finished ones are unaffected.
    pub fn handle_cancel(&mut self, client: ClientId, tasks: &[TaskId]) {
        self.stimulus = "cancel";
        let _ = client;
        self.cancel(tasks);
    }

    pub(crate) fn cancel(&mut self, tasks: &[TaskId]) {
        for &id in tasks {
            match self.tasks.get(&id).map(|t| t.state) {
                Some(s) if s.is_pending() || s == TaskState::Released => {
                    self.set_erred(id, id, ErrorKind::Cancelled)
                }
                _ => {}
            }
        }
        self.schedule();
    }

    /// Cancels these tasks, as [`Core::handle_cancel`], except those a
    /// worker has started, which run to their end (`concurrent.futures`'
    /// `shutdown(cancel_futures=True)`). Only the worker knows whether a
    /// task sent to it has started: it is asked for those back (a steal),
    /// and each it gives back is cancelled.
    pub fn handle_cancel_queued(&mut self, _client: ClientId, tasks: &[TaskId]) {
        self.stimulus = "cancel-queued";
        let mut now = Vec::new();
        let mut ask: FxHashMap<WorkerId, Vec<TaskId>> = FxHashMap::default();
        for &id in tasks {
            match self.tasks.get(&id).map(|t| t.state) {
                Some(TaskState::Processing(w)) => {
                    // A client's message leads here: no panic, even if the
                    // invariant (its worker is known) were broken.
                    let Some(wk) = self.workers.get_mut(&w) else {
                        now.push(id);
                        continue;
                    };
                    if wk.running.contains(&id) {
                        continue; // reported started: runs on
                    }
                    self.cancel_when_given.insert(id);
                    if wk.stealing.insert(id) {
                        ask.entry(w).or_default().push(id);
                    }
                }
                Some(_) => now.push(id),
                None => {}
            }
        }
        self.cancel(&now);
        let mut ask: Vec<(WorkerId, Vec<TaskId>)> = ask.into_iter().collect();
        ask.sort();
        for (worker, tasks) in ask {
            self.actions.push(Action::Steal { worker, tasks });
        }
        self.schedule();
    }

    /// The client wants these tasks run whether or not it keeps them (Ray's
    /// semantics for every call, Dask's `fire_and_forget`): they stay
    /// wanted until they finish or fail, then only the client's own
    /// interest keeps their results. Tasks that already ended are unaffected.
    pub fn handle_detach(&mut self, client: ClientId, tasks: &[TaskId]) {
        for &id in tasks {
            let Some(t) = self.tasks.get_mut(&id) else {
                continue;
            };
            if t.state.is_pending()
                && t.wanted_by.contains(&client)
                && !t.wanted_by.contains(&DETACHED)
            {
                t.wanted_by.push(DETACHED);
            }
        }
    }

    /// The result of `by` holds references to `tasks` (the task returned
    /// futures it made, and its worker's client pickled them): they stay
    /// wanted as long as that result lives, so that whoever gets the
    /// result can claim them ([`Core::handle_adopt`]) even after the
    /// client that made them let them go. Sent by that client before it
    /// can release them, so it arrives first. Ignored for a result that is
    /// gone or will not come.
    pub fn handle_hold(&mut self, by: TaskId, tasks: &[TaskId]) {
        self.stimulus = "hold";
        match self.tasks.get(&by).map(|t| t.state) {
            None | Some(TaskState::Released | TaskState::Erred { .. }) => return,
            Some(_) => {}
        }
        for &id in tasks {
            let Some(t) = self.tasks.get_mut(&id) else {
                continue;
            };
            let list = self.holds.entry(by).or_default();
            if id == by || list.contains(&id) {
                continue;
            }
            list.push(id);
            let n = self.held.entry(id).or_insert(0);
            *n += 1;
            if *n == 1 {
                t.wanted_by.push(HELD);
                if t.state == TaskState::Released {
                    self.recompute(id);
                }
            }
        }
        self.schedule();
    }

    /// The worker running `task` cannot hand its result to anyone (it
    /// cannot be pickled): tasks that take it are placed on that worker,
    /// and not stolen from it (distributed keeps such results in worker
    /// memory the same way). Sent before the task's report.
    pub fn handle_pinned(&mut self, worker: WorkerId, task: TaskId) {
        if self.tasks.contains_key(&task) {
            self.pinned.insert(task, worker);
        }
    }

    /// The worker holding a pinned input of `t`, if any.
    pub(crate) fn pinned_holder(&self, t: &Task<S>) -> Option<WorkerId> {
        if self.pinned.is_empty() {
            return None;
        }
        t.deps.iter().find_map(|d| match self.tasks[d].state {
            TaskState::Memory {
                location: Location::Worker(h),
                ..
            } if self.pinned.get(d) == Some(&h) => Some(h),
            _ => None,
        })
    }

    /// The client claims tasks it did not submit, whose futures it found
    /// in a result ([`Core::handle_hold`]): it is told their state as if
    /// it had submitted them. Returns those the core does not know (let
    /// go before the claim); the caller tells the client.
    pub fn handle_adopt(&mut self, client: ClientId, tasks: &[TaskId]) -> Vec<TaskId> {
        self.stimulus = "adopt";
        let mut unknown = Vec::new();
        for &id in tasks {
            let Some(t) = self.tasks.get_mut(&id) else {
                unknown.push(id);
                continue;
            };
            if !t.wanted_by.contains(&client) {
                t.wanted_by.push(client);
            }
            if t.state == TaskState::Released {
                self.recompute(id);
            }
            self.notify_one(client, id);
        }
        self.schedule();
        unknown
    }

    /// The result of `by` is gone or will not come (it is released or
    /// erred): what it held is held by one fewer.
    pub(crate) fn drop_holds(&mut self, by: TaskId) {
        let Some(list) = self.holds.remove(&by) else {
            return;
        };
        for id in list {
            if let Some(n) = self.held.get_mut(&id) {
                *n -= 1;
                if *n == 0 {
                    self.held.remove(&id);
                    self.unheld.push(id);
                }
            }
        }
    }

    /// Held tasks no result holds any more are no longer wanted for that.
    pub(crate) fn settle_unheld(&mut self) {
        while let Some(id) = self.unheld.pop() {
            if self.held.contains_key(&id) {
                continue; // held again meanwhile
            }
            let Some(t) = self.tasks.get_mut(&id) else {
                continue;
            };
            t.wanted_by.retain(|c| *c != HELD);
            if t.wanted_by.is_empty() {
                self.maybe_release(id);
                self.maybe_forget(id);
            }
        }
    }

    /// A client disconnected: everything it wanted is released.
    pub fn handle_client_gone(&mut self, client: ClientId) {
        self.stimulus = "client-gone";
        let mut ids: Vec<TaskId> = self
            .tasks
            .iter()
            .filter(|(_, t)| t.wanted_by.contains(&client))
            .map(|(&id, _)| id)
            .collect();
        ids.sort();
        self.handle_release(client, &ids);
    }
}
