//! Tests drive the core with events and assert the actions it returns, then
//! check every invariant. `sim` runs seeded random clusters with failures.

use super::*;

const C: ClientId = ClientId(1);

fn t(i: u64) -> TaskId {
    TaskId(i)
}

fn nt(id: u64, deps: &[u64]) -> NewTask {
    NewTask {
        id: t(id),
        deps: deps.iter().map(|&d| t(d)).collect(),
        priority: 0,
        retries: 0,
        group: 0,
        resources: Vec::new(),
        threads: 1,
        recompute: true,
        max_kills: 0,
        time_request_us: 0,
    }
}

fn computes(actions: &[Action]) -> Vec<(u32, u64)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Compute { worker, task } => Some((worker.0, task.0)),
            _ => None,
        })
        .collect()
}

fn core() -> Core {
    Core::new(Config {
        log_capacity: 1000,
        ..Config::default()
    })
}

#[test]
fn independent_tasks_fill_one_slot_per_thread_until_durations_are_known() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_worker_added(WorkerId(1), 2);
    c.handle_submit(C, (1..=10).map(|i| nt(i, &[])).collect());
    c.check_invariants();
    let a = c.take_actions();
    // Unknown duration: exactly one task per thread, oldest first.
    assert_eq!(computes(&a), vec![(0, 1), (1, 2), (1, 3)]);
    // Once a duration is known, tiny tasks are pipelined.
    assert!(c
        .handle_task_finished(WorkerId(0), t(1), 8, true, 5)
        .is_some());
    c.check_invariants();
    let a = c.take_actions();
    assert!(a.contains(&Action::TaskMemory {
        client: C,
        task: t(1)
    }));
    assert_eq!(computes(&a).len(), 7, "{a:?}");
}

#[test]
fn long_tasks_are_not_queued_behind_each_other() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_worker_added(WorkerId(1), 1);
    c.handle_submit(C, (1..=4).map(|i| nt(i, &[])).collect());
    assert_eq!(computes(&c.take_actions()), vec![(0, 1), (1, 2)]);
    c.handle_task_finished(WorkerId(0), t(1), 8, true, 1_000_000);
    // A one-second task does not fit a 2 ms pipeline budget: one at a time.
    assert_eq!(computes(&c.take_actions()), vec![(0, 3)]);
    c.handle_task_finished(WorkerId(1), t(2), 8, true, 1_000_000);
    assert_eq!(computes(&c.take_actions()), vec![(1, 4)]);
    c.check_invariants();
}

#[test]
fn short_tasks_wait_one_deep_behind_running_ones_to_hide_the_round_trip() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_worker_added(WorkerId(1), 1);
    c.handle_submit(C, (1..=8).map(|i| nt(i, &[])).collect());
    assert_eq!(computes(&c.take_actions()), vec![(0, 1), (1, 2)]);
    // 10 ms: over the 2 ms pipeline budget, but short enough that the
    // report and the answer would show; one waits behind each running one.
    c.handle_task_finished(WorkerId(0), t(1), 8, true, 10_000);
    assert_eq!(computes(&c.take_actions()), vec![(0, 3), (0, 4), (1, 5)]);
    // Never two.
    c.handle_task_finished(WorkerId(0), t(3), 8, true, 10_000);
    assert_eq!(computes(&c.take_actions()), vec![(0, 6)]);
    c.check_invariants();
}

#[test]
fn a_task_waits_for_its_inputs_holder_when_moving_them_costs_more() {
    // Moving task 1's 64 MiB took `move_us`; its holder has 20 ms queued.
    let place = |move_us: u64| {
        let mut c = core();
        c.handle_worker_added(WorkerId(0), 1);
        c.handle_submit(C, vec![nt(1, &[])]);
        c.take_actions();
        c.handle_task_finished(WorkerId(0), t(1), 64 << 20, false, 10_000);
        c.handle_submit(C, vec![nt(2, &[]), nt(3, &[])]);
        assert_eq!(computes(&c.take_actions()), vec![(0, 2), (0, 3)]);
        c.handle_transfer(t(1), 64 << 20, move_us);
        c.handle_worker_added(WorkerId(1), 1);
        c.handle_submit(C, vec![nt(4, &[1])]);
        c.check_invariants();
        computes(&c.take_actions())
    };
    // 64 ms to move (a DataFrame pickled and copied): wait there.
    assert_eq!(place(64_000), vec![(0, 4)]);
    // 1 ms (an array in shared memory): move it to the idle worker.
    assert_eq!(place(1_000), vec![(1, 4)]);
}

#[test]
fn a_tiny_task_runs_where_its_large_input_is_rather_than_move_it() {
    // Worker 0 holds task 1's 12 MiB, runs a 17 ms task and has one more
    // waiting (no room for another); worker 1 is idle. Moving 12 MiB was
    // measured fast (a mapped file), but a task of 10 us gains nothing from
    // running elsewhere.
    let place = |est_us: u64| {
        let mut c = core();
        c.handle_worker_added(WorkerId(0), 1);
        c.handle_submit(C, vec![nt(1, &[])]);
        c.take_actions();
        c.handle_task_finished(WorkerId(0), t(1), 12 << 20, false, 17_000);
        c.handle_transfer(t(1), 12 << 20, 100);
        // Learn the readers' duration (group 1), then keep worker 0 busy.
        let reader = |id: u64, deps: &[u64]| NewTask {
            group: 1,
            ..nt(id, deps)
        };
        c.handle_submit(C, vec![reader(2, &[])]);
        c.take_actions();
        c.handle_task_finished(WorkerId(0), t(2), 8, true, est_us);
        c.handle_submit(C, vec![nt(3, &[]), nt(5, &[])]);
        assert_eq!(computes(&c.take_actions()), vec![(0, 3), (0, 5)]);
        c.handle_worker_added(WorkerId(1), 1);
        c.handle_submit(C, vec![reader(4, &[1])]);
        c.check_invariants();
        computes(&c.take_actions())
    };
    assert_eq!(place(10), vec![(0, 4)]);
    // A 20 ms reader runs on the idle worker (moving is cheap).
    assert_eq!(place(20_000), vec![(1, 4)]);
}

#[test]
fn dependents_run_where_their_data_is() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_worker_added(WorkerId(1), 1);
    c.handle_submit(C, vec![nt(1, &[]), nt(2, &[]), nt(3, &[2])]);
    assert_eq!(computes(&c.take_actions()), vec![(0, 1), (1, 2)]);
    c.handle_task_finished(WorkerId(1), t(2), 1 << 20, false, 10);
    // Worker 0 is busy with task 1 and has no duration estimate... task 3 has
    // its input on worker 1, which is free.
    assert_eq!(computes(&c.take_actions()), vec![(1, 3)]);
    assert_eq!(c.location(t(2)), Some(Location::Worker(WorkerId(1))));
    c.check_invariants();
}

#[test]
fn a_task_fetching_inputs_waits_behind_a_running_one_so_its_fetch_overlaps() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_worker_added(WorkerId(1), 1);
    c.handle_submit(C, vec![nt(1, &[]), nt(2, &[])]);
    assert_eq!(computes(&c.take_actions()), vec![(0, 1), (1, 2)]);
    // Second-long tasks: never pipelined for their duration.
    c.handle_task_finished(WorkerId(0), t(1), 1 << 20, false, 1_000_000);
    c.handle_task_finished(WorkerId(1), t(2), 1 << 20, false, 1_000_000);
    c.take_actions();
    // Each consumer needs the input held by the other worker: one runs per
    // thread and one more waits, fetching meanwhile.
    c.handle_submit(C, (3..=8).map(|i| nt(i, &[1, 2])).collect());
    c.check_invariants();
    assert_eq!(
        computes(&c.take_actions()),
        vec![(0, 3), (1, 4), (0, 5), (1, 6)]
    );
    // A task with nothing to fetch is not queued (here: a second one on
    // worker 0 whose input it holds).
    c.handle_submit(C, vec![nt(9, &[1])]);
    assert!(computes(&c.take_actions()).is_empty());
    c.handle_task_finished(WorkerId(0), t(3), 8, true, 1_000_000);
    assert_eq!(computes(&c.take_actions()), vec![(0, 7)]);
    c.check_invariants();
}

#[test]
fn intermediate_results_are_released_when_no_longer_needed() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_submit(C, vec![nt(1, &[]), nt(2, &[1])]);
    c.take_actions();
    // The client drops its future for 1; 2 still needs it.
    c.handle_release(C, &[t(1)]);
    assert_eq!(c.take_actions(), vec![]);
    c.handle_task_finished(WorkerId(0), t(1), 100, false, 10);
    c.take_actions();
    c.handle_task_finished(WorkerId(0), t(2), 100, false, 10);
    let a = c.take_actions();
    assert!(a.contains(&Action::ReleaseData {
        worker: Some(WorkerId(0)),
        task: t(1)
    }));
    // 1 is released but kept for lineage while 2 lives.
    assert_eq!(c.state(t(1)), Some(TaskState::Released));
    c.check_invariants();
    c.handle_release(C, &[t(2)]);
    let a = c.take_actions();
    assert!(a.contains(&Action::Forget { task: t(1) }));
    assert!(a.contains(&Action::Forget { task: t(2) }));
    assert_eq!(c.n_tasks(), 0);
}

#[test]
fn lost_worker_reruns_running_tasks_and_recomputes_lost_results() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_worker_added(WorkerId(1), 1);
    c.handle_submit(C, vec![nt(1, &[]), nt(2, &[1]), nt(3, &[2])]);
    c.handle_release(C, &[t(1)]);
    c.take_actions();
    c.handle_task_finished(WorkerId(0), t(1), 100, false, 10);
    c.take_actions();
    c.handle_task_finished(WorkerId(0), t(2), 100, false, 10);
    assert_eq!(computes(&c.take_actions()), vec![(0, 3)]);
    assert_eq!(c.state(t(1)), Some(TaskState::Released));
    // Worker 0 dies holding 2 and running 3: 2 must be recomputed, which
    // needs 1 again.
    c.handle_worker_lost(WorkerId(0));
    c.check_invariants();
    assert_eq!(computes(&c.take_actions()), vec![(1, 1)]);
    c.handle_task_finished(WorkerId(1), t(1), 100, false, 10);
    assert_eq!(computes(&c.take_actions()), vec![(1, 2)]);
    c.handle_task_finished(WorkerId(1), t(2), 100, false, 10);
    assert_eq!(computes(&c.take_actions()), vec![(1, 3)]);
    c.handle_task_finished(WorkerId(1), t(3), 100, true, 10);
    assert_eq!(c.location(t(3)), Some(Location::Inline));
    c.check_invariants();
    let story: Vec<_> = c
        .story(t(3))
        .iter()
        .map(|s| (s.stimulus, s.to.map(|to| format!("{to:?}"))))
        .collect();
    assert_eq!(
        story.first(),
        Some(&("submit", Some("Waiting".to_string()))),
        "{story:?}"
    );
    assert!(
        story.contains(&("worker-lost", Some("Waiting".to_string()))),
        "{story:?}"
    );
    assert_eq!(
        story.last().map(|s| s.0),
        Some("task-finished"),
        "{story:?}"
    );
}

#[test]
fn inline_results_survive_their_worker() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_submit(C, vec![nt(1, &[])]);
    c.take_actions();
    c.handle_task_finished(WorkerId(0), t(1), 8, true, 10);
    c.take_actions();
    c.handle_worker_lost(WorkerId(0));
    assert_eq!(c.take_actions(), vec![]);
    assert_eq!(c.location(t(1)), Some(Location::Inline));
}

#[test]
fn a_task_that_kills_three_workers_fails_naming_itself() {
    let mut c = core();
    c.handle_submit(C, vec![nt(1, &[]), nt(2, &[1])]);
    for w in 0..3 {
        c.handle_worker_added(WorkerId(w), 1);
        assert_eq!(computes(&c.take_actions()), vec![(w, 1)]);
        c.handle_worker_lost(WorkerId(w));
        c.check_invariants();
    }
    let a = c.take_actions();
    assert!(a.contains(&Action::TaskErred {
        client: C,
        task: t(1),
        cause: t(1),
        kind: ErrorKind::KilledWorker(3)
    }));
    assert!(a.contains(&Action::TaskErred {
        client: C,
        task: t(2),
        cause: t(1),
        kind: ErrorKind::KilledWorker(3)
    }));
}

#[test]
fn retries_then_error_propagates_to_dependents() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    let mut first = nt(1, &[]);
    first.retries = 1;
    c.handle_submit(C, vec![first, nt(2, &[1])]);
    c.take_actions();
    assert_eq!(c.handle_task_failed(WorkerId(0), t(1)), Some(false));
    assert_eq!(computes(&c.take_actions()), vec![(0, 1)]);
    assert_eq!(c.handle_task_failed(WorkerId(0), t(1)), Some(true));
    let a = c.take_actions();
    assert!(a.contains(&Action::TaskErred {
        client: C,
        task: t(2),
        cause: t(1),
        kind: ErrorKind::Exception
    }));
    // A stale report from a worker that no longer runs it is ignored.
    assert_eq!(c.handle_task_failed(WorkerId(0), t(1)), None);
    c.check_invariants();
}

#[test]
fn unknown_dependency_is_an_error_not_a_hang() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_submit(C, vec![nt(2, &[99])]);
    let a = c.take_actions();
    assert_eq!(
        a,
        vec![Action::TaskErred {
            client: C,
            task: t(2),
            cause: t(2),
            kind: ErrorKind::MissingDependency(t(99))
        }]
    );
}

#[test]
fn cancel_stops_pending_work_and_releasing_drops_unwanted_tasks() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_submit(C, vec![nt(1, &[]), nt(2, &[1]), nt(3, &[])]);
    c.take_actions();
    c.handle_cancel(C, &[t(1)]);
    let a = c.take_actions();
    assert!(a.contains(&Action::CancelCompute {
        worker: WorkerId(0),
        task: t(1),
        stop: true
    }));
    assert!(a.contains(&Action::TaskErred {
        client: C,
        task: t(2),
        cause: t(1),
        kind: ErrorKind::Cancelled
    }));
    assert_eq!(computes(&a), vec![(0, 3)]);
    // Releasing an unfinished task nobody else wants cancels it.
    c.handle_release(C, &[t(3)]);
    let a = c.take_actions();
    assert!(a.contains(&Action::CancelCompute {
        worker: WorkerId(0),
        task: t(3),
        stop: false
    }));
    c.handle_client_gone(C);
    assert_eq!(c.n_tasks(), 0);
    assert_eq!(c.n_assigned(WorkerId(0)), 0);
}

#[test]
fn priority_then_depth_then_age() {
    let mut c = core();
    let mut hi = nt(5, &[]);
    hi.priority = 10;
    c.handle_submit(C, vec![nt(1, &[]), nt(2, &[]), nt(3, &[]), hi]);
    c.handle_worker_added(WorkerId(0), 1);
    assert_eq!(computes(&c.take_actions()), vec![(0, 5)]);
    c.handle_task_finished(WorkerId(0), t(5), 8, true, 1_000_000);
    assert_eq!(computes(&c.take_actions()), vec![(0, 1)]);
    c.handle_submit(C, vec![nt(6, &[5])]);
    c.handle_task_finished(WorkerId(0), t(1), 8, true, 1_000_000);
    // 6 is deeper than 2 and 3: depth-first keeps memory low.
    assert_eq!(computes(&c.take_actions()), vec![(0, 6)]);
}

#[test]
fn a_ten_thousand_deep_chain_does_not_recurse() {
    let mut c = core();
    let n = 10_000u64;
    c.handle_submit(
        C,
        (0..n)
            .map(|i| if i == 0 { nt(0, &[]) } else { nt(i, &[i - 1]) })
            .collect(),
    );
    c.handle_release(C, &(0..n - 1).map(t).collect::<Vec<_>>());
    c.handle_worker_added(WorkerId(0), 1);
    for i in 0..n {
        assert_eq!(computes(&c.take_actions()), vec![(0, i)]);
        c.handle_task_finished(WorkerId(0), t(i), 8, false, 1_000_000);
    }
    // Losing the only copy of the end result recomputes the whole chain.
    c.handle_worker_added(WorkerId(1), 1);
    c.handle_worker_lost(WorkerId(0));
    assert_eq!(computes(&c.take_actions()), vec![(1, 0)]);
    c.check_invariants();
    c.handle_release(C, &[t(n - 1)]);
    assert_eq!(c.n_tasks(), 0);
}

/// A seeded random cluster: several clients submitting random DAGs (some
/// sharing tasks) and leaving; workers that finish, fail, die, join, retire,
/// pause, lend threads and fail to fetch inputs; an actor resource expected
/// then withdrawn; reports repeated after the fact. After every event the
/// invariants hold; at the end every wanted task is in memory or erred,
/// nothing hangs and no record leaks.
#[test]
fn sim_random_clusters_always_converge() {
    let seeds: u64 = std::env::var("SHOAL_SIM_SEEDS").map_or(400, |s| s.parse().expect("a number"));
    for seed in 0..seeds {
        sim(seed);
    }
}

/// Resource 0 is a "GPU" (workers have 0..2); resource 1 an actor's
/// (one worker offers it, expected from the start, withdrawn later).
const GPU: u32 = 0;
const ACTOR: u32 = 1;

/// A batch of `n` fresh tasks from `*next` on, depending on each other and
/// on `known` tasks (which may be forgotten by now: a clear error), plus
/// some of `known` again (the client gains interest in them).
fn random_batch(rng: &mut fastrand::Rng, next: &mut u64, known: &[TaskId], n: u64) -> Vec<NewTask> {
    let first = *next;
    let mut batch = Vec::new();
    for i in first..first + n {
        let mut deps: Vec<TaskId> = (0..rng.usize(0..3))
            .filter_map(|_| match rng.u32(0..4) {
                0 if !known.is_empty() => Some(known[rng.usize(0..known.len())]),
                _ if i > first => Some(t(rng.u64(first..i))),
                _ => None,
            })
            .collect();
        deps.sort();
        deps.dedup();
        let has_inputs = !deps.is_empty();
        batch.push(NewTask {
            id: t(i),
            deps,
            priority: rng.i32(0..3),
            retries: rng.u32(0..2),
            group: rng.u32(0..3),
            // Some need a GPU (or 3, which no worker has: unsatisfiable),
            // a few the actor.
            resources: match rng.u32(0..20) {
                0..=3 => vec![(GPU, 1.0)],
                4 => vec![(GPU, 3.0)],
                5 => vec![(ACTOR, 1.0)],
                _ => Vec::new(),
            },
            // Some take 2 threads (workers have 1 or 2) or 3 (none has,
            // unless it lends threads).
            threads: match rng.u32(0..20) {
                0 | 1 => 2,
                2 => 3,
                _ => 1,
            },
            // Some are scattered data: lost, not rerun, when their worker dies.
            recompute: has_inputs || rng.u32(0..8) != 0,
            // Some have their own crash limit, some a time request.
            max_kills: rng.u8(0..3),
            time_request_us: if rng.u32(0..10) == 0 { 500_000 } else { 0 },
        });
    }
    *next += n;
    for _ in 0..rng.usize(0..3) {
        if !known.is_empty() {
            let mut again = nt(known[rng.usize(0..known.len())].0, &[]);
            again.deps.clear();
            batch.push(again);
        }
    }
    batch
}

fn sim(seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut c = Core::new(Config {
        max_kills: 3,
        log_capacity: 100_000,
        ..Config::default()
    });
    let mut next_worker = 0u32;
    let mut next_client = 1u32;
    let mut next_task = 0u64;
    let mut clients: Vec<ClientId> = Vec::new();
    // Orders at workers, and which of them their threads took (a started
    // task cannot be given back and reports even after a cancel).
    let mut running: Vec<(WorkerId, TaskId, bool)> = Vec::new();
    let mut wanted: Vec<(ClientId, TaskId)> = Vec::new();
    let mut known: Vec<TaskId> = Vec::new();
    let mut asked: Vec<(WorkerId, TaskId)> = Vec::new();
    // Copies off retiring workers in flight: (task, to).
    let mut copying: Vec<(TaskId, WorkerId)> = Vec::new();
    // Reports sent, to send some again late.
    let mut reported: Vec<(WorkerId, TaskId)> = Vec::new();
    let mut actor: Option<WorkerId> = None;
    let mut actor_expected = true;
    let mut stopped: Vec<(WorkerId, TaskId)> = Vec::new();
    c.handle_resource_expected(ACTOR);
    let mut now = 0u64;
    for _ in 0..rng.usize(1..3) {
        let client = ClientId(next_client);
        next_client += 1;
        clients.push(client);
        let n = rng.u64(1..40);
        let batch = random_batch(&mut rng, &mut next_task, &known, n);
        for x in &batch {
            if !wanted.contains(&(client, x.id)) {
                wanted.push((client, x.id));
            }
            known.push(x.id);
        }
        c.handle_submit(client, batch);
    }
    for _ in 0..rng.usize(1..4) {
        let gpus = vec![(GPU, rng.u32(0..3) as f64)];
        c.handle_worker_added_with(WorkerId(next_worker), rng.u32(1..3), gpus);
        next_worker += 1;
    }
    let mut steps = 0;
    loop {
        steps += 1;
        assert!(steps < 100_000, "seed {seed}: no convergence");
        let mut gone = Vec::new();
        for a in c.take_actions() {
            match a {
                Action::Compute { worker, task } => running.push((worker, task, false)),
                Action::CancelCompute { worker, task, stop } => {
                    // A stopped task that had started reports its failure
                    // (stale: the core already ended it).
                    if stop && running.contains(&(worker, task, true)) {
                        stopped.push((worker, task));
                    }
                    running.retain(|&(w, x, started)| {
                        (started && !stop) || !(w == worker && x == task)
                    })
                }
                Action::Steal { worker, tasks } => {
                    asked.extend(tasks.into_iter().map(|task| (worker, task)))
                }
                Action::Replicate { task, to, .. } => copying.push((task, to)),
                Action::Retired { worker } => gone.push(worker),
                _ => {}
            }
        }
        c.check_invariants();
        for (w, id) in stopped.drain(..) {
            c.handle_task_failed(w, id);
            c.check_invariants();
        }
        // A retired worker exits (the service stops it): only tasks the
        // core no longer counts on (cancelled while running) die with it.
        for w in gone {
            assert_eq!(c.n_assigned(w), 0, "seed {seed}: retired with work");
            running.retain(|&(x, _, _)| x != w);
            c.handle_worker_lost(w);
            c.check_invariants();
        }
        // Settled: nothing waits to run (detached tasks included).
        let all_settled = c.tasks.values().all(|t| {
            matches!(
                t.state,
                TaskState::Memory { .. } | TaskState::Erred { .. } | TaskState::Released
            )
        });
        if all_settled && running.is_empty() {
            break;
        }
        let roll = rng.u32(0..100);
        if roll < 10 {
            now += rng.u64(0..300_000);
            // The core needs no tick before the time it names (the service
            // sleeps until then): an earlier one stalls no worker, and acts
            // only where a retry was already asked for (retries are paced,
            // and one earlier than asked is harmless).
            let wake = c.poll_timeout();
            let due = wake.is_some_and(|t| t <= now);
            let stalled = |c: &Core| c.workers.values().filter(|w| w.stalled).count();
            let before = (stalled(&c), c.actions.len());
            c.handle_tick(now);
            if !due {
                assert_eq!(
                    stalled(&c),
                    before.0,
                    "seed {seed}: a tick not asked for stalled"
                );
                assert!(
                    c.actions.len() == before.1 || wake.is_some(),
                    "seed {seed}: a tick acted with none asked for"
                );
            }
            continue;
        }
        if roll < 20 && !asked.is_empty() {
            // A worker answers a steal: gives the task back if "not started".
            let (w, id) = asked.swap_remove(rng.usize(0..asked.len()));
            let pos = running.iter().position(|&r| r == (w, id, false));
            let ok = pos.is_some() && rng.bool();
            if ok {
                running.swap_remove(pos.expect("checked"));
            }
            c.handle_steal_reply(w, id, ok);
            continue;
        }
        if roll < 25 && !copying.is_empty() {
            let (id, to) = copying.swap_remove(rng.usize(0..copying.len()));
            c.handle_replicated(to, id, rng.u32(0..4) != 0);
            continue;
        }
        let roll = rng.u32(0..200);
        let workers: Vec<WorkerId> = c.worker_order.clone();
        let any_worker = |rng: &mut fastrand::Rng| workers[rng.usize(0..workers.len())];
        if roll < 6 && !workers.is_empty() {
            // A worker dies: its orders, steals and copies to it with it.
            let w = any_worker(&mut rng);
            // What its threads ran, as its supervisor would read it.
            let take = rng.usize(0..3);
            let item = rng.bool().then(|| rng.u32(0..3));
            let ran: Vec<(TaskId, Option<u32>)> = running
                .iter()
                .filter(|&&(x, _, _)| x == w)
                .map(|&(_, id, _)| (id, item))
                .take(take)
                .collect();
            running.retain(|&(x, _, _)| x != w);
            asked.retain(|&(x, _)| x != w);
            copying.retain(|&(_, to)| to != w);
            if actor == Some(w) {
                actor = None;
            }
            // Or restarts on purpose (a task it could not stop).
            match rng.u32(0..4) {
                0 => c.handle_worker_lost(w),
                1 => c.handle_worker_restarting(w),
                2 => c.handle_worker_died(w, &ran),
                _ => {
                    // Its supervisor's word comes a moment after the
                    // connection closed, or never.
                    c.handle_worker_dying(w);
                    c.check_invariants();
                    if rng.bool() {
                        c.handle_worker_died(w, &ran);
                    } else {
                        c.handle_worker_lost(w);
                    }
                }
            }
        } else if roll < 12 || workers.is_empty() {
            let gpus = vec![(GPU, rng.u32(0..3) as f64)];
            c.handle_worker_added_with(WorkerId(next_worker), rng.u32(1..3), gpus);
            // Some are batch jobs that end soon (time requests avoid them).
            if rng.u32(0..3) == 0 {
                c.handle_worker_expires(WorkerId(next_worker), now + rng.u64(0..1_000_000));
            }
            next_worker += 1;
        } else if roll < 14 && actor.is_none() && actor_expected {
            // The actor's process is up.
            actor = Some(WorkerId(next_worker));
            c.handle_worker_added_with(WorkerId(next_worker), 1, vec![(ACTOR, 1.0)]);
            next_worker += 1;
        } else if roll < 16 && actor_expected {
            // The actor is killed for good: its worker goes, then the offer.
            if let Some(w) = actor.take() {
                running.retain(|&(x, _, _)| x != w);
                asked.retain(|&(x, _)| x != w);
                copying.retain(|&(_, to)| to != w);
                c.handle_worker_lost(w);
            }
            actor_expected = false;
            c.handle_resource_withdrawn(ACTOR);
        } else if roll < 18 && !workers.is_empty() {
            c.handle_retire(any_worker(&mut rng));
        } else if roll < 22 && !workers.is_empty() {
            // Memory pressure comes and goes.
            c.handle_worker_paused(any_worker(&mut rng), rng.u32(0..3) == 0);
        } else if roll < 25 && !workers.is_empty() {
            // A task lends its thread while it waits (secede), or takes it back.
            c.handle_worker_threads(any_worker(&mut rng), rng.u32(1..4));
        } else if roll < 28 && next_task < 200 {
            // A client (new or not) submits more, maybe on others' tasks.
            let client = if clients.is_empty() || rng.bool() {
                next_client += 1;
                clients.push(ClientId(next_client));
                ClientId(next_client)
            } else {
                clients[rng.usize(0..clients.len())]
            };
            let n = rng.u64(1..20);
            let batch = random_batch(&mut rng, &mut next_task, &known, n);
            for x in &batch {
                // Interest is a set: a second submit of a task adds none.
                if !wanted.contains(&(client, x.id)) {
                    wanted.push((client, x.id));
                }
                known.push(x.id);
            }
            c.handle_submit(client, batch);
        } else if roll < 29 && !clients.is_empty() {
            // A client leaves: what only it wanted is let go.
            let client = clients.swap_remove(rng.usize(0..clients.len()));
            wanted.retain(|&(x, _)| x != client);
            c.handle_client_gone(client);
        } else if roll < 33 && !wanted.is_empty() {
            let (client, id) = wanted.swap_remove(rng.usize(0..wanted.len()));
            c.handle_release(client, &[id]);
        } else if roll < 35 && !wanted.is_empty() {
            let (client, id) = wanted[rng.usize(0..wanted.len())];
            if rng.bool() {
                c.handle_cancel(client, &[id]);
            } else {
                c.handle_cancel_queued(client, &[id]);
            }
        } else if roll < 39 && !wanted.is_empty() {
            // Run it even if released (Ray's dropped refs), then release it.
            let (client, id) = wanted.swap_remove(rng.usize(0..wanted.len()));
            c.handle_detach(client, &[id]);
            c.handle_release(client, &[id]);
        } else if roll < 41 && known.len() >= 2 {
            // A result holds a task made after its own (a task returned a
            // future it made); a client claims one from a result.
            let by = known[rng.usize(0..known.len())];
            let held: Vec<TaskId> = known.iter().copied().filter(|x| *x > by).take(2).collect();
            c.handle_hold(by, &held);
            if let (Some(&id), false) = (held.first(), clients.is_empty()) {
                let client = clients[rng.usize(0..clients.len())];
                if c.handle_adopt(client, &[id]).is_empty() && !wanted.contains(&(client, id)) {
                    wanted.push((client, id));
                }
            }
        } else if roll < 42 && !reported.is_empty() {
            // A report arrives again, late (the task may have moved, been
            // cancelled, rerun or forgotten since).
            let (w, id) = reported[rng.usize(0..reported.len())];
            if workers.contains(&w) {
                c.handle_task_finished(w, id, 8, rng.bool(), 10);
            }
        } else if let Some(i) = (roll < 46)
            .then(|| running.iter().position(|r| !r.2))
            .flatten()
        {
            // The worker cannot get the order's inputs and drops it.
            let (w, id, _) = running.swap_remove(i);
            let deps = c.deps(id).to_vec();
            if rng.bool() {
                c.handle_fetch_failed(w, id, &deps);
            } else {
                c.handle_missing_data(w, id, &deps);
            }
        } else if !running.is_empty() {
            let i = rng.usize(0..running.len());
            let (w, id, started) = running[i];
            if !started {
                // A worker's thread takes the order (it reports the start
                // before the result).
                running[i].2 = true;
                c.handle_tasks_started(w, &[id]);
                continue;
            }
            running.swap_remove(i);
            reported.push((w, id));
            if rng.u32(0..10) == 0 {
                c.handle_task_failed(w, id);
            } else {
                if rng.u32(0..8) == 0 {
                    // Its result cannot leave the worker (unpicklable).
                    c.handle_pinned(w, id);
                }
                c.handle_task_finished(w, id, rng.u64(1..1000), rng.bool(), rng.u64(1..5000));
            }
        }
        c.check_invariants();
    }
    for (_, id) in &wanted {
        if let Some(s) = c.state(*id) {
            assert!(
                matches!(s, TaskState::Memory { .. } | TaskState::Erred { .. }),
                "seed {seed}: {id:?} ended {s:?} {:?} story {:#?}",
                c.tasks[id].wanted_by,
                c.story(*id)
            );
        }
    }
    for (wid, w) in &c.workers {
        assert_eq!(w.zombie_threads, 0, "seed {seed}: {wid:?} keeps zombies");
        assert!(w.running.is_empty(), "seed {seed}: {wid:?} still running");
    }
    for client in clients {
        c.handle_client_gone(client);
    }
    c.check_invariants();
    if c.n_tasks() != 0 {
        for (id, t) in &c.tasks {
            eprintln!(
                "{id:?} {:?} wanted {:?} deps {:?} dependents {:?} holds {:?}",
                t.state,
                t.wanted_by,
                t.deps,
                t.dependents,
                c.holds.get(id)
            );
        }
    }
    assert_eq!(c.n_tasks(), 0, "seed {seed}: records leaked");
}

fn steals(actions: &[Action]) -> Vec<(u32, Vec<u64>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Steal { worker, tasks } => {
                Some((worker.0, tasks.iter().map(|t| t.0).collect()))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn tasks_queued_behind_a_stalled_task_are_stolen_for_idle_workers() {
    let mut c = core();
    c.handle_tick(0);
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_worker_added(WorkerId(1), 1);
    // Learn that the group is tiny, then queue many of it on both workers.
    c.handle_submit(C, vec![nt(1, &[])]);
    c.take_actions();
    c.handle_task_finished(WorkerId(0), t(1), 8, true, 10);
    c.handle_submit(C, (2..=40).map(|i| nt(i, &[])).collect());
    let placed = computes(&c.take_actions());
    let on0: Vec<u64> = placed.iter().filter(|p| p.0 == 0).map(|p| p.1).collect();
    assert!(on0.len() > 2, "{placed:?}");
    // Worker 1 drains its queue; worker 0 is stuck in its first task.
    for &(w, id) in placed.iter().filter(|p| p.0 == 1) {
        c.handle_task_finished(WorkerId(w), t(id), 8, true, 10);
    }
    c.take_actions();
    // The core asks to be woken when worker 0 would stall, not before.
    assert_eq!(c.poll_timeout(), Some(200_000));
    c.handle_tick(100_000);
    assert!(steals(&c.take_actions()).is_empty(), "not stalled yet");
    c.handle_tick(250_000);
    let s = steals(&c.take_actions());
    assert_eq!(s.len(), 1, "{s:?}");
    assert_eq!(s[0].0, 0);
    assert_eq!(s[0].1, on0[1..].to_vec(), "all but the running one");
    c.check_invariants();
    // Stalled with queued tasks, a free thread elsewhere: retried.
    assert_eq!(c.poll_timeout(), Some(300_000));
    // No second request for the same tasks while answers are pending.
    c.handle_tick(300_000);
    assert!(steals(&c.take_actions()).is_empty());
    // The worker gives back all but one it had already started.
    let started = on0[1];
    for &id in &on0[2..] {
        c.handle_steal_reply(WorkerId(0), t(id), true);
    }
    c.handle_steal_reply(WorkerId(0), t(started), false);
    c.check_invariants();
    let moved = computes(&c.take_actions());
    assert!(!moved.is_empty());
    assert!(
        moved.iter().all(|p| p.0 == 1),
        "stalled worker gets no queue: {moved:?}"
    );
    // Progress on worker 0 ends the stall.
    c.handle_task_finished(WorkerId(0), t(on0[0]), 8, true, 300_000);
    c.check_invariants();
    assert!(!c.workers[&WorkerId(0)].stalled);
}

#[test]
fn a_core_with_nothing_queued_needs_no_tick() {
    let mut c = core();
    assert_eq!(c.poll_timeout(), None, "no workers");
    c.handle_worker_added(WorkerId(0), 2);
    c.handle_submit(C, vec![nt(1, &[]), nt(2, &[])]);
    c.take_actions();
    // Both run, nothing queued behind them: however long they take,
    // nothing can be stolen.
    assert_eq!(c.poll_timeout(), None, "running, nothing queued");
    c.handle_task_finished(WorkerId(0), t(1), 8, true, 10);
    c.handle_task_finished(WorkerId(0), t(2), 8, true, 10);
    assert_eq!(c.poll_timeout(), None, "all done");
}

#[test]
fn a_stale_steal_reply_is_ignored() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_submit(C, vec![nt(1, &[])]);
    c.take_actions();
    // Never asked: nothing happens.
    c.handle_steal_reply(WorkerId(0), t(1), true);
    assert_eq!(c.state(t(1)), Some(TaskState::Processing(WorkerId(0))));
    c.handle_steal_reply(WorkerId(9), t(1), true);
    c.check_invariants();
}

#[test]
fn a_worker_lending_a_thread_gets_another_task() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_submit(C, (1..=3).map(|i| nt(i, &[])).collect());
    assert_eq!(computes(&c.take_actions()), vec![(0, 1)]);
    // Task 1 waits on other tasks and secedes: one more thread.
    c.handle_worker_threads(WorkerId(0), 2);
    assert_eq!(computes(&c.take_actions()), vec![(0, 2)]);
    c.handle_worker_threads(WorkerId(0), 1);
    c.handle_task_finished(WorkerId(0), t(2), 8, true, 1_000_000);
    assert!(
        computes(&c.take_actions()).is_empty(),
        "still one thread busy"
    );
    c.check_invariants();
}

fn with_gpu(id: u64, gpus: f64) -> NewTask {
    NewTask {
        resources: vec![(0, gpus)],
        ..nt(id, &[])
    }
}

#[test]
fn resources_are_never_overcommitted_and_do_not_block_other_tasks() {
    let mut c = core();
    c.handle_worker_added_with(WorkerId(0), 4, vec![(0, 1.0)]);
    c.handle_worker_added_with(WorkerId(1), 4, vec![]);
    c.handle_submit(
        C,
        vec![with_gpu(1, 1.0), with_gpu(2, 1.0), nt(3, &[]), nt(4, &[])],
    );
    c.check_invariants();
    let placed = computes(&c.take_actions());
    // One GPU task on the GPU worker; the second waits; CPU tasks go on.
    assert!(placed.contains(&(0, 1)), "{placed:?}");
    assert!(!placed.iter().any(|p| p.1 == 2), "{placed:?}");
    assert!(placed.iter().any(|p| p.1 == 3) && placed.iter().any(|p| p.1 == 4));
    c.handle_task_finished(WorkerId(0), t(1), 8, true, 10);
    assert_eq!(computes(&c.take_actions()), vec![(0, 2)]);
    c.check_invariants();
}

#[test]
fn a_task_no_worker_can_run_fails_at_once() {
    let mut c = core();
    // With no workers yet it waits (they may still be connecting).
    c.handle_submit(C, vec![with_gpu(1, 2.0)]);
    assert_eq!(c.state(t(1)), Some(TaskState::Ready));
    c.handle_worker_added_with(WorkerId(0), 1, vec![(0, 1.0)]);
    assert!(matches!(
        c.state(t(1)),
        Some(TaskState::Erred {
            kind: ErrorKind::Unsatisfiable,
            ..
        })
    ));
    c.check_invariants();
}

#[test]
fn a_task_whose_worker_left_waits_for_a_replacement() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_worker_added_with(WorkerId(1), 1, vec![(7, 1.0)]);
    c.handle_submit(
        C,
        vec![NewTask {
            resources: vec![(7, 1.0)],
            ..nt(1, &[])
        }],
    );
    assert_eq!(computes(&c.take_actions()), vec![(1, 1)]);
    c.handle_worker_lost(WorkerId(1));
    assert_eq!(
        c.state(t(1)),
        Some(TaskState::Ready),
        "waits: such a worker existed"
    );
    c.handle_worker_added_with(WorkerId(2), 1, vec![(7, 1.0)]);
    assert_eq!(computes(&c.take_actions()), vec![(2, 1)]);
    c.check_invariants();
}

#[test]
fn a_task_for_an_expected_worker_waits_for_it() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_resource_expected(7);
    c.handle_submit(
        C,
        vec![NewTask {
            resources: vec![(7, 1.0)],
            ..nt(1, &[])
        }],
    );
    assert_eq!(c.state(t(1)), Some(TaskState::Ready));
    c.handle_worker_added_with(WorkerId(1), 1, vec![(7, 1.0)]);
    assert_eq!(computes(&c.take_actions()), vec![(1, 1)]);
    c.check_invariants();
}

#[test]
fn a_cycle_in_a_submitted_graph_fails_its_tasks_and_the_rest_runs() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    // 1 -> 2 -> 1 is a cycle, 3 depends on it, 5 depends on itself; 4 is
    // fine and so is 6 (after 4, in order).
    c.handle_submit(
        C,
        vec![
            nt(1, &[2]),
            nt(2, &[1]),
            nt(3, &[2]),
            nt(4, &[]),
            nt(5, &[5]),
            nt(6, &[4]),
        ],
    );
    c.check_invariants();
    for i in [1, 2, 3, 5] {
        assert!(
            matches!(
                c.state(t(i)),
                Some(TaskState::Erred {
                    kind: ErrorKind::Cycle,
                    ..
                })
            ),
            "task {i}: {:?}",
            c.state(t(i))
        );
    }
    assert_eq!(computes(&c.take_actions()), vec![(0, 4)]);
    c.handle_task_finished(WorkerId(0), t(4), 8, true, 5);
    assert_eq!(computes(&c.take_actions()), vec![(0, 6)]);
    c.check_invariants();
    // Out of order but acyclic: nothing fails.
    c.handle_submit(C, vec![nt(8, &[7]), nt(7, &[])]);
    assert_eq!(c.state(t(8)), Some(TaskState::Waiting));
    c.check_invariants();
}

#[test]
fn withdrawing_a_resource_skips_forgotten_tasks_still_in_the_ready_heap() {
    // An actor's call whose future was dropped stays in the constrained
    // heap as a stale entry; the actor is then killed. This used to index
    // the forgotten task and panic the scheduler.
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_resource_expected(7);
    // Task 2 outranks task 1, so task 1's entry sits below the top of the
    // heap, where placement (which drops stale tops) does not reach it.
    c.handle_submit(
        C,
        vec![
            NewTask {
                resources: vec![(7, 1.0)],
                ..nt(1, &[])
            },
            NewTask {
                resources: vec![(7, 1.0)],
                priority: 5,
                ..nt(2, &[])
            },
        ],
    );
    c.handle_release(C, &[t(1)]);
    assert_eq!(c.state(t(1)), None, "forgotten");
    c.handle_resource_withdrawn(7);
    c.check_invariants();
    assert!(matches!(c.state(t(2)), Some(TaskState::Erred { .. })));
    c.handle_submit(C, vec![nt(3, &[])]);
    assert_eq!(computes(&c.take_actions()), vec![(0, 3)]);
}

#[test]
fn withdrawing_a_resource_fails_the_tasks_that_wait_for_it() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_worker_added_with(WorkerId(1), 1, vec![(7, 1.0)]);
    c.handle_worker_lost(WorkerId(1));
    c.handle_submit(
        C,
        vec![NewTask {
            resources: vec![(7, 1.0)],
            ..nt(1, &[])
        }],
    );
    assert_eq!(c.state(t(1)), Some(TaskState::Ready));
    c.handle_resource_withdrawn(7);
    assert!(matches!(
        c.state(t(1)),
        Some(TaskState::Erred {
            kind: ErrorKind::Unsatisfiable,
            ..
        })
    ));
    // Later tasks needing it fail at once.
    c.handle_submit(
        C,
        vec![NewTask {
            resources: vec![(7, 1.0)],
            ..nt(2, &[])
        }],
    );
    assert!(matches!(c.state(t(2)), Some(TaskState::Erred { .. })));
    c.check_invariants();
}

#[test]
fn a_task_taking_several_threads_waits_for_them_and_holds_them() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 2);
    c.handle_submit(C, vec![nt(1, &[])]);
    assert_eq!(computes(&c.take_actions()), vec![(0, 1)]);
    let wide = NewTask {
        threads: 2,
        recompute: true,
        ..nt(2, &[])
    };
    c.handle_submit(C, vec![wide, nt(3, &[])]);
    // One thread is free: the 2-thread task waits, the 1-thread one runs.
    assert_eq!(computes(&c.take_actions()), vec![(0, 3)]);
    c.handle_task_finished(WorkerId(0), t(1), 8, true, 1_000_000);
    c.handle_task_finished(WorkerId(0), t(3), 8, true, 1_000_000);
    assert_eq!(computes(&c.take_actions()), vec![(0, 2)]);
    c.check_invariants();
    // More threads than any worker has: fails at once.
    c.handle_submit(
        C,
        vec![NewTask {
            threads: 3,
            recompute: true,
            ..nt(4, &[])
        }],
    );
    assert!(matches!(
        c.state(t(4)),
        Some(TaskState::Erred {
            kind: ErrorKind::Unsatisfiable,
            ..
        })
    ));
}

fn scattered(id: u64) -> NewTask {
    NewTask {
        recompute: false,
        ..nt(id, &[])
    }
}

#[test]
fn scattered_data_lost_with_its_worker_fails_its_dependents_instead_of_rerunning() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_worker_added(WorkerId(1), 1);
    c.handle_submit(C, vec![scattered(1), nt(2, &[1]), nt(3, &[])]);
    assert_eq!(computes(&c.take_actions()), vec![(0, 1), (1, 3)]);
    c.handle_task_finished(WorkerId(0), t(1), 1 << 20, false, 10);
    assert_eq!(computes(&c.take_actions()), vec![(0, 2)]);
    c.handle_worker_lost(WorkerId(0));
    c.check_invariants();
    let a = c.take_actions();
    assert_eq!(computes(&a), vec![], "scattered data must not run again");
    for task in [1, 2] {
        assert!(
            a.contains(&Action::TaskErred {
                client: C,
                task: t(task),
                cause: t(1),
                kind: ErrorKind::DataLost
            }),
            "{a:?}"
        );
    }
    // Other work is untouched.
    assert_eq!(c.state(t(3)), Some(TaskState::Processing(WorkerId(1))));
}

#[test]
fn a_released_scattered_input_needed_again_is_lost_not_rerun() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_worker_added(WorkerId(1), 1);
    // 2 depends on scattered 1; the client drops 1, 2's result lives on
    // worker 0, and 3 needs 2.
    c.handle_submit(C, vec![scattered(1), nt(2, &[1]), nt(3, &[2])]);
    c.handle_release(C, &[t(1)]);
    c.take_actions();
    c.handle_task_finished(WorkerId(0), t(1), 1 << 20, false, 10);
    c.take_actions();
    c.handle_task_finished(WorkerId(0), t(2), 1 << 20, false, 10);
    assert_eq!(c.state(t(1)), Some(TaskState::Released));
    c.take_actions();
    // Losing 2 needs 1 again, which cannot run twice.
    c.handle_worker_lost(WorkerId(0));
    c.check_invariants();
    let a = c.take_actions();
    assert_eq!(computes(&a), vec![]);
    assert!(a.contains(&Action::TaskErred {
        client: C,
        task: t(3),
        cause: t(1),
        kind: ErrorKind::DataLost
    }));
}

#[test]
fn a_paused_worker_gets_no_work_and_gives_back_its_queue() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_submit(C, vec![nt(1, &[])]);
    c.take_actions();
    // Known tiny durations: the worker gets a queue.
    c.handle_task_finished(WorkerId(0), t(1), 8, true, 5);
    c.handle_submit(C, (2..=6).map(|i| nt(i, &[])).collect());
    assert_eq!(computes(&c.take_actions()).len(), 5);
    c.handle_worker_added(WorkerId(1), 1);
    c.take_actions();
    c.handle_worker_paused(WorkerId(0), true);
    c.check_invariants();
    let a = c.take_actions();
    // Its queued tasks (all but the oldest, likely running) are asked back.
    assert_eq!(steals(&a), vec![(0, vec![3, 4, 5, 6])]);
    for i in [3, 4, 5, 6] {
        c.handle_steal_reply(WorkerId(0), t(i), true);
    }
    c.check_invariants();
    let placed = computes(&c.take_actions());
    assert!(
        !placed.is_empty() && placed.iter().all(|&(w, _)| w == 1),
        "{placed:?}"
    );
    // Nothing new goes to the paused worker, even with a free thread.
    c.handle_task_finished(WorkerId(0), t(2), 8, true, 5);
    c.handle_submit(C, vec![nt(7, &[])]);
    assert!(computes(&c.take_actions()).iter().all(|&(w, _)| w != 0));
    c.handle_worker_paused(WorkerId(0), false);
    c.handle_submit(C, vec![nt(8, &[])]);
    c.check_invariants();
    let resumed = computes(&c.take_actions());
    assert!(resumed.iter().any(|&(w, _)| w == 0), "{resumed:?}");
}

#[test]
fn an_input_its_holder_lacks_is_recomputed_and_the_task_runs_again() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_worker_added(WorkerId(1), 1);
    // The consumer comes later: its inputs are not placed together.
    c.handle_submit(C, vec![nt(1, &[]), nt(2, &[])]);
    c.handle_submit(C, vec![nt(3, &[1, 2])]);
    assert_eq!(computes(&c.take_actions()), vec![(0, 1), (1, 2)]);
    c.handle_task_finished(WorkerId(0), t(1), 1 << 20, false, 10);
    c.handle_task_finished(WorkerId(1), t(2), 2 << 20, false, 10);
    assert_eq!(computes(&c.take_actions()), vec![(1, 3)]);
    // Worker 1 fetched 1 from worker 0, which said it does not have it.
    c.handle_missing_data(WorkerId(1), t(3), &[t(1)]);
    c.check_invariants();
    let a = c.take_actions();
    assert!(a.contains(&Action::ReleaseData {
        worker: Some(WorkerId(0)),
        task: t(1)
    }));
    assert_eq!(c.state(t(3)), Some(TaskState::Waiting));
    // Made again beside the consumer's other input.
    assert_eq!(computes(&a), vec![(1, 1)]);
    c.handle_task_finished(WorkerId(1), t(1), 1 << 20, false, 10);
    assert_eq!(computes(&c.take_actions()), vec![(1, 3)]);
    // A stale report (the input is not where it was said to be) only puts
    // the task back.
    c.handle_missing_data(WorkerId(1), t(3), &[t(99)]);
    c.check_invariants();
    assert_eq!(computes(&c.take_actions()), vec![(1, 3)]);
}

fn replicates(actions: &[Action]) -> Vec<(u64, u32, u32)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Replicate { task, from, to } => Some((task.0, from.0, to.0)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_retiring_worker_hands_its_needed_results_over_then_is_let_go() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_submit(C, vec![nt(1, &[]), nt(2, &[]), nt(3, &[]), nt(4, &[1, 2])]);
    c.take_actions();
    for i in 1..=3 {
        c.handle_task_finished(WorkerId(0), t(i), 1 << 20, false, 1_000_000);
        c.take_actions();
    }
    c.handle_release(C, &[t(3)]); // not needed any more: not moved
    c.take_actions();
    // Task 4 runs on worker 0; worker 1 joins; worker 0 is asked to leave.
    assert_eq!(c.state(t(4)), Some(TaskState::Processing(WorkerId(0))));
    c.handle_worker_added(WorkerId(1), 1);
    c.handle_retire(WorkerId(0));
    c.check_invariants();
    let a = c.take_actions();
    assert_eq!(replicates(&a), vec![(1, 0, 1), (2, 0, 1)]);
    // Still running something: not let go yet.
    c.handle_replicated(WorkerId(1), t(1), true);
    c.handle_replicated(WorkerId(1), t(2), true);
    c.check_invariants();
    assert_eq!(c.location(t(1)), Some(Location::Worker(WorkerId(1))));
    let a = c.take_actions();
    assert!(
        !a.iter().any(|x| matches!(x, Action::Retired { .. })),
        "{a:?}"
    );
    // Its last task finishes: that result moves too, then it may go.
    c.handle_task_finished(WorkerId(0), t(4), 1 << 20, false, 10);
    let a = c.take_actions();
    assert_eq!(replicates(&a), vec![(4, 0, 1)]);
    c.handle_replicated(WorkerId(1), t(4), true);
    let a = c.take_actions();
    assert!(
        a.contains(&Action::Retired {
            worker: WorkerId(0)
        }),
        "{a:?}"
    );
    c.handle_worker_lost(WorkerId(0));
    c.check_invariants();
    // Nothing to recompute: everything needed lives on worker 1.
    assert_eq!(computes(&c.take_actions()), vec![]);
    assert_eq!(c.location(t(4)), Some(Location::Worker(WorkerId(1))));
}

#[test]
fn a_failed_copy_is_tried_again_and_a_lone_worker_just_leaves() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_worker_added(WorkerId(1), 1);
    c.handle_submit(C, vec![nt(1, &[])]);
    c.take_actions();
    c.handle_task_finished(WorkerId(0), t(1), 1 << 20, false, 10);
    c.take_actions();
    c.handle_retire(WorkerId(0));
    assert_eq!(replicates(&c.take_actions()), vec![(1, 0, 1)]);
    c.handle_replicated(WorkerId(1), t(1), false);
    assert_eq!(replicates(&c.take_actions()), vec![(1, 0, 1)]);
    // The target dies: the move goes nowhere; alone, the worker just leaves.
    c.handle_worker_lost(WorkerId(1));
    c.check_invariants();
    let a = c.take_actions();
    assert!(
        a.contains(&Action::Retired {
            worker: WorkerId(0)
        }),
        "{a:?}"
    );
}

#[test]
fn asking_where_a_result_is_reports_it_again_to_clients_holding_it() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_submit(C, vec![nt(1, &[]), nt(2, &[])]);
    c.take_actions();
    c.handle_task_finished(WorkerId(0), t(1), 1 << 20, false, 10);
    c.take_actions();
    c.handle_where(C, &[t(1), t(2), t(99)]);
    // 1 is reported again; 2 is still running; 99 is unknown.
    assert_eq!(
        c.take_actions(),
        vec![Action::TaskMemory {
            client: C,
            task: t(1)
        }]
    );
    c.handle_where(ClientId(7), &[t(1)]);
    assert_eq!(c.take_actions(), vec![], "only to clients holding it");
}

#[test]
fn only_started_tasks_count_against_killed_worker() {
    let mut c = core();
    c.handle_submit(C, vec![nt(1, &[]), nt(2, &[])]);
    for w in 0..3 {
        c.handle_worker_added(WorkerId(w), 2);
        assert_eq!(computes(&c.take_actions()), vec![(w, 1), (w, 2)]);
        // Task 2 waits in the worker's queue; only task 1 runs.
        c.handle_tasks_started(WorkerId(w), &[t(1)]);
        c.handle_worker_lost(WorkerId(w));
        c.check_invariants();
    }
    assert_eq!(
        c.state(t(1)),
        Some(TaskState::Erred {
            cause: t(1),
            kind: ErrorKind::KilledWorker(3)
        })
    );
    assert_eq!(c.state(t(2)), Some(TaskState::Ready));
    c.handle_worker_added(WorkerId(9), 1);
    assert_eq!(computes(&c.take_actions()), vec![(9, 2)]);
}

#[test]
fn a_cancelled_task_still_running_keeps_its_thread_until_it_reports() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_worker_added(WorkerId(1), 1);
    c.handle_submit(C, vec![nt(1, &[])]);
    assert_eq!(computes(&c.take_actions()), vec![(0, 1)]);
    c.handle_tasks_started(WorkerId(0), &[t(1)]);
    c.handle_cancel(C, &[t(1)]);
    c.check_invariants();
    c.take_actions();
    // Worker 0's thread still runs task 1: new work goes to worker 1,
    // then waits, not queued behind the cancelled task.
    c.handle_submit(C, vec![nt(2, &[]), nt(3, &[])]);
    assert_eq!(computes(&c.take_actions()), vec![(1, 2)]);
    assert_eq!(c.state(t(3)), Some(TaskState::Ready));
    // The cancelled task ends (its report is stale): the thread is free.
    assert!(c
        .handle_task_finished(WorkerId(0), t(1), 8, true, 10)
        .is_none());
    c.check_invariants();
    assert_eq!(computes(&c.take_actions()), vec![(0, 3)]);
    // A start report that crosses the cancel counts the same way.
    c.handle_cancel(C, &[t(3)]);
    c.handle_tasks_started(WorkerId(0), &[t(3)]);
    c.handle_submit(C, vec![nt(4, &[])]);
    c.check_invariants();
    assert!(computes(&c.take_actions()).is_empty());
    assert!(c.handle_task_failed(WorkerId(0), t(3)).is_none());
    assert_eq!(computes(&c.take_actions()), vec![(0, 4)]);
}

#[test]
fn inputs_that_cannot_be_fetched_place_the_task_again_then_are_recomputed() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_worker_added(WorkerId(1), 1);
    // The consumer comes later: its inputs are not placed together.
    c.handle_submit(C, vec![nt(1, &[]), nt(2, &[])]);
    c.handle_submit(C, vec![nt(3, &[1, 2])]);
    assert_eq!(computes(&c.take_actions()), vec![(0, 1), (1, 2)]);
    c.handle_task_finished(WorkerId(0), t(1), 10, false, 10);
    c.handle_task_finished(WorkerId(1), t(2), 1000, false, 10);
    // Task 3 runs where most of its input bytes are, and fetches task 1.
    assert_eq!(computes(&c.take_actions()), vec![(1, 3)]);
    for _ in 0..2 {
        c.handle_fetch_failed(WorkerId(1), t(3), &[t(1)]);
        c.check_invariants();
        // Not the task's fault: no retry spent, no error; placed again.
        assert_eq!(computes(&c.take_actions()), vec![(1, 3)]);
    }
    c.handle_fetch_failed(WorkerId(1), t(3), &[t(1)]);
    c.check_invariants();
    // The third time the input is taken as lost and made again.
    let a = c.take_actions();
    assert!(a.contains(&Action::ReleaseData {
        worker: Some(WorkerId(0)),
        task: t(1)
    }));
    // Made again beside the consumer's other input.
    assert_eq!(computes(&a), vec![(1, 1)]);
}

#[test]
fn detached_work_runs_though_released_and_is_forgotten_when_done() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_submit(C, vec![nt(1, &[]), nt(2, &[1]), nt(3, &[])]);
    c.handle_detach(C, &[t(2)]);
    // The client drops every future: the detached task and its input stay.
    c.handle_release(C, &[t(1), t(2), t(3)]);
    c.check_invariants();
    assert_eq!(c.state(t(3)), None, "a plain released task is dropped");
    assert_eq!(computes(&c.take_actions()), vec![(0, 1)]);
    c.handle_task_finished(WorkerId(0), t(1), 8, false, 10);
    c.check_invariants();
    assert_eq!(computes(&c.take_actions()), vec![(0, 2)]);
    c.handle_task_finished(WorkerId(0), t(2), 8, false, 10);
    c.check_invariants();
    let a = c.take_actions();
    // Nobody is told (no client holds it); its data is dropped, its record forgotten.
    assert!(
        !a.iter().any(|x| matches!(x, Action::TaskMemory { .. })),
        "{a:?}"
    );
    assert!(a.contains(&Action::ReleaseData {
        worker: Some(WorkerId(0)),
        task: t(2)
    }));
    assert_eq!(c.n_tasks(), 0);
    // A client that keeps its future still gets the result.
    c.handle_submit(C, vec![nt(4, &[])]);
    c.handle_detach(C, &[t(4)]);
    c.take_actions();
    c.handle_task_finished(WorkerId(0), t(4), 8, true, 10);
    c.check_invariants();
    assert!(c.take_actions().contains(&Action::TaskMemory {
        client: C,
        task: t(4)
    }));
    assert!(matches!(c.state(t(4)), Some(TaskState::Memory { .. })));
}

/// Found by the simulator: a task whose result was let go but whose record
/// stays (a dependent still holds it) hung when a client submitted it again.
#[test]
fn a_released_task_submitted_again_runs_again() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_submit(C, vec![nt(1, &[]), nt(2, &[1])]);
    assert_eq!(computes(&c.take_actions()), vec![(0, 1)]);
    c.handle_task_finished(WorkerId(0), t(1), 8, false, 10);
    assert_eq!(computes(&c.take_actions()), vec![(0, 2)]);
    c.handle_task_finished(WorkerId(0), t(2), 8, false, 10);
    c.handle_release(C, &[t(1)]);
    c.take_actions();
    assert_eq!(c.state(t(1)), Some(TaskState::Released));
    c.handle_submit(ClientId(2), vec![nt(1, &[])]);
    assert_eq!(computes(&c.take_actions()), vec![(0, 1)]);
    c.handle_task_finished(WorkerId(0), t(1), 8, false, 10);
    let a = c.take_actions();
    assert!(a.iter().any(|x| matches!(x, Action::TaskMemory { client, task, .. } if *client == ClientId(2) && *task == t(1))));
    c.check_invariants();
}

/// Found by the simulator: a retired worker (told to exit) that reported
/// its memory fell was given work again, and was picked as the target of
/// another retiring worker's results.
#[test]
fn a_retired_worker_gets_no_work_and_no_results() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_worker_added(WorkerId(1), 1);
    c.handle_retire(WorkerId(0));
    assert!(c.take_actions().contains(&Action::Retired {
        worker: WorkerId(0)
    }));
    c.handle_worker_paused(WorkerId(0), false);
    c.handle_submit(C, vec![nt(1, &[]), nt(2, &[])]);
    assert_eq!(computes(&c.take_actions()), vec![(1, 1)]);
    c.handle_task_finished(WorkerId(1), t(1), 8, false, 10);
    c.take_actions();
    c.handle_retire(WorkerId(1));
    let a = c.take_actions();
    assert!(
        !a.iter()
            .any(|x| matches!(x, Action::Replicate { .. } | Action::Compute { .. })),
        "{a:?}"
    );
    c.check_invariants();
}

#[test]
fn cancel_queued_cancels_what_the_worker_gives_back_and_spares_what_it_started() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_submit(C, vec![nt(1, &[])]);
    c.handle_task_finished(WorkerId(0), t(1), 8, false, 10); // learn: tiny tasks
    c.handle_submit(C, vec![nt(2, &[]), nt(3, &[]), nt(4, &[])]);
    c.take_actions();
    for i in 2..=4 {
        assert_eq!(c.state(t(i)), Some(TaskState::Processing(WorkerId(0))));
    }
    c.handle_tasks_started(WorkerId(0), &[t(2)]);
    c.handle_cancel_queued(C, &(2..=4).map(t).collect::<Vec<_>>());
    let a = c.take_actions();
    // Started: not even asked. Sent, not reported started: asked back.
    assert!(
        a.contains(&Action::Steal {
            worker: WorkerId(0),
            tasks: vec![t(3), t(4)]
        }),
        "{a:?}"
    );
    assert_eq!(c.state(t(2)), Some(TaskState::Processing(WorkerId(0))));
    // The worker gives back 3; 4 had started meanwhile.
    c.handle_steal_reply(WorkerId(0), t(3), true);
    c.handle_steal_reply(WorkerId(0), t(4), false);
    c.check_invariants();
    assert!(matches!(
        c.state(t(3)),
        Some(TaskState::Erred {
            kind: ErrorKind::Cancelled,
            ..
        })
    ));
    assert_eq!(c.state(t(4)), Some(TaskState::Processing(WorkerId(0))));
    c.handle_task_finished(WorkerId(0), t(4), 8, false, 10);
    assert!(matches!(c.state(t(4)), Some(TaskState::Memory { .. })));
    c.check_invariants();
}

#[test]
fn a_worker_restarting_on_purpose_does_not_count_against_its_other_tasks() {
    let mut c = Core::new(Config {
        max_kills: 1,
        log_capacity: 1000,
        ..Config::default()
    });
    c.handle_worker_added(WorkerId(0), 2);
    c.handle_submit(C, vec![nt(1, &[]), nt(2, &[])]);
    c.take_actions();
    c.handle_tasks_started(WorkerId(0), &[t(1), t(2)]);
    // Task 1 was stopped and would not stop: it failed, the worker restarts.
    c.handle_cancel(C, &[t(1)]);
    c.handle_worker_restarting(WorkerId(0));
    assert_eq!(c.state(t(2)), Some(TaskState::Ready), "not KilledWorker");
    c.handle_worker_added(WorkerId(1), 1);
    assert_eq!(computes(&c.take_actions()), vec![(1, 2)]);
    // The same death unannounced is a kill.
    c.handle_tasks_started(WorkerId(1), &[t(2)]);
    c.handle_worker_lost(WorkerId(1));
    assert!(matches!(
        c.state(t(2)),
        Some(TaskState::Erred {
            kind: ErrorKind::KilledWorker(1),
            ..
        })
    ));
}

#[test]
fn a_task_s_own_crash_limit_overrides_the_cluster_s() {
    let mut c = core(); // max_kills 3
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_submit(
        C,
        vec![NewTask {
            max_kills: 1,
            ..nt(1, &[])
        }],
    );
    c.take_actions();
    c.handle_tasks_started(WorkerId(0), &[t(1)]);
    c.handle_worker_lost(WorkerId(0));
    assert!(matches!(
        c.state(t(1)),
        Some(TaskState::Erred {
            kind: ErrorKind::KilledWorker(1),
            ..
        })
    ));
}

#[test]
fn a_time_request_keeps_a_task_off_workers_that_leave_too_soon() {
    let mut c = core();
    c.handle_tick(1_000_000);
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_worker_expires(WorkerId(0), 1_000_000 + 60_000_000); // 60 s left
    c.handle_submit(
        C,
        vec![NewTask {
            time_request_us: 120_000_000, // needs 2 min
            ..nt(1, &[])
        }],
    );
    assert!(
        computes(&c.take_actions()).is_empty(),
        "not on the short-lived worker"
    );
    assert_eq!(c.state(t(1)), Some(TaskState::Ready));
    // A worker with no known end, or one that lives long enough, takes it.
    c.handle_worker_added(WorkerId(1), 1);
    c.handle_worker_expires(WorkerId(1), 1_000_000 + 600_000_000);
    assert_eq!(computes(&c.take_actions()), vec![(1, 1)]);
    // A task without a time request may go to the short-lived one.
    c.handle_submit(C, vec![nt(2, &[])]);
    assert_eq!(computes(&c.take_actions()), vec![(0, 2)]);
}

#[test]
fn resubmitted_tasks_held_by_a_rejoined_worker_start_in_memory_and_are_not_run_again() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    // 1 and 2 finished before the restart: 1 on worker 0 (rejoined), 2
    // inline (the client had its value); 3 was held by a worker that did
    // not come back (5); 4 was still pending.
    let held: FxHashMap<TaskId, (Location, u64)> = [
        (t(1), (Location::Worker(WorkerId(0)), 100)),
        (t(2), (Location::Inline, 8)),
        (t(3), (Location::Worker(WorkerId(5)), 100)),
    ]
    .into_iter()
    .collect();
    let tasks = vec![nt(1, &[]), nt(2, &[]), nt(3, &[]), nt(4, &[1, 2, 3])];
    c.handle_resubmit(C, tasks.into_iter().map(|t| (t, ())).collect(), &held);
    c.check_invariants();
    let a = c.take_actions();
    // Only 3 runs; 4 waits for it alone.
    assert_eq!(computes(&a), vec![(0, 3)]);
    assert!(matches!(
        c.state(t(1)),
        Some(TaskState::Memory {
            location: Location::Worker(WorkerId(0)),
            size: 100
        })
    ));
    assert!(matches!(
        c.state(t(2)),
        Some(TaskState::Memory {
            location: Location::Inline,
            ..
        })
    ));
    assert!(c
        .handle_task_finished(WorkerId(0), t(3), 8, true, 5)
        .is_some());
    c.check_invariants();
    assert_eq!(computes(&c.take_actions()), vec![(0, 4)]);
}

/// Ray's nested refs: a task (on worker W, whose client is `W_CLIENT`)
/// submits an inner task and returns its future. The inner task lives as
/// long as the outer result holds it, though the client that made it lets
/// it go; the driver that gets the outer result claims it.
#[test]
fn a_task_held_by_a_result_lives_as_long_as_that_result() {
    const W_CLIENT: ClientId = ClientId(7);
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 2);
    c.handle_submit(C, vec![nt(1, &[])]);
    assert_eq!(computes(&c.take_actions()), vec![(0, 1)]);
    // Inside task 1: the worker's client submits task 2 and pickles its
    // future into the result (hold), then drops the future (release).
    c.handle_submit(W_CLIENT, vec![nt(2, &[])]);
    c.handle_hold(t(1), &[t(2), t(2), t(99)]);
    c.handle_task_finished(WorkerId(0), t(1), 8, false, 10);
    c.handle_release(W_CLIENT, &[t(2)]);
    c.check_invariants();
    assert!(c.state(t(2)).is_some(), "held: not forgotten");
    c.handle_task_finished(WorkerId(0), t(2), 8, false, 10);
    c.take_actions();
    // The driver claims it from the result: told it is in memory.
    let unknown = c.handle_adopt(C, &[t(2), t(98)]);
    assert_eq!(unknown, vec![t(98)]);
    assert!(c.take_actions().contains(&Action::TaskMemory {
        client: C,
        task: t(2)
    }));
    c.check_invariants();
    // The driver drops the inner future: still held by the outer result.
    c.handle_release(C, &[t(2)]);
    c.check_invariants();
    assert!(matches!(c.state(t(2)), Some(TaskState::Memory { .. })));
    // The outer result goes: so does the inner one.
    c.handle_release(C, &[t(1)]);
    c.check_invariants();
    let a = c.take_actions();
    for id in [1, 2] {
        assert!(
            a.contains(&Action::ReleaseData {
                worker: Some(WorkerId(0)),
                task: t(id)
            }),
            "{a:?}"
        );
    }
    assert_eq!(c.n_tasks(), 0);
    // A hold by a result that is gone holds nothing.
    c.handle_submit(W_CLIENT, vec![nt(3, &[])]);
    c.handle_hold(t(1), &[t(3)]);
    c.handle_release(W_CLIENT, &[t(3)]);
    c.check_invariants();
    assert_eq!(c.n_tasks(), 0);
}

/// References nest: each result holds the task before it. Letting go of
/// the last holder releases the whole chain, without recursion.
#[test]
fn a_long_chain_of_held_results_is_released_at_once() {
    const W_CLIENT: ClientId = ClientId(7);
    let n = 10_000;
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    for i in 1..=n {
        c.handle_submit(if i == n { C } else { W_CLIENT }, vec![nt(i, &[])]);
        c.take_actions();
        c.handle_task_finished(WorkerId(0), t(i), 8, false, 10);
        if i > 1 {
            c.handle_hold(t(i), &[t(i - 1)]);
            c.handle_release(W_CLIENT, &[t(i - 1)]);
        }
    }
    assert_eq!(c.n_tasks(), n as usize);
    c.check_invariants();
    c.handle_release(C, &[t(n)]);
    c.check_invariants();
    assert_eq!(c.n_tasks(), 0);
}

/// A result that cannot be pickled stays on its worker: every task taking
/// it runs there, queued behind others rather than moved, and is not
/// stolen when that worker stalls.
#[test]
fn dependents_of_a_pinned_result_run_on_its_worker() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_worker_added(WorkerId(1), 1);
    c.handle_submit(C, vec![nt(1, &[])]);
    let w = computes(&c.take_actions())[0].0;
    c.handle_pinned(WorkerId(w), t(1));
    c.handle_task_finished(WorkerId(w), t(1), 8, false, 10);
    c.take_actions();
    // Four consumers: all go to the holder, though the other worker is idle.
    c.handle_submit(C, (2..6).map(|i| nt(i, &[1])).collect());
    c.check_invariants();
    let placed = computes(&c.take_actions());
    assert_eq!(placed.len(), 4, "{placed:?}");
    assert!(placed.iter().all(|&(x, _)| x == w), "{placed:?}");
    // The holder stalls: nothing is stolen from it.
    c.handle_worker_paused(WorkerId(w), true);
    c.check_invariants();
    assert!(steals(&c.take_actions()).is_empty());
    // Once the result leaves memory (released), the pin goes with it.
    c.handle_release(C, &[t(1), t(2), t(3), t(4), t(5)]);
    c.check_invariants();
    assert_eq!(c.n_tasks(), 0);
    c.check_invariants();
}

/// A task's record is what a million-task graph costs the scheduler: keep
/// it within a 144-byte allocation (with the allocator's 8-byte header).
#[test]
fn a_task_record_fits_in_136_bytes() {
    assert!(
        std::mem::size_of::<Task<()>>() <= 136,
        "{}",
        std::mem::size_of::<Task<()>>()
    );
}

fn killed(c: &Core, id: u64) -> bool {
    matches!(
        c.state(t(id)),
        Some(TaskState::Erred {
            kind: ErrorKind::KilledWorker(_),
            ..
        })
    )
}

/// A core whose tasks fail at their first kill, with tasks 1 to 3 sent to
/// worker 0 (two threads).
fn three_tasks_on_one_worker_that_may_die_once() -> Core {
    let mut c = Core::new(Config {
        max_kills: 1,
        log_capacity: 1000,
        ..Config::default()
    });
    c.handle_worker_added(WorkerId(0), 2);
    c.handle_submit(C, vec![nt(1, &[]), nt(2, &[]), nt(3, &[])]);
    c.take_actions();
    c
}

#[test]
fn a_worker_that_dies_between_tasks_blames_none_of_them() {
    let mut c = three_tasks_on_one_worker_that_may_die_once();
    // No start report came (the old rule would blame all three), but its
    // supervisor saw no task running: it died starting up or between tasks.
    c.handle_worker_dying(WorkerId(0));
    c.check_invariants();
    c.handle_worker_died(WorkerId(0), &[]);
    c.check_invariants();
    for id in 1..=3 {
        assert_eq!(c.state(t(id)), Some(TaskState::Ready), "task {id}");
    }
    let story: Vec<_> = c.story(t(1)).iter().map(|s| s.stimulus).collect();
    assert!(story.contains(&"worker-died"), "{story:?}");
}

#[test]
fn a_worker_that_dies_inside_a_task_blames_that_task_alone() {
    let mut c = three_tasks_on_one_worker_that_may_die_once();
    // Both reported started; the supervisor says only 2 was running (1
    // had ended, its report lost with the process).
    c.handle_tasks_started(WorkerId(0), &[t(1), t(2)]);
    c.handle_worker_died(WorkerId(0), &[(t(2), None), (t(99), None)]);
    c.check_invariants();
    assert!(killed(&c, 2));
    assert!(!killed(&c, 1) && !killed(&c, 3));
    // Without a start report too: `os._exit` before anything was sent.
    c.handle_worker_added(WorkerId(1), 2);
    c.take_actions();
    c.handle_worker_died(WorkerId(1), &[(t(3), None)]);
    assert!(killed(&c, 3));
    assert!(!killed(&c, 1));
    c.check_invariants();
}

#[test]
fn a_dying_worker_gets_no_work_while_its_supervisor_is_heard() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_worker_dying(WorkerId(0));
    c.handle_submit(C, vec![nt(1, &[])]);
    assert_eq!(computes(&c.take_actions()), vec![]);
    c.handle_worker_added(WorkerId(1), 1);
    assert_eq!(computes(&c.take_actions()), vec![(1, 1)]);
    // No word from the supervisor: the old rule, as for any lost worker.
    c.handle_worker_lost(WorkerId(0));
    c.check_invariants();
    assert_eq!(c.state(t(1)), Some(TaskState::Processing(WorkerId(1))));
}

#[test]
fn a_dying_workers_results_are_computed_again_at_once_not_fetched_from_it() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_submit(C, vec![nt(1, &[])]);
    c.take_actions();
    c.handle_task_finished(WorkerId(0), t(1), 1 << 20, false, 10);
    c.handle_worker_added(WorkerId(1), 1);
    c.take_actions();
    // Worker 0's connection closes; its supervisor has not spoken yet.
    c.handle_worker_dying(WorkerId(0));
    c.check_invariants();
    // Task 1's result went with it: it runs again on worker 1 now, and
    // task 2 waits for it instead of being sent to fetch from worker 0.
    c.handle_submit(C, vec![nt(2, &[1])]);
    let placed = computes(&c.take_actions());
    assert_eq!(
        placed,
        vec![(1, 1)],
        "task 1 again, on worker 1; task 2 waits"
    );
    assert_eq!(c.location(t(1)), None);
    c.handle_task_finished(WorkerId(1), t(1), 1 << 20, false, 10);
    assert_eq!(computes(&c.take_actions()), vec![(1, 2)]);
    // The obituary then blames nothing and changes nothing.
    c.handle_worker_died(WorkerId(0), &[]);
    c.check_invariants();
    assert_eq!(c.state(t(2)), Some(TaskState::Processing(WorkerId(1))));
}

#[test]
fn a_batch_fails_only_when_its_worker_dies_at_the_same_element() {
    let mut c = core(); // max_kills 3
    c.handle_submit(C, vec![nt(1, &[])]);
    let mut w = 0;
    let mut die_at = |c: &mut Core, item: u32| {
        c.handle_worker_added(WorkerId(w), 1);
        assert_eq!(computes(&c.take_actions()), vec![(w, 1)]);
        c.handle_worker_died(WorkerId(w), &[(t(1), Some(item))]);
        c.check_invariants();
        w += 1;
    };
    // Killed from outside at whatever element it had reached: never blamed
    // three times over.
    for item in [5, 9, 9, 40, 41, 300] {
        die_at(&mut c, item);
        assert!(!killed(&c, 1), "at element {item}");
    }
    // An element that kills its worker: three times at it, and it fails.
    die_at(&mut c, 77);
    die_at(&mut c, 77);
    assert!(!killed(&c, 1));
    die_at(&mut c, 77);
    assert!(killed(&c, 1));
}

#[test]
fn a_root_goes_beside_the_other_inputs_of_its_consumers() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_worker_added(WorkerId(1), 1);
    // A transpose's pairs: 7 reads roots 1 and 2, 8 reads 3 and 4, 9 reads
    // 5 and 6; one thread per worker. At first each worker takes one.
    let mut tasks: Vec<NewTask> = (1..=6).map(|i| nt(i, &[])).collect();
    tasks.extend([nt(7, &[1, 2]), nt(8, &[3, 4]), nt(9, &[5, 6])]);
    c.handle_submit(C, tasks);
    assert_eq!(computes(&c.take_actions()), vec![(0, 1), (1, 2)]);
    // Durations known (10 ms: one may wait behind each running task).
    // Worker 1 frees its thread and takes 3; 4 waits behind it there, not
    // on worker 0 (as load alone would have it, the first joined), where
    // 3 would have to be moved to (or 4 from).
    c.handle_task_finished(WorkerId(1), t(2), 8 << 20, false, 10_000);
    let a = computes(&c.take_actions());
    assert_eq!(&a[..2], [(1, 3), (1, 4)], "{a:?}");
    c.handle_task_finished(WorkerId(0), t(1), 8 << 20, false, 10_000);
    c.handle_task_finished(WorkerId(1), t(3), 8 << 20, false, 10_000);
    c.handle_task_finished(WorkerId(1), t(4), 8 << 20, false, 10_000);
    let a = computes(&c.take_actions());
    // 8's inputs are both on worker 1: it runs there.
    assert!(a.contains(&(1, 8)), "{a:?}");
    c.check_invariants();
}

#[test]
fn partners_run_side_by_side_while_a_worker_would_idle() {
    let mut c = core();
    c.handle_worker_added(WorkerId(0), 1);
    c.handle_worker_added(WorkerId(1), 1);
    // The two halves of a sum: waiting for one worker would halve the speed.
    c.handle_submit(C, vec![nt(1, &[]), nt(2, &[]), nt(3, &[1, 2])]);
    assert_eq!(computes(&c.take_actions()), vec![(0, 1), (1, 2)]);
    c.check_invariants();
    // With a thread free beside its partner, it runs there.
    let two_threads = |place_partners: bool| {
        let mut c = Core::new(Config {
            place_partners,
            ..Config::default()
        });
        c.handle_worker_added(WorkerId(0), 2);
        c.handle_worker_added(WorkerId(1), 2);
        c.handle_submit(C, vec![nt(1, &[]), nt(2, &[]), nt(3, &[1, 2])]);
        c.check_invariants();
        computes(&c.take_actions())
    };
    assert_eq!(two_threads(true), vec![(0, 1), (0, 2)]);
    // Turned off: by load alone.
    assert_eq!(two_threads(false), vec![(0, 1), (1, 2)]);
}

#[test]
fn a_root_waits_for_a_thread_beside_its_partner_unless_a_worker_would_idle() {
    // A transpose's pairs (7 reads roots 1 and 2, 8 reads 3 and 4, 9 reads
    // 5 and 6) of 10 ms tasks; one thread per worker.
    let pairs = || {
        let mut c = core();
        c.handle_worker_added(WorkerId(0), 1);
        c.handle_worker_added(WorkerId(1), 1);
        c.handle_submit(C, vec![nt(100, &[])]);
        c.take_actions();
        c.handle_task_finished(WorkerId(0), t(100), 8, false, 10_000);
        let mut tasks: Vec<NewTask> = (1..=6).map(|i| nt(i, &[])).collect();
        tasks.extend([nt(7, &[1, 2]), nt(8, &[3, 4]), nt(9, &[5, 6])]);
        c.handle_submit(C, tasks);
        // 2 waits for worker 0 while worker 1 takes 3 and 4; 6 waits too.
        assert_eq!(
            computes(&c.take_actions()),
            vec![(0, 1), (1, 3), (1, 4), (0, 5)]
        );
        c.handle_task_finished(WorkerId(0), t(1), 8 << 20, false, 10_000);
        assert_eq!(computes(&c.take_actions()), vec![(0, 2)]);
        // Worker 1 has a thread's worth queued, worker 0 two: 6 waits for
        // worker 0 rather than be moved to from there later.
        c.handle_task_finished(WorkerId(1), t(3), 8 << 20, false, 10_000);
        let a = computes(&c.take_actions());
        assert!(!a.iter().any(|&(_, task)| task == 6), "{a:?}");
        c.check_invariants();
        c
    };
    let mut c = pairs();
    c.handle_task_finished(WorkerId(0), t(5), 8 << 20, false, 10_000);
    let a = computes(&c.take_actions());
    assert!(a.contains(&(0, 6)), "{a:?}");
    c.check_invariants();
    // Rather than let a worker idle, it goes there.
    let mut c = pairs();
    c.handle_task_finished(WorkerId(1), t(4), 8 << 20, false, 10_000);
    assert_eq!(computes(&c.take_actions()), vec![(1, 8)]);
    c.handle_task_finished(WorkerId(1), t(8), 8, false, 10_000);
    let a = computes(&c.take_actions());
    assert!(a.contains(&(1, 6)), "{a:?}");
    c.check_invariants();
}
