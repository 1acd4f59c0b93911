//! Addresses, listeners, framed connections and the batching writer.

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use hmac::{Hmac, KeyInit, Mac};
use serde::{de::DeserializeOwned, Serialize};
use sha2::Sha256;
use shoal_proto::{decode, encode, Hello, Proof, Role, Welcome, MAX_FRAME};
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

mod address;
mod auth;
mod frames;
mod listen;
mod memory;
mod outbox;
mod raw;
mod stream;
mod tls;

pub use address::*;
pub use auth::*;
pub use frames::*;
pub use listen::*;
pub use outbox::*;
pub use raw::*;
pub use stream::*;
pub use tls::*;

/// How often the scheduler pings and workers and clients send heartbeats
/// (more often under a heartbeat timeout below 4 s: see
/// [`heartbeat_interval`]).
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// How long a peer may stay silent before it is taken as lost:
/// `SHOAL_HEARTBEAT_TIMEOUT` seconds, default 5, at least 0.5.
pub fn heartbeat_timeout() -> Duration {
    crate::settings::seconds("SHOAL_HEARTBEAT_TIMEOUT", f64::MIN_POSITIVE)
        .unwrap_or(Duration::from_secs(5))
        .max(Duration::from_millis(500))
}

/// The heartbeat period: [`HEARTBEAT`], or a quarter of the timeout when
/// that is shorter, so a peer is heard from several times per timeout.
pub fn heartbeat_interval() -> Duration {
    (heartbeat_timeout() / 4).min(HEARTBEAT)
}

/// How long one frame's write may make no headway before the connection is
/// given up (the largest frame, 1 GiB, passes at 10 MB/s within it).
pub const WRITE_STALL: Duration = Duration::from_secs(120);

/// How long a peer has to complete the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests;
