//! A task's state machine: every transition goes through `set_state`, which
//! keeps the indexes, counts and the story; release, forgetting and
//! recomputation of lost results.

use super::*;

impl<S> Core<S> {
    /// Detached tasks that ended are no longer wanted for their own sake.
    pub(crate) fn settle_detached(&mut self) {
        while let Some(id) = self.detached_done.pop() {
            let Some(t) = self.tasks.get_mut(&id) else {
                continue;
            };
            if t.state.is_pending() {
                continue; // running again (its result was lost)
            }
            t.wanted_by.retain(|c| *c != DETACHED);
            if t.wanted_by.is_empty() {
                self.maybe_release(id);
                self.maybe_forget(id);
            }
        }
    }

    pub(crate) fn is_processing_on(&self, task: TaskId, worker: WorkerId) -> bool {
        matches!(self.tasks.get(&task), Some(t) if t.state == TaskState::Processing(worker))
    }

    pub(crate) fn notify_one(&mut self, client: ClientId, id: TaskId) {
        if client == HELD {
            return;
        }
        if client == DETACHED {
            if matches!(
                self.tasks[&id].state,
                TaskState::Memory { .. } | TaskState::Erred { .. }
            ) {
                self.detached_done.push(id);
            }
            return;
        }
        match self.tasks[&id].state {
            TaskState::Memory { .. } => self.actions.push(Action::TaskMemory { client, task: id }),
            TaskState::Erred { cause, kind } => self.actions.push(Action::TaskErred {
                client,
                task: id,
                cause,
                kind,
            }),
            _ => {}
        }
    }

    /// Bring a Released task (and any Released inputs) back to Waiting/Ready.
    /// Iterative: lineage chains can be arbitrarily long.
    pub(crate) fn recompute(&mut self, root: TaskId) {
        let mut stack = vec![root];
        while let Some(id) = stack.pop() {
            let t = &self.tasks[&id];
            if t.state != TaskState::Released {
                continue;
            }
            if t.once && t.ran {
                self.set_erred(id, id, ErrorKind::DataLost);
                continue;
            }
            let mut erred = None;
            let mut waiting = 0;
            for d in t.deps.iter() {
                match self.tasks[d].state {
                    TaskState::Memory { .. } => {}
                    TaskState::Erred { cause, kind } => erred = Some((cause, kind)),
                    TaskState::Released => {
                        waiting += 1;
                        stack.push(*d);
                    }
                    _ => waiting += 1,
                }
            }
            if let Some((cause, kind)) = erred {
                self.set_erred(id, cause, kind);
                continue;
            }
            self.tasks.get_mut(&id).expect("known").waiting_on = waiting;
            let to = if waiting == 0 {
                TaskState::Ready
            } else {
                TaskState::Waiting
            };
            self.set_state(id, to);
        }
    }

    pub(crate) fn log_transition(
        &mut self,
        task: TaskId,
        from: Option<TaskState>,
        to: Option<TaskState>,
    ) {
        self.transitions += 1;
        if self.config.log_capacity == 0 {
            return;
        }
        if self.log.len() == self.config.log_capacity {
            self.log.pop_front();
        } else if self.log.len() == self.log.capacity() {
            // Doubling, but never past the bound (a deque would round
            // 100,000 up to 131,072 slots: 2.5 MB for nothing).
            let want = (2 * self.log.len()).clamp(64, self.config.log_capacity);
            self.log.reserve_exact(want - self.log.len());
        }
        self.log.push_back(Transition {
            task,
            from,
            to,
            stimulus: self.stimulus,
            at_us: self.now_us,
        });
    }

    /// The single place where a task changes state: keeps worker bookkeeping,
    /// dependency counters, the ready queue and client notifications in step.
    pub(crate) fn set_state(&mut self, id: TaskId, to: TaskState) {
        let from = self.tasks.get(&id).expect("known task").state;
        if from == to {
            return;
        }
        self.log_transition(id, Some(from), Some(to));
        if matches!(from, TaskState::Processing(_)) {
            self.cancel_when_given.remove(&id); // it ran or moved meanwhile
        }
        if matches!(to, TaskState::Released | TaskState::Erred { .. }) {
            // Its result is gone (or will not come): it holds nothing.
            self.drop_holds(id);
        }
        if matches!(from, TaskState::Memory { .. })
            || matches!(to, TaskState::Released | TaskState::Erred { .. })
        {
            self.pinned.remove(&id);
        }
        let t = self.tasks.get_mut(&id).expect("known task");
        t.state = to;
        let counts = &mut self.groups[t.group as usize].counts;
        *counts.slot(from) -= 1;
        *counts.slot(to) += 1;
        // Leave `from`.
        match from {
            TaskState::Processing(wid) => {
                let est = t.est_us as u64;
                if let Some(w) = self.workers.get_mut(&wid) {
                    w.assigned.remove(&id);
                    w.threads_used -= t.threads();
                    // Still started there (no report came first): it runs
                    // on, holding its threads, though no longer wanted.
                    if w.running.remove(&id) && w.zombies.insert(id, t.threads()).is_none() {
                        w.zombie_threads += t.threads();
                    }
                    w.stealing.remove(&id);
                    w.queued_est_us = w.queued_est_us.saturating_sub(est);
                    for &(r, amount) in t.resources().iter() {
                        if let Some(u) = w.resources_used.iter_mut().find(|u| u.0 == r) {
                            u.1 -= amount;
                        }
                    }
                    reindex(&mut self.by_load, wid, w);
                }
            }
            TaskState::Memory {
                location: Location::Worker(w),
                ..
            } => {
                if let Some(w) = self.workers.get_mut(&w) {
                    w.has.remove(&id);
                }
            }
            _ => {}
        }
        // Enter `to`.
        match to {
            TaskState::Ready => {
                let entry = ReadyEntry {
                    priority: t.priority,
                    depth: t.depth,
                    id,
                };
                if t.resources().is_empty() && t.threads() == 1 && t.time_request_us() == 0 {
                    self.ready.push(entry)
                } else {
                    self.ready_constrained.push(entry)
                }
            }
            TaskState::Memory {
                location: Location::Worker(w),
                ..
            } => {
                if let Some(w) = self.workers.get_mut(&w) {
                    w.has.insert(id);
                }
            }
            _ => {}
        }
        let t = &self.tasks[&id];
        let deps_changed = from.is_pending() != to.is_pending();
        let in_memory = matches!(to, TaskState::Memory { .. });
        let left_memory = matches!(from, TaskState::Memory { .. });
        if in_memory || matches!(to, TaskState::Erred { .. }) {
            for i in 0..t.wanted_by.len() {
                let client = self.tasks[&id].wanted_by[i];
                self.notify_one(client, id);
            }
        }
        if deps_changed {
            let deps = self.tasks[&id].deps.clone();
            for d in deps.iter() {
                let dt = self.tasks.get_mut(d).expect("deps outlive dependents");
                if to.is_pending() {
                    dt.pending_dependents += 1;
                } else {
                    dt.pending_dependents -= 1;
                    self.maybe_release(*d);
                }
            }
        }
        if in_memory || left_memory {
            let dependents = self.tasks[&id].dependents.clone();
            for dep in dependents {
                let dt = self.tasks.get_mut(&dep).expect("linked");
                match dt.state {
                    TaskState::Waiting if in_memory => {
                        dt.waiting_on -= 1;
                        if dt.waiting_on == 0 {
                            self.set_state(dep, TaskState::Ready);
                        }
                    }
                    TaskState::Waiting => dt.waiting_on += 1,
                    TaskState::Ready if left_memory => {
                        dt.waiting_on = 1;
                        self.set_state(dep, TaskState::Waiting);
                    }
                    TaskState::Processing(w) if left_memory => {
                        // Its input vanished before or while it was fetched.
                        self.actions.push(Action::CancelCompute {
                            worker: w,
                            task: dep,
                            stop: false,
                        });
                        dt.waiting_on = 1;
                        self.set_state(dep, TaskState::Waiting);
                    }
                    _ => {}
                }
            }
        }
    }

    /// Fail `id` and every unfinished task downstream of it.
    pub(crate) fn set_erred(&mut self, id: TaskId, cause: TaskId, kind: ErrorKind) {
        let mut stack = vec![id];
        while let Some(x) = stack.pop() {
            let t = &self.tasks[&x];
            match t.state {
                TaskState::Memory { .. } | TaskState::Erred { .. } => continue,
                TaskState::Processing(w) if x != id || kind == ErrorKind::Cancelled => {
                    self.actions.push(Action::CancelCompute {
                        worker: w,
                        task: x,
                        stop: kind == ErrorKind::Cancelled,
                    })
                }
                _ => {}
            }
            stack.extend(self.tasks[&x].dependents.iter().copied());
            self.set_state(x, TaskState::Erred { cause, kind });
        }
    }

    pub(crate) fn maybe_release(&mut self, id: TaskId) {
        let t = &self.tasks[&id];
        if let TaskState::Memory { location, .. } = t.state {
            if t.wanted_by.is_empty() && t.pending_dependents == 0 {
                let worker = match location {
                    Location::Worker(w) => Some(w),
                    Location::Inline => None,
                };
                self.set_state(id, TaskState::Released);
                self.actions.push(Action::ReleaseData { worker, task: id });
                self.maybe_forget(id);
            }
        }
    }

    /// Drop records nobody can reach any more: not wanted, no dependents.
    /// Unfinished tasks dropped this way are cancelled.
    pub(crate) fn maybe_forget(&mut self, root: TaskId) {
        let mut stack = vec![root];
        while let Some(id) = stack.pop() {
            let Some(t) = self.tasks.get(&id) else {
                continue;
            };
            if !t.wanted_by.is_empty() || !t.dependents.is_empty() {
                continue;
            }
            match t.state {
                TaskState::Processing(w) => self.actions.push(Action::CancelCompute {
                    worker: w,
                    task: id,
                    stop: false,
                }),
                TaskState::Memory { location, .. } => {
                    let worker = match location {
                        Location::Worker(w) => Some(w),
                        Location::Inline => None,
                    };
                    self.actions.push(Action::ReleaseData { worker, task: id });
                }
                _ => {}
            }
            // Leaving the pending set adjusts the inputs' counters.
            self.set_state(id, TaskState::Released);
            let t = self.tasks.remove(&id).expect("present");
            self.groups[t.group as usize].counts.released -= 1;
            self.log_transition(id, Some(TaskState::Released), None);
            self.actions.push(Action::Forget { task: id });
            for d in t.deps.iter() {
                if let Some(dt) = self.tasks.get_mut(d) {
                    if let Some(pos) = dt.dependents.iter().position(|&x| x == id) {
                        dt.dependents.swap_remove(pos);
                    }
                    stack.push(*d);
                }
            }
        }
    }
}
