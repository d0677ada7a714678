//! A new version's upstream that takes what it can from an older version
//! on this node: every manifest chunk whose digest the older version also
//! has (at any offset), and holds, is read from the older version's cache;
//! only the rest is fetched from the parent. So a rolling update moves
//! only the chunks that changed, at every level of the tree. The cache
//! above checks every byte against the new manifest as it checks fetches.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use super::{ExtentsFuture, ReadFuture, Upstream, UpstreamError, UpstreamResult};
use crate::cache::ChunkCache;
use crate::io::IoBuf;
use crate::manifest::Manifest;

/// Cache chunks one seeding read copies at most.
const SEED_RUN: u64 = 16;

/// The new version's parent, seeded from an older version's cache.
pub struct SeededUpstream {
    inner: Arc<dyn Upstream>,
    /// Weak: a retired older version goes (and with it its parent
    /// connections) even while newer ones were seeded from it.
    donor: Weak<ChunkCache>,
    /// The donor's identity, for logs.
    donor_id: String,
    manifest: Arc<Manifest>,
    /// Donor chunk (manifest granularity) by digest.
    by_digest: HashMap<[u8; 32], u64>,
}

impl SeededUpstream {
    /// `inner` serves the version `manifest` describes; `donor` caches an
    /// older version (of any size, with a manifest of the same chunk size).
    #[must_use]
    pub fn new(inner: Arc<dyn Upstream>, donor: Arc<ChunkCache>, manifest: Arc<Manifest>) -> Self {
        let old = donor.manifest();
        let mut by_digest = HashMap::new();
        if old.chunk_size() == manifest.chunk_size() {
            for i in 0..old.chunks() {
                if old.is_zero(i) {
                    continue;
                }
                if let Some(d) = old.digest(i).and_then(|d| <[u8; 32]>::try_from(d).ok()) {
                    by_digest.entry(d).or_insert(i);
                }
            }
        }
        Self {
            inner,
            donor_id: donor.manifest().identity().short(),
            donor: Arc::downgrade(&donor),
            manifest,
            by_digest,
        }
    }

    /// Where in the donor chunk `i`'s bytes are, if the donor holds them:
    /// (offset, length) in the donor's image.
    fn donor_copy(&self, donor: &ChunkCache, i: u64) -> Option<(u64, u64)> {
        let d: [u8; 32] = self.manifest.digest(i)?.try_into().ok()?;
        let j = *self.by_digest.get(&d)?;
        let old = donor.manifest();
        let mcs = u64::from(old.chunk_size());
        let len = old.chunk_len(j);
        if len != self.manifest.chunk_len(i) {
            return None;
        }
        let cs = donor.chunk_size();
        let (first, last) = (j * mcs / cs, (j * mcs + len - 1) / cs);
        (first..=last)
            .all(|c| donor.is_held(c))
            .then_some((j * mcs, len))
    }

    /// Whether every byte of `cache`'s chunk `c` can come from `donor`
    /// (or is zeros by the new manifest).
    fn covers(&self, donor: &ChunkCache, cache: &ChunkCache, c: u64) -> bool {
        let mcs = u64::from(self.manifest.chunk_size());
        let cs = cache.chunk_size();
        let end = ((c + 1) * cs).min(self.manifest.image_size());
        (c * cs / mcs..end.div_ceil(mcs))
            .all(|i| self.manifest.is_zero(i) || self.donor_copy(donor, i).is_some())
    }

    /// Copies into the new version's `cache`, in the background, every
    /// chunk the older version holds: so the older one can retire without
    /// the unchanged chunks ever being fetched again, however late a
    /// client asks for them. Runs at prefetch priority (clients first).
    pub async fn seed(self: Arc<Self>, cache: Arc<ChunkCache>) {
        // Held for the copy: the older version may retire meanwhile (its
        // open data file still reads).
        let Some(donor) = self.donor.upgrade() else {
            return;
        };
        let started = std::time::Instant::now();
        let total = cache.chunks_total();
        let (mut c, mut copied) = (0, 0u64);
        while c < total {
            if cache.is_present(c) || !self.covers(&donor, &cache, c) {
                c += 1;
                continue;
            }
            let first = c;
            while c < total
                && c - first < SEED_RUN
                && !cache.is_present(c)
                && self.covers(&donor, &cache, c)
            {
                c += 1;
            }
            match cache.prefetch(first, c - 1).await {
                Ok(true) => copied += c - first,
                // No room under the cap: what is left comes on demand.
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(error = %crate::error_chain(&e), first, "seeding a run from the older version failed; it will come on demand");
                }
            }
        }
        tracing::info!(
            chunks = copied,
            from = %self.donor_id,
            seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
            "new version seeded from the older one"
        );
    }

    async fn read(&self, offset: u64, len: usize) -> UpstreamResult<IoBuf> {
        let mcs = u64::from(self.manifest.chunk_size());
        let end = offset + len as u64;
        // Runs not aligned to manifest chunks are not ours to split.
        if !offset.is_multiple_of(mcs) || (!end.is_multiple_of(mcs) && end != self.inner.size()) {
            return self.inner.read_at(offset, len).await;
        }
        let Some(donor) = self.donor.upgrade() else {
            return self.inner.read_at(offset, len).await;
        };
        let mut out = IoBuf::zeroed(len);
        let mut pending: Option<(u64, u64)> = None;
        let mut i = offset / mcs;
        while i * mcs < end {
            let at = i * mcs;
            let n = self.manifest.chunk_len(i).min(end - at);
            let copy = if self.manifest.is_zero(i) {
                Some(None)
            } else {
                self.donor_copy(&donor, i).map(Some)
            };
            match copy {
                Some(src) => {
                    if let Some((s, l)) = pending.take() {
                        self.fetch_into(&mut out, offset, s, l).await?;
                    }
                    if let Some((from, l)) = src {
                        match donor
                            .read(from, usize::try_from(l).unwrap_or(usize::MAX))
                            .await
                        {
                            Ok(bytes) => {
                                let o = usize::try_from(at - offset).unwrap_or(usize::MAX);
                                out[o..o + bytes.len()].copy_from_slice(&bytes);
                                donor.metrics().version_seeded(l);
                            }
                            // The older version lost it (evicted, retired):
                            // the parent has it.
                            Err(_) => self.fetch_into(&mut out, offset, at, n).await?,
                        }
                    }
                }
                None => {
                    pending = match pending {
                        Some((s, l)) => Some((s, l + n)),
                        None => Some((at, n)),
                    };
                }
            }
            i += 1;
        }
        if let Some((s, l)) = pending {
            self.fetch_into(&mut out, offset, s, l).await?;
        }
        Ok(out)
    }

    /// Fetches `len` bytes at `at` from the parent into `out` (which
    /// starts at `base`).
    async fn fetch_into(
        &self,
        out: &mut IoBuf,
        base: u64,
        at: u64,
        len: u64,
    ) -> UpstreamResult<()> {
        let n = usize::try_from(len).map_err(|_| UpstreamError::OutOfRange {
            offset: at,
            len: usize::MAX,
            size: self.inner.size(),
        })?;
        let got = self.inner.read_at(at, n).await?;
        let o = usize::try_from(at - base).unwrap_or(usize::MAX);
        out[o..o + n].copy_from_slice(&got[..n]);
        Ok(())
    }
}

impl Upstream for SeededUpstream {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, offset: u64, len: usize) -> ReadFuture<'_> {
        Box::pin(self.read(offset, len))
    }

    fn describe(&self) -> String {
        format!(
            "{} (seeded from version {})",
            self.inner.describe(),
            self.donor_id
        )
    }

    fn source_kind(&self) -> &'static str {
        self.inner.source_kind()
    }

    fn extents(&self) -> ExtentsFuture<'_> {
        self.inner.extents()
    }
}
