//! Cache unit tests over an in-memory upstream that counts its reads (the
//! end-to-end tests in `tests/` use real NBD peers).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::upstream::ReadFuture;

struct CountingUpstream {
    data: Vec<u8>,
    reads: AtomicU64,
    fail: std::sync::atomic::AtomicBool,
}

impl Upstream for CountingUpstream {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn read_at(&self, offset: u64, len: usize) -> ReadFuture<'_> {
        Box::pin(async move {
            self.reads.fetch_add(1, Ordering::SeqCst);
            // Slow enough that concurrent readers overlap the fetch.
            tokio::time::sleep(Duration::from_millis(50)).await;
            if self.fail.load(Ordering::SeqCst) {
                return Err(UpstreamError::ConnectionLost {
                    addr: "test".into(),
                });
            }
            let o = usize::try_from(offset).expect("small");
            Ok(IoBuf::from_slice(&self.data[o..o + len]))
        })
    }
    fn describe(&self) -> String {
        "counting".into()
    }
}

fn setup(name: &str, size: usize) -> (PathBuf, Arc<CountingUpstream>, Engine) {
    let dir = std::env::temp_dir().join(format!("herd-cache-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = (0..size)
        .map(|i| u8::try_from(i * 31 % 253).expect("fits"))
        .collect();
    let up = Arc::new(CountingUpstream {
        data,
        reads: AtomicU64::new(0),
        fail: false.into(),
    });
    (dir, up, Engine::start(64, false).expect("engine"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_readers_fetch_each_chunk_once() {
    let (dir, up, engine) = setup("sf", 1 << 20);
    let cache = ChunkCache::open(&dir, up.clone(), 64 << 10, engine).expect("open");
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let c = Arc::clone(&cache);
        // Every reader covers chunks 0..=2 through a different unaligned range.
        tasks.push(tokio::spawn(async move { c.read(100 + i, 150_000).await }));
    }
    for t in tasks {
        let got = t.await.expect("join").expect("read");
        assert_eq!(got.len(), 150_000);
    }
    // Each chunk crossed from upstream exactly once (adjacent misses may
    // share one upstream read).
    assert_eq!(
        cache.stats().upstream_bytes.load(Ordering::SeqCst),
        3 * (64 << 10)
    );
    assert!(up.reads.load(Ordering::SeqCst) <= 3);
    assert_eq!(cache.stats().misses.load(Ordering::SeqCst), 3);
    assert!(cache.stats().joins.load(Ordering::SeqCst) > 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unaligned_and_spanning_reads_are_exact() {
    let size = 300_001;
    let (dir, up, engine) = setup("span", size);
    let cache = ChunkCache::open(&dir, up.clone(), 4096, engine).expect("open");
    for (off, len) in [
        (0u64, 1usize),
        (4095, 2),
        (1000, 100_000),
        (size as u64 - 5, 5),
        (0, size),
    ] {
        let got = cache.read(off, len).await.expect("read");
        let o = usize::try_from(off).expect("small");
        assert_eq!(&got[..], &up.data[o..o + len], "off {off} len {len}");
    }
    assert!(matches!(
        cache.read(size as u64 - 1, 2).await,
        Err(CacheError::OutOfRange { .. })
    ));
    assert!(matches!(
        cache.read(u64::MAX, 2).await,
        Err(CacheError::OutOfRange { .. })
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_keeps_chunks_and_failures_are_retried() {
    let (dir, up, engine) = setup("reopen", 256 << 10);
    {
        let cache = ChunkCache::open(&dir, up.clone(), 64 << 10, engine.clone()).expect("open");
        cache.read(0, 70_000).await.expect("read");
        assert_eq!(
            cache.stats().upstream_bytes.load(Ordering::SeqCst),
            2 * (64 << 10)
        );
        assert!(cache.settle(Duration::from_secs(10)).await);
        cache.sync().expect("sync");
    }
    let reads_before = up.reads.load(Ordering::SeqCst);
    let cache = ChunkCache::open(&dir, up.clone(), 64 << 10, engine).expect("reopen");
    assert_eq!(cache.chunks_present(), 2);
    let got = cache.read(0, 70_000).await.expect("read again");
    assert_eq!(&got[..], &up.data[..70_000]);
    assert_eq!(
        up.reads.load(Ordering::SeqCst),
        reads_before,
        "nothing refetched"
    );
    // A failing upstream gives an error, marks nothing, and a later read
    // after recovery fetches the chunk.
    up.fail.store(true, Ordering::SeqCst);
    assert!(cache.read(200_000, 10).await.is_err());
    assert!(cache.settle(Duration::from_secs(10)).await);
    assert_eq!(cache.chunks_present(), 2);
    up.fail.store(false, Ordering::SeqCst);
    let got = cache.read(200_000, 10).await.expect("recovered");
    assert_eq!(&got[..], &up.data[200_000..200_010]);
    assert!(cache.settle(Duration::from_secs(10)).await);
    assert_eq!(cache.chunks_present(), 3);
    let _ = std::fs::remove_dir_all(&dir);
}
