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
//! [`ShmPool::trim`]; the least recently freed go first when it is
//! reached) and handed to the next allocation of about its size:
//! tmpfs pages cost about 4× more to allocate than the anonymous huge pages
//! NumPy otherwise gets, but a reused block's pages are already there, so a
//! worker running many similar tasks fills recycled memory.
//!
//! A published block is reused too, once nobody can read it any more:
//! other processes map it for as long as they like, so each reader holds a
//! shared `flock` on the file while it maps or reads it ([`open_shared`],
//! [`hold_shared`]). When the store lets the result go it does not unlink
//! the name but hands it back ([`ShmPool::unpublish`]): the file is renamed
//! to a name of the pool's own (no new reader can open it; a file once
//! unlinked could never be named again), and the pool takes the block back
//! once an exclusive lock succeeds (no reader is left). It holds that lock
//! for as long as the block is its own, so a reader that opened the old name
//! just before the rename cannot lock it afterwards and map the block's next
//! contents. Without this, every result a peer fetched cost a fresh block
//! (`fallocate`, collapsing, zeroing: a sixth of a transpose's worker time).
//! Nothing leaks if the process dies: unnamed files vanish with it, named
//! ones are in its segment directory, which [`crate::shm::sweep`] removes.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Bytes before a block's data: one page, where a published block's frame
/// header goes (the data stays page-aligned).
pub const HEADER: usize = 4096;

/// The smallest frame [`ShmPool::publish_frame`] copies into a block: below
/// the arrays the pool serves, as a kept block beats a new file well below
/// them (an 800 KB frame, a shuffle's piece: 0.44 ms to write a new file
/// and unlink it, 0.05 ms to copy into a kept block). Not smaller: each
/// kept block holds a descriptor, and at 256 KiB a worker's 256 MiB of kept
/// blocks are at most 1,024 of them; smaller frames get files of their own.
pub const FRAME_MIN: usize = 256 * 1024;

/// Published blocks kept for reuse once their readers are done; older ones
/// are unmapped (a reader holding a result for good, such as a client).
const MAX_RETIRED: usize = 64;

/// `flock(fd, op | LOCK_NB)`: Ok if taken, an error (`WouldBlock` if
/// another holds a conflicting lock) if not.
fn try_lock(fd: RawFd, op: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: flock on a descriptor the caller owns.
        if unsafe { libc::flock(fd, op | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Marks `fd` (a result's file) as read by this process for as long as
/// this open file stays open: its holder does not reuse the memory
/// meanwhile. Fails (`NotFound`) only if the holder has already taken it
/// back; a file system without locks changes nothing (nothing reuses
/// files there).
pub fn hold_shared(fd: RawFd) -> io::Result<()> {
    match try_lock(fd, libc::LOCK_SH) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(io::Error::new(
            io::ErrorKind::NotFound,
            "the result's memory was released by its holder",
        )),
        _ => Ok(()),
    }
}

/// Opens a result's file by name to read it, held as in [`hold_shared`]
/// (until the file is closed). `NotFound` if the name is gone, also if it
/// went between the open and the lock (the memory may then hold something
/// else already).
pub fn open_shared(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::MetadataExt;
    let f = std::fs::File::open(path)?;
    hold_shared(f.as_raw_fd())?;
    let (now, ours) = (std::fs::metadata(path)?, f.metadata()?);
    if (now.dev(), now.ino()) != (ours.dev(), ours.ino()) {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "the result's file was replaced while being opened",
        ));
    }
    Ok(f)
}

struct Block {
    base: *mut u8,
    /// Mapped length (= file length): HEADER + capacity.
    len: usize,
    fd: OwnedFd,
    /// Bytes the allocation asked for (at most the capacity).
    used: usize,
    /// Named for readers (by this process, or a forked child's copy of
    /// such a block): never written or reused while so.
    published: bool,
    /// The public name a published block has, until the store hands it
    /// back ([`ShmPool::unpublish`]).
    public: Option<PathBuf>,
    /// The pool's own name for a block once handed back: renamed to the
    /// next public name when published again, unlinked when dropped.
    hidden: Option<PathBuf>,
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
        if let Some(h) = &self.hidden {
            let _ = std::fs::remove_file(h);
        }
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
    /// Published blocks freed here, oldest first: reused once the store
    /// has handed their names back and no reader holds them.
    retired: Vec<Block>,
    /// Public name -> block (its data address, in `live` or `retired`).
    names: std::collections::HashMap<PathBuf, usize>,
    live_bytes: usize,
    spare_bytes: usize,
    allocs: usize,
    reused: usize,
}

impl Inner {
    /// Drops the name index's entry for `b` (being discarded).
    fn forget(&mut self, b: &Block) {
        if let Some(p) = &b.public {
            self.names.remove(p);
        }
    }
}

/// Large allocations in shared memory; see the module documentation.
pub struct ShmPool {
    dir: PathBuf,
    min: usize,
    max: usize,
    spare_cap: AtomicUsize,
    inner: Mutex<Inner>,
    /// For the blocks' hidden names.
    hidden_seq: AtomicU64,
    /// Blocks to unmap, for a thread of their own: unmapping a written GiB
    /// takes about 30 ms, which the freeing thread (holding Python's GIL,
    /// often answering a peer) should not wait for.
    unmapper: Mutex<Option<mpsc::Sender<Block>>>,
}

/// A new block this large takes the pages of kept blocks rather than new
/// memory. On a virtual machine that hands free memory back to its host,
/// memory not just freed fills at 4.5 ms per 2 MiB huge page against 0.1
/// ms (bench_data.py prints both rates): from_array's 256 MB result, made
/// while the worker kept its 128 MB blocks, took 570-700 ms to make, 40 ms
/// once they made room. Smaller blocks keep what is kept: a workload of arrays of
/// many sizes reuses them within a run (making room for every block that
/// fitted none made a Parquet query's run 17 % slower).
const ROOM_MIN: usize = 16 << 20;

/// Takes out the kept blocks, oldest first, that make room for `want`
/// bytes: at least `want` bytes of them, or all.
fn room_for(inner: &mut Inner, want: usize) -> Vec<Block> {
    inner.spare.sort_by_key(|b| b.freed_at);
    let (mut k, mut freed) = (0, 0);
    while freed < want && k < inner.spare.len() {
        freed += inner.spare[k].len;
        k += 1;
    }
    inner.spare_bytes -= freed;
    inner.spare.drain(..k).collect()
}

/// Keeps the freed block `b` for reuse within `cap` bytes of kept blocks:
/// the least recently freed make room for it, so that a workload's blocks
/// replace the last one's, which would otherwise hold the cap until
/// trimmed (a transpose's 8 MB blocks left from_array's 128 MB ones
/// unkept, each run making them anew: its runs after a transpose took
/// 1.11 s, now 0.73). Returns the blocks that go.
fn keep(inner: &mut Inner, b: Block, cap: usize) -> Vec<Block> {
    if b.len > cap {
        return vec![b];
    }
    let over = (inner.spare_bytes + b.len).saturating_sub(cap);
    let gone = if over > 0 {
        room_for(inner, over)
    } else {
        Vec::new()
    };
    inner.spare_bytes += b.len;
    inner.spare.push(b);
    gone
}

/// The kept block for `want` bytes: the smallest at most a quarter larger.
fn fitting(spare: &[Block], want: usize) -> Option<usize> {
    spare
        .iter()
        .enumerate()
        .filter(|(_, b)| b.capacity() >= want && b.capacity() - want <= want / 4)
        .min_by_key(|(_, b)| b.capacity())
        .map(|(i, _)| i)
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
            hidden_seq: AtomicU64::new(0),
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
        self.take(size, zeroed)
    }

    /// A block for `size` bytes: a kept one if one fits, else a new one.
    fn take(&self, size: usize, zeroed: bool) -> Option<*mut u8> {
        let want = page_up(size)?;
        let mut inner = self.inner.lock();
        inner.allocs += 1;
        let mut fit = fitting(&inner.spare, want);
        if fit.is_none() && !inner.retired.is_empty() {
            let over = self.reclaim(&mut inner);
            if !over.is_empty() {
                drop(inner);
                self.discard(over);
                inner = self.inner.lock();
            }
            fit = fitting(&inner.spare, want);
        }
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
        // A large new block: kept blocks make room first, oldest first,
        // unmapped here so that it takes the pages they give back (see
        // `ROOM_MIN`).
        let gone = if want >= ROOM_MIN {
            room_for(&mut inner, want)
        } else {
            Vec::new()
        };
        drop(inner);
        drop(gone);
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
                public: None,
                hidden: None,
                freed_at: Instant::now(),
            };
            // Ours until published (see the module documentation); a file
            // system without locks only means it is never taken back.
            let _ = try_lock(block.fd.as_raw_fd(), libc::LOCK_EX);
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
            // The named file lives on until the store hands it back; readers
            // may map it longer. One with no name of this process's (a
            // forked child's copy, a failed hand-back) is never taken back.
            if b.public.is_some() || b.hidden.is_some() {
                b.freed_at = Instant::now();
                inner.retired.push(b);
                if inner.retired.len() > MAX_RETIRED {
                    let oldest = inner.retired.remove(0);
                    inner.forget(&oldest);
                    drop(inner);
                    self.discard([oldest]);
                }
            } else {
                drop(inner);
                self.discard([b]);
            }
            return true;
        }
        inner.live_bytes -= b.len;
        b.freed_at = Instant::now();
        let gone = keep(&mut inner, b, self.spare_cap.load(Ordering::Relaxed));
        drop(inner);
        if !gone.is_empty() {
            self.discard(gone);
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
        // SAFETY: `head` is valid for its length.
        let n = unsafe { libc::pwrite(fd, head.as_ptr().cast(), head.len(), 0) };
        if n != head.len() as isize {
            return Err(io::Error::last_os_error());
        }
        if let Some(hidden) = &b.hidden {
            // Taken back after an earlier publication: it has a name.
            std::fs::rename(hidden, path)?;
            b.hidden = None;
        } else {
            let proc_path = CString::new(format!("/proc/self/fd/{fd}"))?;
            let target = CString::new(path.as_os_str().as_bytes())?;
            // Naming an O_TMPFILE file: through /proc (AT_EMPTY_PATH would
            // need CAP_DAC_READ_SEARCH). SAFETY: valid C strings.
            let rc = unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    proc_path.as_ptr(),
                    libc::AT_FDCWD,
                    target.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // Readers may lock it from now on.
        // SAFETY: flock on the block's own descriptor.
        unsafe { libc::flock(fd, libc::LOCK_UN) };
        b.published = true;
        b.public = Some(path.to_path_buf());
        let len = b.len;
        inner.names.insert(path.to_path_buf(), key);
        inner.live_bytes -= len; // now the store's segment, counted there
        Ok(())
    }

    /// Copies a frame (its `parts` in order) into a block of the pool and
    /// names it `path`, as [`ShmPool::publish`] does; returns the frame's
    /// length. A result that cannot be published in place (several
    /// buffers, as a DataFrame's) is copied once either way; into a
    /// recycled block its pages are there already, where a new file's are
    /// allocated and zeroed first (five times slower on this kind of
    /// machine for a first touch). `None` if the pool does not serve that
    /// size (see [`FRAME_MIN`]) or has no memory for it (the caller writes
    /// a file).
    pub fn publish_frame(&self, path: &Path, parts: &[&[u8]]) -> Option<io::Result<usize>> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let capacity = total.checked_sub(HEADER)?;
        if capacity < FRAME_MIN.min(self.min) || capacity > self.max {
            return None;
        }
        let data = self.take(capacity, false)?;
        // The frame starts one page before the data: at the block's start.
        let mut at = data.wrapping_sub(HEADER);
        for p in parts {
            // SAFETY: the block maps HEADER + capacity >= total bytes from
            // `data - HEADER`, and it is this call's until freed below.
            unsafe {
                std::ptr::copy_nonoverlapping(p.as_ptr(), at, p.len());
                at = at.add(p.len());
            }
        }
        let published = self.publish(data as usize, path, &[]);
        self.free(data); // the store's file now (or, failing, the pool's again)
        Some(published.map(|()| total))
    }

    /// The store lets go of the published block named `path`: renamed to a
    /// name of the pool's own instead of unlinked, so that the block can be
    /// named again when it is reused (see the module documentation). False
    /// if `path` is not a block of this pool's (the caller unlinks it).
    pub fn unpublish(&self, path: &Path) -> bool {
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        let Some(key) = inner.names.remove(path) else {
            return false;
        };
        let found = match inner.live.get_mut(&key) {
            Some(b) => Some(b),
            None => inner.retired.iter_mut().find(|b| b.data() == key),
        };
        let Some(b) = found.filter(|b| b.public.as_deref() == Some(path)) else {
            return false;
        };
        let seq = self.hidden_seq.fetch_add(1, Ordering::Relaxed);
        let hidden = self.dir.join(format!(".free-{seq}"));
        if std::fs::rename(path, &hidden).is_err() {
            b.public = None; // unlinked by the caller: this block is not reused
            return false;
        }
        b.public = None;
        b.hidden = Some(hidden);
        true
    }

    /// Moves the retired blocks nobody can read any more (unlinked, and no
    /// reader's lock: see the module documentation) to the spare ones;
    /// returns those past the spare cap, to discard.
    fn reclaim(&self, inner: &mut Inner) -> Vec<Block> {
        let mut over = Vec::new();
        let mut i = 0;
        while i < inner.retired.len() {
            let b = &inner.retired[i];
            let handed_back = b.public.is_none() && b.hidden.is_some();
            if !handed_back || try_lock(b.fd.as_raw_fd(), libc::LOCK_EX).is_err() {
                i += 1;
                continue;
            }
            let mut b = inner.retired.remove(i);
            b.published = false;
            over.extend(keep(inner, b, self.spare_cap.load(Ordering::Relaxed)));
        }
        over
    }

    /// Drops kept blocks freed more than `age` ago (first taking back the
    /// published ones nobody reads any more); returns the bytes freed.
    pub fn trim(&self, age: Duration) -> usize {
        let mut inner = self.inner.lock();
        let mut old = self.reclaim(&mut inner);
        let now = Instant::now();
        let (gone, keep): (Vec<Block>, Vec<Block>) = std::mem::take(&mut inner.spare)
            .into_iter()
            .partition(|b| now.duration_since(b.freed_at) >= age);
        inner.spare = keep;
        inner.spare_bytes -= gone.iter().map(|b| b.len).sum::<usize>();
        old.extend(gone);
        let freed = old.iter().map(|b| b.len).sum();
        // Still read by someone after that long: the memory is the
        // reader's now (freed when it lets go, not counted here).
        let (gone, keep): (Vec<Block>, Vec<Block>) = std::mem::take(&mut inner.retired)
            .into_iter()
            .partition(|b| now.duration_since(b.freed_at) >= age);
        inner.retired = keep;
        for b in &gone {
            inner.forget(b);
        }
        old.extend(gone);
        drop(inner);
        self.discard(old);
        freed
    }

    /// In a child just forked: makes every block a private copy-on-write
    /// mapping of its file, so that the child's writes reach neither its
    /// parent's arrays nor a published result (as `fork` promises for
    /// ordinary memory), and stops reusing or publishing them here. Kept
    /// and retired blocks are dropped. New allocations of the child get new blocks.
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
        inner.names.clear();
        for b in inner.live.values_mut() {
            // The parent's names and the parent's to take back, not ours.
            b.public = None;
            b.hidden = None;
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
        let mut spare = std::mem::take(&mut inner.spare);
        spare.append(&mut inner.retired);
        for b in &mut spare {
            b.hidden = None; // the parent's file
        }
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
        // Trimming drops what is kept; above the cap (16 MiB) blocks are
        // not kept.
        assert!(p.trim(Duration::ZERO) > 0);
        let d = p.alloc(32 * MIB, false).unwrap();
        assert!(p.free(d));
        assert_eq!(p.stats().spare, 0);
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
    fn the_least_recently_freed_kept_blocks_make_room_for_a_newly_freed_one() {
        let (p, dir) = pool("room");
        let blocks: Vec<_> = [2 * MIB, 4 * MIB, 6 * MIB, 5 * MIB]
            .iter()
            .map(|&n| p.alloc(n, false).unwrap())
            .collect();
        for &b in &blocks[..3] {
            assert!(p.free(b));
        }
        assert_eq!(p.stats().spare, 12 * MIB + 3 * HEADER);
        // 5 MiB more would pass the cap (16 MiB): the oldest kept (2 MiB)
        // goes for it, not the newcomer.
        assert!(p.free(blocks[3]));
        assert_eq!(p.stats().spare, 15 * MIB + 3 * HEADER);
        assert_eq!(p.alloc(4 * MIB, false), Some(blocks[1]));
        // A large new block (16 MiB) fits none of them: they make room,
        // oldest first (the 6 MiB one, then the 5 MiB one), whatever is left.
        let big = p.alloc(ROOM_MIN, false).unwrap();
        assert_eq!(p.stats().spare, 0);
        // A small one does not: 3 MiB fits neither 4 MiB (a third larger).
        assert!(p.free(blocks[1]));
        let small = p.alloc(3 * MIB, false).unwrap();
        assert_eq!(p.stats().spare, 4 * MIB + HEADER);
        assert!(p.free(big) && p.free(small));
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
    fn a_published_block_is_a_file_with_its_header_reused_once_handed_back_and_unread() {
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
        let reader = open_shared(&path).unwrap();
        let data = std::fs::read(&path).unwrap();
        assert_eq!(&data[..4], b"head");
        assert!(data[HEADER..HEADER + MIB].iter().all(|&x| x == 9));
        assert_eq!(p.stats().live, 0, "counted as the store's segment now");
        assert!(p.free(a));
        assert_eq!(p.stats().spare, 0, "a published block is not kept");
        // The file outlives the mapping; while it has its name, or while a
        // reader holds it, its memory is not reused.
        assert_eq!(std::fs::read(&path).unwrap().len(), MIB + HEADER);
        let b = p.alloc(MIB, false).unwrap();
        assert_ne!(a, b, "still named");
        let late = std::fs::File::open(&path).unwrap(); // opened, not yet held
        assert!(!p.unpublish(&dir.join("other")));
        assert!(p.unpublish(&path), "handed back");
        assert!(!path.exists());
        let c = p.alloc(MIB, false).unwrap();
        assert_ne!(a, c, "still read");
        drop(reader);
        assert_eq!(p.trim(Duration::from_secs(60)), 0);
        assert_eq!(p.stats().spare, MIB + HEADER, "taken back");
        let d = p.alloc(MIB, false).unwrap();
        assert_eq!(a, d, "reused");
        // A reader that opened the name before it went cannot hold the
        // memory now that it is the pool's again.
        assert!(hold_shared(late.as_raw_fd()).is_err());
        assert!(open_shared(&path).is_err());
        // Published again under a new name: its new header and contents.
        // SAFETY: d has 1 MiB.
        unsafe { std::ptr::write_bytes(d, 5, MIB) };
        let again = dir.join("r3");
        p.publish(p.locate(d as usize, MIB).unwrap().key, &again, b"next")
            .unwrap();
        let data = std::fs::read(&again).unwrap();
        assert_eq!(&data[..4], b"next");
        assert!(data[HEADER..HEADER + MIB].iter().all(|&x| x == 5));
        assert!(p.free(b) && p.free(c) && p.free(d));
        assert!(p.unpublish(&again));
        assert!(p.trim(Duration::ZERO) > 0);
        // Dropped blocks take their hidden names with them.
        std::thread::sleep(Duration::from_millis(100)); // the unmapping thread
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn frames_smaller_than_the_pools_arrays_are_copied_into_reused_blocks() {
        let (p, dir) = pool("frames");
        let body = vec![3u8; 400_000];
        assert!(
            p.alloc(body.len(), false).is_none(),
            "below the arrays' minimum"
        );
        let small = vec![0u8; HEADER + FRAME_MIN - 1];
        assert!(
            p.publish_frame(&dir.join("t"), &[&small]).is_none(),
            "below FRAME_MIN: a file of its own"
        );
        let head = [1u8; HEADER];
        let (one, two) = (dir.join("f1"), dir.join("f2"));
        let n = p.publish_frame(&one, &[&head, &body]).unwrap().unwrap();
        assert_eq!(n, HEADER + body.len());
        let data = std::fs::read(&one).unwrap();
        assert!(data[..HEADER].iter().all(|&x| x == 1) && data[HEADER..n] == body[..]);
        assert!(p.unpublish(&one));
        assert_eq!(p.trim(Duration::from_secs(60)), 0);
        let spare = p.stats().spare;
        assert!(spare >= n, "kept once unread: {spare}");
        p.publish_frame(&two, &[&head, &body]).unwrap().unwrap();
        assert_eq!(p.stats().spare, 0, "the same block again");
        assert_eq!(std::fs::read(&two).unwrap()[HEADER..n], body[..]);
        assert!(p.unpublish(&two));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
