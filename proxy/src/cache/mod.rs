//! The chunk cache: a sparse data file plus a persisted presence bitmap, in
//! front of an upstream, with single-flight fetching.
//!
//! ```text
//!  read(off, len) ─▶ chunks c..=d ─┬─ present ────────────────────────┐
//!                                  ├─ being fetched ─▶ join its watch ─┤
//!                                  └─ missing ─▶ spawn fetch:          │
//!                                       upstream.read ─▶ write data    │
//!                                       ─▶ fdatasync ─▶ set bit ───────┤
//!                                                                      ▼
//!                                                pread(data file, off, len)
//! ```
//!
//! The fetch runs in its own task, so a client that disconnects never
//! cancels a fetch other readers joined. Order matters for crash safety:
//! the bit is set only after the data is durable (see `bitmap`).

pub mod bitmap;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use thiserror::Error;
use tokio::sync::watch;

use crate::io::{Engine, IoBuf};
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
}

pub type CacheResult<T> = Result<T, CacheError>;

type FetchState = Option<Result<(), String>>;

/// Counters kept alongside the Prometheus metrics, for callers in-process.
#[derive(Debug, Default)]
pub struct Stats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub joins: AtomicU64,
    pub upstream_bytes: AtomicU64,
}

pub struct ChunkCache {
    upstream: Arc<dyn Upstream>,
    engine: Engine,
    data: Arc<File>,
    bitmap: Bitmap,
    chunk_size: u64,
    size: u64,
    inflight: Mutex<HashMap<u64, watch::Receiver<FetchState>>>,
    stats: Stats,
}

impl ChunkCache {
    /// Opens (or creates) the cache in `dir` for `upstream`.
    ///
    /// # Errors
    /// `Dir` if the directory or data file cannot be set up; `Bitmap` if the
    /// bitmap is foreign, for another image, or locked by another daemon.
    pub fn open(
        dir: &Path,
        upstream: Arc<dyn Upstream>,
        chunk_size: u32,
        engine: Engine,
    ) -> CacheResult<Arc<Self>> {
        let dir_err = |source| CacheError::Dir {
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(dir_err)?;
        let size = upstream.size();
        let bitmap = Bitmap::open(&dir.join(BITMAP_FILE), size, chunk_size)?;
        let data = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(DATA_FILE))
            .map_err(dir_err)?;
        // Sparse: only fetched chunks take disk space.
        if data.metadata().map_err(dir_err)?.len() != size {
            data.set_len(size).map_err(dir_err)?;
        }
        m::cache_chunks_total(bitmap.chunks());
        m::cache_chunks_present(bitmap.count());
        Ok(Arc::new(Self {
            upstream,
            engine,
            data: Arc::new(data),
            bitmap,
            chunk_size: u64::from(chunk_size),
            size,
            inflight: Mutex::new(HashMap::new()),
            stats: Stats::default(),
        }))
    }

    #[must_use]
    pub fn size(&self) -> u64 {
        self.size
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
    pub async fn read(self: &Arc<Self>, offset: u64, len: usize) -> CacheResult<IoBuf> {
        self.ensure(offset, len as u64).await?;
        let buf = self
            .engine
            .read_at(&self.data, offset, IoBuf::zeroed(len))
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
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let first = offset / self.chunk_size;
        let last = (offset + len - 1) / self.chunk_size;
        // Start every missing chunk's fetch before waiting on any, so a
        // chunk-spanning read fetches its chunks in parallel.
        let mut waits = Vec::new();
        for chunk in first..=last {
            if let Some(rx) = self.begin(chunk) {
                waits.push((chunk, rx));
            }
        }
        for (chunk, mut rx) in waits {
            let state = rx
                .wait_for(Option::is_some)
                .await
                .map_err(|_| CacheError::Abandoned { chunk })?;
            if let Some(Err(message)) = state.as_ref() {
                return Err(CacheError::Joined {
                    chunk,
                    message: message.clone(),
                });
            }
        }
        Ok(())
    }

    /// Returns `None` for a present chunk, else a receiver that completes
    /// when the (possibly newly started) fetch ends.
    fn begin(self: &Arc<Self>, chunk: u64) -> Option<watch::Receiver<FetchState>> {
        if self.bitmap.is_set(chunk) {
            self.hit();
            return None;
        }
        let mut map = self
            .inflight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Re-check under the lock: a fetch sets the bit before it leaves
        // the map, so a reader never misses both.
        if self.bitmap.is_set(chunk) {
            drop(map);
            self.hit();
            return None;
        }
        if let Some(rx) = map.get(&chunk) {
            self.stats.joins.fetch_add(1, Ordering::Relaxed);
            m::singleflight_join();
            return Some(rx.clone());
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        m::chunk_miss();
        let (tx, rx) = watch::channel(None);
        map.insert(chunk, rx.clone());
        drop(map);
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let res = this.fetch(chunk).await;
            if let Err(e) = &res {
                tracing::warn!(chunk, error = %crate::error_chain(e), "chunk fetch failed");
            }
            this.inflight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&chunk);
            let _ = tx.send(Some(res.map_err(|e| crate::error_chain(&e))));
        });
        Some(rx)
    }

    fn hit(&self) {
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        m::chunk_hit();
    }

    async fn fetch(&self, chunk: u64) -> CacheResult<()> {
        let offset = chunk * self.chunk_size;
        let len = usize::try_from(self.chunk_size.min(self.size - offset)).unwrap_or(usize::MAX);
        let buf = self
            .upstream
            .read_at(offset, len)
            .await
            .map_err(|source| CacheError::Fetch { chunk, source })?;
        self.stats
            .upstream_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        m::upstream_read(len as u64);
        let data_err = |op, source| CacheError::Data { op, offset, source };
        self.engine
            .write_at(&self.data, offset, buf)
            .await
            .map_err(|e| data_err("write", e))?;
        self.engine
            .fdatasync(&self.data)
            .await
            .map_err(|e| data_err("fdatasync", e))?;
        self.bitmap.set(chunk)?;
        m::cache_chunks_present(self.bitmap.count());
        Ok(())
    }

    /// Flushes the bitmap; called periodically and at shutdown.
    ///
    /// # Errors
    /// `Bitmap` if the sync fails.
    pub fn sync(&self) -> CacheResult<()> {
        Ok(self.bitmap.sync()?)
    }
}

#[cfg(test)]
mod tests;
