//! The scheduler core on its own (no I/O): transitions per second for a
//! 1,000,000-task graph and bytes of scheduler memory per task.
//!
//!     cargo bench -p shoal-core --bench core
//!
//! The graph: 500,000 independent leaves reduced pairwise by a binary tree
//! (about 1,000,000 tasks). A simulated cluster of one-thread workers (64,
//! or the number given after `--`) finishes every task it is sent, at once.

use shoal_core::{Action, ClientId, Core, NewTask, TaskId, WorkerId};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: defers to the system allocator and only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn graph(leaves: u64) -> Vec<NewTask> {
    let mut tasks = Vec::new();
    let mut level: Vec<u64> = (0..leaves).collect();
    let mut next = leaves;
    tasks.extend((0..leaves).map(|i| NewTask {
        id: TaskId(i),
        deps: vec![],
        priority: 0,
        retries: 0,
        group: 0,
        resources: Vec::new(),
        threads: 1,
        recompute: true,
        max_kills: 0,
        time_request_us: 0,
    }));
    while level.len() > 1 {
        let mut up = Vec::new();
        for pair in level.chunks(2) {
            tasks.push(NewTask {
                id: TaskId(next),
                deps: pair.iter().map(|&d| TaskId(d)).collect(),
                priority: 0,
                retries: 0,
                group: 1,
                resources: Vec::new(),
                threads: 1,
                recompute: true,
                max_kills: 0,
                time_request_us: 0,
            });
            up.push(next);
            next += 1;
        }
        level = up;
    }
    tasks
}

fn main() {
    // `cargo bench -p shoal-core --bench core -- WORKERS` (default 64).
    let workers: u32 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(64);
    println!("workers:               {workers}");
    // Counted from before the graph is built: submitting consumes it.
    let before = LIVE.load(Ordering::Relaxed);
    let tasks = graph(500_000);
    let n = tasks.len();
    let root = TaskId(n as u64 - 1);
    let mut core = Core::default();
    let t0 = Instant::now();
    core.handle_submit(ClientId(1), tasks);
    // Everything but the root is released by the client, as a tree built
    // from futures that are dropped level by level would be.
    let ids: Vec<TaskId> = (0..n as u64 - 1).map(TaskId).collect();
    core.handle_release(ClientId(1), &ids);
    drop(ids);
    let submitted = t0.elapsed();
    let mem = LIVE.load(Ordering::Relaxed).saturating_sub(before);
    for w in 0..workers {
        core.handle_worker_added(WorkerId(w), 1);
    }
    let mut queue = Vec::new();
    let mut actions = Vec::new();
    loop {
        core.drain_actions_into(&mut actions);
        for a in actions.drain(..) {
            if let Action::Compute { worker, task } = a {
                queue.push((worker, task));
            }
        }
        let Some((w, t)) = queue.pop() else { break };
        core.handle_task_finished(w, t, 8, true, 5);
    }
    let total = t0.elapsed();
    assert!(matches!(
        core.state(root),
        Some(shoal_core::TaskState::Memory { .. })
    ));
    let tr = core.transitions();
    println!("tasks:                 {n}");
    println!("submit + release:      {:.3} s", submitted.as_secs_f64());
    println!("whole run:             {:.3} s", total.as_secs_f64());
    println!("transitions:           {tr}");
    println!(
        "transitions per second: {:.2} M",
        tr as f64 / total.as_secs_f64() / 1e6
    );
    println!(
        "tasks per second:      {:.2} M",
        n as f64 / total.as_secs_f64() / 1e6
    );
    println!("scheduler memory/task: {} bytes (after submit)", mem / n);
}
