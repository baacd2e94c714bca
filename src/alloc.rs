//! The process's heap: a counting global allocator, so CPU memory figures are exact bytes in use
//! rather than the resident set (which keeps freed pages and shared libraries), and glibc
//! tuning so that tensor buffers are reused rather than returned to the kernel. `ual`'s binary
//! installs the allocator (for library users [`CountingAlloc::active`] stays false);
//! `device::select` applies the tuning when it picks the CPU.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// The system allocator, counting live bytes and their high-water mark.
pub struct CountingAlloc;

impl CountingAlloc {
    /// Whether this allocator is the process's global one.
    pub fn active() -> bool {
        ACTIVE.load(Ordering::Relaxed)
    }

    /// Bytes allocated and not yet freed.
    pub fn current() -> usize {
        CURRENT.load(Ordering::Relaxed)
    }

    /// The most bytes in use at once since the last [`CountingAlloc::reset_peak`].
    pub fn peak() -> usize {
        PEAK.load(Ordering::Relaxed)
    }

    /// Starts a new peak measurement from the bytes in use now.
    pub fn reset_peak() {
        PEAK.store(CURRENT.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    fn add(size: usize) {
        if !ACTIVE.load(Ordering::Relaxed) {
            ACTIVE.store(true, Ordering::Relaxed);
        }
        let now = CURRENT.fetch_add(size, Ordering::Relaxed) + size;
        PEAK.fetch_max(now, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded to `System` unchanged; only counters are updated.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            Self::add(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            Self::add(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
            Self::add(new_size);
        }
        new
    }
}

/// Keeps freed tensor buffers in the process for reuse.
///
/// glibc serves large allocations with fresh mappings and unmaps them on free, so every step's
/// activations were page-faulted in and zeroed by the kernel again: a quarter of a 125m CPU
/// training step went to `clear_page`. With mmap off and trimming off, freed buffers go back to
/// malloc's free lists, as PyTorch's caching allocators keep theirs. Peak memory is unchanged;
/// memory freed after a peak stays with the process.
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters, under glibc's own arena lock.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
