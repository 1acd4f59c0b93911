//! Light workers for scale tests and benchmarks: each one a real
//! connection to the scheduler, with the real handshake and heartbeats,
//! that "runs" every task it is sent by answering at once with `None` (a
//! pickle, inline). Hundreds share one process and one I/O thread, so a
//! cluster of a thousand workers fits on a laptop; what it measures is the
//! scheduler, not task execution. Started by the hidden `shoal
//! noop-workers` command.

use crate::net::{self, Address, Secret};
use futures::StreamExt;
use shoal_proto::{FromWorker, Role, Timing, ToWorker, WorkerMetrics};
use std::io;

/// `pickle.dumps(None, protocol=5)`.
const NONE_PICKLE: &[u8] = b"\x80\x05N.";

/// Runs one light worker until the scheduler tells it to shut down or the
/// connection ends.
pub async fn run(addr: Address, secret: Secret, name: String) -> io::Result<()> {
    let role = Role::Worker {
        nthreads: 1,
        // No data server (every result travels inline); the name keeps
        // the workers apart where they are listed by data address.
        data_addr: format!("noop://{name}"),
        name,
        pid: std::process::id(),
        resources: Vec::new(),
        lifetime_end_us: 0,
        supervisor: 0,
    };
    let (conn, _) = net::handshake(&addr, role, &secret).await?;
    let (out, mut stream) = net::split_batched::<FromWorker>(conn);
    let mut beat = tokio::time::interval(net::heartbeat_interval());
    let value = bytes::Bytes::from_static(NONE_PICKLE);
    loop {
        tokio::select! {
            _ = beat.tick() => {
                let _ = out.send(FromWorker::Heartbeat(WorkerMetrics::default()));
            }
            frame = stream.next() => {
                let Some(frame) = frame else { return Ok(()) };
                for msg in net::decode_batch::<ToWorker>(frame)? {
                    match msg {
                        ToWorker::Compute { id, .. } => {
                            let _ = out.send(FromWorker::Started(vec![id]));
                            let _ = out.send(FromWorker::Finished {
                                id,
                                size: value.len() as u64,
                                value: Some(value.clone()),
                                timing: Timing::default(),
                            });
                        }
                        ToWorker::Sync(n) => {
                            let _ = out.send(FromWorker::Synced(n));
                        }
                        ToWorker::Replicate { id, .. } => {
                            let _ = out.send(FromWorker::Replicated { id, ok: false });
                        }
                        ToWorker::Shutdown => return Ok(()),
                        // Nothing queued to give back, nothing held, no
                        // reports to acknowledge.
                        _ => {}
                    }
                }
            }
        }
    }
}

/// Runs `count` light workers on the current runtime; returns when all have
/// ended, with the first error.
pub async fn run_many(addr: Address, secret: Secret, count: usize) -> io::Result<()> {
    let pid = std::process::id();
    let tasks: Vec<_> = (0..count)
        .map(|i| tokio::spawn(run(addr.clone(), secret.clone(), format!("noop-{pid}-{i}"))))
        .collect();
    let mut first = Ok(());
    for t in tasks {
        let r = t.await.unwrap_or_else(|e| Err(io::Error::other(e)));
        if first.is_ok() {
            first = r;
        }
    }
    first
}
