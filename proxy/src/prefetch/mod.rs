//! Prefetch: fetch a boot profile's chunks before any VM asks for them.
//!
//! The profile reaches every proxy of the tree through [`propagate`]: the
//! root loads it from a file, every proxy serves it to its children as the
//! side export `herd-profile`, and children poll their parent for it. Each
//! proxy then runs one [`plan`] through [`run`]:
//!
//! * chunks go in first-access order, adjacent ones grouped into reads of at
//!   most [`RUN_BYTES`];
//! * a read is only issued while no demand fetch waits on the upstream
//!   (`ChunkCache::demand_idle`), with at most `concurrency` in flight, so a
//!   client read waits at most for the prefetch bytes already on the wire;
//! * fetches go through the cache's single-flight map, so a chunk a client
//!   is already fetching is joined, never fetched twice;
//! * an optional rate cap spaces reads out (token bucket).

pub mod propagate;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::cache::ChunkCache;
use crate::config::{PrefetchMode, PrefetchSettings};
use crate::profile::Profile;

/// Largest prefetch read. Small on purpose: it is what a demand read may
/// find queued ahead of it on the parent link.
pub const RUN_BYTES: u64 = 128 << 10;

/// The chunks to prefetch, in order: the profile's in first-access order,
/// then (for `Full`) every other chunk of the image in offset order.
#[must_use]
pub fn plan(
    profile: Option<&Profile>,
    chunk_size: u64,
    total: u64,
    mode: PrefetchMode,
) -> Vec<u64> {
    if mode == PrefetchMode::None {
        return Vec::new();
    }
    let mut out: Vec<u64> = profile
        .map(|p| p.chunks(chunk_size))
        .unwrap_or_default()
        .into_iter()
        .filter(|&c| c < total)
        .collect();
    if mode == PrefetchMode::Full {
        let mut listed = vec![false; usize::try_from(total).unwrap_or(0)];
        for &c in &out {
            listed[c as usize] = true;
        }
        out.extend((0..total).filter(|&c| !listed[c as usize]));
    }
    out
}

/// Groups the plan into reads: consecutive entries with consecutive chunk
/// numbers, at most `max_chunks` each, keeping the plan's order.
#[must_use]
pub fn runs(plan: &[u64], max_chunks: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &c in plan {
        match out.last_mut() {
            Some((first, last)) if *last + 1 == c && c - *first < max_chunks.max(1) => *last = c,
            _ => out.push((c, c)),
        }
    }
    out
}

/// Spaces out reads to `rate` bytes per second.
struct RateLimit {
    rate: u64,
    next: tokio::time::Instant,
}

impl RateLimit {
    async fn take(&mut self, bytes: u64) {
        tokio::time::sleep_until(self.next).await;
        let now = tokio::time::Instant::now();
        let cost = Duration::from_secs_f64(bytes as f64 / self.rate as f64);
        self.next = self.next.max(now) + cost;
    }
}

fn present_in(cache: &ChunkCache, plan: &[u64]) -> u64 {
    plan.iter().filter(|&&c| cache.is_present(c)).count() as u64
}

/// Fetches every chunk of `plan` that is missing; returns when all are
/// present. Failed reads (parent down) are retried with backoff.
pub async fn run(cache: Arc<ChunkCache>, plan: Vec<u64>, settings: PrefetchSettings) {
    let total = plan.len() as u64;
    if total == 0 {
        return;
    }
    let cs = cache.chunk_size();
    let started = Instant::now();
    let before = present_in(&cache, &plan);
    cache.metrics().prefetch_progress(before, total);
    tracing::info!(chunks = total, present = before, "prefetch started");
    let plan = Arc::new(plan);
    let progress = {
        let (cache, plan) = (Arc::clone(&cache), Arc::clone(&plan));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut last_log = Instant::now();
            loop {
                tick.tick().await;
                let done = present_in(&cache, &plan);
                cache.metrics().prefetch_progress(done, total);
                if last_log.elapsed() >= Duration::from_secs(5) {
                    last_log = Instant::now();
                    let secs = started.elapsed().as_secs_f64().max(1e-3);
                    tracing::info!(
                        done,
                        total,
                        rate_mib_s = format!(
                            "{:.1}",
                            (done - before.min(done)) as f64 * cs as f64
                                / secs
                                / f64::from(1 << 20)
                        ),
                        "prefetching"
                    );
                }
            }
        })
    };
    let sem = Arc::new(Semaphore::new(settings.concurrency));
    let mut limit = settings.rate.map(|rate| RateLimit {
        rate,
        next: tokio::time::Instant::now(),
    });
    let failed = Arc::new(AtomicU64::new(0));
    let no_room = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut backoff = Duration::from_secs(1);
    let mut at_cap = false;
    loop {
        let missing: Vec<u64> = plan
            .iter()
            .copied()
            .filter(|&c| !cache.is_present(c))
            .collect();
        if missing.is_empty() {
            break;
        }
        let missing_before = missing.len();
        for (first, last) in runs(&missing, (RUN_BYTES / cs).max(1)) {
            if (first..=last).all(|c| cache.is_present(c)) {
                continue;
            }
            // The plan goes profile first: once a run finds no room under
            // --cache-size, what follows would push out what came before.
            if !cache.prefetch_fits(first, last) {
                at_cap = true;
                break;
            }
            // After an ENOSPC, wait for room instead of fetching chunks
            // that cannot be kept.
            cache.wait_for_disk().await;
            // Demand first: wait until no client fetch is on the wire.
            cache.demand_idle().await;
            let Ok(permit) = Arc::clone(&sem).acquire_owned().await else {
                return;
            };
            if let Some(l) = limit.as_mut() {
                l.take((last - first + 1) * cs).await;
            }
            let (cache, failed, no_room) = (
                Arc::clone(&cache),
                Arc::clone(&failed),
                Arc::clone(&no_room),
            );
            tokio::spawn(async move {
                match cache.prefetch(first, last).await {
                    Ok(true) => {}
                    Ok(false) => no_room.store(true, Ordering::Relaxed),
                    Err(e) => {
                        tracing::debug!(chunk = first, error = %crate::error_chain(&e), "prefetch read failed");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                drop(permit);
            });
        }
        // Wait for the pass's reads to finish.
        let all = u32::try_from(settings.concurrency).unwrap_or(u32::MAX);
        if let Ok(p) = sem.acquire_many(all).await {
            drop(p);
        }
        // Chunks fetched but not yet persisted are not "present": let them
        // land before the next pass looks for what is missing.
        cache.settle(Duration::from_secs(10)).await;
        if at_cap || no_room.load(Ordering::Relaxed) {
            at_cap = true;
            break;
        }
        let stuck = plan.iter().filter(|&&c| !cache.is_present(c)).count() >= missing_before;
        if failed.swap(0, Ordering::Relaxed) > 0 || stuck {
            tracing::warn!(retry_in = ?backoff, "prefetch reads failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }
    progress.abort();
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    if at_cap {
        let done = present_in(&cache, &plan);
        cache.metrics().prefetch_progress(done, total);
        tracing::info!(
            done,
            total,
            seconds = format!("{secs:.2}"),
            "prefetch stopped: the cache is at --cache-size"
        );
        return;
    }
    let fetched = total - before;
    cache.metrics().prefetch_progress(total, total);
    tracing::info!(
        chunks = total,
        fetched,
        seconds = format!("{secs:.2}"),
        rate_mib_s = format!(
            "{:.1}",
            fetched as f64 * cs as f64 / secs / f64::from(1 << 20)
        ),
        "prefetch done"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{Extent, ImageId};

    #[test]
    fn plan_follows_first_access_then_fills_the_rest() {
        let p = Profile {
            granule: 4096,
            image_size: 10 * 65536,
            identity: ImageId([0; 32]),
            recorded_at: 0,
            extents: vec![
                Extent {
                    offset: 7 * 65536,
                    len: 4096,
                    at_us: 0,
                },
                Extent {
                    offset: 2 * 65536,
                    len: 65536 + 1,
                    at_us: 5,
                },
            ],
        };
        assert_eq!(
            plan(Some(&p), 65536, 10, PrefetchMode::Profile),
            vec![7, 2, 3]
        );
        assert_eq!(
            plan(Some(&p), 65536, 10, PrefetchMode::Full),
            vec![7, 2, 3, 0, 1, 4, 5, 6, 8, 9]
        );
        assert!(plan(Some(&p), 65536, 10, PrefetchMode::None).is_empty());
        assert_eq!(plan(None, 65536, 3, PrefetchMode::Full), vec![0, 1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_cap_spaces_reads_by_their_size() {
        let start = tokio::time::Instant::now();
        let mut l = RateLimit {
            rate: 1 << 20,
            next: start,
        };
        // 4 reads of 256 KiB at 1 MiB/s: the first goes at once, the last
        // waits until 0.75 s; the next could go at 1 s.
        for _ in 0..4 {
            l.take(256 << 10).await;
        }
        assert_eq!(start.elapsed(), Duration::from_millis(750));
        assert_eq!(l.next - start, Duration::from_secs(1));
    }

    #[test]
    fn runs_group_only_consecutive_chunks_in_plan_order() {
        assert_eq!(
            runs(&[7, 2, 3, 4, 5, 9, 10], 3),
            vec![(7, 7), (2, 4), (5, 5), (9, 10)]
        );
        assert!(runs(&[], 2).is_empty());
    }
}
