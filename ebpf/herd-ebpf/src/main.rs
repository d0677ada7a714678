//! herd's boot recorder, kernel side.
//!
//! Two tracepoint programs report reads of one image into a ring buffer:
//! `block:block_rq_issue` for a block device (a kernel iSCSI LUN in
//! production, a loop device in tests) and
//! `filemap:mm_filemap_add_to_page_cache` for an image file read through
//! the page cache. Filtering happens here, against globals the loader sets,
//! so userspace only ever sees the image's reads. When the ring is full the
//! event is counted in a per-CPU drop counter instead of being lost silently.

#![no_std]
#![no_main]

use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::macros::{map, tracepoint};
use aya_ebpf::maps::{PerCpuArray, RingBuf};
use aya_ebpf::programs::TracePointContext;
use herd_ebpf_common::{offsets, Event, KIND_BLOCK, KIND_PAGE, PAGE_SIZE};

// Set by the loader (`EbpfLoader::override_global`); read with
// `read_volatile` so the compiler cannot fold the zero initialisers.
#[no_mangle]
static FILTER_DEV: u32 = 0;
#[no_mangle]
static FILTER_SDEV: u32 = 0;
#[no_mangle]
static FILTER_INO: u64 = 0;

/// 16 MiB: ~500k events of slack, measured to lose nothing at ~210k
/// events/s (shared/MACHINE-NOTES.md).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(16 << 20, 0);

#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[tracepoint]
pub fn block_rq_issue(ctx: TracePointContext) -> u32 {
    let _ = on_block(&ctx);
    0
}

#[tracepoint]
pub fn mm_filemap_add_to_page_cache(ctx: TracePointContext) -> u32 {
    let _ = on_page(&ctx);
    0
}

fn on_block(ctx: &TracePointContext) -> Result<(), i64> {
    // SAFETY: FILTER_DEV is a plain u32 in .rodata.
    let want = unsafe { core::ptr::read_volatile(&FILTER_DEV) };
    // SAFETY: offsets are those of the tracepoint's format file; the
    // helper reads through bpf_probe_read.
    let dev: u32 = unsafe { ctx.read_at(offsets::RQ_DEV)? };
    if want == 0 || dev != want {
        return Ok(());
    }
    // rwbs starts with the operation: 'R' for reads ('F' would be a
    // preflush, which only writes carry).
    // SAFETY: as above.
    let op: u8 = unsafe { ctx.read_at(offsets::RQ_RWBS)? };
    if op != b'R' {
        return Ok(());
    }
    // SAFETY: as above.
    let sector: u64 = unsafe { ctx.read_at(offsets::RQ_SECTOR)? };
    // SAFETY: as above.
    let sectors: u32 = unsafe { ctx.read_at(offsets::RQ_NR_SECTOR)? };
    if sectors == 0 {
        return Ok(());
    }
    emit(KIND_BLOCK, sector * 512, u64::from(sectors) * 512);
    Ok(())
}

fn on_page(ctx: &TracePointContext) -> Result<(), i64> {
    // SAFETY: FILTER_INO / FILTER_SDEV are plain integers in .rodata.
    let (want_ino, want_dev) = unsafe {
        (
            core::ptr::read_volatile(&FILTER_INO),
            core::ptr::read_volatile(&FILTER_SDEV),
        )
    };
    // SAFETY: offsets from the tracepoint's format file.
    let ino: u64 = unsafe { ctx.read_at(offsets::PC_INO)? };
    if want_ino == 0 || ino != want_ino {
        return Ok(());
    }
    // SAFETY: as above.
    let dev: u32 = unsafe { ctx.read_at(offsets::PC_SDEV)? };
    if dev != want_dev {
        return Ok(());
    }
    // SAFETY: as above.
    let index: u64 = unsafe { ctx.read_at(offsets::PC_INDEX)? };
    // SAFETY: as above.
    let order: u8 = unsafe { ctx.read_at(offsets::PC_ORDER)? };
    let pages = 1u64 << (order & 31);
    emit(KIND_PAGE, index * PAGE_SIZE, pages * PAGE_SIZE);
    Ok(())
}

fn emit(kind: u32, offset: u64, len: u64) {
    match EVENTS.reserve::<Event>(0) {
        Some(mut slot) => {
            slot.write(Event {
                kind,
                _pad: 0,
                // SAFETY: a helper without preconditions.
                time_ns: unsafe { bpf_ktime_get_ns() },
                offset,
                len,
            });
            slot.submit(0);
        }
        None => {
            if let Some(n) = DROPS.get_ptr_mut(0) {
                // SAFETY: a per-CPU slot; no other writer runs on this CPU
                // while this program does.
                unsafe { *n += 1 };
            }
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
