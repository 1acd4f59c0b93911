//! A NumPy memory handler that takes large allocations from a
//! [`ShmPool`] (shared memory from the start; see `shoal_runtime::shm_pool`)
//! and hands the rest to NumPy's default handler, so small arrays keep
//! NumPy's own cache and large ones not served by the pool keep its huge
//! pages.
//!
//! NumPy keeps the current handler in a context variable, so it is set in
//! each thread that runs tasks ([`shm_allocator_use`]); every array records
//! the handler that allocated it, so frees always come back to the right one.

use pyo3::ffi;
use pyo3::prelude::*;
use shoal_runtime::shm_pool::{Realloc, ShmPool};
use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::OnceLock;

type MallocFn = unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void;
type CallocFn = unsafe extern "C" fn(*mut c_void, usize, usize) -> *mut c_void;
type ReallocFn = unsafe extern "C" fn(*mut c_void, *mut c_void, usize) -> *mut c_void;
type FreeFn = unsafe extern "C" fn(*mut c_void, *mut c_void, usize);

/// NumPy's `PyDataMemAllocator` (version 1).
#[repr(C)]
#[derive(Clone, Copy)]
struct Allocator {
    ctx: *mut c_void,
    malloc: MallocFn,
    calloc: CallocFn,
    realloc: ReallocFn,
    free: FreeFn,
}

/// NumPy's `PyDataMem_Handler`.
#[repr(C)]
struct Handler {
    name: [u8; 127],
    version: u8,
    allocator: Allocator,
}

// SAFETY: the handler is immutable and its ctx pointer is unused (null);
// the default allocator's ctx is NumPy's own static, shared by design.
unsafe impl Sync for Handler {}
unsafe impl Send for Allocator {}
unsafe impl Sync for Allocator {}

const fn handler_name() -> [u8; 127] {
    let mut name = [0u8; 127];
    let s = b"shoal_shm";
    let mut i = 0;
    while i < s.len() {
        name[i] = s[i];
        i += 1;
    }
    name
}

static HANDLER: Handler = Handler {
    name: handler_name(),
    version: 1,
    allocator: Allocator {
        ctx: std::ptr::null_mut(),
        malloc: shm_malloc,
        calloc: shm_calloc,
        realloc: shm_realloc,
        free: shm_free,
    },
};

struct Installed {
    pool: ShmPool,
    default: Allocator,
    set_handler: unsafe extern "C" fn(*mut ffi::PyObject) -> *mut ffi::PyObject,
    capsule: Py<PyAny>,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

fn installed() -> &'static Installed {
    // Only reached through HANDLER, which NumPy knows of only once installed.
    INSTALLED
        .get()
        .expect("shoal's NumPy handler used before it was installed")
}

// The pool never holds an allocation below its minimum (1 MiB, even after a
// realloc), so frees of smaller sizes (NumPy passes the allocation's size)
// skip its lookup; the margin below the minimum is for safety.
const LOOKUP_BELOW: usize = 4096;

unsafe extern "C" fn shm_malloc(_: *mut c_void, size: usize) -> *mut c_void {
    let i = installed();
    match i.pool.alloc(size, false) {
        Some(p) => p.cast(),
        // SAFETY: NumPy's default allocator with its own ctx.
        None => unsafe { (i.default.malloc)(i.default.ctx, size) },
    }
}

unsafe extern "C" fn shm_calloc(_: *mut c_void, n: usize, elsize: usize) -> *mut c_void {
    let i = installed();
    let pooled = n
        .checked_mul(elsize)
        .and_then(|size| i.pool.alloc(size, true));
    match pooled {
        Some(p) => p.cast(),
        // SAFETY: as in shm_malloc.
        None => unsafe { (i.default.calloc)(i.default.ctx, n, elsize) },
    }
}

unsafe extern "C" fn shm_realloc(_: *mut c_void, ptr: *mut c_void, size: usize) -> *mut c_void {
    let i = installed();
    if ptr.is_null() {
        // SAFETY: malloc semantics for a null pointer, as C's realloc.
        return unsafe { shm_malloc(std::ptr::null_mut(), size) };
    }
    match i.pool.realloc_in_place(ptr.cast(), size) {
        // SAFETY: not ours: the default allocator made it.
        Realloc::NotOurs => unsafe { (i.default.realloc)(i.default.ctx, ptr, size) },
        Realloc::Done => ptr,
        Realloc::Move(keep) => {
            // SAFETY: a new allocation of `size >= keep` bytes; the old
            // block holds at least `keep` bytes; then the old one is freed.
            unsafe {
                let new = shm_malloc(std::ptr::null_mut(), size);
                if new.is_null() {
                    return new; // C semantics: the old allocation stays valid
                }
                std::ptr::copy_nonoverlapping(ptr.cast::<u8>(), new.cast::<u8>(), keep);
                i.pool.free(ptr.cast());
                new
            }
        }
    }
}

unsafe extern "C" fn shm_free(_: *mut c_void, ptr: *mut c_void, size: usize) {
    let i = installed();
    if ptr.is_null() || (size >= LOOKUP_BELOW && i.pool.free(ptr.cast())) {
        return;
    }
    // SAFETY: not the pool's: the default allocator made it.
    unsafe { (i.default.free)(i.default.ctx, ptr, size) }
}

/// Installs the handler for this process (once; later calls return whether
/// it is installed): NumPy allocations of `min..=max` bytes go to shared
/// memory files in `dir`, keeping up to `spare_cap` bytes of freed blocks.
/// False if this NumPy has no handler API (before 1.22).
#[pyfunction]
pub fn shm_allocator_install(
    py: Python<'_>,
    dir: PathBuf,
    min: usize,
    max: usize,
    spare_cap: usize,
) -> PyResult<bool> {
    if INSTALLED.get().is_some() {
        return Ok(true);
    }
    let np = py.import("numpy")?;
    let version: String = np.getattr("__version__")?.extract()?;
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) < (1, 22) {
        return Ok(false);
    }
    let module = py
        .import("numpy._core._multiarray_umath")
        .or_else(|_| py.import("numpy.core._multiarray_umath"))?;
    let api = module.getattr("_ARRAY_API")?;
    // SAFETY: `_ARRAY_API` is NumPy's C-API table capsule (unnamed); slots
    // 304 (PyDataMem_SetHandler) and 306 (&PyDataMem_DefaultHandler) exist
    // from NumPy 1.22 on, as its headers define. The default handler is a
    // capsule named "mem_handler" around a static PyDataMem_Handler.
    let (set_handler, default) = unsafe {
        let table = ffi::PyCapsule_GetPointer(api.as_ptr(), std::ptr::null()) as *const *mut c_void;
        if table.is_null() {
            return Err(PyErr::fetch(py));
        }
        let set_handler: unsafe extern "C" fn(*mut ffi::PyObject) -> *mut ffi::PyObject =
            std::mem::transmute(*table.add(304));
        let default_cap = *(*table.add(306) as *const *mut ffi::PyObject);
        let h = ffi::PyCapsule_GetPointer(default_cap, c"mem_handler".as_ptr()) as *const Handler;
        if h.is_null() {
            return Err(PyErr::fetch(py));
        }
        (set_handler, (*h).allocator)
    };
    // SAFETY: HANDLER is a static NumPy only reads; the capsule has no destructor.
    let capsule = unsafe {
        let c = ffi::PyCapsule_New(
            (&HANDLER as *const Handler).cast_mut().cast(),
            c"mem_handler".as_ptr(),
            None,
        );
        Bound::from_owned_ptr_or_err(py, c)?.unbind()
    };
    let _ = INSTALLED.set(Installed {
        pool: ShmPool::new(&dir, min, max, spare_cap),
        default,
        set_handler,
        capsule,
    });
    Ok(true)
}

/// Makes the installed handler NumPy's current one in this thread.
#[pyfunction]
pub fn shm_allocator_use(py: Python<'_>) -> PyResult<bool> {
    let Some(i) = INSTALLED.get() else {
        return Ok(false);
    };
    // SAFETY: NumPy's PyDataMem_SetHandler with a valid handler capsule,
    // under the GIL; it returns a new reference to the previous handler.
    unsafe {
        let old = (i.set_handler)(i.capsule.as_ptr());
        if old.is_null() {
            return Err(PyErr::fetch(py));
        }
        ffi::Py_DecRef(old);
    }
    Ok(true)
}

/// Called in a child process just forked (`os.register_at_fork`): see
/// `ShmPool::after_fork_in_child`.
#[pyfunction]
pub fn shm_allocator_forked() {
    if let Some(i) = INSTALLED.get() {
        // SAFETY: Python runs at-fork handlers in the child right after
        // fork, with only the forking thread alive.
        unsafe { i.pool.after_fork_in_child() };
    }
}

/// Where a contiguous buffer lies in a pool block: `(block, offset in its
/// file)`, or None.
#[pyfunction]
pub fn shm_locate(buffer: &Bound<'_, PyAny>) -> PyResult<Option<(usize, usize)>> {
    let Some(i) = INSTALLED.get() else {
        return Ok(None);
    };
    let buf = pyo3::buffer::PyBuffer::<u8>::get(buffer)?;
    if !buf.is_c_contiguous() {
        return Ok(None);
    }
    Ok(i.pool
        .locate(buf.buf_ptr() as usize, buf.len_bytes())
        .map(|l| (l.key, l.offset)))
}

/// Names block `key`'s file `path` with `head` in its first page (see
/// `ShmPool::publish`); false if it cannot (the caller copies instead).
#[pyfunction]
pub fn shm_publish(key: usize, path: PathBuf, head: &[u8]) -> bool {
    INSTALLED
        .get()
        .is_some_and(|i| i.pool.publish(key, &path, head).is_ok())
}

/// Copies a frame (its parts, contiguous buffers) into a pool block named
/// `path` (see `ShmPool::publish_frame`), the GIL released for the copy;
/// its length, or None if the pool does not take it (the caller writes a
/// file).
#[pyfunction]
pub fn shm_publish_frame(
    py: Python<'_>,
    path: PathBuf,
    parts: Vec<Bound<'_, PyAny>>,
) -> PyResult<Option<usize>> {
    let Some(i) = INSTALLED.get() else {
        return Ok(None);
    };
    let mut bufs = Vec::with_capacity(parts.len());
    for p in &parts {
        let b = pyo3::buffer::PyBuffer::<u8>::get(p)?;
        if !b.is_c_contiguous() {
            return Ok(None);
        }
        bufs.push(b);
    }
    // SAFETY: each buffer stays valid (and, being exported, unresized) while
    // its PyBuffer is held, which is until the end of this function.
    let slices: Vec<&[u8]> = bufs
        .iter()
        .map(|b| unsafe { std::slice::from_raw_parts(b.buf_ptr() as *const u8, b.len_bytes()) })
        .collect();
    match py.detach(|| i.pool.publish_frame(&path, &slices)) {
        None => Ok(None),
        Some(r) => Ok(Some(r?)),
    }
}

/// The store lets go of the published result file `path`: true if it was
/// a block of the pool's, which keeps it for reuse (see
/// `ShmPool::unpublish`); false if the caller should unlink it.
#[pyfunction]
pub fn shm_unpublish(path: PathBuf) -> bool {
    INSTALLED.get().is_some_and(|i| i.pool.unpublish(&path))
}

/// Sizes the new file `fd` to `length` bytes and, on tmpfs, reserves its
/// pages (huge where the kernel can) before it is written: see
/// `shoal_runtime::hugeshm::reserve`. OSError (ENOSPC) if it cannot hold it.
#[pyfunction]
pub fn shm_reserve(py: Python<'_>, fd: i32, length: usize) -> PyResult<()> {
    py.detach(|| shoal_runtime::hugeshm::reserve(fd, length))
        .map_err(PyErr::from)
}

/// `(live, spare, allocations, reused)` bytes and counts of the pool, or
/// None if it is not installed.
#[pyfunction]
pub fn shm_allocator_stats() -> Option<(usize, usize, usize, usize)> {
    INSTALLED.get().map(|i| {
        let s = i.pool.stats();
        (s.live, s.spare, s.allocs, s.reused)
    })
}

/// Drops kept blocks freed more than `age` seconds ago and, if given, sets
/// how many bytes may be kept; returns the bytes freed. An age of zero
/// (memory pressure) also lets go of every warm receive buffer
/// (`shoal_runtime::bufpool`, which otherwise decays on its own).
#[pyfunction]
#[pyo3(signature = (age, spare_cap=None))]
pub fn shm_allocator_trim(py: Python<'_>, age: f64, spare_cap: Option<usize>) -> usize {
    let age = shoal_runtime::duration::wait(age);
    py.detach(|| {
        let blocks = INSTALLED.get().map_or(0, |i| {
            if let Some(cap) = spare_cap {
                i.pool.set_spare_cap(cap);
            }
            i.pool.trim(age)
        });
        let buffers = if age.is_zero() {
            shoal_runtime::bufpool::trim(age)
        } else {
            0
        };
        blocks + buffers
    })
}
