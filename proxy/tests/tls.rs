//! NBD over TLS with real peers: a herd tree whose links are TLS, read by
//! libnbd's `nbdcopy` and qemu's `qemu-img` with their own TLS stacks
//! (GnuTLS); herd reading from qemu-nbd and nbdkit serving TLS; and every
//! refusal the hardening issue lists (plain client to `require`, no or an
//! expired certificate, a name not allowed, another CA, TLS to a plain
//! server, an address outside `--allow`): each a clear error on the
//! client's side, one log line at herd, and herd serving others after.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{assert_same_file, have, random_image, scratch, Herd, Peer};
use herd::tls::certs::{self, Request};

const MIB: usize = 1 << 20;

/// A CA with a server certificate for 127.0.0.1 and a client certificate
/// for `client`, in the layout libnbd, qemu and nbdkit read.
fn pki(dir: &Path, client: &str, client_days: i64) -> PathBuf {
    certs::make(
        dir,
        &[
            Request {
                stem: "server".into(),
                names: vec!["127.0.0.1".into(), "localhost".into()],
                days: 30,
            },
            Request {
                stem: "client".into(),
                names: vec![client.into()],
                days: client_days,
            },
        ],
    )
    .expect("make certificates");
    dir.to_owned()
}

/// A directory holding `ca`'s CA and a client certificate `name` it signs
/// (valid `days`; negative: expired).
fn client_dir(ca: &Path, dir: &Path, name: &str, days: i64) -> PathBuf {
    std::fs::create_dir_all(dir).expect("dir");
    for f in ["ca-cert.pem", "ca-key.pem"] {
        std::fs::copy(ca.join(f), dir.join(f)).expect("copy CA");
    }
    certs::make(
        dir,
        &[Request {
            stem: "client".into(),
            names: vec![name.into()],
            days,
        }],
    )
    .expect("client certificate");
    dir.to_owned()
}

/// `--tls MODE` with the server certificate and the CA of `pki`.
fn tls_args(pki: &Path, mode: &str) -> Vec<String> {
    let p = |f: &str| pki.join(f).to_str().expect("utf8").to_owned();
    vec![
        "--tls".into(),
        mode.into(),
        "--tls-cert".into(),
        p("server-cert.pem"),
        "--tls-key".into(),
        p("server-key.pem"),
        "--tls-ca".into(),
        p("ca-cert.pem"),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn nbds(port: u16, dir: &Path) -> String {
    format!(
        "nbds://127.0.0.1:{port}/herd?tls-certificates={}",
        dir.display()
    )
}

/// Runs `nbdinfo URL`; `Err(stderr)` when it fails.
fn nbdinfo(url: &str) -> Result<(), String> {
    let out = Command::new("nbdinfo")
        .arg(url)
        .stdout(Stdio::null())
        .output()
        .expect("nbdinfo");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn handshakes(h: &Herd, side: &str, result: &str) -> f64 {
    h.metric(&format!(
        "herd_tls_handshakes_total{{side=\"{side}\",result=\"{result}\"}}"
    ))
}

#[test]
fn a_tree_with_tls_links_serves_nbdcopy_and_qemu_img() {
    if !have("nbdcopy") || !have("qemu-img") {
        return;
    }
    let dir = scratch("tls-tree");
    let pki = pki(&dir.join("pki"), "alice", 30);
    let img = dir.join("img");
    let data = random_image(&img, 8 * MIB);
    let args = tls_args(&pki, "require");
    let root = Herd::start(&dir, "root", img.to_str().expect("utf8"), &strs(&args));
    // The leaf dials nbd:// (as a fleet computes it): --tls require makes
    // it upgrade, and the root would refuse it otherwise.
    let leaf = Herd::start(&dir, "leaf", &root.url(), &strs(&args));
    assert!(handshakes(&leaf, "upstream", "ok") >= 1.0);

    let out = dir.join("copy");
    common::nbdcopy(&nbds(leaf.port, &pki), &out);
    assert_same_file(&out, &data);

    let out = dir.join("qemu");
    common::run(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw", "--object"])
            .arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                pki.display()
            ))
            .arg("--image-opts")
            .arg(format!(
                "driver=nbd,host=127.0.0.1,port={},export=herd,tls-creds=tls0",
                leaf.port
            ))
            .arg(&out),
    );
    assert_same_file(&out, &data);
    // Two clients (nbdcopy may open several connections), every one a TLS
    // session; so was every link up the tree.
    assert!(handshakes(&leaf, "export", "ok") >= 2.0);
    assert_eq!(handshakes(&leaf, "export", "failed"), 0.0);
    assert!(handshakes(&root, "export", "ok") >= 1.0);
    assert_eq!(handshakes(&root, "export", "failed"), 0.0);
    // TLS replies are never sendfile'd around the encryption.
    assert_eq!(leaf.metric("herd_served_zero_copy_bytes_total"), 0.0);
    assert!(leaf.metric("herd_served_bytes_total") >= 2.0 * data.len() as f64);
}

#[test]
fn herd_reads_from_qemu_nbd_and_nbdkit_over_tls() {
    if !have("qemu-nbd") || !have("nbdkit") || !have("nbdcopy") {
        return;
    }
    let dir = scratch("tls-peers");
    let pki = pki(&dir.join("pki"), "alice", 30);
    let img = dir.join("img");
    let data = random_image(&img, 4 * MIB);

    let qport = common::free_port();
    let _qemu = Peer(
        Command::new("qemu-nbd")
            .args(["-r", "-f", "raw", "-e", "8", "-x", "img", "-b", "127.0.0.1"])
            .args(["-p", &qport.to_string(), "--object"])
            .arg(format!(
                "tls-creds-x509,id=tls0,endpoint=server,dir={},verify-peer=on",
                pki.display()
            ))
            .args(["--tls-creds", "tls0"])
            .arg(&img)
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-nbd"),
    );
    let kport = common::free_port();
    let _kit = Peer(
        Command::new("nbdkit")
            .args(["-f", "-i", "127.0.0.1", "-p", &kport.to_string()])
            .arg("--tls=require")
            .arg(format!("--tls-certificates={}", pki.display()))
            .args(["--tls-verify-peer", "file"])
            .arg(&img)
            .stderr(Stdio::null())
            .spawn()
            .expect("nbdkit"),
    );
    common::wait_port(qport);
    common::wait_port(kport);
    // nbds:// asks TLS of that link alone: the export stays plain (--tls
    // off), and herd presents its certificate because both peers verify.
    let mut args = tls_args(&pki, "off");
    args.drain(..2);
    for (name, url) in [
        ("over-qemu", format!("nbds://127.0.0.1:{qport}/img")),
        ("over-nbdkit", format!("nbds://127.0.0.1:{kport}/")),
    ] {
        let h = Herd::start(&dir, name, &url, &strs(&args));
        let out = dir.join(name);
        common::nbdcopy(&h.url(), &out);
        assert_same_file(&out, &data);
        assert!(handshakes(&h, "upstream", "ok") >= 1.0, "{name}");
        assert_eq!(handshakes(&h, "upstream", "failed"), 0.0, "{name}");
    }
}

#[test]
fn refusals_are_clear_and_the_daemon_serves_others() {
    if !have("nbdinfo") {
        return;
    }
    let dir = scratch("tls-refusals");
    let pki = pki(&dir.join("pki"), "alice", 30);
    let img = dir.join("img");
    let data = random_image(&img, 2 * MIB);
    let mut args = tls_args(&pki, "require");
    args.extend(["--tls-allow".into(), "alice".into()]);
    let root = Herd::start(&dir, "root", img.to_str().expect("utf8"), &strs(&args));
    // herd logs a refusal, then counts it: once the count is k, k lines.
    let refused = |k: f64| {
        root.metric_eventually("herd_nbd_connections_refused_total{reason=\"tls\"}", k);
    };

    // Plain client: the server's answer is "TLS required".
    let e = nbdinfo(&format!("nbd://127.0.0.1:{}/herd", root.port)).expect_err("plain");
    assert!(!e.is_empty());
    refused(1.0);
    // A certificate the CA signed for a name not allowed.
    let bob = client_dir(&pki, &dir.join("bob"), "bob", 30);
    let e = nbdinfo(&nbds(root.port, &bob)).expect_err("bob");
    assert!(!e.is_empty());
    refused(2.0);
    // An expired certificate for an allowed name.
    let old = client_dir(&pki, &dir.join("old"), "alice", -1);
    let e = nbdinfo(&nbds(root.port, &old)).expect_err("expired");
    assert!(!e.is_empty());
    refused(3.0);
    // No certificate at all.
    let none = dir.join("none");
    std::fs::create_dir_all(&none).expect("dir");
    std::fs::copy(pki.join("ca-cert.pem"), none.join("ca-cert.pem")).expect("copy");
    let e = nbdinfo(&nbds(root.port, &none)).expect_err("no certificate");
    assert!(!e.is_empty());
    refused(4.0);
    // A client trusting another CA refuses the server.
    let other = pki_other(&dir.join("other"));
    let e = nbdinfo(&nbds(root.port, &other)).expect_err("other CA");
    assert!(e.contains("certificate"), "{e}");
    refused(5.0);

    let log = std::fs::read_to_string(&root.log).expect("log");
    assert_eq!(root.log_lines("did not start TLS"), 1, "{log}");
    assert_eq!(
        root.log_lines("[\"bob\"] are not in --tls-allow"),
        1,
        "{log}"
    );
    assert_eq!(root.log_lines("certificate expired"), 1, "{log}");
    assert_eq!(root.log_lines("no certificates"), 1, "{log}");
    assert_eq!(
        root.log_lines("connection closed"),
        5,
        "one line per refusal:\n{log}"
    );
    assert_eq!(handshakes(&root, "export", "failed"), 4.0);

    // A herd of another CA fails at once, naming the reason.
    let out = Command::new(common::HERD)
        .args([
            "serve",
            "--upstream",
            &root.url(),
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--cache-dir", dir.join("x").to_str().expect("utf8")])
        .args(strs(&tls_args(&other, "require")))
        .output()
        .expect("herd");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(e.contains("UnknownIssuer"), "{e}");

    // TLS asked of a plain server: refused on both kinds of client.
    let plain = Herd::start(&dir, "plain", img.to_str().expect("utf8"), &[]);
    let e = nbdinfo(&nbds(plain.port, &pki)).expect_err("TLS to plain");
    assert!(!e.is_empty());
    let out = Command::new(common::HERD)
        .args([
            "serve",
            "--upstream",
            &plain.url(),
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--cache-dir", dir.join("y").to_str().expect("utf8")])
        .args(strs(&tls_args(&pki, "require")))
        .output()
        .expect("herd");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(e.contains("does not offer TLS"), "{e}");

    // And the root still serves a good client.
    let out = dir.join("good");
    common::nbdcopy(&nbds(root.port, &pki), &out);
    assert_same_file(&out, &data);
}

/// Bytes of greeting a raw connection gets before the server closes or
/// goes quiet (18 for an NBD newstyle greeting; 0 if refused).
fn greeting(port: u16) -> usize {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .expect("timeout");
    let mut buf = [0u8; 18];
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    got
}

/// Certificates from a CA of its own.
fn pki_other(dir: &Path) -> PathBuf {
    pki(dir, "alice", 30)
}

#[test]
fn addresses_outside_allow_are_refused() {
    if !have("nbdinfo") {
        return;
    }
    let dir = scratch("tls-allow");
    let img = dir.join("img");
    random_image(&img, MIB);
    let path = img.to_str().expect("utf8");
    let refused = "herd_nbd_connections_refused_total{reason=\"allow\"}";
    let accepted = "herd_nbd_connections_total";
    let shut = Herd::start(&dir, "shut", path, &["--allow", "10.0.0.0/8"]);
    // Refused at accept: closed before the greeting, so counted by now.
    assert_eq!(
        greeting(shut.port),
        0,
        "refused connections get no greeting"
    );
    let (lines, before) = (shut.log_lines("not in --allow"), shut.metric(refused));
    assert!(before >= 1.0, "ours came from 127.0.0.1");
    let e = nbdinfo(&shut.url()).expect_err("outside --allow");
    assert!(!e.is_empty());
    assert_eq!(shut.log_lines("not in --allow"), lines + 1);
    assert_eq!(shut.metric(refused), before + 1.0);
    assert_eq!(shut.metric(accepted), 0.0);

    let open = Herd::start(
        &dir,
        "open",
        path,
        &["--allow", "10.0.0.0/8", "--allow", "127.0.0.1"],
    );
    assert_eq!(greeting(open.port), 18, "an allowed client is greeted");
    let before = open.metric(accepted);
    nbdinfo(&open.url()).expect("inside --allow");
    assert_eq!(open.metric(accepted), before + 1.0);
    assert_eq!(open.metric(refused), 0.0);
}
