//! Loading the eBPF programs, attaching the one the target needs, and
//! draining its ring buffer into a profile.

use std::path::Path;
use std::time::Instant;

use aya::maps::{MapData, PerCpuArray, RingBuf};
use aya::programs::TracePoint;
use aya::{Ebpf, EbpfLoader};
use herd_ebpf_common::{
    Event, EVENT_SIZE, GLOBAL_DEV, GLOBAL_INO, GLOBAL_SDEV, MAP_DROPS, MAP_EVENTS, PROG_BLOCK,
    PROG_PAGE,
};
use tokio::io::unix::AsyncFd;

use super::{RecordError, TargetKind};
use crate::profile::ProfileBuilder;

/// What a recording saw.
#[derive(Clone, Copy, Debug, Default)]
pub struct Totals {
    pub events: u64,
    pub drops: u64,
    pub bytes_read: u64,
}

/// A live recording: programs attached, ring buffer open.
pub struct Session {
    // Keeps programs and links alive; dropping it detaches everything.
    _bpf: Ebpf,
    ring: AsyncFd<RingBuf<MapData>>,
    drops: PerCpuArray<MapData, u64>,
    /// CLOCK_MONOTONIC at attach, in the programs' time base.
    start_ns: u64,
    pub started: Instant,
    totals: Totals,
}

fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |ts| {
        u64::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000_000
            + u64::try_from(ts.tv_nsec()).unwrap_or(0)
    })
}

impl Session {
    /// Loads `object`, filters on `kind`, attaches. Needs a tokio runtime.
    ///
    /// # Errors
    /// Load, attach and map errors.
    pub fn start(object: &Path, kind: TargetKind) -> Result<Self, RecordError> {
        let (dev, sdev, ino) = match kind {
            TargetKind::Device { dev } => (dev, 0u32, 0u64),
            TargetKind::File { sdev, ino } => (0, sdev, ino),
        };
        let mut bpf = EbpfLoader::new()
            .override_global(GLOBAL_DEV, &dev, true)
            .override_global(GLOBAL_SDEV, &sdev, true)
            .override_global(GLOBAL_INO, &ino, true)
            .load_file(object)
            .map_err(RecordError::Load)?;
        let (prog, category, name) = match kind {
            TargetKind::Device { .. } => (PROG_BLOCK, "block", "block_rq_issue"),
            TargetKind::File { .. } => (PROG_PAGE, "filemap", "mm_filemap_add_to_page_cache"),
        };
        let attach_err = |source| RecordError::Attach {
            program: prog,
            source,
        };
        let tp: &mut TracePoint = bpf
            .program_mut(prog)
            .ok_or(RecordError::Map(prog))?
            .try_into()
            .map_err(attach_err)?;
        tp.load().map_err(attach_err)?;
        let start_ns = monotonic_ns();
        tp.attach(category, name).map_err(attach_err)?;
        let ring = RingBuf::try_from(
            bpf.take_map(MAP_EVENTS)
                .ok_or(RecordError::Map(MAP_EVENTS))?,
        )
        .map_err(RecordError::MapAccess)?;
        let drops =
            PerCpuArray::try_from(bpf.take_map(MAP_DROPS).ok_or(RecordError::Map(MAP_DROPS))?)
                .map_err(RecordError::MapAccess)?;
        // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd
        // owns the RingBuf, and always returns that same fd.
        let ring = unsafe { AsyncFd::register(ring) }.map_err(|e| RecordError::Ring(e.into()))?;
        Ok(Self {
            _bpf: bpf,
            ring,
            drops,
            start_ns,
            started: Instant::now(),
            totals: Totals::default(),
        })
    }

    /// Moves every event waiting in the ring into `into`.
    pub fn drain(&mut self, into: &mut ProfileBuilder) {
        let ring = self.ring.get_mut();
        while let Some(item) = ring.next() {
            if item.len() < EVENT_SIZE {
                continue;
            }
            // SAFETY: the program writes exactly one `Event` per record and
            // `Event` is plain old data; read_unaligned copes with the ring's
            // 8-byte alignment either way.
            let e: Event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            self.totals.events += 1;
            self.totals.bytes_read += e.len;
            let at_us = e.time_ns.saturating_sub(self.start_ns) / 1000;
            into.add(e.offset, e.len, at_us);
        }
    }

    /// Waits until events arrive (or `limit` passes), then drains them.
    ///
    /// # Errors
    /// `Ring` if polling the ring buffer fails.
    pub async fn pump(
        &mut self,
        into: &mut ProfileBuilder,
        limit: std::time::Duration,
    ) -> Result<(), RecordError> {
        if let Ok(guard) = tokio::time::timeout(limit, self.ring.readable_mut()).await {
            let mut guard = guard.map_err(RecordError::Ring)?;
            guard.clear_ready();
        }
        self.drain(into);
        Ok(())
    }

    /// Events seen so far, with the kernel's drop count summed over CPUs.
    ///
    /// # Errors
    /// `MapAccess` if the drop counter cannot be read.
    pub fn totals(&self) -> Result<Totals, RecordError> {
        let per_cpu = self.drops.get(&0, 0).map_err(RecordError::MapAccess)?;
        Ok(Totals {
            drops: per_cpu.iter().sum(),
            ..self.totals
        })
    }
}
