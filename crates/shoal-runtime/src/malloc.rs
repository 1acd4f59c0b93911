//! A worker process hands back the C heap memory its tasks freed.
//!
//! glibc keeps freed memory in its heaps for later allocations: the top of
//! a heap up to a threshold that it raises (to 64 MiB at most) each time a
//! block it had mapped on its own is freed, and every free chunk below the
//! top. A worker runs one task's short-lived allocations after another
//! (pandas' masks and indexers, CSV parsing buffers, copies made while
//! unpickling), and across the Dask benchmark's workloads its private
//! memory grew from 89 to 208-222 MiB, and to 146-160 MiB when trimmed
//! between runs: free memory a threaded run holds once, in one process,
//! and each worker holds on its own.
//!
//! Dask's nanny fixes glibc's trim threshold at 64 KiB for its workers
//! (`MALLOC_TRIM_THRESHOLD_`). That fixes the mapping threshold too, and
//! every block over 128 KiB is then mapped, faulted in and unmapped anew:
//! here it made the groupby 1.6x slower and the dataframe queries 1.1-1.2x.
//! So glibc's thresholds stay as they are, and a worker trims its heap
//! instead once it has been idle for a second after running tasks
//! (`malloc_trim`, which also returns free pages below the top), and when
//! its memory is past the fraction at which it drops what it keeps.

/// Returns the free memory of this process's C heaps to the system, unless
/// `SHOAL_MALLOC_TRIM` is `0`. Returns whether any was returned.
pub fn trim() -> bool {
    if crate::settings::is_off("SHOAL_MALLOC_TRIM") {
        return false;
    }
    trim_heaps()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_heaps() -> bool {
    // SAFETY: malloc_trim only returns free memory of glibc's heaps.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heaps() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Private memory of this process (RSS minus file and shared pages).
    fn anon_bytes() -> usize {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let kb = status
            .lines()
            .find_map(|l| l.strip_prefix("RssAnon:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
            .unwrap();
        kb * 1024
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn freed_heap_memory_goes_back_to_the_system() {
        // Many blocks under glibc's mapping threshold, touched, then all
        // freed but every 16th: the kept ones hold each heap's free space
        // between them, which glibc's own trimming (a heap's top, or a
        // whole heap) cannot return.
        let blocks: Vec<Vec<u8>> = (0..2048).map(|_| vec![1u8; 64 * 1024]).collect();
        let kept: Vec<Vec<u8>> = blocks.into_iter().step_by(16).collect();
        let before = anon_bytes();
        assert!(trim());
        let returned = before.saturating_sub(anon_bytes());
        drop(kept);
        assert!(
            returned >= 64 << 20,
            "trimming returned {returned} bytes of 128 MiB freed"
        );
    }
}
