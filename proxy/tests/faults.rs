//! Restarts, kill -9 and a vanishing parent: the cache never serves torn
//! data, never refetches what it has, and recovers when the parent returns.

mod common;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::{assert_same_file, have, nbdcopy, random_image, scratch, Herd, RawClient};
use herd::cache::bitmap::{decode_header, Decoded, HEADER_LEN};
use herd::nbd::proto;

const MIB: usize = 1 << 20;

#[test]
fn restarted_leaf_keeps_its_cache() {
    if !have("nbdcopy") {
        return;
    }
    let dir = scratch("restart");
    let img = dir.join("golden.img");
    let data = random_image(&img, 16 * MIB);
    let root = Herd::start(&dir, "root", img.to_str().expect("utf8"), &[]);
    let port = common::free_port();
    {
        let leaf = Herd::start_on(&dir, "leaf", &root.url(), port, &[]);
        nbdcopy(&leaf.url(), &dir.join("a.raw"));
        // Graceful stop (SIGTERM) flushes the bitmap.
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(i32::try_from(leaf.child.id()).expect("pid"), libc::SIGTERM) };
        std::thread::sleep(Duration::from_millis(300));
    }
    let leaf = Herd::start_on(&dir, "leaf", &root.url(), port, &[]);
    let out = dir.join("b.raw");
    nbdcopy(&leaf.url(), &out);
    assert_same_file(&out, &data);
    assert_eq!(
        leaf.metric("herd_upstream_read_bytes_total"),
        0.0,
        "nothing refetched"
    );
    assert_eq!(leaf.metric("herd_cache_chunks_present"), 16.0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every chunk the bitmap marks present must hold exactly the source bytes.
fn assert_no_torn_chunk(cache: &std::path::Path, data: &[u8], chunk: usize) -> usize {
    let bmp = std::fs::read(cache.join("herd-cache.bitmap")).expect("bitmap");
    let Decoded::Current(h) = decode_header(&bmp) else {
        panic!("not a current bitmap");
    };
    let f = std::fs::File::open(cache.join("herd-cache.data")).expect("data");
    let mut present = 0;
    for c in 0..h.chunks as usize {
        let word = &bmp[HEADER_LEN as usize + c / 64 * 8..][..8];
        let w = u64::from_le_bytes(word.try_into().expect("8 bytes"));
        if w & (1 << (c % 64)) == 0 {
            continue;
        }
        present += 1;
        let len = chunk.min(data.len() - c * chunk);
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, (c * chunk) as u64)
            .expect("read chunk");
        assert!(buf == data[c * chunk..c * chunk + len], "chunk {c} is torn");
    }
    present
}

#[test]
fn kill9_mid_read_leaves_no_torn_chunk() {
    if !have("nbdcopy") {
        return;
    }
    if !have("nbdkit") {
        return;
    }
    let dir = scratch("kill9");
    let img = dir.join("golden.img");
    let data = random_image(&img, 128 * MIB);
    // A slow source (each read answered after 20 ms) so the kill lands
    // mid-transfer however fast this machine is. A herd root sits between
    // it and the leaf: nbdkit 1.32's delay filter aborts when a client
    // vanishes mid-reply, and the leaf is the one we kill.
    let pport = common::free_port();
    let _parent = common::Peer(
        std::process::Command::new("nbdkit")
            .args([
                "-f",
                "-i",
                "127.0.0.1",
                "-p",
                &pport.to_string(),
                "--filter=delay",
                "file",
            ])
            .arg(&img)
            .arg("rdelay=20ms")
            .stderr(std::fs::File::create(dir.join("nbdkit.log")).expect("log"))
            .spawn()
            .expect("nbdkit"),
    );
    common::wait_port(pport);
    let root = Herd::start(&dir, "root", &format!("nbd://127.0.0.1:{pport}/"), &[]);
    let parent_url = root.url();
    let port = common::free_port();
    let mut leaf = Herd::start_on(&dir, "leaf", &parent_url, port, &[]);
    let mut reader = std::process::Command::new("nbdcopy")
        .args([&leaf.url(), "null:"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("nbdcopy");
    // Kill once the leaf is part-way through.
    leaf.wait_metric_at_least("herd_cache_chunks_present", 8.0, Duration::from_secs(30));
    leaf.kill9();
    let _ = reader.wait();
    let cache = dir.join("leaf-cache");
    let present = assert_no_torn_chunk(&cache, &data, MIB);
    assert!(present >= 1, "some chunks were persisted before the kill");
    assert!(present < 128, "the kill landed mid-read");

    let leaf = Herd::start_on(&dir, "leaf", &parent_url, port, &[]);
    let before = leaf.metric("herd_cache_chunks_present");
    assert_eq!(
        before, present as f64,
        "restart sees exactly the persisted chunks"
    );
    let out = dir.join("after.raw");
    nbdcopy(&leaf.url(), &out);
    assert_same_file(&out, &data);
    let refetched = leaf.metric("herd_upstream_read_bytes_total");
    assert_eq!(
        refetched,
        (128 - present) as f64 * MIB as f64,
        "only missing chunks fetched"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn parent_down_fails_only_uncached_reads_and_recovers() {
    let dir = scratch("parentdown");
    let img = dir.join("golden.img");
    let data = random_image(&img, 8 * MIB);
    let root_port = common::free_port();
    let mut root = Herd::start_on(&dir, "root", img.to_str().expect("utf8"), root_port, &[]);
    let leaf = Herd::start(&dir, "leaf", &root.url(), &[]);
    let mut c = RawClient::connect(leaf.port, "herd");
    // Warm chunk 0.
    c.send(proto::CMD_READ, 1, 0, 4096, &[]);
    let (_, err, got) = c.reply(|_| 4096);
    assert_eq!(err, 0);
    assert_eq!(got, data[..4096]);

    root.kill9();
    // Cached: still served.
    c.send(proto::CMD_READ, 2, 512, 1024, &[]);
    let (h, err, got) = c.reply(|_| 1024);
    assert_eq!((h, err), (2, 0));
    assert_eq!(got, data[512..1536]);
    // Not cached: an NBD error, not a hang or a dropped connection.
    c.send(proto::CMD_READ, 3, 5 * MIB as u64, 4096, &[]);
    let (h, err, _) = c.reply(|_| 4096);
    assert_eq!((h, err), (3, proto::EIO));

    // Parent returns on the same address: the same connection recovers.
    let _root = Herd::start_on(&dir, "root", img.to_str().expect("utf8"), root_port, &[]);
    c.send(proto::CMD_READ, 4, 5 * MIB as u64, 4096, &[]);
    let (h, err, got) = c.reply(|_| 4096);
    assert_eq!((h, err), (4, 0));
    assert_eq!(got, data[5 * MIB..5 * MIB + 4096]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn leaf_started_before_its_parent_waits_for_it() {
    let dir = scratch("parentlate");
    let img = dir.join("golden.img");
    let data = random_image(&img, MIB);
    let root_port = common::free_port();
    let leaf_port = common::free_port();
    let _leaf = common::Peer(
        std::process::Command::new(common::HERD)
            .args([
                "serve",
                "--upstream",
                &format!("nbd://127.0.0.1:{root_port}/herd"),
            ])
            .args(["--listen", &format!("127.0.0.1:{leaf_port}")])
            .arg("--cache-dir")
            .arg(dir.join("leaf-cache"))
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn leaf"),
    );
    std::thread::sleep(Duration::from_millis(700));
    let _root = Herd::start_on(&dir, "root", img.to_str().expect("utf8"), root_port, &[]);
    common::wait_port(leaf_port);
    let mut c = RawClient::connect(leaf_port, "herd");
    c.send(proto::CMD_READ, 1, 1000, 100, &[]);
    let (_, err, got) = c.reply(|_| 100);
    assert_eq!(err, 0);
    assert_eq!(got, data[1000..1100]);
    let _ = std::fs::remove_dir_all(&dir);
}
