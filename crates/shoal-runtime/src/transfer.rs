//! The data plane's client side: fetching results from a worker's data
//! server (workers fetch their inputs, clients their results), over kept
//! connections.

use crate::net::{self, Address, Secret};
use bytes::Bytes;
use shoal_proto::{DataReply, DataRequest, Payload, Role};
use std::io;

/// A fetched result: bytes, or a file on this host, already open (so the
/// holder may unlink it once it is released).
pub enum Fetched {
    /// The pickled bytes.
    Bytes(Bytes),
    /// The open file with the pickle.
    File(std::fs::File),
    /// Its holder cannot pickle it (why).
    Unpicklable(String),
}

impl Fetched {
    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Fetched::Bytes(b) => b.len() as u64,
            Fetched::File(f) => f.metadata().map_or(0, |m| m.len()),
            Fetched::Unpicklable(_) => 0,
        }
    }
}

/// Fetches results from a worker's data server; files on this host are
/// opened, not read. Missing results are an error.
pub async fn fetch(addr: &str, ids: Vec<u64>, secret: &Secret) -> io::Result<Vec<(u64, Fetched)>> {
    fetch_some(addr, ids, secret)
        .await?
        .into_iter()
        .map(|(id, v)| {
            v.map(|v| (id, v)).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("worker at {addr} does not hold {id:x}"),
                )
            })
        })
        .collect()
}

/// Like [`fetch`]; `None` for results the worker says it does not hold.
pub(crate) async fn fetch_some(
    addr: &str,
    ids: Vec<u64>,
    secret: &Secret,
) -> io::Result<Vec<(u64, Option<Fetched>)>> {
    let address =
        Address::parse(addr).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // A kept connection may have been closed by its peer meanwhile: then a
    // new one (a fetch can be asked again).
    if let Some(mut conn) = idle_conns::take(addr) {
        if let Ok(out) = request(&mut conn, &ids).await {
            idle_conns::put(addr, conn);
            return Ok(out);
        }
    }
    let (mut conn, _) = net::handshake(&address, Role::Data, secret).await?;
    let out = request(&mut conn, &ids).await?;
    idle_conns::put(addr, conn);
    Ok(out)
}

/// One data request and its reply on an open data connection.
async fn request(conn: &mut net::Conn, ids: &[u64]) -> io::Result<Vec<(u64, Option<Fetched>)>> {
    let host = crate::shm::host_key().to_string();
    let ids = ids.to_vec();
    net::send(conn, &DataRequest { ids, host }).await?;
    let reply: DataReply = net::recv(conn).await?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "data server closed the connection",
        )
    })?;
    let mut out = Vec::with_capacity(reply.items.len());
    for (id, v) in reply.items {
        let got = match v {
            // Its own frame, received into its own buffer: no copy.
            Some(Payload::Follows(n)) => {
                let n = usize::try_from(n)
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "frame too large"))?;
                Some(Fetched::Bytes(net::recv_raw(conn, n).await?))
            }
            Some(Payload::Bytes(b)) => Some(Fetched::Bytes(b)),
            // Opened at once: the holder may unlink it once it is released;
            // held (a shared lock) so that it does not reuse the memory while
            // this process reads it. (Gone already: it was spilled meanwhile;
            // the caller asks again.)
            Some(Payload::File { path, .. }) => Some(Fetched::File(crate::shm_pool::open_shared(
                std::path::Path::new(&path),
            )?)),
            Some(Payload::Unpicklable(why)) => Some(Fetched::Unpicklable(why)),
            None => None,
        };
        out.push((id, got));
    }
    Ok(out)
}

/// Data connections kept open after a fetch for the next fetch from the
/// same worker: a new one costs a connection, the cluster's handshake and,
/// under TLS, a TLS handshake at both ends (a shuffle fetches from each
/// peer again and again). At most [`PER_PEER`](idle_conns::PER_PEER) per
/// worker and [`MAX`](idle_conns::MAX) in all, none kept past
/// [`FOR`](idle_conns::FOR).
mod idle_conns {
    use crate::net::Conn;
    use parking_lot::Mutex;
    use rustc_hash::FxHashMap;
    use std::time::{Duration, Instant};

    pub(super) const PER_PEER: usize = 4;
    pub(super) const MAX: usize = 64;
    pub(super) const FOR: Duration = Duration::from_secs(30);

    struct Idle {
        /// The process they belong to: a forked child must not use (or
        /// drop: their runtime is its parent's) its parent's connections.
        pid: u32,
        by_addr: FxHashMap<String, Vec<(Conn, Instant)>>,
        count: usize,
    }

    static IDLE: Mutex<Option<Idle>> = Mutex::new(None);

    fn with<R>(f: impl FnOnce(&mut Idle) -> R) -> R {
        let mut g = IDLE.lock();
        let pid = std::process::id();
        if g.as_ref().is_some_and(|i| i.pid != pid) {
            std::mem::forget(g.take()); // the parent's: leaked, never dropped here
        }
        let idle = g.get_or_insert_with(|| Idle {
            pid,
            by_addr: FxHashMap::default(),
            count: 0,
        });
        f(idle)
    }

    /// A kept connection to `addr` (the most recently used), if any.
    pub(super) fn take(addr: &str) -> Option<Conn> {
        let stale = with(|i| {
            let v = i.by_addr.get_mut(addr)?;
            let now = Instant::now();
            let before = v.len();
            // Kept in the order they were put: the stale ones come first.
            let n = v
                .iter()
                .take_while(|(_, t)| now.duration_since(*t) > FOR)
                .count();
            let old: Vec<_> = v.drain(..n).collect();
            let got = v.pop();
            i.count -= before - v.len();
            if v.is_empty() {
                i.by_addr.remove(addr);
            }
            Some((got.map(|(c, _)| c), old))
        });
        let (got, old) = stale?;
        drop(old); // closed outside the lock
        got
    }

    /// Keeps `conn` to `addr` for the next fetch (or closes it: too many).
    pub(super) fn put(addr: &str, conn: Conn) {
        let evicted = with(|i| {
            let v = i.by_addr.entry(addr.to_string()).or_default();
            if v.len() >= PER_PEER {
                return Some(conn);
            }
            v.push((conn, Instant::now()));
            i.count += 1;
            if i.count <= MAX {
                return None;
            }
            // Over the total: the oldest connection anywhere goes.
            let (k, at) = i
                .by_addr
                .iter()
                .flat_map(|(k, v)| v.iter().enumerate().map(move |(j, (_, t))| (k, j, *t)))
                .min_by_key(|&(_, _, t)| t)
                .map(|(k, j, _)| (k.clone(), j))?;
            let v = i.by_addr.get_mut(&k)?;
            let (c, _) = v.remove(at);
            if v.is_empty() {
                i.by_addr.remove(&k);
            }
            i.count -= 1;
            Some(c)
        });
        drop(evicted);
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn conn() -> Conn {
            crate::net::framed(Box::new(tokio::io::duplex(64).0))
        }

        #[test]
        fn kept_per_peer_and_in_all_and_taken_newest_first() {
            let _rt = crate::runtime().enter();
            for _ in 0..PER_PEER + 2 {
                put("a", conn());
            }
            let mut taken = 0;
            while take("a").is_some() {
                taken += 1;
            }
            assert_eq!(taken, PER_PEER);
            for p in 0..MAX + 10 {
                put(&format!("p{p}"), conn());
            }
            assert_eq!(with(|i| i.count), MAX);
            // The oldest went: the first peers have none left.
            assert!(take("p0").is_none());
            assert!(take(&format!("p{}", MAX + 9)).is_some());
            with(|i| {
                i.by_addr.clear();
                i.count = 0;
            });
        }
    }
}
