//! A tree that heals itself: readers below a parent that dies (kill -9),
//! hangs (SIGSTOP), returns errors, or restarts (the root) all finish with
//! the right bytes and no error; parents from a static fleet file and from
//! real etcd membership; a child holds its profile connection instead of
//! opening one every poll. Link-down runs in network namespaces in
//! `cargo xtask bench failover` (its quick mode is part of `xtask test`).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    assert_links_ran_on, build_manifest, free_port, have, net_io, random_image, scratch, wait_port,
    Herd, RawClient, HERD,
};

const IMAGE: usize = 96 << 20;
const READ: u32 = 1 << 20;
const READERS: usize = 4;

/// Readers that each read a quarter of the image, 1 MiB at a time, and
/// check every byte; `progress` counts bytes read.
struct Readers {
    threads: Vec<std::thread::JoinHandle<Result<(), String>>>,
    progress: Arc<AtomicU64>,
}

impl Readers {
    fn start(port: u16, data: &Arc<Vec<u8>>) -> Self {
        let progress = Arc::new(AtomicU64::new(0));
        let per = IMAGE / READERS;
        let threads = (0..READERS)
            .map(|i| {
                let data = Arc::clone(data);
                let progress = Arc::clone(&progress);
                std::thread::spawn(move || {
                    let mut c = RawClient::connect(port, "herd");
                    let mut off = i * per;
                    while off < (i + 1) * per {
                        let got = c
                            .try_read(off as u64, READ)
                            .map_err(|errno| format!("errno {errno} at offset {off}"))?;
                        if got[..] != data[off..off + READ as usize] {
                            return Err(format!("wrong bytes at offset {off}"));
                        }
                        off += READ as usize;
                        progress.fetch_add(u64::from(READ), Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        Self { threads, progress }
    }

    /// Waits until `bytes` have been read (the fault then hits mid-load).
    fn wait_progress(&self, bytes: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.progress.load(Ordering::Relaxed) < bytes {
            assert!(
                Instant::now() < deadline,
                "readers stalled before the fault"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Every reader finished with the right bytes and no error.
    fn finish(self) {
        let total = self.progress.load(Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap().unwrap();
        }
        assert!(total <= IMAGE as u64);
    }
}

fn nbd(port: u16) -> String {
    format!("nbd://127.0.0.1:{port}/herd")
}

/// A 64 KiB-chunk herd: the image is 1536 chunks, so a fault lands mid-run.
/// A herd node on `port`, or (`None`) on free ports, tried again if
/// another process takes one first.
fn herd(dir: &Path, name: &str, upstreams: &[String], port: Option<u16>, extra: &[&str]) -> Herd {
    let mut args: Vec<&str> = vec!["--chunk-size", "64KiB"];
    for u in &upstreams[1..] {
        args.push("--upstream");
        args.push(u);
    }
    args.extend_from_slice(extra);
    match port {
        Some(port) => Herd::start_on(dir, name, &upstreams[0], port, &args),
        None => Herd::start(dir, name, &upstreams[0], &args),
    }
}

/// Root on a file, relays A and B under it, a leaf reading from [A, B, root].
struct Tree {
    data: Arc<Vec<u8>>,
    root: Herd,
    a: Herd,
    b: Herd,
    leaf: Herd,
}

fn tree(dir: &Path) -> Tree {
    let img = dir.join("golden.img");
    let data = Arc::new(random_image(&img, IMAGE));
    let root = herd(dir, "root", &[img.display().to_string()], None, &[]);
    let a = herd(dir, "a", &[root.url()], None, &[]);
    let b = herd(dir, "b", &[root.url()], None, &[]);
    let leaf = herd(
        dir,
        "leaf",
        &[nbd(a.port), nbd(b.port), nbd(root.port)],
        None,
        &[],
    );
    Tree {
        data,
        root,
        a,
        b,
        leaf,
    }
}

fn active_metric(parent: u16) -> String {
    format!("herd_upstream_active{{parent=\"{}\"}}", nbd(parent))
}

fn active(h: &Herd, parent: u16) -> f64 {
    h.metric(&active_metric(parent))
}

/// The root read each byte of the image from its disk once: a failover
/// never made it fetch a chunk twice.
fn root_fetched_each_chunk_once(root: &Herd) {
    assert_eq!(
        root.metric_eventually("herd_upstream_read_bytes_total", IMAGE as f64),
        IMAGE as f64
    );
}

#[test]
fn kill_9_of_a_relay_under_load_costs_readers_nothing() {
    let dir = scratch("failover-kill");
    let mut t = tree(&dir);
    assert_eq!(active(&t.leaf, t.a.port), 1.0);
    let r = Readers::start(t.leaf.port, &t.data);
    r.wait_progress(16 << 20);
    t.a.kill9();
    r.finish();
    assert!(t.leaf.metric("herd_upstream_failovers_total") >= 1.0);
    assert_eq!(t.leaf.metric("herd_upstream_down_total"), 1.0);
    assert_eq!(active(&t.leaf, t.a.port), 0.0);
    assert_eq!(active(&t.leaf, t.b.port), 1.0);
    root_fetched_each_chunk_once(&t.root);
    // The leaf's links to A and then B ran on the path asked for.
    assert_links_ran_on(&t.leaf, "nbd", &net_io(), 2.0);
}

#[test]
fn a_hung_relay_is_found_by_its_probe_and_readers_move_on() {
    let dir = scratch("failover-sigstop");
    let t = tree(&dir);
    let r = Readers::start(t.leaf.port, &t.data);
    r.wait_progress(16 << 20);
    t.a.signal("STOP");
    r.finish();
    assert_eq!(t.leaf.metric("herd_upstream_down_total"), 1.0);
    assert_eq!(active(&t.leaf, t.b.port), 1.0);
    // Woken again, the relay is taken back only after answering probes
    // for the rejoin window (5 s), then reads go to it again.
    t.a.signal("CONT");
    t.leaf
        .wait_metric_at_least(&active_metric(t.a.port), 1.0, Duration::from_secs(20));
    assert_eq!(active(&t.leaf, t.a.port), 1.0, "relay not taken back");
    let log = std::fs::read_to_string(&t.leaf.log).unwrap();
    let back = log.lines().find(|l| l.contains("taken back")).unwrap();
    let ms: u64 = back
        .split("down_ms=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert!(
        ms >= 5000,
        "taken back after {ms} ms, inside the 5 s rejoin window"
    );
    root_fetched_each_chunk_once(&t.root);
}

#[test]
fn a_parent_that_returns_errors_sends_reads_to_the_next() {
    if !have("nbdkit") {
        return;
    }
    let dir = scratch("failover-errors");
    let img = dir.join("golden.img");
    let data = Arc::new(random_image(&img, IMAGE));
    let manifest = build_manifest(&img);
    let root = herd(&dir, "root", &[img.display().to_string()], None, &[]);
    // Relay A reads through nbdkit's error filter: every read fails with
    // EIO while the trigger file exists.
    let trigger = dir.join("errors-on");
    let kit_port = free_port();
    let _kit = common::Peer(
        Command::new("nbdkit")
            .args([
                "--foreground",
                "--exit-with-parent",
                "-p",
                &kit_port.to_string(),
            ])
            .args(["-i", "127.0.0.1", "--filter=error", "file"])
            .arg(&img)
            .args(["error=EIO", "error-pread-rate=100%"])
            .arg(format!("error-file={}", trigger.display()))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port(kit_port);
    let m = manifest.to_str().unwrap();
    let a = herd(
        &dir,
        "a",
        &[format!("nbd://127.0.0.1:{kit_port}")],
        None,
        &["--manifest", m],
    );
    let leaf = herd(&dir, "leaf", &[nbd(a.port), root.url()], None, &[]);
    let r = Readers::start(leaf.port, &data);
    r.wait_progress(16 << 20);
    std::fs::write(&trigger, b"").unwrap();
    r.finish();
    assert!(leaf.metric("herd_upstream_failovers_total") >= 1.0);
    // A answered (with errors): it is not down, only refused those reads.
    assert_eq!(leaf.metric("herd_upstream_down_total"), 0.0);
    assert!(root.metric("herd_upstream_read_bytes_total") > 0.0);
}

#[test]
fn a_root_restart_is_a_pause_not_an_error() {
    root_restart("failover-root-restart", "epoll");
}

#[test]
fn a_root_restart_is_a_pause_on_rings_too() {
    root_restart("failover-root-restart-uring", "uring");
}

fn root_restart(name: &str, net_io: &str) {
    let dir = scratch(name);
    let img = dir.join("golden.img");
    let data = Arc::new(random_image(&img, IMAGE));
    let port = free_port();
    let up = img.display().to_string();
    let mut root = herd(&dir, "root", std::slice::from_ref(&up), Some(port), &[]);
    let leaf = herd(&dir, "leaf", &[nbd(port)], None, &["--net-io", net_io]);
    let r = Readers::start(leaf.port, &data);
    r.wait_progress(16 << 20);
    root.kill9();
    std::thread::sleep(Duration::from_secs(1));
    let _root = herd(&dir, "root", &[up], Some(port), &[]);
    r.finish();
    assert!(leaf.metric("herd_upstream_down_total") >= 1.0);
    // The restarted root is active again once it has answered probes for
    // the rejoin window.
    leaf.wait_metric_at_least(&active_metric(port), 1.0, Duration::from_secs(20));
    assert_eq!(active(&leaf, port), 1.0);
    // Before and after the restart, on the path asked for.
    assert_links_ran_on(&leaf, "nbd", net_io, 2.0);
}

/// A fleet powers on at once: a child whose tree parent is still starting
/// waits for it instead of loading the root; one whose parent never comes
/// falls back to the next after a grace period (twice the rejoin window).
#[test]
fn at_start_a_child_waits_for_its_tree_parent_then_takes_an_alternate() {
    let dir = scratch("failover-start");
    let img = dir.join("golden.img");
    random_image(&img, 8 << 20);
    let root = herd(&dir, "root", &[img.display().to_string()], None, &[]);
    let a_port = free_port();
    let ups = [nbd(a_port), root.url()];
    let leaf = {
        let (d, u) = (dir.clone(), ups.clone());
        std::thread::spawn(move || herd(&d, "leaf", &u, None, &[]))
    };
    std::thread::sleep(Duration::from_secs(1));
    let _a = herd(&dir, "a", &[root.url()], Some(a_port), &[]);
    let leaf = leaf.join().unwrap();
    assert_eq!(active(&leaf, a_port), 1.0);
    assert_eq!(leaf.metric("herd_upstream_down_total"), 0.0);
    // A first parent that never comes: the root serves after the grace.
    let dead = free_port();
    let t = Instant::now();
    let lone = herd(&dir, "lone", &[nbd(dead), root.url()], None, &[]);
    assert!(t.elapsed() >= Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(active(&lone, root.port), 1.0);
    assert_eq!(lone.metric("herd_upstream_down_total"), 1.0);
}

fn fleet_file(dir: &Path, ports: &[(String, u16, u16)], fanout: u32) -> PathBuf {
    let mut text = format!("fanout = {fanout}\n\n");
    for (i, (name, port, metrics)) in ports.iter().enumerate() {
        text.push_str(if i == 0 { "[root]\n" } else { "[[node]]\n" });
        text.push_str(&format!(
            "name = \"{name}\"\naddr = \"127.0.0.1:{port}\"\nmetrics = \"127.0.0.1:{metrics}\"\n\n"
        ));
    }
    let f = dir.join("fleet.toml");
    std::fs::write(&f, text).unwrap();
    f
}

fn fleet_status(source: &str) -> Vec<serde_json::Value> {
    let out = Command::new(HERD)
        .args(["fleet", "status", source, "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn node<'a>(status: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    status.iter().find(|n| n["name"] == name).unwrap()
}

/// A herd whose metrics port is chosen by the caller (the fleet lists it);
/// without `upstream`, its parents come from the fleet alone.
fn fleet_herd(
    dir: &Path,
    name: &str,
    upstream: Option<&str>,
    port: u16,
    metrics: u16,
    extra: &[&str],
) -> Herd {
    let log = dir.join(format!("{name}.log"));
    let up: Vec<&str> = upstream.map_or_else(Vec::new, |u| vec!["--upstream", u]);
    let child = Command::new(HERD)
        .arg("serve")
        .args(up)
        .args(["--chunk-size", "64KiB"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--cache-dir")
        .arg(dir.join(format!("{name}-cache")))
        .args(["--metrics", &format!("127.0.0.1:{metrics}")])
        .args(["--node", name])
        .args(extra)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_port(port);
    Herd {
        child,
        port,
        metrics,
        log,
    }
}

#[test]
fn a_static_fleet_file_gives_parents_and_alternates() {
    let dir = scratch("failover-fleet-file");
    let img = dir.join("golden.img");
    let data = Arc::new(random_image(&img, IMAGE));
    let names = ["root", "n1", "n2", "n3"];
    let ports: Vec<(String, u16, u16)> = names
        .iter()
        .map(|n| ((*n).to_owned(), free_port(), free_port()))
        .collect();
    // Fanout 1: a chain root ← n1 ← n2 ← n3.
    let f = fleet_file(&dir, &ports, 1);
    let fs = f.to_str().unwrap();
    let root_up = img.display().to_string();
    let mut nodes = Vec::new();
    for (i, (name, port, metrics)) in ports.iter().enumerate() {
        let up = if i == 0 {
            root_up.clone()
        } else {
            nbd(ports[0].1)
        };
        nodes.push(fleet_herd(
            &dir,
            name,
            Some(&up),
            *port,
            *metrics,
            &["--fleet", fs],
        ));
    }
    let st = fleet_status(fs);
    assert_eq!(node(&st, "n3")["parent"], "n2");
    assert_eq!(node(&st, "n3")["active_parent"], "n2");
    assert_eq!(node(&st, "n3")["depth"], 3);
    assert!(st.iter().all(|n| n["health"] == "serving"), "{st:?}");
    let r = Readers::start(ports[3].1, &data);
    r.wait_progress(16 << 20);
    nodes[2].kill9();
    r.finish();
    // n3 went one level up, to its grandparent, not to the root.
    let st = fleet_status(fs);
    assert_eq!(node(&st, "n3")["active_parent"], "n1");
    assert_eq!(node(&st, "n2")["health"], "unreachable");
    assert!(node(&st, "n3")["failovers"].as_u64().unwrap() >= 1);
    let text = Command::new(HERD)
        .args(["fleet", "status", fs])
        .output()
        .unwrap();
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.contains("reads from n1 (failed over)"), "{text}");
    // Bad fleet files are refused with the line.
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&f)
            .unwrap()
            .replace("\"n3\"", "\"n1\""),
    )
    .unwrap();
    let out = Command::new(HERD)
        .args(["fleet", "status", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 19: member `n1` appears twice"), "{err}");
}

struct Etcd {
    child: Child,
    dir: PathBuf,
}

impl Etcd {
    fn start(dir: &Path, port: u16, peer: u16) -> Self {
        let data = dir.join("etcd");
        let child = Command::new("etcd")
            .args(["--data-dir", data.to_str().unwrap()])
            .args(["--listen-client-urls", &format!("http://127.0.0.1:{port}")])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{port}"),
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args([
                "--initial-cluster",
                &format!("default=http://127.0.0.1:{peer}"),
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("etcd.log")).unwrap())
            .spawn()
            .unwrap();
        wait_port(port);
        Self { child, dir: data }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_status(
    source: &str,
    what: &str,
    ok: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new(HERD)
            .args(["fleet", "status", source, "--json"])
            .output()
            .unwrap();
        if out.status.success() {
            let st: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
            if ok(&st) {
                return st;
            }
            assert!(Instant::now() < deadline, "{what}: {st:#?}");
        } else {
            assert!(
                Instant::now() < deadline,
                "{what}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn etcd_membership_builds_the_tree_survives_etcd_and_takes_joiners() {
    if !have("etcd") {
        return;
    }
    let dir = scratch("failover-etcd");
    let img = dir.join("golden.img");
    let data = Arc::new(random_image(&img, IMAGE));
    let (eport, epeer) = (free_port(), free_port());
    let mut etcd = Etcd::start(&dir, eport, epeer);
    let src = format!("etcd://127.0.0.1:{eport}/herd-test");
    let fleet = ["--fleet", &src, "--lease-ttl", "2", "--fanout", "1"];
    let (rp, rm) = (free_port(), free_port());
    let _root = fleet_herd(&dir, "root", Some(img.to_str().unwrap()), rp, rm, &fleet);
    // Members get their parents from etcd alone: no --upstream.
    let member =
        |name: &str, port: u16, metrics: u16| fleet_herd(&dir, name, None, port, metrics, &fleet);
    let (p1, m1, p2, m2) = (free_port(), free_port(), free_port(), free_port());
    let _n1 = member("n1", p1, m1);
    let n2 = member("n2", p2, m2);
    let st = wait_status(&src, "n2 under n1", |st| {
        st.len() == 3
            && node(st, "n1")["parent"] == "root"
            && node(st, "n2")["parent"] == "n1"
            && node(st, "n2")["active_parent"] == "n1"
    });
    assert!(st.iter().all(|n| n["health"] == "serving"), "{st:#?}");
    // etcd goes away mid-read: nodes keep serving with the parents they have.
    let r = Readers::start(n2.port, &data);
    r.wait_progress(8 << 20);
    let _ = etcd.child.kill();
    let _ = etcd.child.wait();
    r.finish();
    // Back (same data): everyone registers again under a new lease.
    let data_dir = etcd.dir.clone();
    std::mem::forget(etcd);
    let etcd = Etcd::start(&dir, eport, epeer);
    assert_eq!(etcd.dir, data_dir);
    wait_status(&src, "all re-registered", |st| {
        st.len() == 3 && st.iter().all(|n| n["health"] == "serving")
    });
    // A joiner mid-run gets the next slot, a parent, and serves.
    let (p3, m3) = (free_port(), free_port());
    let n3 = member("n3", p3, m3);
    wait_status(&src, "n3 under n2", |st| {
        st.len() == 4 && node(st, "n3")["parent"] == "n2"
    });
    Readers::start(n3.port, &data).finish();
    // Unreachable etcd and no --upstream: a clear error naming it.
    let out = Command::new(HERD)
        .args(["serve", "--listen", "127.0.0.1:1", "--node", "x"])
        .args(["--cache-dir", dir.join("x-cache").to_str().unwrap()])
        .args([
            "--fleet",
            &format!("etcd://127.0.0.1:{}/herd-test", free_port()),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("etcd at 127.0.0.1:") && err.contains("give --upstream"),
        "{err}"
    );
}

#[test]
fn a_child_holds_its_profile_connection_instead_of_polling() {
    let dir = scratch("failover-churn");
    let img = dir.join("golden.img");
    random_image(&img, 8 << 20);
    let prof = dir.join("boot.profile");
    let f = std::fs::File::open(&img).unwrap();
    let id = herd::profile::identity_of_file(&f, 8 << 20).unwrap();
    let mut b = herd::profile::ProfileBuilder::new(8 << 20, 4096);
    b.add(0, 1 << 20, 0);
    b.finish(id, 0).save(&prof).unwrap();
    let root = herd(
        &dir,
        "root",
        &[img.display().to_string()],
        None,
        &["--profile", prof.to_str().unwrap()],
    );
    let child = herd(&dir, "child", &[root.url()], None, &[]);
    child.wait_prefetched(Duration::from_secs(30));
    // The child's startup connections (data, probe, profile, the held
    // manifest its version follower watches) settle first: the count
    // stays put for a second (a 2 s poll would still show below).
    let mut before = root.metric("herd_nbd_connections_total");
    for _ in 0..10 {
        std::thread::sleep(Duration::from_secs(1));
        let now = root.metric("herd_nbd_connections_total");
        if now == before {
            break;
        }
        before = now;
    }
    // Three poll periods: the old loop opened a connection every 2 s.
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(root.metric("herd_nbd_connections_total"), before);
    let log = std::fs::read_to_string(&root.log).unwrap();
    assert!(!log.contains("during handshake"), "{log}");
}
