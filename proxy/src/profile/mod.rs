//! Boot profiles: which bytes of an image a boot reads, in the order it
//! first reads them.
//!
//! A profile is recorded once (by the eBPF recorder in `record`, or by the
//! daemon watching its own clients), stored in the versioned binary format
//! of [`format`], merged with others of the same image, and handed to the
//! root proxy, which passes it down the tree for every proxy to prefetch
//! (`prefetch`).

mod builder;
mod format;
mod identity;
mod summary;

pub use builder::{merge, ProfileBuilder};
pub use format::{reseal, HEADER_LEN, MAGIC, VERSION};
pub use identity::{identity_of_file, identity_of_upstream, ImageId, SAMPLES, SAMPLE_LEN};
pub use summary::Summary;

use thiserror::Error;

/// One extent, first read `at_us` microseconds after recording started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub at_us: u64,
}

impl Extent {
    #[must_use]
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// A decoded profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    /// Recording granularity: extents are whole multiples of it (the last
    /// one may end at the image's end). Proxies round to their own chunks.
    pub granule: u32,
    pub image_size: u64,
    pub identity: ImageId,
    /// Unix seconds when the recording ended.
    pub recorded_at: u64,
    /// In first-access order (non-decreasing `at_us`), not overlapping.
    pub extents: Vec<Extent>,
}

impl Profile {
    /// Bytes the extents cover.
    #[must_use]
    pub fn bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.len).sum()
    }

    /// The distinct chunks of `chunk_size` the profile touches, in the order
    /// they are first needed.
    #[must_use]
    pub fn chunks(&self, chunk_size: u64) -> Vec<u64> {
        let chunk_size = chunk_size.max(1);
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for e in &self.extents {
            if e.len == 0 {
                continue;
            }
            for c in e.offset / chunk_size..=(e.end() - 1) / chunk_size {
                if seen.insert(c) {
                    out.push(c);
                }
            }
        }
        out
    }

    /// Writes the encoded profile to `path` atomically (temporary file,
    /// fsync, rename), so a reader never sees half a profile.
    ///
    /// # Errors
    /// The file system's error.
    pub fn save(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::io::Write as _;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp);
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&self.encode())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }

    /// Refuses a profile recorded on another image.
    ///
    /// # Errors
    /// `WrongImage` naming both sizes and identities.
    pub fn check_image(&self, size: u64, identity: &ImageId) -> Result<(), ProfileError> {
        if self.image_size != size || &self.identity != identity {
            return Err(ProfileError::WrongImage {
                profile_size: self.image_size,
                profile_id: self.identity.short(),
                image_size: size,
                image_id: identity.short(),
            });
        }
        Ok(())
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
#[must_use]
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Debug, Error)]
pub enum ProfileError {
    #[error("not a herd profile (bad magic)")]
    Magic,
    #[error("profile format version {0} is not supported (this herd reads version {VERSION})")]
    Version(u16),
    #[error("profile is truncated: {0}")]
    Truncated(&'static str),
    #[error("profile is corrupt: {0}")]
    Corrupt(String),
    #[error(
        "profile was recorded on another image ({profile_size} bytes, id {profile_id}); \
         this image is {image_size} bytes, id {image_id}"
    )]
    WrongImage {
        profile_size: u64,
        profile_id: String,
        image_size: u64,
        image_id: String,
    },
    #[error("cannot merge profiles of different images or granules")]
    Mismatch,
    #[error("no profiles to merge")]
    Empty,
}
