//! The core's invariants, checked after every event in tests.

use super::*;

impl<S> Core<S> {
    /// Checks every invariant of the state; panics with a description of the
    /// first violation. Run after every event in tests.
    pub fn check_invariants(&self) {
        // The load index holds exactly the workers not paused, at their load.
        let want: BTreeSet<(u64, u64, WorkerId)> = self
            .workers
            .iter()
            .filter(|(_, w)| !w.paused)
            .map(|(&id, w)| (load_of(w), w.seq, id))
            .collect();
        assert_eq!(self.by_load, want, "load index drifted");
        for by in self.holds.keys() {
            assert!(
                self.tasks.contains_key(by),
                "{by:?}: forgotten, still holds"
            );
        }
        for id in self.pinned.keys() {
            assert!(
                self.tasks.contains_key(id),
                "{id:?}: forgotten, still pinned"
            );
        }
        let retiring = self
            .workers
            .values()
            .filter(|w| w.retiring.is_some())
            .count();
        assert_eq!(self.retiring, retiring, "retiring count drifted");
        // The per-group counters match a recount.
        let mut recount = vec![GroupCounts::default(); self.groups.len()];
        for t in self.tasks.values() {
            *recount[t.group as usize].slot(t.state) += 1;
        }
        for (g, (stats, want)) in self.groups.iter().zip(recount).enumerate() {
            let live = stats.counts.by_state();
            assert_eq!(live, want.by_state(), "group {g}: counters drifted");
        }
        for (&id, t) in &self.tasks {
            assert!(
                !(t.once && t.ran)
                    || matches!(
                        t.state,
                        TaskState::Memory { .. } | TaskState::Released | TaskState::Erred { .. }
                    ),
                "{id:?}: scattered data that ran is {:?} (it can never run again)",
                t.state
            );
            let mut not_in_memory = 0;
            let mut pending_count = 0;
            for d in t.deps.iter() {
                let dt = self
                    .tasks
                    .get(d)
                    .unwrap_or_else(|| panic!("{id:?}: dep {d:?} missing"));
                assert!(
                    dt.dependents.contains(&id),
                    "{id:?} not in dependents of {d:?}"
                );
                if !matches!(dt.state, TaskState::Memory { .. }) {
                    not_in_memory += 1;
                }
            }
            for dep in &t.dependents {
                let dt = self
                    .tasks
                    .get(dep)
                    .unwrap_or_else(|| panic!("{id:?}: dependent {dep:?} missing"));
                assert!(dt.deps.contains(&id), "{dep:?} lacks dep {id:?}");
                if dt.state.is_pending() {
                    pending_count += 1;
                }
            }
            assert_eq!(
                t.pending_dependents, pending_count,
                "{id:?}: pending_dependents"
            );
            assert!(
                !t.wanted_by.is_empty() || !t.dependents.is_empty(),
                "{id:?} should have been forgotten"
            );
            assert!(
                t.wanted_by.contains(&HELD) == self.held.contains_key(&id)
                    || self.unheld.contains(&id),
                "{id:?}: held interest without a holder, or the reverse"
            );
            assert!(
                !t.wanted_by.contains(&DETACHED)
                    || t.state.is_pending()
                    || self.detached_done.contains(&id),
                "{id:?}: detached interest outlives the run ({:?})",
                t.state
            );
            match t.state {
                TaskState::Waiting => {
                    assert!(not_in_memory > 0, "{id:?} waiting with all deps in memory");
                    assert_eq!(t.waiting_on, not_in_memory, "{id:?}: waiting_on");
                }
                TaskState::Ready => assert_eq!(not_in_memory, 0, "{id:?} ready too early"),
                TaskState::Processing(w) => {
                    assert_eq!(not_in_memory, 0, "{id:?} processing without inputs");
                    let w = self.workers.get(&w).expect("processing on unknown worker");
                    assert!(w.assigned.contains(&id), "{id:?} not assigned");
                }
                TaskState::Memory { location, .. } => {
                    if let Location::Worker(w) = location {
                        let w = self.workers.get(&w).expect("memory on unknown worker");
                        assert!(w.has.contains(&id), "{id:?} not in has");
                    }
                    assert!(
                        !t.wanted_by.is_empty() || t.pending_dependents > 0,
                        "{id:?} in memory but unneeded"
                    );
                }
                TaskState::Erred { .. } | TaskState::Released => {}
            }
        }
        for id in &self.cancel_when_given {
            let asked = match self.tasks.get(id).map(|t| t.state) {
                Some(TaskState::Processing(w)) => self.workers[&w].stealing.contains(id),
                _ => false,
            };
            assert!(
                asked,
                "{id:?}: to cancel when given back, but not asked for"
            );
        }
        for (wid, w) in &self.workers {
            assert!(
                !w.retired || (w.paused && w.assigned.is_empty() && w.retiring.is_none()),
                "{wid:?}: retired but gets work"
            );
            for id in &w.assigned {
                assert_eq!(self.tasks[id].state, TaskState::Processing(*wid));
            }
            for id in &w.stealing {
                assert!(
                    w.assigned.contains(id),
                    "{id:?} asked back but not assigned"
                );
            }
            for id in &w.has {
                assert!(matches!(
                    self.tasks[id].state,
                    TaskState::Memory { location: Location::Worker(h), .. } if h == *wid
                ));
            }
            let threads: u32 = w.assigned.iter().map(|id| self.tasks[id].threads()).sum();
            assert_eq!(threads, w.threads_used, "{wid:?} thread count");
            for id in &w.running {
                assert!(w.assigned.contains(id), "{id:?} running but not assigned");
            }
            let zombie: u32 = w.zombies.values().sum();
            assert_eq!(zombie, w.zombie_threads, "{wid:?} zombie threads");
            for &(r, used) in &w.resources_used {
                let held: f64 = w
                    .assigned
                    .iter()
                    .flat_map(|id| self.tasks[id].resources().iter())
                    .filter(|x| x.0 == r)
                    .map(|x| x.1)
                    .sum();
                assert!(
                    (held - used).abs() < 1e-6,
                    "{wid:?} resource {r}: {used} != {held}"
                );
                let total = w.resources.iter().find(|x| x.0 == r).map_or(0.0, |x| x.1);
                assert!(used <= total + 1e-6, "{wid:?} resource {r} overcommitted");
            }
        }
        let queued: FxHashSet<TaskId> = self
            .ready
            .iter()
            .chain(self.ready_constrained.iter())
            .map(|e| e.id)
            .collect();
        for (&id, t) in &self.tasks {
            if t.state == TaskState::Ready {
                assert!(queued.contains(&id), "{id:?} ready but not queued");
            }
        }
    }
}
