//! An image's identity: SHA-256 over its size and [`SAMPLES`] blocks of
//! [`SAMPLE_LEN`] bytes spread evenly across it (first and last included).
//! Cheap enough to compute through any upstream at startup (128 KiB read),
//! and it changes when an image is rebuilt, which is what a profile needs
//! to know: whether its offsets still mean the same data.

use std::fmt;
use std::os::unix::fs::FileExt;

use sha2::{Digest, Sha256};

use crate::upstream::{Upstream, UpstreamError};

pub const SAMPLES: u64 = 32;
pub const SAMPLE_LEN: u64 = 4096;

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageId(pub [u8; 32]);

impl ImageId {
    /// The first 8 bytes in hex, enough to tell images apart in messages.
    #[must_use]
    pub fn short(&self) -> String {
        self.0[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImageId({})", self.short())
    }
}

impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Where the samples of an image of `size` bytes are taken, and how long.
#[must_use]
pub fn sample_ranges(size: u64) -> Vec<(u64, usize)> {
    if size == 0 {
        return Vec::new();
    }
    let len = SAMPLE_LEN.min(size);
    let span = size - len;
    let mut out: Vec<(u64, usize)> = (0..SAMPLES)
        .map(|i| {
            let at = span / (SAMPLES - 1) * i;
            // Block aligned except the last, which ends at the image end.
            let at = if i == SAMPLES - 1 {
                span
            } else {
                at / SAMPLE_LEN * SAMPLE_LEN
            };
            (at, usize::try_from(len).unwrap_or(0))
        })
        .collect();
    out.dedup();
    out
}

fn digest<'a>(size: u64, samples: impl Iterator<Item = &'a [u8]>) -> ImageId {
    let mut h = Sha256::new();
    h.update(b"herd-image-id-v1");
    h.update(size.to_le_bytes());
    for s in samples {
        h.update(s);
    }
    ImageId(h.finalize().into())
}

/// The identity of an image file or block device.
///
/// # Errors
/// The read error of a sample.
pub fn identity_of_file(file: &std::fs::File, size: u64) -> std::io::Result<ImageId> {
    let mut bufs = Vec::new();
    for (at, len) in sample_ranges(size) {
        let mut b = vec![0u8; len];
        file.read_exact_at(&mut b, at)?;
        bufs.push(b);
    }
    Ok(digest(size, bufs.iter().map(Vec::as_slice)))
}

/// The identity of the image behind an upstream (reads the samples from it,
/// not through the cache).
///
/// # Errors
/// The upstream's read error.
pub async fn identity_of_upstream(up: &dyn Upstream) -> Result<ImageId, UpstreamError> {
    let size = up.size();
    let mut bufs = Vec::new();
    for (at, len) in sample_ranges(size) {
        bufs.push(up.read_at(at, len).await?);
    }
    Ok(digest(size, bufs.iter().map(|b| &b[..])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_cover_both_ends_and_stay_inside() {
        let r = sample_ranges(1 << 30);
        assert_eq!(r.len(), 32);
        assert_eq!(r[0], (0, 4096));
        assert_eq!(r[31], ((1 << 30) - 4096, 4096));
        assert!(r
            .iter()
            .all(|(a, l)| a % 4096 == 0 && a + *l as u64 <= 1 << 30));
        assert_eq!(sample_ranges(100), vec![(0, 100)]);
        assert!(sample_ranges(0).is_empty());
    }

    #[test]
    fn identity_changes_with_a_sampled_byte_or_the_size() {
        let dir = std::env::temp_dir().join(format!("herd-id-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("img");
        let mut data = vec![0u8; 1 << 20];
        let _ = std::fs::write(&path, &data);
        let id = |p: &std::path::Path, size| {
            std::fs::File::open(p)
                .and_then(|f| identity_of_file(&f, size))
                .ok()
        };
        let a = id(&path, 1 << 20);
        data[(1 << 20) - 1] = 1;
        let _ = std::fs::write(&path, &data);
        let b = id(&path, 1 << 20);
        assert!(a.is_some() && b.is_some());
        assert_ne!(a, b);
        assert_ne!(b, id(&path, (1 << 20) - 4096));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
