//! The room a cache may take on its disk: a size cap (`--cache-size`) kept
//! by evicting chunks, and the end of the disk itself (ENOSPC).
//!
//! Eviction picks the least recently used chunks, a boot profile's chunks
//! last. Its order keeps the bitmap exact across a crash: bits cleared →
//! bitmap words written → bitmap fdatasync'ed → holes punched. A crash
//! before the punch leaves whole chunks whose bits may still be set. A
//! reader pins the data file from its bitmap check to its `pread`, so a
//! punch never lands under a read (DESIGN.md, "A cache that fits its disk").
//!
//! A full disk is served through: fetched chunks reach their readers but
//! are not written, one log line marks the start and one the end, and
//! prefetch waits until a probe of the file system finds room again.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics as m;

/// A cap in chunks, with what eviction needs to honour it.
pub(super) struct Cap {
    /// Chunks the data file may hold.
    pub chunks: u64,
    /// Chunks being written, counted against the cap before their bits
    /// are set.
    reserved: AtomicU64,
    start: Instant,
    /// Last use of each chunk, in 10 ms ticks since `start` (0: not used
    /// since this process opened the cache).
    last_use: Vec<AtomicU32>,
    /// A boot profile's chunks (bit per chunk): evicted last.
    pinned: Vec<AtomicU64>,
    /// One eviction (and reservation) at a time.
    pub lock: tokio::sync::Mutex<()>,
}

/// Which chunks an eviction may take.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Victims {
    /// Any present chunk: unpinned ones first, then pinned, each least
    /// recently used first (a client read).
    Any,
    /// Unpinned chunks only (prefetching a profile's chunks).
    Unpinned,
}

impl Cap {
    pub fn new(chunks: u64, total: u64) -> Self {
        let n = usize::try_from(total).unwrap_or(0);
        let words = usize::try_from(total.div_ceil(64)).unwrap_or(0);
        Self {
            chunks,
            reserved: AtomicU64::new(0),
            start: Instant::now(),
            last_use: (0..n).map(|_| AtomicU32::new(0)).collect(),
            pinned: (0..words).map(|_| AtomicU64::new(0)).collect(),
            lock: tokio::sync::Mutex::new(()),
        }
    }

    pub fn touch(&self, c: u64) {
        let tick = u32::try_from(self.start.elapsed().as_millis() / 10)
            .unwrap_or(u32::MAX)
            .max(1);
        if let Some(t) = usize::try_from(c).ok().and_then(|c| self.last_use.get(c)) {
            t.store(tick, Ordering::Relaxed);
        }
    }

    /// Makes `chunks` the pinned set (a new profile replaces the old).
    pub fn pin(&self, chunks: &[u64]) {
        for w in &self.pinned {
            w.store(0, Ordering::Relaxed);
        }
        for &c in chunks {
            if let Some(w) = usize::try_from(c / 64)
                .ok()
                .and_then(|w| self.pinned.get(w))
            {
                w.fetch_or(1 << (c % 64), Ordering::Relaxed);
            }
        }
    }

    pub fn is_pinned(&self, c: u64) -> bool {
        usize::try_from(c / 64)
            .ok()
            .and_then(|w| self.pinned.get(w))
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (c % 64)) != 0)
    }

    /// Present chunks (bitmap words) that are not pinned.
    pub fn unpinned(&self, present: &[u64]) -> u64 {
        present
            .iter()
            .zip(&self.pinned)
            .map(|(w, p)| u64::from((w & !p.load(Ordering::Relaxed)).count_ones()))
            .sum()
    }

    pub fn reserved(&self) -> u64 {
        self.reserved.load(Ordering::Acquire)
    }

    /// Counts `n` chunks against the cap until the guard drops (after
    /// their bits are set, or their write failed).
    pub fn reserve(&self, n: u64) -> Reservation<'_> {
        self.reserved.fetch_add(n, Ordering::AcqRel);
        Reservation { cap: self, n }
    }

    /// Up to `want` chunks to evict among those `present` says are on
    /// disk (its words), in eviction order.
    pub fn choose(&self, present: &[u64], want: u64, allow: Victims) -> Vec<u64> {
        let mut cands: Vec<(bool, u32, u64)> = Vec::new();
        for (w, &bits) in present.iter().enumerate() {
            let mut bits = bits;
            while bits != 0 {
                let c = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let pinned = self.is_pinned(c);
                if pinned && allow == Victims::Unpinned {
                    continue;
                }
                let used = usize::try_from(c)
                    .ok()
                    .and_then(|i| self.last_use.get(i))
                    .map_or(0, |t| t.load(Ordering::Relaxed));
                cands.push((pinned, used, c));
            }
        }
        let want = usize::try_from(want).unwrap_or(usize::MAX);
        if cands.len() > want {
            cands.select_nth_unstable(want);
            cands.truncate(want);
        }
        cands.sort_unstable();
        cands.into_iter().map(|(_, _, c)| c).collect()
    }
}

pub(super) struct Reservation<'a> {
    cap: &'a Cap,
    n: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.cap.reserved.fetch_sub(self.n, Ordering::AcqRel);
    }
}

/// Punches the holes of evicted chunks (adjacent ones in one call).
pub(super) fn punch(
    file: &std::fs::File,
    chunks: &[u64],
    chunk_size: u64,
    size: u64,
) -> std::io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    let mut sorted = chunks.to_vec();
    sorted.sort_unstable();
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j + 1 < sorted.len() && sorted[j + 1] == sorted[j] + 1 {
            j += 1;
        }
        let off = sorted[i] * chunk_size;
        let end = ((sorted[j] + 1) * chunk_size).min(size);
        fallocate(
            file.as_fd(),
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            i64::try_from(off).unwrap_or(i64::MAX),
            i64::try_from(end.saturating_sub(off)).unwrap_or(0),
        )?;
        i = j + 1;
    }
    Ok(())
}

/// Whether a write error means the disk (or the user's quota) is full.
pub(super) fn is_no_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// The cache disk's full state: entered at an ENOSPC, left when a probe
/// finds room again.
pub(super) struct DiskFull {
    full: AtomicBool,
    room: tokio::sync::Notify,
    dir: PathBuf,
    /// Bytes fetched and served but not cached while full.
    skipped: AtomicU64,
    metrics: Arc<m::ImageMetrics>,
}

/// How often a full disk is looked at again.
const PROBE: Duration = Duration::from_secs(1);

impl DiskFull {
    pub fn new(dir: PathBuf, metrics: Arc<m::ImageMetrics>) -> Arc<Self> {
        metrics.disk_full(false);
        Arc::new(Self {
            metrics,
            full: AtomicBool::new(false),
            room: tokio::sync::Notify::new(),
            dir,
            skipped: AtomicU64::new(0),
        })
    }

    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::Acquire)
    }

    /// Counts fetched bytes served but not cached.
    pub fn skip(&self, bytes: u64) {
        self.skipped.fetch_add(bytes, Ordering::Relaxed);
        self.metrics.uncached_bytes(bytes);
    }

    /// A write failed for want of space: logs once, then probes the file
    /// system until it has room again.
    pub fn enter(self: &Arc<Self>, chunk: u64) {
        if self.full.swap(true, Ordering::AcqRel) {
            return;
        }
        self.metrics.disk_full(true);
        tracing::warn!(
            dir = %self.dir.display(),
            chunk,
            "cache disk full: serving fetched chunks without caching them; prefetch paused until space returns"
        );
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let since = Instant::now();
            loop {
                tokio::time::sleep(PROBE).await;
                match has_room(&this.dir) {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot probe the cache file system");
                    }
                }
            }
            this.full.store(false, Ordering::Release);
            this.metrics.disk_full(false);
            tracing::info!(
                dir = %this.dir.display(),
                after_s = since.elapsed().as_secs(),
                uncached_mib = this.skipped.swap(0, Ordering::Relaxed) >> 20,
                "cache disk has room again; caching and prefetch resume"
            );
            this.room.notify_waiters();
        });
    }

    /// Returns once the disk is not known to be full.
    pub async fn wait(&self) {
        loop {
            let woken = self.room.notified();
            if !self.is_full() {
                return;
            }
            woken.await;
        }
    }
}

/// Room again: a tenth of the file system free, at least 1 MiB and at
/// most 64 MiB, so caching does not flap at the last few blocks.
fn has_room(dir: &std::path::Path) -> nix::Result<bool> {
    let st = nix::sys::statvfs::statvfs(dir)?;
    let unit = st.fragment_size();
    let total = st.blocks().saturating_mul(unit);
    let free = st.blocks_available().saturating_mul(unit);
    Ok(free >= (total / 10).clamp(1 << 20, 64 << 20))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn victims_are_least_recently_used_and_pinned_last() {
        let cap = Cap::new(4, 128);
        // Chunks 1, 2, 3, 70 present; 2 used last, 1 before it; 3 and 70
        // never used (present at start); 70 pinned.
        let mut present = vec![0u64; 2];
        for c in [1u64, 2, 3, 70] {
            present[(c / 64) as usize] |= 1 << (c % 64);
        }
        cap.pin(&[70]);
        cap.last_use[1].store(5, Ordering::Relaxed);
        cap.last_use[2].store(9, Ordering::Relaxed);
        assert_eq!(cap.choose(&present, 2, Victims::Any), vec![3, 1]);
        assert_eq!(cap.choose(&present, 10, Victims::Any), vec![3, 1, 2, 70]);
        assert_eq!(cap.choose(&present, 10, Victims::Unpinned), vec![3, 1, 2]);
        assert!(cap.choose(&present, 0, Victims::Any).is_empty());
        // A new profile replaces the pinned set.
        cap.pin(&[3]);
        assert_eq!(cap.choose(&present, 4, Victims::Any), vec![70, 1, 2, 3]);
    }

    #[test]
    fn a_reservation_counts_until_dropped() {
        let cap = Cap::new(4, 8);
        let r = cap.reserve(3);
        assert_eq!(cap.reserved(), 3);
        drop(r);
        assert_eq!(cap.reserved(), 0);
    }

    #[test]
    fn punching_frees_the_chunks_blocks_and_keeps_the_size() {
        use std::io::Write;
        let path = std::env::temp_dir().join(format!("herd-punch-{}", std::process::id()));
        let mut f = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.write_all(&vec![7u8; 4 * 65536]).unwrap();
        f.sync_all().unwrap();
        punch(&f, &[2, 1], 65536, 4 * 65536).unwrap();
        let data = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(data.len(), 4 * 65536);
        assert!(data[..65536].iter().all(|&b| b == 7));
        assert!(data[65536..3 * 65536].iter().all(|&b| b == 0));
        assert!(data[3 * 65536..].iter().all(|&b| b == 7));
    }
}
