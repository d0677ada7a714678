//! A cache that fits its disk: `--cache-size` keeps the data file within
//! its cap by evicting the least recently used chunks (a boot profile's
//! last), the bitmap stays exact through a kill -9 mid-eviction, prefetch
//! stops at the cap instead of churning, and a full disk (ENOSPC, on a
//! small tmpfs) is served through while prefetch waits for room.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{random_image, scratch, Herd, RawClient, HERD};
use herd::profile::{identity_of_file, ImageId, ProfileBuilder};

const MIB: u64 = 1 << 20;
/// The image: 64 chunks of 1 MiB (the tests' chunk size).
const CHUNKS: u64 = 64;

/// Chunks the bitmap file marks present (read while the daemon runs:
/// words are written at once, synced later).
fn present(cache: &Path) -> Vec<u64> {
    let raw = std::fs::read(cache.join(herd::cache::BITMAP_FILE)).expect("bitmap");
    let header = usize::try_from(herd::cache::bitmap::HEADER_LEN).expect("len");
    let mut out = Vec::new();
    for (w, word) in raw[header..].chunks_exact(8).enumerate() {
        let bits = u64::from_le_bytes(word.try_into().expect("8 bytes"));
        out.extend(
            (0..64)
                .filter(|b| bits & (1 << b) != 0)
                .map(|b| w as u64 * 64 + b),
        );
    }
    out
}

/// Bytes the data file takes on its disk.
fn allocated(cache: &Path) -> u64 {
    std::fs::metadata(cache.join(herd::cache::DATA_FILE))
        .expect("data file")
        .blocks()
        * 512
}

/// The data file holds no more than `cap` bytes of chunks; ext4 adds a
/// 4 KiB extent block once the punched file has more than four extents.
fn assert_within(cache: &Path, cap: u64) {
    let got = allocated(cache);
    assert!(
        got <= cap + 64 * 1024,
        "data file takes {got} bytes, cap {cap}"
    );
}

fn read_all(herd: &Herd, chunks: std::ops::Range<u64>, img: &[u8]) {
    let mut c = RawClient::connect(herd.port, "herd");
    for i in chunks {
        let at = usize::try_from(i * MIB).expect("offset");
        let got = c.read(i * MIB, u32::try_from(MIB).expect("len"));
        assert!(got == img[at..at + got.len()], "chunk {i} differs");
    }
}

/// `herd cache verify DIR --json`: every marked chunk checked.
fn verify(cache: &Path) -> serde_json::Value {
    let out = Command::new(HERD)
        .args(["cache", "verify"])
        .arg(cache)
        .arg("--json")
        .output()
        .expect("herd cache verify");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

#[test]
fn a_capped_cache_evicts_the_least_recently_used_and_stays_exact_through_a_crash() {
    let dir = scratch("cap-lru");
    let img_path = dir.join("disk.img");
    let img = random_image(&img_path, usize::try_from(CHUNKS * MIB).expect("size"));
    let cache = dir.join("node-cache");
    let args = ["--cache-size", "16MiB", "--read-ahead", "0"];
    let mut node = Herd::start(&dir, "node", img_path.to_str().expect("utf8"), &args);
    assert_eq!(node.metric("herd_cache_capacity_chunks"), 16.0);

    // A whole read keeps the last 16 chunks read; each was fetched once.
    read_all(&node, 0..CHUNKS, &img);
    node.metric_eventually("herd_cache_evicted_chunks_total", 48.0);
    // The last chunk's bit is set just after its eviction is counted.
    node.metric_eventually("herd_cache_chunks_present", 16.0);
    assert_eq!(present(&cache), (48..64).collect::<Vec<_>>());
    assert_within(&cache, 16 * MIB);
    assert_eq!(
        node.metric("herd_upstream_read_bytes_total"),
        (CHUNKS * MIB) as f64
    );

    // Using 48..52 again makes 52..56 the least recently used: four new
    // chunks push those out (lowest-first would have taken 48..52).
    std::thread::sleep(Duration::from_millis(50));
    read_all(&node, 48..52, &img);
    std::thread::sleep(Duration::from_millis(50));
    read_all(&node, 0..4, &img);
    node.metric_eventually("herd_cache_evicted_chunks_total", 52.0);
    node.metric_eventually("herd_cache_chunks_present", 16.0);
    let kept = present(&cache);
    assert_eq!(
        kept,
        [0, 1, 2, 3, 48, 49, 50, 51]
            .into_iter()
            .chain(56..64)
            .collect::<Vec<_>>()
    );

    // kill -9 while a reader streams (evicting at every chunk): the
    // bitmap marks only whole, good chunks, and no more than the cap.
    let reader = {
        let port = node.port;
        let img = img.clone();
        std::thread::spawn(move || {
            let mut c = RawClient::connect(port, "herd");
            for i in 4..48 {
                let at = usize::try_from(i * MIB).expect("offset");
                match c.try_read(i * MIB, u32::try_from(MIB).expect("len")) {
                    Ok(got) => assert!(got == img[at..at + got.len()], "chunk {i} differs"),
                    Err(_) => return,
                }
            }
        })
    };
    node.wait_metric_at_least(
        "herd_cache_evicted_chunks_total",
        64.0,
        Duration::from_secs(20),
    );
    node.kill9();
    // The reader's connection dies with the daemon (its panic is expected).
    let _ = reader.join();
    let r = verify(&cache);
    assert_eq!(r["damaged"], serde_json::json!([]));
    let marked = r["chunks_checked"].as_u64().expect("count");
    assert!(marked > 0 && marked <= 16, "{marked} chunks marked");
    assert_within(&cache, 16 * MIB);

    // Without a cap the node fills up; a restart with one evicts the
    // excess before it serves.
    drop(node);
    let mut node = Herd::start(&dir, "node", img_path.to_str().expect("utf8"), &[]);
    read_all(&node, 0..CHUNKS, &img);
    node.metric_eventually("herd_cache_chunks_present", CHUNKS as f64);
    assert!(node.stop().success());
    let node = Herd::start(&dir, "node", img_path.to_str().expect("utf8"), &args);
    assert_eq!(node.metric("herd_cache_chunks_present"), 16.0);
    assert_eq!(node.metric("herd_cache_evicted_chunks_total"), 48.0);
    assert_within(&cache, 16 * MIB);
    read_all(&node, 0..CHUNKS, &img);
    drop(node);
    assert_eq!(verify(&cache)["damaged"], serde_json::json!([]));
    let _ = std::fs::remove_dir_all(&dir);
}

fn image_id(path: &Path) -> ImageId {
    let f = std::fs::File::open(path).expect("open image");
    let size = f.metadata().expect("stat").len();
    identity_of_file(&f, size).expect("identity")
}

#[test]
fn profile_chunks_are_evicted_last_and_prefetch_stops_at_the_cap() {
    let dir = scratch("cap-profile");
    let img_path = dir.join("disk.img");
    let img = random_image(&img_path, usize::try_from(CHUNKS * MIB).expect("size"));
    // A profile of chunks 20..24, read in reverse order.
    let prof = dir.join("boot.profile");
    let mut b = ProfileBuilder::new(CHUNKS * MIB, 4096);
    for (i, c) in (20..24u64).rev().enumerate() {
        b.add(c * MIB + 4096, 64 << 10, i as u64 * 1000);
    }
    b.finish(image_id(&img_path), 0)
        .save(&prof)
        .expect("save profile");
    let node = Herd::start(
        &dir,
        "node",
        img_path.to_str().expect("utf8"),
        &[
            "--cache-size",
            "16MiB",
            "--read-ahead",
            "0",
            "--prefetch",
            "full",
            "--profile",
            prof.to_str().expect("utf8"),
        ],
    );
    let cache = dir.join("node-cache");
    // `full` fills the cap (profile first) and stops there.
    let deadline = Instant::now() + Duration::from_secs(20);
    while node.log_lines("prefetch stopped: the cache is at --cache-size") == 0 {
        assert!(
            Instant::now() < deadline,
            "prefetch did not stop at the cap"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(node.metric("herd_cache_chunks_present"), 16.0);
    let fetched = node.metric("herd_upstream_read_bytes_total");
    assert_eq!(fetched, (16 * MIB) as f64);
    let first = present(&cache);
    assert!(
        (20..24).all(|c| first.contains(&c)),
        "profile chunks prefetched: {first:?}"
    );
    // No churn: nothing more is fetched, nothing evicted.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(node.metric("herd_upstream_read_bytes_total"), fetched);
    assert_eq!(node.metric("herd_cache_evicted_chunks_total"), 0.0);

    // A client reads the whole image: everything else is pushed out, the
    // profile's chunks stay (they were used first, so plain LRU would
    // have evicted them).
    read_all(&node, 0..CHUNKS, &img);
    node.metric_eventually("herd_cache_chunks_present", 16.0);
    let kept = present(&cache);
    assert!(
        (20..24).all(|c| kept.contains(&c)),
        "profile chunks evicted: {kept:?}"
    );
    assert_eq!(node.log_lines("prefetch stopped"), 1);
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tmpfs mounted for one test; unmounted on drop, also on failure.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Self {
        std::fs::create_dir_all(at).expect("mount point");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("mount");
        assert!(ok.success(), "mount tmpfs at {} (needs root)", at.display());
        Self(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_is_served_through_and_prefetch_waits_for_room() {
    let dir = scratch("cap-enospc");
    let img_path = dir.join("disk.img");
    let img = random_image(&img_path, usize::try_from(CHUNKS * MIB).expect("size"));
    // The cache directory is an 80 MiB tmpfs with about 6 MiB free.
    let cache = dir.join("node-cache");
    let fs = Tmpfs::mount(&cache, "80m");
    let filler = cache.join("filler");
    std::fs::write(&filler, vec![1u8; usize::try_from(74 * MIB).expect("size")])
        .expect("fill the tmpfs");
    let node = Herd::start(
        &dir,
        "node",
        img_path.to_str().expect("utf8"),
        &["--prefetch", "full", "--read-ahead", "0"],
    );
    node.metric_eventually("herd_cache_disk_full", 1.0);
    // Prefetch waits: no fetch at all while the disk stays full.
    std::thread::sleep(Duration::from_millis(500));
    let paused = node.metric("herd_upstream_read_bytes_total");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(node.metric("herd_upstream_read_bytes_total"), paused);
    let held = node.metric("herd_cache_chunks_present");
    assert!(held < 8.0, "{held} chunks on a disk with 6 MiB free");

    // A client still reads every byte, served through without caching.
    read_all(&node, 0..CHUNKS, &img);
    assert!(node.metric("herd_cache_uncached_bytes_total") >= ((CHUNKS - 8) * MIB) as f64);
    assert_eq!(node.metric("herd_cache_chunks_present"), held);
    assert_eq!(node.log_lines("cache disk full"), 1);

    // Room returns: caching and prefetch resume, and finish.
    std::fs::remove_file(&filler).expect("free the tmpfs");
    node.metric_eventually("herd_cache_disk_full", 0.0);
    node.wait_prefetched(Duration::from_secs(60));
    node.metric_eventually("herd_cache_chunks_present", CHUNKS as f64);
    assert_eq!(node.log_lines("cache disk has room again"), 1);
    // Each chunk came at most twice: once for the client while full, once
    // for the cache; prefetch did not loop.
    let moved = node.metric("herd_upstream_read_bytes_total");
    assert!(
        moved <= (2 * CHUNKS * MIB + 8 * MIB) as f64,
        "{moved} bytes fetched"
    );
    read_all(&node, 0..CHUNKS, &img);
    drop(node);
    drop(fs);
    let _ = std::fs::remove_dir_all(&dir);
}
