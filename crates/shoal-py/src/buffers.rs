//! Bytes lent to Python without a copy: received frames (`Frame`), mapped
//! files (`Mapped`), and fetched results as Python objects.

use super::*;
use bytes::Bytes;
use pyo3::exceptions::PyTypeError;
use pyo3::types::PyByteArray;
use shoal_runtime::transfer::Fetched;

/// Received bytes lent to Python as a read-only buffer: arrays unpickled
/// from it are views of the frame, which lives as long as they do.
#[pyclass(frozen)]
pub(crate) struct Frame {
    pub(crate) bytes: Bytes,
}

/// Fills `view` for `len` bytes at `ptr` lent by `owner`: read-only unless
/// `writable` (a request to write a read-only one is a `BufferError`
/// saying `what` is read-only).
///
/// # Safety
/// `ptr..ptr + len` must stay valid (and, if `writable`, writable) as long
/// as `owner` lives; the view keeps `owner` alive.
pub(crate) unsafe fn lend_buffer(
    owner: &Bound<'_, PyAny>,
    view: *mut pyo3::ffi::Py_buffer,
    flags: std::os::raw::c_int,
    (ptr, len, writable): (*const u8, usize, bool),
    what: &str,
) -> PyResult<()> {
    if flags & pyo3::ffi::PyBUF_WRITABLE != 0 && !writable {
        return Err(pyo3::exceptions::PyBufferError::new_err(format!(
            "{what} is read-only"
        )));
    }
    // SAFETY: the caller's contract; the exporter is `owner`.
    let rc = unsafe {
        pyo3::ffi::PyBuffer_FillInfo(
            view,
            owner.as_ptr(),
            ptr as *mut std::os::raw::c_void,
            len as pyo3::ffi::Py_ssize_t,
            i32::from(!writable),
            flags,
        )
    };
    if rc == -1 {
        return Err(PyErr::fetch(owner.py()));
    }
    Ok(())
}

#[pymethods]
impl Frame {
    /// # Safety
    /// Fills `view` for the frame's bytes, which are never written and
    /// live as long as this object (Python keeps it alive while the view
    /// is held).
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut pyo3::ffi::Py_buffer,
        flags: std::os::raw::c_int,
    ) -> PyResult<()> {
        let b = &slf.get().bytes;
        let lent = (b.as_ptr(), b.len(), false);
        // SAFETY: the frame's bytes live as long as `slf`.
        unsafe { lend_buffer(slf.as_any(), view, flags, lent, "a received frame") }
    }

    fn __len__(&self) -> usize {
        self.bytes.len()
    }
}

/// A file on this host mapped for `_serialize.loads`: copy-on-write
/// (`writable`: arrays unpickled from it are views of the shared pages,
/// writable as NumPy users expect, and a page written is copied for this
/// process alone, never changing the file others map) or read-only. Mapped
/// 2 MiB-aligned, so that a file of huge pages is mapped by huge entries
/// (see `shoal_runtime::hugeshm::map_aligned`); unmapped when the last
/// view of it goes. It keeps the file open with a shared lock until then,
/// so that the holder of a shared-memory block does not reuse it under the
/// mapping (`shoal_runtime::shm_pool`).
#[pyclass(frozen)]
pub(crate) struct Mapped {
    map: shoal_runtime::hugeshm::Mapping,
    writable: bool,
    // Dropped after `map` (fields drop in order): unlocked once unmapped.
    _held: std::os::fd::OwnedFd,
}

impl Mapped {
    fn new(fd: i32, writable: bool) -> std::io::Result<Mapped> {
        // SAFETY: the caller's open descriptor, borrowed for the duplicate.
        let held = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
        shoal_runtime::shm_pool::hold_shared(fd)?;
        // SAFETY: fstat fills the zeroed struct for the caller's fd.
        let len = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd, &mut st) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            usize::try_from(st.st_size).unwrap_or(0)
        };
        let (prot, flags) = if writable {
            (libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE)
        } else {
            (libc::PROT_READ, libc::MAP_SHARED)
        };
        let map = shoal_runtime::hugeshm::map_aligned(fd, len, prot, flags)?;
        Ok(Mapped {
            map,
            writable,
            _held: held,
        })
    }
}

#[pymethods]
impl Mapped {
    /// # Safety
    /// Fills `view` for the mapping, which lives as long as this object
    /// (Python keeps it alive while the view is held).
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut pyo3::ffi::Py_buffer,
        flags: std::os::raw::c_int,
    ) -> PyResult<()> {
        let m = slf.get();
        let lent = (m.map.as_ptr().cast_const(), m.map.len(), m.writable);
        // SAFETY: the mapping lives as long as `slf`; a writable one is
        // private (copy-on-write).
        unsafe { lend_buffer(slf.as_any(), view, flags, lent, "this mapping") }
    }

    fn __len__(&self) -> usize {
        self.map.len()
    }
}

/// Maps the file `fd` (it may be closed afterwards): copy-on-write if
/// `writable`, else read-only. See `Mapped`.
#[pyfunction]
pub(crate) fn map_file(fd: i32, writable: bool) -> PyResult<Mapped> {
    Ok(Mapped::new(fd, writable)?)
}

/// A fetched result for `_serialize.loads`: bytes as a `bytearray` (arrays
/// unpickled from it out of band are writable views of it), a file on this
/// host as a copy-on-write [`Mapped`]. A result its holder cannot pickle is
/// a `TypeError` saying why.
pub(crate) fn fetched_to_py(py: Python<'_>, v: Fetched) -> PyResult<Py<PyAny>> {
    use std::os::fd::AsRawFd;
    match v {
        Fetched::Bytes(b) => Ok(PyByteArray::new(py, &b).into_any().unbind()),
        // The mapping outlives the descriptor, which closes when `f` drops.
        Fetched::File(f) => Ok(Py::new(py, Mapped::new(f.as_raw_fd(), true)?)?.into_any()),
        Fetched::Unpicklable(why) => Err(PyTypeError::new_err(why)),
    }
}
