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
    /// Reads in progress now, and the most at once.
    busy: AtomicU64,
    most_busy: AtomicU64,
    fail: std::sync::atomic::AtomicBool,
    /// Reads covering this offset that still come back with a flipped byte.
    corrupt_at: AtomicU64,
    corrupt_reads: AtomicU64,
}

impl CountingUpstream {
    fn new(data: Vec<u8>) -> Arc<Self> {
        Arc::new(Self {
            data,
            reads: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            most_busy: AtomicU64::new(0),
            fail: false.into(),
            corrupt_at: AtomicU64::new(u64::MAX),
            corrupt_reads: AtomicU64::new(0),
        })
    }
}

impl Upstream for CountingUpstream {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn read_at(&self, offset: u64, len: usize) -> ReadFuture<'_> {
        Box::pin(async move {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let busy = self.busy.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_busy.fetch_max(busy, Ordering::SeqCst);
            // Slow enough that concurrent readers overlap the fetch.
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.busy.fetch_sub(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                return Err(UpstreamError::ConnectionLost {
                    addr: "test".into(),
                });
            }
            let o = usize::try_from(offset).expect("small");
            let mut b = IoBuf::from_slice(&self.data[o..o + len]);
            let at = self.corrupt_at.load(Ordering::SeqCst);
            if (offset..offset + len as u64).contains(&at)
                && self
                    .corrupt_reads
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
            {
                b[usize::try_from(at - offset).expect("small")] ^= 0x40;
            }
            Ok(b)
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
    let up = CountingUpstream::new(data);
    (dir, up, Engine::start(64, false).expect("engine"))
}

fn manifest_of(data: &[u8], chunk: u32) -> Arc<Manifest> {
    let d: Vec<crate::manifest::Digest> = data
        .chunks(chunk as usize)
        .map(|c| *blake3::hash(c).as_bytes())
        .collect();
    Arc::new(Manifest::from_digests(data.len() as u64, chunk, &d).expect("manifest"))
}

fn open(dir: &Path, up: &Arc<CountingUpstream>, chunk: u32, engine: Engine) -> Arc<ChunkCache> {
    // 4 KiB digests under bigger cache chunks: the multiple case.
    let m = manifest_of(&up.data, 4096);
    ChunkCache::open("herd", dir, up.clone(), chunk, engine, m).expect("open")
}

/// Flips a bit of the byte at `offset` of the cache data file in `dir`.
fn damage(dir: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join(DATA_FILE))
        .expect("data");
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).expect("read");
    f.write_all_at(&[b[0] ^ 1], offset).expect("flip");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_readers_fetch_each_chunk_once() {
    let (dir, up, engine) = setup("sf", 1 << 20);
    let cache = open(&dir, &up, 64 << 10, engine);
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let c = Arc::clone(&cache);
        // Every reader covers chunks 0..=2 through a different unaligned range.
        tasks.push((
            i,
            tokio::spawn(async move { c.read(100 + i, 150_000).await }),
        ));
    }
    for (i, t) in tasks {
        let got = t.await.expect("join").expect("read");
        let at = usize::try_from(100 + i).expect("small");
        assert_eq!(&got[..], &up.data[at..at + 150_000], "reader {i}");
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
    let cache = open(&dir, &up, 4096, engine);
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
        let cache = open(&dir, &up, 64 << 10, engine.clone());
        cache.read(0, 70_000).await.expect("read");
        assert_eq!(
            cache.stats().upstream_bytes.load(Ordering::SeqCst),
            2 * (64 << 10)
        );
        assert!(cache.settle(Duration::from_secs(10)).await);
        cache.sync().expect("sync");
    }
    let reads_before = up.reads.load(Ordering::SeqCst);
    let cache = open(&dir, &up, 64 << 10, engine);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_fetch_is_read_again_and_never_served() {
    let (dir, up, engine) = setup("flip", 256 << 10);
    let cache = open(&dir, &up, 64 << 10, engine);
    // One bad read of chunk 1: the second read is good and served.
    up.corrupt_at.store(70_000, Ordering::SeqCst);
    up.corrupt_reads.store(1, Ordering::SeqCst);
    let got = cache.read(0, 190_000).await.expect("read");
    assert_eq!(&got[..], &up.data[..190_000]);
    assert_eq!(cache.stats().digest_failures.load(Ordering::SeqCst), 1);
    assert!(cache.settle(Duration::from_secs(10)).await);
    assert_eq!(cache.chunks_present(), 3, "the run's chunks all persisted");
    // Always bad: three reads, then an error for that chunk only.
    up.corrupt_at.store(200_000, Ordering::SeqCst);
    up.corrupt_reads.store(u64::MAX, Ordering::SeqCst);
    let e = cache.read(196_608, 10).await.err().expect("EIO");
    assert!(matches!(e, CacheError::Joined { .. }), "{e}");
    assert!(e.to_string().contains("failed its digest 3 times"), "{e}");
    assert_eq!(cache.stats().digest_failures.load(Ordering::SeqCst), 4);
    assert!(cache.settle(Duration::from_secs(10)).await);
    assert!(!cache.is_present(3));
    let other = cache.read(0, 4096).await.expect("the rest is served");
    assert_eq!(&other[..], &up.data[..4096]);
    // Once the source is good again, the chunk is fetched and served.
    up.corrupt_reads.store(0, Ordering::SeqCst);
    let got = cache.read(196_608, 10).await.expect("recovered");
    assert_eq!(&got[..], &up.data[196_608..196_618]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_cache_file_is_caught_on_first_read_and_refetched() {
    let (dir, up, engine) = setup("rot", 256 << 10);
    {
        let cache = open(&dir, &up, 64 << 10, engine.clone());
        cache.read(0, 256 << 10).await.expect("warm");
        assert!(cache.settle(Duration::from_secs(10)).await);
        cache.sync().expect("sync");
    }
    // A bit flips in chunk 2 while the node is down.
    damage(&dir, 150_000);
    let reads = up.reads.load(Ordering::SeqCst);
    let cache = open(&dir, &up, 64 << 10, engine);
    assert_eq!(cache.chunks_present(), 4);
    // The fast hit paths decline an unchecked chunk.
    assert!(cache.try_read_cached(150_000, 10).is_none());
    let got = cache.read(140_000, 20_000).await.expect("read");
    assert_eq!(&got[..], &up.data[140_000..160_000]);
    assert_eq!(cache.stats().digest_failures.load(Ordering::SeqCst), 1);
    assert_eq!(
        up.reads.load(Ordering::SeqCst),
        reads + 1,
        "only chunk 2 refetched"
    );
    // Checked chunks are plain hits from now on.
    let got = cache.read(0, 256 << 10).await.expect("read all");
    assert_eq!(&got[..], &up.data[..]);
    assert_eq!(up.reads.load(Ordering::SeqCst), reads + 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_image_of_the_same_size_starts_a_fresh_generation() {
    let (dir, up, engine) = setup("gen", 256 << 10);
    {
        let cache = open(&dir, &up, 64 << 10, engine.clone());
        cache.read(0, 256 << 10).await.expect("warm");
        assert!(cache.settle(Duration::from_secs(10)).await);
        cache.sync().expect("sync");
    }
    let mut other: Vec<u8> = up.data.clone();
    other[100_000] ^= 0xff;
    let up2 = CountingUpstream::new(other);
    let cache = open(&dir, &up2, 64 << 10, engine.clone());
    assert_eq!(cache.chunks_present(), 0, "nothing of the old image kept");
    let got = cache.read(0, 256 << 10).await.expect("read");
    assert_eq!(&got[..], &up2.data[..]);
    assert_eq!(cache.stats().digest_failures.load(Ordering::SeqCst), 0);
    assert!(cache.settle(Duration::from_secs(10)).await);
    cache.sync().expect("sync");
    drop(cache);
    let kept = crate::manifest::load(&dir.join(crate::manifest::CACHE_FILE)).expect("copy");
    assert_eq!(kept.identity(), manifest_of(&up2.data, 4096).identity());
    // A manifest for another size is refused, naming both sizes.
    let small = manifest_of(&up.data[..4096], 4096);
    let e = ChunkCache::open("herd", &dir, up2.clone(), 64 << 10, engine, small)
        .err()
        .expect("refused");
    assert!(e.to_string().contains("4096 bytes"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_with_common_chunks_store_them_once() {
    use std::os::unix::fs::MetadataExt;
    const CS: usize = 64 << 10;
    let (dir_a, up_a, engine) = setup("share-a", 1 << 20);
    let dir_b = dir_a.with_extension("b");
    let _ = std::fs::remove_dir_all(&dir_b);
    // B is A with chunks 3 and 9 changed, and A's chunk 5 also at 12:
    // content is found at any place.
    let mut b = up_a.data.clone();
    b[3 * CS + 17] ^= 0xff;
    b[9 * CS] ^= 0x01;
    b.copy_within(5 * CS..6 * CS, 12 * CS);
    let up_b = CountingUpstream::new(b);
    let store = shared::SharedChunks::new();
    let a = open(&dir_a, &up_a, 64 << 10, engine.clone());
    store.join("a", &a);
    a.read(0, 1 << 20).await.expect("read A");
    assert!(a.settle(Duration::from_secs(10)).await);
    let bc = open(&dir_b, &up_b, 64 << 10, engine.clone());
    store.join("b", &bc);
    assert!(bc.is_present(12), "held by A as its chunk 5");
    let got = bc.read(0, 1 << 20).await.expect("read B");
    assert_eq!(&got[..], &up_b.data[..]);
    assert!(bc.settle(Duration::from_secs(10)).await);
    let fetched = bc.stats().upstream_bytes.load(Ordering::SeqCst);
    assert_eq!(fetched, 2 * CS as u64, "only B's own chunks fetched");
    assert_eq!(bc.chunks_present(), 2, "only B's own chunks stored");
    let on_disk = |d: &Path| {
        std::fs::metadata(d.join(DATA_FILE))
            .expect("data file")
            .blocks()
            * 512
    };
    assert!(on_disk(&dir_b) <= 2 * CS as u64, "{}", on_disk(&dir_b));
    assert_eq!(on_disk(&dir_a), 1 << 20);
    // A second pass is all hits, here or there.
    let again = bc.read(100, 900_000).await.expect("again");
    assert_eq!(&again[..], &up_b.data[100..900_100]);
    assert_eq!(bc.stats().upstream_bytes.load(Ordering::SeqCst), fetched);
    // A gone: B fetches (and keeps) what it reads next.
    a.sync().expect("sync");
    drop(a);
    assert!(!bc.is_present(7));
    let got = bc.read(7 * CS as u64, 10).await.expect("chunk 7");
    assert_eq!(&got[..], &up_b.data[7 * CS..7 * CS + 10]);
    assert!(bc.settle(Duration::from_secs(10)).await);
    assert_eq!(
        bc.stats().upstream_bytes.load(Ordering::SeqCst),
        fetched + CS as u64
    );
    assert_eq!(bc.chunks_present(), 3);
    // A back with chunk 0 damaged on its disk: A finds it bad when B asks
    // and lends nothing; B fetches its own, right bytes.
    damage(&dir_a, 10);
    let a = open(&dir_a, &up_a, 64 << 10, engine);
    store.join("a", &a);
    assert!(bc.is_present(0), "A's bit is set until checked");
    let got = bc.read(0, 4096).await.expect("chunk 0");
    assert_eq!(&got[..], &up_b.data[..4096]);
    assert_eq!(a.stats().digest_failures.load(Ordering::SeqCst), 1);
    assert_eq!(
        bc.stats().upstream_bytes.load(Ordering::SeqCst),
        fetched + 2 * CS as u64
    );
    assert_eq!(
        up_a.reads.load(Ordering::SeqCst),
        1,
        "A fetched nothing for B"
    );
    let _ = std::fs::remove_dir_all(&dir_a);
    let _ = std::fs::remove_dir_all(&dir_b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_read_that_misses_is_gathered_run_by_run() {
    let (dir, up, engine) = setup("steps", 20 << 20);
    let cache = open(&dir, &up, 64 << 10, engine);
    // A MiB in the middle is present; the rest of a 5 MiB read is not.
    cache.read(2 << 20, 1 << 20).await.expect("warm");
    assert!(cache.settle(Duration::from_secs(10)).await);
    let before = cache.stats().upstream_bytes.load(Ordering::SeqCst);
    let got = cache.read(333, 5 << 20).await.expect("large read");
    assert_eq!(&got[..], &up.data[333..333 + (5 << 20)]);
    // Each missing chunk fetched once, counted once: no joins of its own.
    let s = cache.stats();
    assert_eq!(
        s.upstream_bytes.load(Ordering::SeqCst) - before,
        (5 << 20) + (64 << 10) - (1 << 20),
        "the chunks 0..=80 less the warm MiB"
    );
    assert_eq!(s.joins.load(Ordering::SeqCst), 0);
    assert_eq!(s.misses.load(Ordering::SeqCst), 16 + 65);
    assert_eq!(s.hits.load(Ordering::SeqCst), 16);
    // At most the run being gathered and 4 MiB ahead are fetched at
    // once (all at once, an 8 MiB read would have 8 runs in flight: as
    // many as the 8 MiB fetch buffer lets wait). 8 MiB, not more: the
    // 16 MiB buffer class is `io::buf`'s test's alone.
    up.most_busy.store(0, Ordering::SeqCst);
    let got = cache.read(8 << 20, 8 << 20).await.expect("8 MiB");
    assert_eq!(&got[..], &up.data[8 << 20..16 << 20]);
    let most = up.most_busy.load(Ordering::SeqCst);
    assert!((2..=6).contains(&most), "{most} runs fetched at once");
    // NBD_CMD_CACHE of a large range makes it all present.
    cache.ensure(0, 20 << 20).await.expect("ensure");
    assert!(cache.settle(Duration::from_secs(10)).await);
    assert_eq!(cache.chunks_present(), 320);
    let _ = std::fs::remove_dir_all(&dir);
}
