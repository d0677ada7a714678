//! herd's iSCSI target (`--listen-iscsi`) against real initiators:
//! libiscsi's tools (`iscsi-ls`, `iscsi-inq`, `iscsi-readcapacity16`),
//! qemu's `iscsi://` driver through a leaf of a two-level tree, libiscsi's
//! conformance suite (`iscsi-test-cu`), CHAP, and malformed PDUs.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{assert_same_file, free_port, have, random_image, scratch, Herd};

const MIB: usize = 1 << 20;
const IQN: &str = "iqn.2026-12.io.herd:test.herd";

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run(cmd).stdout).into_owned()
}

/// A herd serving `upstream` by NBD and by iSCSI on a free port; returns
/// it and the iSCSI port.
fn start(dir: &Path, name: &str, upstream: &str, extra: &[&str]) -> (Herd, u16) {
    for attempt in 0..4 {
        let port = free_port();
        // A fresh log per attempt, so an old bind failure is not counted.
        let name = &if attempt == 0 {
            name.to_owned()
        } else {
            format!("{name}-{attempt}")
        };
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec!["--listen-iscsi", &listen, "--iscsi-target-iqn", IQN];
        args.extend_from_slice(extra);
        let herd = Herd::start(dir, name, upstream, &args);
        // The iSCSI listener binds just after the NBD one.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if herd.log_lines("serving iSCSI") == 1 {
                return (herd, port);
            }
            // The port went to another test between the probe and the bind.
            if herd.log_lines("cannot listen for iSCSI") > 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "herd {name} neither serves iSCSI nor failed to bind after 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("no free iSCSI port in four tries");
}

/// The failed tests ("Suite.Test") and the number of tests run, from
/// iscsi-test-cu's console output.
fn cu_results(text: &str) -> (Vec<String>, usize) {
    let (mut suite, mut test) = ("", "");
    let (mut failed, mut ran) = (Vec::new(), 0);
    for line in text.lines() {
        if let Some(s) = line.strip_prefix("Suite: ") {
            suite = s.trim();
        }
        if let Some(t) = line.trim_start().strip_prefix("Test: ") {
            test = t.split_whitespace().next().unwrap_or("");
            ran += 1;
        }
        if line.trim_end().ends_with("FAILED") {
            failed.push(format!("{suite}.{test}"));
        }
    }
    failed.dedup();
    // The run summary must agree: every test ran, and the same ones failed.
    let summary: Vec<usize> = text
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("tests "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        summary.get(..2).zip(summary.get(3)),
        Some((&[ran, ran][..], &failed.len())),
        "iscsi-test-cu summary {summary:?} vs {ran} tests parsed, {failed:?} failed:\n{text}"
    );
    (failed, ran)
}

fn url(port: u16) -> String {
    format!("iscsi://127.0.0.1:{port}/{IQN}/0")
}

#[test]
fn libiscsi_tools_and_qemu_read_the_image_through_a_leaf() {
    if !have("iscsi-ls") || !have("qemu-img") {
        return;
    }
    let dir = scratch("iscsi-target-tools");
    let img_path = dir.join("disk.img");
    let img = random_image(&img_path, 48 * MIB);
    let root = Herd::start(&dir, "root", img_path.to_str().expect("utf8"), &[]);
    let (leaf, port) = start(&dir, "leaf", &root.url(), &[]);

    // Discovery names the target and its portal; the LUN has the size.
    let ls = stdout(Command::new("iscsi-ls").args(["-s", &format!("iscsi://127.0.0.1:{port}")]));
    assert!(
        ls.contains(&format!("Target:{IQN} Portal:127.0.0.1:{port},1")),
        "{ls}"
    );
    assert!(ls.contains("Lun:0") && ls.contains("DIRECT_ACCESS"), "{ls}");
    let inq = stdout(Command::new("iscsi-inq").arg(url(port)));
    assert!(inq.contains("Vendor:HERD"), "{inq}");
    assert!(
        inq.contains("Peripheral Device Type:DIRECT_ACCESS"),
        "{inq}"
    );
    let cap = stdout(Command::new("iscsi-readcapacity16").arg(url(port)));
    assert!(cap.contains(&format!("Total size:{}", 48 * MIB)), "{cap}");
    assert!(
        cap.contains(&format!(
            "RETURNED LOGICAL BLOCK ADDRESS:{}",
            48 * MIB / 512 - 1
        )),
        "{cap}"
    );
    // The VPD pages an initiator builds its device name from.
    let vpd = stdout(Command::new("iscsi-inq").args(["-e", "1", "-c", "131", &url(port)]));
    assert!(vpd.contains("NAA"), "{vpd}");

    // qemu reads every byte through the leaf's cache.
    let out = dir.join("copy.img");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &url(port)])
        .arg(&out));
    assert_same_file(&out, &img);
    assert!(leaf.metric("herd_iscsi_target_commands_total") > 0.0);
    assert_eq!(
        leaf.metric("herd_upstream_read_bytes_total"),
        (48 * MIB) as f64,
        "each chunk fetched from the root once"
    );
    assert!(leaf.metric("herd_iscsi_target_logins_total{result=\"ok\"}") >= 4.0);
    drop(leaf);
    drop(root);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_core_whose_login_is_refused_reads_through_another_session() {
    if !have("nbdcopy") {
        return;
    }
    let dir = scratch("iscsi-target-shared");
    let img_path = dir.join("disk.img");
    let img = random_image(&img_path, 32 * MIB);
    // The root admits two connections from the leaf: its start-up session
    // and one core's. The leaf's two cores each log in a session of their
    // own (`--connections 4`), so one of them is refused.
    let (root, port) = start(
        &dir,
        "root",
        img_path.to_str().expect("utf8"),
        &["--max-connections-per-client", "2"],
    );
    let leaf = Herd::start(
        &dir,
        "leaf",
        &url(port),
        &["--workers", "2", "--connections", "4"],
    );
    // Readers on both cores (fewest live connections first).
    let readers: Vec<_> = (0..4)
        .map(|i| {
            let out = dir.join(format!("r{i}.raw"));
            let child = Command::new("nbdcopy")
                .args(["--connections", "1"])
                .arg(leaf.url())
                .arg(&out)
                .spawn()
                .expect("nbdcopy");
            (child, out)
        })
        .collect();
    for (mut r, out) in readers {
        assert!(r.wait().expect("wait").success(), "a reader failed");
        assert_same_file(&out, &img);
    }
    assert!(
        root.metric("herd_nbd_connections_refused_total{reason=\"limit\"}") >= 1.0,
        "the root refused no login: the test did not test refusal"
    );
    assert!(leaf.metric("herd_iscsi_shared_logins_total") >= 1.0);
    assert_eq!(
        leaf.log_lines("this core's reads share one of them"),
        1,
        "warned once for the refused core"
    );
    assert_eq!(
        leaf.metric("herd_upstream_read_bytes_total"),
        (32 * MIB) as f64,
        "each chunk fetched from the root once"
    );
    drop(leaf);
    drop(root);
    let _ = std::fs::remove_dir_all(&dir);
}

/// qemu copies the image one command at a time (`-m 1`), every byte
/// checked; returns the target's spin counters (request, idle, µs).
fn qd1_copy(spin_us: &str) -> (f64, f64, f64) {
    let dir = scratch(&format!("iscsi-target-spin-{spin_us}"));
    let img_path = dir.join("disk.img");
    let img = random_image(&img_path, 16 * MIB);
    let (node, port) = start(
        &dir,
        "root",
        img_path.to_str().expect("utf8"),
        &["--spin-us", spin_us],
    );
    let out = dir.join("copy.img");
    run(Command::new("qemu-img")
        .args(["convert", "-m", "1", "-f", "raw", "-O", "raw", &url(port)])
        .arg(&out));
    assert_same_file(&out, &img);
    let counters = node.spins("herd_iscsi_target");
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
    counters
}

#[test]
fn an_initiator_sending_one_command_at_a_time_is_spun_for() {
    if !have("qemu-img") {
        return;
    }
    let (request, idle, us) = qd1_copy("1000");
    assert!(request + idle > 0.0, "the target never spun for a command");
    assert!(
        us > 0.0,
        "spin time not counted ({request} request, {idle} idle)"
    );
    eprintln!("target spins: {request} ended by a command, {idle} idle, {us} µs");
    assert_eq!(qd1_copy("0"), (0.0, 0.0, 0.0), "--spin-us 0 still spun");
}

#[test]
fn libiscsi_conformance_suites_pass() {
    if !have("iscsi-test-cu") {
        return;
    }
    let dir = scratch("iscsi-target-cu");
    let img_path = dir.join("disk.img");
    random_image(&img_path, 16 * MIB);
    let (node, port) = start(&dir, "node", img_path.to_str().expect("utf8"), &[]);
    // The whole families. Without --dataloss, libiscsi's write and PROUT
    // helpers skip the command and the tests below then assert its effect,
    // so they fail on any target; every other test must pass.
    const NEED_DATALOSS: &[&str] = &[
        "PrinReadKeys.Truncate",
        "ProutRegister.Simple",
        "ProutReserve.Simple",
        "ProutReserve.AccessEA",
        "ProutReserve.AccessWE",
        "ProutReserve.AccessEARO",
        "ProutReserve.AccessWERO",
        "ProutReserve.AccessEAAR",
        "ProutReserve.AccessWEAR",
        "ProutReserve.OwnershipEA",
        "ProutReserve.OwnershipWE",
        "ProutReserve.OwnershipEARO",
        "ProutReserve.OwnershipWERO",
        "ProutReserve.OwnershipEAAR",
        "ProutReserve.OwnershipWEAR",
        "WriteVerify10.Dpo",
        "WriteVerify12.Dpo",
        "WriteVerify16.Dpo",
    ];
    let run = |args: &[&str]| -> (Vec<String>, usize, String) {
        let out = Command::new("iscsi-test-cu")
            .args(args)
            .arg(url(port))
            .output()
            .expect("iscsi-test-cu");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (failed, ran) = cu_results(&text);
        (failed, ran, text)
    };
    for family in ["iSCSI", "SCSI", "LINUX"] {
        let (failed, ran, text) = run(&["-t", family]);
        let unexpected: Vec<_> = failed
            .iter()
            .filter(|t| !NEED_DATALOSS.contains(&t.as_str()))
            .collect();
        assert!(
            ran > 10 && unexpected.is_empty(),
            "iscsi-test-cu {family}: {ran} tests, unexpected failures {unexpected:?}:\n{text}"
        );
    }
    // With --dataloss those helpers send their commands: persistent
    // reservations are answered "not implemented" (INVALID OPERATION CODE),
    // which the suites accept. (Writes would fail: the LUN is read-only.)
    for suite in [
        "SCSI.PrinReadKeys",
        "SCSI.ProutRegister",
        "SCSI.ProutReserve",
        "SCSI.ProutClear",
        "SCSI.ProutPreempt",
    ] {
        let (failed, ran, text) = run(&["--dataloss", "-t", suite]);
        assert!(
            ran > 0 && failed.is_empty(),
            "iscsi-test-cu --dataloss {suite}: {failed:?}\n{text}"
        );
    }
    assert!(node.child.id() > 0);
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn chap_is_required_when_configured() {
    if !have("iscsi-ls") {
        return;
    }
    let dir = scratch("iscsi-target-chap");
    let img_path = dir.join("disk.img");
    random_image(&img_path, 4 * MIB);
    let creds = dir.join("chap");
    std::fs::write(&creds, "alice:correct-horse-battery\n").expect("chap file");
    let (node, port) = start(
        &dir,
        "node",
        img_path.to_str().expect("utf8"),
        &["--iscsi-target-chap", creds.to_str().expect("utf8")],
    );
    let with = |user: &str| format!("iscsi://{user}@127.0.0.1:{port}/{IQN}/0");
    let good = Command::new("iscsi-readcapacity16")
        .arg(with("alice%correct-horse-battery"))
        .output()
        .expect("iscsi-readcapacity16");
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    for bad in ["alice%wrong-password-xx", "mallory%correct-horse-battery"] {
        let out = Command::new("iscsi-readcapacity16")
            .arg(with(bad))
            .output()
            .expect("iscsi-readcapacity16");
        assert!(!out.status.success(), "{bad} logged in");
    }
    let none = Command::new("iscsi-readcapacity16")
        .arg(url(port))
        .output()
        .expect("iscsi-readcapacity16");
    assert!(!none.status.success(), "logged in without CHAP");
    assert_eq!(
        node.metric("herd_iscsi_target_logins_total{result=\"failed\"}"),
        3.0
    );
    assert_eq!(
        node.metric("herd_iscsi_target_logins_total{result=\"ok\"}"),
        1.0
    );
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Bytes of a login request PDU for `keys` (stage `csg` → `nsg`).
fn login_pdu(csg: u8, nsg: u8, keys: &str) -> Vec<u8> {
    let mut out = Vec::new();
    herd::iscsi::pdu::encode_login(
        &herd::iscsi::pdu::LoginReq {
            transit: true,
            csg,
            nsg,
            isid: [0x80, 0, 0, 1, 2, 3],
            tsih: 0,
            itt: 1,
            cid: 0,
            cmd_sn: 1,
            exp_stat_sn: 0,
        },
        keys.replace(';', "\0").as_bytes(),
        &mut out,
    );
    out
}

/// Whether the server closed the connection (EOF within 5 s), after
/// draining whatever it sent first.
fn closed(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            // Closed with our bytes unread: a reset.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn malformed_pdus_get_an_answer_or_a_closed_connection_and_the_target_serves_on() {
    if !have("iscsi-readcapacity16") {
        return;
    }
    let dir = scratch("iscsi-target-bad");
    let img_path = dir.join("disk.img");
    random_image(&img_path, 4 * MIB);
    let (node, port) = start(&dir, "node", img_path.to_str().expect("utf8"), &[]);
    let connect = || TcpStream::connect(("127.0.0.1", port)).expect("connect");

    // A SCSI command before login: closed.
    let mut s = connect();
    let mut cmd = Vec::new();
    herd::iscsi::pdu::encode_scsi_cmd(
        &herd::iscsi::pdu::ScsiCmd {
            lun: 0,
            itt: 1,
            read: true,
            expected_len: 512,
            cmd_sn: 1,
            exp_stat_sn: 0,
            cdb: [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],
        },
        &mut cmd,
    );
    s.write_all(&cmd).expect("send");
    assert!(closed(&mut s), "a command before login was answered");

    // A data segment larger than any we accept: closed.
    let mut s = connect();
    let mut big = login_pdu(0, 1, "InitiatorName=iqn.x;");
    big[5..8].copy_from_slice(&[0x10, 0, 0]);
    s.write_all(&big).expect("send");
    assert!(closed(&mut s));

    // A login to another target: a login response with status 0x0203,
    // then closed.
    let mut s = connect();
    s.write_all(&login_pdu(
        0,
        1,
        "InitiatorName=iqn.x;TargetName=iqn.nope;AuthMethod=None;",
    ))
    .expect("send");
    let mut resp = [0u8; 48];
    s.read_exact(&mut resp).expect("login response");
    assert_eq!(resp[0] & 0x3f, 0x23);
    assert_eq!((resp[36], resp[37]), (2, 3), "target not found");
    assert!(closed(&mut s));

    // Garbage: closed, or rejected and then closed at the bad length.
    let mut s = connect();
    s.write_all(&[0xffu8; 300]).expect("send");
    assert!(closed(&mut s));

    // The target still serves a good initiator.
    run(Command::new("iscsi-readcapacity16").arg(url(port)));
    assert_eq!(
        node.metric("herd_iscsi_target_logins_total{result=\"failed\"}"),
        1.0
    );
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_new_version_is_a_new_lun_identity_for_new_sessions() {
    if !have("iscsi-inq") || !have("qemu-img") {
        return;
    }
    let dir = scratch("iscsi-target-version");
    let img_path = dir.join("disk.img");
    let a = random_image(&img_path, 4 * MIB);
    let root = Herd::start(&dir, "root", img_path.to_str().expect("utf8"), &[]);
    let (leaf, port) = start(&dir, "leaf", &root.url(), &[]);
    let serial = || stdout(Command::new("iscsi-inq").args(["-e", "1", "-c", "128", &url(port)]));
    let before = serial();
    // B: another image renamed into place; the root publishes it.
    let mut b = a.clone();
    b[..4096].fill(7);
    let next = dir.join("disk.img.new");
    std::fs::write(&next, &b).expect("write B");
    std::fs::rename(&next, &img_path).expect("rename");
    run(Command::new("kill").args(["-HUP", &root.child.id().to_string()]));
    leaf.metric_within("herd_image_versions", 2.0, Duration::from_secs(30));
    // A new session sees B: another serial, and B's bytes.
    let after = serial();
    assert_ne!(before, after, "the unit serial follows the version");
    // The serial is the identity's first 16 digits, as the list shows.
    let latest = leaf.latest_identity();
    assert!(after.contains(&latest), "{after}");
    let out = dir.join("copy.img");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &url(port)])
        .arg(&out));
    assert!(std::fs::read(&out).expect("copy") == b, "iSCSI serves B");
    drop(leaf);
    drop(root);
    let _ = std::fs::remove_dir_all(&dir);
}
