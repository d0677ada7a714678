//! The chunk cache: a sparse data file plus a persisted presence bitmap, in
//! front of an upstream, with single-flight fetching.
//!
//! ```text
//!  read(off, len) ─▶ chunks c..=d ─┬─ present ────────────────────────┐
//!                                  ├─ being fetched ─▶ join its watch ─┤
//!                                  └─ missing ─▶ spawn fetch:          │
//!                                       upstream.read ─▶ verify ─▶     │
//!                                       write ─▶ fdatasync ─▶ set bit ─┤
//!                                                                      ▼
//!                                                pread(data file, off, len)
//! ```
//!
//! The fetch runs in its own task, so a client that disconnects never
//! cancels a fetch other readers joined. Order matters for crash safety:
//! the bit is set only after the data is durable (see `bitmap`).
//!
//! Every fetched chunk is checked against the image's manifest before any
//! reader sees it; a chunk that fails is read again, up to three reads,
//! then its readers get an error. Chunks found on disk at start are checked
//! on their first read (DESIGN.md, "Manifest and verification").
//!
//! A chunk whose manifest digest is the digest of zeros (a hole, or zeros
//! written out) is never fetched, written or read from disk: its readers
//! get zeros from memory (DESIGN.md, "Holes").

pub mod bitmap;
mod room;
pub mod shared;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use thiserror::Error;
use tokio::sync::watch;

use crate::io::{Engine, IoBuf};
use crate::manifest::{Identity, Manifest};
use crate::metrics as m;
use crate::upstream::{Upstream, UpstreamError};

pub use bitmap::{Bitmap, BitmapError};

pub const DATA_FILE: &str = "herd-cache.data";
pub const BITMAP_FILE: &str = "herd-cache.bitmap";

#[derive(Debug, Error)]
pub enum CacheError {
    #[error("cannot prepare cache directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
    #[error("fetching chunk {chunk} from upstream failed")]
    Fetch {
        chunk: u64,
        #[source]
        source: UpstreamError,
    },
    #[error("{op} of the cache data file at offset {offset} failed")]
    Data {
        op: &'static str,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("range {offset}+{len} lies outside the {size}-byte image")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("chunk {chunk} fetch was abandoned")]
    Abandoned { chunk: u64 },
    #[error("a concurrent fetch of chunk {chunk} failed: {message}")]
    Joined { chunk: u64, message: String },
    #[error("chunk {chunk} from {source_desc} failed its digest {reads} times; not served")]
    Corrupt {
        chunk: u64,
        source_desc: String,
        reads: u32,
    },
    #[error(transparent)]
    Manifest(#[from] crate::manifest::ManifestError),
}

/// Reads of a chunk, in all, before a digest failure becomes an error.
pub const MAX_READS: u32 = 3;

pub type CacheResult<T> = Result<T, CacheError>;

/// Bytes a read returns: its own buffer, or a range of a fetched run
/// shared with the other readers of that run.
pub enum Data {
    Owned(IoBuf),
    Shared {
        run: Arc<IoBuf>,
        range: std::ops::Range<usize>,
    },
}

impl std::ops::Deref for Data {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Self::Owned(b) => b,
            Self::Shared { run, range } => &run[range.clone()],
        }
    }
}

/// One chunk's bytes inside a (possibly multi-chunk) fetched run.
#[derive(Clone)]
struct Piece {
    run: Arc<IoBuf>,
    at: usize,
}

type FetchState = Option<Result<Piece, String>>;

/// Where one chunk of a read comes from.
enum Part {
    /// On disk, in the data file.
    Disk,
    /// All zeros by the manifest: nothing to read.
    Zero,
    /// Fetched, not yet persisted: from memory.
    Mem(Piece),
    /// Held by another image's cache, as its chunk `.1`.
    Shared(Arc<ChunkCache>, u64),
}

/// A stretch of a read's range with one source (`pieces_from`).
enum Span {
    /// Bytes of a fetched run.
    Mem(Arc<IoBuf>, std::ops::Range<usize>),
    /// On disk: offset, length.
    Disk(u64, usize),
    Zero(usize),
    /// Another image's chunk: donor, its chunk, our offset, length.
    Shared(Arc<ChunkCache>, u64, u64, usize),
}

/// A chunk as `begin_range` found it.
enum Claim {
    Present,
    Zero,
    Fetch(watch::Receiver<FetchState>),
    Shared(Arc<ChunkCache>, u64),
}

/// Adjacent missing chunks are fetched with one upstream read of at most
/// this many bytes.
const MAX_RUN_BYTES: u64 = 1 << 20;

/// A read that misses and is longer than two runs is gathered run by run,
/// with the fetches of this many bytes beyond the current run in flight.
const STEP_AHEAD_BYTES: u64 = 4 * MAX_RUN_BYTES;

/// Fetched bytes that may wait in memory for the cache disk, by default.
pub const DEFAULT_FETCH_BUFFER: u64 = 8 << 20;

/// Fetched bytes not yet durable: bounded so a disk slower than the parent
/// link makes fetching wait instead of memory grow.
struct FetchBuffer {
    permits: tokio::sync::Semaphore,
    cap: AtomicU64,
    now: AtomicU64,
    peak: AtomicU64,
}

impl FetchBuffer {
    fn new(cap: u64) -> Self {
        Self {
            permits: tokio::sync::Semaphore::new(usize::try_from(cap).unwrap_or(usize::MAX)),
            cap: AtomicU64::new(cap),
            now: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        }
    }

    /// Waits for room for `bytes` (capped at the whole buffer, so a run
    /// larger than it still goes, alone); the room is given back when
    /// the returned guard drops.
    async fn hold(&self, bytes: u64) -> Option<FetchHold<'_>> {
        let want = bytes.clamp(1, self.cap.load(Ordering::Acquire).max(1));
        let permit = self
            .permits
            .acquire_many(u32::try_from(want).unwrap_or(u32::MAX))
            .await
            .ok()?;
        // The gauges count the real bytes, not the capped permits.
        let now = self.now.fetch_add(bytes, Ordering::AcqRel) + bytes;
        let peak = self.peak.fetch_max(now, Ordering::AcqRel).max(now);
        m::fetch_buffer_bytes(now, peak);
        Some(FetchHold {
            buf: self,
            _permit: permit,
            bytes,
        })
    }
}

struct FetchHold<'a> {
    buf: &'a FetchBuffer,
    _permit: tokio::sync::SemaphorePermit<'a>,
    bytes: u64,
}

impl Drop for FetchHold<'_> {
    fn drop(&mut self) {
        let now = self.buf.now.fetch_sub(self.bytes, Ordering::AcqRel) - self.bytes;
        m::fetch_buffer_bytes(now, self.buf.peak.load(Ordering::Acquire));
    }
}

/// Counters kept alongside the Prometheus metrics, for callers in-process.
#[derive(Debug, Default)]
pub struct Stats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub joins: AtomicU64,
    pub upstream_bytes: AtomicU64,
    /// Chunks that failed their digest (fetched or read back from disk).
    pub digest_failures: AtomicU64,
}

pub struct ChunkCache {
    upstream: Arc<dyn Upstream>,
    manifest: Arc<Manifest>,
    /// Chunks known good since this process opened the cache: fetched and
    /// checked here, or read back from disk and checked once.
    verified: Vec<AtomicU64>,
    /// Chunks that are all zeros by the manifest (bit per chunk).
    zero: Vec<u64>,
    zero_count: u64,
    engine: Engine,
    data: Arc<File>,
    /// The data file opened `O_DIRECT` (`set_direct_writes`): where
    /// aligned demand runs are written, past the page cache.
    direct: std::sync::OnceLock<Arc<File>>,
    /// Set when a direct write was refused (EINVAL): buffered from then on.
    direct_refused: std::sync::atomic::AtomicBool,
    data_path: PathBuf,
    bitmap: Bitmap,
    chunk_size: u64,
    size: u64,
    inflight: Mutex<HashMap<u64, watch::Receiver<FetchState>>>,
    stats: Stats,
    /// Group commit: writes completed so far, and how many of those the
    /// last finished fdatasync covered.
    writes_done: AtomicU64,
    writes_synced: AtomicU64,
    sync_lock: tokio::sync::Mutex<()>,
    /// Demand fetches (client reads and their read-ahead) waiting on the
    /// upstream; prefetch only issues reads while this is 0.
    demand_inflight: AtomicU64,
    demand_idle: tokio::sync::Notify,
    fetch_buffer: FetchBuffer,
    /// `--cache-size`: set once before serving; without it the whole
    /// image fits and nothing is evicted.
    cap: std::sync::OnceLock<room::Cap>,
    /// Held (shared) by a reader from its bitmap check to its read of the
    /// data file, and (exclusive) by eviction while it punches holes.
    /// Taken only under a cap.
    disk: Arc<tokio::sync::RwLock<()>>,
    full: Arc<room::DiskFull>,
    /// This image's series (labelled with its export name).
    metrics: Arc<m::ImageMetrics>,
    /// The node's caches by content, and this one's image name there:
    /// set when it joins (`shared::SharedChunks::join`).
    shared: std::sync::OnceLock<(Arc<shared::SharedChunks>, String)>,
}

/// How `begin_range` treats a range.
#[derive(Clone, Copy)]
struct Ask {
    /// A client's read: counted as hits, misses and joins.
    count: bool,
    /// Chunks another image holds are taken from there, not fetched.
    borrow: bool,
}

impl Ask {
    /// Read-ahead and prefetch: not counted; what another image holds
    /// needs no fetch.
    const AHEAD: Self = Self {
        count: false,
        borrow: true,
    };
    /// A client's read.
    const READ: Self = Self {
        count: true,
        borrow: true,
    };
}

/// How fetched runs reach the data file: `cache_writes` in the
/// configuration (DESIGN.md, "Cache writes").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheWrites {
    /// `O_DIRECT` for large runs a reader takes as they arrive
    /// (`ChunkCache::set_direct_writes`).
    #[default]
    Direct,
    /// Through the page cache.
    Buffered,
}

impl std::str::FromStr for CacheWrites {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "direct" => Ok(Self::Direct),
            "buffered" => Ok(Self::Buffered),
            other => Err(format!("`{other}` is neither direct nor buffered")),
        }
    }
}

/// Smallest run written past the page cache: below it ext4's journalled
/// allocation per direct write costs more than the copy it saves (the
/// bench's cold 64K random row was a tenth slower written direct).
const DIRECT_WRITE_MIN: u64 = 256 << 10;

/// Who asked for a fetch: clients always go first.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Demand,
    Prefetch,
}

impl ChunkCache {
    /// Opens (or creates) the cache in `dir` for `upstream`, whose image
    /// `manifest` describes; `image` names it in metrics. A directory holding another image starts a
    /// fresh generation (emptied, with a warning naming both identities).
    ///
    /// # Errors
    /// `Dir` if the directory or data file cannot be set up; `Manifest` if
    /// the manifest does not fit the upstream or the chunk size; `Bitmap`
    /// if the bitmap is foreign, for another chunk size, or locked by
    /// another daemon.
    pub fn open(
        image: &str,
        dir: &Path,
        upstream: Arc<dyn Upstream>,
        chunk_size: u32,
        engine: Engine,
        manifest: Arc<Manifest>,
    ) -> CacheResult<Arc<Self>> {
        let dir_err = |source| CacheError::Dir {
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(dir_err)?;
        let size = upstream.size();
        manifest.fits(&upstream.describe(), size, chunk_size)?;
        let identity = manifest.identity();
        let bpath = dir.join(BITMAP_FILE);
        let data = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(DATA_FILE))
            .map_err(dir_err)?;
        let bitmap = match Bitmap::open(&bpath, size, chunk_size, identity) {
            Err(BitmapError::OtherImage { cached, .. }) => {
                Self::fresh_generation(dir, &bpath, &data, cached, identity)?;
                Bitmap::open(&bpath, size, chunk_size, identity)?
            }
            other => other?,
        };
        // The directory's copy, for `herd cache verify DIR`.
        let mpath = dir.join(crate::manifest::CACHE_FILE);
        if std::fs::read(&mpath).ok().as_deref() != Some(manifest.bytes()) {
            crate::manifest::save(&mpath, &manifest)?;
        }
        // Sparse: only fetched chunks take disk space.
        if data.metadata().map_err(dir_err)?.len() != size {
            data.set_len(size).map_err(dir_err)?;
        }
        let metrics = m::ImageMetrics::new(image);
        metrics.chunks_total(bitmap.chunks());
        metrics.chunks_present(bitmap.count());
        metrics.image_size(size);
        let words = usize::try_from(bitmap.chunks().div_ceil(64)).unwrap_or(0);
        let (zero, zero_count) = zero_chunks(&manifest, u64::from(chunk_size), bitmap.chunks());
        metrics.chunks_zero(zero_count);
        metrics.capacity_chunks(bitmap.chunks());
        let metrics = Arc::new(metrics);
        Ok(Arc::new(Self {
            upstream,
            manifest,
            verified: (0..words).map(|_| AtomicU64::new(0)).collect(),
            zero,
            zero_count,
            engine,
            data: Arc::new(data),
            direct: std::sync::OnceLock::new(),
            direct_refused: std::sync::atomic::AtomicBool::new(false),
            data_path: dir.join(DATA_FILE),
            bitmap,
            chunk_size: u64::from(chunk_size),
            size,
            inflight: Mutex::new(HashMap::new()),
            stats: Stats::default(),
            writes_done: AtomicU64::new(0),
            writes_synced: AtomicU64::new(0),
            sync_lock: tokio::sync::Mutex::new(()),
            demand_inflight: AtomicU64::new(0),
            demand_idle: tokio::sync::Notify::new(),
            fetch_buffer: FetchBuffer::new(DEFAULT_FETCH_BUFFER),
            cap: std::sync::OnceLock::new(),
            disk: Arc::new(tokio::sync::RwLock::new(())),
            full: room::DiskFull::new(dir.to_owned(), Arc::clone(&metrics)),
            metrics,
            shared: std::sync::OnceLock::new(),
        }))
    }

    /// Caps the chunks the data file may hold at `bytes` (`--cache-size`);
    /// call once, before serving. Chunks beyond the cap already on disk
    /// (a smaller cap than last time) are evicted now, lowest first.
    /// Returns the cap in chunks.
    ///
    /// # Errors
    /// `Bitmap` or `Data` if the eviction fails.
    pub fn set_cache_size(&self, bytes: u64) -> CacheResult<u64> {
        let chunks = bytes / self.chunk_size;
        let cap = self
            .cap
            .get_or_init(|| room::Cap::new(chunks, self.bitmap.chunks()));
        self.metrics.capacity_chunks(cap.chunks);
        let over = self.bitmap.count().saturating_sub(cap.chunks);
        if over > 0 {
            let victims = cap.choose(&self.present_words(), over, room::Victims::Any);
            self.evict_now(&victims)?;
            tracing::info!(
                evicted = victims.len(),
                cap_chunks = cap.chunks,
                "cache held more than --cache-size; evicted the excess"
            );
        }
        Ok(cap.chunks)
    }

    /// Pins a boot profile's chunks: under a cap they are evicted last,
    /// and prefetching them may evict other chunks. Replaces the last set.
    pub fn pin_profile(&self, chunks: &[u64]) {
        if let Some(cap) = self.cap.get() {
            cap.pin(chunks);
        }
    }

    /// Present chunks that hold data (bitmap words without zero chunks).
    fn present_words(&self) -> Vec<u64> {
        let mut words = self.bitmap.words();
        for (w, z) in words.iter_mut().zip(&self.zero) {
            *w &= !z;
        }
        words
    }

    /// Evicts `victims` in the crash-safe order: bits cleared and synced,
    /// then the holes punched. The caller keeps readers out (or has none).
    fn evict_now(&self, victims: &[u64]) -> CacheResult<()> {
        if victims.is_empty() {
            return Ok(());
        }
        self.bitmap.clear_many(victims)?;
        self.bitmap.sync_now()?;
        room::punch(&self.data, victims, self.chunk_size, self.size).map_err(|source| {
            CacheError::Data {
                op: "punch",
                offset: victims.first().copied().unwrap_or(0) * self.chunk_size,
                source,
            }
        })?;
        self.metrics.evicted(victims.len() as u64);
        self.metrics.chunks_present(self.bitmap.count());
        Ok(())
    }

    /// Under a cap, makes room for the run `start..start+n` and counts it
    /// against the cap; `Ok(None)` means there is no room for it (a
    /// prefetch of unpinned chunks at the cap, or nothing left to evict),
    /// and it is served without being cached.
    async fn make_room<'a>(
        self: &Arc<Self>,
        cap: &'a room::Cap,
        start: u64,
        n: u64,
        class: Class,
    ) -> CacheResult<Option<room::Reservation<'a>>> {
        let _one = cap.lock.lock().await;
        let used = self.bitmap.count().saturating_sub(self.zero_present()) + cap.reserved();
        let over = (used + n).saturating_sub(cap.chunks);
        if over == 0 {
            return Ok(Some(cap.reserve(n)));
        }
        let allow = match class {
            Class::Demand => room::Victims::Any,
            // A profile's chunks may push out others; nothing else may
            // push out anything (prefetch `full` stops at the cap).
            Class::Prefetch if (start..start + n).all(|c| cap.is_pinned(c)) => {
                room::Victims::Unpinned
            }
            Class::Prefetch => return Ok(None),
        };
        // Evict a little more than needed, so one bitmap sync serves
        // several runs.
        let want = over
            + if class == Class::Demand {
                cap.chunks / 32
            } else {
                0
            };
        let victims = cap.choose(&self.present_words(), want, allow);
        if (victims.len() as u64) < over {
            return Ok(None);
        }
        // Readers that saw these bits set finish before the punch; new
        // readers see them clear.
        let this = Arc::clone(self);
        let _readers = Arc::clone(&self.disk).write_owned().await;
        tokio::task::spawn_blocking(move || this.evict_now(&victims))
            .await
            .map_err(|e| CacheError::Data {
                op: "evict",
                offset: start * self.chunk_size,
                source: std::io::Error::other(e.to_string()),
            })??;
        Ok(Some(cap.reserve(n)))
    }

    /// Zero chunks counted present in the bitmap (a cache from before
    /// manifest v2 may have written them); they take no room.
    fn zero_present(&self) -> u64 {
        if self.zero_count == 0 {
            return 0;
        }
        self.bitmap
            .words()
            .iter()
            .zip(&self.zero)
            .map(|(w, z)| u64::from((w & z).count_ones()))
            .sum()
    }

    /// Whether prefetch may fetch `first..=last` now: under a cap, only
    /// if the run fits, or it is a profile's and other chunks can make
    /// way for it.
    #[must_use]
    pub fn prefetch_fits(&self, first: u64, last: u64) -> bool {
        let fetching = self
            .inflight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len() as u64;
        self.fits(fetching, first, last)
    }

    /// `prefetch_fits` with `fetching` chunks on the wire: they will want
    /// room too (they are reserved only once fetched).
    fn fits(&self, fetching: u64, first: u64, last: u64) -> bool {
        let Some(cap) = self.cap.get() else {
            return true;
        };
        let n = last + 1 - first;
        let used = self.bitmap.count().saturating_sub(self.zero_present()) + fetching;
        if used + n <= cap.chunks {
            return true;
        }
        let unpinned = cap.unpinned(&self.present_words());
        (first..=last).all(|c| cap.is_pinned(c)) && unpinned >= (used + n) - cap.chunks
    }

    /// Returns once the cache disk is not known to be full (prefetch
    /// waits here after an ENOSPC).
    pub async fn wait_for_disk(&self) {
        self.full.wait().await;
    }

    /// Whether the cache disk is known to be full.
    #[must_use]
    pub fn disk_full(&self) -> bool {
        self.full.is_full()
    }

    /// Shared pin of the data file for a read (under a cap only).
    async fn pin_disk(&self) -> Option<tokio::sync::OwnedRwLockReadGuard<()>> {
        self.cap.get()?;
        Some(Arc::clone(&self.disk).read_owned().await)
    }

    /// Sets the fetch buffer (`--fetch-buffer`); call before serving.
    pub fn set_fetch_buffer(&self, bytes: u64) {
        let b = &self.fetch_buffer;
        let old = b.cap.swap(bytes.max(1), Ordering::AcqRel);
        let (old, new) = (
            usize::try_from(old).unwrap_or(usize::MAX),
            usize::try_from(bytes.max(1)).unwrap_or(usize::MAX),
        );
        if new > old {
            b.permits.add_permits(new - old);
        } else {
            b.permits.forget_permits(old - new);
        }
    }

    /// Empties a cache directory that holds another image (or an
    /// unrecorded one): the data file is cut to nothing, the bitmap removed.
    fn fresh_generation(
        dir: &Path,
        bitmap: &Path,
        data: &File,
        cached: Option<Identity>,
        serving: Identity,
    ) -> CacheResult<()> {
        tracing::warn!(
            dir = %dir.display(),
            cached = %cached.map_or_else(|| "unrecorded (version-1 cache)".to_owned(), |c| c.to_string()),
            serving = %serving,
            "the cache holds another image; starting a fresh generation"
        );
        let dir_err = |source| CacheError::Dir {
            path: dir.to_owned(),
            source,
        };
        data.set_len(0).map_err(dir_err)?;
        data.sync_all().map_err(dir_err)?;
        std::fs::remove_file(bitmap).map_err(dir_err)?;
        Ok(())
    }

    #[must_use]
    pub fn size(&self) -> u64 {
        self.size
    }

    #[must_use]
    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }

    /// Whether cache chunk `c` is all zeros by the manifest.
    #[must_use]
    pub fn is_zero(&self, c: u64) -> bool {
        usize::try_from(c / 64)
            .ok()
            .and_then(|w| self.zero.get(w))
            .is_some_and(|w| w & (1 << (c % 64)) != 0)
    }

    /// Chunks that are all zeros (never fetched nor stored).
    #[must_use]
    pub fn chunks_zero(&self) -> u64 {
        self.zero_count
    }

    /// The range cut where chunks of zeros begin and end: (offset, length,
    /// all zeros?) pieces in order, covering exactly `offset..offset+len`.
    #[must_use]
    pub fn zero_spans(&self, offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let mut at = offset;
        while at < end {
            let c = at / self.chunk_size;
            let next = ((c + 1) * self.chunk_size).min(end);
            let z = self.is_zero(c);
            match out.last_mut() {
                Some((_, n, lz)) if *lz == z => *n += next - at,
                _ => out.push((at, next - at, z)),
            }
            at = next;
        }
        out
    }

    fn is_verified(&self, c: u64) -> bool {
        usize::try_from(c / 64)
            .ok()
            .and_then(|w| self.verified.get(w))
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (c % 64)) != 0)
    }

    fn mark_verified(&self, chunks: std::ops::Range<u64>) {
        for c in chunks {
            if let Some(w) = usize::try_from(c / 64)
                .ok()
                .and_then(|w| self.verified.get(w))
            {
                w.fetch_or(1 << (c % 64), Ordering::AcqRel);
            }
        }
    }

    /// The cache chunks (absolute numbers) of a run fetched at `offset`
    /// whose bytes fail the manifest.
    fn bad_chunks(&self, offset: u64, run: &[u8]) -> Vec<u64> {
        let per = self.chunk_size / u64::from(self.manifest.chunk_size());
        let mut bad: Vec<u64> = self
            .manifest
            .bad_chunks(offset, run)
            .into_iter()
            .map(|i| i / per.max(1))
            .collect();
        bad.dedup();
        bad
    }

    /// Checks chunk `c`, present on disk but not yet checked by this
    /// process. A damaged one is dropped (its bit cleared) so the next
    /// lookup fetches it again; returns whether it was good.
    async fn verify_on_disk(&self, c: u64) -> CacheResult<bool> {
        let _pin = self.pin_disk().await;
        if !self.bitmap.is_set(c) {
            return Ok(false);
        }
        let off = c * self.chunk_size;
        let len = usize::try_from(self.chunk_size.min(self.size - off)).unwrap_or(0);
        let buf = self.read_disk(off, len).await?;
        if self.bad_chunks(off, &buf).is_empty() {
            self.mark_verified(c..c + 1);
            return Ok(true);
        }
        self.metrics.digest_failure("cache");
        self.stats.digest_failures.fetch_add(1, Ordering::Relaxed);
        tracing::error!(chunk = c, offset = off, data = %self.data_path.display(), "chunk damaged in the cache file; dropped, fetching it again");
        self.bitmap.clear(c)?;
        self.metrics.chunks_present(self.bitmap.count());
        Ok(false)
    }

    /// Checks every present, not yet checked chunk of the range.
    async fn verify_range(&self, offset: u64, len: u64) -> CacheResult<()> {
        if len == 0 {
            return Ok(());
        }
        for c in offset / self.chunk_size..=(offset + len - 1) / self.chunk_size {
            if self.bitmap.is_set(c) && !self.is_verified(c) && !self.is_zero(c) {
                self.verify_on_disk(c).await?;
            }
        }
        Ok(())
    }

    /// The directory the cache lives in.
    #[must_use]
    pub fn data_dir(&self) -> &Path {
        self.data_path.parent().unwrap_or(&self.data_path)
    }

    /// This image's metric series.
    #[must_use]
    pub fn metrics(&self) -> &m::ImageMetrics {
        &self.metrics
    }

    #[must_use]
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    #[must_use]
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    #[must_use]
    pub fn chunks_present(&self) -> u64 {
        self.bitmap.count()
    }

    #[must_use]
    pub fn chunks_total(&self) -> u64 {
        self.bitmap.chunks()
    }

    #[must_use]
    pub fn upstream(&self) -> &dyn Upstream {
        self.upstream.as_ref()
    }

    fn check_range(&self, offset: u64, len: u64) -> CacheResult<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(CacheError::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// Reads `len` bytes at `offset`, fetching missing chunks once each.
    ///
    /// # Errors
    /// `OutOfRange` for a range past the end; fetch or data-file errors.
    pub async fn read(self: &Arc<Self>, offset: u64, len: usize) -> CacheResult<Data> {
        self.read_from(offset, len, Ask::READ).await
    }

    /// `read` for a reply that can go out in pieces: a range over several
    /// fetched runs comes back as the runs' own bytes (each shared when
    /// it is at least half of its run, else copied), not copied into one
    /// buffer. Together the pieces are the range, in order.
    ///
    /// # Errors
    /// As `read`.
    pub async fn read_pieces(self: &Arc<Self>, offset: u64, len: usize) -> CacheResult<Vec<Data>> {
        self.pieces_from(offset, len, Ask::READ).await
    }

    /// `read`, counted and borrowing as `ask` says.
    async fn read_from(self: &Arc<Self>, offset: u64, len: usize, ask: Ask) -> CacheResult<Data> {
        let mut pieces = self.pieces_from(offset, len, ask).await?;
        if pieces.len() == 1 {
            if let Some(one) = pieces.pop() {
                return Ok(one);
            }
        }
        let mut out = IoBuf::scratch(len);
        let mut at = 0;
        for p in &pieces {
            out[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        Ok(Data::Owned(out))
    }

    /// `read_from` as pieces that together are the range.
    async fn pieces_from(
        self: &Arc<Self>,
        offset: u64,
        len: usize,
        ask: Ask,
    ) -> CacheResult<Vec<Data>> {
        self.check_range(offset, len as u64)?;
        if len as u64 > 2 * MAX_RUN_BYTES && !self.all_present(offset, len as u64) {
            return Ok(vec![self.read_in_steps(offset, len, ask).await?]);
        }
        self.verify_range(offset, len as u64).await?;
        let (parts, _pin) = loop {
            let parts = self.resolve(offset, len as u64, ask).await?;
            let pin = self.pin_disk().await;
            // Under a cap, an eviction may have taken a chunk between the
            // lookup and the pin: look again.
            if pin.is_none()
                || parts
                    .iter()
                    .all(|(c, p)| !matches!(p, Part::Disk) || self.bitmap.is_set(*c))
            {
                break (parts, pin);
            }
        };
        if parts.iter().all(|(_, p)| matches!(p, Part::Disk)) {
            // Hit path: every chunk is on disk, one pread.
            return Ok(vec![Data::Owned(self.read_disk(offset, len).await?)]);
        }
        if parts.iter().all(|(_, p)| matches!(p, Part::Zero)) {
            return Ok(vec![Data::Owned(IoBuf::zeroed(len))]);
        }
        if let Some(shared) = self.within_one_run(offset, len, &parts) {
            // Typical miss: the range lies in one fetched run; no copy.
            return Ok(vec![shared]);
        }
        // Each chunk's bytes, neighbours from one run or from disk merged.
        let end = offset + len as u64;
        let mut spans: Vec<Span> = Vec::new();
        for (chunk, part) in parts {
            let c0 = chunk * self.chunk_size;
            let (from, to) = (offset.max(c0), end.min(c0 + self.chunk_size));
            let n = usize::try_from(to - from).unwrap_or(0);
            let next = match part {
                Part::Mem(piece) => {
                    let at = piece.at + usize::try_from(from - c0).unwrap_or(0);
                    Span::Mem(piece.run, at..at + n)
                }
                Part::Disk => Span::Disk(from, n),
                Part::Zero => Span::Zero(n),
                Part::Shared(donor, dc) => Span::Shared(donor, dc, from, n),
            };
            match (spans.last_mut(), next) {
                (Some(Span::Mem(run, r)), Span::Mem(next_run, nr))
                    if Arc::ptr_eq(run, &next_run) && r.end == nr.start =>
                {
                    r.end = nr.end;
                }
                (Some(Span::Disk(at, m)), Span::Disk(..)) => {
                    debug_assert_eq!(*at + *m as u64, from);
                    *m += n;
                }
                (Some(Span::Zero(m)), Span::Zero(k)) => *m += k,
                (_, next) => spans.push(next),
            }
        }
        let mut out = Vec::with_capacity(spans.len());
        for span in spans {
            out.push(match span {
                // Shared only when the piece is most of its run: a reply
                // keeps all of the run alive, the budget counts the piece.
                Span::Mem(run, r) if r.len().saturating_mul(2) >= run.len() => {
                    Data::Shared { run, range: r }
                }
                Span::Mem(run, r) => Data::Owned(IoBuf::from_slice(&run[r])),
                Span::Disk(at, n) => Data::Owned(self.read_disk(at, n).await?),
                Span::Zero(n) => Data::Owned(IoBuf::zeroed(n)),
                Span::Shared(donor, dc, from, n) => {
                    match donor.lend(dc, from % self.chunk_size, n).await {
                        Some(piece) => {
                            self.metrics.shared_read(n as u64);
                            Data::Owned(piece)
                        }
                        // Gone from there meanwhile (evicted, retired):
                        // fetched and stored here instead.
                        None => {
                            let own = Ask {
                                borrow: false,
                                ..ask
                            };
                            Box::pin(self.read_from(from, n, own)).await?
                        }
                    }
                }
            });
        }
        Ok(out)
    }

    /// A large read that misses, gathered one run at a time with the
    /// fetches of the next [`STEP_AHEAD_BYTES`] in flight: besides the
    /// reply it holds those runs, not every fetched run of the request
    /// until the last arrives (a cold 16 MiB read cost 32 MiB, now ~20).
    async fn read_in_steps(
        self: &Arc<Self>,
        offset: u64,
        len: usize,
        ask: Ask,
    ) -> CacheResult<Data> {
        let cs = self.chunk_size;
        let last = (offset + len as u64 - 1) / cs;
        let ahead = (STEP_AHEAD_BYTES / cs).max(1);
        // Chunks are counted (hits, misses) once, as their fetches start;
        // the steps join them uncounted.
        let mut started = offset / cs;
        let step_ask = Ask {
            count: false,
            ..ask
        };
        let step = usize::try_from(MAX_RUN_BYTES).unwrap_or(usize::MAX);
        // Every byte is copied in below, or the read fails.
        let mut out = IoBuf::scratch(len);
        let mut at = 0;
        while at < len {
            let n = (len - at).min(step);
            let upto = ((offset + (at + n) as u64 - 1) / cs + ahead).min(last);
            if started <= upto {
                drop(self.begin_range(started, upto, ask, Class::Demand, true));
                started = upto + 1;
            }
            let piece = Box::pin(self.read_from(offset + at as u64, n, step_ask)).await?;
            out[at..at + n].copy_from_slice(&piece);
            at += n;
        }
        Ok(Data::Owned(out))
    }

    /// Whether every chunk of a valid range is on disk or zeros.
    fn all_present(&self, offset: u64, len: u64) -> bool {
        len == 0
            || (offset / self.chunk_size..=(offset + len - 1) / self.chunk_size)
                .all(|c| self.bitmap.is_set(c) || self.is_zero(c))
    }

    /// `Some` when every chunk of the range comes from the same fetched
    /// run, at consecutive places: the reply can borrow the run.
    fn within_one_run(&self, offset: u64, len: usize, parts: &[(u64, Part)]) -> Option<Data> {
        let (c0, Part::Mem(first)) = parts.first()? else {
            return None;
        };
        let cs = usize::try_from(self.chunk_size).ok()?;
        for (i, (_, p)) in parts.iter().enumerate() {
            let Part::Mem(p) = p else { return None };
            if !Arc::ptr_eq(&p.run, &first.run) || p.at != first.at + i * cs {
                return None;
            }
        }
        // A reply that shares a run keeps all of it alive, while the reply
        // budget counts only `len`: a small part of a large run is copied
        // instead, so the run is freed once it is on disk.
        if len.saturating_mul(2) < first.run.len() {
            return None;
        }
        let start = first.at + usize::try_from(offset - c0 * self.chunk_size).ok()?;
        let end = start.checked_add(len)?;
        (end <= first.run.len()).then(|| Data::Shared {
            run: Arc::clone(&first.run),
            range: start..end,
        })
    }

    /// The hit path without a thread hop: if every chunk of the range is
    /// present and its data is in the page cache, reads it right here with
    /// `preadv2(RWF_NOWAIT)`. `None` means "take the async path" (a chunk is
    /// missing, the data would need disk I/O, or the range is invalid).
    #[must_use]
    pub fn try_read_cached(&self, offset: u64, len: usize) -> Option<IoBuf> {
        // Under a cap, pinned from the bitmap check to the read; a busy
        // pin (an eviction) sends the read down the async path.
        let _pin = match self.cap.get() {
            Some(_) => Some(Arc::clone(&self.disk).try_read_owned().ok()?),
            None => None,
        };
        let chunks = self.present_chunks(offset, len)?;
        // Sent only if preadv2 filled all of it.
        let mut buf = IoBuf::scratch(len);
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: len,
        };
        let off = i64::try_from(offset).ok()?;
        // SAFETY: iov points into `buf`, valid for `len` writable bytes for
        // the duration of this synchronous call.
        let n = unsafe {
            libc::preadv2(
                std::os::fd::AsRawFd::as_raw_fd(&*self.data),
                &raw const iov,
                1,
                off,
                libc::RWF_NOWAIT,
            )
        };
        if usize::try_from(n).ok()? != len {
            return None;
        }
        chunks.for_each(|c| self.hit(c));
        Some(buf)
    }

    /// The chunks of a valid, non-empty range if every one is present.
    fn present_chunks(&self, offset: u64, len: usize) -> Option<std::ops::RangeInclusive<u64>> {
        if len == 0 || self.check_range(offset, len as u64).is_err() {
            return None;
        }
        let chunks = offset / self.chunk_size..=(offset + len as u64 - 1) / self.chunk_size;
        chunks
            .clone()
            .all(|c| self.bitmap.is_set(c) && self.is_verified(c) && !self.is_zero(c))
            .then_some(chunks)
    }

    /// The zero-copy hit path: whether every chunk of the range is present
    /// and its data in the page cache, so the export may `sendfile` it from
    /// [`Self::data_file`] without blocking on the disk. Counts the hits
    /// when it says yes.
    #[must_use]
    pub fn try_hit_resident(&self, offset: u64, len: usize) -> bool {
        // Under a cap a queued sendfile could meet a punched hole: hits
        // are copied instead (DESIGN.md, "A cache that fits its disk").
        if self.cap.get().is_some() {
            return false;
        }
        let Some(chunks) = self.present_chunks(offset, len) else {
            return false;
        };
        if !crate::io::pagecache::is_resident(&self.data, offset, len as u64) {
            return false;
        }
        chunks.for_each(|c| self.hit(c));
        true
    }

    /// The data file: chunk `c` lives at `c * chunk_size`, valid once its
    /// bit is set (and never rewritten after).
    #[must_use]
    pub fn data_file(&self) -> &Arc<File> {
        &self.data
    }

    async fn read_disk(&self, offset: u64, len: usize) -> CacheResult<IoBuf> {
        let buf = self
            .engine
            .read_at(&self.data, offset, IoBuf::scratch(len))
            .await
            .map_err(|source| CacheError::Data {
                op: "read",
                offset,
                source,
            })?;
        if buf.len() != len {
            return Err(CacheError::Data {
                op: "read",
                offset,
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
        Ok(buf)
    }

    /// Makes every chunk of the range present without reading it back
    /// (NBD_CMD_CACHE, prefetch).
    ///
    /// # Errors
    /// As `read`.
    pub async fn ensure(self: &Arc<Self>, offset: u64, len: u64) -> CacheResult<()> {
        let Some((first, last)) = self.chunk_span(offset, len)? else {
            return Ok(());
        };
        // Each fetched run is let go as it arrives: nothing is held.
        // Nobody takes these bytes now; a reader will, from the page cache.
        for (chunk, claim) in self.begin_range(first, last, Ask::READ, Class::Demand, false) {
            if let Claim::Fetch(rx) = claim {
                Self::wait_fetch(chunk, rx).await?;
            }
        }
        Ok(())
    }

    /// Starts fetching (without waiting) the chunks of `len` bytes after
    /// `offset` that are neither present nor in flight: read-ahead for a
    /// sequential reader.
    pub fn read_ahead(self: &Arc<Self>, offset: u64, len: u64) {
        if offset >= self.size || len == 0 {
            return;
        }
        let len = len.min(self.size - offset);
        let first = offset / self.chunk_size;
        let last = (offset + len - 1) / self.chunk_size;
        drop(self.begin_range(first, last, Ask::AHEAD, Class::Demand, true));
    }

    /// Whether chunk `c` needs no fetch: on disk, all zeros, or held by
    /// another image's cache.
    #[must_use]
    pub fn is_present(&self, c: u64) -> bool {
        self.bitmap.is_set(c) || self.is_zero(c) || self.borrowable(c).is_some()
    }

    /// Another image's cache holding chunk `c`'s bytes on disk, and the
    /// chunk's number there.
    fn borrowable(&self, c: u64) -> Option<(Arc<Self>, u64)> {
        let (store, image) = self.shared.get()?;
        if self.is_zero(c) {
            return None;
        }
        store.find(image, self.chunk_size, || {
            shared::key(&self.manifest, self.chunk_size, c)
        })
    }

    /// `len` bytes at `within` of chunk `c`, for another image whose chunk
    /// has the same content; `None` if the chunk is not (or no longer)
    /// here, good. Never fetches: the borrower fetches what it misses.
    async fn lend(&self, c: u64, within: u64, len: usize) -> Option<IoBuf> {
        if self.bitmap.is_set(c) && !self.is_verified(c) && !self.verify_on_disk(c).await.ok()? {
            return None;
        }
        let _pin = self.pin_disk().await;
        if !self.bitmap.is_set(c) {
            return None;
        }
        let buf = self
            .read_disk(c * self.chunk_size + within, len)
            .await
            .ok()?;
        // A use by any image keeps the chunk from eviction.
        self.touch(c);
        Some(buf)
    }

    /// Whether chunk `c`'s bytes are here without a fetch: present, or
    /// fetched and still waiting for the disk (a read gets them from
    /// memory).
    #[must_use]
    pub fn is_held(&self, c: u64) -> bool {
        self.is_present(c)
            || self
                .inflight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&c)
                .is_some_and(|rx| matches!(&*rx.borrow(), Some(Ok(_))))
    }

    /// Demand fetches currently waiting on the upstream.
    #[must_use]
    pub fn demand_in_flight(&self) -> u64 {
        self.demand_inflight.load(Ordering::Acquire)
    }

    /// Returns once no demand fetch is waiting on the upstream.
    pub async fn demand_idle(&self) {
        loop {
            // Created before the check, so a wake-up in between is not lost.
            let woken = self.demand_idle.notified();
            if self.demand_in_flight() == 0 {
                return;
            }
            woken.await;
        }
    }

    /// Fetches chunks `first..=last` for prefetch: missing ones with one
    /// low-priority upstream read, ones already in flight are joined (never
    /// fetched twice). Returns once all are fetched; `false` if the run
    /// has no room under the cap (nothing was fetched).
    ///
    /// # Errors
    /// The fetch error of any chunk.
    pub async fn prefetch(self: &Arc<Self>, first: u64, last: u64) -> CacheResult<bool> {
        let last = last.min(self.chunks_total().saturating_sub(1));
        if first > last {
            return Ok(true);
        }
        let claims = self.begin_range(first, last, Ask::AHEAD, Class::Prefetch, false);
        if claims.is_empty() {
            return Ok(false);
        }
        for (chunk, claim) in claims {
            if let Claim::Fetch(rx) = claim {
                Self::wait_fetch(chunk, rx).await?;
            }
        }
        Ok(true)
    }

    async fn wait_fetch(chunk: u64, mut rx: watch::Receiver<FetchState>) -> CacheResult<Piece> {
        let state = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| CacheError::Abandoned { chunk })?;
        match state.as_ref() {
            Some(Ok(piece)) => Ok(piece.clone()),
            Some(Err(message)) => Err(CacheError::Joined {
                chunk,
                message: message.clone(),
            }),
            None => Err(CacheError::Abandoned { chunk }),
        }
    }

    /// The first and last chunk of a valid range; `None` if it is empty.
    fn chunk_span(&self, offset: u64, len: u64) -> CacheResult<Option<(u64, u64)>> {
        self.check_range(offset, len)?;
        Ok((len > 0).then(|| {
            (
                offset / self.chunk_size,
                (offset + len - 1) / self.chunk_size,
            )
        }))
    }

    /// For each chunk of the range: where its bytes are.
    async fn resolve(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        ask: Ask,
    ) -> CacheResult<Vec<(u64, Part)>> {
        let Some((first, last)) = self.chunk_span(offset, len)? else {
            return Ok(Vec::new());
        };
        // Start every missing chunk's fetch before waiting on any, so a
        // chunk-spanning read fetches its chunks in parallel (adjacent ones
        // in one upstream read).
        // A read that wants at least half of its chunks' bytes; a small
        // one's neighbours in its chunk are likely read next, from memory.
        let most = len.saturating_mul(2) >= (last - first + 1) * self.chunk_size;
        let started = self.begin_range(first, last, ask, Class::Demand, most);
        let mut parts = Vec::with_capacity(started.len());
        for (chunk, claim) in started {
            let part = match claim {
                Claim::Fetch(rx) => Part::Mem(Self::wait_fetch(chunk, rx).await?),
                Claim::Present => Part::Disk,
                Claim::Zero => Part::Zero,
                Claim::Shared(donor, dc) => Part::Shared(donor, dc),
            };
            parts.push((chunk, part));
        }
        Ok(parts)
    }

    /// For each chunk of `first..=last`: present, zeros, or a receiver for
    /// its fetch. Missing chunks that nobody fetches yet are claimed under
    /// one lock and fetched in runs of adjacent chunks. Prefetch gets
    /// nothing (empty) when the range has no room under the cap.
    /// `direct`: the runs may be written past the page cache, because a
    /// reader takes most of their bytes from memory as they arrive (a
    /// large read, or read-ahead for a sequential one), so a later read of
    /// the same chunks is unlikely to follow at once.
    fn begin_range(
        self: &Arc<Self>,
        first: u64,
        last: u64,
        ask: Ask,
        class: Class,
        direct: bool,
    ) -> Vec<(u64, Claim)> {
        let count = ask.count;
        let mut out = Vec::new();
        let mut runs: Vec<(u64, Vec<watch::Sender<FetchState>>)> = Vec::new();
        let per_run = (MAX_RUN_BYTES / self.chunk_size).max(1);
        {
            let mut map = self
                .inflight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Checked under the map's lock, so concurrent prefetch runs
            // cannot each find the same last room.
            if class == Class::Prefetch
                && !(first..=last).all(|c| self.is_present(c) || map.contains_key(&c))
                && !self.fits(map.len() as u64, first, last)
            {
                return Vec::new();
            }
            for chunk in first..=last {
                if self.is_zero(chunk) {
                    if count {
                        self.hit(chunk);
                    }
                    out.push((chunk, Claim::Zero));
                    continue;
                }
                // Checked under the lock: a fetch sets the bit before it
                // leaves the map, so a reader never misses both.
                if self.bitmap.is_set(chunk) {
                    if count {
                        self.hit(chunk);
                    }
                    out.push((chunk, Claim::Present));
                    continue;
                }
                if let Some(rx) = map.get(&chunk) {
                    if count {
                        self.stats.joins.fetch_add(1, Ordering::Relaxed);
                        self.metrics.singleflight_join();
                    }
                    out.push((chunk, Claim::Fetch(rx.clone())));
                    continue;
                }
                if ask.borrow {
                    if let Some((donor, dc)) = self.borrowable(chunk) {
                        if count {
                            self.stats.hits.fetch_add(1, Ordering::Relaxed);
                            self.metrics.chunk_hit();
                        }
                        out.push((chunk, Claim::Shared(donor, dc)));
                        continue;
                    }
                }
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                self.metrics.chunk_miss();
                let (tx, rx) = watch::channel(None);
                map.insert(chunk, rx.clone());
                out.push((chunk, Claim::Fetch(rx)));
                match runs.last_mut() {
                    Some((start, txs))
                        if *start + txs.len() as u64 == chunk && (txs.len() as u64) < per_run =>
                    {
                        txs.push(tx);
                    }
                    _ => runs.push((chunk, vec![tx])),
                }
            }
        }
        for (start, txs) in runs {
            let this = Arc::clone(self);
            if class == Class::Demand {
                self.demand_inflight.fetch_add(1, Ordering::AcqRel);
            }
            tokio::spawn(async move { this.fetch_and_persist(start, txs, class, direct).await });
        }
        out
    }

    fn hit(&self, c: u64) {
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        self.metrics.chunk_hit();
        self.touch(c);
    }

    /// Records a use of chunk `c` for eviction (under a cap).
    fn touch(&self, c: u64) {
        if let Some(cap) = self.cap.get() {
            cap.touch(c);
        }
    }

    fn forget(&self, chunk: u64) {
        self.inflight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&chunk);
    }

    /// Fetches a run of adjacent chunks with one upstream read, hands each
    /// chunk's bytes to its waiters at once, then makes the run durable and
    /// only then marks its chunks present. Until marked, the chunks stay in
    /// the in-flight map so late readers are served from memory.
    async fn fetch_and_persist(
        self: Arc<Self>,
        start: u64,
        txs: Vec<watch::Sender<FetchState>>,
        class: Class,
        direct: bool,
    ) {
        let n = txs.len() as u64;
        let offset = start * self.chunk_size;
        let len =
            usize::try_from((n * self.chunk_size).min(self.size - offset)).unwrap_or(usize::MAX);
        // Held until the run is durable (or dropped): the back-pressure.
        let _room = self.fetch_buffer.hold(len as u64).await;
        let fetched = self.upstream.read_at(offset, len).await;
        if class == Class::Demand && self.demand_inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.demand_idle.notify_waiters();
        }
        let run = match fetched {
            Ok(b) => b,
            Err(source) => {
                let e = CacheError::Fetch {
                    chunk: start,
                    source,
                };
                tracing::warn!(chunk = start, chunks = n, error = %crate::error_chain(&e), "chunk fetch failed");
                let msg = crate::error_chain(&e);
                for (i, tx) in txs.iter().enumerate() {
                    self.forget(start + i as u64);
                    let _ = tx.send(Some(Err(msg.clone())));
                }
                return;
            }
        };
        self.count_fetched(len as u64, class);
        // Hashed here, before any reader sees a byte: ~0.4 s of CPU per GiB
        // (DESIGN.md, "Manifest v1 and verification").
        let bad = self.bad_chunks(offset, &run);
        if !bad.is_empty() {
            return self.salvage(start, txs, &run, &bad, class).await;
        }
        let run = Arc::new(run);
        self.mark_verified(start..start + n);
        let cs = usize::try_from(self.chunk_size).unwrap_or(usize::MAX);
        for (i, tx) in txs.iter().enumerate() {
            let _ = tx.send(Some(Ok(Piece {
                run: Arc::clone(&run),
                at: i * cs,
            })));
        }
        if let Err(e) = self.persist(start, n, offset, &run, class, direct).await {
            // Readers already have their bytes; the chunks are simply
            // fetched again next time.
            tracing::warn!(chunk = start, error = %crate::error_chain(&e), "caching chunks failed");
        }
        for i in 0..n {
            self.forget(start + i);
        }
    }

    fn count_fetched(&self, len: u64, class: Class) {
        self.stats.upstream_bytes.fetch_add(len, Ordering::Relaxed);
        self.metrics.upstream_read(len);
        if class == Class::Prefetch {
            self.metrics.prefetch_bytes(len);
        }
    }

    /// A fetched run in which some chunks failed their digests: the good
    /// chunks are served and persisted one by one; each bad one is read
    /// again on its own, up to [`MAX_READS`] reads in all, and its readers
    /// get `Corrupt` if no read was good. Rare, so it copies.
    async fn salvage(
        self: &Arc<Self>,
        start: u64,
        txs: Vec<watch::Sender<FetchState>>,
        run: &IoBuf,
        bad: &[u64],
        class: Class,
    ) {
        let cs = usize::try_from(self.chunk_size).unwrap_or(usize::MAX);
        for (i, tx) in txs.into_iter().enumerate() {
            let c = start + i as u64;
            let at = i * cs;
            let piece = if bad.contains(&c) {
                self.digest_failed(c, 1);
                self.refetch(c, class).await
            } else {
                run.get(at..run.len().min(at + cs))
                    .map(IoBuf::from_slice)
                    .ok_or(())
            };
            match piece {
                Ok(bytes) => {
                    let bytes = Arc::new(bytes);
                    self.mark_verified(c..c + 1);
                    let _ = tx.send(Some(Ok(Piece {
                        run: Arc::clone(&bytes),
                        at: 0,
                    })));
                    if let Err(e) = self
                        .persist(c, 1, c * self.chunk_size, &bytes, class, false)
                        .await
                    {
                        tracing::warn!(chunk = c, error = %crate::error_chain(&e), "caching chunk failed");
                    }
                }
                Err(()) => {
                    let e = CacheError::Corrupt {
                        chunk: c,
                        source_desc: self.upstream.describe(),
                        reads: MAX_READS,
                    };
                    tracing::error!(chunk = c, error = %e, "no good copy of the chunk; its reads fail with EIO");
                    let _ = tx.send(Some(Err(crate::error_chain(&e))));
                }
            }
            self.forget(c);
        }
    }

    /// Reads chunk `c` again until it matches the manifest, up to
    /// [`MAX_READS`] reads in all counting the one that already failed.
    async fn refetch(&self, c: u64, class: Class) -> Result<IoBuf, ()> {
        let off = c * self.chunk_size;
        let len = usize::try_from(self.chunk_size.min(self.size - off)).unwrap_or(0);
        for read in 2..=MAX_READS {
            match self.upstream.read_at(off, len).await {
                Ok(b) => {
                    self.count_fetched(len as u64, class);
                    if self.bad_chunks(off, &b).is_empty() {
                        tracing::info!(
                            chunk = c,
                            read,
                            "chunk read again and now matches its digest"
                        );
                        return Ok(b);
                    }
                    self.digest_failed(c, read);
                }
                Err(e) => {
                    tracing::warn!(chunk = c, read, error = %crate::error_chain(&e), "reading a damaged chunk again failed");
                }
            }
        }
        Err(())
    }

    fn digest_failed(&self, c: u64, read: u32) {
        let kind = self.upstream.source_kind();
        self.metrics.digest_failure(kind);
        self.stats.digest_failures.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            chunk = c,
            offset = c * self.chunk_size,
            read,
            source = kind,
            from = %self.upstream.describe(),
            "chunk failed its digest; discarded"
        );
    }

    /// Writes a verified run to the data file and marks it present. A
    /// full disk, or no room under the cap, leaves it uncached: its
    /// readers already have it.
    async fn persist(
        self: &Arc<Self>,
        start: u64,
        n: u64,
        offset: u64,
        buf: &Arc<IoBuf>,
        class: Class,
        direct: bool,
    ) -> CacheResult<()> {
        if self.full.is_full() {
            self.full.skip(buf.len() as u64);
            return Ok(());
        }
        let _room = match self.cap.get() {
            Some(cap) => match self.make_room(cap, start, n, class).await? {
                Some(r) => Some(r),
                None => {
                    self.metrics.uncached_bytes(buf.len() as u64);
                    return Ok(());
                }
            },
            None => None,
        };
        if let Err(e) = self.write_run(offset, buf, direct).await {
            return self.no_space(start, offset, buf.len(), e, "write");
        }
        if let Err(e) = self.make_durable().await {
            return self.no_space(start, offset, buf.len(), e, "fdatasync");
        }
        self.bitmap.set_range(start..start + n)?;
        (start..start + n).for_each(|c| self.touch(c));
        self.metrics.chunks_present(self.bitmap.count());
        Ok(())
    }

    /// Writes large runs that a reader takes from memory as they arrive
    /// past the page cache (`O_DIRECT`) from now on; call once, before
    /// serving. Caching them in memory as well costs a copy and page-cache
    /// upkeep on the relay's hot path; a later hit reads them from disk
    /// once (DESIGN.md, "Cache writes"). Returns false (and writes stay
    /// buffered) if the file system refuses `O_DIRECT`.
    pub fn set_direct_writes(&self) -> bool {
        use std::os::unix::fs::OpenOptionsExt;
        match File::options()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&self.data_path)
        {
            Ok(f) => {
                let _ = self.direct.set(Arc::new(f));
                true
            }
            Err(e) => {
                tracing::warn!(
                    path = %self.data_path.display(),
                    error = %e,
                    "the cache's filesystem refuses O_DIRECT; cache writes stay buffered"
                );
                false
            }
        }
    }

    /// Writes one verified run to the data file: direct when its fetch
    /// allowed it (`begin_range`), it is large and aligned for `O_DIRECT`
    /// (all but the image's short last chunk) and direct writes are on;
    /// buffered otherwise.
    async fn write_run(&self, offset: u64, buf: &Arc<IoBuf>, direct: bool) -> std::io::Result<()> {
        let align = crate::io::buf::ALIGN as u64;
        let len = buf.len() as u64;
        let direct = self.direct.get().filter(|_| {
            direct
                && len >= DIRECT_WRITE_MIN
                && offset.is_multiple_of(align)
                && len.is_multiple_of(align)
                && !self.direct_refused.load(Ordering::Relaxed)
        });
        if let Some(file) = direct {
            match self
                .engine
                .write_shared(file, offset, Arc::clone(buf))
                .await
            {
                Ok(()) => {
                    self.metrics.written_bytes(true, len);
                    return Ok(());
                }
                // A filesystem may open O_DIRECT yet refuse the write.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    if !self.direct_refused.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            path = %self.data_path.display(),
                            error = %e,
                            "a direct cache write was refused; cache writes are buffered from now on"
                        );
                    }
                }
                Err(e) => return Err(e),
            }
        }
        self.engine
            .write_shared(&self.data, offset, Arc::clone(buf))
            .await?;
        self.metrics.written_bytes(false, len);
        Ok(())
    }

    /// A failed write or sync of a run: for want of space, the disk is
    /// marked full, the blocks a short write took are given back, and the
    /// run stays uncached (its readers have it); otherwise an error.
    fn no_space(
        &self,
        start: u64,
        offset: u64,
        len: usize,
        e: std::io::Error,
        op: &'static str,
    ) -> CacheResult<()> {
        if !room::is_no_space(&e) {
            return Err(CacheError::Data {
                op,
                offset,
                source: e,
            });
        }
        self.full.enter(start);
        self.full.skip(len as u64);
        let n = (len as u64).div_ceil(self.chunk_size);
        let run: Vec<u64> = (start..start + n).collect();
        if let Err(e) = room::punch(&self.data, &run, self.chunk_size, self.size) {
            tracing::debug!(chunk = start, error = %e, "cannot free a failed write's blocks");
        }
        Ok(())
    }

    /// Returns once every data write completed before the call is durable.
    /// Concurrent fetches share one fdatasync (group commit): whoever holds
    /// the lock syncs for all writes done so far, and the others find their
    /// write already covered.
    async fn make_durable(&self) -> std::io::Result<()> {
        let mine = self.writes_done.fetch_add(1, Ordering::AcqRel) + 1;
        let _g = self.sync_lock.lock().await;
        if self.writes_synced.load(Ordering::Acquire) >= mine {
            return Ok(());
        }
        let covered = self.writes_done.load(Ordering::Acquire);
        self.engine.fdatasync(&self.data).await?;
        self.writes_synced.fetch_max(covered, Ordering::AcqRel);
        Ok(())
    }

    /// Waits (up to `limit`) until no chunk is being fetched or persisted;
    /// returns whether that happened. Used before a graceful exit.
    pub async fn settle(&self, limit: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let idle = self
                .inflight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .is_empty();
            if idle {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Flushes the bitmap; called periodically and at shutdown.
    ///
    /// # Errors
    /// `Bitmap` if the sync fails.
    pub fn sync(&self) -> CacheResult<()> {
        Ok(self.bitmap.sync()?)
    }
}

/// Which of the cache's `chunks` chunks (of `cs` bytes) are all zeros by
/// `manifest`, whose chunks divide them: a bit per chunk, and the count.
fn zero_chunks(manifest: &Manifest, cs: u64, chunks: u64) -> (Vec<u64>, u64) {
    let per = (cs / u64::from(manifest.chunk_size())).max(1);
    let mut bits = vec![0u64; usize::try_from(chunks.div_ceil(64)).unwrap_or(0)];
    let mut n = 0;
    for c in 0..chunks {
        let first = c * per;
        let last = (first + per).min(manifest.chunks());
        if (first..last).all(|i| manifest.is_zero(i)) {
            if let Some(w) = usize::try_from(c / 64).ok().and_then(|w| bits.get_mut(w)) {
                *w |= 1 << (c % 64);
                n += 1;
            }
        }
    }
    (bits, n)
}

#[cfg(test)]
mod tests;
