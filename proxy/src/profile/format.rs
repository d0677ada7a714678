//! The on-disk (and on-wire) profile format, version 1. Pure functions over
//! bytes; fuzzed by `fuzz/fuzz_targets/profile.rs`.
//!
//! ```text
//! offset size  field (little endian)
//!      0    8  magic "HERDPRF\0"
//!      8    2  version = 1
//!     10    2  header length = 96 (readers skip what they do not know)
//!     12    4  granule (bytes)
//!     16    8  image size (bytes)
//!     24    8  extent count N
//!     32    8  recorded at (Unix seconds)
//!     40    4  CRC32C of the N extent records
//!     44    4  flags (0)
//!     48   32  image identity (see `identity`)
//!     80   16  reserved (0)
//!     96 24×N  extents: offset u64, length u64, first access µs u64
//! ```

use super::{Extent, ImageId, Profile, ProfileError};
use crate::le::{u16_at, u32_at, u64_at};

pub const MAGIC: [u8; 8] = *b"HERDPRF\0";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 96;
const EXTENT_LEN: usize = 24;

impl Profile {
    /// Serialises the profile.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(self.extents.len() * EXTENT_LEN);
        for e in &self.extents {
            body.extend_from_slice(&e.offset.to_le_bytes());
            body.extend_from_slice(&e.len.to_le_bytes());
            body.extend_from_slice(&e.at_us.to_le_bytes());
        }
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(HEADER_LEN as u16).to_le_bytes());
        out.extend_from_slice(&self.granule.to_le_bytes());
        out.extend_from_slice(&self.image_size.to_le_bytes());
        out.extend_from_slice(&(self.extents.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.recorded_at.to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.identity.0);
        out.extend_from_slice(&[0u8; 16]);
        out.extend_from_slice(&body);
        out
    }

    /// Parses and validates a profile.
    ///
    /// # Errors
    /// `Magic`, `Version`, `Truncated` or `Corrupt` (bad checksum, extent
    /// past the image end, zero length, or out of first-access order).
    pub fn decode(bytes: &[u8]) -> Result<Self, ProfileError> {
        if bytes.len() < 12 {
            return Err(ProfileError::Truncated("shorter than a header"));
        }
        if bytes[..8] != MAGIC {
            return Err(ProfileError::Magic);
        }
        let version = u16_at(bytes, 8);
        if version != VERSION {
            return Err(ProfileError::Version(version));
        }
        let header_len = usize::from(u16_at(bytes, 10));
        if header_len < HEADER_LEN {
            return Err(ProfileError::Corrupt(format!(
                "header length {header_len} < {HEADER_LEN}"
            )));
        }
        if bytes.len() < header_len {
            return Err(ProfileError::Truncated("shorter than its header"));
        }
        let granule = u32_at(bytes, 12);
        let image_size = u64_at(bytes, 16);
        let count = u64_at(bytes, 24);
        let recorded_at = u64_at(bytes, 32);
        let crc = u32_at(bytes, 40);
        let mut id = [0u8; 32];
        id.copy_from_slice(&bytes[48..80]);
        if granule == 0 {
            return Err(ProfileError::Corrupt("granule is 0".into()));
        }
        let body = &bytes[header_len..];
        let want = usize::try_from(count)
            .ok()
            .and_then(|n| n.checked_mul(EXTENT_LEN))
            .ok_or_else(|| ProfileError::Corrupt(format!("extent count {count} is absurd")))?;
        if body.len() < want {
            return Err(ProfileError::Truncated(
                "fewer extents than the header says",
            ));
        }
        if body.len() > want {
            return Err(ProfileError::Corrupt(format!(
                "{} bytes after the last extent",
                body.len() - want
            )));
        }
        if crc32c::crc32c(body) != crc {
            return Err(ProfileError::Corrupt("extent checksum mismatch".into()));
        }
        let mut extents = Vec::with_capacity(body.len() / EXTENT_LEN);
        let mut last_at = 0;
        for (i, rec) in body.chunks_exact(EXTENT_LEN).enumerate() {
            let e = Extent {
                offset: u64_at(rec, 0),
                len: u64_at(rec, 8),
                at_us: u64_at(rec, 16),
            };
            let inside = e
                .offset
                .checked_add(e.len)
                .is_some_and(|end| end <= image_size);
            if e.len == 0 || !inside {
                return Err(ProfileError::Corrupt(format!(
                    "extent {i} ({}+{}) is empty or past the image end {image_size}",
                    e.offset, e.len
                )));
            }
            if e.at_us < last_at {
                return Err(ProfileError::Corrupt(format!(
                    "extent {i} is out of first-access order"
                )));
            }
            last_at = e.at_us;
            extents.push(e);
        }
        Ok(Self {
            granule,
            image_size,
            identity: ImageId(id),
            recorded_at,
            extents,
        })
    }
}

/// Rewrites the checksum of an encoded profile to match its body, so
/// fuzzers and tests can reach the validation behind the checksum.
pub fn reseal(bytes: &mut [u8]) {
    if bytes.len() < HEADER_LEN || bytes[..8] != MAGIC {
        return;
    }
    let header_len = usize::from(u16_at(bytes, 10)).clamp(HEADER_LEN, bytes.len());
    let crc = crc32c::crc32c(&bytes[header_len..]);
    bytes[40..44].copy_from_slice(&crc.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Profile {
        Profile {
            granule: 4096,
            image_size: 1 << 20,
            identity: ImageId([7; 32]),
            recorded_at: 1_700_000_000,
            extents: vec![
                Extent {
                    offset: 0,
                    len: 8192,
                    at_us: 0,
                },
                Extent {
                    offset: 65536,
                    len: 4096,
                    at_us: 15,
                },
                Extent {
                    offset: 4096 * 200,
                    len: 4096 * 3,
                    at_us: 15,
                },
            ],
        }
    }

    #[test]
    fn round_trips_and_header_is_laid_out_as_documented() {
        let p = sample();
        let b = p.encode();
        assert_eq!(b.len(), HEADER_LEN + 3 * EXTENT_LEN);
        assert_eq!(&b[..8], b"HERDPRF\0");
        assert_eq!(u16_at(&b, 8), 1);
        assert_eq!(u16_at(&b, 10), 96);
        assert_eq!(u32_at(&b, 12), 4096);
        assert_eq!(u64_at(&b, 16), 1 << 20);
        assert_eq!(u64_at(&b, 24), 3);
        assert_eq!(&b[48..80], &[7u8; 32]);
        assert_eq!(u64_at(&b, HEADER_LEN + 24), 65536);
        assert_eq!(Profile::decode(&b).ok(), Some(p));
    }

    #[test]
    fn refuses_bad_input_with_the_reason() {
        let good = sample().encode();
        let err = |b: &[u8]| {
            Profile::decode(b)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(err(b"HERD").contains("shorter"));
        let mut b = good.clone();
        b[0] = b'X';
        assert!(err(&b).contains("magic"));
        let mut b = good.clone();
        b[8] = 2;
        assert!(err(&b).contains("version 2"));
        assert!(err(&good[..good.len() - 1]).contains("truncated"));
        let mut b = good.clone();
        b.push(0);
        assert!(err(&b).contains("after the last extent"));
        let mut b = good.clone();
        b[HEADER_LEN] ^= 1;
        assert!(err(&b).contains("checksum"));
        // A body with a valid checksum but an extent past the end.
        let mut p = sample();
        p.extents[1].offset = 1 << 20;
        assert!(err(&p.encode()).contains("past the image end"));
        let mut p = sample();
        p.extents[2].at_us = 1;
        assert!(err(&p.encode()).contains("order"));
        let mut b = good;
        b[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(err(&b).contains("absurd") || err(&b).contains("truncated"));
    }

    #[test]
    fn chunks_are_distinct_and_in_first_access_order() {
        let p = sample();
        assert_eq!(p.chunks(65536), vec![0, 1, 12]);
        assert_eq!(p.chunks(4096), vec![0, 1, 16, 200, 201, 202]);
        assert_eq!(p.bytes(), 8192 + 4096 + 3 * 4096);
    }
}
