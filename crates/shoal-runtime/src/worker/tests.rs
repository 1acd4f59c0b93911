//! The worker's glue through the in-memory transport, against a scripted
//! scheduler: orders reach the execution side, reports reach the
//! scheduler, steals give back what has not started, an input that cannot
//! be fetched is reported rather than run without, and a worker in a
//! client's process whose scheduler goes away stops its threads instead of
//! ending the process.

use super::*;
use crate::net::{Conn, Listener};
use futures::stream::SplitStream;

fn compute(id: u64) -> ToWorker {
    ToWorker::Compute {
        id,
        name: format!("inc-{id:x}"),
        group: "inc".into(),
        kind: TaskKind::Call,
        func: Bytes::from_static(b"f"),
        args: Bytes::from_static(b"a"),
        deps: Vec::new(),
        resources: Vec::new(),
        time_limit_ms: 0,
        job: 0,
        careful: false,
        resume: Vec::new(),
    }
}

/// Messages from the worker until `want` picks one (or 10 s pass).
async fn until(rx: &mut SplitStream<Conn>, want: impl Fn(&FromWorker) -> bool) -> Vec<FromWorker> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let frame = tokio::time::timeout_at(deadline, rx.next())
            .await
            .expect("the worker said it in time")
            .expect("the worker is connected");
        for m in net::decode_batch::<FromWorker>(frame).unwrap() {
            let done = want(&m);
            seen.push(m);
            if done {
                return seen;
            }
        }
    }
}

/// The ids the worker reported started, in order.
fn started(seen: &[FromWorker]) -> Vec<u64> {
    seen.iter()
        .flat_map(|m| match m {
            FromWorker::Started(ids) => ids.clone(),
            _ => Vec::new(),
        })
        .collect()
}

/// A scripted scheduler's end of one in-process worker's connection.
struct Glue {
    rt: tokio::runtime::Runtime,
    sh: Arc<WorkerShared>,
    listener: Listener,
    tx: net::Outbox<ToWorker>,
    rx: SplitStream<Conn>,
    hello: shoal_proto::Hello,
}

/// Starts a worker with `nthreads` threads against a scheduler that
/// accepts it as worker 7.
fn glue(name: &str, nthreads: u32) -> Glue {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let addr = Address::Memory(format!("worker-glue-{name}-{}", std::process::id()));
    let secret = Secret::random();
    let listener = rt.block_on(Listener::bind(&addr)).unwrap();
    let theirs = secret.clone();
    let scheduler = rt.spawn(async move {
        let (incoming, peer) = listener.accept().await;
        let (mut conn, hello) = incoming.authenticate(&theirs, &peer).await.unwrap();
        net::send(&mut conn, &Welcome::Accepted { id: 7 })
            .await
            .unwrap();
        let (tx, rx) = net::split_batched::<ToWorker>(conn);
        (listener, tx, rx, hello)
    });
    let sh = start(&rt, &addr, nthreads, name, Vec::new(), secret, true).unwrap();
    let (listener, tx, rx, hello) = rt.block_on(scheduler).unwrap();
    Glue {
        rt,
        sh,
        listener,
        tx,
        rx,
        hello,
    }
}

/// The ids of the next work the execution side takes (one at a time).
fn take(sh: &WorkerShared) -> Vec<u64> {
    match sh.wait_next(1, Duration::from_secs(10)) {
        Batch::Work(tasks, _) => tasks.iter().map(|t| t.id).collect(),
        _ => panic!("no work came"),
    }
}

#[test]
fn a_steal_gives_back_what_has_not_started_and_an_unfetchable_input_is_reported() {
    let Glue {
        rt, sh, tx, mut rx, ..
    } = glue("steal", 1);
    for id in 1..=3 {
        tx.send(compute(id)).unwrap();
    }
    assert_eq!(take(&sh), [1]);
    // 1 runs; 2 and 3 wait. A steal of all three gets back only those two.
    tx.send(ToWorker::Steal(vec![1, 2, 3])).unwrap();
    let seen = rt.block_on(until(&mut rx, |m| matches!(m, FromWorker::Stolen(_))));
    let Some(FromWorker::Stolen(mut given)) = seen.last().cloned() else {
        unreachable!()
    };
    given.sort_unstable();
    assert_eq!(given, [2, 3], "{seen:?}");
    // A cancel of a task it never had changes nothing; new work still runs.
    tx.send(ToWorker::Cancel(99)).unwrap();
    tx.send(compute(4)).unwrap();
    assert_eq!(take(&sh), [4], "stolen tasks never run here");
    // An input whose holder left names no address (the scheduler's rule):
    // after its retries the task is reported, never handed over without it.
    let mut t = compute(5);
    if let ToWorker::Compute { deps, .. } = &mut t {
        deps.push(Dep {
            id: 40,
            source: DepSource::Worker {
                id: 99,
                addr: String::new(),
            },
        });
    }
    tx.send(t).unwrap();
    let seen = rt.block_on(until(&mut rx, |m| {
        matches!(m, FromWorker::FetchFailed { task: 5, .. })
    }));
    assert!(
        matches!(seen.last(), Some(FromWorker::FetchFailed { deps, .. }) if deps == &[40]),
        "{seen:?}"
    );
    assert!(
        matches!(sh.wait_next(1, Duration::from_millis(200)), Batch::Work(ref w, _) if w.is_empty()),
        "the task without its input is not run"
    );
}

#[test]
fn orders_run_reports_arrive_and_a_lost_scheduler_stops_an_in_process_worker() {
    let Glue {
        rt,
        sh,
        listener,
        tx,
        mut rx,
        hello,
    } = glue("orders", 2);
    assert!(matches!(hello.role, Role::Worker { nthreads: 2, .. }));
    assert_eq!(sh.id(), 7);

    tx.send(compute(1)).unwrap();
    tx.send(compute(2)).unwrap();
    let mut ran = Vec::new();
    while ran.len() < 2 {
        match sh.wait_next(1, Duration::from_secs(10)) {
            Batch::Work(tasks, _) => ran.extend(tasks.iter().map(|t| t.id)),
            _ => panic!("no work came"),
        }
    }
    ran.sort_unstable();
    assert_eq!(ran, [1, 2], "each order once, in its own take");
    for id in ran {
        sh.report(vec![Done::Ok {
            id,
            value: Bytes::from_static(b"v"),
            timing: Timing::default(),
        }]);
    }
    sh.flush();
    let seen = rt.block_on(until(&mut rx, |m| {
        matches!(m, FromWorker::Finished { id: 2, .. })
    }));
    let started = started(&seen);
    assert!(started.contains(&1) && started.contains(&2), "{seen:?}");
    let finished = seen
        .iter()
        .filter(|m| matches!(m, FromWorker::Finished { .. }))
        .count();
    assert_eq!(finished, 2, "{seen:?}");

    // The scheduler goes away: the execution side is told to stop (a
    // worker process would exit; this one lives in the test's process).
    drop((tx, rx, listener));
    let stopped =
        (0..100).any(|_| matches!(sh.wait_next(1, Duration::from_millis(100)), Batch::Shutdown));
    assert!(
        stopped,
        "an in-process worker stops when its scheduler is gone"
    );
}

#[test]
fn after_a_task_of_flush_after_or_more_its_report_goes_when_the_next_is_taken() {
    let Glue {
        rt, sh, tx, mut rx, ..
    } = glue("eager", 1);
    for id in 1..=3 {
        tx.send(compute(id)).unwrap();
    }
    assert_eq!(take(&sh), [1]);
    std::thread::sleep(Duration::from_millis(300)); // 2 and 3 arrive
    let done = |id, duration_us| {
        vec![Done::Ok {
            id,
            value: Bytes::from_static(b"v"),
            timing: Timing {
                duration_us,
                ..Timing::default()
            },
        }]
    };
    let next = |b: Option<Batch>| match b {
        Some(Batch::Work(tasks, _)) => tasks.iter().map(|t| t.id).collect::<Vec<_>>(),
        _ => panic!("queued work was not taken"),
    };
    // A short task: its report waits for others to travel with (the
    // flusher sends it within FLUSH_AFTER).
    let t = Instant::now();
    assert_eq!(next(sh.report_and_take(done(1, 100), 1)), [2]);
    let buffered = sh.unsent.lock().since.is_some();
    assert!(buffered || t.elapsed() >= FLUSH_AFTER, "buffered");
    // A long one: nothing would travel with it; it goes at once, with the
    // next task's start.
    assert_eq!(next(sh.report_and_take(done(2, 5_000), 1)), [3]);
    assert!(sh.unsent.lock().since.is_none(), "sent");
    let seen = rt.block_on(until(&mut rx, |m| {
        matches!(m, FromWorker::Finished { id: 2, .. })
    }));
    let started = started(&seen);
    assert_eq!(started, [1, 2, 3], "{seen:?}");
}
