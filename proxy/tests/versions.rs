//! Rolling updates through a three-level tree (root → relay → leaf): the
//! root's image file is replaced and the root gets SIGHUP; the new version
//! goes down the tree moving only the chunks that changed; a reader
//! connected before keeps the old bytes to the end, a new one gets the new
//! bytes, a qcow2 overlay pinned to the old version (`herd@IDENTITY`)
//! still reads it; once nobody reads the old version it is retired at
//! every level and its cache removed. An image that changes size is a new
//! version like any other.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{have, random_image, scratch, Herd, RawClient};
use herd::nbd::proto;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
const CHUNK: usize = 64 * KIB;

/// How long a new version may take to reach every level.
const PROPAGATE: Duration = Duration::from_secs(30);

#[test]
fn an_update_moves_only_changed_chunks_and_old_readers_keep_old_bytes() {
    let dir = scratch("versions-update");
    let img = dir.join("golden.img");
    let a = random_image(&img, 16 * MIB);
    std::fs::write(dir.join("a-copy.img"), &a).expect("copy of A");
    // 64 KiB chunks, no read-ahead: bytes moved count chunks exactly.
    let args: &[&str] = &[
        "--chunk-size",
        "64KiB",
        "--read-ahead",
        "0",
        "--retire-after",
        "1",
    ];
    let root = Herd::start(&dir, "root", img.to_str().expect("utf8"), args);
    let relay = Herd::start(&dir, "relay", &root.url(), args);
    let leaf = Herd::start(&dir, "leaf", &relay.url(), args);

    // A reader on version A, connected through the update.
    let mut old = RawClient::connect(leaf.port, "herd");
    assert!(old.read_all() == a, "the leaf serves A");
    let a_id = leaf.latest_identity();
    // A qcow2 overlay whose backing pins A.
    let overlay = dir.join("vm.qcow2");
    let pinned = format!("nbd://127.0.0.1:{}/herd@{a_id}", leaf.port);
    let qemu = have("qemu-img");
    if qemu {
        common::run(Command::new("qemu-img").args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            &pinned,
            overlay.to_str().expect("utf8"),
        ]));
    }

    // B: 13 of the 256 chunks (5 %) changed, renamed into place.
    let changed: Vec<usize> = (0..13).map(|k| 3 + 19 * k).collect();
    let mut b = a.clone();
    for &c in &changed {
        for x in &mut b[c * CHUNK..c * CHUNK + 512] {
            *x = !*x;
        }
    }
    let next = dir.join("golden.img.new");
    std::fs::write(&next, &b).expect("write B");
    std::fs::rename(&next, &img).expect("rename B into place");
    let root_before = root.metric("herd_served_bytes_total");
    let relay_before = relay.metric("herd_served_bytes_total");
    let pid = root.child.id().to_string();
    common::run(Command::new("kill").args(["-HUP", &pid]));
    // The new version reaches every level; the old one stays (read).
    for h in [&root, &relay, &leaf] {
        h.metric_within("herd_image_versions", 2.0, PROPAGATE);
    }

    // A new reader gets B; the old one still reads only A.
    let mut new = RawClient::connect(leaf.port, "herd");
    assert!(new.read_all() == b, "a new reader gets B");
    assert!(old.read_all() == a, "the old reader still gets A");
    let b_id = leaf.latest_identity();
    assert_ne!(a_id, b_id);
    if qemu {
        common::run(Command::new("qemu-img").args([
            "compare",
            "-q",
            overlay.to_str().expect("utf8"),
            dir.join("a-copy.img").to_str().expect("utf8"),
        ]));
    }
    // Only the changed chunks moved, on each link of the tree.
    let moved = (changed.len() * CHUNK) as f64;
    let from_root = root.metric("herd_served_bytes_total") - root_before;
    let from_relay = relay.metric("herd_served_bytes_total") - relay_before;
    assert!(
        (moved..=1.1 * moved).contains(&from_root),
        "root sent {from_root} bytes for {moved} changed"
    );
    assert!(
        (moved..=1.1 * moved).contains(&from_relay),
        "relay sent {from_relay} bytes for {moved} changed"
    );
    // The rest came from each node's old version: what clients asked for
    // at once, the other chunks in the background (so the old version can
    // go without them ever moving again).
    let seeded = (16 * MIB - changed.len() * CHUNK) as f64;
    leaf.metric_within("herd_version_seeded_bytes_total", seeded, PROPAGATE);
    relay.metric_within("herd_version_seeded_bytes_total", seeded, PROPAGATE);
    assert_eq!(
        relay.metric("herd_served_bytes_total") - relay_before,
        from_relay
    );

    // Nobody reads A any more: retired at every level, caches removed.
    drop(old);
    drop(new);
    for h in [&leaf, &relay, &root] {
        h.metric_within("herd_image_versions", 1.0, PROPAGATE);
    }
    assert!(
        !dir.join("leaf-cache").join("herd-cache.data").exists(),
        "A's cache is removed"
    );
    assert!(dir.join("leaf-cache/versions/v1/herd-cache.data").exists());
    let Err((replies, _)) = RawClient::try_connect(leaf.port, &format!("herd@{a_id}")) else {
        panic!("a retired version is gone");
    };
    assert_eq!(replies, [proto::REP_ERR_UNKNOWN]);
    let mut c = RawClient::connect(leaf.port, &format!("herd@{}", &b_id[..16]));
    assert!(c.read_all() == b, "B pinned by a prefix of its identity");
    assert_eq!(leaf.metric("herd_chunk_digest_failures_total"), 0.0);
}

#[test]
fn an_image_that_grows_is_a_new_version_not_an_error() {
    let dir = scratch("versions-grow");
    let img = dir.join("golden.img");
    let a = random_image(&img, 4 * MIB);
    let args: &[&str] = &["--chunk-size", "64KiB", "--read-ahead", "0"];
    let root = Herd::start(&dir, "root", img.to_str().expect("utf8"), args);
    let leaf = Herd::start(&dir, "leaf", &root.url(), args);
    let mut old = RawClient::connect(leaf.port, "herd");
    assert!(old.read_all() == a);
    // B: A with 2 MiB more at the end.
    let mut b = a.clone();
    b.extend(random_image(&dir.join("tail.img"), 2 * MIB));
    let next = dir.join("golden.img.new");
    std::fs::write(&next, &b).expect("write B");
    std::fs::rename(&next, &img).expect("rename B into place");
    let before = root.metric("herd_served_bytes_total");
    common::run(Command::new("kill").args(["-HUP", &root.child.id().to_string()]));
    leaf.metric_within("herd_image_versions", 2.0, PROPAGATE);
    let mut new = RawClient::connect(leaf.port, "herd");
    assert_eq!(new.size, (6 * MIB) as u64, "a new reader sees the new size");
    assert!(new.read_all() == b, "and the new bytes");
    assert_eq!(old.size, (4 * MIB) as u64);
    assert!(old.read_all() == a, "the old reader keeps A");
    // Only the new 2 MiB moved; the leaf had the first 4 MiB.
    assert_eq!(
        root.metric("herd_served_bytes_total") - before,
        (2 * MIB) as f64
    );
}
