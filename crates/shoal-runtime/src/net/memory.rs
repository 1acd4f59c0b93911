//! The in-memory transport, `mem://NAME`: listeners and connections inside
//! this process over tokio's duplex pipes. Everything above the byte stream
//! is the same as over sockets (handshake, framing, batching), so the
//! scheduler's and the worker's glue run and are tested without sockets
//! (`scheduler/tests.rs`, `worker/tests.rs`).

use super::*;
use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use tokio::io::DuplexStream;

/// Bytes a pipe buffers each way before a writer waits (a socket's order).
const PIPE: usize = 256 * 1024;

type Backlog = mpsc::UnboundedSender<DuplexStream>;

static LISTENING: LazyLock<Mutex<HashMap<String, Backlog>>> = LazyLock::new(Default::default);

/// Listens on `name`; `AddrInUse` if something already does.
pub(crate) fn bind(name: &str) -> io::Result<mpsc::UnboundedReceiver<DuplexStream>> {
    let mut all = LISTENING.lock().unwrap_or_else(|e| e.into_inner());
    if all.get(name).is_some_and(|b| !b.is_closed()) {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("mem://{name} is already listened on"),
        ));
    }
    let (tx, rx) = mpsc::unbounded_channel();
    all.insert(name.to_string(), tx);
    Ok(rx)
}

/// Stops listening on `name` (the listener was dropped).
pub(crate) fn unbind(name: &str) {
    LISTENING
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|n, b| n != name && !b.is_closed());
}

/// A connection to the listener on `name`; `ConnectionRefused` if none.
pub(crate) fn connect(name: &str) -> io::Result<DuplexStream> {
    let refused = || {
        io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("nothing listens on mem://{name}"),
        )
    };
    let all = LISTENING.lock().unwrap_or_else(|e| e.into_inner());
    let backlog = all.get(name).ok_or_else(refused)?;
    let (ours, theirs) = tokio::io::duplex(PIPE);
    backlog.send(theirs).map_err(|_| refused())?;
    Ok(ours)
}
