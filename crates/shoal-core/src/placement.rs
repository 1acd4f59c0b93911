//! Placement: which ready task goes to which worker (load, inputs' holders,
//! resources, lifetimes), and work stealing.

use super::*;

impl<S> Core<S> {
    /// Asks stalled workers for their queued tasks when another worker has
    /// free threads. Which assigned tasks are still queued only the worker
    /// knows: it is asked for all but the oldest `nthreads` and gives back
    /// those it has not started.
    pub(crate) fn steal(&mut self) {
        let free: usize = self
            .workers
            .values()
            .filter(|w| !w.stalled && !w.paused)
            .map(|w| w.nthreads.saturating_sub(w.busy()) as usize)
            .sum();
        if free == 0 {
            return;
        }
        for &wid in &self.worker_order {
            let w = &self.workers[&wid];
            if !(w.stalled || w.paused) || w.busy() <= w.nthreads {
                continue;
            }
            let mut ids: Vec<TaskId> = w
                .assigned
                .iter()
                .copied()
                .filter(|id| !w.running.contains(id))
                .collect();
            // Task ids grow with submission: of those not reported started,
            // the oldest are likely starting now (threads not known busy).
            ids.sort();
            let known = w.zombie_threads as usize + w.running.len();
            let ids: Vec<TaskId> = ids
                .into_iter()
                .skip((w.nthreads as usize).saturating_sub(known))
                .filter(|id| !w.stealing.contains(id))
                // One taking an input that cannot leave this worker stays.
                .filter(|id| self.pinned_holder(&self.tasks[id]) != Some(wid))
                .collect();
            if ids.is_empty() {
                continue;
            }
            let w = self.workers.get_mut(&wid).expect("listed");
            w.stealing.extend(ids.iter().copied());
            self.actions.push(Action::Steal {
                worker: wid,
                tasks: ids,
            });
        }
    }

    pub(crate) fn est_us(&self, group: u32) -> Option<u64> {
        self.groups
            .get(group as usize)
            .and_then(|g| g.mean_us)
            .map(|m| m.ceil() as u64)
    }

    /// Whether worker `w` can take a task now: a free thread, or room in its
    /// queue. `fetches`: the task needs inputs held by other workers.
    pub(crate) fn can_take(&self, w: &Worker, est: Option<u64>, fetches: bool) -> bool {
        let n = w.busy() as u64;
        let threads = w.nthreads as u64;
        if w.paused {
            return false;
        }
        if n < threads {
            return true;
        }
        if w.stalled {
            return false;
        }
        // One such task per thread may wait behind the running ones, whatever
        // its duration: its inputs then arrive while they run instead of
        // after (a 64 MiB input takes milliseconds even mapped).
        if fetches && n < 2 * threads {
            return true;
        }
        match est {
            Some(e) => {
                n < threads * self.config.max_queue_per_thread as u64
                    && (w.queued_est_us + e <= threads * self.config.pipeline_budget_us
                        // One more per thread, of a task short enough that
                        // the round trip to here is a visible share of it:
                        // the worker starts it the moment the running one
                        // ends instead of a report and an answer later.
                        || (n < 2 * threads && e <= self.config.steal_after_us / 4))
            }
            None => false,
        }
    }

    pub(crate) fn reindex(&mut self, wid: WorkerId) {
        if let Some(w) = self.workers.get_mut(&wid) {
            reindex(&mut self.by_load, wid, w);
        }
    }

    /// Place ready tasks, highest priority first, while some worker can take
    /// the next one. Prefers the worker holding most bytes of the inputs, then
    /// the least loaded.
    pub(crate) fn schedule(&mut self) {
        self.settle_detached();
        self.settle_unheld();
        if self.retiring > 0 {
            self.retire_step();
        }
        self.schedule_constrained();
        let mut deferred: Vec<ReadyEntry> = Vec::new();
        while let Some(id) = first_ready(&mut self.ready, &self.tasks) {
            let t = &self.tasks[&id];
            let est = self.est_us(t.group);
            // Bytes of its inputs on each worker holding some.
            let mut holders: Vec<(WorkerId, u64)> = Vec::new();
            for d in t.deps.iter() {
                if let TaskState::Memory {
                    location: Location::Worker(h),
                    size,
                } = self.tasks[d].state
                {
                    match holders.iter_mut().find(|(w, _)| *w == h) {
                        Some(e) => e.1 += size,
                        None => holders.push((h, size)),
                    }
                }
            }
            // An input that cannot leave its worker: only there, even if
            // that worker is busy (it queues there). Not if it is leaving:
            // then placed as any task, it fails saying why.
            if let Some(h) = self.pinned_holder(t) {
                if self
                    .workers
                    .get(&h)
                    .is_some_and(|w| w.retiring.is_none() && !w.retired)
                {
                    self.ready.pop();
                    self.place(id, h, est);
                    continue;
                }
            }
            // Most input bytes local, then least loaded, then joined first:
            // among the holders, and the least loaded others that can take it.
            let mut best: Option<(u64, u64, u64, WorkerId)> = None;
            let mut consider = |local: u64, load: u64, seq: u64, wid: WorkerId| {
                let better = match best {
                    None => true,
                    Some((bl, bload, bseq, _)) => {
                        local > bl || (local == bl && (load, seq) < (bload, bseq))
                    }
                };
                if better {
                    best = Some((local, load, seq, wid));
                }
            };
            for &(wid, local) in &holders {
                let Some(w) = self.workers.get(&wid) else {
                    continue;
                };
                let fetches = holders.iter().any(|&(h, _)| h != wid);
                if self.can_take(w, est, fetches) {
                    consider(local, load_of(w), w.seq, wid);
                }
            }
            // A task with no inputs on workers (a root) goes where the
            // other inputs of its consumers are: a transpose's chunk beside
            // its partner, a join's two partitions together, instead of one
            // moved to the other. There if that worker has a thread free, or
            // can queue it while no worker has one. Else, if it takes a
            // millisecond or more, the tasks behind it go first and it waits
            // for a thread there, unless a worker would idle: that one takes
            // it (the two halves of a sum run side by side).
            if holders.is_empty() && self.config.place_partners {
                let partner = self.siblings_holder(t);
                if let Some((h, w)) = partner.and_then(|h| Some((h, self.workers.get(&h)?))) {
                    let free_here = !w.paused && w.busy() < w.nthreads;
                    if free_here || (self.can_take(w, est, false) && self.free_thread().is_none()) {
                        self.ready.pop();
                        self.place(id, h, est);
                        continue;
                    }
                    let worth = est.is_some_and(|e| e >= TINY_TASK_US);
                    if worth && !(w.paused || w.stalled) && deferred.len() < MAX_DEFERRED {
                        deferred.push(self.ready.pop().expect("peeked"));
                        continue;
                    }
                }
            }
            let fetches = !holders.is_empty();
            for &(load, seq, wid) in self
                .by_load
                .iter()
                .filter(|(_, _, wid)| !holders.iter().any(|(h, _)| h == wid))
                .take(LOAD_SCAN)
            {
                if self.can_take(&self.workers[&wid], est, fetches) {
                    consider(0, load, seq, wid);
                    break;
                }
            }
            let Some((_, _, _, mut wid)) = best else {
                break;
            };
            if let Some(h) = self.worth_waiting_for(id, &holders, wid) {
                wid = h;
            }
            self.ready.pop();
            self.place(id, wid, est);
        }
        // Those waiting for their partners' workers: a worker with a free
        // thread takes them rather than idle, the rest wait in the queue.
        for e in deferred {
            match self.free_thread() {
                Some(wid) => {
                    let est = self.est_us(self.tasks[&e.id].group);
                    self.place(e.id, wid, est);
                }
                None => self.ready.push(e),
            }
        }
        // Tasks that erred just now (unsatisfiable) may be detached ones,
        // and letting go of those may let go of what they held.
        while !self.detached_done.is_empty() || !self.unheld.is_empty() {
            self.settle_detached();
            self.settle_unheld();
        }
    }

    /// One of the least loaded workers (the first `LOAD_SCAN` of
    /// `by_load`: one with a thread free is among them) with a thread free.
    fn free_thread(&self) -> Option<WorkerId> {
        self.by_load
            .iter()
            .take(LOAD_SCAN)
            .map(|&(_, _, wid)| wid)
            .find(|wid| {
                let w = &self.workers[wid];
                !w.stalled && w.busy() < w.nthreads
            })
    }

    /// The worker that holds or runs most of the other inputs of task
    /// `t`'s consumers, looking only at consumers with few inputs (an
    /// all-to-all exchange has no place that suits all of them).
    fn siblings_holder(&self, t: &Task<S>) -> Option<WorkerId> {
        if t.dependents.len() > SIBLING_FAN {
            return None;
        }
        let mut best: Option<(u32, WorkerId)> = None;
        let mut counts: SmallVec<[(WorkerId, u32); 4]> = SmallVec::new();
        for c in t.dependents.iter() {
            let Some(c) = self.tasks.get(c) else { continue };
            if c.deps.len() > SIBLING_FAN {
                continue;
            }
            for d in c.deps.iter() {
                let at = match self.tasks.get(d).map(|d| &d.state) {
                    Some(TaskState::Processing(w)) => *w,
                    Some(TaskState::Memory {
                        location: Location::Worker(w),
                        ..
                    }) => *w,
                    _ => continue,
                };
                let n = match counts.iter_mut().find(|(w, _)| *w == at) {
                    Some(e) => {
                        e.1 += 1;
                        e.1
                    }
                    None => {
                        counts.push((at, 1));
                        1
                    }
                };
                if best.is_none_or(|(b, _)| n > b) {
                    best = Some((n, at));
                }
            }
        }
        best.map(|(_, w)| w)
    }

    /// The worker holding most of task `id`'s input bytes, if it is not
    /// `chosen` and moving those bytes would take longer than the work
    /// queued there (as measured for their groups: a large array in shared
    /// memory moves in a millisecond, a DataFrame is pickled and copied).
    /// Moving also costs both workers CPU that waiting does not.
    fn worth_waiting_for(
        &self,
        id: TaskId,
        holders: &[(WorkerId, u64)],
        chosen: WorkerId,
    ) -> Option<WorkerId> {
        let &(h, _) = holders
            .iter()
            .max_by_key(|&&(w, b)| (b, std::cmp::Reverse(w)))?;
        if h == chosen {
            return None;
        }
        let w = self.workers.get(&h)?;
        let threads = w.nthreads as u64;
        if w.paused
            || w.stalled
            || w.retiring.is_some()
            || w.busy() as u64 >= threads * self.config.max_queue_per_thread as u64
        {
            return None;
        }
        let task = &self.tasks[&id];
        let wait_us = w.queued_est_us / threads;
        let (mut move_us, mut held) = (0.0, 0);
        for d in task.deps.iter() {
            let dep = &self.tasks[d];
            if let TaskState::Memory {
                location: Location::Worker(at),
                size,
            } = dep.state
            {
                let rate = self.groups[dep.group as usize].move_us_per_mib;
                if at == h {
                    move_us += rate.unwrap_or(0.0) * size as f64 / (1u64 << 20) as f64;
                    held += size;
                }
            }
        }
        // A task far shorter than the moving it needs (a shuffle's split
        // takes 10 us to pick one piece of a 12 MiB dict of DataFrames that
        // another worker would fetch and unpickle whole, 3 ms) runs where
        // its inputs are if it starts there soon: the transfer time learned
        // above is the fetch alone, not the CPU both workers spend on it.
        let tiny =
            held >= TINY_TASK_INPUT && self.est_us(task.group).is_some_and(|e| e <= TINY_TASK_US);
        if tiny && wait_us <= self.config.steal_after_us / 4 {
            return Some(h);
        }
        (move_us > wait_us as f64).then_some(h)
    }

    /// Sends ready task `id` (just taken off the ready queue) to `wid`.
    pub(crate) fn place(&mut self, id: TaskId, wid: WorkerId, est: Option<u64>) {
        let est = est.unwrap_or(0);
        let t = self.tasks.get_mut(&id).expect("ready");
        t.est_us = est.min(u32::MAX as u64) as u32;
        let now = self.now_us;
        let w = self.workers.get_mut(&wid).expect("chosen");
        if w.assigned.is_empty() {
            w.progress_us = now;
        }
        w.assigned.insert(id);
        w.threads_used += 1;
        w.queued_est_us += est;
        reindex(&mut self.by_load, wid, w);
        self.set_state(id, TaskState::Processing(wid));
        self.actions.push(Action::Compute {
            worker: wid,
            task: id,
        });
    }

    /// Places ready tasks that need resources, highest priority first, each
    /// on a worker with a free thread and the resources free; stops at the
    /// first that must wait. One that no worker ever offered enough for
    /// fails at once (with no workers at all, it waits for some; one whose
    /// worker left waits for a replacement).
    pub(crate) fn schedule_constrained(&mut self) {
        while let Some(id) = first_ready(&mut self.ready_constrained, &self.tasks) {
            let t = &self.tasks[&id];
            let need = t.resources();
            let amount_in =
                |list: &[(u32, f64)], r: u32| list.iter().find(|x| x.0 == r).map_or(0.0, |x| x.1);
            let covers =
                |offer: &[(u32, f64)]| need.iter().all(|&(r, a)| amount_in(offer, r) >= a - 1e-9);
            // Whether `w` has `need` free now.
            let fits = |w: &Worker| {
                need.iter().all(|&(r, a)| {
                    amount_in(&w.resources, r) - amount_in(&w.resources_used, r) >= a - 1e-9
                })
            };
            let threads = t.threads();
            // A worker that leaves before the task's time request is up
            // is no place for it (it waits for one that lives longer).
            let until = (t.time_request_us() > 0).then(|| self.now_us + t.time_request_us());
            let lives = |w: &Worker| match (until, w.expires_us) {
                (Some(u), Some(e)) => e >= u,
                _ => true,
            };
            // Unsatisfiable: workers are there, and no worker ever offered
            // enough (resources, or threads).
            let never = (!need.is_empty() && !self.offers_seen.iter().any(|o| covers(o)))
                || threads > self.max_threads_seen;
            if !self.workers.is_empty() && never {
                self.ready_constrained.pop();
                self.set_erred(id, id, ErrorKind::Unsatisfiable);
                continue;
            }
            let mut best: Option<(usize, WorkerId)> = None;
            for &wid in &self.worker_order {
                let w = &self.workers[&wid];
                if w.paused || w.busy() + threads > w.nthreads || !fits(w) || !lives(w) {
                    continue;
                }
                if best.is_none_or(|(n, _)| w.assigned.len() < n) {
                    best = Some((w.assigned.len(), wid));
                }
            }
            let Some((_, wid)) = best else {
                break;
            };
            self.ready_constrained.pop();
            let need: Box<[(u32, f64)]> = self.tasks[&id].resources().into();
            let w = self.workers.get_mut(&wid).expect("chosen");
            for (r, amount) in need.iter() {
                if let Some(u) = w.resources_used.iter_mut().find(|u| u.0 == *r) {
                    u.1 += amount;
                }
            }
            if w.assigned.is_empty() {
                w.progress_us = self.now_us;
            }
            w.assigned.insert(id);
            w.threads_used += threads;
            reindex(&mut self.by_load, wid, w);
            self.tasks.get_mut(&id).expect("ready").est_us = 0;
            self.set_state(id, TaskState::Processing(wid));
            self.actions.push(Action::Compute {
                worker: wid,
                task: id,
            });
        }
    }
}

/// A task this short (mean of its group, µs) whose inputs on one worker
/// reach [`TINY_TASK_INPUT`] bytes waits there rather than move them.
const TINY_TASK_US: u64 = 1_000;
const TINY_TASK_INPUT: u64 = 1 << 20;

/// Consumers looked at for a root's placement, and inputs of each: more
/// is an exchange, where no one worker suits.
const SIBLING_FAN: usize = 4;

/// Roots one placement pass lets wait for their partners' workers (each
/// pass looks at them again; the rest are placed as any task).
const MAX_DEFERRED: usize = 16;

/// Load as a fraction of threads, scaled to compare integers.
pub(crate) fn load_of(w: &Worker) -> u64 {
    (w.assigned.len() as u64 * 1024) / w.nthreads as u64
}

/// Puts `w` at its place in `by_load` (out of it while paused).
pub(crate) fn reindex(by_load: &mut BTreeSet<(u64, u64, WorkerId)>, wid: WorkerId, w: &mut Worker) {
    let key = (!w.paused).then(|| load_of(w));
    if key != w.load_key {
        if let Some(k) = w.load_key {
            by_load.remove(&(k, w.seq, wid));
        }
        if let Some(k) = key {
            by_load.insert((k, w.seq, wid));
        }
        w.load_key = key;
    }
}

/// Workers looked at in load order for a task, besides its inputs' holders:
/// the least loaded that can take it is almost always the first.
pub(crate) const LOAD_SCAN: usize = 8;

/// The id of the heap's first entry still Ready, dropping stale entries
/// (tasks that left Ready, or were forgotten, after they were pushed).
pub(crate) fn first_ready<S>(
    heap: &mut BinaryHeap<ReadyEntry>,
    tasks: &FxHashMap<TaskId, Box<Task<S>>>,
) -> Option<TaskId> {
    while let Some(top) = heap.peek() {
        if tasks
            .get(&top.id)
            .is_some_and(|t| t.state == TaskState::Ready)
        {
            return Some(top.id);
        }
        heap.pop();
    }
    None
}
