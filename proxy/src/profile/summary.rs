//! What `herd profile show` prints: totals and a histogram of when the
//! boot read its bytes.

use std::fmt::Write as _;

use serde::Serialize;

use super::Profile;

/// Number of time buckets in the histogram.
const BUCKETS: u64 = 10;

#[derive(Debug, Serialize)]
pub struct Bucket {
    pub from_ms: u64,
    pub to_ms: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub version: u16,
    pub image_size: u64,
    pub image_id: String,
    pub granule: u32,
    pub recorded_at: u64,
    pub extents: usize,
    pub bytes: u64,
    pub percent_of_image: f64,
    pub chunk_size: u64,
    pub chunks: usize,
    pub span_ms: u64,
    pub histogram: Vec<Bucket>,
}

impl Summary {
    #[must_use]
    pub fn of(p: &Profile, chunk_size: u64) -> Self {
        let bytes = p.bytes();
        let span_us = p.extents.last().map_or(0, |e| e.at_us);
        let width = (span_us / BUCKETS).max(1);
        let mut histogram: Vec<Bucket> = (0..BUCKETS)
            .map(|i| Bucket {
                from_ms: i * width / 1000,
                to_ms: (i + 1) * width / 1000,
                bytes: 0,
            })
            .collect();
        for e in &p.extents {
            let i = usize::try_from((e.at_us / width).min(BUCKETS - 1)).unwrap_or(0);
            histogram[i].bytes += e.len;
        }
        Self {
            version: super::VERSION,
            image_size: p.image_size,
            image_id: p.identity.to_string(),
            granule: p.granule,
            recorded_at: p.recorded_at,
            extents: p.extents.len(),
            bytes,
            percent_of_image: if p.image_size == 0 {
                0.0
            } else {
                bytes as f64 * 100.0 / p.image_size as f64
            },
            chunk_size,
            chunks: p.chunks(chunk_size).len(),
            span_ms: span_us / 1000,
            histogram,
        }
    }

    /// The human-readable form.
    #[must_use]
    pub fn render(&self) -> String {
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "image      {} bytes, id {}",
            self.image_size, self.image_id
        );
        let _ = writeln!(
            s,
            "reads      {:.1} MiB in {} extents ({:.2} % of the image), granule {} B",
            mib(self.bytes),
            self.extents,
            self.percent_of_image,
            self.granule
        );
        let _ = writeln!(
            s,
            "chunks     {} of {} KiB ({:.1} MiB to prefetch)",
            self.chunks,
            self.chunk_size / 1024,
            mib(self.chunks as u64 * self.chunk_size)
        );
        let _ = writeln!(s, "time span  {:.3} s", self.span_ms as f64 / 1000.0);
        let max = self
            .histogram
            .iter()
            .map(|b| b.bytes)
            .max()
            .unwrap_or(0)
            .max(1);
        let _ = writeln!(s, "first reads over time:");
        for b in &self.histogram {
            let bar = "#".repeat(usize::try_from(b.bytes * 40 / max).unwrap_or(0));
            let _ = writeln!(
                s,
                "  {:>8.3}-{:<8.3} s {:>9.2} MiB {bar}",
                b.from_ms as f64 / 1000.0,
                b.to_ms as f64 / 1000.0,
                mib(b.bytes)
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Extent, ImageId};
    use super::*;

    #[test]
    fn totals_and_histogram_add_up() {
        let p = Profile {
            granule: 4096,
            image_size: 1 << 30,
            identity: ImageId([3; 32]),
            recorded_at: 0,
            extents: vec![
                Extent {
                    offset: 0,
                    len: 1 << 20,
                    at_us: 0,
                },
                Extent {
                    offset: 1 << 29,
                    len: 4096,
                    at_us: 5_000_000,
                },
                Extent {
                    offset: 1 << 28,
                    len: 8192,
                    at_us: 10_000_000,
                },
            ],
        };
        let s = Summary::of(&p, 65536);
        assert_eq!(s.bytes, (1 << 20) + 4096 + 8192);
        assert_eq!(s.chunks, 16 + 1 + 1);
        assert_eq!(s.span_ms, 10_000);
        assert_eq!(s.histogram.iter().map(|b| b.bytes).sum::<u64>(), s.bytes);
        assert_eq!(s.histogram[0].bytes, 1 << 20);
        assert_eq!(s.histogram[5].bytes, 4096);
        assert_eq!(s.histogram[9].bytes, 8192);
        assert!(s.render().contains("18 of 64 KiB"));
    }
}
