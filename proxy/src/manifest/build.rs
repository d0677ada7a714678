//! Building a manifest: ask the source where its data lies, then read
//! those chunks once, in large sequential reads kept a few deep, and hash
//! each chunk on the blocking pool so both cores hash while the next reads
//! are in flight. A chunk that is all hole is never read: its digest is
//! the digest of zeros.

use std::sync::Arc;

use tokio::task::JoinSet;

use super::format::{chunk_count, zero_digest, AllocMap, Digest, Manifest, GRANULE};
use super::ManifestError;
use crate::upstream::Upstream;

/// Bytes per upstream read while building.
const STEP: u64 = 8 << 20;
/// Reads in flight (and batches being hashed) at once.
const DEPTH: usize = 4;

/// Reads `upstream` where it may hold data and returns its manifest in
/// `chunk_size` chunks. `progress` is called with the bytes read so far
/// and the bytes there are to read (the chunks holding data).
///
/// # Errors
/// `Read` if the upstream fails; `Format` for an invalid chunk size.
pub async fn build(
    upstream: Arc<dyn Upstream>,
    chunk_size: u32,
    mut progress: impl FnMut(u64, u64),
) -> Result<Manifest, ManifestError> {
    let size = upstream.size();
    // Validates the chunk size before reading anything.
    Manifest::from_digests(0, chunk_size, &[])?;
    let cs = u64::from(chunk_size);
    let step = STEP.max(cs) / cs * cs;
    let chunks =
        usize::try_from(chunk_count(size, chunk_size)).map_err(|_| ManifestError::TooLarge {
            size,
            chunk: chunk_size,
        })?;
    let map = match upstream
        .extents()
        .await
        .map_err(|source| ManifestError::Read { offset: 0, source })?
    {
        Some(extents) => AllocMap::from_extents(size, GRANULE, &extents),
        None => AllocMap::all(size, GRANULE),
    };
    // Holes first: their digests are known without a read.
    let tail = size - (chunks as u64).saturating_sub(1) * cs;
    let (zero_full, zero_tail) = (zero_digest(cs), zero_digest(tail));
    let mut digests: Vec<Digest> = (0..chunks as u64)
        .map(|i| {
            if i + 1 == chunks as u64 {
                zero_tail
            } else {
                zero_full
            }
        })
        .collect();
    let runs = data_runs(size, cs, step, &map);
    let mut runs = runs.into_iter();
    let mut tasks: JoinSet<Result<(u64, Vec<Digest>), ManifestError>> = JoinSet::new();
    let total: u64 = runs.as_slice().iter().map(|r| r.1).sum();
    let mut done = 0;
    loop {
        while tasks.len() < DEPTH {
            let Some((at, len)) = runs.next() else { break };
            let up = Arc::clone(&upstream);
            tasks.spawn(async move {
                let n = usize::try_from(len).unwrap_or(usize::MAX);
                let buf = up
                    .read_at(at, n)
                    .await
                    .map_err(|source| ManifestError::Read { offset: at, source })?;
                let digests = tokio::task::spawn_blocking(move || {
                    buf.chunks(usize::try_from(cs).unwrap_or(usize::MAX))
                        .map(|c| *blake3::hash(c).as_bytes())
                        .collect::<Vec<Digest>>()
                })
                .await
                .map_err(|_| ManifestError::Hasher)?;
                Ok((at, digests))
            });
        }
        let Some(joined) = tasks.join_next().await else {
            break;
        };
        let (at, ds) = joined.map_err(|_| ManifestError::Hasher)??;
        let first = usize::try_from(at / cs).unwrap_or(usize::MAX);
        let read = (ds.len() as u64 * cs).min(size - at);
        for (i, d) in ds.into_iter().enumerate() {
            if let Some(slot) = digests.get_mut(first + i) {
                *slot = d;
            }
        }
        done += read;
        progress(done, total);
    }
    Ok(Manifest::with_allocation(size, chunk_size, &digests, &map)?)
}

/// Reads (offset, length) that cover every chunk holding an allocated
/// granule: runs of adjacent such chunks, at most `step` bytes each.
fn data_runs(size: u64, cs: u64, step: u64, map: &AllocMap) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for i in 0..chunk_count(size, u32::try_from(cs).unwrap_or(u32::MAX)) {
        let from = i * cs;
        let len = cs.min(size - from);
        if !map.any_in(from, from + len) {
            continue;
        }
        match runs.last_mut() {
            Some((at, n)) if *at + *n == from && *n + len <= step => *n += len,
            _ => runs.push((from, len)),
        }
    }
    runs
}
