//! The persisted presence bitmap: one bit per chunk, set only after the
//! chunk's data is durable in the data file.
//!
//! On-disk layout (`herd-cache.bitmap`, little-endian, version 2):
//!
//! ```text
//! offset  size  field
//!      0     8  magic "HERDBMP\0"
//!      8     4  version (2)
//!     12     4  header length (128)
//!     16     8  image size in bytes
//!     24     4  chunk size in bytes
//!     28     4  reserved (0)
//!     32     8  chunk count
//!     40    32  image identity (BLAKE3 of the image's manifest)
//!     72    56  reserved (0)
//!    128     …  bitmap words, u64 each, bit i of word w = chunk 64*w+i
//! ```
//!
//! Version 1 (64-byte header, no identity) is recognised so the cache can
//! start a fresh generation over it.
//!
//! A word is rewritten in place when one of its bits is set. A crash can
//! lose a bit whose data was durable (the chunk is fetched again), never the
//! other way round, because the cache syncs data before calling `set`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use thiserror::Error;

use crate::le::{u32_at, u64_at};
use crate::manifest::Identity;

pub const MAGIC: [u8; 8] = *b"HERDBMP\0";
pub const VERSION: u32 = 2;
pub const HEADER_LEN: u32 = 128;

#[derive(Debug, Error)]
pub enum BitmapError {
    #[error("{op} of cache bitmap {path} failed")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is not a herd cache bitmap (bad magic or truncated); remove the cache directory"
    )]
    NotABitmap { path: PathBuf },
    #[error("{path} has format version {found}; this herd reads version {VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error(
        "cache {path} holds an image of {cached_size} bytes in {cached_chunk}-byte chunks, but the upstream is {size} bytes with {chunk}-byte chunks; use another --cache-dir or remove this one"
    )]
    Mismatch {
        path: PathBuf,
        cached_size: u64,
        cached_chunk: u32,
        size: u64,
        chunk: u32,
    },
    #[error("cache {path} is in use by another herd process")]
    Locked { path: PathBuf },
    #[error(
        "cache {path} holds image {}, this node serves image {serving}",
        cached.map_or_else(|| "(unrecorded: a version-1 cache)".to_owned(), |c| c.to_string())
    )]
    OtherImage {
        path: PathBuf,
        cached: Option<Identity>,
        serving: Identity,
    },
}

/// Header fields that identify what a bitmap describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub image_size: u64,
    pub chunk_size: u32,
    pub chunks: u64,
    pub identity: Identity,
}

/// What a header's bytes turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// Not a bitmap (bad magic or too short).
    Foreign,
    /// A version-1 bitmap: it never recorded which image it holds.
    V1,
    /// A version this herd does not know.
    Unknown(u32),
    Current(Header),
}

pub fn encode_header(h: &Header) -> [u8; HEADER_LEN as usize] {
    let mut b = [0u8; HEADER_LEN as usize];
    b[..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&HEADER_LEN.to_le_bytes());
    b[16..24].copy_from_slice(&h.image_size.to_le_bytes());
    b[24..28].copy_from_slice(&h.chunk_size.to_le_bytes());
    b[32..40].copy_from_slice(&h.chunks.to_le_bytes());
    b[40..72].copy_from_slice(&h.identity.0);
    b
}

/// Parses a header.
#[must_use]
pub fn decode_header(b: &[u8]) -> Decoded {
    if b.len() < 16 || b[..8] != MAGIC {
        return Decoded::Foreign;
    }
    let version = u32_at(b, 8);
    match version {
        1 => return Decoded::V1,
        VERSION if u32_at(b, 12) == HEADER_LEN && b.len() >= HEADER_LEN as usize => {}
        VERSION => return Decoded::Foreign,
        v => return Decoded::Unknown(v),
    }
    let mut identity = [0u8; 32];
    identity.copy_from_slice(&b[40..72]);
    Decoded::Current(Header {
        image_size: u64_at(b, 16),
        chunk_size: u32_at(b, 24),
        chunks: u64_at(b, 32),
        identity: Identity(identity),
    })
}

pub struct Bitmap {
    path: PathBuf,
    /// Held under `flock` for the life of the bitmap: one daemon a cache.
    file: nix::fcntl::Flock<File>,
    words: Vec<AtomicU64>,
    chunks: u64,
    /// Bits set, kept alongside the words so `count` is O(1).
    present: AtomicU64,
    write_lock: Mutex<()>,
    dirty: AtomicBool,
}

impl Bitmap {
    /// Opens the bitmap at `path`, creating it if missing, and takes an
    /// exclusive lock so two daemons never share one cache.
    ///
    /// # Errors
    /// Any `BitmapError`: I/O, foreign or mismatched file, a held lock, or
    /// `OtherImage` when it records another image (or none: version 1).
    pub fn open(
        path: &Path,
        image_size: u64,
        chunk_size: u32,
        identity: Identity,
    ) -> Result<Self, BitmapError> {
        let io = |op, source| BitmapError::Io {
            op,
            path: path.to_owned(),
            source,
        };
        let chunks = image_size.div_ceil(u64::from(chunk_size));
        let want = Header {
            image_size,
            chunk_size,
            chunks,
            identity,
        };
        let nwords = usize::try_from(chunks.div_ceil(64)).unwrap_or(usize::MAX);
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| io("open", e))?;
        let mut file = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| match errno {
            nix::errno::Errno::EWOULDBLOCK => BitmapError::Locked {
                path: path.to_owned(),
            },
            other => io("lock", other.into()),
        })?;
        let len = file.metadata().map_err(|e| io("stat", e))?.len();
        let mut words = Vec::with_capacity(nwords);
        if len == 0 {
            let mut init = encode_header(&want).to_vec();
            init.resize(HEADER_LEN as usize + nwords * 8, 0);
            file.write_all(&init).map_err(|e| io("initialise", e))?;
            file.sync_all().map_err(|e| io("sync", e))?;
            words.resize_with(nwords, || AtomicU64::new(0));
        } else {
            let mut raw = Vec::new();
            file.read_to_end(&mut raw).map_err(|e| io("read", e))?;
            let header = match decode_header(&raw) {
                Decoded::Current(h) => h,
                Decoded::Foreign => {
                    return Err(BitmapError::NotABitmap {
                        path: path.to_owned(),
                    })
                }
                Decoded::V1 => {
                    return Err(BitmapError::OtherImage {
                        path: path.to_owned(),
                        cached: None,
                        serving: identity,
                    })
                }
                Decoded::Unknown(found) => {
                    return Err(BitmapError::Version {
                        path: path.to_owned(),
                        found,
                    })
                }
            };
            if header.identity != identity {
                return Err(BitmapError::OtherImage {
                    path: path.to_owned(),
                    cached: Some(header.identity),
                    serving: identity,
                });
            }
            if header != want {
                return Err(BitmapError::Mismatch {
                    path: path.to_owned(),
                    cached_size: header.image_size,
                    cached_chunk: header.chunk_size,
                    size: image_size,
                    chunk: chunk_size,
                });
            }
            let body = &raw[HEADER_LEN as usize..];
            if body.len() < nwords * 8 {
                return Err(BitmapError::NotABitmap {
                    path: path.to_owned(),
                });
            }
            for (w, c) in body.chunks_exact(8).take(nwords).enumerate() {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                let mut v = u64::from_le_bytes(a);
                // Bits past the last chunk are meaningless; never trust them.
                let first = w as u64 * 64;
                if first + 64 > chunks {
                    let valid = chunks - first;
                    v &= (1u64 << valid) - 1;
                }
                words.push(AtomicU64::new(v));
            }
        }
        let present = words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum();
        Ok(Self {
            path: path.to_owned(),
            file,
            words,
            chunks,
            present: AtomicU64::new(present),
            write_lock: Mutex::new(()),
            dirty: AtomicBool::new(false),
        })
    }

    #[must_use]
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    #[must_use]
    pub fn is_set(&self, chunk: u64) -> bool {
        let (w, bit) = (chunk / 64, chunk % 64);
        usize::try_from(w)
            .ok()
            .and_then(|w| self.words.get(w))
            .is_some_and(|a| a.load(Ordering::Acquire) & (1 << bit) != 0)
    }

    /// Marks `chunk` present and writes its word to the file. Call only
    /// after the chunk's data is durable.
    ///
    /// # Errors
    /// `Io` if the word cannot be written; the bit stays set in memory.
    pub fn set(&self, chunk: u64) -> Result<(), BitmapError> {
        self.set_range(chunk..chunk + 1)
    }

    /// Marks a run of chunks present, writing each touched word once.
    /// Call only after the chunks' data is durable.
    ///
    /// # Errors
    /// `Io` if the words cannot be written; the bits stay set in memory.
    pub fn set_range(&self, chunks: std::ops::Range<u64>) -> Result<(), BitmapError> {
        let chunks = chunks.start..chunks.end.min(self.chunks);
        if chunks.is_empty() {
            return Ok(());
        }
        // Serialise update+write so a slower writer never puts back a stale
        // word that lacks a bit another writer just set.
        let _g = self
            .write_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut added = 0;
        for c in chunks.clone() {
            let bit = 1u64 << (c % 64);
            let Some(word) = usize::try_from(c / 64).ok().and_then(|w| self.words.get(w)) else {
                continue;
            };
            if word.fetch_or(bit, Ordering::AcqRel) & bit == 0 {
                added += 1;
            }
        }
        self.present.fetch_add(added, Ordering::Relaxed);
        let (first, last) = (chunks.start / 64, (chunks.end - 1) / 64);
        let bytes: Vec<u8> = (first..=last)
            .filter_map(|w| usize::try_from(w).ok().and_then(|w| self.words.get(w)))
            .flat_map(|w| w.load(Ordering::Acquire).to_le_bytes())
            .collect();
        self.dirty.store(true, Ordering::Release);
        self.file
            .write_all_at(&bytes, u64::from(HEADER_LEN) + first * 8)
            .map_err(|source| BitmapError::Io {
                op: "write",
                path: self.path.clone(),
                source,
            })
    }

    /// Marks `chunk` absent (its data was found damaged) and writes its
    /// word. Losing this write is safe: the chunk is checked again on its
    /// first read after a restart.
    ///
    /// # Errors
    /// `Io` if the word cannot be written; the bit stays clear in memory.
    pub fn clear(&self, chunk: u64) -> Result<(), BitmapError> {
        let Some(word) = usize::try_from(chunk / 64)
            .ok()
            .filter(|_| chunk < self.chunks)
            .and_then(|w| self.words.get(w))
        else {
            return Ok(());
        };
        let _g = self
            .write_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let bit = 1u64 << (chunk % 64);
        if word.fetch_and(!bit, Ordering::AcqRel) & bit != 0 {
            self.present.fetch_sub(1, Ordering::Relaxed);
        }
        self.dirty.store(true, Ordering::Release);
        self.file
            .write_all_at(
                &word.load(Ordering::Acquire).to_le_bytes(),
                u64::from(HEADER_LEN) + chunk / 64 * 8,
            )
            .map_err(|source| BitmapError::Io {
                op: "write",
                path: self.path.clone(),
                source,
            })
    }

    /// Marks evicted chunks absent and writes each touched word once.
    /// The caller syncs ([`Self::sync_now`]) before it frees their data.
    ///
    /// # Errors
    /// `Io` if a word cannot be written; the bits stay clear in memory.
    pub fn clear_many(&self, chunks: &[u64]) -> Result<(), BitmapError> {
        let _g = self
            .write_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut touched: Vec<u64> = Vec::new();
        for &c in chunks.iter().filter(|&&c| c < self.chunks) {
            let Some(word) = usize::try_from(c / 64).ok().and_then(|w| self.words.get(w)) else {
                continue;
            };
            let bit = 1u64 << (c % 64);
            if word.fetch_and(!bit, Ordering::AcqRel) & bit != 0 {
                self.present.fetch_sub(1, Ordering::Relaxed);
            }
            touched.push(c / 64);
        }
        touched.sort_unstable();
        touched.dedup();
        self.dirty.store(true, Ordering::Release);
        for w in touched {
            let Some(word) = usize::try_from(w).ok().and_then(|i| self.words.get(i)) else {
                continue;
            };
            self.file
                .write_all_at(
                    &word.load(Ordering::Acquire).to_le_bytes(),
                    u64::from(HEADER_LEN) + w * 8,
                )
                .map_err(|source| BitmapError::Io {
                    op: "write",
                    path: self.path.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// The bitmap words as they are now (bit *i* of word *w* = chunk
    /// 64·*w*+*i*).
    #[must_use]
    pub fn words(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect()
    }

    /// fdatasyncs the file whether or not this handle wrote since the
    /// last sync (a concurrent [`Self::sync`] may still be under way).
    ///
    /// # Errors
    /// `Io` if fdatasync fails.
    pub fn sync_now(&self) -> Result<(), BitmapError> {
        self.dirty.store(false, Ordering::Release);
        self.file.sync_data().map_err(|source| BitmapError::Io {
            op: "sync",
            path: self.path.clone(),
            source,
        })
    }

    /// Number of chunks present.
    #[must_use]
    pub fn count(&self) -> u64 {
        self.present.load(Ordering::Relaxed)
    }

    /// Flushes written words to disk if any changed since the last sync.
    ///
    /// # Errors
    /// `Io` if fdatasync fails.
    pub fn sync(&self) -> Result<(), BitmapError> {
        if self.dirty.swap(false, Ordering::AcqRel) {
            self.file.sync_data().map_err(|source| BitmapError::Io {
                op: "sync",
                path: self.path.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: Identity = Identity([7; 32]);

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("herd-bmp-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&d);
        d
    }

    #[test]
    fn header_round_trip_and_rejects() {
        let h = Header {
            image_size: 1 << 30,
            chunk_size: 1 << 20,
            chunks: 1024,
            identity: ID,
        };
        let b = encode_header(&h);
        assert_eq!(&b[..8], b"HERDBMP\0");
        assert_eq!(&b[8..16], &[2, 0, 0, 0, 128, 0, 0, 0]);
        assert_eq!(&b[40..72], &[7; 32]);
        assert_eq!(decode_header(&b), Decoded::Current(h));
        assert_eq!(decode_header(&b[..10]), Decoded::Foreign);
        assert_eq!(decode_header(&b[..100]), Decoded::Foreign);
        let mut v = b;
        v[8] = 3;
        assert_eq!(decode_header(&v), Decoded::Unknown(3));
        v[8] = 1;
        assert_eq!(decode_header(&v), Decoded::V1);
    }

    #[test]
    fn bits_persist_across_reopen() {
        let p = tmp("persist");
        {
            let b = Bitmap::open(&p, 130 * 4096 + 1, 4096, ID).expect("create");
            assert_eq!(b.chunks(), 131);
            b.set(0).expect("set");
            b.set(64).expect("set");
            b.set(130).expect("set");
            b.sync().expect("sync");
            assert_eq!(b.count(), 3);
        }
        let b = Bitmap::open(&p, 130 * 4096 + 1, 4096, ID).expect("reopen");
        assert!(b.is_set(0) && b.is_set(64) && b.is_set(130));
        assert!(!b.is_set(1) && !b.is_set(131));
        assert_eq!(b.count(), 3);
        // A run across a word boundary, overlapping a set bit, counted once.
        b.set_range(60..70).expect("set range");
        assert_eq!(b.count(), 3 + 9);
        b.sync().expect("sync");
        drop(b);
        let b = Bitmap::open(&p, 130 * 4096 + 1, 4096, ID).expect("reopen");
        assert!((60..70).all(|c| b.is_set(c)) && !b.is_set(59) && !b.is_set(70));
        assert_eq!(b.count(), 12);
        drop(b);
        // A different image or chunk size is refused, not silently reused.
        assert!(matches!(
            Bitmap::open(&p, 4096, 4096, ID),
            Err(BitmapError::Mismatch { .. })
        ));
        // Another identity is named as such.
        assert!(matches!(
            Bitmap::open(&p, 130 * 4096 + 1, 4096, Identity([8; 32])),
            Err(BitmapError::OtherImage {
                cached: Some(ID),
                ..
            })
        ));
        let b = Bitmap::open(&p, 130 * 4096 + 1, 4096, ID).expect("reopen");
        b.clear(64).expect("clear");
        b.clear(64).expect("clear twice");
        assert_eq!(b.count(), 11);
        b.sync().expect("sync");
        drop(b);
        let b = Bitmap::open(&p, 130 * 4096 + 1, 4096, ID).expect("reopen");
        assert!(!b.is_set(64) && b.is_set(0) && b.count() == 11);
        drop(b);
        // A version-1 file is recognised as such.
        let mut raw = std::fs::read(&p).expect("read");
        raw[8] = 1;
        std::fs::write(&p, &raw).expect("write");
        assert!(matches!(
            Bitmap::open(&p, 130 * 4096 + 1, 4096, ID),
            Err(BitmapError::OtherImage { cached: None, .. })
        ));
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn second_opener_is_locked_out_and_garbage_refused() {
        let p = tmp("lock");
        let _a = Bitmap::open(&p, 4096, 4096, ID).expect("create");
        assert!(matches!(
            Bitmap::open(&p, 4096, 4096, ID),
            Err(BitmapError::Locked { .. })
        ));
        let g = tmp("garbage");
        std::fs::write(&g, b"not a bitmap at all").expect("write");
        assert!(matches!(
            Bitmap::open(&g, 4096, 4096, ID),
            Err(BitmapError::NotABitmap { .. })
        ));
        let _ = std::fs::remove_file(&p);
        let _ = std::fs::remove_file(&g);
    }
}
