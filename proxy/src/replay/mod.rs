//! Boot replay: many emulated VMs in one process, each reading an image the
//! way a recorded boot did (order, think time, overlap: [`schedule`]), each
//! byte checked ([`Verify`]), each VM reported as one JSON line.
//!
//! ```text
//!  boot.profile ─▶ schedule ─▶ VM 1 ─┐  one reader (NBD connection or local
//!                              VM 2 ─┼─ file) per VM, as each qemu has its
//!                              …     ┘  own; bursts in order, reads of a
//!                                       burst in flight together
//! ```
//!
//! `herd replay run` drives it; `cargo xtask bench storm` runs one replay
//! process per emulated host.

pub mod pattern;
pub mod schedule;

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use thiserror::Error;
use tokio::task::JoinSet;

pub use schedule::{scale_profile, schedule, Burst, Read, Scaling, Schedule, ScheduleError};

use crate::upstream::Upstream;

/// How a replay knows the right bytes.
#[derive(Clone, Debug)]
pub enum Verify {
    /// A synthetic image of [`pattern`] with this seed.
    Pattern(u64),
    /// The image file itself (read with `pread`, through the page cache).
    File(Arc<std::fs::File>),
    /// No check (reported as 0 verified bytes).
    None,
}

#[derive(Debug, Error)]
pub enum ReplayError {
    #[error("the trace is for a {trace}-byte image but the export is {export} bytes; use the trace of this image (or --image-scale {hint})")]
    SizeMismatch { trace: u64, export: u64, hint: u64 },
    #[error("cannot read the reference image for verification")]
    Reference(#[source] std::io::Error),
}

impl Verify {
    /// The first wrong offset of `data` read at `offset`, if any.
    ///
    /// # Errors
    /// `Reference` when the reference file cannot be read.
    pub fn check(&self, offset: u64, data: &[u8]) -> Result<Option<u64>, ReplayError> {
        match self {
            Self::Pattern(seed) => Ok(pattern::first_mismatch(*seed, offset, data)),
            Self::File(f) => {
                let mut want = vec![0u8; data.len()];
                f.read_exact_at(&mut want, offset)
                    .map_err(ReplayError::Reference)?;
                Ok(want
                    .iter()
                    .zip(data)
                    .position(|(a, b)| a != b)
                    .map(|i| offset + i as u64))
            }
            Self::None => Ok(None),
        }
    }

    fn checks(&self) -> bool {
        !matches!(self, Self::None)
    }
}

/// What one replayed VM did; one JSON line each.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VmReport {
    pub vm: usize,
    /// Unix milliseconds.
    pub start_ms: u64,
    pub end_ms: u64,
    pub boot_secs: f64,
    pub bytes: u64,
    pub requests: u64,
    pub verified_bytes: u64,
    /// Reads that failed (I/O error or connection loss).
    pub errors: u64,
    /// Reads that returned wrong bytes.
    pub mismatches: u64,
    /// The first error or mismatch, for the log.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

/// Unix milliseconds now.
#[must_use]
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Refuses a trace whose (scaled) image size is not the export's.
///
/// # Errors
/// `SizeMismatch`, with the scale that would fit when there is one.
pub fn check_size(
    schedule: &Schedule,
    export_size: u64,
    image_scale: u64,
) -> Result<(), ReplayError> {
    if schedule.image_size == export_size {
        return Ok(());
    }
    let base = schedule.image_size / image_scale.max(1);
    Err(ReplayError::SizeMismatch {
        trace: schedule.image_size,
        export: export_size,
        hint: if base > 0 && export_size.is_multiple_of(base) {
            export_size / base
        } else {
            1
        },
    })
}

struct ReadOutcome {
    bytes: u64,
    verified: u64,
    error: Option<String>,
    mismatch: Option<String>,
}

async fn one_read(reader: Arc<dyn Upstream>, verify: Arc<Verify>, r: Read) -> ReadOutcome {
    let len = usize::try_from(r.len).unwrap_or(usize::MAX);
    match reader.read_at(r.offset, len).await {
        Err(e) => ReadOutcome {
            bytes: 0,
            verified: 0,
            error: Some(format!(
                "read of {} bytes at {}: {}",
                r.len,
                r.offset,
                crate::error_chain(&e)
            )),
            mismatch: None,
        },
        Ok(buf) => {
            // Verification is CPU work; keep it off the reactor's hot loop
            // only when it is large.
            let checked = if verify.checks() && buf.len() >= (1 << 20) {
                let v = verify.clone();
                tokio::task::spawn_blocking(move || v.check(r.offset, &buf))
                    .await
                    .unwrap_or_else(|e| Err(ReplayError::Reference(std::io::Error::other(e))))
            } else {
                verify.check(r.offset, &buf)
            };
            match checked {
                Ok(None) => ReadOutcome {
                    bytes: r.len,
                    verified: if verify.checks() { r.len } else { 0 },
                    error: None,
                    mismatch: None,
                },
                Ok(Some(at)) => ReadOutcome {
                    bytes: r.len,
                    verified: 0,
                    error: None,
                    mismatch: Some(format!(
                        "wrong byte at offset {at} in the read of {} bytes at {}",
                        r.len, r.offset
                    )),
                },
                Err(e) => ReadOutcome {
                    bytes: r.len,
                    verified: 0,
                    error: Some(crate::error_chain(&e)),
                    mismatch: None,
                },
            }
        }
    }
}

/// Replays one boot on `reader`, starting now.
pub async fn replay_vm(
    vm: usize,
    reader: Arc<dyn Upstream>,
    schedule: Arc<Schedule>,
    verify: Arc<Verify>,
    start_ms: u64,
    start: Instant,
) -> VmReport {
    let mut rep = VmReport {
        vm,
        start_ms,
        ..VmReport::default()
    };
    // Timer wake-ups land late (tokio's 1 ms wheel); the lateness is paid
    // back from the next gap so it does not add up over hundreds of bursts.
    let mut late = Duration::ZERO;
    for burst in &schedule.bursts {
        let gap = burst.gap.saturating_sub(late);
        late = late.saturating_sub(burst.gap - gap);
        if gap > Duration::ZERO {
            let due = tokio::time::Instant::now() + gap;
            tokio::time::sleep_until(due).await;
            late += tokio::time::Instant::now().saturating_duration_since(due);
        }
        let mut set = JoinSet::new();
        for r in &burst.reads {
            set.spawn(one_read(reader.clone(), verify.clone(), *r));
        }
        while let Some(done) = set.join_next().await {
            rep.requests += 1;
            let o = match done {
                Ok(o) => o,
                Err(e) => ReadOutcome {
                    bytes: 0,
                    verified: 0,
                    error: Some(format!("read task failed: {e}")),
                    mismatch: None,
                },
            };
            rep.bytes += o.bytes;
            rep.verified_bytes += o.verified;
            if let Some(e) = o.error {
                rep.errors += 1;
                rep.first_error.get_or_insert(e);
            }
            if let Some(m) = o.mismatch {
                rep.mismatches += 1;
                rep.first_error.get_or_insert(m);
            }
        }
    }
    rep.boot_secs = start.elapsed().as_secs_f64();
    rep.end_ms = unix_ms();
    rep
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap fails the test, as it should
mod tests {
    use super::*;
    use crate::io::IoBuf;
    use crate::upstream::{ReadFuture, UpstreamError};
    use std::sync::Mutex;

    /// An in-memory pattern image that logs when each read arrives.
    struct Logged {
        seed: u64,
        size: u64,
        corrupt_at: Option<u64>,
        log: Mutex<Vec<(u64, Instant)>>,
    }

    impl Upstream for Logged {
        fn size(&self) -> u64 {
            self.size
        }
        fn read_at(&self, offset: u64, len: usize) -> ReadFuture<'_> {
            Box::pin(async move {
                self.log
                    .lock()
                    .map_err(|_| UpstreamError::Open {
                        path: "log".into(),
                        source: std::io::Error::other("poisoned"),
                    })?
                    .push((offset, Instant::now()));
                tokio::time::sleep(Duration::from_millis(5)).await;
                let mut b = IoBuf::zeroed(len);
                pattern::fill(self.seed, offset, &mut b);
                if let Some(at) = self.corrupt_at {
                    if (offset..offset + len as u64).contains(&at) {
                        b[(at - offset) as usize] ^= 1;
                    }
                }
                Ok(b)
            })
        }
        fn describe(&self) -> String {
            "memory".into()
        }
    }

    fn sched() -> Schedule {
        Schedule {
            image_size: 1 << 20,
            bursts: vec![
                Burst {
                    gap: Duration::ZERO,
                    reads: vec![
                        Read {
                            offset: 0,
                            len: 4096,
                        },
                        Read {
                            offset: 8192,
                            len: 4096,
                        },
                    ],
                },
                Burst {
                    gap: Duration::from_millis(50),
                    reads: vec![Read {
                        offset: 65536,
                        len: 8192,
                    }],
                },
            ],
        }
    }

    #[tokio::test]
    async fn bursts_overlap_inside_and_wait_for_completion_plus_gap_between() {
        let up = Arc::new(Logged {
            seed: 3,
            size: 1 << 20,
            corrupt_at: None,
            log: Mutex::new(Vec::new()),
        });
        let t0 = Instant::now();
        let rep = replay_vm(
            0,
            up.clone(),
            Arc::new(sched()),
            Arc::new(Verify::Pattern(3)),
            unix_ms(),
            t0,
        )
        .await;
        assert_eq!(
            (rep.bytes, rep.requests, rep.errors, rep.mismatches),
            (16384, 3, 0, 0)
        );
        assert_eq!(rep.verified_bytes, 16384);
        let log = up.log.lock().unwrap().clone();
        assert_eq!(log.len(), 3);
        // Both reads of burst 0 went out before either completed (5 ms).
        assert!(log[1].1.duration_since(log[0].1) < Duration::from_millis(4));
        // Burst 1 waited for burst 0 (5 ms) and its 50 ms gap.
        let third = log[2].1.duration_since(t0);
        assert!(third >= Duration::from_millis(55), "{third:?}");
        assert!(third < Duration::from_millis(150), "{third:?}");
        assert!(rep.boot_secs >= 0.060);
    }

    #[tokio::test]
    async fn wrong_bytes_are_counted_and_named() {
        let up = Arc::new(Logged {
            seed: 3,
            size: 1 << 20,
            corrupt_at: Some(65536 + 100),
            log: Mutex::new(Vec::new()),
        });
        let rep = replay_vm(
            1,
            up,
            Arc::new(sched()),
            Arc::new(Verify::Pattern(3)),
            unix_ms(),
            Instant::now(),
        )
        .await;
        assert_eq!(rep.mismatches, 1);
        assert_eq!(rep.verified_bytes, 8192);
        assert!(rep
            .first_error
            .as_deref()
            .is_some_and(|e| e.contains("offset 65636")));
    }

    #[test]
    fn a_trace_for_another_size_is_refused_with_the_scale_that_fits() {
        let s = sched();
        assert!(check_size(&s, 1 << 20, 1).is_ok());
        let e = check_size(&s, 4 << 20, 1).unwrap_err().to_string();
        assert!(e.contains("--image-scale 4"), "{e}");
    }
}
