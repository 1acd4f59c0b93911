//! Addresses, listeners, framed connections and the batching writer.

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde::{de::DeserializeOwned, Serialize};
use shoal_proto::{decode, encode, Hello, Role, Welcome, MAX_FRAME};
use std::io;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

/// Where a scheduler or a worker's data server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// `unix:///path/to/socket`
    Unix(PathBuf),
    /// `tcp://host:port`
    Tcp(String),
}

impl Address {
    /// Parses `unix://PATH` or `tcp://HOST:PORT` (a bare `HOST:PORT` means TCP).
    pub fn parse(s: &str) -> Result<Address, String> {
        if let Some(p) = s.strip_prefix("unix://") {
            if p.is_empty() {
                return Err(format!("address {s:?} has no socket path"));
            }
            Ok(Address::Unix(PathBuf::from(p)))
        } else {
            let hp = s.strip_prefix("tcp://").unwrap_or(s);
            match hp.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {
                    Ok(Address::Tcp(hp.to_string()))
                }
                _ => Err(format!(
                    "cannot parse address {s:?}: expected tcp://HOST:PORT or unix:///PATH"
                )),
            }
        }
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "unix://{}", p.display()),
            Address::Tcp(hp) => write!(f, "tcp://{hp}"),
        }
    }
}

/// Any byte stream a connection runs over.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// A length-framed connection.
pub type Conn = Framed<Box<dyn Stream>, LengthDelimitedCodec>;

fn framed(s: Box<dyn Stream>) -> Conn {
    let codec = LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .new_codec();
    Framed::new(s, codec)
}

/// A bound listener.
pub enum Listener {
    /// Unix socket.
    Unix(UnixListener, PathBuf),
    /// TCP.
    Tcp(TcpListener),
}

impl Listener {
    /// Binds; `tcp://host:0` picks a free port.
    pub async fn bind(addr: &Address) -> io::Result<Listener> {
        match addr {
            Address::Unix(p) => Ok(Listener::Unix(UnixListener::bind(p)?, p.clone())),
            Address::Tcp(hp) => Ok(Listener::Tcp(TcpListener::bind(hp.as_str()).await?)),
        }
    }

    /// The address peers connect to.
    pub fn local_addr(&self) -> io::Result<Address> {
        match self {
            Listener::Unix(_, p) => Ok(Address::Unix(p.clone())),
            Listener::Tcp(l) => Ok(Address::Tcp(l.local_addr()?.to_string())),
        }
    }

    /// Next connection, framed.
    pub async fn accept(&self) -> io::Result<Conn> {
        match self {
            Listener::Unix(l, _) => Ok(framed(Box::new(l.accept().await?.0))),
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                s.set_nodelay(true)?;
                Ok(framed(Box::new(s)))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Opens a framed connection.
pub async fn connect(addr: &Address) -> io::Result<(Conn, Option<std::net::IpAddr>)> {
    match addr {
        Address::Unix(p) => Ok((framed(Box::new(UnixStream::connect(p).await?)), None)),
        Address::Tcp(hp) => {
            let s = TcpStream::connect(hp.as_str()).await?;
            s.set_nodelay(true)?;
            let ip = s.local_addr()?.ip();
            Ok((framed(Box::new(s)), Some(ip)))
        }
    }
}

/// Sends one frame.
pub async fn send<T: Serialize>(conn: &mut Conn, value: &T) -> io::Result<()> {
    conn.send(Bytes::from(encode(value))).await
}

/// Receives one frame; `Ok(None)` when the peer closed. A malformed or
/// oversized frame is an `InvalidData` error (the caller drops the connection).
pub async fn recv<T: DeserializeOwned>(conn: &mut Conn) -> io::Result<Option<T>> {
    match conn.next().await {
        None => Ok(None),
        Some(frame) => {
            let frame = frame?;
            decode(&frame)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
        }
    }
}

/// How long a peer has to complete the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects and introduces ourselves; returns the connection and the id the
/// scheduler assigned. Refusals come back as errors with the scheduler's reason.
pub async fn handshake(addr: &Address, role: Role) -> io::Result<(Conn, u32)> {
    let fut = async {
        let (mut conn, _) = connect(addr).await?;
        send(&mut conn, &Hello::new(role)).await?;
        match recv::<Welcome>(&mut conn).await? {
            Some(Welcome::Accepted { id }) => Ok((conn, id)),
            Some(Welcome::Rejected { reason }) => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{addr} refused the connection: {reason}"),
            )),
            None => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("{addr} closed the connection during the handshake"),
            )),
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, fut)
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("handshake with {addr} timed out"),
            )
        })?
}

/// Splits a connection: returns a sender whose messages are written in
/// batches (everything queued since the last write goes out as one frame),
/// and the read half.
pub fn split_batched<M: Serialize + Send + 'static>(
    conn: Conn,
) -> (mpsc::UnboundedSender<M>, futures::stream::SplitStream<Conn>) {
    let (mut sink, stream) = conn.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<M>();
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(256);
        while rx.recv_many(&mut batch, 8192).await > 0 {
            let body = Bytes::from(encode(&batch));
            batch.clear();
            if sink.send(body).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    (tx, stream)
}

/// Decodes one batch frame from a split read half.
pub fn decode_batch<M: DeserializeOwned>(frame: io::Result<bytes::BytesMut>) -> io::Result<Vec<M>> {
    let frame = frame?;
    decode(&frame).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        for bad in ["", "tcp://host", "unix://", "host:notaport"] {
            assert!(
                Address::parse(bad).unwrap_err().contains("address"),
                "{bad}"
            );
        }
    }
}
