//! Where processes keep shared-memory segments and spilled data, and how
//! those are cleaned up.
//!
//! Every process that stores results in shared memory owns one directory,
//! `<shm base>/shoal-<uid>-<pid>` (the base is `/dev/shm` on Linux), and
//! every worker spills into `<local dir>/shoal-spill-<uid>-<pid>`. Owning by
//! pid makes cleanup possible whoever dies: the process removes its
//! directories when it exits cleanly, the embedded cluster's supervisor
//! removes a dead worker's, and [`sweep`] (run whenever a cluster or worker
//! starts) removes those of processes that no longer exist, so a crash of
//! everything leaks nothing past the next start. An embedded cluster's
//! sockets live the same way, in `<tmp>/shoal-sock-<uid>-<pid>-<n>`.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const SEGMENTS: &str = "shoal-";
const SPILL: &str = "shoal-spill-";
const SOCKETS: &str = "shoal-sock-";

/// Identifies this host's shared memory: peers with the same key can map
/// each other's segments (same machine, same boot). Hostname and boot id;
/// `SHOAL_HOST_KEY` overrides it (tests that play several hosts on one
/// machine set it so that data moves over sockets as between hosts).
pub fn host_key() -> &'static str {
    static KEY: OnceLock<String> = OnceLock::new();
    KEY.get_or_init(|| {
        if let Some(k) = crate::settings::raw("SHOAL_HOST_KEY") {
            return k;
        }
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let mut name = [0u8; 256];
        // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
        // within it on success (the last byte stays 0 either way).
        let rc = unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len() - 1) };
        let host = if rc == 0 {
            let end = name.iter().position(|&b| b == 0).unwrap_or(0);
            String::from_utf8_lossy(&name[..end]).into_owned()
        } else {
            String::new()
        };
        format!("{host}/{}", boot.trim())
    })
}

/// The base directory of shared-memory segments: `SHOAL_SHM_DIR`, else
/// `/dev/shm` where it exists, else the temporary directory.
pub fn base_dir() -> PathBuf {
    if let Some(d) = crate::settings::raw("SHOAL_SHM_DIR") {
        return PathBuf::from(d);
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

fn uid() -> u32 {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() }
}

/// Process `pid`'s segment directory.
pub fn segment_dir(pid: u32) -> PathBuf {
    base_dir().join(format!("{SEGMENTS}{}-{pid}", uid()))
}

/// Process `pid`'s spill directory under `local` (default: the temporary
/// directory).
pub fn spill_dir(local: Option<&Path>, pid: u32) -> PathBuf {
    let base = local.map_or_else(std::env::temp_dir, Path::to_path_buf);
    base.join(format!("{SPILL}{}-{pid}", uid()))
}

/// A new private directory (mode 0700: pickles are code) for an embedded
/// cluster's sockets, owned by this process like its segments.
pub fn socket_dir() -> io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let pid = std::process::id();
    for _ in 0..100 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("{SOCKETS}{}-{pid}-{n}", uid()));
        match std::fs::DirBuilder::new().mode(0o700).create(&p) {
            Ok(()) => return Ok(p),
            // Left by an earlier process with this pid: take the next name.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other("cannot create a private socket directory"))
}

/// Creates this process's directory at `dir` (mode 0700), emptying a stale
/// one left by an earlier process with the same pid.
pub fn create_own(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::DirBuilder::new().mode(0o700).create(dir)
}

/// Removes process `pid`'s directories (it exited or died).
pub fn remove_process(pid: u32) {
    let _ = std::fs::remove_dir_all(segment_dir(pid));
    let _ = std::fs::remove_dir_all(spill_dir(None, pid));
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    let exists = rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    // A zombie (dead, not yet reaped: a SIGKILLed client whose parent has
    // not waited yet, as its workers sweep on their way out) is dead.
    exists && !zombie(pid)
}

fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        // "pid (comm) S ...": the state follows the last ')'.
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

/// Removes the segment, spill and socket directories of this user's
/// processes that no longer exist (a crash that took every process down, a
/// SIGKILLed client); returns how many.
pub fn sweep(local: Option<&Path>) -> usize {
    let me = uid();
    let mut removed = 0;
    let spill_base = local.map_or_else(std::env::temp_dir, Path::to_path_buf);
    for (base, prefix, fields) in [
        (base_dir(), SEGMENTS, 2),
        (spill_base, SPILL, 2),
        (std::env::temp_dir(), SOCKETS, 3),
    ] {
        let Ok(entries) = std::fs::read_dir(&base) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
                continue;
            };
            // `<uid>-<pid>[-<n>]`; "spill-..." and "sock-..." also start
            // with "shoal-": the field count and numbers tell them apart.
            let parts: Vec<&str> = rest.split('-').collect();
            if parts.len() != fields || parts.iter().any(|x| x.parse::<u32>().is_err()) {
                continue;
            }
            let (Ok(u), Ok(p)) = (parts[0].parse::<u32>(), parts[1].parse::<u32>()) else {
                continue;
            };
            if u == me && !alive(p) && std::fs::remove_dir_all(e.path()).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_removes_socket_dirs_of_dead_processes() {
        let live = socket_dir().unwrap();
        let dead = std::env::temp_dir().join(format!("{SOCKETS}{}-4194305-0", uid()));
        std::fs::create_dir_all(&dead).unwrap();
        std::fs::write(dead.join("sched.sock"), b"").unwrap();
        sweep(None);
        assert!(live.is_dir());
        assert!(!dead.exists());
        std::fs::remove_dir_all(&live).unwrap();
    }

    #[test]
    fn sweep_removes_only_dead_processes_dirs() {
        let base = std::env::temp_dir().join(format!("shoal-sweep-test-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        let live = spill_dir(Some(&base), std::process::id());
        // A pid above the kernel's maximum (4194304) never exists.
        let dead = spill_dir(Some(&base), 4_194_305);
        create_own(&live).unwrap();
        create_own(&dead).unwrap();
        std::fs::write(dead.join("1"), b"x").unwrap();
        assert!(sweep(Some(&base)) >= 1);
        assert!(live.is_dir());
        assert!(!dead.exists());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn host_key_is_stable_and_nonempty() {
        assert_eq!(host_key(), host_key());
        assert!(host_key().len() > 1);
    }
}
