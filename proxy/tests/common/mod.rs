//! Helpers for end-to-end tests: spawn real `herd` daemons and real peers
//! (qemu-nbd, nbdkit, nbdcopy, qemu-img), scrape metrics, speak raw NBD.
#![allow(dead_code)] // each test file uses a different subset

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use herd::nbd::proto;

pub const HERD: &str = env!("CARGO_BIN_EXE_herd");

/// A scratch directory under target/tmp, fresh per test.
pub fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("e2e-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create scratch dir");
    d
}

/// True if `tool` is on PATH. Under `HERD_STRICT` (set by `cargo xtask
/// test`) a missing tool fails the test instead of skipping it.
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("HERD_STRICT").is_none(),
            "{tool} is required (run `cargo xtask test`, which installs it)"
        );
        eprintln!("SKIP: {tool} not installed");
    }
    found
}

pub fn free_port() -> u16 {
    herd::net::unused_port().expect("free port")
}

/// Writes `size` random bytes to `path`.
pub fn random_image(path: &Path, size: usize) -> Vec<u8> {
    use rand::RngCore;
    let mut data = vec![0u8; size];
    rand::thread_rng().fill_bytes(&mut data);
    std::fs::write(path, &data).expect("write image");
    data
}

/// A sparse image of `size` bytes: random data in `extents` (4 KiB
/// aligned, not chunk aligned), explicit zeros written in `zeros`, holes
/// elsewhere. Returns its bytes.
pub fn sparse_image(
    path: &Path,
    size: u64,
    extents: &[(u64, u64)],
    zeros: &[(u64, u64)],
) -> Vec<u8> {
    use rand::RngCore;
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(size).expect("size image");
    let mut img = vec![0u8; usize::try_from(size).expect("size")];
    for &(off, len) in extents {
        let r = usize::try_from(off).expect("off")..usize::try_from(off + len).expect("end");
        rand::thread_rng().fill_bytes(&mut img[r.clone()]);
        f.write_all_at(&img[r], off).expect("write extent");
    }
    for &(off, len) in zeros {
        f.write_all_at(&vec![0u8; usize::try_from(len).expect("len")], off)
            .expect("write zeros");
    }
    f.sync_all().expect("sync image");
    img
}

/// Bytes in `chunk`-sized chunks that hold any non-zero byte: what a
/// cache of such chunks has to move.
pub fn data_chunk_bytes(img: &[u8], chunk: usize) -> u64 {
    img.chunks(chunk)
        .filter(|c| c.iter().any(|&b| b != 0))
        .map(|c| c.len() as u64)
        .sum()
}

/// `herd manifest build IMG`: the manifest beside the image, as a root
/// over a server that is not herd (nbdkit, qemu-nbd) is given it.
pub fn build_manifest(img: &Path) -> PathBuf {
    let out = img.with_extension("herd-manifest");
    run(Command::new(HERD)
        .args(["manifest", "build"])
        .arg(img)
        .arg("--out")
        .arg(&out));
    out
}

/// Waits (10 s at most) for a server to create its Unix socket.
pub fn wait_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "no socket at {} after 10 s",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listens on port {port} after 20 s");
}

/// A running herd daemon; killed on drop.
pub struct Herd {
    pub child: Child,
    pub port: u16,
    pub metrics: u16,
    pub log: PathBuf,
}

/// The path the tests' daemons take unless a test picks one:
/// `HERD_TEST_NET_IO` (`cargo xtask test` runs the end-to-end tests of the
/// parent links again with `epoll`, the fallback), else herd's default,
/// uring: `assert_links_ran_on` then checks that the default really ran
/// on rings.
pub fn net_io() -> String {
    std::env::var("HERD_TEST_NET_IO").unwrap_or_else(|_| "uring".into())
}

/// The path a daemon started with `extra` takes: its `--net-io`, else the
/// tests' default.
pub fn net_io_of(extra: &[&str]) -> String {
    extra
        .iter()
        .position(|a| *a == "--net-io")
        .and_then(|i| extra.get(i + 1))
        .map_or_else(net_io, |io| (*io).to_owned())
}

/// Asserts that at least `at_least` of `h`'s connections on `link`
/// ("iscsi", "nbd") ran on `io` and none on the other path (a ring never
/// falls back silently), and that ring completions were counted exactly
/// when `io` is uring.
pub fn assert_links_ran_on(h: &Herd, link: &str, io: &str, at_least: f64) {
    let streams = |io: &str| {
        scrape_opt(
            h.metrics,
            &format!("herd_net_streams_total{{link=\"{link}\",io=\"{io}\"}}"),
        )
    };
    let other = if io == "uring" { "epoll" } else { "uring" };
    assert!(
        streams(io).unwrap_or(0.0) >= at_least,
        "{link} connections on {io}: {:?}",
        streams(io)
    );
    assert_eq!(streams(other), None, "a {link} connection ran on {other}");
    let recvs = ring_completions(h, link, "recv");
    // A link's first request is alone on it: sent at once (`send_now`).
    let alone = ring_completions(h, link, "send_now");
    if io == "uring" {
        assert!(recvs.unwrap_or(0.0) > 0.0, "{recvs:?}");
        assert!(
            alone.unwrap_or(0.0) > 0.0,
            "no request sent at once: {alone:?}"
        );
    } else {
        assert_eq!(recvs, None);
        assert_eq!(alone, None);
    }
}

/// `herd_ring_completions_total{link,op}` of `h`, if exported.
pub fn ring_completions(h: &Herd, link: &str, op: &str) -> Option<f64> {
    scrape_opt(
        h.metrics,
        &format!("herd_ring_completions_total{{link=\"{link}\",op=\"{op}\"}}"),
    )
}

/// Asserts that `h`'s reader on `link` raised its receive low-water mark
/// to wake once a large payload is whole (and lowered it again).
pub fn assert_waited_for_whole_payloads(h: &Herd, link: &str) {
    let sets = scrape_opt(
        h.metrics,
        &format!("herd_recv_lowat_sets_total{{link=\"{link}\"}}"),
    );
    assert!(
        sets.unwrap_or(0.0) >= 2.0,
        "{link}: the receive low-water mark was never moved: {sets:?}"
    );
}

/// Asserts that `h`'s ring on `link` received some payload in place
/// (`RingRx::recv_into`) rather than copying all of it out of its buffers,
/// and that the requests for such payloads went out at once (`send_now`):
/// the ring sends only the odd small message, a ping (none at all in
/// these tests; a tenth to four fifths of the sends when they batched).
pub fn assert_received_in_place(h: &Herd, link: &str) {
    let placed = ring_completions(h, link, "recv_in_place");
    assert!(
        placed.unwrap_or(0.0) > 0.0,
        "{link}: no payload received in place: {placed:?}"
    );
    let (now, ring) = (
        ring_completions(h, link, "send_now").unwrap_or(0.0),
        ring_completions(h, link, "send").unwrap_or(0.0),
    );
    assert!(
        now > 0.0 && ring * 20.0 <= now,
        "{link}: requests for large payloads went through the ring: {ring} sent there, {now} at once"
    );
}

impl Herd {
    /// Starts `herd serve` with `upstream` and waits until it listens; a
    /// daemon that lost its ports to another test is started again on
    /// others.
    pub fn start(dir: &Path, name: &str, upstream: &str, extra: &[&str]) -> Self {
        Self::start_filtered(dir, name, upstream, extra, None)
    }

    /// As `start`, with `io_uring_setup` failing (`EPERM`) in the daemon,
    /// as a container runtime's default seccomp profile makes it.
    pub fn start_without_io_uring(dir: &Path, name: &str, upstream: &str, extra: &[&str]) -> Self {
        let deny = [(libc::SYS_io_uring_setup, vec![])].into_iter().collect();
        let filter = seccompiler::SeccompFilter::new(
            deny,
            seccompiler::SeccompAction::Allow,
            seccompiler::SeccompAction::Errno(libc::EPERM as u32),
            seccompiler::TargetArch::x86_64,
        )
        .expect("seccomp filter");
        let prog: seccompiler::BpfProgram = filter.try_into().expect("seccomp program");
        Self::start_filtered(dir, name, upstream, extra, Some(&prog))
    }

    fn start_filtered(
        dir: &Path,
        name: &str,
        upstream: &str,
        extra: &[&str],
        seccomp: Option<&seccompiler::BpfProgram>,
    ) -> Self {
        for _ in 0..4 {
            let (port, metrics) = (free_port(), free_port());
            match Self::try_start(dir, name, upstream, port, metrics, extra, seccomp) {
                Ok(h) => return h,
                Err(log) if log.contains("Address already in use") => {}
                Err(log) => panic!("herd {name} exited before it listened:\n{log}"),
            }
        }
        panic!("herd {name}: four pairs of ports taken in a row");
    }

    pub fn start_on(dir: &Path, name: &str, upstream: &str, port: u16, extra: &[&str]) -> Self {
        Self::try_start(dir, name, upstream, port, free_port(), extra, None)
            .unwrap_or_else(|log| panic!("herd {name} exited before it listened:\n{log}"))
    }

    /// `Err(log)` if the daemon exits before both its ports listen.
    fn try_start(
        dir: &Path,
        name: &str,
        upstream: &str,
        port: u16,
        metrics: u16,
        extra: &[&str],
        seccomp: Option<&seccompiler::BpfProgram>,
    ) -> Result<Self, String> {
        let log = dir.join(format!("{name}.log"));
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        // The tests count chunks: pin 1 MiB unless a test picks its own.
        let chunk: &[&str] = if extra.contains(&"--chunk-size") {
            &[]
        } else {
            &["--chunk-size", "1MiB"]
        };
        // Unset, the daemon runs on its default: no flag.
        let io = match std::env::var("HERD_TEST_NET_IO") {
            Ok(io) if !extra.contains(&"--net-io") => vec!["--net-io".to_owned(), io],
            _ => Vec::new(),
        };
        // No upstream: the images come from `--config` ([[image]] tables).
        let up: &[&str] = if upstream.is_empty() {
            &[]
        } else {
            &["--upstream", upstream]
        };
        let logged = usize::try_from(logf.metadata().map_or(0, |m| m.len())).unwrap_or(0);
        let mut cmd = Command::new(HERD);
        if let Some(prog) = seccomp.cloned() {
            use std::os::unix::process::CommandExt;
            // SAFETY: between fork and exec the closure only makes the two
            // syscalls that install the filter, allocating nothing.
            unsafe {
                cmd.pre_exec(move || {
                    seccompiler::apply_filter(&prog)
                        .map_err(|_| std::io::ErrorKind::PermissionDenied.into())
                });
            }
        }
        let mut child = cmd
            .arg("serve")
            .args(up)
            .args(chunk)
            .args(io)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args([
                "--cache-dir",
                dir.join(format!("{name}-cache")).to_str().expect("utf8"),
            ])
            .args(["--metrics", &format!("127.0.0.1:{metrics}")])
            .args(extra)
            .stderr(logf)
            .spawn()
            .expect("spawn herd");
        let deadline = Instant::now() + Duration::from_secs(20);
        // Its own word that it serves on `port` (its log) and has bound
        // every listener (`herd_serving`), not just ports that answer:
        // another test's daemon can hold a port this one has yet to bind
        // (it was free when picked; a root builds its manifest before it
        // listens), and the test would read from that one.
        let listening = format!("serving NBD listen=127.0.0.1:{port} ");
        let serving = || {
            // This daemon's lines only: a restarted one appends to the log.
            let said = std::fs::read(&log)
                .ok()
                .and_then(|l| {
                    l.get(logged..)
                        .map(|l| String::from_utf8_lossy(l).into_owned())
                })
                .is_some_and(|l| l.contains(&listening));
            // A daemon that exits meanwhile fails the scrape, not the test:
            // the loop then reports its log.
            said && metrics_page(metrics)
                .is_ok_and(|b| herd::metrics::sample(&b, "herd_serving") == Some(1.0))
        };
        while !serving() {
            if child.try_wait().ok().flatten().is_some() {
                return Err(std::fs::read_to_string(&log).unwrap_or_default());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("herd {name} does not serve on {port} and {metrics} after 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self {
            child,
            port,
            metrics,
            log,
        })
    }

    pub fn url(&self) -> String {
        format!("nbd://127.0.0.1:{}/herd", self.port)
    }

    /// The identity image `herd` is served at now, as `herd image list`
    /// shows it (16 hex digits: enough to pin the version). Checks that
    /// the list also names that version as `herd@IDENTITY`.
    pub fn latest_identity(&self) -> String {
        let out = Command::new(HERD)
            .args(["image", "list", &format!("nbd://127.0.0.1:{}", self.port)])
            .output()
            .expect("herd image list");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{text}");
        let id = text
            .lines()
            .find(|l| l.starts_with("herd "))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or_else(|| panic!("no herd row:\n{text}"))
            .to_owned();
        assert!(
            text.lines().any(|l| l.starts_with(&format!("herd@{id}"))),
            "the latest is listed as a version too:\n{text}"
        );
        id
    }

    /// Lines of this daemon's log that contain `what`.
    pub fn log_lines(&self, what: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(what))
            .count()
    }

    /// Value of one Prometheus metric; panics if herd does not export it
    /// (herd registers every metric at 0 before its first scrape, so a
    /// renamed metric cannot pass for 0).
    pub fn metric(&self, name: &str) -> f64 {
        scrape(self.metrics, name)
    }

    /// One side's spin counters (`io::spin`), for `prefix` `herd_export`,
    /// `herd_iscsi` or `herd_iscsi_target`: waits a message ended, waits
    /// that idled, and microseconds spent spinning.
    pub fn spins(&self, prefix: &str) -> (f64, f64, f64) {
        (
            self.metric(&format!("{prefix}_spins_total{{outcome=\"request\"}}")),
            self.metric(&format!("{prefix}_spins_total{{outcome=\"idle\"}}")),
            self.metric(&format!("{prefix}_spin_microseconds_total")),
        )
    }

    /// Polls a metric until it equals `want` (the cache persists chunks
    /// just after serving them); panics with the last value if it does
    /// not within 10 s. Returns `want`.
    pub fn metric_eventually(&self, name: &str, want: f64) -> f64 {
        self.metric_within(name, want, Duration::from_secs(10))
    }

    /// `metric_eventually` with its own limit (a version going down a
    /// tree takes a poll per level).
    pub fn metric_within(&self, name: &str, want: f64, limit: Duration) -> f64 {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.metric(name);
            if v == want {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{name} is {v}, not {want}, after {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Polls a metric until it reaches `at_least` or `limit` passes (the
    /// caller asserts on what happened next).
    pub fn wait_metric_at_least(&self, name: &str, at_least: f64, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.metric(name) < at_least && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `sig` (e.g. "STOP", "CONT") to the daemon.
    pub fn signal(&self, sig: &str) {
        signal(self.child.id(), sig);
    }

    /// SIGTERM, then waits for a graceful exit (10 s at most).
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        panic!("herd did not exit within 10 s of SIGTERM");
    }

    /// Waits until this proxy's prefetch plan is complete.
    pub fn wait_prefetched(&self, limit: Duration) -> f64 {
        let deadline = Instant::now() + limit;
        loop {
            let (done, total) = (
                self.metric("herd_prefetch_chunks_done"),
                self.metric("herd_prefetch_chunks_total"),
            );
            if total > 0.0 && done == total {
                return total;
            }
            assert!(
                Instant::now() < deadline,
                "prefetch incomplete after {limit:?}: {done}/{total}\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Herd {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Sends `sig` (e.g. "STOP", "CONT") to `pid`; panics if kill fails.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid}");
}

/// A metric that must be exported (0 is a real value, absence a failure).
/// One metric of the herd whose metrics listen on `port`; panics if it is
/// not exported (herd registers every metric at 0 before its first scrape).
pub fn scrape(port: u16, name: &str) -> f64 {
    scrape_opt(port, name).unwrap_or_else(|| panic!("metric {name} is not exported"))
}

pub fn scrape_opt(port: u16, name: &str) -> Option<f64> {
    let body = metrics_page(port).expect("read metrics");
    herd::metrics::sample(&body, name)
}

/// The daemon's whole `/metrics` page.
fn metrics_page(port: u16) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

/// A child process (peer server) killed on drop.
pub struct Peer(pub Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn tool");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn nbdcopy(url: &str, out: &Path) {
    run(Command::new("nbdcopy").arg(url).arg(out));
}

pub fn assert_same_file(a: &Path, expected: &[u8]) {
    let got = std::fs::read(a).expect("read output");
    assert_eq!(got.len(), expected.len(), "length of {}", a.display());
    if let Some(i) = got.iter().zip(expected).position(|(x, y)| x != y) {
        panic!("{} differs from the source at byte {i}", a.display());
    }
}

/// A minimal blocking NBD client for raw wire tests.
pub struct RawClient {
    pub s: TcpStream,
    pub size: u64,
}

impl RawClient {
    pub fn connect(port: u16, export: &str) -> Self {
        Self::try_connect(port, export)
            .unwrap_or_else(|(replies, msg)| panic!("GO failed with replies {replies:x?}: {msg}"))
    }

    /// Negotiates up to transmission; `Err((every reply type, message))`
    /// when the server answers OPT_GO with an error.
    pub fn try_connect(port: u16, export: &str) -> Result<Self, (Vec<u32>, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut g = [0u8; 18];
        s.read_exact(&mut g).expect("greeting");
        proto::decode_greeting(&g).expect("valid greeting");
        let mut out = 3u32.to_be_bytes().to_vec();
        let req = proto::InfoRequest {
            name: export.into(),
            infos: vec![],
        };
        proto::encode_option(proto::OPT_GO, &proto::encode_info_request(&req), &mut out);
        s.write_all(&out).expect("send GO");
        let mut size = 0;
        let mut replies = Vec::new();
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).expect("option reply");
            let r = proto::decode_option_reply_header(&h).expect("reply header");
            let mut p = vec![0u8; r.len as usize];
            s.read_exact(&mut p).expect("payload");
            replies.push(r.reply);
            match r.reply {
                proto::REP_ACK => break,
                proto::REP_INFO => {
                    if let Ok(proto::Info::Export { size: sz, .. }) = proto::decode_info(&p) {
                        size = sz;
                    }
                }
                _ => return Err((replies, String::from_utf8_lossy(&p).into_owned())),
            }
        }
        Ok(Self { s, size })
    }

    pub fn send(&mut self, command: u16, handle: u64, offset: u64, length: u32, payload: &[u8]) {
        let mut out = Vec::new();
        proto::encode_request(
            &proto::Request {
                flags: 0,
                command,
                handle,
                offset,
                length,
            },
            &mut out,
        );
        out.extend_from_slice(payload);
        self.s.write_all(&out).expect("send request");
    }

    /// One READ, waited for; panics on an error reply.
    pub fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        self.send(proto::CMD_READ, 7, offset, len, &[]);
        let (_, errno, data) = self.reply(|_| len as usize);
        assert_eq!(errno, 0, "READ {offset}+{len} failed");
        data
    }

    /// One READ, waited for: its data, or the errno of an error reply.
    /// The whole export, in 1 MiB READs.
    pub fn read_all(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut off = 0u64;
        while off < self.size {
            let n = (self.size - off).min(1 << 20);
            out.extend(self.read(off, u32::try_from(n).expect("1 MiB")));
            off += n;
        }
        out
    }

    pub fn try_read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.send(proto::CMD_READ, 7, offset, len, &[]);
        let (_, errno, data) = self.reply(|_| len as usize);
        if errno == 0 {
            Ok(data)
        } else {
            Err(errno)
        }
    }

    /// Reads one simple reply; returns (handle, errno, data) with `len`
    /// bytes of data when errno is 0 and `len` is given for that handle.
    pub fn reply(&mut self, data_len: impl Fn(u64) -> usize) -> (u64, u32, Vec<u8>) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).expect("reply header");
        let proto::ReplyHeader::Simple { error, handle } =
            proto::decode_reply_header(&h).expect("simple reply")
        else {
            panic!("structured reply without negotiation");
        };
        let mut data = Vec::new();
        if error == 0 {
            data.resize(data_len(handle), 0);
            self.s.read_exact(&mut data).expect("reply data");
        }
        (handle, error, data)
    }
}

/// A userspace iSCSI target (tgtd) on a free loopback port with LUN 1
/// backed by a file; stopped on drop.
pub struct Tgtd {
    pub child: Option<Child>,
    pub port: u16,
    pub ctl: u16,
    pub iqn: String,
    pub backing: PathBuf,
    pub chap: Option<(String, String)>,
}

/// tgtd control channels handed out by this test process.
static NEXT_CTL: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);

/// A tgtd control channel (a small number) no other test uses: tests run
/// in parallel, and two tgtds on one channel would see each other's
/// targets. (Deriving it from the port collided: 800 values, 6 tests.)
fn control_channel() -> u16 {
    let base = u16::try_from(std::process::id() % 80).unwrap_or(0) * 10;
    loop {
        let n = NEXT_CTL.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let ctl = 100 + (base + n) % 800;
        let lock = format!("/var/run/tgtd/socket.{ctl}.lock");
        // A channel a live tgtd holds (or a dead one left) is skipped.
        if !Path::new(&lock).exists() || n >= 800 {
            return ctl;
        }
    }
}

impl Tgtd {
    pub fn start(backing: &Path, chap: Option<(&str, &str)>) -> Self {
        let port = free_port();
        let ctl = control_channel();
        let mut t = Self {
            child: None,
            port,
            ctl,
            iqn: format!("iqn.2026-11.dev.herd:test{port}"),
            backing: backing.to_owned(),
            chap: chap.map(|(u, p)| (u.to_owned(), p.to_owned())),
        };
        t.launch();
        t
    }

    fn adm(&self, args: &[&str]) {
        let out = Command::new("tgtadm")
            .args(["-C", &self.ctl.to_string(), "--lld", "iscsi"])
            .args(args)
            .output()
            .expect("tgtadm");
        assert!(
            out.status.success(),
            "tgtadm {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// (Re)starts tgtd on the same port with the same target.
    pub fn launch(&mut self) {
        let child = Command::new("tgtd")
            .args([
                "-f",
                "-C",
                &self.ctl.to_string(),
                "--iscsi",
                &format!("portal=127.0.0.1:{}", self.port),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tgtd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = Command::new("tgtadm")
                .args([
                    "-C",
                    &self.ctl.to_string(),
                    "--lld",
                    "iscsi",
                    "--op",
                    "show",
                    "--mode",
                    "system",
                ])
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "tgtd did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        let iqn = self.iqn.clone();
        let backing = self.backing.to_str().expect("utf8").to_owned();
        self.adm(&["--op", "new", "--mode", "target", "--tid", "1", "-T", &iqn]);
        self.adm(&[
            "--op",
            "new",
            "--mode",
            "logicalunit",
            "--tid",
            "1",
            "--lun",
            "1",
            "-b",
            &backing,
        ]);
        self.adm(&[
            "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL",
        ]);
        if let Some((u, p)) = self.chap.clone() {
            self.adm(&[
                "--op",
                "new",
                "--mode",
                "account",
                "--user",
                &u,
                "--password",
                &p,
            ]);
            self.adm(&[
                "--op", "bind", "--mode", "account", "--tid", "1", "--user", &u,
            ]);
        }
        wait_port(self.port);
    }

    /// Marks LUN 1 thin-provisioned: READ CAPACITY(16) then reports
    /// LBPME and LBPRZ, and GET LBA STATUS the backing file's holes.
    pub fn thin_provisioning(&self) {
        self.adm(&[
            "--op",
            "update",
            "--mode",
            "logicalunit",
            "--tid",
            "1",
            "--lun",
            "1",
            "--params",
            "thin_provisioning=1",
        ]);
    }

    /// Makes the target prefer CRC32C header and data digests.
    pub fn want_digests(&self) {
        for name in ["HeaderDigest", "DataDigest"] {
            self.adm(&[
                "--op", "update", "--mode", "target", "--tid", "1", "--name", name, "--value",
                "CRC32C",
            ]);
        }
    }

    pub fn url(&self, user: Option<&str>) -> String {
        let u = user.map_or(String::new(), |u| format!("{u}@"));
        format!("iscsi://{u}127.0.0.1:{}/{}/1", self.port, self.iqn)
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `sig` (e.g. "STOP", "CONT") to tgtd.
    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            signal(c.id(), sig);
        }
    }
}

impl Drop for Tgtd {
    fn drop(&mut self) {
        self.kill9();
    }
}
