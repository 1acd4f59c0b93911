//! Connections: accepted, authenticated, and read into the owner's queue.

use super::*;

pub(crate) async fn accept_loop(
    listener: Listener,
    events: mpsc::UnboundedSender<Event>,
    mut stop: watch::Receiver<bool>,
    secret: Secret,
    ids: Arc<AtomicU32>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            (conn, peer) = listener.accept() => {
                let (events, ids, stop, secret) = (events.clone(), ids.clone(), stop.clone(), secret.clone());
                tokio::spawn(async move { serve_conn(conn, peer, events, ids, stop, &secret).await });
            }
        }
    }
}

pub(crate) async fn serve_conn(
    incoming: net::Incoming,
    peer: String,
    events: mpsc::UnboundedSender<Event>,
    ids: Arc<AtomicU32>,
    mut stop: watch::Receiver<bool>,
    secret: &Secret,
) {
    // Nothing but the handshake is read before the peer proves it has the
    // cluster's secret.
    let Ok((mut conn, hello)) = incoming.authenticate(secret, &peer).await else {
        return;
    };
    let id = ids.fetch_add(1, Ordering::Relaxed);
    if net::send(&mut conn, &Welcome::Accepted { id })
        .await
        .is_err()
    {
        return;
    }
    match hello.role {
        Role::Client => {
            let (tx, stream) = net::split_batched::<ToClient>(conn);
            let _ = events.send(Event::ClientJoined(id, tx));
            let why = read(stream, &events, &mut stop, |msgs| {
                Event::FromClient(id, msgs)
            })
            .await;
            if why.is_some() {
                let _ = events.send(Event::ClientLeft(id));
            }
        }
        Role::Worker {
            nthreads,
            data_addr,
            name,
            pid,
            resources,
            lifetime_end_us,
            supervisor,
        } => {
            tracing::info!("worker {name} (pid {pid}) joined with {nthreads} threads");
            let (tx, stream) = net::split_batched::<ToWorker>(conn);
            let _ = events.send(Event::WorkerJoined {
                id,
                pid,
                nthreads,
                data_addr,
                name,
                resources,
                lifetime_end_us,
                supervisor,
                tx,
            });
            let why = read(stream, &events, &mut stop, |msgs| {
                Event::FromWorker(id, msgs)
            })
            .await;
            if let Some(reason) = why {
                let _ = events.send(Event::WorkerLeft(id, reason));
            }
        }
        Role::Obituary {
            supervisor,
            pid,
            running,
        } => {
            let _ = events.send(Event::Obituary {
                supervisor,
                pid,
                running,
            });
        }
        Role::Data => {}
    }
}

/// Reads a peer's frames of `T` into the owner's queue until the
/// connection ends: why it ended (None: the scheduler stops, or the owner
/// is gone).
async fn read<T: serde::de::DeserializeOwned + Send + 'static>(
    mut stream: futures::stream::SplitStream<net::Conn>,
    events: &mpsc::UnboundedSender<Event>,
    stop: &mut watch::Receiver<bool>,
    event: impl Fn(Vec<T>) -> Event,
) -> Option<String> {
    loop {
        tokio::select! {
            _ = stop.changed() => return None,
            frame = stream.next() => match frame {
                None => return Some("connection closed".to_string()),
                Some(frame) => match decode::<T>(frame).await {
                    Ok(msgs) => {
                        if events.send(event(msgs)).is_err() { return None; }
                    }
                    // TLS peers that exit without close_notify: a plain close.
                    Err(e) if matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset) => return Some("connection closed".to_string()),
                    Err(e) => return Some(format!("bad frame: {e}")),
                },
            }
        }
    }
}

/// Decodes a peer's frame; a big one on a blocking thread, so that decoding
/// it does not hold the I/O thread (the reader waits: order is kept).
pub(crate) async fn decode<T: serde::de::DeserializeOwned + Send + 'static>(
    frame: io::Result<bytes::BytesMut>,
) -> io::Result<Vec<T>> {
    match frame {
        Ok(f) if f.len() >= BIG_FRAME => {
            tokio::task::spawn_blocking(move || net::decode_batch::<T>(Ok(f)))
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)))
        }
        Ok(f) if f.len() >= YIELD_FRAME => {
            let msgs = net::decode_batch::<T>(Ok(f));
            // A peer sending frame after frame (a job in pieces) finds them
            // all buffered: without a yield, tokio's budget would let this
            // reader decode a hundred of them before the loop's next turn.
            tokio::task::yield_now().await;
            msgs
        }
        f => net::decode_batch::<T>(f),
    }
}

/// Frames from this size on are decoded inline, then the reader yields.
const YIELD_FRAME: usize = 64 << 10;

/// Whether a peer's queue (`queued` bytes now) has been over `limit` for
/// two beats.
pub(crate) fn fell_behind(queued: usize, behind: &mut bool, limit: usize) -> bool {
    let over = queued > limit;
    let twice = over && *behind;
    *behind = over;
    twice
}

/// Bytes the scheduler may queue for one peer. A peer over it at two
/// beats running reads slower than the cluster talks to it (or not at
/// all): it is let go, so the scheduler's memory stays bounded.
pub(crate) const PEER_BACKLOG: usize = 1 << 30;
