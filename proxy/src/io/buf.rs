//! Page-aligned I/O buffers, recycled through a small pool.
//!
//! O_DIRECT needs buffers aligned to the device's logical block size; 4096
//! covers every device herd meets. One buffer type for every engine keeps the
//! hand-off between upstream, cache and export copy-free.
//!
//! Capacities are powers of two, and a dropped buffer goes back to a
//! per-size free list (bounded per size), so the hot paths do not pay a
//! fresh allocation, page faults and zeroing per request: for 1 MiB reads
//! that was most of the time (DESIGN.md).

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

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

/// Smallest and largest pooled capacity (4 KiB · 2^i).
const POOL_CLASSES: usize = 14; // 4 KiB ..= 32 MiB
/// Bytes the pool keeps per size class at most.
const POOL_BYTES_PER_CLASS: usize = 16 << 20;
/// Buffers the pool keeps per size class at most.
const POOL_MAX_PER_CLASS: usize = 256;
/// Bytes the pool keeps in all: free buffers are resident memory, and the
/// node's memory bound (DESIGN.md, "Bounded resources") counts them.
const POOL_BYTES_TOTAL: usize = 8 << 20;

/// Bytes held by free buffers in the pool.
static POOLED: AtomicUsize = AtomicUsize::new(0);

/// Counts `n` more pooled bytes if that stays within `limit`.
fn reserve(pooled: &AtomicUsize, n: usize, limit: usize) -> bool {
    pooled
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
            (p + n <= limit).then_some(p + n)
        })
        .is_ok()
}

struct Free(NonNull<u8>);
// SAFETY: a free buffer is owned by the pool alone.
unsafe impl Send for Free {}

static POOL: [Mutex<Vec<Free>>; POOL_CLASSES] = [const { Mutex::new(Vec::new()) }; POOL_CLASSES];

fn class_of(cap: usize) -> Option<usize> {
    let i = (cap / ALIGN).trailing_zeros() as usize;
    (cap.is_power_of_two() && cap >= ALIGN && i < POOL_CLASSES).then_some(i)
}

fn pool_limit(cap: usize) -> usize {
    (POOL_BYTES_PER_CLASS / cap).clamp(1, POOL_MAX_PER_CLASS)
}

impl IoBuf {
    /// A zero-filled buffer of `len` bytes.
    ///
    /// # Panics
    /// Aborts like `Vec` does when memory is exhausted; lengths come from
    /// validated requests (at most 32 MiB) or the configured chunk size.
    #[must_use]
    pub fn zeroed(len: usize) -> Self {
        let mut b = Self::scratch(len);
        b.fill(0);
        b
    }

    /// A buffer of `len` bytes with unspecified (but initialised) contents:
    /// a recycled buffer's old bytes, or zeros. For callers that overwrite
    /// all of it (reads) and check that they did.
    #[must_use]
    pub fn scratch(len: usize) -> Self {
        let cap = len.max(1).next_multiple_of(ALIGN);
        let cap = if cap <= ALIGN << (POOL_CLASSES - 1) {
            cap.next_power_of_two()
        } else {
            cap
        };
        if let Some(c) = class_of(cap) {
            let reused = POOL[c]
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .pop();
            if let Some(Free(ptr)) = reused {
                POOLED.fetch_sub(cap, Ordering::AcqRel);
                return Self { ptr, len, cap };
            }
        }
        let Ok(layout) = Layout::from_size_align(cap, ALIGN) else {
            std::process::abort();
        };
        // SAFETY: layout has a non-zero size. Zeroed: fresh memory must be
        // initialised before it can be read as [u8] (calloc'd pages cost
        // nothing until touched).
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout);
        };
        Self { ptr, len, cap }
    }

    /// A buffer holding a copy of `data`.
    #[must_use]
    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = Self::scratch(data.len());
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

impl IoBuf {
    /// Gives the allocation to the pool if its class and the pool's total
    /// (`limit`) have room, else back to the allocator. Called once, by
    /// `drop`.
    fn release(&mut self, limit: usize) {
        if let Some(c) = class_of(self.cap) {
            let mut free = POOL[c]
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if free.len() < pool_limit(self.cap) && reserve(&POOLED, self.cap, limit) {
                free.push(Free(self.ptr));
                return;
            }
        }
        if let Ok(layout) = Layout::from_size_align(self.cap, ALIGN) {
            // SAFETY: allocated in `zeroed` with exactly this layout.
            unsafe { dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        self.release(POOL_BYTES_TOTAL);
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
        assert_eq!(IoBuf::zeroed(12288).capacity(), 16384);
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

    #[test]
    fn the_pool_total_is_bounded() {
        let pooled = AtomicUsize::new(0);
        assert!(reserve(&pooled, 6 << 20, 8 << 20));
        assert!(!reserve(&pooled, 4 << 20, 8 << 20), "over the total");
        assert!(reserve(&pooled, 2 << 20, 8 << 20));
        assert_eq!(pooled.load(Ordering::Acquire), 8 << 20);
    }

    #[test]
    fn recycled_buffers_come_back_zeroed_only_when_asked() {
        // A class no other test uses, so the pool is ours; given back
        // without the total (other tests' buffers may fill it meanwhile).
        let len = 16 << 20;
        let mut a = std::mem::ManuallyDrop::new(IoBuf::zeroed(len));
        a[0] = 0xab;
        let p = a.as_ptr();
        a.release(usize::MAX);
        let b = IoBuf::scratch(len);
        assert_eq!(b.as_ptr(), p, "the dropped buffer is reused");
        assert_eq!(b[0], 0xab);
        // Also past the total: a plain drop cannot pool 16 MiB (the total
        // is 8), so `c` would be a fresh buffer that matched `p` only
        // when the allocator happened to reuse the address.
        std::mem::ManuallyDrop::new(b).release(usize::MAX);
        let c = IoBuf::zeroed(len);
        assert_eq!(c.as_ptr(), p);
        assert!(c.iter().all(|&x| x == 0));
    }
}
