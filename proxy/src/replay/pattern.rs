//! A seeded synthetic image: every byte is a function of (seed, offset), so a
//! replay checks what it reads without the image at hand, and a benchmark
//! image of any size is written at memory speed.
//!
//! ```text
//!  block b (4 KiB) = 512 little-endian u64 words
//!  key(b)   = mix(seed ^ mix(b))          (splitmix64 finaliser)
//!  word[i]  = key(b) + i · 0x9E37_79B9_7F4A_7C15
//! ```
//!
//! Two blocks never share a key in practice (64-bit keys), and every word of
//! a block differs, so a byte served from the wrong offset, a stale block or
//! a flipped bit all fail the check.

const BLOCK: u64 = 4096;
const STEP: u64 = 0x9E37_79B9_7F4A_7C15;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn word(seed: u64, word_index: u64) -> u64 {
    let block = word_index / (BLOCK / 8);
    let i = word_index % (BLOCK / 8);
    mix(seed ^ mix(block)).wrapping_add(i.wrapping_mul(STEP))
}

/// Fills `buf` with the image's bytes at `offset`.
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    let mut pos = offset;
    let mut rest = buf;
    while !rest.is_empty() {
        let w = word(seed, pos / 8).to_le_bytes();
        let skip = (pos % 8) as usize;
        let n = (8 - skip).min(rest.len());
        rest[..n].copy_from_slice(&w[skip..skip + n]);
        rest = &mut rest[n..];
        pos += n as u64;
    }
}

/// The first offset at which `data` (read at `offset`) differs from the
/// image, or `None` when every byte is right.
#[must_use]
pub fn first_mismatch(seed: u64, offset: u64, data: &[u8]) -> Option<u64> {
    // Fast path: whole words, one key per block.
    if offset.is_multiple_of(8) && data.len().is_multiple_of(8) {
        let mut key_block = u64::MAX;
        let mut key = 0;
        for (n, chunk) in data.chunks_exact(8).enumerate() {
            let wi = offset / 8 + n as u64;
            let block = wi / (BLOCK / 8);
            if block != key_block {
                key_block = block;
                key = mix(seed ^ mix(block));
            }
            let want = key.wrapping_add((wi % (BLOCK / 8)).wrapping_mul(STEP));
            let mut got = [0u8; 8];
            got.copy_from_slice(chunk);
            if u64::from_le_bytes(got) != want {
                let bad = want
                    .to_le_bytes()
                    .iter()
                    .zip(chunk)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                return Some(offset + 8 * n as u64 + bad as u64);
            }
        }
        return None;
    }
    let mut want = vec![0u8; data.len()];
    fill(seed, offset, &mut want);
    want.iter()
        .zip(data)
        .position(|(a, b)| a != b)
        .map(|i| offset + i as u64)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap fails the test, as it should
mod tests {
    use super::*;

    #[test]
    fn fill_is_a_function_of_offset_whatever_the_alignment() {
        let mut whole = vec![0u8; 3 * 4096];
        fill(42, 0, &mut whole);
        for (off, len) in [(0, 1), (5, 13), (4090, 20), (8191, 4097), (1, 12286)] {
            let mut part = vec![0u8; len];
            fill(42, off as u64, &mut part);
            assert_eq!(part, whole[off..off + len], "offset {off} length {len}");
            assert_eq!(first_mismatch(42, off as u64, &part), None);
        }
    }

    #[test]
    fn seeds_and_blocks_differ() {
        let (mut a, mut b, mut c) = (vec![0u8; 4096], vec![0u8; 4096], vec![0u8; 4096]);
        fill(1, 0, &mut a);
        fill(2, 0, &mut b);
        fill(1, 4096, &mut c);
        assert_ne!(a, b);
        assert_ne!(a, c);
        // No two words of a block are equal.
        let mut words: Vec<&[u8]> = a.chunks(8).collect();
        words.sort_unstable();
        words.dedup();
        assert_eq!(words.len(), 512);
    }

    #[test]
    fn every_kind_of_damage_is_found_at_its_offset() {
        let mut good = vec![0u8; 8192];
        fill(9, 65536, &mut good);
        // A flipped bit.
        let mut bad = good.clone();
        bad[5000] ^= 0x10;
        assert_eq!(first_mismatch(9, 65536, &bad), Some(65536 + 5000));
        // The right bytes from the wrong offset (a misplaced block).
        assert_eq!(first_mismatch(9, 65536 + 4096, &good), Some(65536 + 4096));
        // Another image (seed) of the same size.
        assert_eq!(first_mismatch(10, 65536, &good), Some(65536));
        // Zeros, as a hole or an unfetched chunk reads.
        assert!(first_mismatch(9, 0, &[0u8; 4096]).is_some());
        // The unaligned path finds damage too.
        assert_eq!(first_mismatch(9, 65537, &bad[1..4097]), None);
        assert_eq!(first_mismatch(9, 65537, &bad[1..6000]), Some(65536 + 5000));
    }
}
