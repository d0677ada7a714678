//! The iSCSI upstream against a real target (tgtd, standing in for LIO).

mod common;

use std::process::Command;
use std::time::Duration;

use common::{
    assert_same_file, data_chunk_bytes, have, nbdcopy, random_image, scratch, sparse_image, Herd,
    RawClient, Tgtd,
};

const MIB: usize = 1 << 20;

#[test]
fn whole_lun_through_herd_is_byte_identical() {
    if !have("tgtd") || !have("nbdcopy") {
        return;
    }
    let dir = scratch("iscsi-whole");
    let img = dir.join("lun.img");
    let data = random_image(&img, 256 * MIB);
    let t = Tgtd::start(&img, None);
    let h = Herd::start(&dir, "root", &t.url(None), &[]);
    let out = dir.join("out.raw");
    nbdcopy(&h.url(), &out);
    assert_same_file(&out, &data);
    assert_eq!(
        h.metric("herd_upstream_read_bytes_total"),
        data.len() as f64
    );
    // Several READs were in flight on the session at once.
    assert!(
        h.metric("herd_iscsi_in_flight_max") > 1.0,
        "commands were not pipelined"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn chap_right_works_and_wrong_fails_clearly() {
    if !have("tgtd") {
        return;
    }
    let dir = scratch("iscsi-chap");
    let img = dir.join("lun.img");
    let data = random_image(&img, 4 * MIB);
    let t = Tgtd::start(&img, Some(("herduser", "correct-secret-123")));
    let good = dir.join("good.secret");
    std::fs::write(&good, "correct-secret-123\n").expect("write");
    let h = Herd::start(
        &dir,
        "good",
        &t.url(Some("herduser")),
        &["--iscsi-secret-file", good.to_str().expect("utf8")],
    );
    let out = dir.join("out.raw");
    nbdcopy(&h.url(), &out);
    assert_same_file(&out, &data);

    let bad = dir.join("bad.secret");
    std::fs::write(&bad, "wrong-secret-4567\n").expect("write");
    let start = std::time::Instant::now();
    let o = Command::new(common::HERD)
        .args([
            "serve",
            "--upstream",
            &t.url(Some("herduser")),
            "--listen",
            "127.0.0.1:1",
        ])
        .arg("--cache-dir")
        .arg(dir.join("bad-cache"))
        .args(["--iscsi-secret-file", bad.to_str().expect("utf8")])
        .output()
        .expect("run herd");
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("authentication failed"), "{e}");
    assert!(
        !e.contains("wrong-secret-4567"),
        "the secret is never printed"
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "no retry storm on a bad secret"
    );

    // No credentials at all: the error says how to give them.
    let o = Command::new(common::HERD)
        .args([
            "serve",
            "--upstream",
            &t.url(None),
            "--listen",
            "127.0.0.1:1",
        ])
        .arg("--cache-dir")
        .arg(dir.join("none-cache"))
        .output()
        .expect("run herd");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("CHAP"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Reads a LUN through herd with nbdcopy while tgtd is killed (once herd
/// has fetched `kill_after_mib`) and restarted `pause` later; the read must
/// succeed with identical bytes. Returns herd's log.
fn read_across_target_restart(
    name: &str,
    size_mib: usize,
    herd_args: &[&str],
    kill_after_mib: usize,
    pause: Duration,
) -> String {
    let dir = scratch(name);
    let img = dir.join("lun.img");
    let data = random_image(&img, size_mib * MIB);
    let mut t = Tgtd::start(&img, None);
    let h = Herd::start(&dir, "root", &t.url(None), herd_args);
    let out = dir.join("out.raw");
    let mut reader = Command::new("nbdcopy")
        .arg(h.url())
        .arg(&out)
        .spawn()
        .expect("nbdcopy");
    h.wait_metric_at_least(
        "herd_upstream_read_bytes_total",
        (kill_after_mib * MIB) as f64,
        Duration::from_secs(30),
    );
    t.kill9();
    std::thread::sleep(pause);
    t.launch();
    assert!(
        reader.wait().expect("wait").success(),
        "the read failed across the restart"
    );
    assert_same_file(&out, &data);
    // Every session (the first and the one after the restart) ran on the
    // path asked for.
    let io = common::net_io_of(herd_args);
    common::assert_links_ran_on(&h, "iscsi", &io, 2.0);
    // On both paths the reader slept until a chunk's payload was whole.
    common::assert_waited_for_whole_payloads(&h, "iscsi");
    if io == "uring" {
        // Chunk runs come as Data-In large enough to land in place.
        common::assert_received_in_place(&h, "iscsi");
        // With several chunks in flight, answers queue back to back: a
        // payload's receive takes the next PDU's header along.
        let along = common::ring_completions(&h, "iscsi", "recv_then_header");
        assert!(
            along.unwrap_or(0.0) > 0.0,
            "no header came with a payload: {along:?}"
        );
    }
    let log = std::fs::read_to_string(&h.log).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    log
}

/// A target that hangs (SIGSTOP: no RST, no FIN) is found by NOP-Out
/// pings: the session is dropped and, once the target runs again, the read
/// in progress completes with the right bytes.
#[test]
fn a_hung_target_is_caught_by_nop_out_pings() {
    if !have("tgtd") || !have("nbdcopy") {
        return;
    }
    let dir = scratch("iscsi-nop");
    let img = dir.join("lun.img");
    let data = random_image(&img, 64 * MIB);
    let t = Tgtd::start(&img, None);
    let h = Herd::start(&dir, "root", &t.url(None), &[]);
    assert_eq!(h.metric("herd_iscsi_ping_failures_total"), 0.0);
    let out = dir.join("out.raw");
    let mut reader = Command::new("nbdcopy")
        .arg(h.url())
        .arg(&out)
        .spawn()
        .expect("nbdcopy");
    h.wait_metric_at_least(
        "herd_upstream_read_bytes_total",
        (8 * MIB) as f64,
        Duration::from_secs(30),
    );
    t.signal("STOP");
    // Two ping periods and a timeout: the ping must have gone unanswered.
    h.wait_metric_at_least(
        "herd_iscsi_ping_failures_total",
        1.0,
        Duration::from_secs(15),
    );
    assert!(h.metric("herd_iscsi_ping_failures_total") >= 1.0);
    t.signal("CONT");
    assert!(reader.wait().expect("wait").success(), "the read failed");
    assert_same_file(&out, &data);
    let log = std::fs::read_to_string(&h.log).unwrap_or_default();
    assert!(log.contains("did not answer a NOP-Out ping"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn target_restart_mid_read_is_invisible_to_the_reader() {
    if !have("tgtd") || !have("nbdcopy") {
        return;
    }
    let log = read_across_target_restart("iscsi-restart", 128, &[], 8, Duration::from_millis(1500));
    assert!(
        log.contains("session re-established"),
        "herd logged in again"
    );
}

/// Cold 4 KiB reads one at a time, each its own chunk, so the session has
/// one command in flight; every byte checked. Returns the session's spin
/// counters (request, idle, microseconds).
fn qd1_fetches(spin_us: &str, net_io: &str) -> (f64, f64, f64) {
    let dir = scratch(&format!("iscsi-spin-{spin_us}-{net_io}"));
    let img = dir.join("lun.img");
    let data = random_image(&img, 64 * MIB);
    let t = Tgtd::start(&img, None);
    let h = Herd::start(
        &dir,
        "root",
        &t.url(None),
        &["--spin-us", spin_us, "--net-io", net_io],
    );
    let mut c = RawClient::connect(h.port, "");
    // Backwards, so no read looks sequential and earns read-ahead.
    for i in (0..64u64).rev() {
        let off = i * MIB as u64 + 4096 * (i % 7);
        assert_eq!(
            c.read(off, 4096),
            data[off as usize..off as usize + 4096],
            "chunk {i}"
        );
    }
    // Two sessions: the one logged in at start-up and the connection's
    // core's own, which its misses went over.
    common::assert_links_ran_on(&h, "iscsi", net_io, 2.0);
    assert_eq!(
        h.log_lines("iSCSI session established"),
        1,
        "one core's login"
    );
    let counters = h.spins("herd_iscsi");
    drop(h);
    drop(t);
    let _ = std::fs::remove_dir_all(&dir);
    counters
}

#[test]
fn a_session_with_one_command_in_flight_spins_for_its_answer() {
    if !have("tgtd") {
        return;
    }
    // Both paths: epoll peeks at the socket, a ring at its completions.
    for io in ["epoll", "uring"] {
        let (request, idle, us) = qd1_fetches("1000", io);
        assert!(
            request > 0.0,
            "{io}: no spin saw its answer arrive ({idle} idle)"
        );
        assert!(
            us > 0.0,
            "{io}: spin time not counted ({request} request, {idle} idle)"
        );
        eprintln!("iSCSI spins on {io}: {request} ended by an answer, {idle} idle, {us} µs");
        assert_eq!(
            qd1_fetches("0", io),
            (0.0, 0.0, 0.0),
            "{io}: --spin-us 0 still spun"
        );
    }
}

#[test]
fn thirty_two_concurrent_readers_get_correct_data() {
    if !have("tgtd") || !have("nbdcopy") {
        return;
    }
    let dir = scratch("iscsi-32");
    let img = dir.join("lun.img");
    let data = random_image(&img, 32 * MIB);
    let t = Tgtd::start(&img, None);
    // Four cores sharing one session: the readers spread over the cores
    // (fewest live connections first), and their misses all go over it.
    let h = Herd::start(
        &dir,
        "root",
        &t.url(None),
        &["--workers", "4", "--connections", "1"],
    );
    let readers: Vec<_> = (0..32)
        .map(|i| {
            let out = dir.join(format!("r{i}.raw"));
            (
                Command::new("nbdcopy")
                    .arg(h.url())
                    .arg(&out)
                    .spawn()
                    .expect("nbdcopy"),
                out,
            )
        })
        .collect();
    for (mut r, out) in readers {
        assert!(r.wait().expect("wait").success());
        assert_same_file(&out, &data);
    }
    assert_eq!(
        h.metric("herd_upstream_read_bytes_total"),
        data.len() as f64,
        "each chunk read from the LUN once"
    );
    assert!(
        h.metric("herd_iscsi_in_flight_max") > 1.0,
        "commands were not pipelined"
    );
    assert_eq!(
        h.log_lines("iSCSI session established"),
        1,
        "--connections 1: the cores logged in more than one session"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn crc32c_digests_are_negotiated_and_verified() {
    if !have("tgtd") || !have("nbdcopy") {
        return;
    }
    let dir = scratch("iscsi-digest");
    let img = dir.join("lun.img");
    let data = random_image(&img, 16 * MIB);
    let t = Tgtd::start(&img, None);
    t.want_digests();
    let h = Herd::start(&dir, "root", &t.url(None), &["--iscsi-digests"]);
    let out = dir.join("out.raw");
    nbdcopy(&h.url(), &out);
    assert_same_file(&out, &data);
    let log = std::fs::read_to_string(&h.log).unwrap_or_default();
    assert!(
        log.contains("header_digest=true") && log.contains("data_digest=true"),
        "digests were not negotiated: {log}"
    );
    assert!(!log.contains("digest mismatch"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A TCP relay to `to` that flips one bit of what the target sends on its
/// first connection, `at` bytes in; later connections pass untouched.
/// Returns its port and a count of connections.
fn corrupting_relay(to: u16, at: u64) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind relay");
    let port = l.local_addr().expect("addr").port();
    let count = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = std::sync::Arc::clone(&count);
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(client) = c else { return };
            let Ok(target) = std::net::TcpStream::connect(("127.0.0.1", to)) else {
                return;
            };
            let first = seen.fetch_add(1, Ordering::AcqRel) == 0;
            let (mut c2, mut t2) = (
                client.try_clone().expect("clone"),
                target.try_clone().expect("clone"),
            );
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut t2);
                let _ = t2.shutdown(std::net::Shutdown::Write);
            });
            let (mut from, mut back) = (target, client);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                let mut done = 0u64;
                loop {
                    let n = match from.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if first && done <= at && at < done + n as u64 {
                        buf[usize::try_from(at - done).expect("index")] ^= 0x01;
                    }
                    done += n as u64;
                    if back.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = back.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    (port, count)
}

#[test]
fn a_corrupted_pdu_fails_its_digest_and_the_read_is_reissued() {
    if !have("tgtd") || !have("nbdcopy") {
        return;
    }
    let dir = scratch("iscsi-bad-digest");
    let img = dir.join("lun.img");
    let data = random_image(&img, 16 * MIB);
    let t = Tgtd::start(&img, None);
    t.want_digests();
    // 2 MiB in, the stream is Data-In payloads: one bit flipped there (or
    // in a header) must fail a digest, not reach the cache.
    let (port, connections) = corrupting_relay(t.port, 2 * MIB as u64);
    let url = t
        .url(None)
        .replace(&format!(":{}/", t.port), &format!(":{port}/"));
    assert_ne!(url, t.url(None));
    let h = Herd::start(&dir, "root", &url, &["--iscsi-digests"]);
    let out = dir.join("out.raw");
    nbdcopy(&h.url(), &out);
    assert_same_file(&out, &data);
    assert_eq!(h.metric("herd_iscsi_digest_errors_total"), 1.0);
    let log = std::fs::read_to_string(&h.log).unwrap_or_default();
    assert_eq!(log.matches("iSCSI digest mismatch").count(), 1, "{log}");
    assert!(
        connections.load(std::sync::atomic::Ordering::Acquire) >= 2,
        "herd logged in again after the bad PDU"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_session_on_its_own_ring_reads_byte_identical_across_a_restart() {
    if !have("tgtd") || !have("nbdcopy") {
        return;
    }
    read_across_target_restart(
        "iscsi-uring",
        64,
        &["--net-io", "uring"],
        4,
        Duration::from_millis(500),
    );
}

#[test]
fn a_thin_lun_tells_the_root_where_its_data_is() {
    if !have("tgtd") || !have("nbdcopy") {
        return;
    }
    let dir = scratch("iscsi-thin");
    let img = dir.join("lun.img");
    let m = MIB as u64;
    let data = sparse_image(&img, 32 * m, &[(4 * m, m), (20 * m + 4096, 128 << 10)], &[]);
    let want = data_chunk_bytes(&data, 64 << 10);
    let chunk = ["--chunk-size", "64KiB"];
    let t = Tgtd::start(&img, None);
    // As LIO answers: no provisioning information, so the root reads all.
    let thick = Herd::start(&dir, "thick", &t.url(None), &chunk);
    assert_eq!(
        thick.metric("herd_manifest_build_bytes_total"),
        data.len() as f64
    );
    // Thin, with unmapped blocks reading as zeros: GET LBA STATUS.
    t.thin_provisioning();
    let thin = Herd::start(&dir, "thin", &t.url(None), &chunk);
    assert_eq!(thin.metric("herd_manifest_build_bytes_total"), want as f64);
    let out = dir.join("out.raw");
    nbdcopy(&thin.url(), &out);
    assert_same_file(&out, &data);
    assert_eq!(thin.metric("herd_upstream_read_bytes_total"), want as f64);
    let _ = std::fs::remove_dir_all(&dir);
}
