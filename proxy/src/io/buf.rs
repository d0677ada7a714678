//! Page-aligned I/O buffers.
//!
//! O_DIRECT needs buffers aligned to the device's logical block size; 4096
//! covers every device herd meets. One buffer type for every engine keeps the
//! hand-off between upstream, cache and export copy-free.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

/// Alignment of every buffer (and the unit O_DIRECT reads are rounded to).
pub const ALIGN: usize = 4096;

/// A heap buffer aligned to [`ALIGN`], with a length that may shrink.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: IoBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for IoBuf {}
// SAFETY: shared references only give out &[u8].
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A zero-filled buffer of `len` bytes.
    ///
    /// # Panics
    /// Aborts like `Vec` does when memory is exhausted; lengths come from
    /// validated requests (at most 32 MiB) or the configured chunk size.
    #[must_use]
    pub fn zeroed(len: usize) -> Self {
        let cap = len.max(1).next_multiple_of(ALIGN);
        let Ok(layout) = Layout::from_size_align(cap, ALIGN) else {
            std::process::abort();
        };
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout);
        };
        Self { ptr, len, cap }
    }

    /// A buffer holding a copy of `data`.
    #[must_use]
    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = Self::zeroed(data.len());
        b.copy_from_slice(data);
        b
    }

    /// Pointer for the kernel to fill (synchronous calls only).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Shortens the visible length (e.g. after a short read at end of file).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Capacity rounded up to [`ALIGN`]; an O_DIRECT read may use all of it.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Sets the visible length up to the capacity.
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.cap);
    }
}

impl std::ops::Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialised (zeroed) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in Deref, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        if let Ok(layout) = Layout::from_size_align(self.cap, ALIGN) {
            // SAFETY: allocated in `zeroed` with exactly this layout.
            unsafe { dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf").field("len", &self.len).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_sized() {
        let mut b = IoBuf::zeroed(5000);
        assert_eq!(b.len(), 5000);
        assert_eq!(b.capacity(), 8192);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        assert!(b.iter().all(|&x| x == 0));
        b[4999] = 7;
        b.truncate(10);
        assert_eq!(b.len(), 10);
        b.set_len(5000);
        assert_eq!(b[4999], 7);
        let c = IoBuf::from_slice(b"hello");
        assert_eq!(&c[..], b"hello");
        assert_eq!(IoBuf::zeroed(0).len(), 0);
    }
}
