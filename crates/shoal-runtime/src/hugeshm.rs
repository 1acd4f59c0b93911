//! Huge pages for shared-memory files on kernels that give tmpfs 4 KiB pages.
//!
//! Most distributions leave `transparent_hugepage/shmem_enabled` at `never`
//! and mount `/dev/shm` without `huge=`, so each page of a shared-memory
//! file is a 4 KiB page, allocated, zeroed and mapped one fault at a time.
//! Filling fresh shared memory then runs at a tenth of the speed of the
//! anonymous huge pages NumPy gets in a single process (2.6 against 29 GiB/s
//! with two threads on our machine), and that, not copying, is what bounds a
//! workload that makes its arrays in shared memory.
//!
//! `MADV_COLLAPSE` (Linux 6.1) builds huge pages for a mapped range whatever
//! those settings say (only `deny` refuses). So a new file's whole 2 MiB
//! extents are collapsed before anyone writes it: 13 GiB/s on the same
//! test. A tmpfs mounted with `huge=within_size` gets huge pages on its own
//! (23 GiB/s); collapsing there finds them already huge.
//!
//! Everything here is best effort: where the kernel cannot (an older
//! kernel, no huge page free), the file keeps small pages, as before.
//! Pages are allocated by `fallocate`, never by a write through a mapping,
//! so a full tmpfs is an error, not a `SIGBUS`.
//!
//! A huge page is cheap only while the memory under it is warm. On a
//! virtual machine that hands free memory back to its host (free page
//! reporting returns whole 2 MiB blocks, the ones huge pages are made of),
//! a huge page that was not just freed costs the host's faults: 4.5 ms per
//! 2 MiB on our VM against 0.1 ms warm, while small pages come from lists
//! the host leaves alone (0.5 ms per 2 MiB). A pool block is reused and
//! keeps its huge pages, so it pays that once; a one-shot file (a put, a
//! result written whole) would pay it on every write. [`reserve`] times
//! its collapses and gives one-shot files small pages for a while after a
//! slow one (see [`Warmth`]).

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Set once the kernel refused `MADV_COLLAPSE` outright (too old, or huge
/// shared memory denied): not asked again.
static REFUSED: AtomicBool = AtomicBool::new(false);

/// The huge page size, when transparent huge pages exist and
/// `SHOAL_SHM_HUGE` does not turn collapsing off (`0`).
pub fn extent() -> Option<usize> {
    static EXTENT: OnceLock<Option<usize>> = OnceLock::new();
    *EXTENT.get_or_init(|| {
        if crate::settings::is_off("SHOAL_SHM_HUGE") {
            return None;
        }
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
            .ok()?
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| n.is_power_of_two() && *n >= 4096)
    })
}

/// Whether huge pages will be tried for a file of `len` bytes: it holds at
/// least one whole extent and the kernel has not refused.
pub fn worth(len: usize) -> bool {
    extent().is_some_and(|e| len >= e) && !REFUSED.load(Ordering::Relaxed)
}

/// A mapping of a file's first bytes, unmapped on drop (see
/// [`map_aligned`]).
pub struct Mapping {
    base: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by this value alone; what its users write
// through it is theirs to order, as with any buffer.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    /// The first byte (dangling, never read, for an empty mapping).
    pub fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Mapped bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is mapped (an empty file).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The mapped bytes.
    ///
    /// # Safety
    /// The file must stay at least `len` bytes long while they are read (a
    /// page past its end is `SIGBUS`), and nobody may write them meanwhile
    /// through another mapping of this process.
    pub unsafe fn bytes(&self) -> &[u8] {
        // SAFETY: `len` mapped bytes, alive as long as `self` (the
        // caller's contract covers the file).
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), self.len) }
    }

    /// Gives up ownership: the caller unmaps `len` bytes at the pointer.
    pub fn into_raw(self) -> *mut u8 {
        let p = self.base.as_ptr();
        std::mem::forget(self);
        p
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: the mapping `map_aligned` made, unmapped once.
            unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
        }
    }
}

/// Maps `len` bytes of file `fd` from offset 0 (`flags`: `MAP_SHARED` or
/// `MAP_PRIVATE`) at an address aligned to the huge page size when the
/// file holds a whole one, so that its huge pages are mapped whole: `mmap`
/// alone aligns to 4 KiB, and mapping a 64 MiB file of huge pages through
/// 4 KiB entries cost 0.5 ms a time against 30 µs. Zero bytes map nothing.
pub fn map_aligned(
    fd: RawFd,
    len: usize,
    prot: libc::c_int,
    flags: libc::c_int,
) -> io::Result<Mapping> {
    if len == 0 {
        return Ok(Mapping {
            base: std::ptr::NonNull::dangling(),
            len: 0,
        });
    }
    let align = extent().filter(|&e| len >= e).unwrap_or(4096);
    let span = len
        .checked_add(align)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "mapping too large"))?;
    // SAFETY: a fresh reservation of address space, then the file mapped
    // over an aligned part of it (MAP_FIXED inside our own reservation), then
    // the reservation's unused ends unmapped: no other mapping is touched.
    unsafe {
        let res = libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        );
        if res == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let start = res as usize;
        let base = (start + align - 1) & !(align - 1);
        let p = libc::mmap(
            base as *mut libc::c_void,
            len,
            prot,
            flags | libc::MAP_FIXED,
            fd,
            0,
        );
        if p == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            libc::munmap(res, span);
            return Err(e);
        }
        let end = base + len.next_multiple_of(4096);
        if base > start {
            libc::munmap(res, base - start);
        }
        if start + span > end {
            libc::munmap(end as *mut libc::c_void, start + span - end);
        }
        Ok(Mapping {
            base: std::ptr::NonNull::new_unchecked(base as *mut u8),
            len,
        })
    }
}

/// Gives the whole huge-page extents of the tmpfs file `fd`, mapped in full
/// by `map` (from [`map_aligned`]), huge pages where the kernel can.
pub fn collapse(fd: RawFd, map: &Mapping) {
    collapse_extents(fd, map, None);
}

/// [`collapse`], one extent at a time; with `warmth`, stops at the first
/// extent that came from cold memory and leaves the rest small.
fn collapse_extents(fd: RawFd, map: &Mapping, warmth: Option<&Warmth>) {
    let Some(e) = extent() else { return };
    if REFUSED.load(Ordering::Relaxed) || map.as_ptr() as usize % e != 0 {
        return;
    }
    for off in (0..map.len() / e * e).step_by(e) {
        // One page first: the kernel refuses to collapse an extent with no
        // page at all. `fallocate`, so that a full tmpfs says ENOSPC.
        // SAFETY: a plain system call on the caller's file.
        if unsafe { libc::fallocate(fd, 0, off as libc::off_t, 4096) } != 0 {
            return;
        }
        let started = Instant::now();
        // SAFETY: the extent lies in the caller's mapping of the file.
        let rc = unsafe { libc::madvise(map.as_ptr().add(off).cast(), e, libc::MADV_COLLAPSE) };
        if rc != 0 {
            // EAGAIN/ENOMEM: no huge page free now; small pages, as before.
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                REFUSED.store(true, Ordering::Relaxed);
            }
            return;
        }
        if warmth.is_some_and(|w| w.slow(started.elapsed())) {
            return;
        }
    }
}

/// Whether huge pages are warm enough to be worth a one-shot file: cold
/// (for `backoff`) once an extent took longer than `slow` to collapse,
/// then one extent tries again.
struct Warmth {
    slow: Duration,
    backoff: Duration,
    /// Since [`epoch`], in microseconds (0 at first: warm).
    cold_until_us: AtomicU64,
}

impl Warmth {
    /// Slow: more than twice what small pages cost for an extent (0.5 ms
    /// per 2 MiB here), under half what a cold huge page costs (4.5 ms).
    /// A retry every 250 ms wastes at most 4 ms each (1.6 % of a process
    /// that writes nothing else) while it stays cold, and finds memory
    /// freed meanwhile (warm again, 0.1 ms) soon.
    const fn new() -> Self {
        Self::with(Duration::from_millis(1), Duration::from_millis(250))
    }

    const fn with(slow: Duration, backoff: Duration) -> Self {
        Self {
            slow,
            backoff,
            cold_until_us: AtomicU64::new(0),
        }
    }

    /// Whether one-shot files get small pages now.
    fn is_cold(&self) -> bool {
        (epoch().elapsed().as_micros() as u64) < self.cold_until_us.load(Ordering::Relaxed)
    }

    /// Records an extent's collapse time; true if it was slow (cold now).
    fn slow(&self, took: Duration) -> bool {
        if took <= self.slow {
            return false;
        }
        let until = (epoch().elapsed() + self.backoff).as_micros() as u64;
        self.cold_until_us.store(until, Ordering::Relaxed);
        true
    }
}

/// This process's huge page warmth, for its one-shot files.
static WARMTH: Warmth = Warmth::new();

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Whether `fd` is a file on tmpfs (whose pages are memory).
fn on_tmpfs(fd: RawFd) -> bool {
    // SAFETY: fstatfs fills the zeroed struct for a valid fd.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::fstatfs(fd, &mut st) == 0 && st.f_type == libc::TMPFS_MAGIC
    }
}

/// Sizes the new file `fd` to `len` bytes and reserves its pages, huge
/// where it pays and the kernel can (warm: see [`Warmth`]), before it is
/// written with `write`: writes then copy into pages that are already
/// there. A file not on tmpfs is only sized. Fails (ENOSPC) if tmpfs
/// cannot hold it.
pub fn reserve(fd: RawFd, len: usize) -> io::Result<()> {
    reserve_with(fd, len, &WARMTH)
}

fn reserve_with(fd: RawFd, len: usize, warmth: &Warmth) -> io::Result<()> {
    let off = libc::off_t::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large"))?;
    // SAFETY: plain system calls on the caller's file.
    if unsafe { libc::ftruncate(fd, off) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if len == 0 || !on_tmpfs(fd) {
        return Ok(());
    }
    if worth(len) && !warmth.is_cold() {
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        if let Ok(map) = map_aligned(fd, len, rw, libc::MAP_SHARED) {
            collapse_extents(fd, &map, Some(warmth));
        }
    }
    // SAFETY: as above.
    if unsafe { libc::fallocate(fd, 0, 0, off) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Bytes of huge pages mapping `[base, base + len)` in this process, from
/// `/proc/self/smaps` (for tests and diagnostics).
pub fn huge_mapped(base: *const u8, len: usize) -> usize {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return 0;
    };
    let (lo, hi) = (base as usize, base as usize + len);
    let mut inside = false;
    let mut total = 0;
    for line in smaps.lines() {
        let range = line.split_once(' ').and_then(|(r, _)| r.split_once('-'));
        if let Some((a, b)) = range {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                inside = a < hi && b > lo;
                continue;
            }
        }
        let field = line
            .strip_prefix("ShmemPmdMapped:")
            .or_else(|| line.strip_prefix("FilePmdMapped:"));
        if let (true, Some(kb)) = (inside, field) {
            let kb = kb.trim().trim_end_matches("kB").trim();
            total += kb.parse::<usize>().unwrap_or(0) * 1024;
        }
    }
    total
}

/// Whether the kernel has refused `MADV_COLLAPSE` in this process.
pub fn refused() -> bool {
    REFUSED.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    fn tmpfile() -> OwnedFd {
        let dir = std::ffi::CString::new("/dev/shm").unwrap();
        // SAFETY: plain open on a valid C string; the fd is owned at once.
        let fd = unsafe { libc::open(dir.as_ptr(), libc::O_TMPFILE | libc::O_RDWR, 0o600) };
        assert!(fd >= 0, "{}", io::Error::last_os_error());
        // SAFETY: a fresh fd we own.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    #[test]
    fn whole_extents_of_a_new_file_become_huge_pages() {
        let Some(e) = extent() else {
            return; // no transparent huge pages in this kernel at all
        };
        let f = tmpfile();
        let len = 4 * e + 4096; // four whole extents and a page
        let never_cold = Warmth::with(Duration::MAX, Duration::ZERO);
        reserve_with(f.as_raw_fd(), len, &never_cold).unwrap();
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let map = map_aligned(f.as_raw_fd(), len, rw, libc::MAP_SHARED).unwrap();
        let base = map.as_ptr();
        assert_eq!(base as usize % e, 0);
        // SAFETY: the mapping is `len` bytes of a file of that size.
        unsafe { std::ptr::write_bytes(base, 7, len) };
        let huge = huge_mapped(base, len);
        // SAFETY: as above.
        let last = unsafe { *base.add(len - 1) };
        drop(map);
        assert_eq!(last, 7);
        // A kernel that refuses says so (EINVAL); one that accepts must
        // have built them (they may be mapped by small page entries, so at
        // least the page cache must hold them: checked through a new
        // aligned mapping's faults above).
        assert!(refused() || huge >= e, "huge pages mapped: {huge}");
    }

    /// Huge bytes mapped once a new file of `len` is reserved under
    /// `warmth` (None: sized and allocated, never collapsed) and written.
    fn huge_after_reserve(len: usize, warmth: Option<&Warmth>) -> usize {
        let f = tmpfile();
        match warmth {
            Some(w) => reserve_with(f.as_raw_fd(), len, w).unwrap(),
            None => {
                // SAFETY: plain system calls on our own file.
                unsafe {
                    assert_eq!(libc::ftruncate(f.as_raw_fd(), len as libc::off_t), 0);
                    assert_eq!(libc::fallocate(f.as_raw_fd(), 0, 0, len as libc::off_t), 0);
                }
            }
        }
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let map = map_aligned(f.as_raw_fd(), len, rw, libc::MAP_SHARED).unwrap();
        // SAFETY: the mapping is `len` bytes of a file of that size.
        unsafe { std::ptr::write_bytes(map.as_ptr(), 1, len) };
        huge_mapped(map.as_ptr(), len)
    }

    #[test]
    fn one_shot_files_keep_small_pages_while_huge_pages_come_cold() {
        let Some(e) = extent() else { return };
        let len = 4 * e;
        let plain = huge_after_reserve(len, None);
        let never_cold = Warmth::with(Duration::MAX, Duration::ZERO);
        if refused() || huge_after_reserve(len, Some(&never_cold)) <= plain {
            return; // collapsing gains nothing on this kernel: nothing to choose
        }
        assert!(!never_cold.is_cold());
        // Every collapse counts as slow: the first extent is made huge, it
        // finds memory cold, and the other three stay as a plain file's.
        let always_slow = Warmth::with(Duration::ZERO, Duration::from_millis(300));
        let first = huge_after_reserve(len, Some(&always_slow));
        assert!(always_slow.is_cold());
        assert!(first <= plain + e, "{first} huge bytes, {plain} plain");
        // While cold, nothing is collapsed at all.
        assert_eq!(huge_after_reserve(len, Some(&always_slow)), plain);
        // After the back-off, one extent tries again (and finds it cold).
        std::thread::sleep(Duration::from_millis(350));
        assert!(!always_slow.is_cold());
        let again = huge_after_reserve(len, Some(&always_slow));
        assert!(always_slow.is_cold() && again <= plain + e, "{again}");
    }

    #[test]
    fn a_file_not_on_tmpfs_is_only_sized() {
        let f = tempfile_on_disk();
        reserve(f.as_raw_fd(), 5 << 20).unwrap();
        // SAFETY: fstat fills the zeroed struct for a valid fd.
        let size = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            assert_eq!(libc::fstat(f.as_raw_fd(), &mut st), 0);
            st.st_size
        };
        assert_eq!(size, 5 << 20);
        assert!(!refused(), "a disk file must not turn collapsing off");
    }

    fn tempfile_on_disk() -> OwnedFd {
        let path = std::env::temp_dir().join(format!("hugeshm-{}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        OwnedFd::from(file)
    }
}
