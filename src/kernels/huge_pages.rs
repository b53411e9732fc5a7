//! Buffers for weights that are streamed from DRAM: aligned to 2 MiB and
//! advised onto transparent huge pages.
//!
//! Decoding reads every weight once per token, so it is bound by memory
//! bandwidth. The weights do not fit the TLB. With 4 KiB pages:
//! - the core walks the page table every 4 KiB, and under a VM that walk
//!   goes through two levels of tables;
//! - the hardware prefetcher stops at every 4 KiB boundary.
//!
//! 2 MiB pages remove both. Linux gives them to memory advised with
//! `madvise(MADV_HUGEPAGE)` when transparent huge pages are enabled
//! ("always" or "madvise" in /sys/kernel/mm/transparent_hugepage/enabled),
//! but only for 2 MiB-aligned ranges advised before their first write.
//! A `Vec` can give neither guarantee (the allocator reuses memory that
//! was already written), hence this type. The advice changes speed, never
//! contents; where it is refused the mapping keeps small pages, and on
//! other systems the buffer comes from the allocator. docs/INFERENCE.md has the
//! measurements.

use std::alloc::{alloc_zeroed, dealloc, handle_alloc_error, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// A huge page, and the alignment of large buffers.
pub const HUGE_PAGE: usize = 2 << 20;

/// Element types for which all-zero bytes are a valid value (the buffer
/// starts zeroed).
pub trait Zeroable: Copy + 'static {}
impl Zeroable for f32 {}
impl Zeroable for u16 {}
impl Zeroable for i8 {}

/// A fixed-length, zero-initialised buffer of `T`. On Linux, buffers of at
/// least [`HUGE_PAGE`] bytes are fresh anonymous mappings that start on a
/// 2 MiB boundary and are advised onto huge pages before anything is
/// written to them: memory from the allocator may have been written (and
/// so mapped with small pages) before.
pub struct HugePageBuffer<T: Zeroable> {
    ptr: NonNull<T>,
    len: usize,
    /// bytes mapped at ptr by `map_huge` (unmapped on drop); 0 when the
    /// global allocator holds the buffer
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    mapped: usize,
}

// SAFETY: the buffer owns its elements, as a Vec<T> does.
unsafe impl<T: Zeroable + Send> Send for HugePageBuffer<T> {}
unsafe impl<T: Zeroable + Sync> Sync for HugePageBuffer<T> {}

impl<T: Zeroable> HugePageBuffer<T> {
    /// `len` zeros.
    pub fn zeroed(len: usize) -> Self {
        let bytes = len
            .checked_mul(size_of::<T>())
            .expect("buffer size overflows usize");
        if bytes == 0 {
            return Self {
                ptr: NonNull::dangling(),
                len,
                mapped: 0,
            };
        }
        if bytes >= HUGE_PAGE {
            if let Some((ptr, mapped)) = map_huge(bytes) {
                return Self {
                    ptr: ptr.cast(),
                    len,
                    mapped,
                };
            }
        }
        let layout = Layout::array::<T>(len).expect("a valid buffer layout");
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            handle_alloc_error(layout)
        };
        Self {
            ptr: ptr.cast(),
            len,
            mapped: 0,
        }
    }

    /// A copy of `values`.
    pub fn from_slice(values: &[T]) -> Self {
        let mut buffer = Self::zeroed(values.len());
        buffer.copy_from_slice(values);
        buffer
    }
}

/// A fresh, zeroed anonymous mapping of at least `bytes` bytes that starts
/// on a 2 MiB boundary, advised onto huge pages: its address and mapped
/// length. None where mapping fails or is not Linux (the caller then uses
/// the allocator).
#[cfg(target_os = "linux")]
fn map_huge(bytes: usize) -> Option<(NonNull<u8>, usize)> {
    let mapped = bytes.next_multiple_of(4096);
    // Map HUGE_PAGE more, then give back what lies before the first 2 MiB
    // boundary and after the buffer.
    let total = mapped.checked_add(HUGE_PAGE)?;
    // SAFETY: a new private anonymous mapping; no existing memory is touched.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return None;
    }
    let base = base as usize;
    let start = base.next_multiple_of(HUGE_PAGE);
    let (head, tail) = (start - base, base + total - (start + mapped));
    // SAFETY: both ranges lie inside the mapping just made and hold
    // nothing; each is page-aligned (mapped is a multiple of 4096).
    unsafe {
        if head > 0 {
            libc::munmap(base as *mut libc::c_void, head);
        }
        if tail > 0 {
            libc::munmap((start + mapped) as *mut libc::c_void, tail);
        }
        // Changes how the range is backed, not what it holds; a refusal
        // (THP disabled, an old kernel) leaves ordinary pages.
        libc::madvise(start as *mut libc::c_void, mapped, libc::MADV_HUGEPAGE);
    }
    NonNull::new(start as *mut u8).map(|p| (p, mapped))
}

#[cfg(not(target_os = "linux"))]
fn map_huge(_bytes: usize) -> Option<(NonNull<u8>, usize)> {
    None
}

impl<T: Zeroable> Drop for HugePageBuffer<T> {
    fn drop(&mut self) {
        if self.len * size_of::<T>() == 0 {
            return;
        }
        #[cfg(target_os = "linux")]
        if self.mapped > 0 {
            // SAFETY: mapped by map_huge at ptr with this length.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.mapped) };
            return;
        }
        let layout = Layout::array::<T>(self.len).expect("a valid buffer layout");
        // SAFETY: allocated in `zeroed` with this same layout.
        unsafe { dealloc(self.ptr.as_ptr().cast(), layout) };
    }
}

impl<T: Zeroable> Deref for HugePageBuffer<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: ptr holds len initialised elements (or is dangling with
        // len elements of zero total size).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Zeroable> DerefMut for HugePageBuffer<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in deref, and &mut self is unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Zeroable> Clone for HugePageBuffer<T> {
    fn clone(&self) -> Self {
        Self::from_slice(self)
    }
}

impl<T: Zeroable + std::fmt::Debug> std::fmt::Debug for HugePageBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HugePageBuffer<{}>(len {})",
            std::any::type_name::<T>(),
            self.len
        )
    }
}

/// Gives memory that the allocator holds free back to the system (glibc's
/// `malloc_trim`; nothing elsewhere). Loading converts an f32 model into
/// these buffers and frees the f32 copy; glibc keeps such freed memory in
/// its per-thread arenas, resident, and since the weights no longer reuse
/// it (they are mappings of their own) it would stay resident for nothing:
/// 400 MB on mamba-130m.
pub fn release_free_heap_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator's own
    // arenas to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}
