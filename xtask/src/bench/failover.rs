//! `cargo xtask bench failover`: how long a client's read stalls when a
//! parent fails, per kind of fault, on an emulated fleet (network
//! namespaces, shaped links, real herd processes).
//!
//! ```text
//!   host 0: root (the image)          every round: A, B and the leaf start cold;
//!   host 1: relay A ── root            4 readers stream the image from the leaf
//!   host 2: relay B ── root            (1 MiB reads, every byte checked); 1 s in,
//!   host 3: leaf ── [A, B, root]       the fault hits A (or the root)
//! ```
//!
//! Switch time: from the fault to the completion of the last read that
//! was in flight when it hit (the read a client saw stall). Faults: `none`
//! (the same measure with no fault: a read's normal latency), `kill9`,
//! `sigstop` (a hung parent), `link-down` (A's switch port down), `errors`
//! (A's own parent, nbdkit's error filter, fails every read: A answers EIO)
//! and `root-restart` (the root is killed and started again at once).
//! Results: `results/failover/{failover.json,README.md}`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::storm::{self, METRICS_PORT, NBD_PORT};
use crate::demo::build_herd;
use crate::fleet::{self, host_addr, Fleet};
use crate::util::{percentile, prom_require, root, run, step, work_dir};

const READ: usize = 1 << 20;
const READERS: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    None,
    Kill9,
    Sigstop,
    LinkDown,
    Errors,
    RootRestart,
}

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Rounds per fault.
    #[arg(long, default_value_t = 20)]
    pub rounds: usize,
    /// Image size in MiB (the readers stream it from a cold leaf).
    #[arg(long, default_value_t = 256)]
    pub image_mib: usize,
    /// Rate of every host link, each direction (tc syntax).
    #[arg(long, default_value = "200mbit")]
    pub link: String,
    /// Faults to inject (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub faults: Vec<Fault>,
    /// Two rounds per fault on a small image; checks, writes no results.
    #[arg(long)]
    pub quick: bool,
}

#[derive(Debug, Serialize)]
struct Round {
    fault: Fault,
    /// Fault to completion of the last read in flight when it hit, ms.
    switch_ms: f64,
    reads: usize,
    errors: usize,
    wrong_bytes: usize,
    /// Reads the leaf re-issued to another parent.
    leaf_failovers: u64,
}

#[derive(Debug, Serialize)]
struct Summary {
    fault: Fault,
    rounds: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    errors: usize,
    wrong_bytes: usize,
}

#[derive(Debug, Serialize)]
struct Report {
    version: u32,
    link: String,
    image_mib: usize,
    readers: usize,
    read_bytes: usize,
    summary: Vec<Summary>,
    rounds: Vec<Round>,
}

/// What one reader saw: (issued, completed, ok, right bytes) per read.
type Log = Vec<(Instant, Instant, bool, bool)>;

/// Streams `range` of the image from `url` until `stop`, checking bytes.
async fn reader(
    url: herd::upstream::UpstreamUrl,
    image: Arc<Vec<u8>>,
    range: std::ops::Range<usize>,
    stop: Instant,
) -> Result<Log> {
    use herd::upstream::Upstream;
    let up = herd::upstream::nbd::NbdUpstream::connect(url, 1).await?;
    let mut log = Vec::new();
    let mut off = range.start;
    while off < range.end && Instant::now() < stop {
        let t = Instant::now();
        let r = up.read_at(off as u64, READ).await;
        let done = Instant::now();
        let right = r.as_ref().is_ok_and(|b| b[..] == image[off..off + READ]);
        log.push((t, done, r.is_ok(), right));
        off += READ;
    }
    Ok(log)
}

struct Env {
    herd: PathBuf,
    dir: PathBuf,
    image: PathBuf,
    manifest: PathBuf,
    data: Arc<Vec<u8>>,
}

fn url(i: usize) -> String {
    format!("nbd://{}:{NBD_PORT}/herd", host_addr(i))
}

fn herd_args(env: &Env, i: usize, upstreams: &[String], extra: &[&str]) -> Vec<String> {
    let addr = host_addr(i);
    let mut v = vec![env.herd.display().to_string(), "serve".into()];
    for u in upstreams {
        v.push("--upstream".into());
        v.push(u.clone());
    }
    v.extend(
        [
            "--listen",
            &format!("{addr}:{NBD_PORT}"),
            "--listen",
            &format!("unix:{}", env.dir.join(format!("h{i}.sock")).display()),
            "--cache-dir",
            &env.dir.join(format!("cache-{i}")).display().to_string(),
            "--metrics",
            &format!("{addr}:{METRICS_PORT}"),
            "--read-ahead",
            "0",
        ]
        .iter()
        .map(|s| (*s).to_owned()),
    );
    v.extend(extra.iter().map(|s| (*s).to_owned()));
    v
}

fn wait_serving(i: usize) -> Result<()> {
    fleet::wait_for(
        Duration::from_secs(60),
        &format!("host {i} to serve"),
        || Ok(storm::serving(i)),
    )
}

fn one_round(fleet: &mut Fleet, env: &Env, fault: Fault) -> Result<Round> {
    for i in 1..=3 {
        let c = env.dir.join(format!("cache-{i}"));
        if c.exists() {
            std::fs::remove_dir_all(&c)?;
        }
    }
    let log = |n: &str| env.dir.join(format!("{n}.log"));
    let trigger = env.dir.join("errors-on");
    let _ = std::fs::remove_file(&trigger);
    let kit_port = 10810;
    let a_up = if fault == Fault::Errors {
        fleet.spawn(
            1,
            &[
                "nbdkit".into(),
                "--foreground".into(),
                "-p".into(),
                kit_port.to_string(),
                "-i".into(),
                "127.0.0.1".into(),
                "--filter=error".into(),
                "file".into(),
                env.image.display().to_string(),
                "error=EIO".into(),
                "error-pread-rate=100%".into(),
                format!("error-file={}", trigger.display()),
            ],
            Stdio::null(),
            &log("nbdkit"),
        )?;
        format!("nbd://127.0.0.1:{kit_port}")
    } else {
        url(0)
    };
    let manifest = env.manifest.display().to_string();
    let a_extra: Vec<&str> = if fault == Fault::Errors {
        vec!["--manifest", &manifest]
    } else {
        vec![]
    };
    let a = herd_args(env, 1, &[a_up], &a_extra);
    let a_pid = fleet.spawn(1, &a, Stdio::null(), &log("a"))?.id();
    fleet.spawn(
        2,
        &herd_args(env, 2, &[url(0)], &[]),
        Stdio::null(),
        &log("b"),
    )?;
    wait_serving(1)?;
    wait_serving(2)?;
    fleet.spawn(
        3,
        &herd_args(env, 3, &[url(1), url(2), url(0)], &[]),
        Stdio::null(),
        &log("leaf"),
    )?;
    wait_serving(3)?;
    let leaf = herd::upstream::UpstreamUrl::NbdUnix {
        socket: env.dir.join("h3.sock"),
        export: "herd".into(),
        tls: false,
    };
    let start = Instant::now();
    let fault_at = start + Duration::from_secs(1);
    let stop = fault_at + Duration::from_millis(2500);
    let rt = tokio::runtime::Runtime::new()?;
    let per = env.data.len() / READERS / READ * READ;
    let handles: Vec<_> = (0..READERS)
        .map(|i| {
            rt.spawn(reader(
                leaf.clone(),
                Arc::clone(&env.data),
                i * per..(i + 1) * per,
                stop,
            ))
        })
        .collect();
    std::thread::sleep(fault_at.saturating_duration_since(Instant::now()));
    let hit = Instant::now();
    let mut root_proc = None;
    match fault {
        Fault::None => {}
        Fault::Kill9 => signal_pid(a_pid, libc::SIGKILL),
        Fault::Sigstop => signal_pid(a_pid, libc::SIGSTOP),
        Fault::LinkDown => run(Command::new("ip").args([
            "-n",
            &format!("{}-sw", fleet.tag()),
            "link",
            "set",
            &fleet.hosts[1].port,
            "down",
        ]))?,
        Fault::Errors => std::fs::write(&trigger, b"")?,
        Fault::RootRestart => {
            fleet.pid_of(0).context("root not running")?;
            // Killed and reaped, as a supervisor restarts it: a process
            // still exiting holds the cache's lock and the port, and the
            // new root would exit at once (a loaded CI run saw it: every
            // read in flight failed after the 30 s parent timeout).
            fleet.kill_host(0);
            root_proc = Some(
                fleet
                    .spawn(
                        0,
                        &herd_args(env, 0, &[env.image.display().to_string()], &[]),
                        Stdio::null(),
                        &log("root2"),
                    )?
                    .id(),
            );
        }
    }
    let mut logs = Vec::new();
    for h in handles {
        logs.extend(rt.block_on(h)??);
    }
    let failovers = prom_require(&storm::metrics_of(3)?, "herd_upstream_failovers_total")?;
    // Undo what outlives the processes.
    if fault == Fault::Sigstop {
        signal_pid(a_pid, libc::SIGCONT);
    }
    if fault == Fault::LinkDown {
        run(Command::new("ip").args([
            "-n",
            &format!("{}-sw", fleet.tag()),
            "link",
            "set",
            &fleet.hosts[1].port,
            "up",
        ]))?;
    }
    let _ = std::fs::remove_file(&trigger);
    fleet.kill_except(0);
    let _ = root_proc;
    let stalled = logs
        .iter()
        .filter(|(issued, done, _, _)| *issued <= hit && *done > hit)
        .map(|(_, done, _, _)| done.duration_since(hit).as_secs_f64() * 1e3)
        .fold(0.0, f64::max);
    Ok(Round {
        fault,
        switch_ms: stalled,
        reads: logs.len(),
        errors: logs.iter().filter(|l| !l.2).count(),
        wrong_bytes: logs.iter().filter(|l| l.2 && !l.3).count(),
        leaf_failovers: failovers,
    })
}

fn signal_pid(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill has no memory preconditions; the pid is our child.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Runs the bench; `quick` (from `xtask test`) checks and writes nothing.
///
/// # Errors
/// A fleet that cannot be made, a herd that does not start, or any read
/// error or wrong byte seen by a reader.
pub fn run_bench(o: &Options) -> Result<()> {
    fleet::check_capabilities()?;
    let herd = build_herd()?;
    let dir = work_dir("failover");
    std::fs::create_dir_all(&dir)?;
    let mib = if o.quick { 64 } else { o.image_mib };
    let rounds = if o.quick { 2 } else { o.rounds };
    let faults = if o.faults.is_empty() {
        vec![
            Fault::None,
            Fault::Kill9,
            Fault::Sigstop,
            Fault::LinkDown,
            Fault::Errors,
            Fault::RootRestart,
        ]
    } else {
        o.faults.clone()
    };
    step(&format!("image: {mib} MiB of random bytes"));
    let image = dir.join("golden.img");
    let data: Vec<u8> = {
        use std::io::Read;
        let mut v = vec![0u8; mib << 20];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut v)?;
        v
    };
    std::fs::write(&image, &data)?;
    let manifest = dir.join("golden.herd-manifest");
    run(Command::new(&herd)
        .args(["manifest", "build"])
        .arg(&image)
        .arg("--out")
        .arg(&manifest)
        .stdout(Stdio::null()))?;
    let env = Env {
        herd,
        dir: dir.clone(),
        image,
        manifest,
        data: Arc::new(data),
    };
    let _ = std::fs::remove_dir_all(dir.join("cache-0"));
    let mut fleet = Fleet::create(4, &o.link, |_| {})?;
    fleet.spawn(
        0,
        &herd_args(&env, 0, &[env.image.display().to_string()], &[]),
        Stdio::null(),
        &dir.join("root.log"),
    )?;
    wait_serving(0)?;
    let mut all = Vec::new();
    let pb = indicatif::ProgressBar::new(u64::try_from(rounds * faults.len()).unwrap_or(0));
    pb.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} rounds  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    // Interleaved: round r of every fault before round r+1 of any.
    for _ in 0..rounds {
        for &f in &faults {
            fleet::check_interrupted()?;
            let r = one_round(&mut fleet, &env, f).with_context(|| format!("fault {f:?}"))?;
            pb.set_message(format!("{f:?}: {:.0} ms", r.switch_ms));
            pb.inc(1);
            if r.errors > 0 || r.wrong_bytes > 0 {
                bail!(
                    "fault {f:?}: {} read errors, {} wrong reads (logs in {})",
                    r.errors,
                    r.wrong_bytes,
                    dir.display()
                );
            }
            if fault_fails_over(f) && r.leaf_failovers < 1 {
                bail!(
                    "fault {f:?}: the leaf never failed over (logs in {})",
                    dir.display()
                );
            }
            if f == Fault::RootRestart {
                wait_serving(0)?;
            }
            all.push(r);
        }
    }
    pb.finish_and_clear();
    drop(fleet);
    let summary: Vec<Summary> = faults
        .iter()
        .map(|&f| {
            let mut v: Vec<f64> = all
                .iter()
                .filter(|r| r.fault == f)
                .map(|r| r.switch_ms)
                .collect();
            v.sort_by(f64::total_cmp);
            Summary {
                fault: f,
                rounds: v.len(),
                p50_ms: percentile(&v, 0.5),
                p99_ms: percentile(&v, 0.99),
                max_ms: v.last().copied().unwrap_or(f64::NAN),
                errors: all.iter().filter(|r| r.fault == f).map(|r| r.errors).sum(),
                wrong_bytes: all
                    .iter()
                    .filter(|r| r.fault == f)
                    .map(|r| r.wrong_bytes)
                    .sum(),
            }
        })
        .collect();
    let table = table(&summary);
    println!("{table}");
    if o.quick {
        return Ok(());
    }
    let report = Report {
        version: 1,
        link: o.link.clone(),
        image_mib: mib,
        readers: READERS,
        read_bytes: READ,
        summary,
        rounds: all,
    };
    let out = root().join("results/failover");
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("failover.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(out.join("README.md"), readme(&report, &table))?;
    step(&format!("results in {}", out.display()));
    Ok(())
}

fn readme(r: &Report, table: &str) -> String {
    format!(
        "# Failover: how long a client's read stalls when a parent fails\n\n\
         `cargo xtask bench failover`: root, relays A and B, and a leaf reading from\n\
         [A, B, root] in network namespaces with {} links; {} readers stream a\n\
         {} MiB image from the cold leaf in {} KiB reads, every byte checked. One\n\
         second in, the fault hits A (or the root). Switch time: from the fault to\n\
         the completion of the last read in flight when it hit. `None` is the same\n\
         measure with no fault (a read's latency under this load). With {} rounds\n\
         per fault, p99 is the largest round. Raw rounds: `failover.json`.\n\n{table}",
        r.link,
        r.readers,
        r.image_mib,
        r.read_bytes >> 10,
        r.rounds.len() / r.summary.len().max(1),
    )
}

/// Faults after which the leaf must have re-issued reads elsewhere (a
/// restarting root is waited for, not failed over: every relay reads from it).
fn fault_fails_over(f: Fault) -> bool {
    matches!(
        f,
        Fault::Kill9 | Fault::Sigstop | Fault::LinkDown | Fault::Errors
    )
}

fn table(s: &[Summary]) -> String {
    let mut t = String::from(
        "| fault | rounds | switch p50 (ms) | p99 (ms) | max (ms) | read errors | wrong reads |\n|---|---|---|---|---|---|---|\n",
    );
    for x in s {
        t.push_str(&format!(
            "| {:?} | {} | {:.0} | {:.0} | {:.0} | {} | {} |\n",
            x.fault, x.rounds, x.p50_ms, x.p99_ms, x.max_ms, x.errors, x.wrong_bytes
        ));
    }
    t
}
