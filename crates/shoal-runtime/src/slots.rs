//! Which task each execution thread of a worker process runs, in memory the
//! worker shares with its supervisor (and, in a batch that ran on a worker
//! that died, which of its elements): so when the worker dies, the
//! supervisor knows exactly which tasks were running (none, if it died
//! starting up or between tasks) and the scheduler blames only those.
//!
//! One page of a `memfd` the supervisor creates per worker process and
//! passes down by descriptor number (`SHOAL_SLOT_FD`): no file to clean up,
//! nothing left behind whoever dies. The worker writes a thread's slot
//! before handing it a task and clears it when the thread asks for the next
//! one: one store, no system call per task. The supervisor reads the page
//! after the process is gone, when every store it made is visible.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

/// Execution threads (lanes) the page has slots for: two words each, the
/// task (+1; 0: none) and the element of a batch (+1; 0: not known).
pub const LANES: usize = 256;
/// The word after the lanes': nonzero once the worker joined its scheduler
/// (one that dies after joining is no worker that cannot start).
const JOINED: usize = LANES * 2;
const WORDS: usize = JOINED + 1;
const BYTES: usize = WORDS * 8;
/// A slot's value for "a thread beyond the page runs something": the
/// page cannot say what, so the supervisor reports nothing exact.
const UNKNOWN: u64 = u64::MAX;
/// The name the page's memfd has (`/proc/self/fd/N` reads
/// `/memfd:shoal-slots (deleted)`): a descriptor number inherited in the
/// environment by a process it was not meant for is not mapped.
const NAME: &std::ffi::CStr = c"shoal-slots";

/// A mapping of the page.
struct Page {
    ptr: *mut AtomicU64,
}

// SAFETY: the page is only accessed through atomics.
unsafe impl Send for Page {}
// SAFETY: as above.
unsafe impl Sync for Page {}

impl Page {
    fn map(fd: RawFd) -> io::Result<Page> {
        // SAFETY: a fresh shared mapping of BYTES of an fd we were given;
        // checked for failure.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Page { ptr: ptr.cast() })
    }

    fn slot(&self, i: usize) -> &AtomicU64 {
        debug_assert!(i < WORDS);
        // SAFETY: i < WORDS, inside the mapping, which lives as long as self.
        unsafe { &*self.ptr.add(i) }
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping once.
        unsafe { libc::munmap(self.ptr.cast(), BYTES) };
    }
}

/// The supervisor's side: one per worker process it starts.
pub struct SlotFile {
    fd: OwnedFd,
    page: Page,
}

impl SlotFile {
    /// A fresh zeroed page (close-on-exec: [`SlotFile::inherit`] opens it
    /// to one child only).
    pub fn create() -> io::Result<SlotFile> {
        #[cfg(not(target_os = "linux"))]
        return Err(io::Error::other("no memfd on this system"));
        // SAFETY: memfd_create with a valid C string; checked for failure.
        #[cfg(target_os = "linux")]
        let raw = unsafe { libc::memfd_create(NAME.as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor we just opened and own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: resizing our own memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), BYTES as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let page = Page::map(fd.as_raw_fd())?;
        Ok(SlotFile { fd, page })
    }

    /// The descriptor number, for the child's `SHOAL_SLOT_FD`.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Whether the worker joined its scheduler before it died.
    pub fn joined(&self) -> bool {
        self.page.slot(JOINED).load(Ordering::Acquire) != 0
    }

    /// Tasks running when the process died, each with the element of a
    /// batch if the worker said; None if the page cannot tell (a thread
    /// beyond [`LANES`]).
    pub fn running(&self) -> Option<Vec<(u64, Option<u32>)>> {
        let mut out = Vec::new();
        for lane in 0..LANES {
            let item = match self.page.slot(2 * lane + 1).load(Ordering::Acquire) {
                0 => None,
                v => u32::try_from(v - 1).ok(),
            };
            match self.page.slot(2 * lane).load(Ordering::Acquire) {
                0 => {}
                UNKNOWN => return None,
                v => out.push((v - 1, item)),
            }
        }
        Some(out)
    }
}

/// Makes `fd` survive `exec` in the child being started. Only for a
/// `pre_exec` hook: async-signal-safe, touches no memory.
pub fn inherit(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor of this (forked) process.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The worker's side.
pub struct TaskSlots {
    page: Page,
}

impl TaskSlots {
    /// The page its supervisor passed down (`SHOAL_SLOT_FD`), if any. The
    /// descriptor is closed (the mapping stays), so the task's own child
    /// processes do not inherit it.
    pub fn from_env() -> Option<TaskSlots> {
        let fd: RawFd = crate::settings::raw("SHOAL_SLOT_FD")?.parse().ok()?;
        // Only a descriptor that is the page: the variable may have been
        // inherited by a process the descriptor was not passed to.
        let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
        if !target.to_string_lossy().starts_with("/memfd:shoal-slots") {
            return None;
        }
        // SAFETY: the descriptor is the page's memfd (checked above), ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let page = Page::map(fd.as_raw_fd()).ok()?;
        Some(TaskSlots { page })
    }

    /// The worker joined its scheduler.
    pub fn set_joined(&self) {
        self.page.slot(JOINED).store(1, Ordering::Release);
    }

    /// Thread `lane` runs `task` from now (before the task is handed over).
    pub fn set(&self, lane: u32, task: u64) {
        match lane as usize {
            i if i < LANES => {
                self.page.slot(2 * i + 1).store(0, Ordering::Release);
                let v = task.wrapping_add(1).min(UNKNOWN - 1);
                self.page.slot(2 * i).store(v, Ordering::Release);
            }
            _ => self.set_unknown(lane),
        }
    }

    /// Thread `lane`'s batch runs its element `item` from now.
    pub fn set_item(&self, lane: u32, item: u32) {
        if (lane as usize) < LANES {
            let v = u64::from(item) + 1;
            self.page
                .slot(2 * lane as usize + 1)
                .store(v, Ordering::Release);
        }
    }

    /// Thread `lane` runs nothing (between tasks, or waiting for one).
    pub fn clear(&self, lane: u32) {
        if (lane as usize) < LANES {
            self.page
                .slot(2 * lane as usize)
                .store(0, Ordering::Release);
        }
    }

    /// Thread `lane` runs more than one task at once, or is beyond the
    /// page: what it runs is not known.
    pub fn set_unknown(&self, lane: u32) {
        let i = (lane as usize).min(LANES - 1);
        self.page.slot(2 * i).store(UNKNOWN, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_supervisor_reads_what_the_worker_wrote() {
        let file = SlotFile::create().unwrap();
        // The worker's mapping of the same memfd, as a child would have it.
        let dup = unsafe { libc::dup(file.raw_fd()) };
        let worker = TaskSlots {
            page: Page::map(dup).unwrap(),
        };
        unsafe { libc::close(dup) };
        assert_eq!(file.running(), Some(vec![]));
        assert!(!file.joined());
        worker.set_joined();
        assert!(file.joined());
        worker.set(0, 41);
        worker.set(3, 0);
        worker.set_item(3, 12);
        assert_eq!(file.running(), Some(vec![(41, None), (0, Some(12))]));
        worker.clear(0);
        worker.clear(3);
        assert_eq!(file.running(), Some(vec![]));
        // A new task forgets the last one's element.
        worker.set(3, 8);
        assert_eq!(file.running(), Some(vec![(8, None)]));
        worker.set(LANES as u32 + 5, 7);
        assert_eq!(file.running(), None, "a thread beyond the page");
    }
}
