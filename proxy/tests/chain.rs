//! A tree of real herd daemons (and qemu-nbd / nbdkit as parents) read by
//! real clients: bytes must match the source exactly.

mod common;

use std::process::{Command, Stdio};

use common::{
    assert_links_ran_on, assert_same_file, have, nbdcopy, random_image, run, scratch, Herd, Peer,
};

const MIB: usize = 1 << 20;

#[test]
fn three_level_chain_is_byte_identical() {
    if !have("nbdcopy") || !have("qemu-img") {
        return;
    }
    let dir = scratch("chain3");
    let img = dir.join("golden.img");
    let data = random_image(&img, 256 * MIB);
    let root = Herd::start(&dir, "root", img.to_str().expect("utf8"), &[]);
    // mid reads over the epoll fallback, leaf over the tests' default
    // (herd's, rings, or epoll when the xtask reruns these tests with
    // HERD_TEST_NET_IO=epoll).
    let mid = Herd::start(&dir, "mid", &root.url(), &["--net-io", "epoll"]);
    let leaf = Herd::start(&dir, "leaf", &mid.url(), &["--chunk-size", "256KiB"]);

    let out = dir.join("nbdcopy.raw");
    nbdcopy(&leaf.url(), &out);
    assert_same_file(&out, &data);
    std::fs::remove_file(&out).expect("rm");

    let out = dir.join("qemu-img.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &leaf.url()])
        .arg(&out));
    assert_same_file(&out, &data);

    // Each level fetched the image exactly once from the level above.
    let size = data.len() as f64;
    assert_eq!(root.metric("herd_upstream_read_bytes_total"), size);
    assert_eq!(mid.metric("herd_upstream_read_bytes_total"), size);
    assert_eq!(leaf.metric("herd_upstream_read_bytes_total"), size);
    assert_eq!(root.metric("herd_served_bytes_total"), size);
    assert_eq!(leaf.metric("herd_served_bytes_total"), 2.0 * size);
    assert_eq!(
        leaf.metric_eventually("herd_cache_chunks_present", 1024.0),
        1024.0
    );
    assert_links_ran_on(&mid, "nbd", "epoll", 1.0);
    let io = common::net_io();
    assert_links_ran_on(&leaf, "nbd", &io, 1.0);
    if io == "uring" {
        // leaf fetches 256 KiB chunks: large enough to land in place.
        common::assert_received_in_place(&leaf, "nbd");
        // With chunks fetched side by side, its reader slept until a
        // payload was whole.
        common::assert_waited_for_whole_payloads(&leaf, "nbd");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Where io_uring is forbidden (a container's default seccomp profile), a
/// leaf asked for rings serves the same bytes over the epoll fallback and
/// says so once, rather than failing or pretending.
#[test]
fn a_leaf_where_io_uring_is_forbidden_falls_back_to_epoll_and_says_so() {
    if !have("nbdcopy") {
        return;
    }
    let dir = scratch("no-uring");
    let img = dir.join("golden.img");
    let data = random_image(&img, 32 * MIB);
    let root = Herd::start(&dir, "root", img.to_str().expect("utf8"), &[]);
    let leaf = Herd::start_without_io_uring(&dir, "leaf", &root.url(), &["--net-io", "uring"]);

    let out = dir.join("copy.raw");
    nbdcopy(&leaf.url(), &out);
    assert_same_file(&out, &data);
    assert_links_ran_on(&leaf, "nbd", "epoll", 1.0);
    assert_eq!(
        leaf.log_lines("io_uring unavailable for sockets; using epoll"),
        1
    );
    // The cache's file I/O falls back too (pread/pwrite), also logged.
    assert_eq!(
        leaf.log_lines("io_uring unavailable, using pread/pwrite"),
        1
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn qemu_nbd_and_nbdkit_work_as_parents() {
    if !have("nbdcopy") || !have("qemu-nbd") || !have("nbdkit") {
        return;
    }
    let dir = scratch("peers");
    let img = dir.join("golden.img");
    let data = random_image(&img, 32 * MIB);

    let qport = common::free_port();
    let _q = Peer(
        Command::new("qemu-nbd")
            .args([
                "-r",
                "-t",
                "-f",
                "raw",
                "-e",
                "8",
                "-x",
                "golden",
                "-p",
                &qport.to_string(),
                "-b",
                "127.0.0.1",
            ])
            .arg(&img)
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-nbd"),
    );
    common::wait_port(qport);
    let via_qemu = Herd::start(
        &dir,
        "qleaf",
        &format!("nbd://127.0.0.1:{qport}/golden"),
        &[],
    );
    let out = dir.join("q.raw");
    nbdcopy(&via_qemu.url(), &out);
    assert_same_file(&out, &data);

    // nbdkit over a Unix socket exercises nbd+unix:// too.
    let sock = dir.join("nbdkit.sock");
    let _k = Peer(
        Command::new("nbdkit")
            .args(["-f", "-U"])
            .arg(&sock)
            .arg("file")
            .arg(&img)
            .stderr(Stdio::null())
            .spawn()
            .expect("nbdkit"),
    );
    common::wait_socket(&sock);
    let via_kit = Herd::start(
        &dir,
        "kleaf",
        &format!("nbd+unix:///?socket={}", sock.display()),
        &[],
    );
    let out = dir.join("k.raw");
    nbdcopy(&via_kit.url(), &out);
    assert_same_file(&out, &data);
    assert_eq!(
        via_kit.metric("herd_upstream_read_bytes_total"),
        data.len() as f64
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn concurrent_readers_make_the_root_serve_each_chunk_once() {
    if !have("nbdcopy") {
        return;
    }
    let dir = scratch("sixteen");
    let img = dir.join("golden.img");
    let data = random_image(&img, 64 * MIB);
    let root = Herd::start(&dir, "root", img.to_str().expect("utf8"), &[]);
    let leaf = Herd::start(&dir, "leaf", &root.url(), &[]);
    let readers: Vec<_> = (0..16)
        .map(|_| {
            Command::new("nbdcopy")
                .args([&leaf.url(), "null:"])
                .spawn()
                .expect("nbdcopy")
        })
        .collect();
    for mut r in readers {
        assert!(r.wait().expect("wait").success(), "a reader failed");
    }
    let size = data.len() as f64;
    assert_eq!(leaf.metric("herd_served_bytes_total"), 16.0 * size);
    // 64 chunks of 1 MiB: each crossed the leaf→root link once.
    assert_eq!(root.metric("herd_served_bytes_total"), size);
    assert_eq!(leaf.metric("herd_upstream_read_bytes_total"), size);
    assert_eq!(leaf.metric("herd_chunk_misses_total"), 64.0);
    assert!(
        leaf.metric("herd_singleflight_joins_total") + leaf.metric("herd_chunk_hits_total") > 0.0,
        "the other readers joined or hit"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
