//! Manifest v2 on disk and on the wire: a 64-byte header, one BLAKE3-256
//! digest per chunk, then the image's allocation map (one bit per granule:
//! may it hold data?). Layout in DESIGN.md. Pure functions over bytes; the
//! decoder refuses anything it would have to guess about.
//!
//! Together the two say where the image's holes are: a granule that is
//! not allocated reads as zeros (a hole), and a chunk whose digest is the
//! digest of zeros is zeros wherever it lies. No node fetches, stores or
//! sends either (DESIGN.md, "Holes").

use std::fmt;

use thiserror::Error;

use crate::le::{u32_at, u64_at};

pub const MAGIC: [u8; 8] = *b"HERDMAN\0";
pub const VERSION: u32 = 2;
pub const HEADER_LEN: usize = 64;
/// Digest algorithm 1: BLAKE3 with a 32-byte output.
pub const ALGO_BLAKE3_256: u32 = 1;
pub const DIGEST_LEN: usize = 32;
pub const MIN_CHUNK: u32 = 4 << 10;
pub const MAX_CHUNK: u32 = 32 << 20;
/// Allocation granule the builder uses: the file systems' block.
pub const GRANULE: u32 = 4096;
const MIN_GRANULE: u32 = 512;

/// Block-status flags of the NBD `base:allocation` context, which the
/// allocation map and the zero digests answer.
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;

pub type Digest = [u8; DIGEST_LEN];

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("{len} bytes is shorter than a manifest header ({HEADER_LEN})")]
    Short { len: usize },
    #[error("not a herd manifest (bad magic)")]
    Magic,
    #[error("manifest format version {0}; this herd reads version {VERSION}")]
    Version(u32),
    #[error("manifest header length {0}; version 2 has {HEADER_LEN}")]
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
    #[error(
        "allocation granule {granule} is not a power of two between 512 and the chunk size {chunk}"
    )]
    Granule { granule: u32, chunk: u32 },
    #[error(
        "manifest is {len} bytes; a header, {count} digests and the allocation map make {expected}"
    )]
    Length {
        len: usize,
        count: u64,
        expected: u64,
    },
    #[error("allocation map has bits set past the image's end")]
    MapTail,
    #[error("chunk {0} is all hole but its digest is not the digest of zeros")]
    HoleWithData(u64),
}

/// Which granules of an image may hold data (bit set) and which are holes
/// that read as zeros. Bit `g % 8` of byte `g / 8` is granule `g`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocMap {
    granule: u32,
    bits: Vec<u8>,
}

impl AllocMap {
    /// Every granule allocated: what is known of a source that cannot say.
    #[must_use]
    pub fn all(size: u64, granule: u32) -> Self {
        let n = size.div_ceil(u64::from(granule.max(1)));
        let mut bits = vec![0xff; map_len(size, granule)];
        clear_tail(&mut bits, n);
        Self { granule, bits }
    }

    /// Allocated exactly where `extents` (offset, length) lie, each widened
    /// to whole granules.
    #[must_use]
    pub fn from_extents(size: u64, granule: u32, extents: &[(u64, u64)]) -> Self {
        let g = u64::from(granule.max(1));
        let n = size.div_ceil(g);
        let mut bits = vec![0; map_len(size, granule)];
        for &(off, len) in extents {
            if len == 0 {
                continue;
            }
            let first = off / g;
            let last = off.saturating_add(len).div_ceil(g).min(n);
            for i in first..last {
                if let Some(b) = usize::try_from(i / 8).ok().and_then(|i| bits.get_mut(i)) {
                    *b |= 1 << (i % 8);
                }
            }
        }
        Self { granule, bits }
    }

    #[must_use]
    pub fn granule(&self) -> u32 {
        self.granule
    }

    /// Whether granule `g` may hold data (false past the end).
    #[must_use]
    pub fn is_set(&self, g: u64) -> bool {
        bit_set(&self.bits, g)
    }

    /// Whether any granule of bytes `from..to` may hold data.
    #[must_use]
    pub fn any_in(&self, from: u64, to: u64) -> bool {
        any_set(&self.bits, self.granule, from, to)
    }
}

/// Bit `g % 8` of byte `g / 8` of an allocation map (false past its end).
fn bit_set(bits: &[u8], g: u64) -> bool {
    usize::try_from(g / 8)
        .ok()
        .and_then(|i| bits.get(i))
        .is_some_and(|b| b & (1 << (g % 8)) != 0)
}

/// Whether any granule of bytes `from..to` is set in `bits`.
fn any_set(bits: &[u8], granule: u32, from: u64, to: u64) -> bool {
    let g = u64::from(granule.max(1));
    (from / g..to.div_ceil(g)).any(|i| bit_set(bits, i))
}

fn map_len(size: u64, granule: u32) -> usize {
    usize::try_from(size.div_ceil(u64::from(granule.max(1))).div_ceil(8)).unwrap_or(usize::MAX)
}

fn clear_tail(bits: &mut [u8], granules: u64) {
    if !granules.is_multiple_of(8) {
        if let Some(last) = bits.last_mut() {
            *last &= (1u8 << (granules % 8)) - 1;
        }
    }
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
    granule: u32,
    bytes: Vec<u8>,
    identity: Identity,
    /// Derived: bit `i` set when chunk `i`'s digest is that of zeros.
    zero: Vec<u64>,
    zero_count: u64,
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

/// The BLAKE3 of `len` zero bytes, streamed so a 32 MiB chunk costs no
/// 32 MiB buffer.
#[must_use]
pub fn zero_digest(len: u64) -> Digest {
    static Z: [u8; 64 << 10] = [0; 64 << 10];
    let mut h = blake3::Hasher::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(Z.len() as u64);
        h.update(&Z[..usize::try_from(n).unwrap_or(Z.len())]);
        left -= n;
    }
    *h.finalize().as_bytes()
}

impl Manifest {
    /// Builds a manifest from its digests, in chunk order, for an image
    /// whose allocation is unknown (every granule may hold data).
    ///
    /// # Errors
    /// As [`Manifest::with_allocation`].
    pub fn from_digests(
        image_size: u64,
        chunk_size: u32,
        digests: &[Digest],
    ) -> Result<Self, FormatError> {
        let map = AllocMap::all(image_size, GRANULE.min(chunk_size).max(MIN_GRANULE));
        Self::with_allocation(image_size, chunk_size, digests, &map)
    }

    /// Builds a manifest from its digests and the image's allocation map.
    ///
    /// # Errors
    /// `ChunkSize` for an invalid chunk size, `Count` if the digests do not
    /// cover the image exactly, `Granule`/`Length` for a map that does not
    /// fit, `HoleWithData` for a chunk that is all hole with another digest.
    pub fn with_allocation(
        image_size: u64,
        chunk_size: u32,
        digests: &[Digest],
        map: &AllocMap,
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
        let mut bytes = Vec::with_capacity(
            HEADER_LEN + digests.len() * DIGEST_LEN + map_len(image_size, map.granule),
        );
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&VERSION.to_le_bytes());
        bytes.extend_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        bytes.extend_from_slice(&ALGO_BLAKE3_256.to_le_bytes());
        bytes.extend_from_slice(&chunk_size.to_le_bytes());
        bytes.extend_from_slice(&image_size.to_le_bytes());
        bytes.extend_from_slice(&chunks.to_le_bytes());
        bytes.extend_from_slice(&map.granule.to_le_bytes());
        bytes.resize(HEADER_LEN, 0);
        for d in digests {
            bytes.extend_from_slice(d);
        }
        bytes.extend_from_slice(&map.bits);
        Self::decode(&bytes)
    }

    /// Parses and validates a manifest.
    ///
    /// # Errors
    /// Every way the bytes can fail to be a version-2 manifest.
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
        let granule = u32_at(b, 40);
        if !granule.is_power_of_two() || !(MIN_GRANULE..=chunk_size).contains(&granule) {
            return Err(FormatError::Granule {
                granule,
                chunk: chunk_size,
            });
        }
        if b[44..HEADER_LEN].iter().any(|&x| x != 0) {
            return Err(FormatError::Reserved);
        }
        let granules = image_size.div_ceil(u64::from(granule));
        let want = count
            .checked_mul(DIGEST_LEN as u64)
            .and_then(|d| d.checked_add(HEADER_LEN as u64))
            .and_then(|d| d.checked_add(granules.div_ceil(8)));
        if want != Some(b.len() as u64) {
            return Err(FormatError::Length {
                len: b.len(),
                count,
                expected: want.unwrap_or(u64::MAX),
            });
        }
        let map_at = HEADER_LEN + usize::try_from(count).unwrap_or(0) * DIGEST_LEN;
        let mut tail = b[map_at..].to_vec();
        clear_tail(&mut tail, granules);
        if tail != b[map_at..] {
            return Err(FormatError::MapTail);
        }
        let mut m = Self {
            image_size,
            chunk_size,
            chunks: count,
            granule,
            bytes: b.to_vec(),
            identity: Identity(*blake3::hash(b).as_bytes()),
            zero: vec![0; usize::try_from(count.div_ceil(64)).unwrap_or(0)],
            zero_count: 0,
        };
        let full = zero_digest(u64::from(chunk_size));
        let short = zero_digest(m.chunk_len(count.saturating_sub(1)));
        for i in 0..count {
            let z = if m.chunk_len(i) == u64::from(chunk_size) {
                &full
            } else {
                &short
            };
            if m.digest(i) == Some(&z[..]) {
                m.zero[usize::try_from(i / 64).unwrap_or(0)] |= 1 << (i % 64);
                m.zero_count += 1;
            } else {
                let from = i * u64::from(chunk_size);
                if !any_set(m.map_bits(), granule, from, from + m.chunk_len(i)) {
                    return Err(FormatError::HoleWithData(i));
                }
            }
        }
        Ok(m)
    }

    /// The allocation map (a copy of the manifest's tail).
    #[must_use]
    pub fn allocation(&self) -> AllocMap {
        AllocMap {
            granule: self.granule,
            bits: self.map_bits().to_vec(),
        }
    }

    /// The allocation map's bytes: the manifest's tail, after the digests.
    fn map_bits(&self) -> &[u8] {
        let at = HEADER_LEN + usize::try_from(self.chunks).unwrap_or(0) * DIGEST_LEN;
        self.bytes.get(at..).unwrap_or_default()
    }

    /// Whether chunk `i` is all zeros (its digest says so).
    #[must_use]
    pub fn is_zero(&self, i: u64) -> bool {
        usize::try_from(i / 64)
            .ok()
            .and_then(|w| self.zero.get(w))
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Chunks that are all zeros.
    #[must_use]
    pub fn zero_chunks(&self) -> u64 {
        self.zero_count
    }

    /// Bytes in chunks that are not all zeros: what moves to fill a cache.
    #[must_use]
    pub fn data_bytes(&self) -> u64 {
        (0..self.chunks)
            .filter(|&i| !self.is_zero(i))
            .map(|i| self.chunk_len(i))
            .sum()
    }

    #[must_use]
    pub fn granule(&self) -> u32 {
        self.granule
    }

    /// `base:allocation` status of `offset..offset + len` as (length,
    /// flags) descriptors: a hole is `HOLE | ZERO`, allocated bytes in a
    /// chunk of zeros `ZERO`, others 0. At most `max` descriptors (at least
    /// one), never past the range; empty for an empty or outside range.
    #[must_use]
    pub fn block_status(&self, offset: u64, len: u64, max: usize) -> Vec<(u32, u32)> {
        let end = offset.saturating_add(len).min(self.image_size);
        let g = u64::from(self.granule);
        let cs = u64::from(self.chunk_size);
        let mut out: Vec<(u32, u32)> = Vec::new();
        let mut at = offset;
        while at < end {
            let gi = at / g;
            let next = ((gi + 1) * g).min(end);
            let flags = if !bit_set(self.map_bits(), gi) {
                STATE_HOLE | STATE_ZERO
            } else if self.is_zero(at / cs) {
                STATE_ZERO
            } else {
                0
            };
            let n = next - at;
            let full = out.len() >= max.max(1);
            match out.last_mut() {
                Some((l, f)) if *f == flags && u64::from(*l) + n <= u64::from(u32::MAX) => {
                    *l += u32::try_from(n).unwrap_or(0);
                }
                _ if full => break,
                _ => out.push((u32::try_from(n).unwrap_or(0), flags)),
            }
            at = next;
        }
        out
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
        // Header, three digests, one byte of map for three granules.
        assert_eq!(b.len(), 64 + 3 * 32 + 1);
        assert_eq!(&b[..8], b"HERDMAN\0");
        assert_eq!(
            &b[8..24],
            &[2, 0, 0, 0, 64, 0, 0, 0, 1, 0, 0, 0, 0, 16, 0, 0]
        );
        assert_eq!(
            &b[24..40],
            &[0, 40, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(&b[40..44], &[0, 16, 0, 0]);
        assert!(b[44..64].iter().all(|&x| x == 0));
        assert_eq!(b[64 + 96], 0b111);
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

    /// 64 KiB image in 16 KiB chunks: data, zeros written out, a hole,
    /// then 8 KiB of data and an 8 KiB hole.
    fn sparse() -> (Vec<u8>, Manifest) {
        let mut img = vec![0u8; 64 << 10];
        for (i, b) in img[..16 << 10].iter_mut().enumerate() {
            *b = (i % 251) as u8 + 1;
        }
        img[(48 << 10)..(56 << 10)].fill(7);
        let d: Vec<Digest> = img
            .chunks(16 << 10)
            .map(|c| *blake3::hash(c).as_bytes())
            .collect();
        let map = AllocMap::from_extents(64 << 10, 4096, &[(0, 32 << 10), (48 << 10, 8 << 10)]);
        (
            img,
            Manifest::with_allocation(64 << 10, 16 << 10, &d, &map).unwrap(),
        )
    }

    #[test]
    fn holes_and_zero_chunks() {
        let (img, m) = sparse();
        assert_eq!(Manifest::decode(m.bytes()).unwrap(), m);
        assert!(!m.is_zero(0) && m.is_zero(1) && m.is_zero(2) && !m.is_zero(3));
        assert_eq!(m.zero_chunks(), 2);
        assert_eq!(m.data_bytes(), 32 << 10);
        assert_eq!(
            zero_digest(16 << 10),
            *blake3::hash(&[0; 16 << 10]).as_bytes()
        );
        assert!(m.bad_chunks(0, &img).is_empty());
        // data | allocated zeros | hole | data | hole, as NBD descriptors.
        let k = |n: u32| n << 10;
        assert_eq!(
            m.block_status(0, 64 << 10, 100),
            vec![
                (k(16), 0),
                (k(16), STATE_ZERO),
                (k(16), STATE_HOLE | STATE_ZERO),
                (k(8), 0),
                (k(8), STATE_HOLE | STATE_ZERO)
            ]
        );
        // Unaligned start and end, one descriptor, the end of the image.
        assert_eq!(
            m.block_status(100, (32 << 10) + 50, 100),
            vec![(k(16) - 100, 0), (k(16), STATE_ZERO), (150, 3)]
        );
        assert_eq!(m.block_status(0, 64 << 10, 1), vec![(k(16), 0)]);
        assert_eq!(m.block_status(60 << 10, 1 << 20, 9), vec![(k(4), 3)]);
        assert!(m.block_status(64 << 10, 10, 9).is_empty());
        // Unknown allocation: all "data", zero chunks still known.
        let d: Vec<Digest> = img
            .chunks(16 << 10)
            .map(|c| *blake3::hash(c).as_bytes())
            .collect();
        let all = Manifest::from_digests(64 << 10, 16 << 10, &d).unwrap();
        assert_eq!(all.zero_chunks(), 2);
        assert_eq!(
            all.block_status(0, 64 << 10, 100),
            vec![(k(16), 0), (k(32), STATE_ZERO), (k(16), 0)]
        );
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
        assert_eq!(with(8, &1u32.to_le_bytes()), FormatError::Version(1));
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
            with(40, &1000u32.to_le_bytes()),
            FormatError::Granule { .. }
        ));
        assert!(matches!(
            with(40, &8192u32.to_le_bytes()),
            FormatError::Granule { .. }
        ));
        // Bits past the last granule, and a hole that claims data.
        let last = good.len() - 1;
        assert_eq!(with(last, &[0b1111]), FormatError::MapTail);
        assert_eq!(with(last, &[0b101]), FormatError::HoleWithData(1));
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
        b[24..32].copy_from_slice(&(u64::MAX - 4095).to_le_bytes());
        b[32..40].copy_from_slice(&(u64::MAX / 4096).to_le_bytes());
        assert!(Manifest::decode(&b).is_err());
        assert!(matches!(
            Manifest::from_digests(10240, 4096, &[[0; 32]]).unwrap_err(),
            FormatError::Count { .. }
        ));
    }
}
