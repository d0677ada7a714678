//! Bytes you can trust: every fault below flips bytes somewhere between the
//! golden image and a client — on the wire, in a parent's cache file, in
//! the root's image after its manifest was made, or by replacing the whole
//! image under a running tree — and no client may ever read a byte that is
//! not the image's. Where a good copy exists it is served; where none does,
//! that range fails with EIO and the rest is served.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{assert_same_file, have, nbdcopy, random_image, scratch, Herd, Peer, RawClient, HERD};

const MIB: usize = 1 << 20;
const PARENT: &str = "herd_chunk_digest_failures_total{source=\"parent\"}";
const IMAGE: &str = "herd_chunk_digest_failures_total{source=\"image\"}";
const CACHE: &str = "herd_chunk_digest_failures_total{source=\"cache\"}";

/// Reads the image through `port` a MiB at a time: each block's bytes, or
/// the errno its READ failed with.
fn read_blocks(port: u16, size: usize) -> Vec<Result<Vec<u8>, u32>> {
    read_blocks_of(port, "herd", size)
}

/// `read_blocks` of export `export`.
fn read_blocks_of(port: u16, export: &str, size: usize) -> Vec<Result<Vec<u8>, u32>> {
    let mut c = RawClient::connect(port, export);
    (0..size / MIB)
        .map(|b| c.try_read((b * MIB) as u64, MIB as u32))
        .collect()
}

fn flip(path: &Path, at: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).expect("read");
    f.write_all_at(&[b[0] ^ 0x20], at).expect("write");
    f.sync_all().expect("sync");
}

/// A TCP relay between a child and its parent that flips one byte, once,
/// at `at` bytes into the first parent-to-child stream that gets that far
/// (past the handshake, inside a chunk's payload).
struct FlipProxy {
    port: u16,
    flipped: Arc<AtomicBool>,
}

impl FlipProxy {
    fn start(parent: u16, at: u64) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let flipped = Arc::new(AtomicBool::new(false));
        let f = Arc::clone(&flipped);
        std::thread::spawn(move || {
            for down in l.incoming() {
                let Ok(down) = down else { return };
                let Ok(up) = TcpStream::connect(("127.0.0.1", parent)) else {
                    return;
                };
                let (d2, u2) = (
                    down.try_clone().expect("clone"),
                    up.try_clone().expect("clone"),
                );
                std::thread::spawn(move || pump(d2, u2, None));
                let f = Arc::clone(&f);
                std::thread::spawn(move || pump(up, down, Some((at, f))));
            }
        });
        Self { port, flipped }
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, flip: Option<(u64, Arc<AtomicBool>)>) {
    let mut buf = vec![0u8; 64 << 10];
    let mut pos = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some((at, done)) = &flip {
            if (pos..pos + n as u64).contains(at) && !done.swap(true, Ordering::SeqCst) {
                buf[usize::try_from(at - pos).expect("small")] ^= 0x01;
            }
        }
        pos += n as u64;
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

#[test]
fn a_byte_flipped_on_the_wire_is_caught_and_the_chunk_read_again() {
    if !have("nbdcopy") {
        return;
    }
    let dir = scratch("int-wire");
    let img = dir.join("golden.img");
    let data = random_image(&img, 16 * MIB);
    let root = Herd::start(&dir, "root", img.to_str().expect("utf8"), &[]);
    let proxy = FlipProxy::start(root.port, 600_000);
    let leaf = Herd::start(
        &dir,
        "leaf",
        &format!("nbd://127.0.0.1:{}/herd", proxy.port),
        &[],
    );
    assert_eq!(leaf.metric(PARENT), 0.0);
    assert_eq!(leaf.metric("herd_serving"), 1.0);
    let out = dir.join("out.raw");
    nbdcopy(&leaf.url(), &out);
    assert_same_file(&out, &data);
    assert!(
        proxy.flipped.load(Ordering::SeqCst),
        "the proxy flipped a byte"
    );
    assert_eq!(leaf.metric(PARENT), 1.0);
    // The bad chunk (1 MiB here) was read twice, every other chunk once.
    assert_eq!(
        leaf.metric("herd_upstream_read_bytes_total"),
        (data.len() + MIB) as f64
    );
    let log = std::fs::read_to_string(&leaf.log).expect("log");
    assert!(log.contains("chunk failed its digest"), "{log}");
    assert!(log.contains(&format!("127.0.0.1:{}", proxy.port)), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_parent_that_always_serves_a_bad_chunk_fails_that_range_only() {
    if !have("nbdkit") {
        return;
    }
    let dir = scratch("int-badparent");
    let img = dir.join("golden.img");
    let data = random_image(&img, 8 * MIB);
    // The manifest is made from the good image, ahead of time.
    let manifest = dir.join("golden.manifest");
    let out = Command::new(HERD)
        .args(["manifest", "build", img.to_str().expect("utf8"), "--json"])
        .args(["--out", manifest.to_str().expect("utf8")])
        .output()
        .expect("herd manifest build");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(summary["chunks"], 128);
    assert_eq!(summary["chunk_size"], 65536);
    // The parent is not herd and serves a copy with one flipped byte.
    let bad = dir.join("bad.img");
    std::fs::copy(&img, &bad).expect("copy");
    flip(&bad, 5 * MIB as u64 + 12_345);
    let sock = dir.join("nbdkit.sock");
    let _nbdkit = Peer(
        Command::new("nbdkit")
            .args(["-f", "-U"])
            .arg(&sock)
            .args(["--exportname", "herd", "file"])
            .arg(&bad)
            .spawn()
            .expect("nbdkit"),
    );
    common::wait_socket(&sock);
    let leaf = Herd::start(
        &dir,
        "leaf",
        &format!("nbd+unix:///herd?socket={}", sock.display()),
        // No read-ahead: block 4's would fetch the bad chunk too, and
        // block 5's read then joins that fetch or, if it already failed,
        // starts a second one (six bad reads), depending on timing.
        &[
            "--manifest",
            manifest.to_str().expect("utf8"),
            "--read-ahead",
            "0",
        ],
    );
    let blocks = read_blocks(leaf.port, data.len());
    for (b, got) in blocks.iter().enumerate() {
        let want = &data[b * MIB..(b + 1) * MIB];
        match got {
            Ok(bytes) => assert!(bytes == want, "block {b} served wrong bytes"),
            Err(errno) => {
                assert_eq!(b, 5, "block {b} failed with errno {errno}");
                assert_eq!(*errno, 5, "EIO");
            }
        }
    }
    assert!(blocks[5].is_err(), "the bad block must not be served");
    assert_eq!(leaf.metric(PARENT), 3.0, "three reads, all bad");
    // The rest of the image was served and cached; the bad chunk was not.
    assert_eq!(
        leaf.metric_eventually("herd_cache_chunks_present", 7.0),
        7.0
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_damaged_chunk_in_a_parents_cache_file_is_dropped_and_fetched_again() {
    if !have("nbdcopy") {
        return;
    }
    let dir = scratch("int-cachefile");
    let img = dir.join("golden.img");
    let data = random_image(&img, 8 * MIB);
    let root = Herd::start(&dir, "root", img.to_str().expect("utf8"), &[]);
    let mut mid = Herd::start(&dir, "mid", &root.url(), &[]);
    let warm = Herd::start(&dir, "warm", &mid.url(), &[]);
    let out = dir.join("warm.raw");
    nbdcopy(&warm.url(), &out);
    assert_same_file(&out, &data);
    assert_eq!(mid.metric_eventually("herd_cache_chunks_present", 8.0), 8.0);
    // A bit rots in the mid-tier's cache file while it is down.
    let port = mid.port;
    assert!(mid.stop().success());
    flip(&dir.join("mid-cache/herd-cache.data"), 3 * MIB as u64 + 777);
    let mid = Herd::start_on(&dir, "mid", &root.url(), port, &[]);
    let fresh = Herd::start(&dir, "fresh", &mid.url(), &[]);
    let out = dir.join("fresh.raw");
    nbdcopy(&fresh.url(), &out);
    assert_same_file(&out, &data);
    assert_eq!(mid.metric(CACHE), 1.0, "found in its own file");
    assert_eq!(
        mid.metric("herd_upstream_read_bytes_total"),
        MIB as f64,
        "only the damaged chunk came from the root again"
    );
    assert_eq!(fresh.metric(PARENT), 0.0, "never sent down");
    let log = std::fs::read_to_string(&mid.log).expect("log");
    assert!(log.contains("chunk damaged in the cache file"), "{log}");
    // `herd cache verify` finds nothing left to drop; a new flip it finds.
    drop(fresh);
    drop(mid);
    let verify = |json: bool| {
        let mut c = Command::new(HERD);
        c.args(["cache", "verify"]).arg(dir.join("mid-cache"));
        if json {
            c.arg("--json");
        }
        c.output().expect("herd cache verify")
    };
    let ok = verify(true);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&ok.stdout).expect("json");
    assert_eq!(r["chunks_checked"], 8);
    assert_eq!(r["damaged"], serde_json::json!([]));
    flip(&dir.join("mid-cache/herd-cache.data"), 6 * MIB as u64 + 1);
    let bad = verify(true);
    assert!(!bad.status.success());
    let r: serde_json::Value = serde_json::from_slice(&bad.stdout).expect("json");
    assert_eq!(r["damaged"], serde_json::json!([6]));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("1 damaged chunks dropped"));
    let again = verify(true);
    assert!(again.status.success(), "the damaged chunk was dropped");
    let r: serde_json::Value = serde_json::from_slice(&again.stdout).expect("json");
    assert_eq!(r["chunks_checked"], 7);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_image_changed_under_a_running_tree_is_never_served_mixed() {
    let dir = scratch("int-replace");
    let img = dir.join("golden.img");
    let a = random_image(&img, 8 * MIB);
    // B: the same size, every other MiB different (a patched build).
    let mut b = a.clone();
    for blk in (1..8).step_by(2) {
        for x in &mut b[blk * MIB..blk * MIB + 4096] {
            *x = !*x;
        }
    }
    // No read-ahead: each failing chunk is asked for once per client read.
    let ra: &[&str] = &["--read-ahead", "0"];
    let mut root = Herd::start(&dir, "root", img.to_str().expect("utf8"), ra);
    let mut leaf = Herd::start(&dir, "leaf", &root.url(), ra);
    // The leaf caches the first half of A.
    let mut c = RawClient::connect(leaf.port, "herd");
    assert!(c.read(0, 4 * MIB as u32) == a[..4 * MIB]);
    drop(c);
    // B is written over A in place, under the running root.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .and_then(|f| f.write_all_at(&b, 0).and_then(|()| f.sync_all()))
        .expect("rewrite");
    let all_b = |blocks: &[Result<Vec<u8>, u32>], what: &str| {
        for (i, got) in blocks.iter().enumerate() {
            assert!(
                got.as_ref()
                    .is_ok_and(|x| x[..] == b[i * MIB..(i + 1) * MIB]),
                "{what}: block {i} is not B's"
            );
        }
    };
    let only_a = |blocks: &[Result<Vec<u8>, u32>], what: &str| {
        for (i, got) in blocks.iter().enumerate() {
            if let Ok(bytes) = got {
                assert!(
                    bytes[..] == a[i * MIB..(i + 1) * MIB],
                    "{what}: block {i} is not A's"
                );
            }
        }
    };
    let blocks = read_blocks(leaf.port, a.len());
    only_a(&blocks, "root still on A");
    for i in [5usize, 7] {
        assert_eq!(blocks[i], Err(5), "block {i} changed on disk: EIO");
    }
    assert!(
        blocks[4].is_ok() && blocks[6].is_ok(),
        "unchanged blocks are served"
    );
    assert_eq!(root.metric(IMAGE), 6.0, "2 chunks × 3 reads");
    // The root restarts: a new manifest, a new identity (B). The leaf
    // follows it as a new version: its plain name now serves B, while A
    // stays pinned by identity and never serves a byte of B.
    let a_id = leaf.latest_identity();
    let port = root.port;
    assert!(root.stop().success());
    let root = Herd::start_on(&dir, "root", img.to_str().expect("utf8"), port, ra);
    let rlog = std::fs::read_to_string(&root.log).expect("log");
    assert!(rlog.contains("manifest does not match the image"), "{rlog}");
    leaf.metric_within(
        "herd_image_versions",
        2.0,
        std::time::Duration::from_secs(30),
    );
    let llog = std::fs::read_to_string(&leaf.log).expect("log");
    assert!(llog.contains("the parent serves a new version"), "{llog}");
    assert_eq!(leaf.metric("herd_parent_identity_mismatch"), 0.0);
    let pinned = read_blocks_of(leaf.port, &format!("herd@{a_id}"), a.len());
    only_a(&pinned, "A pinned after the root moved to B");
    for (i, got) in pinned.iter().enumerate().take(4) {
        assert!(got.is_ok(), "block {i} of A is cached at the leaf");
    }
    // Nobody upstream serves A any more: what the leaf lacks of it fails.
    for i in [5usize, 7] {
        assert!(pinned[i].is_err(), "block {i}: no A upstream, EIO");
    }
    all_b(&read_blocks(leaf.port, b.len()), "the new version");
    // B took what A held and B did not change: blocks 0, 2, 4 and 6, and
    // blocks 1 and 3 but their first 64 KiB manifest chunk (changed).
    assert_eq!(
        leaf.metric("herd_version_seeded_bytes_total"),
        (4 * MIB + 2 * (MIB - 64 * 1024)) as f64
    );
    // The leaf restarts on the same cache: it keeps the new version's
    // chunks (B's directory takes the cache's place).
    let lport = leaf.port;
    assert!(leaf.stop().success());
    leaf = Herd::start_on(&dir, "leaf", &root.url(), lport, ra);
    let llog = std::fs::read_to_string(&leaf.log).expect("log");
    assert!(llog.contains("kept from the last run"), "{llog}");
    assert_eq!(leaf.metric("herd_cache_chunks_present"), 8.0);
    let up = leaf.metric("herd_upstream_read_bytes_total");
    all_b(&read_blocks(leaf.port, b.len()), "after the leaf's restart");
    assert_eq!(
        leaf.metric("herd_upstream_read_bytes_total"),
        up,
        "all of B was kept"
    );
    drop(leaf);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_manifests_are_refused_with_a_clear_message() {
    let dir = scratch("int-refuse");
    let img = dir.join("golden.img");
    random_image(&img, 2 * MIB);
    let serve = |manifest: &Path| {
        Command::new(HERD)
            .args(["serve", "--upstream", img.to_str().expect("utf8")])
            .args(["--listen", &format!("127.0.0.1:{}", common::free_port())])
            .arg("--cache-dir")
            .arg(dir.join("cache"))
            .arg("--manifest")
            .arg(manifest)
            .output()
            .expect("herd serve")
    };
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();
    // Garbage.
    let junk = dir.join("junk.manifest");
    std::fs::write(&junk, b"HERDMAN\0 but not really").expect("write");
    let o = serve(&junk);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("not a usable manifest"),
        "{}",
        stderr(&o)
    );
    // Another image's manifest (of another size).
    let other = dir.join("other.img");
    random_image(&other, MIB);
    let om = dir.join("other.manifest");
    let b = Command::new(HERD)
        .args(["manifest", "build", other.to_str().expect("utf8"), "--out"])
        .arg(&om)
        .output()
        .expect("build");
    assert!(b.status.success(), "{}", stderr(&b));
    let o = serve(&om);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("is for an image of 1048576 bytes, but the image is 2097152 bytes"),
        "{}",
        stderr(&o)
    );
    // A manifest made before the image changed.
    let gm = dir.join("golden.manifest");
    let b = Command::new(HERD)
        .args(["manifest", "build", img.to_str().expect("utf8"), "--out"])
        .arg(&gm)
        .output()
        .expect("build");
    assert!(b.status.success(), "{}", stderr(&b));
    std::thread::sleep(std::time::Duration::from_millis(20));
    flip(&img, 100);
    let o = serve(&gm);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("the image changed since manifest"),
        "{}",
        stderr(&o)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
