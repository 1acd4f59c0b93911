use super::*;
use std::time::Duration;

/// What a million-task graph costs the scheduler besides the core.
#[test]
fn a_task_record_with_its_spec_fits_in_216_bytes() {
    // A 224-byte allocation with the allocator's header.
    let n = Core::<Kept>::record_size();
    assert!(n <= 216, "{n}");
    assert!(size_of::<Rare>() <= 48, "{}", size_of::<Rare>());
}

#[test]
fn a_function_pickle_is_kept_once_while_a_spec_uses_it() {
    let mut f = Funcs::default();
    let a = f.intern(Bytes::from_static(b"inc"));
    let again = f.intern(Bytes::copy_from_slice(b"inc"));
    assert!(Arc::ptr_eq(&a, &again), "one copy per pickle");
    drop(again);
    // Many distinct functions, each let go at once: swept as the table
    // grows, while one still used stays.
    for i in 0..1000u32 {
        drop(f.intern(Bytes::from(i.to_le_bytes().to_vec())));
    }
    assert!(f.table.len() < 200, "{} kept", f.table.len());
    assert!(Arc::ptr_eq(&f.intern(Bytes::from_static(b"inc")), &a));
}

/// A scheduler on the in-memory transport (no socket), and a client
/// connected to it; the directory is for the test's own files.
async fn serving(name: &str) -> (std::path::PathBuf, SchedulerHandle, Secret, net::Conn) {
    let dir = std::env::temp_dir().join(format!("shoal-{name}-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let secret = Secret::random();
    let h = start(
        &Address::Memory(format!("{name}-sched")),
        secret.clone(),
        None,
    )
    .await
    .unwrap();
    let (conn, _) = net::handshake(&h.address, Role::Client, &secret)
        .await
        .unwrap();
    (dir, h, secret, conn)
}

/// A client that stops reading (but still beats) is let go once more
/// than the backlog limit waits for it: its connection closes, what was
/// queued is freed, and the scheduler serves others.
#[tokio::test]
async fn a_client_that_does_not_read_is_let_go_when_its_backlog_is_over_the_limit() {
    let (dir, h, secret, conn) = serving("backlog").await;
    h.events.send(Event::PeerBacklog(256 << 10)).unwrap();
    let (tx, mut rx) = net::split_batched::<FromClient>(conn);
    for i in 0..20_000 {
        let path = "/api/status".to_string();
        tx.send(FromClient::Query { id: i, path }).unwrap();
    }
    // Alive all along: only the backlog can get it dropped.
    let beating = tx.clone();
    let beat = tokio::spawn(async move {
        while beating.send(FromClient::Alive).is_ok() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    tokio::time::sleep(Duration::from_secs(4)).await;
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        let mut answers = 0;
        loop {
            match rx.next().await {
                None | Some(Err(_)) => break answers,
                Some(Ok(frame)) => {
                    answers += net::decode_batch::<ToClient>(Ok(frame)).unwrap().len()
                }
            }
        }
    })
    .await
    .expect("the scheduler closed the connection");
    assert!(
        ended < 20_000,
        "all {ended} answers came: it was never behind"
    );
    beat.abort();
    // Others are served.
    let (conn, _) = net::handshake(&h.address, Role::Client, &secret)
        .await
        .unwrap();
    let (tx, mut rx) = net::split_batched::<FromClient>(conn);
    let path = "/api/status".to_string();
    tx.send(FromClient::Query { id: 1, path }).unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(frame) = rx.next().await {
            let msgs = net::decode_batch::<ToClient>(frame).unwrap();
            if msgs
                .iter()
                .any(|m| matches!(m, ToClient::QueryReply { .. }))
            {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(answered, Ok(true));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn big_messages_are_cut_into_pieces_in_order() {
    let mut queue = VecDeque::new();
    let ids: Vec<u64> = (0..10_000).collect();
    queue_pieces(&mut queue, FromClient::Release(ids), |m| Item::Client(1, m));
    queue_pieces(&mut queue, FromClient::Cancel(vec![7]), |m| {
        Item::Client(1, m)
    });
    let got: Vec<(usize, u64)> = queue
        .iter()
        .map(|i| match i {
            Item::Client(_, FromClient::Release(v) | FromClient::Cancel(v)) => (v.len(), v[0]),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(got, vec![(4096, 0), (4096, 4096), (1808, 8192), (1, 7)]);
}

/// A client joining while the owner works through another's huge
/// submission is served: its first messages are not taken for a
/// stranger's because its join waits in the queue behind that work.
#[tokio::test]
async fn a_client_joining_behind_a_huge_submission_is_served() {
    let (dir, h, secret, conn) = serving("joinbehind").await;
    let (tx, _rx) = net::split_batched::<FromClient>(conn);
    let specs: Vec<TaskSpec> = (1..=2_000_000u64).map(|i| task(1, i)).collect();
    // One message: cut into pieces on arrival, they fill the owner's
    // queue at once; the second client joins while it works.
    // Small messages, decoded at once, fill the owner's queue faster
    // than it works through it; the second client joins meanwhile.
    for chunk in specs.chunks(PIECE) {
        tx.send(FromClient::Submit(chunk.to_vec())).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (conn, _) = net::handshake(&h.address, Role::Client, &secret)
        .await
        .unwrap();
    let (tx2, mut rx2) = net::split_batched::<FromClient>(conn);
    tx2.send(FromClient::Query {
        id: 7,
        path: "/api/status".into(),
    })
    .unwrap();
    // It beats as a real client does: a slow machine must not have it let
    // go as silent while it waits.
    let beating = tx2.clone();
    let beat = tokio::spawn(async move {
        while beating.send(FromClient::Alive).is_ok() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let answered = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(frame) = rx2.next().await {
            let msgs = net::decode_batch::<ToClient>(frame).unwrap();
            if msgs
                .iter()
                .any(|m| matches!(m, ToClient::QueryReply { id: 7, .. }))
            {
                return true;
            }
        }
        false
    })
    .await;
    beat.abort();
    assert_eq!(answered, Ok(true), "the second client got its answer");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_panic_in_the_owner_stops_the_whole_scheduler_loudly() {
    let (dir, h, secret, conn) = serving("crash").await;
    let (_tx, mut from_scheduler) = net::split_batched::<FromClient>(conn);
    h.events.send(Event::Panic).unwrap();
    let why = tokio::time::timeout(Duration::from_secs(5), h.crashed())
        .await
        .expect("the crash is reported");
    assert!(why.contains("injected by a test"), "{why}");
    // Connected peers see their connection close (no silent zombie) ...
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match from_scheduler.next().await {
                None | Some(Err(_)) => break,
                Some(Ok(_)) => {} // a ping sent before the crash
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a client connection outlived the crash");
    // ... and nobody can connect to a scheduler that serves nothing.
    assert!(net::handshake(&h.address, Role::Client, &secret)
        .await
        .is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A random dashboard query path: a real route, or not, with parameter
/// strings made of escapes, multi-byte characters, huge numbers.
fn random_path(rng: &mut fastrand::Rng) -> String {
    const ROUTES: [&str; 8] = [
        "/api/status",
        "/api/graph",
        "/api/profile",
        "/api/logs",
        "/api/report",
        "/metrics",
        "/api/task/",
        "/api/nope",
    ];
    const PIECES: [&str; 16] = [
        "since=",
        "merge=",
        "group=",
        "since_us=",
        "%",
        "%a",
        "%ff",
        "\u{e9}",
        "\u{1f41f}",
        "&",
        "=",
        "+",
        "18446744073709551616",
        "-1",
        "0x10",
        "\0",
    ];
    let mut p = ROUTES[rng.usize(..ROUTES.len())].to_string();
    if p.ends_with('/') && rng.bool() {
        p.push_str(&rng.u64(..).to_string());
    }
    if rng.bool() {
        p.push('?');
    }
    for _ in 0..rng.usize(0..8) {
        if rng.u8(0..4) == 0 {
            p.push(rng.char(..));
        } else {
            p.push_str(PIECES[rng.usize(..PIECES.len())]);
        }
    }
    p
}

/// Hostile input from authenticated peers: random dashboard queries
/// (each answered, maybe with an error), then malformed, truncated and
/// oversized frames on other connections (each closes only its own
/// connection). The scheduler keeps serving the first client all along.
/// `SHOAL_FUZZ_SECS` bounds the query part (default 2 s).
#[tokio::test]
async fn hostile_queries_and_frames_after_the_handshake_leave_the_scheduler_serving() {
    use futures::SinkExt;
    let secs: f64 = std::env::var("SHOAL_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let (dir, h, secret, conn) = serving("hostile").await;
    let (tx, mut rx) = net::split_batched::<FromClient>(conn);
    let mut rng = fastrand::Rng::with_seed(7);
    // The next `n` query answers, skipping pings.
    async fn answers(
        rx: &mut (impl futures::Stream<Item = io::Result<bytes::BytesMut>> + Unpin),
        n: usize,
    ) -> Vec<String> {
        let mut got = Vec::new();
        while got.len() < n {
            let frame = tokio::time::timeout(Duration::from_secs(10), rx.next())
                .await
                .expect("the scheduler answers")
                .expect("the connection stays open");
            for m in net::decode_batch::<ToClient>(frame).unwrap() {
                if let ToClient::QueryReply { json, .. } = m {
                    got.push(json);
                }
            }
        }
        got
    }
    let deadline = std::time::Instant::now() + Duration::from_secs_f64(secs);
    let (mut tried, mut errors) = (0usize, 0usize);
    while std::time::Instant::now() < deadline {
        for i in 0..64 {
            let path = random_path(&mut rng);
            tx.send(FromClient::Query { id: i, path }).unwrap();
        }
        for json in answers(&mut rx, 64).await {
            let v: serde_json::Value = serde_json::from_str(&json).expect("JSON answers");
            errors += v.get("error").is_some() as usize;
        }
        tried += 64;
    }
    assert!(errors > 0 && errors < tried, "{errors} of {tried}");
    // Frames no decoder accepts, each on its own authenticated connection.
    let mut bad: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xff; 16],
        vec![
            0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ],
        shoal_proto::encode(&vec![FromClient::Release(vec![1, 2, 3])])[..3].to_vec(),
    ];
    bad.extend((0..12).map(|_| (0..rng.usize(1..200)).map(|_| rng.u8(..)).collect()));
    for (i, body) in bad.into_iter().enumerate() {
        let (mut conn, _) = net::handshake(&h.address, Role::Client, &secret)
            .await
            .unwrap();
        let _ = conn.send(bytes::Bytes::from(body)).await;
        if i % 2 == 0 {
            // Truncated: a length prefix promising more than comes.
            let raw = conn.get_mut();
            let _ = tokio::io::AsyncWriteExt::write_all(raw, &[0, 0, 1, 0, 1, 2]).await;
        }
        drop(conn);
    }
    // Still serving: the first client's queries are answered.
    tx.send(FromClient::Query {
        id: 1,
        path: "/api/status".into(),
    })
    .unwrap();
    let json = answers(&mut rx, 1).await.pop().unwrap();
    assert!(json.contains("\"workers\""), "{json}");
    println!("hostile: {tried} random queries ({errors} refused), 16 bad frames");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- The scheduler's glue through the in-memory transport: peers speak
// the protocol as real clients and workers do, with no socket.

/// A peer of the scheduler speaking the protocol by hand: it sends `O`
/// and receives `I` (a client or a worker).
struct Peer<O, I> {
    id: u32,
    tx: net::Outbox<O>,
    rx: futures::stream::SplitStream<net::Conn>,
    seen: VecDeque<I>,
}

type ClientPeer = Peer<FromClient, ToClient>;
type WorkerPeer = Peer<FromWorker, ToWorker>;

impl<O, I> Peer<O, I>
where
    O: serde::Serialize + net::Weigh + Send + 'static,
    I: serde::de::DeserializeOwned,
{
    async fn join(addr: &Address, role: Role, secret: &Secret) -> Self {
        let (conn, id) = net::handshake(addr, role, secret).await.unwrap();
        let (tx, rx) = net::split_batched::<O>(conn);
        Peer {
            id,
            tx,
            rx,
            seen: VecDeque::new(),
        }
    }

    fn send(&self, m: O) {
        self.tx.send(m).unwrap();
    }

    /// The next message that `want` picks (others are skipped), or None
    /// after `secs`.
    async fn next(&mut self, secs: f64, want: impl Fn(&I) -> bool) -> Option<I> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(secs);
        loop {
            while let Some(m) = self.seen.pop_front() {
                if want(&m) {
                    return Some(m);
                }
            }
            let frame = tokio::time::timeout_at(deadline, self.rx.next())
                .await
                .ok()??;
            self.seen.extend(net::decode_batch::<I>(frame).ok()?);
        }
    }
}

impl WorkerPeer {
    /// Task ids of the next `n` `Compute` orders.
    async fn computes(&mut self, n: usize) -> Vec<u64> {
        let mut ids = Vec::new();
        while ids.len() < n {
            match self
                .next(10.0, |m| matches!(m, ToWorker::Compute { .. }))
                .await
            {
                Some(ToWorker::Compute { id, .. }) => ids.push(id),
                _ => panic!("only {} of {n} tasks were sent", ids.len()),
            }
        }
        ids
    }

    fn finished(&self, id: u64) {
        self.send(FromWorker::Finished {
            id,
            size: 1,
            value: Some(Bytes::from_static(b"1")),
            timing: shoal_proto::Timing::default(),
        });
    }
}

fn worker_role(name: &str, nthreads: u32) -> Role {
    Role::Worker {
        nthreads,
        data_addr: format!("mem://{name}-data"),
        name: name.to_string(),
        pid: std::process::id(),
        resources: Vec::new(),
        lifetime_end_us: 0,
        supervisor: 0,
    }
}

fn task(client: u32, n: u64) -> TaskSpec {
    TaskSpec {
        id: (u64::from(client) << 40) | n,
        group: "inc".into(),
        key: None,
        kind: shoal_proto::TaskKind::Call,
        func: Bytes::from_static(b"f"),
        args: Bytes::from_static(b"a"),
        deps: Vec::new(),
        priority: 0,
        retries: 0,
        resources: Vec::new(),
        recompute: true,
        time_limit_ms: 0,
        crash_limit: 0,
        time_request_ms: 0,
    }
}

async fn cluster(name: &str) -> (SchedulerHandle, Secret, ClientPeer) {
    let secret = Secret::random();
    let h = start(
        &Address::Memory(format!("{name}-sched")),
        secret.clone(),
        None,
    )
    .await
    .unwrap();
    let client = ClientPeer::join(&h.address, Role::Client, &secret).await;
    (h, secret, client)
}

fn memory_of(m: &ToClient) -> Option<u64> {
    match m {
        ToClient::Memory { id, .. } => Some(*id),
        _ => None,
    }
}

/// A worker whose connection is lost in the middle of a batch (one task
/// started, others queued): every task runs again on another worker, and
/// the client hears of each exactly once.
#[tokio::test]
async fn a_worker_lost_mid_batch_has_its_tasks_run_elsewhere() {
    let (h, secret, mut client) = cluster("midbatch").await;
    let mut a = WorkerPeer::join(&h.address, worker_role("a", 1), &secret).await;
    let cid = client.id;
    client.send(FromClient::Submit((1..=4).map(|n| task(cid, n)).collect()));
    let first = a.computes(1).await;
    a.send(FromWorker::Started(first.clone()));
    a.finished(first[0]);
    let more = a.computes(1).await; // the next one, started, then the line drops
    a.send(FromWorker::Started(more.clone()));
    drop(a);
    let mut b = WorkerPeer::join(&h.address, worker_role("b", 4), &secret).await;
    let mut rest = b.computes(3).await;
    rest.sort_unstable();
    let mut want: Vec<u64> = (1..=4)
        .map(|n| task(cid, n).id)
        .filter(|&t| t != first[0])
        .collect();
    want.sort_unstable();
    assert_eq!(rest, want, "the unfinished tasks go to the other worker");
    for &t in &rest {
        b.finished(t);
    }
    let mut heard = Vec::new();
    while let Some(m) = client.next(1.0, |m| memory_of(m).is_some()).await {
        heard.push(memory_of(&m).unwrap());
    }
    heard.sort_unstable();
    let mut all: Vec<u64> = (1..=4).map(|n| task(cid, n).id).collect();
    all.sort_unstable();
    assert_eq!(heard, all, "each result once");
    h.stop();
}

/// A report sent twice, a report for a task the worker was never given,
/// and a report arriving after the task was placed elsewhere change
/// nothing: the client hears of each task once, and the scheduler serves on.
#[tokio::test]
async fn duplicate_and_late_reports_are_ignored() {
    let (h, secret, mut client) = cluster("dupes").await;
    let mut a = WorkerPeer::join(&h.address, worker_role("a", 1), &secret).await;
    let cid = client.id;
    client.send(FromClient::Submit(vec![task(cid, 1)]));
    let t = a.computes(1).await[0];
    a.send(FromWorker::Started(vec![t]));
    a.finished(t);
    a.finished(t); // duplicate
    a.finished(task(cid, 77).id); // never submitted
    a.send(FromWorker::Started(vec![task(cid, 78).id]));
    let mut heard = 0;
    while client
        .next(1.0, |m| memory_of(m) == Some(t))
        .await
        .is_some()
    {
        heard += 1;
    }
    assert_eq!(heard, 1);
    // Still serving: a new task runs.
    client.send(FromClient::Submit(vec![task(cid, 2)]));
    let t2 = a.computes(1).await[0];
    a.finished(t2);
    assert!(client
        .next(5.0, |m| memory_of(m) == Some(t2))
        .await
        .is_some());
    h.stop();
}

/// A worker that reconnects (a new connection, as after a network cut)
/// is a new worker: the tasks of the old one run there, and a late report
/// on the old connection's behalf is not taken as theirs twice.
#[tokio::test]
async fn a_worker_that_reconnects_gets_the_lost_work_again() {
    let (h, secret, mut client) = cluster("reconnect").await;
    let mut a = WorkerPeer::join(&h.address, worker_role("w", 2), &secret).await;
    let cid = client.id;
    client.send(FromClient::Submit(vec![task(cid, 1), task(cid, 2)]));
    let mut ids = a.computes(2).await;
    ids.sort_unstable();
    drop(a);
    let mut again = WorkerPeer::join(&h.address, worker_role("w", 2), &secret).await;
    let mut resent = again.computes(2).await;
    resent.sort_unstable();
    assert_eq!(resent, ids);
    for &t in &resent {
        again.finished(t);
    }
    for &t in &ids {
        assert!(client
            .next(5.0, |m| memory_of(m) == Some(t))
            .await
            .is_some());
    }
    h.stop();
}

fn reply_of(m: &ToClient, want: u64) -> Option<serde_json::Value> {
    match m {
        ToClient::QueryReply { id, json } if *id == want => serde_json::from_str(json).ok(),
        _ => None,
    }
}

/// A task's detail carries the steps of the workers it was sent to, asked
/// of them when a client looks; a worker that does not answer delays the
/// detail by at most half a second and is named as missing.
#[tokio::test]
async fn a_tasks_detail_has_its_workers_steps_and_names_a_silent_one() {
    let (h, secret, mut client) = cluster("stories").await;
    let mut a = WorkerPeer::join(&h.address, worker_role("a", 1), &secret).await;
    let cid = client.id;
    client.send(FromClient::Submit(vec![task(cid, 1)]));
    let t = a.computes(1).await[0];
    let path = format!("/api/task/{t}");
    client.send(FromClient::Query {
        id: 7,
        path: path.clone(),
    });
    let asked = a.next(5.0, |m| matches!(m, ToWorker::Story { .. })).await;
    let Some(ToWorker::Story { query, task: of }) = asked else {
        panic!("the worker was not asked: {asked:?}");
    };
    assert_eq!(of, t);
    let step = shoal_proto::WorkerStep {
        attempt: 1,
        event: "start".into(),
        phase: Some("running".into()),
        at_us: 5,
    };
    a.send(FromWorker::Story {
        query,
        steps: vec![step],
    });
    let got = client.next(5.0, |m| reply_of(m, 7).is_some()).await;
    let detail = reply_of(&got.expect("answered"), 7).unwrap();
    assert_eq!(detail["worker_story"]["a"][0]["event"], "start", "{detail}");
    assert!(detail["story"].as_array().is_some_and(|s| !s.is_empty()));
    // A worker that says nothing: answered without it, naming it.
    let started = std::time::Instant::now();
    client.send(FromClient::Query { id: 8, path });
    let got = client.next(5.0, |m| reply_of(m, 8).is_some()).await;
    let detail = reply_of(&got.expect("answered anyway"), 8).unwrap();
    assert_eq!(
        detail["worker_story_missing"],
        serde_json::json!(["a"]),
        "{detail}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    // Unknown tasks and bad ids are errors, answered at once.
    client.send(FromClient::Query {
        id: 9,
        path: "/api/task/1".into(),
    });
    let got = client.next(5.0, |m| reply_of(m, 9).is_some()).await;
    assert!(reply_of(&got.unwrap(), 9).unwrap()["error"].is_string());
    h.stop();
}
