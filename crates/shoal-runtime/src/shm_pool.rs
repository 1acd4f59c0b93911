//! Memory for large arrays that is shared memory from the start.
//!
//! A worker's NumPy allocator (installed by the Python bindings) takes
//! large allocations from here. Each is a block: an unnamed file in this
//! process's segment directory (`O_TMPFILE` on tmpfs), its pages reserved
//! with `fallocate` (so a full `/dev/shm` is an allocation failure, never a
//! `SIGBUS`) and mapped shared, its whole 2 MiB extents in huge pages where
//! the kernel can make them ([`crate::hugeshm`]: five times faster to fill
//! than tmpfs's usual 4 KiB pages). The first page of a block is left free and
//! the array's data starts on the second, so that when a peer asks for a
//! result whose one buffer lives in a block, the worker writes the frame's
//! header into that first page and gives the file a name ([`ShmPool::publish`]):
//! the export copies nothing.
//!
//! A block that was never published is kept when freed (up to a cap, see
//! [`ShmPool::trim`]) and handed to the next allocation of about its size:
//! tmpfs pages cost about 4× more to allocate than the anonymous huge pages
//! NumPy otherwise gets, but a reused block's pages are already there, so a
//! worker running many similar tasks fills recycled memory. A published
//! block is never reused: other processes may map it for as long as they
//! like, so it is only unmapped here and unlinked by the store on release.
//! Nothing leaks if the process dies: unnamed files vanish with it, named
//! ones are in its segment directory, which [`crate::shm::sweep`] removes.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Bytes before a block's data: one page, where a published block's frame
/// header goes (the data stays page-aligned).
pub const HEADER: usize = 4096;

struct Block {
    base: *mut u8,
    /// Mapped length (= file length): HEADER + capacity.
    len: usize,
    fd: OwnedFd,
    /// Bytes the allocation asked for (at most the capacity).
    used: usize,
    published: bool,
    freed_at: Instant,
}

// SAFETY: the mapping is owned by the block and only reached through the
// pool's lock (the allocation's user reaches the data through its pointer,
// as with any allocator).
unsafe impl Send for Block {}

impl Block {
    fn capacity(&self) -> usize {
        self.len - HEADER
    }

    fn data(&self) -> usize {
        self.base as usize + HEADER
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        // SAFETY: base/len is the mapping this block made; nobody uses it
        // once the block is dropped (freed by its allocation's owner).
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// Where a buffer lies in a block (see [`ShmPool::locate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Located {
    /// The block, for [`ShmPool::publish`].
    pub key: usize,
    /// The buffer's offset in the block's file.
    pub offset: usize,
}

/// What [`ShmPool::realloc_in_place`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Realloc {
    /// Not a block of this pool.
    NotOurs,
    /// The block has room: the same pointer serves.
    Done,
    /// Too small: allocate anew, copy this many bytes, free the old one.
    Move(usize),
}

/// Byte counts of a pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Blocks in use and not published.
    pub live: usize,
    /// Free blocks kept for reuse.
    pub spare: usize,
    /// Allocations served from the pool, and of those from a kept block.
    pub allocs: usize,
    /// See `allocs`.
    pub reused: usize,
}

#[derive(Default)]
struct Inner {
    live: BTreeMap<usize, Block>, // by data address
    spare: Vec<Block>,
    live_bytes: usize,
    spare_bytes: usize,
    allocs: usize,
    reused: usize,
}

/// Large allocations in shared memory; see the module documentation.
pub struct ShmPool {
    dir: PathBuf,
    min: usize,
    max: usize,
    spare_cap: AtomicUsize,
    inner: Mutex<Inner>,
    /// Blocks to unmap, for a thread of their own: unmapping a written GiB
    /// takes about 30 ms, which the freeing thread (holding Python's GIL,
    /// often answering a peer) should not wait for.
    unmapper: Mutex<Option<mpsc::Sender<Block>>>,
}

fn page_up(n: usize) -> Option<usize> {
    n.checked_add(4095).map(|n| n & !4095)
}

impl ShmPool {
    /// A pool making its files in `dir` (on tmpfs), serving allocations of
    /// `min..=max` bytes, keeping up to `spare_cap` bytes of freed blocks.
    pub fn new(dir: &Path, min: usize, max: usize, spare_cap: usize) -> ShmPool {
        ShmPool {
            dir: dir.to_path_buf(),
            min: min.max(1),
            max,
            spare_cap: AtomicUsize::new(spare_cap),
            inner: Mutex::new(Inner::default()),
            unmapper: Mutex::new(None),
        }
    }

    /// Unmaps blocks on the unmapping thread (started on first use; inline
    /// if it cannot be).
    fn discard(&self, blocks: impl IntoIterator<Item = Block>) {
        let mut tx = self.unmapper.lock();
        if tx.is_none() {
            let (s, r) = mpsc::channel::<Block>();
            let spawned = std::thread::Builder::new()
                .name("shoal-shm-unmap".into())
                .spawn(move || r.into_iter().for_each(drop));
            if spawned.is_ok() {
                *tx = Some(s);
            }
        }
        for b in blocks {
            match tx.as_ref() {
                Some(s) => {
                    if let Err(mpsc::SendError(b)) = s.send(b) {
                        drop(b);
                    }
                }
                None => drop(b),
            }
        }
    }

    /// Whether an allocation of `size` bytes is one for the pool.
    fn serves(&self, size: usize) -> bool {
        size >= self.min && size <= self.max
    }

    /// An allocation of `size` bytes (zeroed if asked), or `None` when the
    /// size is not the pool's or shared memory cannot hold it (the caller
    /// uses its ordinary allocator).
    pub fn alloc(&self, size: usize, zeroed: bool) -> Option<*mut u8> {
        if !self.serves(size) {
            return None;
        }
        let want = page_up(size)?;
        let mut inner = self.inner.lock();
        inner.allocs += 1;
        // A kept block of about this size (at most a quarter larger).
        let fit = inner
            .spare
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= want && b.capacity() - want <= want / 4)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        if let Some(i) = fit {
            let mut b = inner.spare.swap_remove(i);
            inner.spare_bytes -= b.len;
            inner.live_bytes += b.len;
            inner.reused += 1;
            b.used = size;
            let data = b.data() as *mut u8;
            inner.live.insert(b.data(), b);
            drop(inner);
            if zeroed {
                // SAFETY: the block's data has `capacity >= size` bytes and
                // now belongs to this allocation.
                unsafe { std::ptr::write_bytes(data, 0, size) };
            }
            return Some(data);
        }
        drop(inner);
        // New memory: buffers retained for transfers make room first.
        crate::bufpool::make_room(want);
        // A new block: fresh tmpfs pages read as zeros.
        let mut b = self.create(want).ok()?;
        b.used = size;
        let data = b.data() as *mut u8;
        let mut inner = self.inner.lock();
        inner.live_bytes += b.len;
        inner.live.insert(b.data(), b);
        Some(data)
    }

    fn create(&self, capacity: usize) -> io::Result<Block> {
        let len = capacity + HEADER;
        let dir = CString::new(self.dir.as_os_str().as_bytes())?;
        // SAFETY: plain system calls on a valid C string and the fd they
        // return; the fd is owned at once so every error path closes it.
        unsafe {
            let raw = libc::open(
                dir.as_ptr(),
                libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
                0o600,
            );
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(raw);
            if libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) != 0 {
                return Err(io::Error::last_os_error());
            }
            let prot = libc::PROT_READ | libc::PROT_WRITE;
            let map = crate::hugeshm::map_aligned(fd.as_raw_fd(), len, prot, libc::MAP_SHARED)?;
            if crate::hugeshm::worth(len) {
                crate::hugeshm::collapse(fd.as_raw_fd(), &map);
            }
            // The block unmaps it from now on (also if reserving fails below).
            let block = Block {
                base: map.into_raw(),
                len,
                fd,
                used: 0,
                published: false,
                freed_at: Instant::now(),
            };
            let rc = libc::fallocate(block.fd.as_raw_fd(), 0, 0, len as libc::off_t);
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(block)
        }
    }

    /// Frees an allocation; false if `ptr` is not the pool's.
    pub fn free(&self, ptr: *mut u8) -> bool {
        let mut inner = self.inner.lock();
        let Some(mut b) = inner.live.remove(&(ptr as usize)) else {
            return false;
        };
        if b.published {
            drop(inner);
            self.discard([b]); // the named file lives on until the store unlinks it
            return true;
        }
        inner.live_bytes -= b.len;
        if inner.spare_bytes + b.len <= self.spare_cap.load(Ordering::Relaxed) {
            b.freed_at = Instant::now();
            inner.spare_bytes += b.len;
            inner.spare.push(b);
        } else {
            drop(inner);
            self.discard([b]);
        }
        true
    }

    /// Resizes an allocation where it lies if its block has room (and the
    /// size is still the pool's: a block never serves less than the
    /// minimum, so a free of a smaller size is never the pool's).
    pub fn realloc_in_place(&self, ptr: *mut u8, size: usize) -> Realloc {
        let mut inner = self.inner.lock();
        let Some(b) = inner.live.get_mut(&(ptr as usize)) else {
            return Realloc::NotOurs;
        };
        if size <= b.capacity() && size >= self.min && !b.published {
            b.used = size;
            Realloc::Done
        } else {
            Realloc::Move(b.used.min(size))
        }
    }

    /// The block holding the `len` bytes at `addr`, if one does.
    pub fn locate(&self, addr: usize, len: usize) -> Option<Located> {
        let inner = self.inner.lock();
        let (&key, b) = inner.live.range(..=addr).next_back()?;
        let end = addr.checked_add(len)?;
        (end <= key + b.capacity()).then_some(Located {
            key,
            offset: HEADER + (addr - key),
        })
    }

    /// Names block `key`'s file `path`, with `head` (a frame's prefix and
    /// header, at most [`HEADER`] bytes) written into its first page. From
    /// then on the block is never reused or written by the pool. Fails if
    /// the block is gone or already published (the caller copies instead).
    pub fn publish(&self, key: usize, path: &Path, head: &[u8]) -> io::Result<()> {
        if head.len() > HEADER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "frame header larger than a page",
            ));
        }
        let mut inner = self.inner.lock();
        let b = inner
            .live
            .get_mut(&key)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such block"))?;
        if b.published {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "block already published",
            ));
        }
        let fd = b.fd.as_raw_fd();
        let proc_path = CString::new(format!("/proc/self/fd/{fd}"))?;
        let target = CString::new(path.as_os_str().as_bytes())?;
        // SAFETY: `head` is valid for its length; the C strings are valid.
        unsafe {
            let n = libc::pwrite(fd, head.as_ptr().cast(), head.len(), 0);
            if n != head.len() as isize {
                return Err(io::Error::last_os_error());
            }
            // Naming an O_TMPFILE file: through /proc (AT_EMPTY_PATH would
            // need CAP_DAC_READ_SEARCH).
            let rc = libc::linkat(
                libc::AT_FDCWD,
                proc_path.as_ptr(),
                libc::AT_FDCWD,
                target.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            );
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        b.published = true;
        let len = b.len;
        inner.live_bytes -= len; // now the store's segment, counted there
        Ok(())
    }

    /// Drops kept blocks freed more than `age` ago; returns the bytes freed.
    pub fn trim(&self, age: Duration) -> usize {
        let mut inner = self.inner.lock();
        let now = Instant::now();
        let (old, keep): (Vec<Block>, Vec<Block>) = std::mem::take(&mut inner.spare)
            .into_iter()
            .partition(|b| now.duration_since(b.freed_at) >= age);
        let freed: usize = old.iter().map(|b| b.len).sum();
        inner.spare = keep;
        inner.spare_bytes -= freed;
        drop(inner);
        self.discard(old);
        freed
    }

    /// In a child just forked: makes every block a private copy-on-write
    /// mapping of its file, so that the child's writes reach neither its
    /// parent's arrays nor a published result (as `fork` promises for
    /// ordinary memory), and stops reusing or publishing them here. Kept
    /// blocks are dropped. New allocations of the child get new blocks.
    ///
    /// # Safety
    /// Call only in the child right after `fork`, before other threads exist
    /// there: a lock held by a parent thread at the fork is forced open.
    pub unsafe fn after_fork_in_child(&self) {
        if self.inner.is_locked() {
            // SAFETY: the holder was a thread of the parent; it does not
            // exist in this child (the caller's contract).
            unsafe { self.inner.force_unlock() };
        }
        if self.unmapper.is_locked() {
            // SAFETY: as above.
            unsafe { self.unmapper.force_unlock() };
        }
        // The parent's unmapping thread is not in this child: start anew.
        *self.unmapper.lock() = None;
        let mut inner = self.inner.lock();
        for b in inner.live.values_mut() {
            // SAFETY: replaces this block's own mapping in place, same
            // address and length, with a private mapping of the same file.
            let p = unsafe {
                libc::mmap(
                    b.base.cast(),
                    b.len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED,
                    b.fd.as_raw_fd(),
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                // Unreachable in practice (same range, same file); the block
                // stays shared rather than unmapped under the child's arrays.
                continue;
            }
            b.published = true;
        }
        inner.live_bytes = 0;
        inner.spare_bytes = 0;
        let spare = std::mem::take(&mut inner.spare);
        drop(inner);
        self.discard(spare);
    }

    /// Sets how many bytes of freed blocks may be kept.
    pub fn set_spare_cap(&self, cap: usize) {
        self.spare_cap.store(cap, Ordering::Relaxed);
    }

    /// The pool's byte counts.
    pub fn stats(&self) -> PoolStats {
        let inner = self.inner.lock();
        PoolStats {
            live: inner.live_bytes,
            spare: inner.spare_bytes,
            allocs: inner.allocs,
            reused: inner.reused,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    fn pool(tag: &str) -> (ShmPool, PathBuf) {
        let dir =
            crate::shm::base_dir().join(format!("shoal-pool-test-{tag}-{}", std::process::id()));
        crate::shm::create_own(&dir).unwrap();
        (ShmPool::new(&dir, MIB, 64 * MIB, 16 * MIB), dir)
    }

    #[test]
    fn small_and_huge_allocations_are_not_the_pools() {
        let (p, dir) = pool("sizes");
        assert!(p.alloc(MIB - 1, false).is_none());
        assert!(p.alloc(65 * MIB, false).is_none());
        assert!(!p.free(std::ptr::without_provenance_mut(4096)));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn freed_blocks_are_reused_and_zeroed_on_calloc() {
        let (p, dir) = pool("reuse");
        let a = p.alloc(2 * MIB, true).unwrap();
        // SAFETY: a has 2 MiB of fresh (zero) memory.
        unsafe {
            assert_eq!(*a.add(2 * MIB - 1), 0);
            std::ptr::write_bytes(a, 7, 2 * MIB);
        }
        assert_eq!(p.stats().live, 2 * MIB + HEADER);
        assert!(p.free(a));
        assert_eq!(p.stats().spare, 2 * MIB + HEADER);
        // Of about that size: the same block, zeroed again.
        let b = p.alloc(2 * MIB - 100, true).unwrap();
        assert_eq!(a, b);
        // SAFETY: b has 2 MiB - 100 bytes.
        assert!(unsafe { std::slice::from_raw_parts(b, 2 * MIB - 100) }
            .iter()
            .all(|&x| x == 0));
        assert_eq!(p.stats().reused, 1);
        // Much smaller allocations get their own block.
        let c = p.alloc(MIB, false).unwrap();
        assert_ne!(c, b);
        assert_eq!(p.realloc_in_place(b, 2 * MIB), Realloc::Done);
        assert_eq!(p.realloc_in_place(b, 3 * MIB), Realloc::Move(2 * MIB));
        assert_eq!(p.realloc_in_place(b, MIB / 2), Realloc::Move(MIB / 2));
        assert!(p.free(b) && p.free(c));
        // Above the cap (16 MiB) blocks are not kept; trimming drops the rest.
        let d = p.alloc(32 * MIB, false).unwrap();
        assert!(p.free(d));
        assert!(p.stats().spare <= 16 * MIB);
        assert!(p.trim(Duration::ZERO) > 0);
        assert_eq!(
            p.stats(),
            PoolStats {
                allocs: 4,
                reused: 1,
                ..Default::default()
            }
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_new_block_is_made_of_huge_pages_where_the_kernel_can() {
        let (p, dir) = pool("huge");
        let a = p.alloc(16 * MIB, false).unwrap();
        // SAFETY: a has 16 MiB.
        unsafe { std::ptr::write_bytes(a, 3, 16 * MIB) };
        let huge = crate::hugeshm::huge_mapped(a, 16 * MIB);
        assert!(p.free(a));
        // The block is a 4 KiB header and 16 MiB: 8 whole 2 MiB extents.
        if crate::hugeshm::extent() == Some(2 * MIB) {
            assert!(crate::hugeshm::refused() || huge >= 8 * 2 * MIB, "{huge}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_forked_child_writes_its_own_copy() {
        let (p, dir) = pool("fork");
        let a = p.alloc(MIB, false).unwrap();
        // SAFETY: a has 1 MiB.
        unsafe { std::ptr::write_bytes(a, 1, MIB) };
        // SAFETY: the child only touches the pool and its memory, then _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: right after fork, in the child.
            unsafe {
                p.after_fork_in_child();
                std::ptr::write_bytes(a, 2, MIB);
                let ok = *a == 2 && p.free(a) && p.stats().spare == 0;
                libc::_exit(if ok { 0 } else { 1 });
            }
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        // SAFETY: a is still the parent's, unchanged by the child.
        assert!(unsafe { std::slice::from_raw_parts(a, MIB) }
            .iter()
            .all(|&x| x == 1));
        assert!(p.free(a));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_published_block_is_a_file_with_its_header_and_is_never_reused() {
        let (p, dir) = pool("publish");
        let a = p.alloc(MIB, false).unwrap();
        // SAFETY: a has 1 MiB.
        unsafe { std::ptr::write_bytes(a, 9, MIB) };
        let inner = a as usize + 100;
        let at = p.locate(inner, 1000).unwrap();
        assert_eq!(at.offset, HEADER + 100);
        assert!(p.locate(inner, MIB).is_none(), "past the block's end");
        let path = dir.join("r1");
        p.publish(at.key, &path, b"head").unwrap();
        assert!(p.publish(at.key, &dir.join("r2"), b"x").is_err());
        let data = std::fs::read(&path).unwrap();
        assert_eq!(&data[..4], b"head");
        assert!(data[HEADER..HEADER + MIB].iter().all(|&x| x == 9));
        assert_eq!(p.stats().live, 0, "counted as the store's segment now");
        assert!(p.free(a));
        assert_eq!(p.stats().spare, 0, "a published block is not kept");
        // The file outlives the mapping.
        assert_eq!(std::fs::read(&path).unwrap().len(), MIB + HEADER);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
