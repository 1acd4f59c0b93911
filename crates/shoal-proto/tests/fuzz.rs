//! Fuzzes the protocol decoder on stable Rust: valid frames of every
//! message type, mutated (bits flipped, bytes set to varint extremes,
//! truncated, spliced, extended) and plain random bytes, decoded as every
//! type a peer may receive. Every input must decode or fail cleanly, with
//! no panic and no allocation out of proportion to its size (a length
//! prefix must not make the decoder reserve memory the frame does not
//! hold).
//!
//! `SHOAL_FUZZ_SECS` bounds the run (default 3 s, what CI runs); a long run
//! prints how many inputs it tried: `SHOAL_FUZZ_SECS=300 cargo test -p
//! shoal-proto --release --test fuzz -- --nocapture`.

use bytes::Bytes;
use shoal_proto::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Counts the largest single allocation, to catch huge reservations.
struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        LARGEST.fetch_max(new, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn spec(i: u64) -> TaskSpec {
    TaskSpec {
        id: i << 40 | 7,
        group: "inc".into(),
        key: (i % 2 == 0).then(|| format!("key-{i}")),
        kind: match i % 4 {
            0 => TaskKind::Batch,
            1 => TaskKind::Command,
            _ => TaskKind::Call,
        },
        func: Bytes::from_static(b"\x80\x05func"),
        args: Bytes::from(vec![i as u8; (i as usize * 37) % 300]),
        deps: (0..i % 4).collect(),
        priority: -(i as i32),
        retries: 2,
        resources: vec![("GPU".into(), 0.5)],
        recompute: i % 5 != 0,
        time_limit_ms: i * 1000,
        crash_limit: (i % 3) as u8,
        time_request_ms: i * 60_000,
    }
}

/// Valid frame bodies: batches of each direction's messages, handshakes,
/// data requests and replies.
fn corpus() -> Vec<Vec<u8>> {
    let role = Role::Worker {
        nthreads: 4,
        data_addr: "tcp://10.0.0.1:4000".into(),
        name: "w-1".into(),
        pid: 42,
        resources: vec![("GPU".into(), 2.0)],
        lifetime_end_us: 1_800_000_000_000_000,
        supervisor: 7,
    };
    let client: Vec<FromClient> = vec![
        FromClient::Submit((0..5).map(spec).collect()),
        FromClient::Release(vec![1, 2, u64::MAX]),
        FromClient::Cancel(vec![3]),
        FromClient::Detach(vec![4]),
        FromClient::Query {
            id: 1,
            path: "/api/status?since=3".into(),
        },
        FromClient::SubmitJob {
            more: false,
            query: 3,
            name: "sim".into(),
            max_fails: 2,
            tasks: (0..3).map(spec).collect(),
        },
        FromClient::CancelJob { query: 4, job: 1 },
        FromClient::Resume(7),
        FromClient::Resubmit(vec![
            (spec(1), None),
            (spec(2), Some(Bytes::from_static(b"v"))),
        ]),
        FromClient::Hold {
            by: 1,
            tasks: vec![2, 3],
        },
        FromClient::Adopt(vec![2]),
    ];
    let worker: Vec<FromWorker> = vec![
        FromWorker::Finished {
            id: 9,
            size: 100,
            value: Some(Bytes::from_static(b"value")),
            timing: Timing::default(),
        },
        FromWorker::Failed {
            id: 9,
            error: Bytes::from_static(b"err"),
            text: "ValueError".into(),
            timing: Timing::default(),
        },
        FromWorker::Started(vec![1, 2]),
        FromWorker::FetchFailed {
            task: 1,
            deps: vec![2],
        },
        FromWorker::Heartbeat(WorkerMetrics::default()),
        FromWorker::Telemetry(Telemetry {
            activity: vec![],
            profile: vec![("g".into(), "a;b".into(), 3)],
            logs: vec!["line".into()],
        }),
        FromWorker::Synced(5),
        FromWorker::RestartMe,
        FromWorker::Rejoin {
            running: vec![1, 2],
            reports: vec![FromWorker::Finished {
                id: 3,
                size: 1,
                value: Some(Bytes::from_static(b"v")),
                timing: Timing::default(),
            }],
            held: vec![(4, 100)],
        },
        FromWorker::Pinned(3),
    ];
    let to_worker: Vec<ToWorker> = vec![
        ToWorker::Compute {
            id: 1,
            name: "inc-1".into(),
            group: "inc".into(),
            kind: TaskKind::Call,
            func: Bytes::from_static(b"f"),
            args: Bytes::from_static(b"a"),
            deps: vec![
                Dep {
                    id: 2,
                    source: DepSource::Inline(Bytes::from_static(b"x")),
                },
                Dep {
                    id: 3,
                    source: DepSource::Worker {
                        id: 1,
                        addr: "unix:///tmp/w.sock".into(),
                    },
                },
            ],
            resources: vec![],
            time_limit_ms: 5000,
            job: 2,
            careful: true,
            resume: vec![Bytes::from_static(b"p")],
        },
        ToWorker::Stop(7),
        ToWorker::Ack(12),
        ToWorker::Steal(vec![1, 2, 3]),
        ToWorker::Sync(1),
        ToWorker::Ping,
    ];
    let to_client: Vec<ToClient> = vec![
        ToClient::Erred {
            id: 1,
            error: TaskError::Cycle { cause: "x".into() },
        },
        ToClient::Ping,
    ];
    let mut out = vec![
        encode(&client),
        encode(&worker),
        encode(&to_worker),
        encode(&to_client),
        encode(&Hello::new(role, [7; 32])),
        encode(&Hello::new(
            Role::Obituary {
                supervisor: 7,
                pid: 42,
                running: vec![(1, None), (2, Some(3))],
            },
            [7; 32],
        )),
        encode(&Hello::new(Role::Client, [0; 32])),
        encode(&Proof { mac: [1; 32] }),
        encode(&Welcome::Challenge {
            nonce: [2; 32],
            proof: [3; 32],
        }),
        encode(&DataRequest {
            ids: vec![1, 2],
            host: "h/boot".into(),
        }),
        encode(&DataReply {
            items: vec![
                (1, Some(Payload::Bytes(Bytes::from_static(b"abc")))),
                (4, Some(Payload::Follows(3))),
                (
                    2,
                    Some(Payload::File {
                        path: "/dev/shm/x".into(),
                        len: 3,
                    }),
                ),
                (3, None),
            ],
        }),
    ];
    for m in client {
        out.push(encode(&vec![m]));
    }
    for m in worker {
        out.push(encode(&vec![m]));
    }
    out
}

/// Decodes `body` as every type a peer receives; returns how many decoded.
fn decode_all(body: &[u8]) -> usize {
    let ok = [
        decode::<Vec<FromClient>>(body).is_ok(),
        decode::<Vec<FromWorker>>(body).is_ok(),
        decode::<Vec<ToClient>>(body).is_ok(),
        decode::<Vec<ToWorker>>(body).is_ok(),
        decode::<Hello>(body).is_ok(),
        decode::<Proof>(body).is_ok(),
        decode::<Welcome>(body).is_ok(),
        decode::<DataRequest>(body).is_ok(),
        decode::<DataReply>(body).is_ok(),
    ];
    ok.iter().filter(|&&x| x).count()
}

fn mutate(rng: &mut fastrand::Rng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..rng.usize(1..4) {
        if b.is_empty() {
            b.push(rng.u8(..));
            continue;
        }
        let i = rng.usize(..b.len());
        match rng.u8(0..7) {
            0 => b[i] ^= 1 << rng.u8(0..8),
            1 => b[i] = [0x00, 0x7f, 0x80, 0xff][rng.usize(0..4)],
            2 => b.truncate(i),
            3 => {
                // A varint as large as it goes: a huge length prefix.
                let big = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
                b.splice(i..i, big);
            }
            4 => {
                let j = rng.usize(i..b.len());
                let chunk = b[i..j].to_vec();
                b.splice(j..j, chunk);
            }
            5 => b.insert(i, rng.u8(..)),
            _ => {
                b.remove(i);
            }
        }
    }
    b
}

#[test]
fn the_decoder_survives_mutated_and_random_frames() {
    let secs: f64 = std::env::var("SHOAL_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let corpus = corpus();
    for body in &corpus {
        assert!(decode_all(body) >= 1, "a valid frame must decode");
    }
    let seed = std::env::var("SHOAL_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    let mut rng = fastrand::Rng::with_seed(seed);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let (mut tried, mut decoded) = (0u64, 0u64);
    while Instant::now() < deadline {
        for _ in 0..256 {
            let body = if rng.u8(0..10) == 0 {
                (0..rng.usize(0..64)).map(|_| rng.u8(..)).collect()
            } else {
                let i = rng.usize(..corpus.len());
                mutate(&mut rng, &corpus[i])
            };
            LARGEST.store(0, Ordering::Relaxed);
            decoded += decode_all(&body) as u64;
            let largest = LARGEST.load(Ordering::Relaxed);
            // Decoded values may hold copies of the input's bytes and
            // strings, with some overhead: never more than this.
            assert!(
                largest <= 64 * body.len() + (1 << 20),
                "a {}-byte frame made the decoder allocate {largest} bytes at once: {body:02x?}",
                body.len()
            );
            tried += 1;
        }
    }
    println!("fuzz: {tried} inputs in {secs} s (seed {seed}), {decoded} decodings, 0 panics");
}
