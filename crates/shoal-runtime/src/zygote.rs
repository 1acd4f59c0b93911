//! Worker processes forked from a zygote instead of started anew.
//!
//! A local cluster's client forks one process, the zygote (`shoal._zygote`
//! on the Python side), before its scheduler starts. The zygote is a copy of
//! the client with its imported libraries, and nothing running. The
//! supervisor asks it for each worker over a `SOCK_SEQPACKET` socket (one
//! message each way per request): the zygote forks, the child becomes the
//! worker, and the zygote reaps it and says how it ended. The workers need
//! no imports of their own, and share the libraries' memory with the client
//! until they write to it.
//!
//! Messages: the supervisor sends `{"args": [...], "env": [[k, v], ...]}`
//! (JSON) with at most one descriptor (the worker's task-slot page,
//! `SCM_RIGHTS`); the zygote answers `pid N` or `error WHY`, and sends
//! `exit N STATUS` (a raw wait status) whenever a worker ends. Closing the
//! socket ends the zygote, and it stops its workers first.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

/// How long a fork may take before the supervisor gives up on the zygote:
/// a fork is milliseconds; the zygote answers nothing else first.
const FORK_WAIT: Duration = Duration::from_secs(30);

/// The supervisor's end of a zygote.
pub struct Zygote {
    sock: Option<OwnedFd>,
    pid: libc::pid_t,
    /// Workers it reported ended, not yet asked about.
    exits: Mutex<HashMap<u32, ExitStatus>>,
}

impl std::fmt::Debug for Zygote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Zygote(pid {})", self.pid)
    }
}

impl Zygote {
    /// Takes over `sock` (this end of the socket pair) and `pid`, the
    /// zygote, a child of this process that this value reaps.
    ///
    /// # Safety
    /// `sock` must be an open descriptor that nothing else owns.
    pub unsafe fn from_raw(sock: RawFd, pid: u32) -> Zygote {
        Zygote {
            // SAFETY: the caller gives this value the descriptor.
            sock: Some(unsafe { OwnedFd::from_raw_fd(sock) }),
            pid: pid as libc::pid_t,
            exits: Mutex::new(HashMap::new()),
        }
    }

    fn fd(&self) -> RawFd {
        self.sock.as_ref().map_or(-1, AsRawFd::as_raw_fd)
    }

    /// Forks a worker running `args` (the worker module's options) with
    /// `env` added, passing it `pass` (it learns the number from
    /// `SHOAL_SLOT_FD`); returns its process id.
    pub fn fork(
        &self,
        args: &[String],
        env: &[(String, String)],
        pass: Option<RawFd>,
    ) -> io::Result<u32> {
        let mut exits = self.exits.lock();
        let req = serde_json::json!({ "args": args, "env": env }).to_string();
        self.send(req.as_bytes(), pass)?;
        let deadline = Instant::now() + FORK_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !self.readable(left)? {
                return Err(io::Error::other("the worker zygote did not answer"));
            }
            let Some(msg) = self.recv(0)? else { continue };
            match parse(&msg)? {
                Reply::Pid(pid) => return Ok(pid),
                Reply::Error(why) => return Err(io::Error::other(why)),
                Reply::Exit(pid, status) => {
                    exits.insert(pid, status);
                }
            }
        }
    }

    /// How worker `pid` ended, if the zygote has said so.
    pub fn try_wait(&self, pid: u32) -> io::Result<Option<ExitStatus>> {
        let mut exits = self.exits.lock();
        while let Some(msg) = self.recv(libc::MSG_DONTWAIT)? {
            if let Reply::Exit(p, status) = parse(&msg)? {
                exits.insert(p, status);
            }
        }
        Ok(exits.remove(&pid))
    }

    fn send(&self, data: &[u8], pass: Option<RawFd>) -> io::Result<()> {
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        // u64s: the control buffer must be aligned for cmsghdr.
        let mut control = [0u64; 8];
        // SAFETY: a zeroed msghdr is valid (no buffers); the pointers set
        // below outlive the sendmsg call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if let Some(fd) = pass {
            let size = std::mem::size_of::<RawFd>() as u32;
            msg.msg_control = control.as_mut_ptr().cast();
            // SAFETY: CMSG_* compute sizes and offsets within `control`
            // (64 bytes; one descriptor needs 24).
            unsafe {
                msg.msg_controllen = libc::CMSG_SPACE(size) as _;
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(size) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd);
            }
        }
        // SAFETY: msg points at live buffers; MSG_NOSIGNAL: a gone zygote
        // is an error here, not SIGPIPE.
        let n = unsafe { libc::sendmsg(self.fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// One message; None if none waits (with `MSG_DONTWAIT`).
    fn recv(&self, flags: libc::c_int) -> io::Result<Option<String>> {
        let mut buf = [0u8; 512];
        // SAFETY: recv writes at most buf.len() bytes into buf.
        let n = unsafe { libc::recv(self.fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the worker zygote ended",
            ));
        }
        Ok(Some(
            String::from_utf8_lossy(&buf[..n as usize]).into_owned(),
        ))
    }

    fn readable(&self, within: Duration) -> io::Result<bool> {
        let mut p = libc::pollfd {
            fd: self.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = within.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: one pollfd, valid for the call.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            };
        }
        Ok(n > 0)
    }
}

enum Reply {
    Pid(u32),
    Exit(u32, ExitStatus),
    Error(String),
}

fn parse(msg: &str) -> io::Result<Reply> {
    let bad = || io::Error::other(format!("the worker zygote said {msg:?}"));
    let mut words = msg.splitn(3, ' ');
    match (words.next(), words.next(), words.next()) {
        (Some("pid"), Some(pid), None) => Ok(Reply::Pid(pid.parse().map_err(|_| bad())?)),
        (Some("exit"), Some(pid), Some(raw)) => Ok(Reply::Exit(
            pid.parse().map_err(|_| bad())?,
            ExitStatus::from_raw(raw.parse().map_err(|_| bad())?),
        )),
        (Some("error"), Some(first), rest) => Ok(Reply::Error(match rest {
            Some(rest) => format!("{first} {rest}"),
            None => first.to_string(),
        })),
        _ => Err(bad()),
    }
}

impl Drop for Zygote {
    /// Closes the socket (the zygote stops its workers and exits), then
    /// reaps it: within 5 s, else killed.
    fn drop(&mut self) {
        drop(self.sock.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut status = 0;
        loop {
            // SAFETY: waitpid on our own child.
            let r = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
            if r != 0 {
                return; // reaped, or not ours to reap (ECHILD)
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: kill and waitpid of our own child, still unreaped.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, &mut status, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse() {
        assert!(matches!(parse("pid 42").unwrap(), Reply::Pid(42)));
        match parse("exit 42 256").unwrap() {
            Reply::Exit(42, s) => assert_eq!(s.code(), Some(1)),
            _ => panic!("not an exit"),
        }
        match parse("error fork failed: no memory").unwrap() {
            Reply::Error(w) => assert_eq!(w, "fork failed: no memory"),
            _ => panic!("not an error"),
        }
        assert!(parse("pid x").is_err());
        assert!(parse("hello").is_err());
    }
}
