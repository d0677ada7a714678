//! Building a manifest: read the whole image once, in large sequential
//! reads kept a few deep, and hash each chunk on the blocking pool so both
//! cores hash while the next reads are in flight.

use std::sync::Arc;

use tokio::task::JoinSet;

use super::format::{chunk_count, Digest, Manifest};
use super::ManifestError;
use crate::upstream::Upstream;

/// Bytes per upstream read while building.
const STEP: u64 = 8 << 20;
/// Reads in flight (and batches being hashed) at once.
const DEPTH: usize = 4;

/// Reads all of `upstream` and returns its manifest in `chunk_size`
/// chunks. `progress` is called with the bytes hashed so far.
///
/// # Errors
/// `Read` if the upstream fails; `Format` for an invalid chunk size.
pub async fn build(
    upstream: Arc<dyn Upstream>,
    chunk_size: u32,
    mut progress: impl FnMut(u64),
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
    let mut digests: Vec<Digest> = vec![[0; 32]; chunks];
    let mut tasks: JoinSet<Result<(u64, Vec<Digest>), ManifestError>> = JoinSet::new();
    let mut next = 0u64;
    let mut done = 0u64;
    loop {
        while tasks.len() < DEPTH && next < size {
            let (at, len) = (next, (size - next).min(step));
            next += len;
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
        for (i, d) in ds.into_iter().enumerate() {
            if let Some(slot) = digests.get_mut(first + i) {
                *slot = d;
            }
        }
        done += step.min(size - at);
        progress(done);
    }
    Ok(Manifest::from_digests(size, chunk_size, &digests)?)
}
