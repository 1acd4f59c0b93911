//! Listeners (authenticating what they accept, a bounded number at a time)
//! and outgoing connections.

use super::*;

/// A length-framed connection.
pub type Conn = Framed<Box<dyn Stream>, LengthDelimitedCodec>;

/// Largest frame either side reads before the handshake has succeeded: a
/// hello, a challenge or a proof fits in a few hundred bytes, and a peer
/// that has not proved the token must not make us reserve more.
pub const PREAUTH_MAX_FRAME: usize = 8 * 1024;

/// Connections per listener that may be in their handshake at once; the
/// next one waits in the kernel's backlog until one of them ends
/// (authenticated, refused or timed out), so a flood of unauthenticated
/// connections holds a bounded amount of memory.
pub const MAX_PENDING_HANDSHAKES: usize = 256;

pub(crate) fn framed(s: Box<dyn Stream>) -> Conn {
    let codec = LengthDelimitedCodec::builder()
        .max_frame_length(PREAUTH_MAX_FRAME)
        .new_codec();
    Framed::new(s, codec)
}

/// After the handshake: frames up to [`MAX_FRAME`].
pub(crate) fn authenticated(conn: &mut Conn) {
    conn.codec_mut().set_max_frame_length(MAX_FRAME);
}

/// A bound listener.
pub struct Listener {
    kind: Kind,
    pending: Arc<tokio::sync::Semaphore>,
}

pub(crate) enum Kind {
    /// Unix socket.
    Unix(UnixListener, PathBuf),
    /// TCP.
    Tcp(TcpListener),
    /// TCP, each connection wrapped in TLS.
    Tls(TcpListener, tokio_rustls::TlsAcceptor),
    /// In this process (`mem://`).
    Memory(
        tokio::sync::Mutex<mpsc::UnboundedReceiver<tokio::io::DuplexStream>>,
        String,
    ),
}

/// An accepted connection that has yet to prove the cluster's token:
/// [`Incoming::authenticate`] runs the handshakes in the connection's own
/// task, so a slow peer holds up no one. It holds one of its listener's
/// [`MAX_PENDING_HANDSHAKES`] places until then.
pub struct Incoming {
    stream: Box<dyn Stream>,
    tls: Option<TlsPending>,
    place: tokio::sync::OwnedSemaphorePermit,
}

impl Incoming {
    /// Runs the transport (TLS) and token handshakes within
    /// [`HANDSHAKE_TIMEOUT`] in all: `Ok` with the peer's hello once it has
    /// proved the token (the caller answers `Welcome::Accepted` or refuses
    /// its role); from then on frames up to [`MAX_FRAME`] are read. Failures
    /// are logged and the connection is dropped.
    pub async fn authenticate(self, secret: &Secret, peer: &str) -> Result<(Conn, Hello), ()> {
        let Incoming { stream, tls, place } = self;
        let run = async {
            let established = match tls {
                None => Ok(framed(stream)),
                Some((acceptor, tcp)) => acceptor
                    .accept(ReadAhead::new(tcp))
                    .await
                    .map(|s| framed(Box::new(s))),
            };
            let mut conn = match established {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("dropping {peer}: TLS handshake failed ({e})");
                    return Err(());
                }
            };
            let hello = accept_handshake(&mut conn, secret, peer).await?;
            authenticated(&mut conn);
            Ok((conn, hello))
        };
        let outcome = tokio::time::timeout(HANDSHAKE_TIMEOUT, run).await;
        drop(place);
        match outcome {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!(
                    "dropping {peer}: no complete handshake within {HANDSHAKE_TIMEOUT:?}"
                );
                Err(())
            }
        }
    }
}

impl Listener {
    /// Binds; `tcp://host:0` picks a free port. `tls://` needs TLS to be
    /// configured ([`configure_tls`] or the `SHOAL_TLS_*` variables).
    pub async fn bind(addr: &Address) -> io::Result<Listener> {
        let kind = match addr {
            Address::Unix(p) => Kind::Unix(UnixListener::bind(p)?, p.clone()),
            Address::Tcp(hp) => Kind::Tcp(TcpListener::bind(hp.as_str()).await?),
            Address::Tls(hp) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(tls()?.server.clone());
                Kind::Tls(TcpListener::bind(hp.as_str()).await?, acceptor)
            }
            Address::Memory(name) => {
                Kind::Memory(tokio::sync::Mutex::new(memory::bind(name)?), name.clone())
            }
        };
        Ok(Listener {
            kind,
            pending: Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES)),
        })
    }

    /// The address peers connect to.
    pub fn local_addr(&self) -> io::Result<Address> {
        match &self.kind {
            Kind::Unix(_, p) => Ok(Address::Unix(p.clone())),
            Kind::Tcp(l) => Ok(Address::Tcp(l.local_addr()?.to_string())),
            Kind::Tls(l, _) => Ok(Address::Tls(l.local_addr()?.to_string())),
            Kind::Memory(_, name) => Ok(Address::Memory(name.clone())),
        }
    }

    /// Next connection, and who it comes from (for logs); call
    /// [`Incoming::authenticate`] on it in its own task. Waits while
    /// [`MAX_PENDING_HANDSHAKES`] connections are in their handshake.
    /// Accept errors (out of file descriptors, say) are logged and retried
    /// with a growing pause, so they never spin the I/O thread.
    pub async fn accept(&self) -> (Incoming, String) {
        let place = self
            .pending
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let mut pause = Duration::from_millis(5);
        loop {
            match self.accept_once().await {
                Ok((stream, tls, peer)) => return (Incoming { stream, tls, place }, peer),
                Err(e) => {
                    tracing::warn!("accept failed: {e}; retrying in {pause:?}");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    async fn accept_once(&self) -> io::Result<(Box<dyn Stream>, Option<TlsPending>, String)> {
        match &self.kind {
            Kind::Unix(l, p) => Ok((
                Box::new(l.accept().await?.0),
                None,
                format!("unix://{}", p.display()),
            )),
            Kind::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                // Fails only for a connection already reset: not worth refusing.
                let _ = s.set_nodelay(true);
                Ok((Box::new(s), None, peer.to_string()))
            }
            Kind::Tls(l, acceptor) => {
                let (s, peer) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((
                    Box::new(tokio::io::empty()),
                    Some((acceptor.clone(), s)),
                    peer.to_string(),
                ))
            }
            Kind::Memory(backlog, name) => match backlog.lock().await.recv().await {
                Some(s) => Ok((Box::new(s), None, format!("mem://{name}"))),
                // Unreachable while the listener holds the name; never spin.
                None => std::future::pending().await,
            },
        }
    }
}

pub(crate) type TlsPending = (tokio_rustls::TlsAcceptor, TcpStream);

impl Drop for Listener {
    fn drop(&mut self) {
        match &self.kind {
            Kind::Unix(_, p) => {
                let _ = std::fs::remove_file(p);
            }
            Kind::Memory(_, name) => memory::unbind(name),
            _ => {}
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
        Address::Tls(hp) => {
            let connector = tokio_rustls::TlsConnector::from(tls()?.client.clone());
            let s = TcpStream::connect(hp.as_str()).await?;
            s.set_nodelay(true)?;
            let ip = s.local_addr()?.ip();
            let name = rustls_pki_types::ServerName::try_from(TLS_NAME).expect("a valid name");
            let s = connector.connect(name, ReadAhead::new(s)).await?;
            Ok((framed(Box::new(s)), Some(ip)))
        }
        Address::Memory(name) => Ok((framed(Box::new(memory::connect(name)?)), None)),
    }
}
