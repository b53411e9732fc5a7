//! A raw view of an output buffer that parallel workers write to in disjoint
//! pieces (for example, each worker its own block of channels in every row
//! of a (batch, length, channels) tensor): the pieces interleave in memory,
//! so safe slice splitting cannot express them.

use std::marker::PhantomData;

#[derive(Clone, Copy)]
pub(crate) struct SharedMut<'a, T> {
    ptr: *mut T,
    len: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

// SAFETY: the callers guarantee that no two workers touch the same element;
// the pointer stays valid for the lifetime of the borrowed slice.
unsafe impl<T: Send> Send for SharedMut<'_, T> {}
unsafe impl<T: Send> Sync for SharedMut<'_, T> {}

impl<'a, T> SharedMut<'a, T> {
    pub(crate) fn new(data: &'a mut [T]) -> Self {
        Self {
            ptr: data.as_mut_ptr(),
            len: data.len(),
            _borrow: PhantomData,
        }
    }

    /// The elements `offset .. offset + len`.
    ///
    /// # Safety
    /// No other live reference (from this or another worker) may overlap
    /// the returned range.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, offset: usize, len: usize) -> &'a mut [T] {
        assert!(offset + len <= self.len, "SharedMut range out of bounds");
        std::slice::from_raw_parts_mut(self.ptr.add(offset), len)
    }

    /// The elements `offset .. offset + len`, to read.
    ///
    /// # Safety
    /// No worker may write to the range while the returned slice lives.
    #[inline(always)]
    pub(crate) unsafe fn read(&self, offset: usize, len: usize) -> &'a [T] {
        assert!(offset + len <= self.len, "SharedMut range out of bounds");
        std::slice::from_raw_parts(self.ptr.add(offset), len)
    }
}
