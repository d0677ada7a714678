//! Manifest v1 on disk and on the wire: a 64-byte header, then one
//! BLAKE3-256 digest per chunk (layout in DESIGN.md). Pure functions over
//! bytes; the decoder refuses anything it would have to guess about.

use std::fmt;

use thiserror::Error;

use crate::le::{u32_at, u64_at};

pub const MAGIC: [u8; 8] = *b"HERDMAN\0";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 64;
/// Digest algorithm 1: BLAKE3 with a 32-byte output.
pub const ALGO_BLAKE3_256: u32 = 1;
pub const DIGEST_LEN: usize = 32;
pub const MIN_CHUNK: u32 = 4 << 10;
pub const MAX_CHUNK: u32 = 32 << 20;

pub type Digest = [u8; DIGEST_LEN];

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("{len} bytes is shorter than a manifest header ({HEADER_LEN})")]
    Short { len: usize },
    #[error("not a herd manifest (bad magic)")]
    Magic,
    #[error("manifest format version {0}; this herd reads version {VERSION}")]
    Version(u32),
    #[error("manifest header length {0}; version 1 has {HEADER_LEN}")]
    HeaderLen(u32),
    #[error("digest algorithm {0} is unknown (1 = BLAKE3-256)")]
    Algorithm(u32),
    #[error("chunk size {0} is not a power of two between 4 KiB and 32 MiB")]
    ChunkSize(u32),
    #[error(
        "chunk count {count} does not fit a {size}-byte image in {chunk}-byte chunks ({expected})"
    )]
    Count {
        count: u64,
        size: u64,
        chunk: u32,
        expected: u64,
    },
    #[error("reserved header bytes are not zero")]
    Reserved,
    #[error("manifest is {len} bytes; a header and {count} digests make {expected}")]
    Length {
        len: usize,
        count: u64,
        expected: u64,
    },
}

/// An image's identity: the BLAKE3 of its manifest's bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Identity(pub Digest);

impl Identity {
    /// The first 12 hex digits, enough to tell images apart in a log line.
    #[must_use]
    pub fn short(&self) -> String {
        self.to_string()[..12].to_owned()
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({self})")
    }
}

/// A decoded, validated manifest. Keeps its encoded bytes (what the side
/// export serves, what the identity is computed over) and reads digests
/// out of them.
#[derive(Clone, PartialEq, Eq)]
pub struct Manifest {
    image_size: u64,
    chunk_size: u32,
    chunks: u64,
    bytes: Vec<u8>,
    identity: Identity,
}

impl fmt::Debug for Manifest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Manifest")
            .field("image_size", &self.image_size)
            .field("chunk_size", &self.chunk_size)
            .field("chunks", &self.chunks)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// ⌈size / chunk⌉.
#[must_use]
pub fn chunk_count(size: u64, chunk: u32) -> u64 {
    size.div_ceil(u64::from(chunk).max(1))
}

fn valid_chunk(chunk: u32) -> bool {
    chunk.is_power_of_two() && (MIN_CHUNK..=MAX_CHUNK).contains(&chunk)
}

impl Manifest {
    /// Builds a manifest from its digests, in chunk order.
    ///
    /// # Errors
    /// `ChunkSize` for an invalid chunk size, `Count` if the digests do not
    /// cover the image exactly.
    pub fn from_digests(
        image_size: u64,
        chunk_size: u32,
        digests: &[Digest],
    ) -> Result<Self, FormatError> {
        if !valid_chunk(chunk_size) {
            return Err(FormatError::ChunkSize(chunk_size));
        }
        let chunks = chunk_count(image_size, chunk_size);
        if digests.len() as u64 != chunks {
            return Err(FormatError::Count {
                count: digests.len() as u64,
                size: image_size,
                chunk: chunk_size,
                expected: chunks,
            });
        }
        let mut bytes = Vec::with_capacity(HEADER_LEN + digests.len() * DIGEST_LEN);
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&VERSION.to_le_bytes());
        bytes.extend_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        bytes.extend_from_slice(&ALGO_BLAKE3_256.to_le_bytes());
        bytes.extend_from_slice(&chunk_size.to_le_bytes());
        bytes.extend_from_slice(&image_size.to_le_bytes());
        bytes.extend_from_slice(&chunks.to_le_bytes());
        bytes.resize(HEADER_LEN, 0);
        for d in digests {
            bytes.extend_from_slice(d);
        }
        let identity = Identity(*blake3::hash(&bytes).as_bytes());
        Ok(Self {
            image_size,
            chunk_size,
            chunks,
            bytes,
            identity,
        })
    }

    /// Parses and validates a manifest.
    ///
    /// # Errors
    /// Every way the bytes can fail to be a version-1 manifest.
    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        if b.len() < HEADER_LEN {
            return Err(FormatError::Short { len: b.len() });
        }
        if b[..8] != MAGIC {
            return Err(FormatError::Magic);
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(FormatError::Version(version));
        }
        let hlen = u32_at(b, 12);
        if hlen as usize != HEADER_LEN {
            return Err(FormatError::HeaderLen(hlen));
        }
        let algo = u32_at(b, 16);
        if algo != ALGO_BLAKE3_256 {
            return Err(FormatError::Algorithm(algo));
        }
        let chunk_size = u32_at(b, 20);
        if !valid_chunk(chunk_size) {
            return Err(FormatError::ChunkSize(chunk_size));
        }
        let image_size = u64_at(b, 24);
        let count = u64_at(b, 32);
        let expected = chunk_count(image_size, chunk_size);
        if count != expected {
            return Err(FormatError::Count {
                count,
                size: image_size,
                chunk: chunk_size,
                expected,
            });
        }
        if b[40..HEADER_LEN].iter().any(|&x| x != 0) {
            return Err(FormatError::Reserved);
        }
        let want = count
            .checked_mul(DIGEST_LEN as u64)
            .and_then(|d| d.checked_add(HEADER_LEN as u64));
        if want != Some(b.len() as u64) {
            return Err(FormatError::Length {
                len: b.len(),
                count,
                expected: want.unwrap_or(u64::MAX),
            });
        }
        Ok(Self {
            image_size,
            chunk_size,
            chunks: count,
            bytes: b.to_vec(),
            identity: Identity(*blake3::hash(b).as_bytes()),
        })
    }

    #[must_use]
    pub fn image_size(&self) -> u64 {
        self.image_size
    }

    #[must_use]
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    #[must_use]
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    #[must_use]
    pub fn identity(&self) -> Identity {
        self.identity
    }

    /// The encoded manifest (what is persisted and served).
    #[must_use]
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The digest of chunk `i` (`None` past the end).
    #[must_use]
    pub fn digest(&self, i: u64) -> Option<&[u8]> {
        if i >= self.chunks {
            return None;
        }
        let at = HEADER_LEN + usize::try_from(i).ok()? * DIGEST_LEN;
        self.bytes.get(at..at + DIGEST_LEN)
    }

    /// Byte length of chunk `i` (the last one may be short).
    #[must_use]
    pub fn chunk_len(&self, i: u64) -> u64 {
        let cs = u64::from(self.chunk_size);
        self.image_size.saturating_sub(i * cs).min(cs)
    }

    /// Whether `data` is exactly chunk `i`'s bytes.
    #[must_use]
    pub fn check(&self, i: u64, data: &[u8]) -> bool {
        data.len() as u64 == self.chunk_len(i)
            && self
                .digest(i)
                .is_some_and(|d| d == blake3::hash(data).as_bytes())
    }

    /// Checks `data`, which starts at image offset `offset` (a multiple of
    /// the manifest's chunk size) and ends on a chunk boundary or at the
    /// image's end. Returns the manifest chunks that do not match; a range
    /// that is misaligned or runs past the image is all bad.
    #[must_use]
    pub fn bad_chunks(&self, offset: u64, data: &[u8]) -> Vec<u64> {
        let cs = u64::from(self.chunk_size);
        let end = offset.saturating_add(data.len() as u64);
        let first = offset / cs;
        let last = end.div_ceil(cs);
        let aligned =
            offset.is_multiple_of(cs) && (end.is_multiple_of(cs) || end == self.image_size);
        if !aligned || end > self.image_size {
            return (first..last.max(first + 1)).collect();
        }
        let mut bad = Vec::new();
        for i in first..last {
            let from = usize::try_from(i * cs - offset).unwrap_or(usize::MAX);
            let len = usize::try_from(self.chunk_len(i)).unwrap_or(usize::MAX);
            match data.get(from..from.saturating_add(len)) {
                Some(piece) if self.check(i, piece) => {}
                _ => bad.push(i),
            }
        }
        bad
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tiny() -> Manifest {
        // 10 KiB image in 4 KiB chunks: two full chunks and a 2 KiB tail.
        let img: Vec<u8> = (0..10240u32).map(|i| (i % 251) as u8).collect();
        let d: Vec<Digest> = img
            .chunks(4096)
            .map(|c| *blake3::hash(c).as_bytes())
            .collect();
        Manifest::from_digests(10240, 4096, &d).unwrap()
    }

    #[test]
    fn header_vector() {
        let m = tiny();
        let b = m.bytes();
        assert_eq!(b.len(), 64 + 3 * 32);
        assert_eq!(&b[..8], b"HERDMAN\0");
        assert_eq!(
            &b[8..24],
            &[1, 0, 0, 0, 64, 0, 0, 0, 1, 0, 0, 0, 0, 16, 0, 0]
        );
        assert_eq!(
            &b[24..40],
            &[0, 40, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0]
        );
        assert!(b[40..64].iter().all(|&x| x == 0));
        // BLAKE3 of the empty input, the reference implementation's vector.
        let empty = Manifest::from_digests(0, 4096, &[]).unwrap();
        assert_eq!(empty.chunks(), 0);
        assert_eq!(
            blake3::hash(b"").to_hex().as_str(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }

    #[test]
    fn round_trip_and_identity() {
        let m = tiny();
        let d = Manifest::decode(m.bytes()).unwrap();
        assert_eq!(d, m);
        assert_eq!(d.identity(), Identity(*blake3::hash(m.bytes()).as_bytes()));
        assert_eq!(d.identity().to_string().len(), 64);
        assert_eq!(d.identity().short().len(), 12);
        assert_eq!(d.chunk_len(2), 2048);
    }

    #[test]
    fn checks_chunks_and_runs() {
        let img: Vec<u8> = (0..10240u32).map(|i| (i % 251) as u8).collect();
        let m = tiny();
        assert!(m.bad_chunks(0, &img).is_empty());
        assert!(m.bad_chunks(4096, &img[4096..]).is_empty());
        let mut bad = img.clone();
        bad[5000] ^= 1;
        assert_eq!(m.bad_chunks(0, &bad), vec![1]);
        assert_eq!(m.bad_chunks(4096, &bad[4096..8192]), vec![1]);
        // Misaligned or past the end: never passes.
        assert_eq!(m.bad_chunks(100, &img[100..4196]), vec![0, 1]);
        assert!(!m.bad_chunks(8192, &[0u8; 4096]).is_empty());
        assert!(!m.check(2, &img[8192..8193]));
    }

    #[test]
    fn refusals() {
        let good = tiny().bytes().to_vec();
        let with = |at: usize, v: &[u8]| {
            let mut b = good.clone();
            b[at..at + v.len()].copy_from_slice(v);
            Manifest::decode(&b).unwrap_err()
        };
        assert_eq!(
            Manifest::decode(&good[..10]).unwrap_err(),
            FormatError::Short { len: 10 }
        );
        assert_eq!(with(0, b"HERDBMP\0"), FormatError::Magic);
        assert_eq!(with(8, &2u32.to_le_bytes()), FormatError::Version(2));
        assert_eq!(with(12, &128u32.to_le_bytes()), FormatError::HeaderLen(128));
        assert_eq!(with(16, &2u32.to_le_bytes()), FormatError::Algorithm(2));
        assert_eq!(
            with(20, &5000u32.to_le_bytes()),
            FormatError::ChunkSize(5000)
        );
        assert!(matches!(
            with(32, &4u64.to_le_bytes()),
            FormatError::Count { .. }
        ));
        assert!(matches!(
            with(24, &20000u64.to_le_bytes()),
            FormatError::Count { .. }
        ));
        assert_eq!(with(50, &[1]), FormatError::Reserved);
        assert!(matches!(
            Manifest::decode(&good[..good.len() - 1]).unwrap_err(),
            FormatError::Length { .. }
        ));
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(
            Manifest::decode(&long).unwrap_err(),
            FormatError::Length { .. }
        ));
        // A huge count must not overflow into acceptance.
        let mut b = good.clone();
        b[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        b[32..40].copy_from_slice(&(u64::MAX / 4096 + 1).to_le_bytes());
        assert!(Manifest::decode(&b).is_err());
        assert!(matches!(
            Manifest::from_digests(10240, 4096, &[[0; 32]]).unwrap_err(),
            FormatError::Count { .. }
        ));
    }
}
