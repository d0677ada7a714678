//! `cargo xtask bench iscsi`, side by side in one run:
//!
//! * initiator rows: herd's iSCSI initiator against libiscsi's
//!   `iscsi-perf`, on the same tgtd LUN (herd measured with `herd iscsi
//!   bench`: the initiator alone, no cache, no NBD), herd on its default
//!   path (the session on its own io_uring ring) and on the epoll
//!   fallback (`--net-io epoll`), each
//!   placed as `herd serve` places them (the session on the control
//!   worker, the callers on one connection thread) and also with the
//!   callers and the session on one thread (`--placement one-thread`,
//!   as a thread-per-core daemon would run them);
//! * target rows: `iscsi-perf` against herd's target (`--listen-iscsi`,
//!   cache warm) and against tgtd serving the same file.
//!
//! Rounds are interleaved; medians of `reps`; IOPS are converted to MiB/s
//! with the block size.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::demo::build_herd;
use crate::util::{free_port, median, output, root, run, step, work_dir};

#[derive(clap::Args, Debug, Clone)]
pub struct Options {
    /// A short smoke run: 64 MiB LUN, 1 repetition, 3 s per job.
    #[arg(long)]
    pub quick: bool,
    /// Where to write iscsi.json and iscsi.md.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy)]
struct Pattern {
    name: &'static str,
    bs: usize,
    qd: usize,
    random: bool,
}

const PATTERNS: &[Pattern] = &[
    Pattern {
        name: "64k-seq-qd16",
        bs: 64 << 10,
        qd: 16,
        random: false,
    },
    Pattern {
        name: "1m-seq-qd8",
        bs: 1 << 20,
        qd: 8,
        random: false,
    },
    Pattern {
        name: "4k-rand-qd1",
        bs: 4096,
        qd: 1,
        random: true,
    },
    Pattern {
        name: "4k-rand-qd32",
        bs: 4096,
        qd: 32,
        random: true,
    },
];

#[derive(Debug, Serialize, Deserialize)]
pub struct Row {
    pub pattern: String,
    /// herd on its default path (its own ring), placed as `herd serve`.
    pub herd_iops: Vec<f64>,
    pub herd_median_iops: f64,
    pub herd_mib_s: f64,
    /// herd on the epoll fallback (`--net-io epoll`), same placement.
    pub epoll_iops: Vec<f64>,
    pub epoll_median_iops: f64,
    /// The default (ring) ÷ the fallback (epoll).
    pub uring_vs_epoll: f64,
    /// herd's default, callers and session on one thread
    /// (`--placement one-thread`).
    pub herd_1w_iops: Vec<f64>,
    pub herd_1w_median_iops: f64,
    /// epoll, callers and session on one thread.
    pub epoll_1w_iops: Vec<f64>,
    pub epoll_1w_median_iops: f64,
    /// On one thread: the ring ÷ epoll.
    pub uring_1w_vs_epoll_1w: f64,
    pub iscsi_perf_iops: Vec<f64>,
    pub iscsi_perf_median_iops: f64,
    pub iscsi_perf_mib_s: f64,
    /// herd's default ÷ iscsi-perf, placed as serve and on one thread.
    pub ratio: f64,
    pub ratio_1w: f64,
}

/// `iscsi-perf` against herd's target and against tgtd, same file.
#[derive(Debug, Serialize, Deserialize)]
pub struct TargetRow {
    pub pattern: String,
    pub herd_target_iops: Vec<f64>,
    pub tgtd_iops: Vec<f64>,
    pub herd_target_median_iops: f64,
    pub tgtd_median_iops: f64,
    pub herd_target_mib_s: f64,
    pub tgtd_mib_s: f64,
    pub ratio: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    pub version: u32,
    pub lun_mib: u64,
    pub seconds: u64,
    pub reps: usize,
    pub rows: Vec<Row>,
    pub target_rows: Vec<TargetRow>,
}

/// herd serving the LUN file by iSCSI, its cache filled before measuring.
struct HerdTarget {
    procs: super::Procs,
    port: u16,
}

const HERD_IQN: &str = "iqn.2026-12.io.herd:bench.herd";

fn start_herd_target(herd: &Path, lun: &Path, dir: &Path) -> Result<HerdTarget> {
    let (port, nbd, metrics) = (free_port()?, free_port()?, free_port()?);
    let cache = dir.join("herd-target-cache");
    let _ = std::fs::remove_dir_all(&cache);
    let log = std::fs::File::create(dir.join("herd-target.log"))?;
    let child = Command::new(herd)
        .args(["serve", "--upstream"])
        .arg(lun)
        .args(["--listen", &format!("127.0.0.1:{nbd}")])
        .args(["--listen-iscsi", &format!("127.0.0.1:{port}")])
        .args(["--iscsi-target-iqn", HERD_IQN])
        .arg("--cache-dir")
        .arg(&cache)
        .args(["--metrics", &format!("127.0.0.1:{metrics}")])
        .args(["--prefetch", "full", "--prefetch-concurrency", "8"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("cannot start herd")?;
    let mut procs = super::Procs::default();
    procs.0.push(child);
    crate::util::wait_port(port, Duration::from_secs(60))?;
    // Warm: every chunk in herd's cache before the first job.
    let addr: std::net::SocketAddr = format!("127.0.0.1:{metrics}").parse()?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let text = crate::util::http_get(addr, "/metrics")?;
        let done = crate::util::prom_require(&text, "herd_prefetch_chunks_done")?;
        let total = crate::util::prom_require(&text, "herd_prefetch_chunks_total")?;
        if total > 0 && done == total {
            break;
        }
        if Instant::now() > deadline {
            bail!("herd's cache did not fill in 10 minutes ({done}/{total})");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(HerdTarget { procs, port })
}

struct Tgtd {
    child: Child,
    port: u16,
    ctl: u16,
    iqn: String,
}

impl Drop for Tgtd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_tgtd(backing: &Path) -> Result<Tgtd> {
    let port = free_port()?;
    let ctl = 100 + port % 800;
    let child = Command::new("tgtd")
        .args([
            "-f",
            "-C",
            &ctl.to_string(),
            "--iscsi",
            &format!("portal=127.0.0.1:{port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start tgtd")?;
    let t = Tgtd {
        child,
        port,
        ctl,
        iqn: "iqn.2026-11.dev.herd:bench".into(),
    };
    let adm = |args: &[&str]| {
        run(Command::new("tgtadm")
            .args(["-C", &t.ctl.to_string(), "--lld", "iscsi"])
            .args(args))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while adm(&["--op", "show", "--mode", "system"]).is_err() {
        if Instant::now() > deadline {
            bail!("tgtd did not come up");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    adm(&[
        "--op", "new", "--mode", "target", "--tid", "1", "-T", &t.iqn,
    ])?;
    adm(&[
        "--op",
        "new",
        "--mode",
        "logicalunit",
        "--tid",
        "1",
        "--lun",
        "1",
        "-b",
        &backing.to_string_lossy(),
    ])?;
    adm(&[
        "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL",
    ])?;
    Ok(t)
}

/// How `herd iscsi bench` runs: what drives the socket, and where the
/// session and the callers run (`--placement`).
type Variant = (&'static str, &'static str);

/// The default (uring) and the fallback (epoll), placed as `herd serve`
/// places them, then each on one thread; the order `run_bench` keeps.
const VARIANTS: [Variant; 4] = [
    ("uring", "serve"),
    ("epoll", "serve"),
    ("uring", "one-thread"),
    ("epoll", "one-thread"),
];

fn herd_run(
    herd: &Path,
    url: &str,
    p: &Pattern,
    secs: u64,
    (net_io, placement): Variant,
) -> Result<f64> {
    let mut cmd = Command::new(herd);
    cmd.args(["iscsi", "bench", url, "--net-io", net_io])
        .args(["--placement", placement])
        .args([
            "--block-size",
            &p.bs.to_string(),
            "--qd",
            &p.qd.to_string(),
            "--seconds",
            &secs.to_string(),
        ])
        .env("RUST_LOG", "warn");
    if p.random {
        cmd.arg("--random");
    }
    let out = output(&mut cmd)?;
    let v: serde_json::Value = serde_json::from_str(out.trim()).context("herd iscsi bench JSON")?;
    v["iops"].as_f64().context("no iops")
}

/// `a ÷ b`, 0 when nothing was measured for `b`.
fn per(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

fn perf_run(url: &str, p: &Pattern, secs: u64) -> Result<f64> {
    let mut cmd = Command::new("timeout");
    cmd.args(["-s", "INT", &secs.to_string(), "iscsi-perf"])
        .args(["-m", &p.qd.to_string(), "-b", &(p.bs / 512).to_string()]);
    if p.random {
        cmd.arg("-r");
    }
    let out = cmd
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .context("cannot run iscsi-perf")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // Lines are "... iops average N (M MB/s) ..."; take the last one.
    text.rsplit("iops average ")
        .next()
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| {
            format!(
                "iscsi-perf printed no rate: {}",
                text.chars().take(300).collect::<String>()
            )
        })
}

pub fn run_bench(opts: &Options) -> Result<Results> {
    crate::deps::ensure(&["tgt", "libiscsi-bin"])?;
    let herd = build_herd()?;
    // iscsi-perf prints its first rate after one second: quick jobs run 3 s.
    let (mib, secs, reps) = if opts.quick { (64, 3, 1) } else { (1024, 5, 3) };
    let dir = work_dir("bench-iscsi");
    std::fs::create_dir_all(&dir)?;
    let lun = dir.join(format!("lun-{mib}M.raw"));
    if !std::fs::metadata(&lun).is_ok_and(|m| m.len() == mib << 20) {
        run(Command::new("dd")
            .args(["if=/dev/urandom", "bs=1M", "status=none"])
            .arg(format!("of={}", lun.display()))
            .arg(format!("count={mib}")))?;
    }
    let t = start_tgtd(&lun)?;
    let url = format!("iscsi://127.0.0.1:{}/{}/1", t.port, t.iqn);
    step("herd's target: filling its cache");
    let ht = start_herd_target(&herd, &lun, &dir)?;
    let herd_url = format!("iscsi://127.0.0.1:{}/{HERD_IQN}/0", ht.port);
    // herd's samples by variant (VARIANTS' order), then by pattern.
    let mut herd_v = vec![vec![Vec::new(); PATTERNS.len()]; VARIANTS.len()];
    let mut perf_s = vec![Vec::new(); PATTERNS.len()];
    let mut target_s = vec![Vec::new(); PATTERNS.len()];
    let mut tgtd_s = vec![Vec::new(); PATTERNS.len()];
    // tgtd's first 1 MiB sessions ran at half the rate of every later one
    // here until some `iscsi-perf` job had run: warm it, unmeasured.
    step("warming tgtd");
    if let Some(p) = PATTERNS.iter().find(|p| p.bs == 1 << 20) {
        perf_run(&url, p, 3)?;
    }
    for round in 0..reps {
        for (i, p) in PATTERNS.iter().enumerate() {
            step(&format!("round {}/{reps}: {}", round + 1, p.name));
            // The order turns each round: on this VM a run's rate depends
            // on what ran just before it (the same iscsi-perf job against
            // the same tgtd measured 11k and 20k IOPS at 4K QD1 back to
            // back), so no side always runs in the same place.
            let sides = VARIANTS.len() + 3;
            for k in 0..sides {
                match (k + round) % sides {
                    v if v < VARIANTS.len() => {
                        herd_v[v][i].push(herd_run(&herd, &url, p, secs, VARIANTS[v])?);
                    }
                    v if v == VARIANTS.len() => perf_s[i].push(perf_run(&url, p, secs)?),
                    v if v == VARIANTS.len() + 1 => target_s[i].push(perf_run(&herd_url, p, secs)?),
                    _ => tgtd_s[i].push(perf_run(&url, p, secs)?),
                }
            }
        }
    }
    drop(ht.procs);
    drop(t);
    #[allow(clippy::cast_precision_loss)]
    let rows: Vec<Row> = PATTERNS
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let q = median(&perf_s[i]);
            let [h, e, h1, e1] = [0, 1, 2, 3].map(|v| median(&herd_v[v][i]));
            let to_mib = |iops: f64| iops * p.bs as f64 / f64::from(1 << 20);
            Row {
                pattern: p.name.into(),
                herd_iops: herd_v[0][i].clone(),
                herd_median_iops: h,
                herd_mib_s: to_mib(h),
                epoll_iops: herd_v[1][i].clone(),
                epoll_median_iops: e,
                uring_vs_epoll: per(h, e),
                herd_1w_iops: herd_v[2][i].clone(),
                herd_1w_median_iops: h1,
                epoll_1w_iops: herd_v[3][i].clone(),
                epoll_1w_median_iops: e1,
                uring_1w_vs_epoll_1w: per(h1, e1),
                iscsi_perf_iops: perf_s[i].clone(),
                iscsi_perf_median_iops: q,
                iscsi_perf_mib_s: to_mib(q),
                ratio: per(h, q),
                ratio_1w: per(h1, q),
            }
        })
        .collect();
    #[allow(clippy::cast_precision_loss)]
    let target_rows: Vec<TargetRow> = PATTERNS
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (h, q) = (median(&target_s[i]), median(&tgtd_s[i]));
            let to_mib = |iops: f64| iops * p.bs as f64 / f64::from(1 << 20);
            TargetRow {
                pattern: p.name.into(),
                herd_target_iops: target_s[i].clone(),
                tgtd_iops: tgtd_s[i].clone(),
                herd_target_median_iops: h,
                tgtd_median_iops: q,
                herd_target_mib_s: to_mib(h),
                tgtd_mib_s: to_mib(q),
                ratio: per(h, q),
            }
        })
        .collect();
    let r = Results {
        version: 5,
        lun_mib: mib,
        seconds: secs,
        reps,
        rows,
        target_rows,
    };
    let out = opts.out.clone().unwrap_or_else(|| root().join("results"));
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("iscsi.json"), serde_json::to_string_pretty(&r)?)?;
    let mut md = format!(
        "# iSCSI initiator benchmark\n\n`cargo xtask bench iscsi`: herd's initiator (`herd iscsi bench`, no cache or NBD) vs \
         libiscsi's `iscsi-perf`, same tgtd LUN on loopback ({mib} MiB), {secs} s per job, {reps} interleaved round(s) in an order that turns each round, medians. \
         herd runs on its default path (the session on its own io_uring ring) and on the epoll fallback (`--net-io epoll`), both with the QD1 spin of `--spin-us` (default 50 µs), \
         placed as `herd serve` places them (logged in on the control worker, the callers on one connection thread reading over that core's own session: `--placement serve`) and with the callers and the session on one thread (`--placement one-thread`, \"1 thread\" below). \
         Before the rounds one `iscsi-perf` job warms tgtd: here its first 1 MiB sessions ran at half the rate of every later one.\n\n\
         | pattern | herd IOPS | herd MiB/s | epoll IOPS | 1 thread: herd IOPS | 1 thread: epoll IOPS | iscsi-perf IOPS | iscsi-perf MiB/s | herd ÷ epoll | 1 thread: herd ÷ epoll | herd ÷ iscsi-perf | 1 thread: herd ÷ iscsi-perf |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n"
    );
    for row in &r.rows {
        md.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | **{:.2}** | **{:.2}** |\n",
            row.pattern,
            row.herd_median_iops,
            row.herd_mib_s,
            row.epoll_median_iops,
            row.herd_1w_median_iops,
            row.epoll_1w_median_iops,
            row.iscsi_perf_median_iops,
            row.iscsi_perf_mib_s,
            row.uring_vs_epoll,
            row.uring_1w_vs_epoll_1w,
            row.ratio,
            row.ratio_1w
        ));
    }
    md.push_str(
        "\n## herd's iSCSI target\n\n`iscsi-perf` against herd's target (`--listen-iscsi`, cache filled first) and against \
         tgtd serving the same file, same rounds.\n\n\
         | pattern | herd target IOPS | herd MiB/s | tgtd IOPS | tgtd MiB/s | herd ÷ tgtd |\n|---|---|---|---|---|---|\n",
    );
    for row in &r.target_rows {
        md.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | **{:.2}** |\n",
            row.pattern,
            row.herd_target_median_iops,
            row.herd_target_mib_s,
            row.tgtd_median_iops,
            row.tgtd_mib_s,
            row.ratio
        ));
    }
    std::fs::write(out.join("iscsi.md"), &md)?;
    println!("{md}");
    Ok(r)
}
