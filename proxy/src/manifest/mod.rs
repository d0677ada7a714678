//! Manifests: the per-chunk BLAKE3 digests of an image, made once at the
//! root and checked by every node on every fetch, and the image identity
//! that is their digest (DESIGN.md, "Manifest v1 and verification").
//!
//! ```text
//!  root: image ──build──▶ manifest ──persist──▶ herd-cache.manifest (+ .source stamp)
//!                              │ served as the NBD export `herd-manifest`
//!  child: parent ──fetch───────┘──▶ check size ──▶ cache verifies each fetch
//! ```

pub mod build;
pub mod format;
pub mod stamp;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

pub use self::format::{AllocMap, Digest, FormatError, Identity, Manifest};
use crate::upstream::nbd::NbdUpstream;
use crate::upstream::{Upstream, UpstreamError, UpstreamUrl};

/// The side export that carries the manifest.
pub const MANIFEST_EXPORT: &str = "herd-manifest";
/// The cache directory's copy of the manifest of the image it holds.
pub const CACHE_FILE: &str = "herd-cache.manifest";
/// Largest manifest a node accepts: 8 TiB in 64 KiB chunks.
pub const MAX_BYTES: u64 = 4 << 30;
/// The digest granularity a root picks (or its chunk size, if smaller):
/// every node's chunk size must be a multiple of it, and 64 KiB is herd's
/// default chunk. A 15 GB image has a 7.3 MiB manifest.
pub const DIGEST_CHUNK: u32 = 64 << 10;

#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("{what} is not a usable manifest")]
    Format {
        what: String,
        #[source]
        source: FormatError,
    },
    #[error(transparent)]
    Invalid(#[from] FormatError),
    #[error("manifest {what} is for an image of {manifest} bytes, but the image is {image} bytes")]
    SizeMismatch {
        what: String,
        manifest: u64,
        image: u64,
    },
    #[error(
        "this node's chunk size {chunk} is not a multiple of the manifest's {manifest}; use --chunk-size {manifest} or larger"
    )]
    ChunkSize { chunk: u32, manifest: u32 },
    #[error("a {size}-byte image in {chunk}-byte chunks is too large for this host")]
    TooLarge { size: u64, chunk: u32 },
    #[error("reading the image at offset {offset} failed")]
    Read {
        offset: u64,
        #[source]
        source: UpstreamError,
    },
    #[error("the hashing thread failed")]
    Hasher,
    #[error("{op} {path} failed")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the parent's manifest is {size} bytes, over the {MAX_BYTES}-byte limit")]
    Oversized { size: u64 },
    #[error("fetching the manifest from the parent failed")]
    Fetch(#[source] UpstreamError),
    #[error("the image changed since manifest {path} was made; run `herd manifest build` again")]
    Stale { path: PathBuf },
}

/// Where `herd manifest build IMAGE` puts a file image's manifest by
/// default, and where a root looks for it.
#[must_use]
pub fn beside(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".herd-manifest");
    PathBuf::from(s)
}

/// Whether the manifest at `path` was made from the image as it is now,
/// by its stamp: `Some(true)`/`Some(false)`, or `None` when either side
/// has no stamp (a LUN, an NBD server, a manifest copied without one).
fn stamp_matches(path: &Path, m: &Manifest, now: Option<&stamp::Stamp>) -> Option<bool> {
    let then = stamp::Stamp::load(&stamp::path_for(path))?;
    Some(now?.same_image(&then) && then.identity == m.identity().to_string())
}

impl Manifest {
    /// Whether this manifest describes an image of `size` bytes that a
    /// cache of `chunk` bytes per chunk can check.
    ///
    /// # Errors
    /// `SizeMismatch` or `ChunkSize`, naming both sides.
    pub fn fits(&self, what: &str, size: u64, chunk: u32) -> Result<(), ManifestError> {
        if self.image_size() != size {
            return Err(ManifestError::SizeMismatch {
                what: what.to_owned(),
                manifest: self.image_size(),
                image: size,
            });
        }
        if chunk < self.chunk_size() || !chunk.is_multiple_of(self.chunk_size()) {
            return Err(ManifestError::ChunkSize {
                chunk,
                manifest: self.chunk_size(),
            });
        }
        Ok(())
    }
}

/// Reads and decodes a manifest file.
///
/// # Errors
/// `Io` if unreadable, `Format` if it is not a valid manifest.
pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
    let bytes = std::fs::read(path).map_err(|source| ManifestError::Io {
        op: "reading",
        path: path.to_owned(),
        source,
    })?;
    Manifest::decode(&bytes).map_err(|source| ManifestError::Format {
        what: path.display().to_string(),
        source,
    })
}

/// Writes a manifest durably: a temporary file, fsync, rename.
///
/// # Errors
/// `Io` on any step.
pub fn save(path: &Path, m: &Manifest) -> Result<(), ManifestError> {
    write_atomic(path, m.bytes())
}

pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ManifestError> {
    use std::io::Write;
    let io = |op, source| ManifestError::Io {
        op,
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| io("creating", e))?;
    f.write_all(bytes).map_err(|e| io("writing", e))?;
    f.sync_all().map_err(|e| io("syncing", e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("renaming", e))?;
    if let Some(dir) = path.parent().and_then(|d| std::fs::File::open(d).ok()) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// The parent's manifest export of the image `parent` names, for an NBD
/// parent.
#[must_use]
pub fn manifest_url(parent: &UpstreamUrl) -> Option<UpstreamUrl> {
    parent.side_export(MANIFEST_EXPORT)
}

/// Reads the parent's manifest: `Ok(None)` if the parent has no
/// `herd-manifest` export, or one that is not a manifest at all (it is not
/// herd: qemu-nbd refuses the name, nbdkit serves its image under any).
///
/// # Errors
/// `Fetch` if the parent fails, `Oversized`, or `Format` for bad bytes.
pub async fn fetch_from_parent(parent: &UpstreamUrl) -> Result<Option<Manifest>, ManifestError> {
    Ok(fetch_held(parent).await?.map(|(m, _)| m))
}

/// Reads the parent's manifest as `fetch_from_parent` does, and returns
/// the connection it came on too: held open, it ends when the parent
/// publishes a newer version of the image (when `parent` names no pinned
/// version), which is how a child learns of an update.
///
/// # Errors
/// As `fetch_from_parent`.
pub async fn fetch_held(
    parent: &UpstreamUrl,
) -> Result<Option<(Manifest, NbdUpstream)>, ManifestError> {
    let Some(url) = manifest_url(parent) else {
        return Ok(None);
    };
    let up = match NbdUpstream::connect(url, 1).await {
        Ok(up) => up,
        Err(UpstreamError::NoSuchExport { .. }) => return Ok(None),
        Err(e) => return Err(ManifestError::Fetch(e)),
    };
    // nbdkit serves its one image under any export name: a server whose
    // `herd-manifest` does not start like one is not herd.
    if up.size() < format::HEADER_LEN as u64 {
        return Ok(None);
    }
    let head = up
        .read_at(0, format::MAGIC.len())
        .await
        .map_err(ManifestError::Fetch)?;
    if head[..] != format::MAGIC {
        return Ok(None);
    }
    let bytes = read_all(&up, MAX_BYTES).await.map_err(|e| match e {
        ReadAllError::Oversized(size) => ManifestError::Oversized { size },
        ReadAllError::Upstream(e) => ManifestError::Fetch(e),
    })?;
    Manifest::decode(&bytes)
        .map(|m| Some((m, up)))
        .map_err(|source| ManifestError::Format {
            what: format!("the parent's {MANIFEST_EXPORT} export"),
            source,
        })
}

pub(crate) enum ReadAllError {
    Oversized(u64),
    Upstream(UpstreamError),
}

/// Reads a whole (small) export into memory, refusing one over `max`.
pub(crate) async fn read_all(up: &dyn Upstream, max: u64) -> Result<Vec<u8>, ReadAllError> {
    let size = up.size();
    if size > max {
        return Err(ReadAllError::Oversized(size));
    }
    let mut out = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    let step = 8 << 20;
    let mut at = 0;
    while at < size {
        let n = usize::try_from((size - at).min(step)).unwrap_or(0);
        let buf = up.read_at(at, n).await.map_err(ReadAllError::Upstream)?;
        out.extend_from_slice(&buf);
        at += n as u64;
    }
    Ok(out)
}

/// Where a trust anchor's manifest came from, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Given,
    Reused,
    Built,
}

/// A trust anchor's manifest (a root, or a node over a server that is not
/// herd): `given` if set, else the cache directory's copy while its stamp
/// still matches the image, else built from `upstream` and persisted.
///
/// # Errors
/// A given or persisted manifest that does not fit the image, or a build
/// or persist failure.
pub async fn for_anchor(
    upstream: Arc<dyn Upstream>,
    source: &UpstreamUrl,
    given: Option<&Path>,
    cache_dir: &Path,
    chunk_size: u32,
) -> Result<(Manifest, Origin), ManifestError> {
    let size = upstream.size();
    let stamp_now = stamp::Stamp::of(source, size);
    if let Some(path) = given {
        let m = load(path)?;
        m.fits(&path.display().to_string(), size, chunk_size)?;
        if stamp_matches(path, &m, stamp_now.as_ref()) == Some(false) {
            return Err(ManifestError::Stale {
                path: path.to_owned(),
            });
        }
        return Ok((m, Origin::Given));
    }
    let cached = cache_dir.join(CACHE_FILE);
    let mut candidates = vec![cached.clone()];
    if let UpstreamUrl::File(image) = source {
        candidates.push(beside(image));
    }
    for path in &candidates {
        let Ok(m) = load(path) else { continue };
        let fresh = match stamp_matches(path, &m, stamp_now.as_ref()) {
            Some(same) => same,
            // Nothing to compare for a LUN or an NBD server: reuse; a
            // changed source shows as digest failures, never wrong bytes.
            None => stamp_now.is_none(),
        };
        if fresh && m.fits("the cached manifest", size, chunk_size).is_ok() {
            return Ok((m, Origin::Reused));
        }
        tracing::info!(path = %path.display(), "manifest does not match the image as it is now; not used");
    }
    std::fs::create_dir_all(cache_dir).map_err(|source| ManifestError::Io {
        op: "creating",
        path: cache_dir.to_owned(),
        source,
    })?;
    let m = build_logged(upstream, chunk_size.min(DIGEST_CHUNK)).await?;
    save(&cached, &m)?;
    if let Some(mut s) = stamp_now {
        s.identity = m.identity().to_string();
        s.save(&stamp::path_for(&cached))?;
    }
    Ok((m, Origin::Built))
}

/// Builds with a progress line in the log every 10 % and the
/// `herd_manifest_build_bytes_total` metric.
///
/// # Errors
/// As [`build::build`].
pub async fn build_logged(
    upstream: Arc<dyn Upstream>,
    chunk_size: u32,
) -> Result<Manifest, ManifestError> {
    let size = upstream.size();
    let started = std::time::Instant::now();
    tracing::info!(image = %upstream.describe(), size, "building the image's manifest");
    let mut last = 0u64;
    let mut reported = 0u64;
    let m = build::build(upstream, chunk_size, |done, total| {
        crate::metrics::manifest_built(done - last);
        last = done;
        let decile = done * 10 / total.max(1);
        if decile > reported {
            reported = decile;
            tracing::info!(done, total, "manifest {}0 %", decile);
        }
    })
    .await?;
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        identity = %m.identity(),
        chunks = m.chunks(),
        seconds = secs,
        mib_per_s = size as f64 / (1 << 20) as f64 / secs.max(1e-9),
        "manifest built"
    );
    Ok(m)
}
