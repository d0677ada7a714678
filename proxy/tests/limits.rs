//! Bounded resources on a real herd: connection limits refuse with the
//! reason, a client that stops reading stalls only itself and holds at
//! most its reply budget (then is cut off), idle connections are closed,
//! and fetched bytes wait for the disk within the fetch buffer.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{assert_same_file, have, random_image, scratch, Herd, RawClient};
use herd::nbd::proto;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

#[test]
fn connection_limits_refuse_with_the_reason() {
    let dir = scratch("limits-conns");
    let img = dir.join("img");
    let data = random_image(&img, 2 * MIB as usize);
    let herd = Herd::start(
        &dir,
        "root",
        img.to_str().expect("utf8"),
        &["--max-connections-per-client", "2"],
    );
    // Herd::start's port probes are connections too: let them end.
    herd.metric_eventually("herd_nbd_connections_open", 0.0);
    let a = RawClient::connect(herd.port, "herd");
    let _b = RawClient::connect(herd.port, "herd");
    herd.metric_eventually("herd_nbd_connections_open", 2.0);
    let Err((replies, msg)) = RawClient::try_connect(herd.port, "herd") else {
        panic!("a third connection from 127.0.0.1 was served");
    };
    assert_eq!(replies, vec![proto::REP_ERR_POLICY]);
    assert!(
        msg.contains("too many connections from 127.0.0.1: 2"),
        "{msg}"
    );
    if have("nbdinfo") {
        let out = std::process::Command::new("nbdinfo")
            .arg(herd.url())
            .output()
            .expect("nbdinfo");
        assert!(!out.status.success(), "a third client is refused");
    }
    let refusals = if have("nbdinfo") { 2 } else { 1 };
    herd.metric_eventually(
        "herd_nbd_connections_refused_total{reason=\"limit\"}",
        f64::from(refusals),
    );
    assert_eq!(
        herd.log_lines("too many connections from 127.0.0.1"),
        refusals as usize
    );
    // One leaves: the next is served.
    drop(a);
    herd.metric_eventually("herd_nbd_connections_open", 1.0);
    let mut c = RawClient::connect(herd.port, "herd");
    assert_eq!(c.read(0, 4096), &data[..4096]);
}

#[test]
fn a_client_that_stops_reading_stalls_only_itself() {
    let dir = scratch("limits-stall");
    let img = dir.join("img");
    let data = random_image(&img, 32 * MIB as usize);
    let herd = Herd::start(
        &dir,
        "root",
        img.to_str().expect("utf8"),
        &[
            "--connection-buffer",
            "1MiB",
            "--reply-buffer",
            "4MiB",
            "--write-timeout",
            "3",
        ],
    );
    // Warm: replies come from the cache.
    let warm = dir.join("warm");
    common::nbdcopy(&herd.url(), &warm);

    // 2000 reads of 60 KiB (copied replies, below the sendfile size) that
    // are never read back: 117 MiB of replies against a 1 MiB budget.
    let mut stuck = RawClient::connect(herd.port, "herd");
    stuck.s.set_nodelay(true).expect("nodelay");
    let len = 60 * KIB;
    let mut reqs = Vec::new();
    for i in 0..2000u64 {
        let offset = (i * len) % (32 * MIB - len);
        proto::encode_request(
            &proto::Request {
                flags: 0,
                command: proto::CMD_READ,
                handle: i,
                offset,
                length: u32::try_from(len).expect("len"),
            },
            &mut reqs,
        );
    }
    stuck.s.write_all(&reqs).expect("send requests");
    // Stalled: it holds replies, and no more than its budget.
    herd.wait_metric_at_least(
        "herd_reply_buffer_bytes",
        (MIB - len) as f64,
        Duration::from_secs(10),
    );
    // What it holds moves (the kernel's send buffer grows under autotuning
    // and takes a little more), but never past its budget.
    let peak = herd.metric("herd_reply_buffer_bytes_peak");
    assert!(peak <= MIB as f64, "the stuck client held {peak} > 1 MiB");

    // Another client is served in full meanwhile.
    let out = dir.join("other");
    common::nbdcopy(&herd.url(), &out);
    assert_same_file(&out, &data);
    assert!(herd.metric("herd_reply_buffer_bytes_peak") <= 4.0 * MIB as f64);

    // Past --write-timeout the stuck connection is closed and its budget
    // given back.
    herd.metric_eventually("herd_reply_buffer_bytes", 0.0);
    assert_eq!(herd.log_lines("stopped reading its replies"), 1);
    // The socket ends after the replies that had fit in it.
    stuck
        .s
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut sink = Vec::new();
    let r = stuck.s.read_to_end(&mut sink);
    assert!(
        r.is_ok()
            || r.as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "{r:?}"
    );
    assert!((sink.len() as u64) < 2000 * len, "not every reply was sent");
}

/// --write-timeout is about a client that stops reading, not a slow one:
/// a client that keeps reading, slower than herd can reply, keeps its
/// connection for longer than the timeout (it once lost it when the
/// deadline covered a whole batch of queued replies).
#[test]
fn a_slow_client_that_keeps_reading_is_not_cut() {
    let dir = scratch("limits-slow");
    let img = dir.join("img");
    let data = random_image(&img, 32 * MIB as usize);
    let herd = Herd::start(
        &dir,
        "root",
        img.to_str().expect("utf8"),
        &["--connection-buffer", "1MiB", "--write-timeout", "1"],
    );
    let warm = dir.join("warm");
    common::nbdcopy(&herd.url(), &warm);
    // 1000 reads of 60 KiB (59 MiB), read back at ~15 MiB/s: ~4 s.
    let mut c = RawClient::connect(herd.port, "herd");
    let len = 60 * KIB;
    let n = 1000u64;
    let offset = |i: u64| (i * len) % (32 * MIB - len);
    let mut reqs = Vec::new();
    for i in 0..n {
        proto::encode_request(
            &proto::Request {
                flags: 0,
                command: proto::CMD_READ,
                handle: i,
                offset: offset(i),
                length: u32::try_from(len).expect("len"),
            },
            &mut reqs,
        );
    }
    c.s.write_all(&reqs).expect("send requests");
    c.s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let t = Instant::now();
    let mut seen = vec![false; n as usize];
    let mut buf = vec![0u8; len as usize];
    for got in 0..n {
        let mut hdr = [0u8; 16];
        c.s.read_exact(&mut hdr)
            .unwrap_or_else(|e| panic!("reply {got} of {n}: {e}"));
        assert_eq!(&hdr[..4], &[0x67, 0x44, 0x66, 0x98], "simple reply magic");
        assert_eq!(&hdr[4..8], &[0; 4], "reply error");
        let h = u64::from_be_bytes(hdr[8..16].try_into().expect("8 bytes"));
        c.s.read_exact(&mut buf).expect("reply data");
        let o = offset(h) as usize;
        assert_eq!(&buf[..], &data[o..o + len as usize], "reply {h}");
        seen[h as usize] = true;
        // Pace the reading at ~15 MiB/s.
        let due = Duration::from_secs_f64((got + 1) as f64 * len as f64 / (15.0 * MIB as f64));
        if let Some(wait) = due.checked_sub(t.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    assert!(seen.iter().all(|s| *s));
    assert!(
        t.elapsed() > Duration::from_secs(2),
        "the client read for {:?}, not longer than --write-timeout",
        t.elapsed()
    );
    assert_eq!(herd.log_lines("stopped reading its replies"), 0);
}

#[test]
fn idle_connections_are_closed_after_the_timeout() {
    let dir = scratch("limits-idle");
    let img = dir.join("img");
    random_image(&img, MIB as usize);
    let herd = Herd::start(
        &dir,
        "root",
        img.to_str().expect("utf8"),
        &["--idle-timeout", "1"],
    );
    let mut idle = RawClient::connect(herd.port, "herd");
    let started = Instant::now();
    idle.s
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let mut b = [0u8; 1];
    let n = idle.s.read(&mut b).expect("closed, not timed out");
    assert_eq!(n, 0, "the server closed the idle connection");
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_eq!(herd.log_lines("closing an idle connection"), 1);
    // A busy connection is not idle.
    let mut busy = RawClient::connect(herd.port, "herd");
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(400));
        busy.read(0, 4096);
    }
}

#[test]
fn fetched_bytes_wait_for_the_disk_within_the_fetch_buffer() {
    if !have("nbdcopy") {
        return;
    }
    let dir = scratch("limits-fetch");
    let img = dir.join("img");
    let data = random_image(&img, 32 * MIB as usize);
    let chunk = ["--chunk-size", "64KiB"];
    let root = Herd::start(&dir, "root", img.to_str().expect("utf8"), &chunk);
    let mut args = chunk.to_vec();
    args.extend(["--fetch-buffer", "64KiB"]);
    let leaf = Herd::start(&dir, "leaf", &root.url(), &args);
    let out = dir.join("copy");
    common::nbdcopy(&leaf.url(), &out);
    assert_same_file(&out, &data);
    // One run (at most 1 MiB) at a time waits for the disk, however many
    // reads nbdcopy keeps in flight.
    let peak = leaf.metric("herd_cache_unpersisted_bytes_peak");
    assert!(peak > 0.0 && peak <= MIB as f64, "peak {peak}");
    leaf.metric_eventually("herd_cache_unpersisted_bytes", 0.0);
    leaf.metric_eventually("herd_cache_chunks_present", 512.0);
}

/// herd raises its open-file soft limit to the hard one (a connection
/// holds two descriptors, and systemd's soft 1024 would cap clients near
/// 500), and names a hard limit too low for `--max-connections`.
#[test]
fn the_open_file_limit_is_raised_and_a_short_one_is_named() {
    if !have("prlimit") {
        return;
    }
    let dir = scratch("limits-nofile");
    let img = dir.join("golden.img");
    random_image(&img, 1 << 20);
    // Starts herd under `nofile` (soft:hard); returns its "Max open files"
    // line and its log.
    let run = |name: &str, nofile: &str| {
        let port = common::free_port();
        let log = dir.join(format!("{name}.log"));
        let mut child = std::process::Command::new("prlimit")
            .arg(format!("--nofile={nofile}"))
            .arg(common::HERD)
            .args(["serve", "--upstream", img.to_str().expect("utf8")])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--cache-dir")
            .arg(dir.join(format!("{name}-cache")))
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn herd under prlimit");
        common::wait_port(port);
        let limits =
            std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap_or_default();
        let _ = child.kill();
        let _ = child.wait();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap_or_default()
            .to_owned();
        (line, std::fs::read_to_string(&log).unwrap_or_default())
    };
    let (line, log) = run("raised", "256:8192");
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields.get(3..5), Some(&["8192", "8192"][..]), "{line}");
    assert!(!log.contains("open-file limit"), "{log}");
    let (_, log) = run("short", "512:512");
    assert!(
        log.contains("open-file limit is below what --max-connections needs"),
        "{log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
