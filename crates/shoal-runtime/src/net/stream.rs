//! The byte streams connections run over, and the read-ahead that feeds TLS
//! large reads while data streams.

use super::*;

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
    pub(super) buf: Vec<u8>,
    pos: usize,
    end: usize,
    slowed: bool,
}

impl ReadAhead {
    const CHUNK: usize = 256 << 10;

    pub(crate) fn new(inner: TcpStream) -> ReadAhead {
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
