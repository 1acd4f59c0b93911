//! The batching writer: an outbox whose queued bytes are counted
//! (backpressure), drained into frames by a writer task.

use super::*;

/// The sending half of a batched connection. Messages never wait to be
/// queued (the scheduler's loop must not block on a peer), but the bytes
/// queued are counted: a producer thread can wait for room
/// ([`Outbox::wait_room`], backpressure), and a service can let go of a peer
/// that stopped reading ([`Outbox::queued_bytes`]).
pub struct Outbox<M> {
    tx: mpsc::UnboundedSender<(Queued<M>, usize)>,
    room: Arc<Room>,
}

/// What one send queues: one message, or several that must reach the
/// writer together ([`Outbox::send_all`]).
pub enum Queued<M> {
    /// One message.
    One(M),
    /// Messages written in one go, in order.
    Many(Vec<M>),
}

impl<M> IntoIterator for Queued<M> {
    type Item = M;
    type IntoIter = std::iter::Chain<std::option::IntoIter<M>, std::vec::IntoIter<M>>;

    fn into_iter(self) -> Self::IntoIter {
        // (An empty Vec allocates nothing.)
        match self {
            Queued::One(m) => Some(m).into_iter().chain(Vec::new()),
            Queued::Many(v) => None.into_iter().chain(v),
        }
    }
}

impl<M> Clone for Outbox<M> {
    fn clone(&self) -> Self {
        Outbox {
            tx: self.tx.clone(),
            room: self.room.clone(),
        }
    }
}

#[derive(Default)]
pub(crate) struct Room {
    queued: std::sync::atomic::AtomicUsize,
    lock: std::sync::Mutex<()>,
    freed: std::sync::Condvar,
    /// Cancelled by [`Outbox::close`]: the writer stops at once.
    closed: tokio_util::sync::CancellationToken,
    /// Messages queued so far (for a service's throughput figures).
    sent: std::sync::atomic::AtomicU64,
    /// Threads in [`Outbox::wait_room`]: a write wakes them only if any
    /// (a condvar's notify is a system call even with nobody waiting).
    waiters: std::sync::atomic::AtomicUsize,
}

impl Room {
    fn release(&self, bytes: usize) {
        use std::sync::atomic::Ordering::SeqCst;
        // Saturating: a send that fails after the writer zeroed the count.
        let _ = self
            .queued
            .fetch_update(SeqCst, SeqCst, |q| Some(q.saturating_sub(bytes)));
        // A waiter counts itself before it reads `queued` (both SeqCst): it
        // sees the new count or is seen here. Taking the lock orders this
        // with a waiter between its check and its wait (no lost wake-up).
        if self.waiters.load(SeqCst) > 0 {
            drop(self.lock.lock());
            self.freed.notify_all();
        }
    }
}

impl<M: Weigh> Outbox<M> {
    /// Queues a message; an error only when the connection is gone.
    pub fn send(&self, m: M) -> Result<(), mpsc::error::SendError<M>> {
        let w = m.weight();
        self.queue(Queued::One(m), w, 1).map_err(|q| match q {
            Queued::One(m) => mpsc::error::SendError(m),
            Queued::Many(_) => unreachable!("queued one"),
        })
    }

    /// Queues messages that the writer takes together, in one frame where
    /// they fit: sent one by one from a thread outside the I/O runtime, the
    /// writer woke at the first and wrote it alone (a task's report and the
    /// next one's start cost the scheduler two wakes, not one). False when
    /// the connection is gone.
    pub fn send_all(&self, ms: Vec<M>) -> bool {
        match ms.len() {
            0 => true,
            n => {
                let w = ms.iter().map(Weigh::weight).sum();
                self.queue(Queued::Many(ms), w, n as u64).is_ok()
            }
        }
    }

    fn queue(&self, q: Queued<M>, w: usize, n: u64) -> Result<(), Queued<M>> {
        self.room
            .queued
            .fetch_add(w, std::sync::atomic::Ordering::SeqCst);
        self.room
            .sent
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        self.tx.send((q, w)).map_err(|e| {
            self.room.release(w);
            e.0 .0
        })
    }
}

impl<M> Outbox<M> {
    /// Messages queued through this outbox so far.
    pub fn sent(&self) -> u64 {
        self.room.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.room.queued.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the connection's writer is gone.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Ends the connection now: what is queued is dropped, not written
    /// (a peer let go must not keep its backlog alive until a write stalls).
    pub fn close(&self) {
        self.room.closed.cancel();
    }

    /// Blocks the calling thread (never an async task) while more than
    /// `limit` bytes are queued: the producer waits for the peer to read
    /// (backpressure). False if the connection closed or `give_up` (asked
    /// every 100 ms) says to stop waiting.
    pub fn wait_room(&self, limit: usize, give_up: impl Fn() -> bool) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        let mut guard = self.room.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.room.waiters.fetch_add(1, SeqCst);
        let _counted = Uncount(&self.room.waiters);
        while self.room.queued.load(SeqCst) > limit {
            if self.is_closed() || give_up() {
                return false;
            }
            // Timed: a writer that dies drops its queue without counting
            // it out, which is_closed catches.
            guard = self
                .room
                .freed
                .wait_timeout(guard, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        !self.is_closed()
    }
}

/// Takes a waiter off the count when its wait ends, however it ends.
struct Uncount<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Uncount<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// An [`Outbox`] with no connection behind it: what is sent waits in the
/// returned receiver (a client between two connections to its scheduler).
pub fn parked<M>() -> (Outbox<M>, mpsc::UnboundedReceiver<(Queued<M>, usize)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let room = Arc::new(Room::default());
    (Outbox { tx, room }, rx)
}

/// Splits a connection: returns an [`Outbox`] whose messages are written in
/// batches (everything queued since the last write goes out in as few
/// frames as [`MAX_FRAME`] allows), and the read half.
pub fn split_batched<M: Serialize + Send + 'static>(
    conn: Conn,
) -> (Outbox<M>, futures::stream::SplitStream<Conn>) {
    let (mut sink, stream) = conn.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<(Queued<M>, usize)>();
    let room = Arc::new(Room::default());
    let counted = room.clone();
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(256);
        // A peer that stops reading (frozen, cut off) must not hold what
        // is queued for it for ever: a write that makes no headway for
        // WRITE_STALL ends the connection and frees the queue.
        let stalled = |r: Result<Result<(), io::Error>, _>| !matches!(r, Ok(Ok(())));
        let closed = counted.closed.clone();
        'write: loop {
            let n = tokio::select! {
                biased;
                _ = closed.cancelled() => break,
                n = rx.recv_many(&mut batch, 8192) => n,
            };
            if n == 0 {
                break;
            }
            let bytes: usize = batch.iter().map(|(_, w)| w).sum();
            let mut enc = FrameEncoder::new(FRAME_TARGET, MAX_FRAME);
            let mut msgs = batch.drain(..).flat_map(|(q, _)| q);
            loop {
                let next = msgs.next();
                let body = match &next {
                    Some(m) => match enc.push(m) {
                        Some(body) => body,
                        None => continue,
                    },
                    None => match enc.finish() {
                        Some(body) => body,
                        None => break,
                    },
                };
                let fed =
                    closed.run_until_cancelled(tokio::time::timeout(WRITE_STALL, sink.feed(body)));
                if fed.await.is_none_or(stalled) {
                    break 'write;
                }
                if next.is_none() {
                    break;
                }
                // More to encode: let the rest of the I/O thread run first.
                tokio::task::yield_now().await;
            }
            drop(msgs);
            let flushed =
                closed.run_until_cancelled(tokio::time::timeout(WRITE_STALL, sink.flush()));
            if flushed.await.is_none_or(stalled) {
                break;
            }
            counted.release(bytes);
        }
        rx.close();
        drop(rx);
        // Dropped, not written: nothing waits any more.
        counted
            .queued
            .store(0, std::sync::atomic::Ordering::Relaxed);
        counted.release(0);
        let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, sink.close()).await;
    });
    (Outbox { tx, room }, stream)
}

/// Decodes one batch frame from a split read half.
pub fn decode_batch<M: DeserializeOwned>(frame: io::Result<bytes::BytesMut>) -> io::Result<Vec<M>> {
    let frame = frame?;
    decode(&frame).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}
