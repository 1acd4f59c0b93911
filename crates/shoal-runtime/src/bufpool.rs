//! Warm buffers for frames received from other hosts.
//!
//! A large frame read into fresh memory pays a page fault and a zeroed page
//! for every 4 KiB before the kernel can copy into it: on this kind of host
//! that halves a socket's throughput (1.5 GiB/s into fresh pages against
//! 2.6 into warm ones, measured over a veth pair). Received frames that
//! are let go return their pages here, and the next frame of the same size
//! class reuses them already faulted, as an allocator's retained memory
//! would be (jemalloc's dirty-page decay is the model): what no frame took
//! again within [`DECAY`] is unmapped (by a thread that runs only while
//! anything is retained), the whole is bounded by [`retain_limit`], and
//! [`trim`] lets go sooner (a worker under memory pressure: all of it).

use bytes::Bytes;
use parking_lot::Mutex;
use std::time::{Duration, Instant};

/// Frames smaller than this use the ordinary allocator (its own free lists
/// keep small buffers warm).
pub const MIN_POOLED: usize = 64 * 1024;

/// Retained buffers not taken again within this are unmapped (shorter
/// than jemalloc's 10 s default: retained pages count in a worker's peak
/// memory, and transfers come in bursts).
pub const DECAY: Duration = Duration::from_secs(3);

/// Retained regions idle this long when a frame of another size comes are
/// a burst that has ended: they go (see [`take`]).
pub const BURST_OVER: Duration = Duration::from_millis(100);

/// A buffer's mapping; unmapped on drop.
struct Region {
    base: *mut u8,
    cap: usize,
}

// SAFETY: a private anonymous mapping owned by one `Region` at a time.
unsafe impl Send for Region {}
unsafe impl Sync for Region {}

impl Region {
    fn new(cap: usize) -> std::io::Result<Region> {
        // SAFETY: a fresh private anonymous mapping; checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                cap,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        if cap >= 4 << 20 {
            // Huge pages where the system gives them on advice (as NumPy
            // advises its large arrays): a 512 MiB frame read into 4 KiB
            // pages walks 131,072 of them (1.8 against 1.95 GiB/s).
            // SAFETY: advice on the mapping just made; failure is harmless.
            unsafe { libc::madvise(base, cap, libc::MADV_HUGEPAGE) };
        }
        Ok(Region {
            base: base.cast(),
            cap,
        })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `Region::new`, unmapped once.
        unsafe { libc::munmap(self.base.cast(), self.cap) };
    }
}

struct Pool {
    /// Retained regions, with when each was let go (oldest first).
    free: Vec<(Region, Instant)>,
    retained: usize,
    /// The thread that unmaps what decayed runs.
    janitor: bool,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    free: Vec::new(),
    retained: 0,
    janitor: false,
});

/// The most bytes retained: an eighth of this host's memory, at most 1 GiB.
pub fn retain_limit() -> usize {
    static LIMIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        // SAFETY: sysconf has no memory-safety preconditions.
        let (pages, size) = unsafe {
            (
                libc::sysconf(libc::_SC_PHYS_PAGES),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let total = usize::try_from(pages.max(0))
            .unwrap_or(0)
            .saturating_mul(usize::try_from(size.max(0)).unwrap_or(0));
        (total / 8).min(1 << 30)
    })
}

/// The size class of `n` bytes: the next of 1, 1.25, 1.5 and 1.75 times a
/// power of two, whole pages (so a region fits every later frame of its
/// class, wasting at most a fifth).
fn class(n: usize) -> usize {
    let n = n.max(MIN_POOLED);
    let top = usize::BITS - 1 - n.leading_zeros();
    let step = 1usize << (top - 2);
    let c = n.div_ceil(step) * step;
    c.div_ceil(4096) * 4096
}

/// A buffer for a frame of `n` bytes (`n` >= [`MIN_POOLED`]): a retained
/// one of its class, else a fresh mapping.
pub fn take(n: usize) -> std::io::Result<Buf> {
    let cap = class(n);
    let (reused, gone) = {
        let mut p = POOL.lock();
        let mut gone = expire(&mut p, DECAY);
        // The most recently let go: its pages are the likeliest in cache.
        let i = p.free.iter().rposition(|(r, _)| r.cap == cap);
        let reused = i.map(|i| {
            let (r, _) = p.free.remove(i);
            p.retained -= r.cap;
            r
        });
        if reused.is_none() {
            // Transfers of another size now: room for this one.
            gone.extend(room_for(&mut p, cap));
        }
        (reused, gone)
    };
    drop(gone); // unmapped outside the lock
    let region = match reused {
        Some(r) => r,
        None => Region::new(cap)?,
    };
    Ok(Buf {
        region: Some(region),
        len: 0,
    })
}

/// Lets go of retained buffers to make room for `n` bytes of other memory
/// this process is about to map (a new shared-memory block for a result):
/// see `room_for`.
pub fn make_room(n: usize) {
    let gone = room_for(&mut POOL.lock(), n);
    drop(gone); // unmapped outside the lock
}

/// Takes out (for the caller to unmap once the lock is let go) what must
/// go before `n` bytes of other memory are mapped: a burst that has ended
/// (regions idle for [`BURST_OVER`]) whole, since it would only add to the
/// next one's peak (2,000 frames of 256 KiB left 500 MiB under the shuffle
/// that followed), then at least `n` bytes more, oldest first, so that
/// retaining never adds to the host's peak.
fn room_for(p: &mut Pool, n: usize) -> Vec<(Region, Instant)> {
    let mut gone = expire(p, BURST_OVER);
    let (mut k, mut freed) = (0, 0);
    while freed < n && k < p.free.len() {
        freed += p.free[k].0.cap;
        k += 1;
    }
    p.retained -= freed;
    gone.extend(p.free.drain(..k));
    gone
}

/// Takes out the retained regions idle for `age` or longer (for the
/// caller to unmap once the lock is let go).
fn expire(p: &mut Pool, age: Duration) -> Vec<(Region, Instant)> {
    let now = Instant::now();
    let (gone, kept) = std::mem::take(&mut p.free)
        .into_iter()
        .partition(|(_, at)| now.duration_since(*at) >= age);
    p.free = kept;
    p.retained -= gone.iter().map(|(r, _)| r.cap).sum::<usize>();
    gone
}

/// Unmaps the retained buffers idle for `age` or longer (zero: all of
/// them); the bytes let go.
pub fn trim(age: Duration) -> usize {
    let gone = expire(&mut POOL.lock(), age);
    gone.iter().map(|(r, _)| r.cap).sum()
}

/// The janitor: unmaps what decayed, until nothing is retained.
fn janitor() {
    loop {
        std::thread::sleep(DECAY / 2);
        let gone = {
            let mut p = POOL.lock();
            let gone = expire(&mut p, DECAY);
            if p.free.is_empty() {
                p.janitor = false;
                drop(p);
                return;
            }
            gone
        };
        drop(gone);
    }
}

/// Bytes retained now.
pub fn retained() -> usize {
    POOL.lock().retained
}

/// A buffer being filled; [`Buf::freeze`] makes the frame.
pub struct Buf {
    region: Option<Region>,
    len: usize,
}

impl Buf {
    /// Room left past what was filled.
    pub fn spare(&mut self) -> &mut [u8] {
        let r = self.region.as_ref().expect("a live buffer");
        // SAFETY: the region maps `cap` writable bytes; `len <= cap`. Its
        // bytes may be stale (reused) but are always initialised (mapped).
        unsafe { std::slice::from_raw_parts_mut(r.base.add(self.len), r.cap - self.len) }
    }

    /// Marks `k` more bytes filled.
    pub fn advance(&mut self, k: usize) {
        let cap = self.region.as_ref().map_or(0, |r| r.cap);
        assert!(self.len + k <= cap, "filled past the buffer");
        self.len += k;
    }

    /// The filled bytes as a frame: its region comes back to the pool when
    /// the last view of it is dropped.
    pub fn freeze(mut self) -> Bytes {
        let region = self.region.take();
        Bytes::from_owner(Frame {
            region,
            len: self.len,
        })
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let Some(r) = self.region.take() {
            give_back(r);
        }
    }
}

/// A received frame's bytes.
struct Frame {
    region: Option<Region>,
    len: usize,
}

impl AsRef<[u8]> for Frame {
    fn as_ref(&self) -> &[u8] {
        match &self.region {
            // SAFETY: `len` bytes of the region were filled.
            Some(r) => unsafe { std::slice::from_raw_parts(r.base, self.len) },
            None => &[],
        }
    }
}

impl Drop for Frame {
    fn drop(&mut self) {
        if let Some(r) = self.region.take() {
            give_back(r);
        }
    }
}

fn give_back(r: Region) {
    let limit = retain_limit();
    if r.cap > limit {
        return; // unmapped here
    }
    let mut gone = Vec::new();
    {
        let mut p = POOL.lock();
        // Make room: the oldest go first.
        while p.retained + r.cap > limit && !p.free.is_empty() {
            let (old, _) = p.free.remove(0);
            p.retained -= old.cap;
            gone.push(old);
        }
        p.retained += r.cap;
        p.free.push((r, Instant::now()));
        if !p.janitor {
            p.janitor = std::thread::Builder::new()
                .name("shoal-bufpool".into())
                .spawn(janitor)
                .is_ok();
        }
    }
    drop(gone);
}

/// Tests that let go of large frames take this, so that the pool's own
/// tests see only their own regions come and go.
#[cfg(test)]
pub(crate) static TEST_LOCK: Mutex<()> = Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_fit_and_waste_at_most_a_fifth() {
        for n in [
            1,
            65_536,
            65_537,
            100_000,
            256 << 10,
            (512 << 20) + 1,
            3 << 30,
        ] {
            let c = class(n);
            assert!(c >= n && c % 4096 == 0, "{n} -> {c}");
            assert!(
                n < MIN_POOLED || c as f64 <= n as f64 * 1.25 + 4096.0,
                "{n} -> {c}"
            );
            assert_eq!(class(c), c, "a class is its own class");
        }
    }

    /// Retained regions of class `c` (other tests in this process use
    /// other classes).
    fn held(c: usize) -> usize {
        POOL.lock().free.iter().filter(|(r, _)| r.cap == c).count()
    }

    #[test]
    fn another_size_lets_go_of_as_much_retained_memory_as_it_maps() {
        let _only = TEST_LOCK.lock();
        let (a, b) = (3 << 20, 5 << 20);
        drop(take(a).expect("mapped").freeze());
        assert_eq!(held(class(a)), 1);
        let f = take(b).expect("mapped").freeze();
        assert_eq!(held(class(a)), 0, "retaining never adds to the peak");
        drop(f);
        assert_eq!(held(class(b)), 1);
        trim(Duration::ZERO);
    }

    #[test]
    fn a_burst_that_has_ended_goes_whole_when_another_size_comes() {
        let _only = TEST_LOCK.lock();
        let (a, b) = (300 << 10, 7 << 20);
        let frames: Vec<_> = (0..64).map(|_| take(a).expect("mapped").freeze()).collect();
        drop(frames);
        assert_eq!(held(class(a)), 64);
        // Still within the burst: only as much as the new one maps goes.
        let f = take(b).expect("mapped").freeze();
        let left = held(class(a));
        assert!((30..64).contains(&left), "{left}");
        drop(f);
        for (r, at) in POOL.lock().free.iter_mut() {
            if r.cap == class(a) {
                *at -= BURST_OVER;
            }
        }
        let g = take(b + (1 << 20)).expect("mapped").freeze();
        assert_eq!(held(class(a)), 0, "an ended burst was kept");
        drop(g);
        trim(Duration::ZERO);
    }

    #[test]
    fn other_memory_made_lets_go_of_as_much_retained() {
        let _only = TEST_LOCK.lock();
        let a = 300 << 10;
        let frames: Vec<_> = (0..16).map(|_| take(a).expect("mapped").freeze()).collect();
        drop(frames);
        assert_eq!(held(class(a)), 16);
        make_room(4 * class(a) - 1);
        assert_eq!(held(class(a)), 12);
        trim(Duration::ZERO);
    }

    #[test]
    fn let_go_buffers_are_reused_then_decay() {
        let _only = TEST_LOCK.lock();
        let n = 300_000;
        let c = class(n);
        let mut b = take(n).expect("mapped");
        b.spare()[..n].fill(7);
        b.advance(n);
        let f = b.freeze();
        assert_eq!(f.len(), n);
        assert!(f.iter().all(|&x| x == 7));
        let addr = f.as_ptr();
        drop(f);
        assert_eq!(held(c), 1);
        // The same class takes the same pages back.
        let mut b = take(n - 1000).expect("mapped");
        assert_eq!(b.spare().as_ptr(), addr);
        assert_eq!(held(c), 0);
        b.advance(10);
        drop(b); // an unfinished buffer comes back too
        assert_eq!(held(c), 1);
        trim(Duration::ZERO);
        assert_eq!(held(c), 0);
        // Unused ones are let go after DECAY.
        drop(take(n).expect("mapped").freeze());
        for (r, at) in POOL.lock().free.iter_mut() {
            if r.cap == c {
                *at -= DECAY;
            }
        }
        trim(DECAY);
        assert_eq!(held(c), 0);
        // The janitor (it looks every DECAY / 2) lets go of what no one
        // takes again.
        drop(take(n).expect("mapped").freeze());
        assert_eq!(held(c), 1);
        for (r, at) in POOL.lock().free.iter_mut() {
            if r.cap == c {
                *at -= DECAY;
            }
        }
        std::thread::sleep(DECAY / 2 + Duration::from_secs(1));
        assert_eq!(held(c), 0);
        assert!(retained() <= retain_limit());
    }
}
