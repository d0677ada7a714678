//! Turns a boot profile into a replay schedule. Pure: no I/O, no clock.
//!
//! A profile holds each extent's first-access time, not when its read
//! completed. The replay model (DESIGN.md, "Boot replay"):
//!
//! ```text
//!  recorded  ─a─b─────────c───d─e──────────f──▶ time
//!  bursts     [a b]  gap   [c] [d e]  gap   [f]
//!  replay     a,b in flight together; c waits until a and b are done,
//!             then the recorded gap b→c (the guest's own compute), …
//! ```
//!
//! - Reads that began within `overlap` of the first read of their burst
//!   were in flight together in the recording and are issued together.
//! - A burst starts when the previous burst has completed and its gap has
//!   passed: the gap is the recorded time from the previous burst's last
//!   issue to this burst's first, times `time_scale`. Recorded gaps include
//!   the recording's own (local, fast) service time, so a replay against
//!   local data lasts about as long as the recorded boot.
//! - `image_scale` K maps the trace onto a K× larger image of the same
//!   shape: offsets and lengths ×K, gaps unchanged. Reads longer than
//!   `max_read` are split into pieces issued together.

use std::time::Duration;

use thiserror::Error;

use crate::profile::Profile;

/// How to stretch a recorded trace.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scaling {
    /// Multiplies every gap (0.5 replays a boot twice as fast).
    pub time_scale: f64,
    /// Multiplies offsets, lengths and the image size.
    pub image_scale: u64,
    /// Reads issued within this long of their burst's first read overlap.
    pub overlap: Duration,
    /// Longest single read request.
    pub max_read: u64,
}

impl Default for Scaling {
    fn default() -> Self {
        Self {
            time_scale: 1.0,
            image_scale: 1,
            overlap: DEFAULT_OVERLAP,
            max_read: 1 << 20,
        }
    }
}

/// Reads that start within 1 ms of each other were in flight together: a
/// TCG guest's next dependent read comes ≥ 1 ms after the previous one
/// completes (recorded Debian boot: DESIGN.md).
pub const DEFAULT_OVERLAP: Duration = Duration::from_millis(1);

/// One read request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Read {
    pub offset: u64,
    pub len: u64,
}

/// Reads issued together after a think time.
#[derive(Clone, Debug, PartialEq)]
pub struct Burst {
    /// Think time after the previous burst completed.
    pub gap: Duration,
    pub reads: Vec<Read>,
}

/// A whole boot.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    pub image_size: u64,
    pub bursts: Vec<Burst>,
}

impl Schedule {
    /// Bytes the boot reads.
    #[must_use]
    pub fn bytes(&self) -> u64 {
        self.bursts
            .iter()
            .flat_map(|b| &b.reads)
            .map(|r| r.len)
            .sum()
    }

    /// Read requests the boot issues.
    #[must_use]
    pub fn requests(&self) -> usize {
        self.bursts.iter().map(|b| b.reads.len()).sum()
    }

    /// Sum of the think times: how long the boot lasts with instant I/O.
    #[must_use]
    pub fn think_time(&self) -> Duration {
        self.bursts.iter().map(|b| b.gap).sum()
    }
}

#[derive(Debug, Error, PartialEq)]
pub enum ScheduleError {
    #[error("time scale {0} must be a positive finite number")]
    TimeScale(f64),
    #[error("image scale must be at least 1")]
    ImageScale,
    #[error("maximum read size must be at least 4096 bytes")]
    MaxRead,
    #[error("image scale {scale} overflows the {size}-byte image")]
    Overflow { scale: u64, size: u64 },
    #[error("the profile has no extents: nothing to replay")]
    Empty,
}

/// Builds the schedule of one boot.
///
/// # Errors
/// A bad scaling factor, an overflow, or an empty profile.
pub fn schedule(profile: &Profile, s: &Scaling) -> Result<Schedule, ScheduleError> {
    if !(s.time_scale.is_finite() && s.time_scale > 0.0) {
        return Err(ScheduleError::TimeScale(s.time_scale));
    }
    if s.image_scale == 0 {
        return Err(ScheduleError::ImageScale);
    }
    if s.max_read < 4096 {
        return Err(ScheduleError::MaxRead);
    }
    let overflow = ScheduleError::Overflow {
        scale: s.image_scale,
        size: profile.image_size,
    };
    let image_size = profile
        .image_size
        .checked_mul(s.image_scale)
        .ok_or(overflow)?;
    let overlap_us = u64::try_from(s.overlap.as_micros()).unwrap_or(u64::MAX);
    let mut bursts: Vec<Burst> = Vec::new();
    // (first issue, last issue) of the burst being built.
    let mut span: Option<(u64, u64)> = None;
    for e in &profile.extents {
        // Profiles are validated to end within the image, so these fit.
        let offset = e.offset * s.image_scale;
        let len = e.len * s.image_scale;
        let joins = matches!(span, Some((first, _)) if e.at_us.saturating_sub(first) <= overlap_us);
        match (joins, span, bursts.last_mut()) {
            (true, Some((first, _)), Some(b)) => {
                split_into(&mut b.reads, offset, len, s.max_read);
                span = Some((first, e.at_us));
            }
            _ => {
                let gap_us = span.map_or(0, |(_, last)| e.at_us.saturating_sub(last));
                #[allow(clippy::cast_precision_loss)] // µs gaps are far below 2^52
                let gap = Duration::from_secs_f64(gap_us as f64 * s.time_scale / 1e6);
                let mut reads = Vec::new();
                split_into(&mut reads, offset, len, s.max_read);
                bursts.push(Burst { gap, reads });
                span = Some((e.at_us, e.at_us));
            }
        }
    }
    if bursts.is_empty() {
        return Err(ScheduleError::Empty);
    }
    Ok(Schedule { image_size, bursts })
}

fn split_into(out: &mut Vec<Read>, mut offset: u64, mut len: u64, max: u64) {
    while len > 0 {
        let n = len.min(max);
        out.push(Read { offset, len: n });
        offset += n;
        len -= n;
    }
}

/// The profile of the same boot on a K× larger image: offsets and lengths
/// ×K, times unchanged (identity left to the caller, who knows the image).
///
/// # Errors
/// `ImageScale` for 0, `Overflow` when the scaled image does not fit u64.
pub fn scale_profile(profile: &Profile, k: u64) -> Result<Profile, ScheduleError> {
    if k == 0 {
        return Err(ScheduleError::ImageScale);
    }
    let image_size = profile
        .image_size
        .checked_mul(k)
        .ok_or(ScheduleError::Overflow {
            scale: k,
            size: profile.image_size,
        })?;
    let granule = u32::try_from(u64::from(profile.granule) * k).unwrap_or(profile.granule);
    let mut p = profile.clone();
    p.image_size = image_size;
    p.granule = granule;
    for e in &mut p.extents {
        e.offset *= k;
        e.len *= k;
    }
    Ok(p)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap fails the test, as it should
mod tests {
    use super::*;
    use crate::profile::{Extent, ImageId};

    fn profile(extents: &[(u64, u64, u64)]) -> Profile {
        Profile {
            granule: 4096,
            image_size: 1 << 30,
            identity: ImageId([7; 32]),
            recorded_at: 0,
            extents: extents
                .iter()
                .map(|&(offset, len, at_us)| Extent { offset, len, at_us })
                .collect(),
        }
    }

    fn reads(b: &Burst) -> Vec<(u64, u64)> {
        b.reads.iter().map(|r| (r.offset, r.len)).collect()
    }

    #[test]
    fn overlapping_reads_form_one_burst_and_gaps_are_think_time() {
        // a,b within 1 ms; c 10 ms after b; d 400 µs after c; e 2 s later.
        let p = profile(&[
            (0, 4096, 0),
            (8192, 4096, 500),
            (65536, 8192, 10_500),
            (1 << 20, 4096, 10_900),
            (1 << 21, 4096, 2_010_900),
        ]);
        let s = schedule(&p, &Scaling::default()).unwrap();
        assert_eq!(s.bursts.len(), 3);
        assert_eq!(reads(&s.bursts[0]), vec![(0, 4096), (8192, 4096)]);
        assert_eq!(s.bursts[0].gap, Duration::ZERO);
        assert_eq!(reads(&s.bursts[1]), vec![(65536, 8192), (1 << 20, 4096)]);
        assert_eq!(s.bursts[1].gap, Duration::from_millis(10));
        assert_eq!(reads(&s.bursts[2]), vec![(1 << 21, 4096)]);
        assert_eq!(s.bursts[2].gap, Duration::from_secs(2));
        assert_eq!(s.bytes(), 4096 * 4 + 8192);
        assert_eq!(s.requests(), 5);
        assert_eq!(s.think_time(), Duration::from_millis(2010));
    }

    #[test]
    fn a_burst_spans_at_most_the_overlap_window_from_its_first_read() {
        // Each read 600 µs after the previous: chained, but the third is
        // 1.2 ms after the first, so it starts a new burst.
        let p = profile(&[(0, 4096, 0), (4096 * 2, 4096, 600), (4096 * 4, 4096, 1200)]);
        let s = schedule(&p, &Scaling::default()).unwrap();
        assert_eq!(s.bursts.len(), 2);
        assert_eq!(s.bursts[0].reads.len(), 2);
        assert_eq!(s.bursts[1].gap, Duration::from_micros(600));
    }

    #[test]
    fn order_is_kept_within_and_across_bursts() {
        let p = profile(&[
            (9 << 20, 4096, 0),
            (1 << 20, 4096, 100),
            (5 << 20, 4096, 50_000),
            (2 << 20, 4096, 90_000),
        ]);
        let s = schedule(&p, &Scaling::default()).unwrap();
        let flat: Vec<u64> = s
            .bursts
            .iter()
            .flat_map(|b| b.reads.iter().map(|r| r.offset))
            .collect();
        assert_eq!(flat, vec![9 << 20, 1 << 20, 5 << 20, 2 << 20]);
    }

    #[test]
    fn time_scale_multiplies_gaps_only() {
        let p = profile(&[(0, 4096, 0), (4096, 4096, 100_000), (8192, 4096, 300_000)]);
        let s = schedule(
            &p,
            &Scaling {
                time_scale: 0.5,
                ..Scaling::default()
            },
        )
        .unwrap();
        assert_eq!(s.bursts[1].gap, Duration::from_millis(50));
        assert_eq!(s.bursts[2].gap, Duration::from_millis(100));
        assert_eq!(s.bytes(), 3 * 4096);
    }

    #[test]
    fn image_scale_multiplies_offsets_lengths_and_size_and_splits_long_reads() {
        let p = profile(&[(4096, 1 << 20, 0), (1 << 22, 4096, 5000)]);
        let s = schedule(
            &p,
            &Scaling {
                image_scale: 3,
                ..Scaling::default()
            },
        )
        .unwrap();
        assert_eq!(s.image_size, 3 << 30);
        // 3 MiB at 12 KiB, split into 1 MiB pieces issued together.
        assert_eq!(
            reads(&s.bursts[0]),
            vec![
                (12288, 1 << 20),
                (12288 + (1 << 20), 1 << 20),
                (12288 + (2 << 20), 1 << 20)
            ]
        );
        assert_eq!(reads(&s.bursts[1]), vec![(3 << 22, 12288)]);
        assert_eq!(s.bursts[1].gap, Duration::from_millis(5));
        assert_eq!(s.bytes(), 3 * ((1 << 20) + 4096));
    }

    #[test]
    fn scaled_profile_matches_scaled_schedule() {
        let p = profile(&[(4096, 8192, 0), (1 << 22, 4096, 5000)]);
        let big = scale_profile(&p, 4).unwrap();
        assert_eq!(big.image_size, 4 << 30);
        assert_eq!(big.granule, 4 * 4096);
        assert_eq!(
            big.extents[0],
            Extent {
                offset: 16384,
                len: 32768,
                at_us: 0
            }
        );
        let a = schedule(&big, &Scaling::default()).unwrap();
        let b = schedule(
            &p,
            &Scaling {
                image_scale: 4,
                ..Scaling::default()
            },
        )
        .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn bad_scalings_and_empty_profiles_are_refused() {
        let p = profile(&[(0, 4096, 0)]);
        for (s, want) in [
            (
                Scaling {
                    time_scale: 0.0,
                    ..Scaling::default()
                },
                ScheduleError::TimeScale(0.0),
            ),
            (
                Scaling {
                    image_scale: 0,
                    ..Scaling::default()
                },
                ScheduleError::ImageScale,
            ),
            (
                Scaling {
                    max_read: 512,
                    ..Scaling::default()
                },
                ScheduleError::MaxRead,
            ),
        ] {
            assert_eq!(schedule(&p, &s), Err(want));
        }
        assert_eq!(
            schedule(
                &p,
                &Scaling {
                    image_scale: u64::MAX,
                    ..Scaling::default()
                }
            ),
            Err(ScheduleError::Overflow {
                scale: u64::MAX,
                size: 1 << 30
            })
        );
        assert_eq!(
            schedule(&profile(&[]), &Scaling::default()),
            Err(ScheduleError::Empty)
        );
    }
}
