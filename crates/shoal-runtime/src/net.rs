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

/// Where a scheduler or a worker's data server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// `unix:///path/to/socket`
    Unix(PathBuf),
    /// `tcp://host:port`
    Tcp(String),
    /// `tls://host:port`: TCP with mutual TLS (see [`configure_tls`]).
    Tls(String),
}

impl Address {
    /// Parses `unix://PATH`, `tcp://HOST:PORT` or `tls://HOST:PORT` (a bare
    /// `HOST:PORT` means TCP).
    pub fn parse(s: &str) -> Result<Address, String> {
        if let Some(p) = s.strip_prefix("unix://") {
            if p.is_empty() {
                return Err(format!("address {s:?} has no socket path"));
            }
            return Ok(Address::Unix(PathBuf::from(p)));
        }
        let (tls, hp) = match s.strip_prefix("tls://") {
            Some(hp) => (true, hp),
            None => (false, s.strip_prefix("tcp://").unwrap_or(s)),
        };
        match hp.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => Ok(if tls {
                Address::Tls(hp.to_string())
            } else {
                Address::Tcp(hp.to_string())
            }),
            _ => Err(format!(
                "cannot parse address {s:?}: expected tcp://HOST:PORT, tls://HOST:PORT \
                 or unix:///PATH"
            )),
        }
    }

    /// The same kind of address (transport) at `host_port`.
    pub fn with_host_port(&self, host_port: String) -> Address {
        match self {
            Address::Tls(_) => Address::Tls(host_port),
            _ => Address::Tcp(host_port),
        }
    }
}

/// The IPv4 address of network interface `name` (`ib0`, `eth0`): where a
/// multi-homed node listens and what it advertises (`--interface`).
pub fn interface_ip(name: &str) -> io::Result<std::net::IpAddr> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = None;
    let mut names = Vec::new();
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        // SAFETY: ifa_name is a NUL-terminated string while the list lives.
        let n = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
        if !ifa.ifa_addr.is_null()
        // SAFETY: ifa_addr points to a sockaddr while the list lives.
        && i32::from(unsafe { (*ifa.ifa_addr).sa_family }) == libc::AF_INET
        {
            if n == name && found.is_none() {
                // SAFETY: an AF_INET sockaddr is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                found = Some(std::net::IpAddr::V4(std::net::Ipv4Addr::from(
                    u32::from_be(sin.sin_addr.s_addr),
                )));
            }
            names.push(n.into_owned());
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(list) };
    found.ok_or_else(|| {
        names.sort();
        names.dedup();
        io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "no network interface {name:?} with an IPv4 address here; this host has: {}",
                names.join(", ")
            ),
        )
    })
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "unix://{}", p.display()),
            Address::Tcp(hp) => write!(f, "tcp://{hp}"),
            Address::Tls(hp) => write!(f, "tls://{hp}"),
        }
    }
}

/// Any byte stream a connection runs over.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The socket, when bytes written to it go out as they are (not
    /// through TLS): then a blocking thread can write to it directly
    /// ([`send_raw_parts`]).
    fn plain_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

impl Stream for TcpStream {
    fn plain_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(std::os::fd::AsRawFd::as_raw_fd(self))
    }
}

impl Stream for UnixStream {
    fn plain_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(std::os::fd::AsRawFd::as_raw_fd(self))
    }
}

impl Stream for tokio_rustls::server::TlsStream<ReadAhead> {}
impl Stream for tokio_rustls::client::TlsStream<ReadAhead> {}

/// A TLS connection's socket, read in large pieces while data streams in.
/// rustls asks for a few KiB at a time, one system call per 4 KiB of a bulk
/// transfer; once a read fills what was asked (more is waiting), this
/// reads up to 256 KiB per call into a buffer of its own,
/// which it lets go once a read finds less than a quarter of it: a
/// connection carrying only messages holds none (the scheduler has one per
/// worker and client).
pub struct ReadAhead {
    inner: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    slowed: bool,
}

impl ReadAhead {
    const CHUNK: usize = 256 << 10;

    fn new(inner: TcpStream) -> ReadAhead {
        ReadAhead {
            inner,
            buf: Vec::new(),
            pos: 0,
            end: 0,
            slowed: false,
        }
    }
}

impl AsyncRead for ReadAhead {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        use std::task::Poll;
        let me = self.get_mut();
        if me.pos == me.end && me.buf.is_empty() {
            // Not streaming: straight into the caller's buffer.
            let before = out.filled().len();
            let r = std::pin::Pin::new(&mut me.inner).poll_read(cx, out);
            // A read of at least a page that filled all it was given.
            let bulk = out.filled().len() - before >= 4096 && out.remaining() == 0;
            if matches!(r, Poll::Ready(Ok(()))) && bulk {
                me.buf = vec![0; ReadAhead::CHUNK];
            }
            return r;
        }
        if me.pos == me.end {
            let mut rb = tokio::io::ReadBuf::new(&mut me.buf);
            std::task::ready!(std::pin::Pin::new(&mut me.inner).poll_read(cx, &mut rb))?;
            (me.pos, me.end) = (0, rb.filled().len());
            // The stream has slowed (or ended): the buffer goes once drained.
            me.slowed = me.end < ReadAhead::CHUNK / 4;
        }
        let k = (me.end - me.pos).min(out.remaining());
        out.put_slice(&me.buf[me.pos..me.pos + k]);
        me.pos += k;
        if me.pos == me.end {
            (me.pos, me.end) = (0, 0);
            if me.slowed {
                me.buf = Vec::new();
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ReadAhead {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
impl Stream for tokio::io::Empty {}
impl Stream for tokio::io::DuplexStream {}

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
fn authenticated(conn: &mut Conn) {
    conn.codec_mut().set_max_frame_length(MAX_FRAME);
}

/// A bound listener.
pub struct Listener {
    kind: Kind,
    pending: Arc<tokio::sync::Semaphore>,
}

enum Kind {
    /// Unix socket.
    Unix(UnixListener, PathBuf),
    /// TCP.
    Tcp(TcpListener),
    /// TCP, each connection wrapped in TLS.
    Tls(TcpListener, tokio_rustls::TlsAcceptor),
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
        }
    }
}

type TlsPending = (tokio_rustls::TlsAcceptor, TcpStream);

/// TLS settings of this process: every shoal certificate is issued by the
/// site's CA and names `shoal` (what `shoal certs` makes); both ends of
/// every connection present one (mutual TLS).
pub struct TlsConfig {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
    /// The dashboard's: the same certificate, no client certificate asked
    /// (browsers have none; the dashboard token guards it).
    https: Arc<rustls::ServerConfig>,
    paths: [PathBuf; 3],
}

/// The name every shoal certificate carries and every peer checks.
pub const TLS_NAME: &str = "shoal";

static TLS: std::sync::OnceLock<TlsConfig> = std::sync::OnceLock::new();

fn tls_err(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("TLS: {what}: {e}"))
}

fn load_tls(
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> io::Result<TlsConfig> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let read = |p: &std::path::Path| -> io::Result<Vec<CertificateDer<'static>>> {
        CertificateDer::pem_file_iter(p)
            .map_err(|e| tls_err(&format!("cannot read {}", p.display()), e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| tls_err(&format!("bad certificate in {}", p.display()), e))
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in read(ca)? {
        roots.add(c).map_err(|e| tls_err("bad CA certificate", e))?;
    }
    let roots = Arc::new(roots);
    let chain = read(cert)?;
    let key_path = key;
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| tls_err(&format!("cannot read the key {}", key_path.display()), e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err("protocol versions", e))?
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(chain.clone(), key.clone_key())
        .map_err(|e| tls_err("certificate and key", e))?;
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| tls_err("client verifier", e))?;
    let mut https = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err("protocol versions", e))?
        .with_no_client_auth()
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| tls_err("certificate and key", e))?;
    https.alpn_protocols = vec![b"http/1.1".to_vec()];
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err("protocol versions", e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| tls_err("certificate and key", e))?;
    Ok(TlsConfig {
        client: Arc::new(client),
        server: Arc::new(server),
        https: Arc::new(https),
        paths: [ca.into(), cert.into(), key_path.into()],
    })
}

/// Sets this process's TLS certificates (CA, own certificate, own key; PEM
/// files). Once per process; setting other files later is an error.
pub fn configure_tls(
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> io::Result<()> {
    let wanted = [ca.to_path_buf(), cert.to_path_buf(), key.to_path_buf()];
    if let Some(t) = TLS.get() {
        if t.paths == wanted {
            return Ok(());
        }
        return Err(tls_err(
            "already configured",
            format!("this process uses {:?}", t.paths),
        ));
    }
    let cfg = load_tls(ca, cert, key)?;
    let _ = TLS.set(cfg);
    Ok(())
}

/// The dashboard's TLS acceptor (server certificate only), for a process
/// whose cluster uses TLS.
pub fn https_acceptor() -> io::Result<tokio_rustls::TlsAcceptor> {
    Ok(tokio_rustls::TlsAcceptor::from(tls()?.https.clone()))
}

/// The process's TLS settings: from [`configure_tls`], else from
/// `SHOAL_TLS_CA`, `SHOAL_TLS_CERT` and `SHOAL_TLS_KEY`.
fn tls() -> io::Result<&'static TlsConfig> {
    if let Some(t) = TLS.get() {
        return Ok(t);
    }
    let var = |n: &str| std::env::var_os(n).map(PathBuf::from);
    match (
        var("SHOAL_TLS_CA"),
        var("SHOAL_TLS_CERT"),
        var("SHOAL_TLS_KEY"),
    ) {
        (Some(ca), Some(cert), Some(key)) => {
            configure_tls(&ca, &cert, &key)?;
            Ok(TLS.get().expect("just set"))
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a tls:// address needs certificates: --tls-ca/--tls-cert/--tls-key (or \
             SHOAL_TLS_CA, SHOAL_TLS_CERT, SHOAL_TLS_KEY); `shoal certs DIR` makes a set",
        )),
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Kind::Unix(_, p) = &self.kind {
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
        Address::Tls(hp) => {
            let connector = tokio_rustls::TlsConnector::from(tls()?.client.clone());
            let s = TcpStream::connect(hp.as_str()).await?;
            s.set_nodelay(true)?;
            let ip = s.local_addr()?.ip();
            let name = rustls_pki_types::ServerName::try_from(TLS_NAME).expect("a valid name");
            let s = connector.connect(name, ReadAhead::new(s)).await?;
            Ok((framed(Box::new(s)), Some(ip)))
        }
    }
}

/// Sends one frame.
pub async fn send<T: Serialize>(conn: &mut Conn, value: &T) -> io::Result<()> {
    conn.send(Bytes::from(encode(value))).await
}

/// Sends `data` as one frame written straight to the stream from where it
/// lies (the codec would copy it into its write buffer first). The frame
/// is the codec's: a 4-byte big-endian length, then the bytes.
pub async fn send_raw(conn: &mut Conn, data: &[u8]) -> io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let len = u32::try_from(data.len())
        .ok()
        .filter(|&n| n as usize <= conn.codec().max_frame_length())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} bytes do not fit in one frame", data.len()),
            )
        })?;
    SinkExt::<Bytes>::flush(conn).await?; // what the codec holds goes first
    let s = conn.get_mut();
    s.write_all(&len.to_be_bytes()).await?;
    s.write_all(data).await?;
    s.flush().await
}

/// A peer that takes none of a file being sent for this long is given up.
const SEND_STALL: Duration = Duration::from_secs(60);

/// One raw frame's bytes (see [`send_raw_parts`]).
pub enum RawPart {
    /// Bytes in memory.
    Bytes(Bytes),
    /// The first bytes of an open file.
    File(std::fs::File, u64),
    /// Pieces sent one after another as one frame.
    Gather(Vec<Bytes>),
}

impl RawPart {
    fn len(&self) -> u64 {
        match self {
            RawPart::Bytes(b) => b.len() as u64,
            RawPart::File(_, n) => *n,
            RawPart::Gather(parts) => parts.iter().map(|p| p.len() as u64).sum(),
        }
    }
}

/// Sends each part as one frame, received like those of [`send_raw`],
/// files from a mapping of their pages (no copy into a buffer first):
/// over a plain socket all parts go out from the blocking pool in one go,
/// so neither many small parts nor a file spilled to disk stall the I/O
/// thread; through TLS they are encrypted on the I/O thread.
pub async fn send_raw_parts(conn: &mut Conn, parts: Vec<RawPart>) -> io::Result<()> {
    use tokio::io::AsyncWriteExt;
    for p in &parts {
        let n = p.len();
        if n > conn.codec().max_frame_length() as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{n} bytes do not fit in one frame"),
            ));
        }
        if let RawPart::File(f, n) = p {
            if f.metadata()?.len() < *n {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "a file is shorter than its frame",
                ));
            }
        }
    }
    if parts.is_empty() {
        return Ok(());
    }
    SinkExt::<Bytes>::flush(conn).await?; // what the codec holds goes first
    if let Some(fd) = conn.get_ref().plain_fd() {
        conn.get_mut().flush().await?;
        // Its own descriptor: it stays valid even if this future is dropped
        // while the blocking thread still sends.
        // SAFETY: `fd` is the open socket of `conn`, borrowed for the dup.
        let sock = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
        return tokio::task::spawn_blocking(move || {
            for p in parts {
                let head = (p.len() as u32).to_be_bytes();
                send_all(&sock, &head, libc::MSG_MORE)?;
                match p {
                    RawPart::Bytes(b) => send_all(&sock, &b, 0)?,
                    // From a mapping of the file: `sendfile` over a veth
                    // pair moved 512 MiB at 1.74 GiB/s, this at 2.2.
                    RawPart::File(f, n) => {
                        let map = map_file(&f, n)?;
                        // SAFETY: checked at least `n` long above; result
                        // files are never shortened, only unlinked.
                        send_all(&sock, unsafe { map.bytes() }, 0)?
                    }
                    RawPart::Gather(parts) => {
                        let last = parts.len().saturating_sub(1);
                        for (i, b) in parts.iter().enumerate() {
                            send_all(&sock, b, if i < last { libc::MSG_MORE } else { 0 })?;
                        }
                    }
                }
            }
            Ok(())
        })
        .await
        .map_err(io::Error::other)?;
    }
    for p in parts {
        let head = (p.len() as u32).to_be_bytes();
        conn.get_mut().write_all(&head).await?;
        match p {
            RawPart::Bytes(b) => conn.get_mut().write_all(&b).await?,
            RawPart::Gather(parts) => {
                for b in parts {
                    conn.get_mut().write_all(&b).await?;
                }
            }
            RawPart::File(f, len) => {
                // Encrypted straight from the file's pages (no copy into a
                // buffer first); mapped aligned so that huge pages map whole.
                let map = map_file(&f, len)?;
                // SAFETY: as above.
                conn.get_mut().write_all(unsafe { map.bytes() }).await?;
            }
        }
    }
    conn.get_mut().flush().await
}

/// A read-only mapping of a file's first `len` bytes (aligned so that
/// huge pages map whole).
fn map_file(f: &std::fs::File, len: u64) -> io::Result<crate::hugeshm::Mapping> {
    use std::os::fd::AsRawFd;
    let len = usize::try_from(len).map_err(io::Error::other)?;
    crate::hugeshm::map_aligned(f.as_raw_fd(), len, libc::PROT_READ, libc::MAP_SHARED)
}

/// Waits (at most [`SEND_STALL`]) until the non-blocking socket `sock`
/// has room.
fn wait_writable(sock: &std::os::fd::OwnedFd) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    let ms = SEND_STALL.as_millis() as libc::c_int;
    // SAFETY: one valid pollfd.
    match unsafe { libc::poll(&mut p, 1, ms) } {
        0 => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the peer took nothing for {SEND_STALL:?}"),
        )),
        r if r < 0 => {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => Ok(()),
                _ => Err(e),
            }
        }
        _ => Ok(()),
    }
}

/// After a failed call on the non-blocking socket `sock`: `Ok` to try
/// again (interrupted, or room made), else the error.
fn retry_after(sock: &std::os::fd::OwnedFd, e: io::Error) -> io::Result<()> {
    match e.kind() {
        io::ErrorKind::Interrupted => Ok(()),
        io::ErrorKind::WouldBlock => wait_writable(sock),
        _ => Err(e),
    }
}

/// `send` all of `data` on the non-blocking socket `sock`.
fn send_all(sock: &std::os::fd::OwnedFd, mut data: &[u8], flags: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    while !data.is_empty() {
        // SAFETY: an open socket and a valid buffer.
        let r = unsafe {
            libc::send(
                sock.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                flags | libc::MSG_NOSIGNAL,
            )
        };
        if r >= 0 {
            data = &data[r as usize..];
            continue;
        }
        retry_after(sock, io::Error::last_os_error())?;
    }
    Ok(())
}

/// Receives one frame of `n` bytes sent by [`send_raw`], read straight
/// into a buffer of its own (what the codec had read ahead goes first):
/// a large one into warm pages from [`crate::bufpool`].
pub async fn recv_raw(conn: &mut Conn, n: usize) -> io::Result<Bytes> {
    use bytes::Buf;
    use tokio::io::AsyncReadExt;
    if n > conn.codec().max_frame_length() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {n} bytes is over the limit"),
        ));
    }
    let mut head = [0u8; 4];
    {
        let ahead = conn.read_buffer_mut();
        let h = ahead.len().min(4);
        head[..h].copy_from_slice(&ahead[..h]);
        ahead.advance(h);
        if h < 4 {
            conn.get_mut().read_exact(&mut head[h..]).await?;
        }
    }
    let len = u32::from_be_bytes(head) as usize;
    if len != n {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("expected a frame of {n} bytes, got {len}"),
        ));
    }
    let (mut pooled, mut small) = if n >= crate::bufpool::MIN_POOLED {
        (Some(crate::bufpool::take(n)?), Vec::new())
    } else {
        (None, vec![0u8; n])
    };
    let dst: &mut [u8] = match &mut pooled {
        Some(b) => &mut b.spare()[..n],
        None => &mut small,
    };
    let ahead = conn.read_buffer_mut();
    let mut got = ahead.len().min(n);
    dst[..got].copy_from_slice(&ahead[..got]);
    ahead.advance(got);
    // No further than this frame: another may follow.
    while got < n {
        let k = conn.get_mut().read(&mut dst[got..]).await?;
        if k == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the connection mid-frame",
            ));
        }
        got += k;
    }
    Ok(match pooled {
        Some(mut b) => {
            b.advance(n);
            b.freeze()
        }
        None => Bytes::from(small),
    })
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

/// How often the scheduler pings and workers and clients send heartbeats
/// (more often under a heartbeat timeout below 4 s: see
/// [`heartbeat_interval`]).
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// How long a peer may stay silent before it is taken as lost:
/// `SHOAL_HEARTBEAT_TIMEOUT` seconds, default 5, at least 0.5.
pub fn heartbeat_timeout() -> Duration {
    let secs = std::env::var("SHOAL_HEARTBEAT_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(5.0);
    Duration::from_secs_f64(secs.max(0.5))
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

/// The cluster's shared secret. Every connection proves knowledge of it
/// (HMAC-SHA256 challenge-response, both ways); it never travels.
#[derive(Clone)]
pub struct Secret(Arc<Vec<u8>>);

impl Secret {
    /// A secret from its text form (a token, as in a token file; surrounding
    /// whitespace is ignored). Empty tokens are refused.
    pub fn from_token(token: &str) -> io::Result<Secret> {
        let t = token.trim();
        if t.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the cluster token is empty",
            ));
        }
        Ok(Secret(Arc::new(t.as_bytes().to_vec())))
    }

    /// A fresh random token (256 bits, hex).
    pub fn random() -> Secret {
        let token: String = nonce().iter().map(|b| format!("{b:02x}")).collect();
        Secret(Arc::new(token.into_bytes()))
    }

    /// The token's text, to hand to processes that join the cluster.
    pub fn token(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }

    fn hmac(&self, label: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
        let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).expect("any key length");
        m.update(label);
        for p in parts {
            m.update(&(p.len() as u64).to_le_bytes());
            m.update(p);
        }
        m
    }

    /// The dashboard's access token: derived from the cluster's, so anyone
    /// with the cluster token can open it, while the link does not reveal
    /// the cluster token itself.
    pub fn dashboard_token(&self) -> String {
        self.mac(b"shoal-dashboard", &[])[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn mac(&self, label: &[u8], parts: &[&[u8]]) -> [u8; 32] {
        self.hmac(label, parts).finalize().into_bytes().into()
    }

    fn verify(&self, label: &[u8], parts: &[&[u8]], mac: &[u8; 32]) -> bool {
        self.hmac(label, parts).verify_slice(mac).is_ok() // constant time
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    getrandom::fill(&mut n).expect("the OS has no random source");
    n
}

const SERVER: &[u8] = b"shoal server proof v1";
const CLIENT: &[u8] = b"shoal peer proof v1";

/// Connects and introduces ourselves; returns the connection and the id the
/// scheduler assigned. Both sides prove they know `secret`; refusals come
/// back as errors with the server's reason.
pub async fn handshake(addr: &Address, role: Role, secret: &Secret) -> io::Result<(Conn, u32)> {
    let fut = async {
        let (mut conn, _) = connect(addr).await?;
        let hello = Hello::new(role, nonce());
        send(&mut conn, &hello).await?;
        let closed = || {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("{addr} closed the connection during the handshake"),
            )
        };
        let refused = |reason: String| {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{addr} refused the connection: {reason}"),
            )
        };
        let server_nonce = match recv::<Welcome>(&mut conn).await?.ok_or_else(closed)? {
            Welcome::Challenge { nonce, proof } => {
                if !secret.verify(SERVER, &[&hello.nonce, &nonce], &proof) {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!(
                            "{addr} does not know this cluster's token: wrong token \
                             (check --token-file / SHOAL_TOKEN) or not this cluster"
                        ),
                    ));
                }
                nonce
            }
            Welcome::Rejected { reason } => return Err(refused(reason)),
            Welcome::Accepted { .. } => {
                return Err(refused("it skipped authentication".into()));
            }
        };
        let mac = secret.mac(CLIENT, &[&server_nonce, &hello.nonce, &encode(&hello)]);
        send(&mut conn, &Proof { mac }).await?;
        match recv::<Welcome>(&mut conn).await?.ok_or_else(closed)? {
            Welcome::Accepted { id } => {
                authenticated(&mut conn);
                Ok((conn, id))
            }
            Welcome::Rejected { reason } => Err(refused(reason)),
            Welcome::Challenge { .. } => Err(refused("a second challenge".into())),
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

/// Server side of the handshake: reads the peer's hello, challenges it and
/// checks its proof. `Ok(hello)` for a peer that knows `secret`; the caller
/// then sends `Welcome::Accepted`. Anything else is logged, refused with a
/// reason where the peer spoke the protocol, and `Err`.
async fn accept_handshake(conn: &mut Conn, secret: &Secret, peer: &str) -> Result<Hello, ()> {
    // The caller bounds the whole exchange by HANDSHAKE_TIMEOUT.
    let hello = match recv::<Hello>(conn).await {
        Ok(Some(h)) => h,
        Ok(None) => return Err(()),
        Err(e) => {
            tracing::warn!("dropping {peer}: malformed handshake ({e})");
            return Err(());
        }
    };
    if let Err(reason) = hello.validate() {
        tracing::warn!("refusing {peer}: {reason}");
        let _ = send(conn, &Welcome::Rejected { reason }).await;
        return Err(());
    }
    let my_nonce = nonce();
    let proof = secret.mac(SERVER, &[&hello.nonce, &my_nonce]);
    if send(
        conn,
        &Welcome::Challenge {
            nonce: my_nonce,
            proof,
        },
    )
    .await
    .is_err()
    {
        return Err(());
    }
    let proof = recv::<Proof>(conn).await;
    let ok = match &proof {
        Ok(Some(p)) => secret.verify(CLIENT, &[&my_nonce, &hello.nonce, &encode(&hello)], &p.mac),
        _ => false,
    };
    if !ok {
        // A peer with the wrong token finds out first (our proof does not
        // check) and leaves without one; so does an aborted fetch.
        let what = match proof {
            Ok(Some(_)) => "wrong cluster token",
            _ => "left before proving it has the cluster token: a wrong token, or it gave up",
        };
        tracing::warn!("refusing {peer}: authentication failed ({what})");
        let reason = "authentication failed: this peer does not have the cluster's token".into();
        let _ = send(conn, &Welcome::Rejected { reason }).await;
        return Err(());
    }
    Ok(hello)
}

/// Room kept in front of a frame body for its message count (a varint).
const COUNT_ROOM: usize = 10;

/// Largest encoded message: one frame, less the room for its count. A
/// larger one cannot be sent; senders of user data check this first
/// (`ClientShared::submit`), and the writer drops any other with an error.
pub const fn max_message() -> usize {
    MAX_FRAME - COUNT_ROOM
}

/// Frame bodies for queued messages, each encoded straight into its frame:
/// a postcard sequence (a varint count, then the messages one by one, which
/// is how postcard encodes a `Vec`) of at most `limit` bytes.
#[cfg(test)]
fn frames<M: Serialize>(msgs: impl Iterator<Item = M>, limit: usize) -> Vec<Bytes> {
    let mut enc = FrameEncoder::new(limit, limit);
    let mut out: Vec<Bytes> = msgs.filter_map(|m| enc.push(&m)).collect();
    out.extend(enc.finish());
    out
}

/// Bytes after which the writer ends a frame and lets the I/O thread run
/// before encoding more: a burst of big messages is encoded a slice at a
/// time, not all at once.
const FRAME_TARGET: usize = 1 << 20;

/// Encodes messages into frames of about `target` bytes (one message may
/// pass it), never over `limit`.
struct FrameEncoder {
    buf: Vec<u8>,
    count: u64,
    target: usize,
    limit: usize,
}

impl FrameEncoder {
    fn new(target: usize, limit: usize) -> Self {
        FrameEncoder {
            buf: vec![0u8; COUNT_ROOM],
            count: 0,
            target,
            limit,
        }
    }

    /// Adds a message; returns a frame when one is complete.
    fn push<M: Serialize>(&mut self, m: &M) -> Option<Bytes> {
        let mark = self.buf.len();
        self.buf = shoal_proto::encode_into(m, std::mem::take(&mut self.buf));
        let size = self.buf.len() - mark;
        if size > self.limit - COUNT_ROOM {
            tracing::error!(
                "dropping a message of {size} bytes: over the limit of {} bytes per message",
                self.limit - COUNT_ROOM
            );
            self.buf.truncate(mark);
            return None;
        }
        if self.buf.len() > self.limit && self.count > 0 {
            // This message starts the next frame (the one copy splitting costs).
            let mut next = vec![0u8; COUNT_ROOM];
            next.extend_from_slice(&self.buf[mark..]);
            self.buf.truncate(mark);
            let full = std::mem::replace(&mut self.buf, next);
            let frame = with_count(full, std::mem::replace(&mut self.count, 1));
            return Some(frame);
        }
        self.count += 1;
        if self.buf.len() >= self.target {
            return self.finish();
        }
        None
    }

    /// The frame holding what was pushed since the last one, if anything.
    fn finish(&mut self) -> Option<Bytes> {
        if self.count == 0 {
            return None;
        }
        let full = std::mem::replace(&mut self.buf, vec![0u8; COUNT_ROOM]);
        Some(with_count(full, std::mem::take(&mut self.count)))
    }
}

/// Writes `count` as a varint just before the messages, in the room left
/// for it, and returns the body from there (no copy).
fn with_count(mut buf: Vec<u8>, mut count: u64) -> Bytes {
    let mut varint = [0u8; COUNT_ROOM];
    let mut n = 0;
    loop {
        let byte = (count & 0x7f) as u8;
        count >>= 7;
        if count == 0 {
            varint[n] = byte;
            n += 1;
            break;
        }
        varint[n] = byte | 0x80;
        n += 1;
    }
    let start = COUNT_ROOM - n;
    buf[start..COUNT_ROOM].copy_from_slice(&varint[..n]);
    Bytes::from(buf).slice(start..)
}

/// About how many bytes a queued message holds (its payloads, plus a
/// little for the rest): what [`Outbox`] counts.
pub trait Weigh {
    /// Approximate size in memory while queued.
    fn weight(&self) -> usize;
}

const SMALL: usize = 32;

fn ids_weight(ids: &[u64]) -> usize {
    SMALL + 8 * ids.len()
}

impl Weigh for shoal_proto::FromScheduler {
    fn weight(&self) -> usize {
        use shoal_proto::FromScheduler as F;
        match self {
            F::Memory { value, .. } => SMALL + value.as_ref().map_or(0, |v| v.len()),
            F::Compute {
                func, args, deps, ..
            } => SMALL + func.len() + args.len() + 48 * deps.len(),
            F::Release(ids) | F::Steal(ids) => ids_weight(ids),
            F::QueryReply { json, .. } => SMALL + json.len(),
            F::Erred {
                error: shoal_proto::TaskError::Exception { error, .. },
                ..
            } => SMALL + error.len(),
            _ => SMALL,
        }
    }
}

impl Weigh for shoal_proto::ToScheduler {
    fn weight(&self) -> usize {
        use shoal_proto::ToScheduler as T;
        match self {
            T::Submit(specs) => specs
                .iter()
                .map(|t| SMALL + t.func.len() + t.args.len() + 8 * t.deps.len())
                .sum(),
            T::Release(ids) | T::Cancel(ids) | T::Detach(ids) => ids_weight(ids),
            T::Stolen(ids) | T::Started(ids) | T::Where(ids) => ids_weight(ids),
            T::Finished { value, .. } => SMALL + value.as_ref().map_or(0, |v| v.len()),
            T::Failed { error, text, .. } => SMALL + error.len() + text.len(),
            T::Query { path, .. } => SMALL + path.len(),
            T::Telemetry(_) => 4096,
            T::SubmitJob { tasks, .. } => tasks.iter().map(|t| SMALL + t.args.len()).sum(),
            T::Rejoin {
                running,
                reports,
                held,
            } => {
                ids_weight(running)
                    + 16 * held.len()
                    + reports.iter().map(|r| r.weight()).sum::<usize>()
            }
            T::Resubmit(tasks) => tasks
                .iter()
                .map(|(t, v)| {
                    SMALL
                        + t.func.len()
                        + t.args.len()
                        + 8 * t.deps.len()
                        + v.as_ref().map_or(0, |v| v.len())
                })
                .sum(),
            _ => SMALL,
        }
    }
}

/// The sending half of a batched connection. Messages never wait to be
/// queued (the scheduler's loop must not block on a peer), but the bytes
/// queued are counted: a producer thread can wait for room
/// ([`Outbox::wait_room`], backpressure), and a service can let go of a peer
/// that stopped reading ([`Outbox::queued_bytes`]).
pub struct Outbox<M> {
    tx: mpsc::UnboundedSender<(M, usize)>,
    room: Arc<Room>,
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
struct Room {
    queued: std::sync::atomic::AtomicUsize,
    lock: std::sync::Mutex<()>,
    freed: std::sync::Condvar,
    /// Cancelled by [`Outbox::close`]: the writer stops at once.
    closed: tokio_util::sync::CancellationToken,
    /// Messages queued so far (for a service's throughput figures).
    sent: std::sync::atomic::AtomicU64,
}

impl Room {
    fn release(&self, bytes: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        // Saturating: a send that fails after the writer zeroed the count.
        let _ = self
            .queued
            .fetch_update(Relaxed, Relaxed, |q| Some(q.saturating_sub(bytes)));
        // Taking the lock orders this with a waiter between its check and
        // its wait (no lost wake-up).
        drop(self.lock.lock());
        self.freed.notify_all();
    }
}

impl<M: Weigh> Outbox<M> {
    /// Queues a message; an error only when the connection is gone.
    pub fn send(&self, m: M) -> Result<(), mpsc::error::SendError<M>> {
        let w = m.weight();
        self.room
            .queued
            .fetch_add(w, std::sync::atomic::Ordering::Relaxed);
        self.room
            .sent
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.tx.send((m, w)).map_err(|e| {
            self.room.release(w);
            mpsc::error::SendError(e.0 .0)
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
        let mut guard = self.room.lock.lock().unwrap_or_else(|e| e.into_inner());
        while self.queued_bytes() > limit {
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

/// An [`Outbox`] with no connection behind it: what is sent waits in the
/// returned receiver (a client between two connections to its scheduler).
pub fn parked<M>() -> (Outbox<M>, mpsc::UnboundedReceiver<(M, usize)>) {
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
    let (tx, mut rx) = mpsc::unbounded_channel::<(M, usize)>();
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
            let mut msgs = batch.drain(..);
            loop {
                let next = msgs.next();
                let body = match &next {
                    Some((m, _)) => match enc.push(m) {
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

#[cfg(test)]
mod tests {
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
        for bad in ["", "tcp://host", "unix://", "host:notaport"] {
            assert!(
                Address::parse(bad).unwrap_err().contains("address"),
                "{bad}"
            );
        }
    }

    /// Backpressure: messages for a peer that does not read are counted;
    /// a producer waiting for room gives up when told, and gets it as soon
    /// as the peer reads; the count returns to zero once all is written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_outbox_counts_what_waits_and_producers_wait_for_room() {
        use shoal_proto::ToScheduler;
        let secret = Secret::from_token("t").unwrap();
        let dir = std::env::temp_dir().join(format!("shoal-room-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let addr = Address::Unix(dir.join("s.sock"));
        let listener = Listener::bind(&addr).await.unwrap();
        let (start_reading, go) = tokio::sync::oneshot::channel::<()>();
        let server_secret = secret.clone();
        let read = tokio::spawn(async move {
            let (incoming, peer) = listener.accept().await;
            let (mut conn, _) = incoming.authenticate(&server_secret, &peer).await.unwrap();
            send(&mut conn, &Welcome::Accepted { id: 1 }).await.unwrap();
            go.await.unwrap();
            let mut n = 0;
            while let Some(frame) = conn.next().await {
                n += decode_batch::<ToScheduler>(frame).unwrap().len();
                if n == 64 {
                    break;
                }
            }
            n
        });
        let (conn, _) = handshake(&addr, Role::Client, &secret).await.unwrap();
        let (out, _stream) = split_batched::<ToScheduler>(conn);
        let value = Bytes::from(vec![7u8; 1 << 20]);
        for id in 0..64 {
            let m = ToScheduler::Finished {
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
}
