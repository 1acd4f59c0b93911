//! The data server: this worker's results served to peers and clients
//! (files on this host, frames to other hosts), and the Python pickling
//! thread's requests.

use super::*;

impl WorkerShared {
    /// For the Python pickling thread: held results that transfers wait
    /// for, to write to files (for this host) and to frame in memory (for
    /// another: [`Self::put_frames`]); waits up to `timeout` (empty then).
    pub fn pickle_requests(&self, timeout: Duration) -> (Vec<u64>, Vec<u64>) {
        let deadline = Instant::now() + timeout;
        let mut q = self.to_pickle.lock();
        if !q.busy.is_empty() {
            // The last batch is done: transfers that found no frame of
            // theirs in it may ask again now.
            q.busy.clear();
            self.pickled.notify_waiters();
        }
        while q.files.is_empty() && q.frames.is_empty() {
            if self.to_pickle_cv.wait_until(&mut q, deadline).timed_out() {
                return (Vec::new(), Vec::new());
            }
        }
        let q = &mut *q;
        std::mem::swap(&mut q.busy, &mut q.queued);
        q.queued.clear();
        (q.files.drain(..).collect(), q.frames.drain(..).collect())
    }

    /// The pickling thread framed held results for a transfer to another
    /// host, as the parts of each frame (`None`: it could not): the
    /// transfers waiting for them go on. The results stay held (as the
    /// Python objects).
    pub fn put_frames(&self, items: Vec<(u64, Option<Vec<Bytes>>)>) {
        {
            let store = self.store.lock();
            let mut framed = self.framed.lock();
            for (id, frame) in items {
                if store.contains(id) {
                    framed.insert(id, frame);
                }
            }
        }
        self.pickled.notify_waiters();
    }

    /// The Python side wrote a held result to a file, or spilled one
    /// (`None`: it could not, or the result was released): waiting
    /// transfers go on. Ignored for results this worker no longer keeps.
    pub fn put_stored(&self, id: u64, value: Option<Stored>) {
        self.put_stored_many(vec![(id, value)]);
    }

    /// [`Self::put_stored`] for a batch, waking waiting transfers once
    /// (the pickling thread answers thousands of requests at a time).
    pub fn put_stored_many(&self, items: Vec<(u64, Option<Stored>)>) {
        {
            let mut store = self.store.lock();
            for (id, value) in items {
                store.update(id, value);
            }
        }
        self.pickled.notify_waiters();
    }

    /// The file holding a result, if this worker keeps it as one (for a
    /// result copied here from a retiring worker).
    pub fn stored_file(&self, id: u64) -> Option<(String, u64)> {
        match self.store.lock().get(id) {
            Some(Stored::File { path, len }) => Some((path.clone(), *len)),
            _ => None,
        }
    }

    /// Results for a transfer: held ones are written to files on demand
    /// (bounded wait); a requester on this host gets file paths, another
    /// the bytes (a file's sent from the file). `None` for results this
    /// worker lacks.
    pub(crate) async fn pickled_results(
        &self,
        ids: &[u64],
        same_host: bool,
    ) -> Vec<(u64, Option<Reply>)> {
        let stored = self.stored_results(ids, !same_host).await;
        let mut out = Vec::with_capacity(stored.len());
        for (id, s) in stored {
            let p = match s.map(|f| match f {
                Found::Stored(s) => Ok(s),
                Found::Framed(parts) => Err(parts),
            }) {
                Some(Err(parts)) => Some(Reply::frame(parts)),
                Some(Ok(Stored::Bytes(b))) => Some(Reply::Payload(Payload::Bytes(b))),
                Some(Ok(Stored::File { path, len })) if same_host => {
                    Some(Reply::Payload(Payload::File { path, len }))
                }
                Some(Ok(Stored::File { mut path, len })) => {
                    // Another host: opened now, sent from the file (its
                    // first `len` bytes: a shared-memory block's file may be
                    // longer). A spill may move the file meanwhile: look again.
                    let mut got = None;
                    for _ in 0..3 {
                        if let Ok(f) = crate::shm_pool::open_shared(std::path::Path::new(&path)) {
                            got = Some(Reply::Contents(f, len));
                            break;
                        }
                        match self.store.lock().get(id) {
                            Some(Stored::File { path: now, .. }) if *now != path => {
                                path = now.clone()
                            }
                            _ => break,
                        }
                    }
                    got
                }
                Some(Ok(Stored::Unpicklable(why))) => {
                    Some(Reply::Payload(Payload::Unpicklable(why)))
                }
                Some(Ok(Stored::Held)) | None => None,
            };
            out.push((id, p));
        }
        out
    }

    /// What the store has of `ids`; held ones are queued for the pickling
    /// thread once, and waited for (each wake-up looks only at those still
    /// held: a request for thousands stays linear). `frames`: the requester
    /// is on another host, so held ones are framed in memory (taken here as
    /// bytes, sent from memory) rather than written to files first.
    pub(crate) async fn stored_results(
        &self,
        ids: &[u64],
        frames: bool,
    ) -> Vec<(u64, Option<Found>)> {
        let deadline = tokio::time::Instant::now() + PICKLE_WAIT;
        let mut waiting = Vec::new();
        let mut out: Vec<(u64, Option<Found>)> = {
            let store = self.store.lock();
            ids.iter()
                .enumerate()
                .map(|(i, id)| match store.get(*id) {
                    Some(Stored::Held) => {
                        waiting.push(i);
                        (*id, None)
                    }
                    other => (*id, other.cloned().map(Found::Stored)),
                })
                .collect()
        };
        if waiting.is_empty() {
            return out;
        }
        {
            let mut q = self.to_pickle.lock();
            for &i in &waiting {
                let id = out[i].0;
                if q.queued.insert((id, frames)) {
                    if frames {
                        q.frames.push_back(id);
                    } else {
                        q.files.push_back(id);
                    }
                }
            }
        }
        self.to_pickle_cv.notify_one();
        loop {
            // Register for the wake-up before looking, so none is missed.
            let notified = self.pickled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let store = self.store.lock();
                let mut framed = self.framed.lock();
                waiting.retain(|&i| {
                    let id = out[i].0;
                    if frames {
                        match framed.remove(&id) {
                            Some(Some(parts)) => {
                                out[i].1 = Some(Found::Framed(parts));
                                return false;
                            }
                            // It could not be framed: whatever the store
                            // says now (exported meanwhile, or gone).
                            Some(None) => {
                                out[i].1 = match store.get(id) {
                                    Some(Stored::Held) | None => None,
                                    other => other.cloned().map(Found::Stored),
                                };
                                return false;
                            }
                            None => {}
                        }
                    }
                    match store.get(id) {
                        Some(Stored::Held) => true,
                        other => {
                            out[i].1 = other.cloned().map(Found::Stored);
                            false
                        }
                    }
                });
            }
            if waiting.is_empty() {
                return out;
            }
            if frames {
                // A frame another transfer of the same result took first:
                // ask again (neither queued nor in the batch being made).
                let mut q = self.to_pickle.lock();
                let mut again = false;
                for &i in &waiting {
                    let key = (out[i].0, true);
                    if !q.busy.contains(&key) && q.queued.insert(key) {
                        q.frames.push_back(key.0);
                        again = true;
                    }
                }
                drop(q);
                if again {
                    self.to_pickle_cv.notify_one();
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                tracing::warn!("results {ids:x?} were not pickled within {PICKLE_WAIT:?}");
                return out;
            }
        }
    }
}

/// Sends a data reply: large byte payloads and file contents after it,
/// each in a raw frame.
pub(crate) async fn send_reply(
    conn: &mut net::Conn,
    items: Vec<(u64, Option<Reply>)>,
) -> io::Result<()> {
    let mut raw = Vec::new();
    let items = items
        .into_iter()
        .map(|(id, r)| {
            let p = match r {
                Some(Reply::Payload(Payload::Bytes(b))) if b.len() >= RAW_PAYLOAD => {
                    let n = b.len() as u64;
                    raw.push(net::RawPart::Bytes(b));
                    Some(Payload::Follows(n))
                }
                Some(Reply::Contents(f, len)) => {
                    raw.push(net::RawPart::File(f, len));
                    Some(Payload::Follows(len))
                }
                Some(Reply::Parts(parts, len)) => {
                    raw.push(net::RawPart::Gather(parts));
                    Some(Payload::Follows(len))
                }
                Some(Reply::Payload(p)) => Some(p),
                None => None,
            };
            (id, p)
        })
        .collect();
    net::send(conn, &DataReply { items }).await?;
    net::send_raw_parts(conn, raw).await
}

pub(crate) async fn data_server(listener: Listener, sh: Arc<WorkerShared>) {
    loop {
        let (incoming, peer) = listener.accept().await;
        let sh = sh.clone();
        tokio::spawn(async move {
            // A peer that cannot prove it has the secret fetches nothing.
            let mut conn = match incoming.authenticate(&sh.secret, &peer).await {
                Ok((conn, h)) if h.role == Role::Data => conn,
                Ok((mut conn, _)) => {
                    let reason = "this is a worker's data server: only data requests".into();
                    let _ = net::send(&mut conn, &Welcome::Rejected { reason }).await;
                    return;
                }
                Err(()) => return,
            };
            if net::send(&mut conn, &Welcome::Accepted { id: sh.id() })
                .await
                .is_err()
            {
                return;
            }
            while let Ok(Some(req)) = net::recv::<DataRequest>(&mut conn).await {
                let same_host = req.host == crate::shm::host_key();
                let items = sh.pickled_results(&req.ids, same_host).await;
                let bytes: u64 = items
                    .iter()
                    .filter_map(|(_, r)| r.as_ref())
                    .map(Reply::size)
                    .sum();
                sh.bytes_out.fetch_add(bytes, Ordering::Relaxed);
                if send_reply(&mut conn, items).await.is_err() {
                    return;
                }
            }
        });
    }
}
