//! Types shared by the eBPF programs (`ebpf/herd-ebpf`, built for
//! `bpfel-unknown-none`) and the proxy's recorder that loads them.
//!
//! Everything here is `no_std` and `#[repr(C)]`: the kernel side writes
//! [`Event`]s into a ring buffer and userspace reads the same bytes back.
//! The names of the maps, programs and filter globals live here too, so a
//! rename on one side cannot silently break the other.

#![no_std]

/// A read of the image seen by the kernel, already converted to bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// [`KIND_BLOCK`] or [`KIND_PAGE`].
    pub kind: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` when the tracepoint fired.
    pub time_ns: u64,
    /// Byte offset into the image.
    pub offset: u64,
    /// Bytes read (sectors × 512, or pages × 4096).
    pub len: u64,
}

/// Size of one [`Event`] in the ring buffer.
pub const EVENT_SIZE: usize = core::mem::size_of::<Event>();

/// `block:block_rq_issue` for the filtered device.
pub const KIND_BLOCK: u32 = 1;
/// `filemap:mm_filemap_add_to_page_cache` for the filtered inode.
pub const KIND_PAGE: u32 = 2;

/// Ring buffer of [`Event`]s.
pub const MAP_EVENTS: &str = "EVENTS";
/// Per-CPU array with one `u64`: events lost because the ring was full.
pub const MAP_DROPS: &str = "DROPS";

/// Program attached to `block:block_rq_issue`.
pub const PROG_BLOCK: &str = "block_rq_issue";
/// Program attached to `filemap:mm_filemap_add_to_page_cache`.
pub const PROG_PAGE: &str = "mm_filemap_add_to_page_cache";

/// Global `u32`: the block device to record, in the kernel's `dev_t`
/// encoding (`major << 20 | minor`); 0 records nothing.
pub const GLOBAL_DEV: &str = "FILTER_DEV";
/// Global `u32`: the file's superblock device (`major << 20 | minor`).
pub const GLOBAL_SDEV: &str = "FILTER_SDEV";
/// Global `u64`: the file's inode number; 0 records nothing.
pub const GLOBAL_INO: &str = "FILTER_INO";

/// Encodes a device number the way tracepoints print `dev`.
#[must_use]
pub const fn kernel_dev(major: u32, minor: u32) -> u32 {
    (major << 20) | (minor & 0xf_ffff)
}

/// Page size the page-cache tracepoint's `index` counts in.
pub const PAGE_SIZE: u64 = 4096;

/// Field offsets in the tracepoints' raw records (from the `format` files
/// under /sys/kernel/tracing/events; stable for these fields since 5.x).
pub mod offsets {
    pub const RQ_DEV: usize = 8;
    pub const RQ_SECTOR: usize = 16;
    pub const RQ_NR_SECTOR: usize = 24;
    pub const RQ_RWBS: usize = 34;
    pub const PC_INO: usize = 16;
    pub const PC_INDEX: usize = 24;
    pub const PC_SDEV: usize = 32;
    pub const PC_ORDER: usize = 36;
}
