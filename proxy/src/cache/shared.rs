//! Chunks shared by content between the images one node serves: a cache
//! missing a chunk that another image's cache holds with the same bytes
//! (by the manifests' digests) reads it from there instead of fetching it
//! and storing a second copy. So a host caching two similar images stores
//! their common chunks once (DESIGN.md, "Chunks shared between images").
//!
//! A chunk is known by its key: BLAKE3 of its length and of the manifest
//! digests it spans. Two caches share only when their chunk sizes agree.
//! The versions of one image never borrow from each other: an older
//! version retires, so a newer one copies what it keeps (`SeededUpstream`).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock, Weak};

use super::ChunkCache;
use crate::manifest::Manifest;

/// A chunk's content key.
pub type Key = [u8; 32];

/// The key of cache chunk `c` (`chunk_size` bytes, the last one shorter)
/// of the image `manifest` describes; `None` if the manifest has no
/// digests or its chunks do not divide the cache's.
#[must_use]
pub fn key(manifest: &Manifest, chunk_size: u64, c: u64) -> Option<Key> {
    let mcs = u64::from(manifest.chunk_size());
    if mcs == 0 || !chunk_size.is_multiple_of(mcs) {
        return None;
    }
    let start = c.checked_mul(chunk_size)?;
    let size = manifest.image_size();
    if start >= size {
        return None;
    }
    let end = start.saturating_add(chunk_size).min(size);
    let mut h = blake3::Hasher::new();
    h.update(&(end - start).to_le_bytes());
    for i in start / mcs..end.div_ceil(mcs) {
        h.update(manifest.digest(i)?);
    }
    Some(*h.finalize().as_bytes())
}

struct Member {
    image: String,
    cache: Weak<ChunkCache>,
    chunk_size: u64,
    /// Chunk by key (the first of equal ones); zero chunks have none.
    /// Built when another image first asks: a node of one image never
    /// pays its memory (40 bytes a chunk).
    by_key: OnceLock<HashMap<Key, u64>>,
}

/// Every non-zero chunk of `cache` by its key.
fn index(cache: &ChunkCache) -> HashMap<Key, u64> {
    let cs = cache.chunk_size();
    let manifest = cache.manifest();
    let mut by_key = HashMap::new();
    for c in 0..cache.chunks_total() {
        if cache.is_zero(c) {
            continue;
        }
        if let Some(k) = key(manifest, cs, c) {
            by_key.entry(k).or_insert(c);
        }
    }
    by_key
}

/// The node's caches, by content.
#[derive(Default)]
pub struct SharedChunks {
    members: RwLock<Vec<Member>>,
}

impl SharedChunks {
    #[must_use]
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Adds `cache` (a version of image `image`): from now on it borrows
    /// from the other images' caches and lends them its chunks.
    pub fn join(self: &Arc<Self>, image: &str, cache: &Arc<ChunkCache>) {
        let mut members = self
            .members
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Retired versions leave their places here.
        members.retain(|m| m.cache.strong_count() > 0);
        members.push(Member {
            image: image.to_owned(),
            cache: Arc::downgrade(cache),
            chunk_size: cache.chunk_size(),
            by_key: OnceLock::new(),
        });
        // With two images here, every index is built now, as a version
        // opens, rather than by a client's first miss.
        if members.iter().any(|m| m.image != image) {
            for m in members.iter() {
                if let Some(c) = m.cache.upgrade() {
                    m.by_key.get_or_init(|| index(&c));
                }
            }
        }
        drop(members);
        // Set once: a cache joins one store.
        let _ = cache.shared.set((Arc::clone(self), image.to_owned()));
    }

    /// A cache of another image than `image` that holds a chunk of
    /// `key` on disk now, and that chunk's number there. The key is
    /// computed only if there is another image to ask (a node of one
    /// image pays a lock, not a hash, per lookup).
    pub fn find(
        &self,
        image: &str,
        chunk_size: u64,
        key: impl FnOnce() -> Option<Key>,
    ) -> Option<(Arc<ChunkCache>, u64)> {
        let members = self
            .members
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut others = members
            .iter()
            .filter(|m| m.image != image && m.chunk_size == chunk_size)
            .peekable();
        others.peek()?;
        let key = key()?;
        others.find_map(|m| {
            let cache = m.cache.upgrade()?;
            let c = *m.by_key.get_or_init(|| index(&cache)).get(&key)?;
            cache.bitmap.is_set(c).then_some((cache, c))
        })
    }
}
