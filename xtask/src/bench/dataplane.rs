//! `cargo xtask bench dataplane`: herd against nbdkit and qemu-nbd, side by
//! side in one run, with fio's nbd engine.
//!
//! Two groups of servers, all on loopback, all serving the same file:
//! - **hit path**: herd with a warm cache, nbdkit's file plugin, qemu-nbd
//!   (`--cache=none --aio=io_uring`) and qemu-nbd with its defaults;
//! - **relay (miss path)**: a cold child in front of a parent of its kind:
//!   herd leaf → herd root, nbdkit nbd plugin + cache filter → nbdkit,
//!   qemu-nbd serving a copy-on-read qcow2 overlay → qemu-nbd.
//!
//! Every (server, pattern) runs `reps` times, rounds interleaved (the
//! servers' order turning each round) so drift hits every server alike;
//! medians and min/max are reported, with herd's
//! ratio to the best peer and each figure as a fraction of the loopback
//! TCP and memory-copy ceilings measured in the same run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::demo::build_herd;
use crate::util::{free_port, machine_busy_secs, median, output, proc_cpu_secs, root, run, step};

#[derive(clap::Args, Debug, Clone)]
pub struct Options {
    /// A ~1-minute smoke run: small image, 1 repetition, 1 s per job.
    #[arg(long)]
    pub quick: bool,
    /// Image size in MiB.
    #[arg(long)]
    pub size_mib: Option<u64>,
    /// Seconds per fio job (after a warm-up).
    #[arg(long)]
    pub runtime: Option<u64>,
    /// Repetitions of every job.
    #[arg(long)]
    pub reps: Option<usize>,
    /// Where to write dataplane.json, dataplane.svg and README.md.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// herd's chunk size for this run (default: herd's own default).
    #[arg(long)]
    pub chunk_size: Option<String>,
    /// Another herd build (a binary), measured beside this one in the same
    /// interleaved rounds: each row gains "herd ÷ baseline" (before/after).
    #[arg(long)]
    pub baseline_herd: Option<PathBuf>,
    /// Only herd (and the baseline): skip the peers and the pinned runs.
    #[arg(long)]
    pub herd_only: bool,
    /// Only these groups of rows: hit, relay, tls (repeatable; default all).
    #[arg(long = "group", value_parser = ["hit", "relay", "tls"])]
    pub groups: Vec<String>,
    /// Only these patterns (repeatable; default all): a quicker A/B of
    /// one row, with more rounds for the same time.
    #[arg(long = "pattern", value_parser = PATTERNS.iter().map(|p| p.name).collect::<Vec<_>>())]
    pub patterns: Vec<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pattern {
    pub name: &'static str,
    pub rw: &'static str,
    pub bs: &'static str,
    pub iodepth: u32,
    pub jobs: u32,
    /// Report IOPS (small blocks) or MiB/s (large).
    pub iops: bool,
}

/// The relay group's reference column (`Server::Forward`): not a peer.
pub const FORWARDER: &str = "splice forwarder->herd root";

pub const PATTERNS: &[Pattern] = &[
    Pattern {
        name: "4k-rand-qd1",
        rw: "randread",
        bs: "4k",
        iodepth: 1,
        jobs: 1,
        iops: true,
    },
    Pattern {
        name: "4k-rand-qd32",
        rw: "randread",
        bs: "4k",
        iodepth: 16,
        jobs: 2,
        iops: true,
    },
    Pattern {
        name: "64k-rand-qd8",
        rw: "randread",
        bs: "64k",
        iodepth: 8,
        jobs: 1,
        iops: false,
    },
    Pattern {
        name: "1m-seq-qd1",
        rw: "read",
        bs: "1m",
        iodepth: 1,
        jobs: 1,
        iops: false,
    },
    Pattern {
        name: "1m-seq-qd8",
        rw: "read",
        bs: "1m",
        iodepth: 4,
        jobs: 2,
        iops: false,
    },
];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cell {
    pub server: String,
    pub group: String,
    pub pattern: String,
    pub unit: String,
    pub samples: Vec<f64>,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// The server's CPU over each sample's fio run, in cores busy (user +
    /// system time ÷ wall time, every process of the server).
    #[serde(default)]
    pub cpu: Vec<f64>,
    /// The whole machine's CPU over each sample's run, in cores busy
    /// (client, server and everything else): with `cpu` and the ceilings,
    /// what bounds the row.
    #[serde(default)]
    pub machine_cpu: Vec<f64>,
}

/// One fio job: its figure, the server's cores busy, the machine's.
#[derive(Debug, Clone, Copy)]
struct Run {
    value: f64,
    server_cpu: f64,
    machine_cpu: f64,
}

impl Cell {
    fn new(server: &Server, group: &str, pattern: &str, unit: &str, runs: &[Run]) -> Self {
        let samples: Vec<f64> = runs.iter().map(|r| r.value).collect();
        let samples = &samples[..];
        Self {
            cpu: runs.iter().map(|r| r.server_cpu).collect(),
            machine_cpu: runs.iter().map(|r| r.machine_cpu).collect(),
            server: server.name().into(),
            group: group.into(),
            pattern: pattern.into(),
            unit: unit.into(),
            samples: samples.to_vec(),
            median: median(samples),
            min: samples.iter().copied().fold(f64::INFINITY, f64::min),
            max: samples.iter().copied().fold(0.0, f64::max),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ceilings {
    pub loopback_tcp_mib_s: f64,
    pub memcpy_mib_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub version: u32,
    pub image_mib: u64,
    pub runtime_s: u64,
    pub reps: usize,
    pub cores: usize,
    pub ceilings: Ceilings,
    pub cells: Vec<Cell>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    Herd,
    HerdBase,
    HerdRelayBase,
    Nbdkit,
    QemuNbdUring,
    QemuNbd,
    HerdRelay,
    NbdkitRelay,
    QemuNbdRelay,
    /// Not a relay: a splice forwarder between fio and the warm herd root,
    /// what the same two loopback crossings allow with no work done.
    Forward,
    /// The hit path again, every connection TLS (NBD_OPT_STARTTLS).
    HerdTls,
    NbdkitTls,
}

impl Server {
    const HIT: [Self; 4] = [Self::Herd, Self::Nbdkit, Self::QemuNbdUring, Self::QemuNbd];
    const RELAY: [Self; 4] = [
        Self::HerdRelay,
        Self::NbdkitRelay,
        Self::QemuNbdRelay,
        Self::Forward,
    ];
    const TLS: [Self; 2] = [Self::HerdTls, Self::NbdkitTls];

    fn name(self) -> &'static str {
        match self {
            Self::Herd => "herd (warm)",
            Self::HerdBase => "herd baseline (warm)",
            Self::HerdRelayBase => "herd baseline leaf->root",
            Self::Nbdkit => "nbdkit file",
            Self::QemuNbdUring => "qemu-nbd io_uring+nocache",
            Self::QemuNbd => "qemu-nbd default",
            Self::HerdRelay => "herd leaf->root",
            Self::NbdkitRelay => "nbdkit cache->nbdkit",
            Self::QemuNbdRelay => "qemu-nbd CoR->qemu-nbd",
            Self::Forward => FORWARDER,
            Self::HerdTls => "herd TLS (warm)",
            Self::NbdkitTls => "nbdkit file TLS",
        }
    }

    fn group(self) -> &'static str {
        if Self::HIT.contains(&self) || self == Self::HerdBase {
            "hit"
        } else if Self::TLS.contains(&self) {
            "tls"
        } else {
            "relay"
        }
    }

    fn tls(self) -> bool {
        Self::TLS.contains(&self)
    }

    /// The servers of one run, in round order: herd, its baseline build
    /// if any, then the peers unless only herd is measured.
    fn lineup(opts: &Options, group: &[Self]) -> Vec<Self> {
        let mut v = Vec::new();
        for &s in group {
            let herd = matches!(s, Self::Herd | Self::HerdRelay | Self::HerdTls);
            if herd || !opts.herd_only {
                v.push(s);
            }
            if opts.baseline_herd.is_some() {
                match s {
                    Self::Herd => v.push(Self::HerdBase),
                    Self::HerdRelay => v.push(Self::HerdRelayBase),
                    _ => {}
                }
            }
        }
        v
    }
}

/// Processes of one running server (child last); killed on drop.
struct Running {
    procs: Vec<Child>,
    port: u16,
    export: &'static str,
    /// Clients connect with TLS, with the client certificates in this
    /// home directory.
    tls: Option<PathBuf>,
}

impl Running {
    /// The URI libnbd clients (fio, nbdcopy) open.
    fn uri(&self) -> String {
        let s = if self.tls.is_some() { "s" } else { "" };
        format!("nbd{s}://127.0.0.1:{}/{}", self.port, self.export)
    }

    /// A libnbd client (fio, nbdcopy) running `argv`. fio's nbd engine
    /// refuses `?tls-certificates=` (local file access in a URI), and libnbd
    /// run as root looks only in /etc/pki/libnbd: under TLS the client runs
    /// as nobody, which looks in `$HOME/.pki/libnbd`.
    fn client(&self, argv: &[&str]) -> Command {
        match &self.tls {
            Some(home) => {
                let mut c = Command::new("setpriv");
                c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "env"])
                    .arg(format!("HOME={}", home.display()))
                    .args(argv);
                c
            }
            None => {
                let mut c = Command::new(argv[0]);
                c.args(&argv[1..]);
                c
            }
        }
    }
}

/// The pinned 4 KiB QD1 runs: fio on CPU 0, the server on the CPU named.
pub const PLACEMENTS: [(&str, usize); 2] = [("same-cpu", 0), ("split-cpu", 1)];

/// The pattern name a pinned cell is stored under.
#[must_use]
pub fn pinned_pattern(placement: &str) -> String {
    format!("{} {placement}", PATTERNS[0].name)
}

impl Running {
    /// CPU seconds every process of the server has used so far.
    fn cpu_secs(&self) -> f64 {
        self.procs.iter().map(|p| proc_cpu_secs(p.id())).sum()
    }

    /// Pins every thread of every process of the server to `cpu` (threads
    /// made later inherit it).
    fn pin(&self, cpu: usize) -> Result<()> {
        for p in &self.procs {
            run(Command::new("taskset").args([
                "-a",
                "-p",
                "-c",
                &cpu.to_string(),
                &p.id().to_string(),
            ]))?;
        }
        Ok(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for p in self.procs.iter_mut().rev() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

fn wait_port(port: u16) -> Result<()> {
    crate::util::wait_port(port, Duration::from_secs(30))
}

struct Env {
    herd: PathBuf,
    baseline: Option<PathBuf>,
    image: PathBuf,
    scratch: PathBuf,
    chunk_size: Option<String>,
    /// A CA and a 127.0.0.1 server and client certificate (libnbd and
    /// nbdkit layout) for the TLS rows.
    pki: PathBuf,
    /// The TLS clients' home: a world-readable copy of the CA and the
    /// client certificate in `.pki/libnbd`.
    client_home: PathBuf,
}

/// `herd serve` flags for a TLS export with the bench's certificates
/// (client certificates required, as a fleet would run it).
fn herd_tls_args(env: &Env) -> Vec<String> {
    let f = |n: &str| env.pki.join(n).to_string_lossy().into_owned();
    vec![
        "--tls".into(),
        "require".into(),
        "--tls-cert".into(),
        f("server-cert.pem"),
        "--tls-key".into(),
        f("server-key.pem"),
        "--tls-ca".into(),
        f("ca-cert.pem"),
    ]
}

fn spawn(cmd: &mut Command, log: &Path) -> Result<Child> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))
}

fn herd_serve(
    env: &Env,
    bin: &Path,
    name: &str,
    upstream: &str,
    port: u16,
    extra: &[String],
) -> Result<Child> {
    let cache = env.scratch.join(format!("{name}-cache"));
    let _ = std::fs::remove_dir_all(&cache);
    spawn(
        Command::new(bin)
            .args([
                "serve",
                "--upstream",
                upstream,
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .arg("--cache-dir")
            .arg(&cache)
            .args(
                env.chunk_size
                    .iter()
                    .flat_map(|c| ["--chunk-size", c.as_str()]),
            )
            .args(extra)
            .env("NO_COLOR", "1"),
        &env.scratch.join(format!("{name}.log")),
    )
}

fn nbdkit(env: &Env, port: u16, args: &[&str], log: &str) -> Result<Child> {
    spawn(
        Command::new("nbdkit")
            .args([
                "-f",
                "-i",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "--exportname",
                "bench",
            ])
            .args(args),
        &env.scratch.join(log),
    )
}

/// qemu-nbd on loopback with 16 clients allowed; `args` end with what to
/// serve (a file, or `--image-opts SPEC`).
fn qemu_nbd(env: &Env, port: u16, args: &[&str], log: &str) -> Result<Child> {
    spawn(
        Command::new("qemu-nbd")
            .args([
                "-t",
                "-e",
                "16",
                "-x",
                "bench",
                "-b",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .args(args),
        &env.scratch.join(log),
    )
}

fn start(env: &Env, s: Server) -> Result<Running> {
    let port = free_port()?;
    let img = env.image.to_string_lossy().into_owned();
    // Filled as processes start: an error part-way kills those started.
    let mut running = Running {
        procs: Vec::new(),
        port,
        export: "",
        tls: s.tls().then(|| env.client_home.clone()),
    };
    let procs = &mut running.procs;
    let bin = match s {
        Server::HerdBase | Server::HerdRelayBase => env
            .baseline
            .as_deref()
            .context("no --baseline-herd given")?,
        _ => env.herd.as_path(),
    };
    let tls = s.tls().then(|| env.client_home.clone());
    running.export = match s {
        Server::Herd | Server::HerdBase | Server::HerdTls => {
            let extra = if s.tls() {
                herd_tls_args(env)
            } else {
                Vec::new()
            };
            procs.push(herd_serve(env, bin, "herd", &img, port, &extra)?);
            wait_port(port)?;
            // Warm: the hit path is what this row measures. The first
            // pass fetches (written past the page cache), the second
            // brings the cache into it, as a second reader would.
            let warm = Running {
                procs: Vec::new(),
                port,
                export: "herd",
                tls: tls.clone(),
            };
            for _ in 0..2 {
                run(&mut warm.client(&["nbdcopy", &warm.uri(), "null:"]))?;
            }
            "herd"
        }
        Server::Nbdkit => {
            procs.push(nbdkit(env, port, &["file", &img], "nbdkit.log")?);
            "bench"
        }
        Server::NbdkitTls => {
            let certs = format!("--tls-certificates={}", env.pki.display());
            procs.push(nbdkit(
                env,
                port,
                &["--tls=require", &certs, "--tls-verify-peer", "file", &img],
                "nbdkit-tls.log",
            )?);
            "bench"
        }
        Server::QemuNbdUring => {
            procs.push(qemu_nbd(
                env,
                port,
                &["-r", "-f", "raw", "--cache=none", "--aio=io_uring", &img],
                "qnbd-u.log",
            )?);
            "bench"
        }
        Server::QemuNbd => {
            procs.push(qemu_nbd(env, port, &["-r", "-f", "raw", &img], "qnbd.log")?);
            "bench"
        }
        Server::HerdRelay | Server::HerdRelayBase => {
            let pport = warm_root(env, bin, procs)?;
            procs.push(herd_serve(
                env,
                bin,
                "herd-leaf",
                &format!("nbd://127.0.0.1:{pport}/herd"),
                port,
                &[],
            )?);
            "herd"
        }
        Server::Forward => {
            let pport = warm_root(env, bin, procs)?;
            procs.push(spawn(
                Command::new(std::env::current_exe()?).args([
                    "forward",
                    "--listen",
                    &port.to_string(),
                    "--to",
                    &pport.to_string(),
                ]),
                &env.scratch.join("forward.log"),
            )?);
            "herd"
        }
        Server::NbdkitRelay => {
            let pport = free_port()?;
            procs.push(nbdkit(env, pport, &["file", &img], "nbdkit-parent.log")?);
            wait_port(pport)?;
            let uri = format!("uri=nbd://127.0.0.1:{pport}/bench");
            procs.push(nbdkit(
                env,
                port,
                &["--filter=cache", "nbd", &uri, "cache-on-read=true"],
                "nbdkit-relay.log",
            )?);
            "bench"
        }
        Server::QemuNbdRelay => {
            let pport = free_port()?;
            procs.push(qemu_nbd(
                env,
                pport,
                &["-r", "-f", "raw", &img],
                "qnbd-parent.log",
            )?);
            wait_port(pport)?;
            let overlay = env.scratch.join("cor.qcow2");
            let _ = std::fs::remove_file(&overlay);
            let size = std::fs::metadata(&env.image)?.len();
            run(Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b"])
                .arg(format!("nbd://127.0.0.1:{pport}/bench"))
                .arg(&overlay)
                .arg(size.to_string()))?;
            let spec = format!(
                "driver=copy-on-read,file.driver=qcow2,file.file.driver=file,file.file.filename={}",
                overlay.display()
            );
            procs.push(qemu_nbd(
                env,
                port,
                &["--image-opts", &spec],
                "qnbd-relay.log",
            )?);
            "bench"
        }
    };
    wait_port(port)?;
    Ok(running)
}

/// Starts a herd root over the image and warms it, as for the hit rows:
/// fetched, then read once more into the page cache. Returns its port.
fn warm_root(env: &Env, bin: &Path, procs: &mut Vec<Child>) -> Result<u16> {
    let pport = free_port()?;
    let img = env.image.to_string_lossy();
    procs.push(herd_serve(env, bin, "herd-root", &img, pport, &[])?);
    wait_port(pport)?;
    for _ in 0..2 {
        run(Command::new("nbdcopy")
            .arg(format!("nbd://127.0.0.1:{pport}/herd"))
            .arg("null:"))?;
    }
    Ok(pport)
}

/// How a fio job runs.
#[derive(Clone, Copy)]
struct Mode {
    /// One pass from a cold start, each block read once (fio's random map),
    /// ending after `runtime` at most: what a relay's miss path sees. The
    /// hit path instead loops over the image for `runtime` after a warm-up.
    cold: bool,
    /// Pin (fio, server) to these CPUs.
    pin: Option<(usize, usize)>,
}

/// Starts `s` afresh (relays so every job starts from a cold cache, the
/// others for symmetry), runs one fio job on it and stops it.
/// Returns fio's figure and the server's and the machine's CPU over the
/// run (cores busy).
fn job(env: &Env, s: Server, p: &Pattern, runtime: u64, size_mib: u64, mode: Mode) -> Result<Run> {
    let r = start(env, s).with_context(|| format!("starting {}", s.name()))?;
    if let Some((_, cpu)) = mode.pin {
        r.pin(cpu)?;
    }
    let (cpu0, all0, t0) = (r.cpu_secs(), machine_busy_secs(), std::time::Instant::now());
    let value = fio(&r, p, runtime, size_mib, mode)
        .with_context(|| format!("fio {} on {}", p.name, s.name()))?;
    let secs = t0.elapsed().as_secs_f64().max(1e-3);
    Ok(Run {
        value,
        server_cpu: (r.cpu_secs() - cpu0) / secs,
        machine_cpu: (machine_busy_secs() - all0) / secs,
    })
}

/// Runs one fio job and returns IOPS or MiB/s.
fn fio(r: &Running, p: &Pattern, runtime: u64, size_mib: u64, mode: Mode) -> Result<f64> {
    let mut cmd = match mode.pin {
        Some((cpu, _)) => r.client(&["taskset", "-c", &cpu.to_string(), "fio"]),
        None => r.client(&["fio"]),
    };
    let timing: Vec<String> = if mode.cold {
        vec![format!("--runtime={runtime}")]
    } else {
        vec![
            "--time_based".into(),
            format!("--runtime={runtime}"),
            "--ramp_time=1".into(),
        ]
    };
    let out = output(
        cmd.args([
            "--name=herd-bench",
            "--ioengine=nbd",
            "--output-format=json",
            "--group_reporting",
        ])
        .arg(format!("--uri={}", r.uri()))
        .arg(format!("--rw={}", p.rw))
        .arg(format!("--bs={}", p.bs))
        .arg(format!("--iodepth={}", p.iodepth))
        .arg(format!("--numjobs={}", p.jobs))
        .arg(format!("--size={size_mib}M"))
        .args(&timing)
        .arg("--randrepeat=0"),
    )?;
    let json_start = out.find('{').context("fio printed no JSON")?;
    let v: serde_json::Value = serde_json::from_str(&out[json_start..]).context("fio JSON")?;
    let read = &v["jobs"][0]["read"];
    let val = if p.iops {
        read["iops"].as_f64()
    } else {
        read["bw_bytes"].as_f64().map(|b| b / f64::from(1 << 20))
    };
    val.context("fio JSON lacks read figures")
}

fn loopback_ceiling(env: &Env) -> Result<f64> {
    let port = free_port()?;
    let mut srv = spawn(
        Command::new("iperf3").args(["-s", "-B", "127.0.0.1", "-p", &port.to_string()]),
        &env.scratch.join("iperf3.log"),
    )?;
    // Not wait_port: iperf3 treats any connection as a test client.
    std::thread::sleep(Duration::from_millis(500));
    let out = output(Command::new("iperf3").args([
        "-c",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-t",
        "3",
        "-P",
        "2",
        "-J",
    ]));
    let _ = srv.kill();
    let _ = srv.wait();
    let v: serde_json::Value = serde_json::from_str(&out?)?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 8.0 / f64::from(1 << 20))
        .context("iperf3 JSON lacks a rate")
}

#[allow(clippy::cast_precision_loss)]
fn memcpy_ceiling() -> f64 {
    let src = vec![1u8; 256 << 20];
    let mut dst = vec![0u8; 256 << 20];
    // First touch faults the pages in; measure copies after that.
    dst.copy_from_slice(&src);
    let start = Instant::now();
    let mut copied = 0usize;
    while start.elapsed() < Duration::from_millis(500) {
        dst.copy_from_slice(&src);
        copied += src.len();
        std::hint::black_box(&dst);
    }
    copied as f64 / f64::from(1 << 20) / start.elapsed().as_secs_f64()
}

fn prepare_image(path: &Path, mib: u64) -> Result<()> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == mib << 20) {
        return Ok(());
    }
    step(&format!("writing a {mib} MiB random image"));
    let tmp = path.with_extension("tmp");
    run(Command::new("dd")
        .args(["if=/dev/urandom", "bs=1M", "status=none"])
        .arg(format!("of={}", tmp.display()))
        .arg(format!("count={mib}")))?;
    std::fs::rename(tmp, path)?;
    Ok(())
}

/// Removes the TLS clients' home (it holds a readable key) however the
/// bench ends.
struct ClientHome(PathBuf);

impl Drop for ClientHome {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run_bench(opts: &Options) -> Result<Results> {
    crate::deps::ensure(&["fio", "nbdkit", "libnbd-bin", "qemu-utils", "iperf3"])?;
    let size_mib = opts.size_mib.unwrap_or(if opts.quick { 64 } else { 1024 });
    let runtime = opts.runtime.unwrap_or(if opts.quick { 1 } else { 10 });
    let reps = opts.reps.unwrap_or(if opts.quick { 1 } else { 3 });
    let herd = build_herd()?;
    let scratch = crate::util::work_dir("bench");
    std::fs::create_dir_all(&scratch)?;
    if let Some(b) = &opts.baseline_herd {
        anyhow::ensure!(b.is_file(), "--baseline-herd {} is not a file", b.display());
    }
    let env = Env {
        herd,
        baseline: opts.baseline_herd.clone(),
        image: scratch.join(format!("image-{size_mib}M.raw")),
        scratch: scratch.clone(),
        chunk_size: opts.chunk_size.clone(),
        pki: scratch.join("pki"),
        client_home: std::env::temp_dir().join(format!("herd-bench-tls-{}", std::process::id())),
    };
    let _home = ClientHome(env.client_home.clone());
    let _ = std::fs::remove_dir_all(&env.pki);
    herd::tls::certs::make(
        &env.pki,
        &[
            herd::tls::certs::Request {
                stem: "server".into(),
                names: vec!["127.0.0.1".into(), "localhost".into()],
                days: 30,
            },
            herd::tls::certs::Request {
                stem: "client".into(),
                names: vec!["bench".into()],
                days: 30,
            },
        ],
    )?;
    let libnbd = env.client_home.join(".pki/libnbd");
    std::fs::create_dir_all(&libnbd)?;
    for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        std::fs::copy(env.pki.join(f), libnbd.join(f))?;
    }
    run(Command::new("chmod")
        .arg("-R")
        .arg("a+rX")
        .arg(&env.client_home))?;
    prepare_image(&env.image, size_mib)?;
    step("measuring ceilings (iperf3 on loopback, memory copy)");
    let ceilings = Ceilings {
        loopback_tcp_mib_s: loopback_ceiling(&env)?,
        memcpy_mib_s: memcpy_ceiling(),
    };
    let wanted = |g: &str| opts.groups.is_empty() || opts.groups.iter().any(|w| w == g);
    let lineup = |g: &str, group: &[Server]| {
        if wanted(g) {
            Server::lineup(opts, group)
        } else {
            Vec::new()
        }
    };
    let hit = lineup("hit", &Server::HIT);
    let servers: Vec<Server> = hit
        .iter()
        .copied()
        .chain(lineup("relay", &Server::RELAY))
        .chain(lineup("tls", &Server::TLS))
        .collect();
    let mut samples: Vec<Vec<Vec<Run>>> = vec![vec![Vec::new(); PATTERNS.len()]; servers.len()];
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let measured: Vec<bool> = PATTERNS
        .iter()
        .map(|p| opts.patterns.is_empty() || opts.patterns.iter().any(|w| w == p.name))
        .collect();
    let pin_runs = cores >= 2 && !opts.herd_only && measured[0];
    let mut pinned: Vec<Vec<Vec<Run>>> = vec![vec![Vec::new(); PLACEMENTS.len()]; hit.len()];
    let per_round = servers.len() * measured.iter().filter(|&&m| m).count()
        + if pin_runs {
            hit.len() * PLACEMENTS.len()
        } else {
            0
        };
    let total = reps * per_round;
    let pb = indicatif::ProgressBar::new(total as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template("[{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    for round in 0..reps {
        // The order turns each round: on this VM a job's rate depends on
        // what ran just before it (the iSCSI bench measured the same job
        // at 11k and 20k IOPS back to back), so no server always runs in
        // the same place, nor always right after the same neighbour.
        for k in 0..servers.len() {
            let si = (k + round) % servers.len();
            let s = &servers[si];
            for (pi, p) in PATTERNS.iter().enumerate().filter(|(pi, _)| measured[*pi]) {
                pb.set_message(format!("round {} {} {}", round + 1, s.name(), p.name));
                let mode = Mode {
                    cold: s.group() == "relay",
                    pin: None,
                };
                samples[si][pi].push(job(&env, *s, p, runtime, size_mib, mode)?);
                pb.inc(1);
            }
        }
        // 4 KiB QD1 is one round trip per request, and on a VM where
        // waking an idle vCPU is dear its figure depends on whether the
        // scheduler put server and fio on one CPU: measure both placements
        // pinned, so the server's own cost shows without that lottery.
        if pin_runs {
            for (si, s) in hit.iter().enumerate() {
                for (pi, (_, server_cpu)) in PLACEMENTS.iter().enumerate() {
                    pb.set_message(format!("round {} {} pinned", round + 1, s.name()));
                    let mode = Mode {
                        cold: false,
                        pin: Some((0, *server_cpu)),
                    };
                    pinned[si][pi].push(job(&env, *s, &PATTERNS[0], runtime, size_mib, mode)?);
                    pb.inc(1);
                }
            }
        }
    }
    pb.finish_and_clear();
    let mut cells = Vec::new();
    for (si, s) in servers.iter().enumerate() {
        for (pi, p) in PATTERNS.iter().enumerate().filter(|(pi, _)| measured[*pi]) {
            let unit = if p.iops { "IOPS" } else { "MiB/s" };
            cells.push(Cell::new(s, s.group(), p.name, unit, &samples[si][pi]));
        }
    }
    for (si, s) in hit.iter().enumerate() {
        for (pi, (name, _)) in PLACEMENTS.iter().enumerate() {
            let v = &pinned[si][pi];
            if !v.is_empty() {
                let pattern = pinned_pattern(name);
                cells.push(Cell::new(s, "pinned", &pattern, "IOPS", v));
            }
        }
    }
    let results = Results {
        version: 1,
        image_mib: size_mib,
        runtime_s: runtime,
        reps,
        cores,
        ceilings,
        cells,
    };
    let out = opts.out.clone().unwrap_or_else(|| root().join("results"));
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("dataplane.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    super::plot::svg(&results, &out.join("dataplane.svg"))?;
    let table = super::report::markdown(&results);
    std::fs::write(out.join("README.md"), &table)?;
    println!("{table}");
    Ok(results)
}

/// Checks a results file has every server and pattern with positive medians.
pub fn validate(r: &Results) -> Result<()> {
    let require = |server: &str, pattern: &str| -> Result<()> {
        let c = r
            .cells
            .iter()
            .find(|c| c.server == server && c.pattern == pattern)
            .with_context(|| format!("no result for {server} / {pattern}"))?;
        anyhow::ensure!(
            c.median > 0.0 && c.median.is_finite(),
            "{server} / {pattern}: median {}",
            c.median
        );
        // Every run recorded the CPU that says what bounds the row: a
        // fio job moves bytes, so the machine was busy.
        anyhow::ensure!(
            c.cpu.len() == c.samples.len()
                && c.machine_cpu.len() == c.samples.len()
                && c.machine_cpu.iter().all(|&m| m > 0.0 && m.is_finite()),
            "{server} / {pattern}: CPU not recorded (server {:?}, machine {:?})",
            c.cpu,
            c.machine_cpu
        );
        Ok(())
    };
    for s in Server::HIT
        .into_iter()
        .chain(Server::RELAY)
        .chain(Server::TLS)
    {
        for p in PATTERNS {
            require(s.name(), p.name)?;
        }
    }
    if r.cores >= 2 {
        for s in Server::HIT {
            for (placement, _) in PLACEMENTS {
                require(s.name(), &pinned_pattern(placement))?;
            }
        }
    }
    anyhow::ensure!(
        r.ceilings.loopback_tcp_mib_s > 0.0 && r.ceilings.memcpy_mib_s > 0.0,
        "ceilings missing"
    );
    Ok(())
}
