use super::*;

/// A stream read a few KiB at a time arrives whole through a read-ahead
/// buffer, which exists only while data streams and goes once the
/// stream slows.
#[tokio::test]
async fn read_ahead_streams_in_large_reads_and_lets_its_buffer_go() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
    let (mut tx, mut rx) = (a.expect("connect"), ReadAhead::new(b.expect("accept").0));
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        tx.write_all(&sent).await.expect("write");
        tx
    });
    let mut got = Vec::new();
    let mut piece = [0u8; 4096];
    let mut buffered = false;
    while got.len() < data.len() {
        let n = rx.read(&mut piece).await.expect("read");
        assert!(n > 0);
        got.extend_from_slice(&piece[..n]);
        buffered |= !rx.buf.is_empty();
    }
    assert!(got == data, "the stream arrived changed");
    assert!(buffered, "a bulk stream was never read ahead");
    let mut tx = writer.await.expect("writer");
    tx.write_all(b"ping").await.expect("write");
    let mut four = [0u8; 4];
    rx.read_exact(&mut four).await.expect("read");
    assert_eq!(&four, b"ping");
    assert!(rx.buf.is_empty(), "a slowed stream kept its buffer");
    drop(tx);
    assert_eq!(rx.read(&mut piece).await.expect("eof"), 0);
}

/// A file's first bytes as a frame: from the blocking pool over a socket,
/// from the I/O thread over anything else; a message after it still arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// The pool's lock only orders tests sharing the process-wide pool.
#[allow(clippy::await_holding_lock)]
async fn a_file_is_sent_as_a_raw_frame_over_a_socket_and_otherwise() {
    let _pool = crate::bufpool::TEST_LOCK.lock();
    let data: Vec<u8> = (0..9_000_000u32).map(|i| (i % 253) as u8).collect();
    let path = std::env::temp_dir().join(format!("shoal-send-file-{}", std::process::id()));
    std::fs::write(&path, &data).expect("write");
    let file = std::fs::File::open(&path).expect("open");
    std::fs::remove_file(&path).expect("unlink"); // open files stay whole

    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
    let pairs: Vec<(Box<dyn Stream>, Box<dyn Stream>)> = vec![
        (
            Box::new(a.expect("connect")),
            Box::new(b.expect("accept").0),
        ),
        {
            let (a, b) = tokio::io::duplex(64 * 1024);
            (Box::new(a), Box::new(b))
        },
    ];
    for (i, (a, b)) in pairs.into_iter().enumerate() {
        assert_eq!(a.plain_fd().is_some(), i == 0);
        let (mut tx, mut rx) = (framed(a), framed(b));
        authenticated(&mut tx);
        authenticated(&mut rx);
        let f = file.try_clone().expect("dup");
        let n = 7_000_001;
        let (g, h) = (f.try_clone().expect("dup"), f.try_clone().expect("dup"));
        let writer = tokio::spawn(async move {
            send(&mut tx, &1u32).await.unwrap();
            let parts = vec![
                RawPart::File(f, n as u64),
                RawPart::Bytes(Bytes::from_static(b"between")),
                RawPart::Gather(vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cde")]),
                RawPart::File(g, 10),
            ];
            send_raw_parts(&mut tx, parts).await.unwrap();
            send(&mut tx, &2u32).await.unwrap();
            // Longer than the file: refused before anything is sent.
            let f = RawPart::File(h, 9_000_001);
            assert!(send_raw_parts(&mut tx, vec![f]).await.is_err());
            tx
        });
        assert_eq!(recv::<u32>(&mut rx).await.unwrap(), Some(1));
        let got = recv_raw(&mut rx, n).await.unwrap();
        assert!(got[..] == data[..n], "stream {i}: the file's first bytes");
        assert_eq!(&recv_raw(&mut rx, 7).await.unwrap()[..], b"between");
        assert_eq!(&recv_raw(&mut rx, 5).await.unwrap()[..], b"abcde");
        assert_eq!(&recv_raw(&mut rx, 10).await.unwrap()[..], &data[..10]);
        assert_eq!(recv::<u32>(&mut rx).await.unwrap(), Some(2));
        drop(writer.await.unwrap());
    }
}

#[tokio::test]
#[allow(clippy::await_holding_lock)] // (as above)
async fn raw_frames_follow_messages_in_order_and_arrive_whole() {
    let _pool = crate::bufpool::TEST_LOCK.lock();
    let (a, b) = tokio::io::duplex(64 * 1024);
    let (mut tx, mut rx) = (framed(Box::new(a)), framed(Box::new(b)));
    authenticated(&mut tx);
    authenticated(&mut rx);
    let big: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
    let sizes = [0usize, 10, big.len()];
    let writer = tokio::spawn(async move {
        send(&mut tx, &7u32).await.unwrap();
        for n in sizes {
            send_raw(&mut tx, &big[..n]).await.unwrap();
        }
        send(&mut tx, &8u32).await.unwrap();
        big
    });
    assert_eq!(recv::<u32>(&mut rx).await.unwrap(), Some(7));
    let mut got = Vec::new();
    for n in sizes {
        got.push(recv_raw(&mut rx, n).await.unwrap());
    }
    assert_eq!(recv::<u32>(&mut rx).await.unwrap(), Some(8));
    let big = writer.await.unwrap();
    for (g, n) in got.iter().zip(sizes) {
        assert_eq!(&g[..], &big[..n]);
    }
    // A length other than announced is refused, not misread.
    let (a, b) = tokio::io::duplex(1024);
    let (mut tx, mut rx) = (framed(Box::new(a)), framed(Box::new(b)));
    authenticated(&mut tx);
    authenticated(&mut rx);
    send_raw(&mut tx, b"abc").await.unwrap();
    assert!(recv_raw(&mut rx, 4).await.is_err());
}

/// A Unix listener in a fresh directory, and a server task that runs
/// the handshake on each connection and reports the outcome.
async fn server(secret: Secret) -> (Address, mpsc::UnboundedReceiver<bool>) {
    let dir = std::env::temp_dir().join(format!(
        "shoal-auth-test-{}-{}",
        std::process::id(),
        nonce()[0]
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let addr = Address::Unix(dir.join("s.sock"));
    let listener = Listener::bind(&addr).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (incoming, peer) = listener.accept().await;
            let (secret, tx) = (secret.clone(), tx.clone());
            tokio::spawn(async move {
                let ok = match incoming.authenticate(&secret, &peer).await {
                    Ok((mut conn, _)) => {
                        let _ = send(&mut conn, &Welcome::Accepted { id: 1 }).await;
                        true
                    }
                    Err(()) => false,
                };
                let _ = tx.send(ok);
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn the_right_token_is_accepted_and_a_wrong_one_refused_both_ways() {
    let good = Secret::from_token("right").unwrap();
    let (addr, mut outcomes) = server(good.clone()).await;
    assert!(handshake(&addr, Role::Client, &good).await.is_ok());
    assert!(outcomes.recv().await.unwrap());
    let bad = Secret::from_token("wrong").unwrap();
    let Err(err) = handshake(&addr, Role::Client, &bad).await else {
        panic!("a wrong token was accepted");
    };
    // The client finds out first: the server's proof does not check.
    assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
    assert!(err.to_string().contains("token"), "{err}");
    assert!(!outcomes.recv().await.unwrap());
}

#[tokio::test]
async fn a_replayed_handshake_is_refused() {
    let secret = Secret::from_token("s3cret").unwrap();
    let (addr, mut outcomes) = server(secret.clone()).await;
    // A legitimate exchange, recorded as an eavesdropper would see it.
    let (mut conn, _) = connect(&addr).await.unwrap();
    let hello = Hello::new(Role::Client, nonce());
    send(&mut conn, &hello).await.unwrap();
    let Some(Welcome::Challenge { nonce: n, .. }) = recv(&mut conn).await.unwrap() else {
        panic!("no challenge");
    };
    let proof = Proof {
        mac: secret.mac(CLIENT, &[&n, &hello.nonce, &encode(&hello)]),
    };
    send(&mut conn, &proof).await.unwrap();
    assert!(matches!(
        recv::<Welcome>(&mut conn).await.unwrap(),
        Some(Welcome::Accepted { .. })
    ));
    assert!(outcomes.recv().await.unwrap());
    // Replaying the same frames on a new connection: the server's nonce
    // is fresh, so the old proof fails.
    let (mut conn, _) = connect(&addr).await.unwrap();
    send(&mut conn, &hello).await.unwrap();
    send(&mut conn, &proof).await.unwrap();
    assert!(matches!(
        recv::<Welcome>(&mut conn).await.unwrap(),
        Some(Welcome::Challenge { .. })
    ));
    assert!(matches!(
        recv::<Welcome>(&mut conn).await.unwrap(),
        Some(Welcome::Rejected { .. })
    ));
    assert!(!outcomes.recv().await.unwrap());
}

#[tokio::test]
async fn garbage_and_oversized_frames_close_only_that_connection() {
    use tokio::io::AsyncWriteExt;
    let secret = Secret::from_token("t").unwrap();
    let (addr, mut outcomes) = server(secret.clone()).await;
    let Address::Unix(path) = &addr else {
        unreachable!()
    };
    // Garbage inside a valid frame.
    let mut raw = UnixStream::connect(path).await.unwrap();
    raw.write_all(&[0, 0, 0, 5, 0xff, 0xfe, 0xfd, 0xfc, 0xfb])
        .await
        .unwrap();
    assert!(!outcomes.recv().await.unwrap());
    // A frame header claiming 4 GiB.
    let mut raw = UnixStream::connect(path).await.unwrap();
    raw.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3])
        .await
        .unwrap();
    assert!(!outcomes.recv().await.unwrap());
    // The server still serves.
    assert!(handshake(&addr, Role::Client, &secret).await.is_ok());
    assert!(outcomes.recv().await.unwrap());
}

#[tokio::test]
async fn frames_before_the_proof_are_capped_at_a_few_kib() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let secret = Secret::from_token("t").unwrap();
    let (addr, mut outcomes) = server(secret.clone()).await;
    let Address::Unix(path) = &addr else {
        unreachable!()
    };
    // A header declaring 1 MiB (far under MAX_FRAME): refused at the
    // header, before anything is reserved or read.
    let mut raw = UnixStream::connect(path).await.unwrap();
    raw.write_all(&(1u32 << 20).to_be_bytes()).await.unwrap();
    assert!(!outcomes.recv().await.unwrap());
    let mut buf = [0u8; 16];
    assert_eq!(raw.read(&mut buf).await.unwrap(), 0, "closed");
    // After the handshake, frames up to MAX_FRAME pass both ways.
    let (conn, _) = handshake(&addr, Role::Client, &secret).await.unwrap();
    assert!(outcomes.recv().await.unwrap());
    assert_eq!(
        conn.codec().max_frame_length(),
        MAX_FRAME,
        "the client side is raised too"
    );
}

#[tokio::test]
async fn unauthenticated_connections_are_bounded_per_listener() {
    let secret = Secret::from_token("t").unwrap();
    let (addr, mut outcomes) = server(secret.clone()).await;
    let Address::Unix(path) = &addr else {
        unreachable!()
    };
    // Idle peers that never say hello fill every handshake place ...
    let mut idle = Vec::new();
    for _ in 0..MAX_PENDING_HANDSHAKES {
        idle.push(UnixStream::connect(path).await.unwrap());
    }
    // ... so the next peer waits in the backlog, holding nothing here.
    let next = tokio::spawn({
        let (addr, secret) = (addr.clone(), secret.clone());
        async move { handshake(&addr, Role::Client, &secret).await.is_ok() }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    if next.is_finished() {
        panic!("accepted past the bound: {:?}", next.await);
    }
    // A place frees up as soon as one idle peer goes.
    idle.pop();
    assert!(next.await.unwrap());
    let mut seen = Vec::new();
    while seen.len() < 2 {
        seen.push(outcomes.recv().await.unwrap());
    }
    assert!(seen.contains(&true), "{seen:?}");
}

#[test]
fn batches_split_by_bytes_decode_as_the_same_messages() {
    let msgs: Vec<Vec<u8>> = (0..300u32)
        .map(|i| vec![i as u8; (i as usize * 37) % 900])
        .collect();
    for limit in [1000, 5000, 1 << 20] {
        let bodies = frames(msgs.iter().cloned(), limit);
        let mut back: Vec<Vec<u8>> = Vec::new();
        for b in &bodies {
            assert!(b.len() <= limit, "{limit}: {}", b.len());
            back.extend(decode::<Vec<Vec<u8>>>(b).unwrap());
        }
        assert_eq!(back, msgs, "limit {limit}");
    }
    // 200 messages of 1 KiB: one frame under the real limit.
    let many = || (0..200).map(|_| vec![7u8; 1024]);
    assert_eq!(frames(many(), MAX_FRAME).len(), 1);
    assert_eq!(frames(many(), 10_000).len(), 23);
    // A message that can never fit is dropped; the others go.
    let mixed = vec![vec![1u8; 10], vec![2u8; 2000], vec![3u8; 10]];
    let bodies = frames(mixed.into_iter(), 1000);
    let back: Vec<Vec<Vec<u8>>> = bodies.iter().map(|b| decode(b).unwrap()).collect();
    assert_eq!(back, vec![vec![vec![1u8; 10], vec![3u8; 10]]]);
}

#[test]
fn addresses_parse_and_print() {
    assert_eq!(
        Address::parse("tcp://127.0.0.1:8786").unwrap().to_string(),
        "tcp://127.0.0.1:8786"
    );
    assert_eq!(
        Address::parse("localhost:1").unwrap(),
        Address::Tcp("localhost:1".into())
    );
    assert_eq!(
        Address::parse("unix:///tmp/s").unwrap(),
        Address::Unix("/tmp/s".into())
    );
    assert_eq!(
        Address::parse("unix://"),
        Err(AddressError::NoPath("unix://".into()))
    );
    assert_eq!(
        Address::parse("mem://"),
        Err(AddressError::NoName("mem://".into()))
    );
    for bad in ["", "tcp://host", "unix://", "host:notaport"] {
        assert!(
            Address::parse(bad)
                .unwrap_err()
                .to_string()
                .contains("address"),
            "{bad}"
        );
    }
}

/// Both ends of an authenticated Unix-socket connection, the client
/// welcomed: (the socket's directory, to remove; the server's end; the
/// client's end).
async fn connected(name: &str) -> (std::path::PathBuf, Conn, Conn) {
    let secret = Secret::from_token("t").unwrap();
    let dir = std::env::temp_dir().join(format!("shoal-{name}-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let addr = Address::Unix(dir.join("s.sock"));
    let listener = Listener::bind(&addr).await.unwrap();
    let server_secret = secret.clone();
    let accepted = tokio::spawn(async move {
        let (incoming, peer) = listener.accept().await;
        let (mut conn, _) = incoming.authenticate(&server_secret, &peer).await.unwrap();
        send(&mut conn, &Welcome::Accepted { id: 1 }).await.unwrap();
        conn
    });
    let (client, _) = handshake(&addr, Role::Client, &secret).await.unwrap();
    (dir, accepted.await.unwrap(), client)
}

/// Backpressure: messages for a peer that does not read are counted;
/// a producer waiting for room gives up when told, and gets it as soon
/// as the peer reads; the count returns to zero once all is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_counts_what_waits_and_producers_wait_for_room() {
    use shoal_proto::FromWorker;
    let (dir, mut conn, client) = connected("room").await;
    let (start_reading, go) = tokio::sync::oneshot::channel::<()>();
    let read = tokio::spawn(async move {
        go.await.unwrap();
        let mut n = 0;
        while let Some(frame) = conn.next().await {
            n += decode_batch::<FromWorker>(frame).unwrap().len();
            if n == 64 {
                break;
            }
        }
        n
    });
    let (out, _stream) = split_batched::<FromWorker>(client);
    let value = Bytes::from(vec![7u8; 1 << 20]);
    for id in 0..64 {
        let m = FromWorker::Finished {
            id,
            size: 1 << 20,
            value: Some(value.clone()),
            timing: Default::default(),
        };
        out.send(m).unwrap();
    }
    // The socket takes a little; most of the 64 MiB waits.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(out.queued_bytes() > 32 << 20, "{}", out.queued_bytes());
    let waiting = out.clone();
    let t0 = std::time::Instant::now();
    let gave_up = tokio::task::spawn_blocking(move || {
        !waiting.wait_room(8 << 20, || t0.elapsed() > Duration::from_millis(300))
    });
    assert!(gave_up.await.unwrap());
    let waiting = out.clone();
    let room = tokio::task::spawn_blocking(move || waiting.wait_room(8 << 20, || false));
    start_reading.send(()).unwrap();
    assert!(room.await.unwrap());
    assert_eq!(read.await.unwrap(), 64);
    assert_eq!(out.queued_bytes(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Messages queued together from a thread outside the runtime (a task's
/// report and the next one's start) are written together: the writer
/// never wakes to the first alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_together_travel_in_one_frame() {
    use shoal_proto::FromWorker;
    const ROUNDS: u64 = 200;
    let (dir, mut conn, client) = connected("together").await;
    let read = tokio::spawn(async move {
        let mut frames = Vec::new();
        let mut n = 0;
        while let Some(frame) = conn.next().await {
            let msgs = decode_batch::<FromWorker>(frame).unwrap();
            n += msgs.len() as u64;
            frames.push(msgs);
            if n == 2 * ROUNDS {
                break;
            }
        }
        frames
    });
    let (out, _stream) = split_batched::<FromWorker>(client);
    let sender = std::thread::spawn(move || {
        for id in 0..ROUNDS {
            let done = FromWorker::Finished {
                id,
                size: 8,
                value: Some(Bytes::from_static(b"12345678")),
                timing: Default::default(),
            };
            assert!(out.send_all(vec![FromWorker::Started(vec![id + 1]), done]));
            // Time for the writer to drain, as between two tasks.
            std::thread::sleep(Duration::from_micros(200));
        }
        assert!(out.send_all(Vec::new()), "nothing to send is no failure");
        out
    });
    let frames = read.await.unwrap();
    let out = tokio::task::spawn_blocking(move || sender.join().unwrap())
        .await
        .unwrap();
    for msgs in &frames {
        assert_eq!(msgs.len() % 2, 0, "a pair was split: {msgs:?}");
        for pair in msgs.chunks(2) {
            match pair {
                [FromWorker::Started(s), FromWorker::Finished { id, .. }] => {
                    assert_eq!(s, &vec![id + 1])
                }
                other => panic!("out of order: {other:?}"),
            }
        }
    }
    assert_eq!(out.sent(), 2 * ROUNDS);
    let _ = std::fs::remove_dir_all(&dir);
}
