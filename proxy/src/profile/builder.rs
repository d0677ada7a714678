//! Turns a stream of reads into a profile: each byte is kept at its first
//! access only, and reads that continue the previous extent extend it.

use super::{Extent, ImageId, Profile, ProfileError};

/// Longest extent a continuation may grow to: keeps first-access times
/// meaningful at this resolution for long sequential reads.
pub const MAX_EXTENT: u64 = 1 << 20;

/// Accumulates reads in arrival order.
pub struct ProfileBuilder {
    granule: u64,
    image_size: u64,
    /// One bit per granule: already in some extent.
    seen: Vec<u64>,
    extents: Vec<Extent>,
}

impl ProfileBuilder {
    #[must_use]
    pub fn new(image_size: u64, granule: u32) -> Self {
        let granule = u64::from(granule.max(1));
        let granules = image_size.div_ceil(granule);
        Self {
            granule,
            image_size,
            seen: vec![0; usize::try_from(granules.div_ceil(64)).unwrap_or(0)],
            extents: Vec::new(),
        }
    }

    fn test_and_set(&mut self, g: u64) -> bool {
        let (w, b) = ((g / 64) as usize, g % 64);
        let was = self.seen[w] >> b & 1 == 1;
        self.seen[w] |= 1 << b;
        was
    }

    /// Records a read of `len` bytes at `offset`, `at_us` after the start.
    /// Parts outside the image are ignored; parts already seen are dropped.
    pub fn add(&mut self, offset: u64, len: u64, at_us: u64) {
        let end = offset.saturating_add(len).min(self.image_size);
        if offset >= end {
            return;
        }
        let mut run: Option<(u64, u64)> = None;
        for g in offset / self.granule..=(end - 1) / self.granule {
            if self.test_and_set(g) {
                if let Some((s, e)) = run.take() {
                    self.push(s, e, at_us);
                }
                continue;
            }
            let g_end = ((g + 1) * self.granule).min(self.image_size);
            run = match run {
                Some((s, _)) => Some((s, g_end)),
                None => Some((g * self.granule, g_end)),
            };
        }
        if let Some((s, e)) = run {
            self.push(s, e, at_us);
        }
    }

    fn push(&mut self, start: u64, end: u64, at_us: u64) {
        // Keep times non-decreasing even if the caller's clock is not.
        let at_us = at_us.max(self.extents.last().map_or(0, |l| l.at_us));
        if let Some(last) = self.extents.last_mut() {
            if last.end() == start && last.len + (end - start) <= MAX_EXTENT {
                last.len += end - start;
                return;
            }
        }
        self.extents.push(Extent {
            offset: start,
            len: end - start,
            at_us,
        });
    }

    /// Bytes recorded so far.
    #[must_use]
    pub fn bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.len).sum()
    }

    /// The profile so far, leaving the builder usable.
    #[must_use]
    pub fn snapshot(&self, identity: ImageId, recorded_at: u64) -> Profile {
        Profile {
            granule: u32::try_from(self.granule).unwrap_or(u32::MAX),
            image_size: self.image_size,
            identity,
            recorded_at,
            extents: self.extents.clone(),
        }
    }

    #[must_use]
    pub fn finish(self, identity: ImageId, recorded_at: u64) -> Profile {
        Profile {
            granule: u32::try_from(self.granule).unwrap_or(u32::MAX),
            image_size: self.image_size,
            identity,
            recorded_at,
            extents: self.extents,
        }
    }
}

/// The union of several recordings of one image: every byte any of them
/// read, ordered by the earliest time any of them first read it.
///
/// # Errors
/// `Empty` for no input; `Mismatch` if the image size, identity or granule
/// differ.
pub fn merge(profiles: &[Profile]) -> Result<Profile, ProfileError> {
    let first = profiles.first().ok_or(ProfileError::Empty)?;
    if profiles.iter().any(|p| {
        p.image_size != first.image_size
            || p.identity != first.identity
            || p.granule != first.granule
    }) {
        return Err(ProfileError::Mismatch);
    }
    let mut all: Vec<Extent> = profiles
        .iter()
        .flat_map(|p| p.extents.iter().copied())
        .collect();
    // Stable: equal times keep each recording's own order.
    all.sort_by_key(|e| e.at_us);
    let mut b = ProfileBuilder::new(first.image_size, first.granule);
    for e in all {
        b.add(e.offset, e.len, e.at_us);
    }
    let recorded_at = profiles.iter().map(|p| p.recorded_at).max().unwrap_or(0);
    Ok(b.finish(first.identity, recorded_at))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, len: u64, at_us: u64) -> Extent {
        Extent { offset, len, at_us }
    }

    #[test]
    fn keeps_first_access_only_and_coalesces_continuations() {
        let mut b = ProfileBuilder::new(1 << 20, 4096);
        b.add(8192, 4096, 1);
        b.add(12288, 8192, 2); // continues: one extent
        b.add(0, 16384, 3); // 0..8192 new, 8192..16384 seen
        b.add(1 << 20, 4096, 4); // outside: ignored
        b.add((1 << 20) - 100, 4096, 5); // clipped to the image end
        let p = b.finish(ImageId([0; 32]), 0);
        assert_eq!(
            p.extents,
            vec![
                ext(8192, 12288, 1),
                ext(0, 8192, 3),
                ext((1 << 20) - 4096, 4096, 5)
            ]
        );
    }

    #[test]
    fn unaligned_reads_round_out_to_granules() {
        let mut b = ProfileBuilder::new(10_000, 4096);
        b.add(5000, 10, 0);
        b.add(9000, 5000, 1);
        let p = b.finish(ImageId([0; 32]), 0);
        // The second read continues the first: one extent, to the end.
        assert_eq!(p.extents, vec![ext(4096, 10_000 - 4096, 0)]);
    }

    #[test]
    fn a_long_sequential_read_keeps_time_resolution() {
        let mut b = ProfileBuilder::new(4 << 20, 4096);
        for i in 0..1024u64 {
            b.add(i * 4096, 4096, i);
        }
        let p = b.finish(ImageId([0; 32]), 0);
        let got: Vec<(u64, u64, u64)> = p
            .extents
            .iter()
            .map(|e| (e.offset, e.len, e.at_us))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 1 << 20, 0),
                (1 << 20, 1 << 20, 256),
                (2 << 20, 1 << 20, 512),
                (3 << 20, 1 << 20, 768)
            ]
        );
    }

    #[test]
    fn merge_is_a_union_in_earliest_order() {
        let id = ImageId([1; 32]);
        let a = Profile {
            granule: 4096,
            image_size: 1 << 20,
            identity: id,
            recorded_at: 5,
            extents: vec![ext(0, 4096, 0), ext(40960, 4096, 100)],
        };
        let b = Profile {
            recorded_at: 9,
            extents: vec![ext(81920, 4096, 10), ext(40960, 8192, 50)],
            ..a.clone()
        };
        let m = merge(&[a.clone(), b]).ok();
        assert_eq!(
            m.map(|m| (m.extents, m.recorded_at)),
            Some((
                vec![ext(0, 4096, 0), ext(81920, 4096, 10), ext(40960, 8192, 50)],
                9
            ))
        );
        let other = Profile {
            identity: ImageId([2; 32]),
            ..a.clone()
        };
        assert!(matches!(merge(&[a, other]), Err(ProfileError::Mismatch)));
        assert!(matches!(merge(&[]), Err(ProfileError::Empty)));
    }
}
