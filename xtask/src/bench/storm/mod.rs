//! `cargo xtask bench storm`: a boot storm on an emulated fleet. N hosts
//! (network namespaces, every link shaped alike with `tc tbf`), V replayed
//! VMs per host (`herd replay`, one process per host), one recorded Debian
//! boot as the trace, replayed on a seeded synthetic image of the trace's
//! size × `--image-scale`, every byte checked. Baselines on the same fleet,
//! links and trace:
//!
//! ```text
//!  full-copy      host: nbdcopy root → local file, then its VMs boot from it
//!  all-from-root  host: herd, parent = the root (no tree)
//!  tree-lazy      host: herd; host 1 under the root, a --fanout-ary tree
//!                 under host 1 (each chunk leaves the root once)
//!  tree-prefetch  as tree-lazy, the root given the boot profile; the storm
//!                 starts as the herds come up
//!  tree-prewarmed as tree-prefetch, the storm starts once every host has
//!                 prefetched the profile
//! ```
//!
//! Measured per baseline: every VM's boot completion time (from the storm's
//! start), makespan, root egress (herd's payload counter and the link's wire
//! counter), bytes per tree level, peak RSS and cache per host, CPU use; and
//! the lower bound: working set ÷ link rate + the replay's own duration with
//! all data local. Results: `results/storm/{storm.json,*.svg,README.md}`.

pub mod fidelity;
pub(crate) mod plot;
pub(crate) mod report;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::demo::build_herd;
use crate::fleet::{self, host_addr, Fleet};
use crate::util::{clock_ticks, http_get, proc_cpu_secs, prom_require, root, run, step, work_dir};

/// Port of every herd's NBD listener and metrics endpoint inside its host.
pub(crate) const NBD_PORT: u16 = 10809;
pub(crate) const METRICS_PORT: u16 = 9100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Baseline {
    /// every host copies the whole image from the root, then boots locally
    FullCopy,
    /// every host's herd reads straight from the root
    AllFromRoot,
    /// herd tree, fetching on demand
    TreeLazy,
    /// herd tree, profile prefetched from the storm's start
    TreePrefetch,
    /// herd tree, every host prefetched before the storm
    TreePrewarmed,
}

impl Baseline {
    pub const ALL: [Self; 5] = [
        Self::FullCopy,
        Self::AllFromRoot,
        Self::TreeLazy,
        Self::TreePrefetch,
        Self::TreePrewarmed,
    ];

    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::FullCopy => "full-copy",
            Self::AllFromRoot => "all-from-root",
            Self::TreeLazy => "tree-lazy",
            Self::TreePrefetch => "tree-prefetch",
            Self::TreePrewarmed => "tree-prewarmed",
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct Options {
    /// Hosts running VMs (the root is one more).
    #[arg(long, default_value_t = 100)]
    pub hosts: usize,
    /// Replayed VMs per host.
    #[arg(long, default_value_t = 10)]
    pub vms: usize,
    /// Children per node of the herd tree.
    #[arg(long, default_value_t = 4)]
    pub fanout: usize,
    /// Rate of every host link, the root's too, each direction (tc syntax).
    /// Why 20 Mbit/s: DESIGN.md, "Boot replay and the storm bench".
    #[arg(long, default_value = "20mbit")]
    pub link: String,
    /// Replay on an image K× the trace's size (offsets and lengths ×K).
    #[arg(long, default_value_t = 1)]
    pub image_scale: u64,
    /// Multiplies the trace's think times (6: a ~70 s boot, which keeps
    /// the 2 cores' share of the storm's work under the links').
    #[arg(long, default_value_t = 6.0)]
    pub time_scale: f64,
    /// Chunk size of every herd.
    #[arg(long, default_value = "64KiB")]
    pub chunk_size: String,
    /// Read-ahead of every herd (0: fetch only what is read).
    #[arg(long, default_value = "0")]
    pub read_ahead: String,
    /// Hosts in the full-copy baseline; its makespan is extrapolated
    /// linearly to --hosts (the root's link bounds it).
    #[arg(long, default_value_t = 1)]
    pub full_copy_hosts: usize,
    /// Hosts in the all-from-root baseline; its makespan is extrapolated to
    /// --hosts from the bytes the root's link must carry.
    #[arg(long, default_value_t = 5)]
    pub all_from_root_hosts: usize,
    /// Baselines to run (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub baselines: Vec<Baseline>,
    /// Boot trace (a herd profile with first-access times).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Seed of the synthetic image.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Also boot this many real Debian VMs (qemu; TCG where KVM does not
    /// work) on hosts 1..=N in the herd baselines, next to the replayed
    /// ones. The golden image is then the real Debian image (the trace must
    /// be of its size), and replays check bytes against it.
    #[arg(long, default_value_t = 0)]
    pub real_vms: usize,
    /// Kill host 1 (the root's only child, the relay above every other
    /// host in the tree) this many seconds into each storm: its herd and its
    /// VMs die with it; its children fail over to their alternates (the
    /// report shows the effect).
    #[arg(long)]
    pub kill_relay_at: Option<f64>,
    /// Give up on one storm after this many seconds.
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
    /// Where to write storm.json, the SVGs and README.md.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Instead of a storm: boot the real Debian VM through a recording herd,
    /// replay its trace locally and through a chain, write fidelity.json.
    #[arg(long)]
    pub fidelity: bool,
    /// With --fidelity: keep the recording as the storm's trace.
    #[arg(long, requires = "fidelity")]
    pub save_trace: bool,
}

impl Options {
    /// The quick storm `cargo xtask test` runs.
    #[must_use]
    pub fn quick(out: PathBuf) -> Self {
        Self {
            hosts: 6,
            vms: 3,
            fanout: 2,
            link: "200mbit".into(),
            image_scale: 1,
            time_scale: 0.5,
            chunk_size: "64KiB".into(),
            read_ahead: "0".into(),
            full_copy_hosts: 2,
            all_from_root_hosts: 6,
            real_vms: 0,
            baselines: Vec::new(),
            trace: None,
            seed: 1,
            kill_relay_at: None,
            timeout: 300,
            out: Some(out),
            fidelity: false,
            save_trace: false,
        }
    }
}

/// The trace shipped with herd: one Debian bookworm (systemd) boot under
/// TCG, recorded by the daemon recorder (`xtask/traces/README.md`).
#[must_use]
pub fn default_trace() -> PathBuf {
    root().join("xtask/traces/debian-boot.profile")
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub version: u32,
    pub hosts: usize,
    pub vms_per_host: usize,
    pub fanout: usize,
    pub link: String,
    pub link_bytes_per_s: f64,
    pub image_bytes: u64,
    pub image_scale: u64,
    pub time_scale: f64,
    pub chunk_size: u64,
    pub read_ahead: String,
    pub cores: usize,
    /// Bytes one boot reads (unique), and its requests.
    pub working_set_bytes: u64,
    pub working_set_chunks_bytes: u64,
    pub trace_requests: u64,
    /// The replay with all data local: V VMs on a local file, no links.
    pub local_replay_secs: f64,
    /// working set ÷ link rate + local replay.
    pub lower_bound_secs: f64,
    pub baselines: Vec<BaselineResult>,
    /// The last `--fidelity` run in the same output folder, if any.
    pub fidelity: Option<fidelity::Fidelity>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaselineResult {
    pub name: String,
    /// Hosts this baseline ran on (full copy may run on fewer).
    pub hosts: usize,
    pub vms: usize,
    /// Seconds from the storm's start to each VM's last read, sorted.
    pub boot_secs: Vec<f64>,
    pub makespan_secs: f64,
    /// Makespan at --hosts when this ran on fewer (linear in hosts).
    pub extrapolated_makespan_secs: Option<f64>,
    /// Payload bytes the root served (herd's counter; nbdcopy's reads for
    /// full copy).
    pub root_egress_bytes: u64,
    /// Bytes the root's link carried (switch counter: headers included).
    pub root_link_bytes: u64,
    /// Bytes fetched from parents by the hosts of each tree level (1 = the
    /// root's children).
    pub level_bytes: Vec<u64>,
    pub peak_rss_bytes_max: u64,
    pub peak_rss_bytes_mean: u64,
    pub cache_bytes_max: u64,
    pub cpu_busy_mean: f64,
    pub cpu_busy_peak: f64,
    /// CPU seconds during the storm: the whole machine, the herds, the
    /// replay processes (the rest is the kernel's network, tbf, xtask).
    pub cpu_secs_machine: f64,
    pub cpu_secs_herd: f64,
    pub cpu_secs_replay: f64,
    pub bytes_read: u64,
    pub verified_bytes: u64,
    pub errors: u64,
    pub mismatches: u64,
    /// Seconds spent before the storm (pre-warming), not in the makespan.
    pub prewarm_secs: Option<f64>,
    /// Real VMs (qemu) booted in the same storm: seconds to their boot
    /// marker from the storm's start.
    #[serde(default)]
    pub real_vm_boot_secs: Vec<f64>,
    /// What the storm's relay kill hit, if one was asked for.
    pub killed_relay_at_secs: Option<f64>,
    /// Times a herd found a parent down (summed over hosts): with no kill,
    /// anything above 0 is a false alarm of the health probes.
    #[serde(default)]
    pub parents_down: u64,
    /// Reads herds re-issued to another parent (summed over hosts).
    #[serde(default)]
    pub failovers: u64,
    /// VMs of the killed host that had not booted when it died.
    #[serde(default)]
    pub vms_lost_with_killed_host: usize,
}

/// A parsed rate like "100mbit" in bytes per second.
pub(crate) fn rate_bytes(s: &str) -> Result<f64> {
    let s = s.trim().to_ascii_lowercase();
    let (num, mul) = [
        ("gbit", 1e9 / 8.0),
        ("mbit", 1e6 / 8.0),
        ("kbit", 1e3 / 8.0),
        ("gbps", 1e9),
        ("mbps", 1e6),
        ("kbps", 1e3),
    ]
    .iter()
    .find_map(|(u, m)| s.strip_suffix(u).map(|n| (n.to_owned(), *m)))
    .with_context(|| format!("link rate `{s}`: use tc units like 100mbit or 1gbit"))?;
    let v: f64 = num
        .trim()
        .parse()
        .with_context(|| format!("link rate `{s}`"))?;
    anyhow::ensure!(v > 0.0, "link rate must be positive");
    Ok(v * mul)
}

pub(crate) fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mul) = [
        ("KiB", 1u64 << 10),
        ("MiB", 1 << 20),
        ("GiB", 1 << 30),
        ("K", 1 << 10),
        ("M", 1 << 20),
    ]
    .iter()
    .find_map(|(u, m)| s.strip_suffix(u).map(|n| (n, *m)))
    .unwrap_or((s, 1));
    Ok(num
        .trim()
        .parse::<u64>()
        .with_context(|| format!("size `{s}`"))?
        * mul)
}

/// Parent of host `i` (≥ 1) in the herd tree: the root (0) has one child,
/// host 1, so each chunk leaves the root once; below it a `fanout`-ary tree.
#[must_use]
pub fn tree_parent(i: usize, fanout: usize) -> usize {
    if i <= 1 {
        0
    } else {
        1 + (i - 2) / fanout.max(1)
    }
}

/// Where host `i` reads from in the tree: its parent, that parent's
/// parent, then the root (the order `herd` fleets use).
#[must_use]
pub fn tree_upstreams(i: usize, fanout: usize) -> Vec<usize> {
    let mut v = Vec::new();
    let mut n = i;
    while n != 0 && v.len() < 2 {
        n = tree_parent(n, fanout);
        v.push(n);
    }
    if v.last() != Some(&0) {
        v.push(0);
    }
    v
}

/// Depth of host `i` under the root.
#[must_use]
pub fn tree_level(i: usize, fanout: usize) -> usize {
    let mut d = 0;
    let mut n = i;
    while n != 0 {
        n = tree_parent(n, fanout);
        d += 1;
    }
    d
}

/// What a replay process printed, one line at a time.
enum Event {
    Vm {
        host: usize,
        end_ms: u64,
        rep: serde_json::Value,
    },
    Summary {
        cpu_secs: f64,
    },
    Exited,
    /// A real VM printed its boot marker this many seconds into the storm,
    /// or (None) stopped without it.
    RealVm(Option<f64>, String),
}

struct Env {
    herd: PathBuf,
    dir: PathBuf,
    image: PathBuf,
    profile: PathBuf,
    image_bytes: u64,
    /// How replays check bytes: the seed's pattern or the image file.
    verify: [String; 2],
    /// The Debian boot disk, when real VMs boot too.
    disk: Option<crate::image::Disk>,
}

/// `cargo xtask bench storm`: the fidelity check with `--fidelity`, else a storm.
pub fn run_job(opts: &Options) -> Result<()> {
    if !opts.fidelity {
        return run_bench(opts).map(drop);
    }
    let herd = build_herd()?;
    let dir = work_dir(&format!("fidelity-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let res = fidelity::run(&herd, &dir, opts.save_trace);
    let _ = std::fs::remove_dir_all(&dir);
    let f = res?;
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| root().join("results/storm"));
    std::fs::create_dir_all(&out)?;
    let text = serde_json::to_string_pretty(&f)?;
    std::fs::write(out.join("fidelity.json"), &text)?;
    println!("{text}");
    Ok(())
}

/// Runs the benchmark and writes its results.
pub fn run_bench(opts: &Options) -> Result<Results> {
    anyhow::ensure!(
        opts.hosts >= 1 && opts.vms >= 1,
        "--hosts and --vms must be at least 1"
    );
    anyhow::ensure!(opts.fanout >= 1, "--fanout must be at least 1");
    anyhow::ensure!(opts.image_scale >= 1, "--image-scale must be at least 1");
    let link_bps = rate_bytes(&opts.link)?;
    let chunk = parse_size(&opts.chunk_size)?;
    crate::deps::ensure(&["iproute2", "libnbd-bin"])?;
    if opts.real_vms > 0 {
        crate::deps::ensure(&["qemu-system-x86", "qemu-utils"])?;
    }
    fleet::check_capabilities()?;
    fleet::catch_interrupts();
    let herd = build_herd()?;
    let trace = opts.trace.clone().unwrap_or_else(default_trace);
    anyhow::ensure!(
        trace.exists(),
        "trace {} is missing (record one with `herd serve --record-profile`)",
        trace.display()
    );
    let dir = work_dir(&format!("storm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| root().join("results/storm"));
    std::fs::create_dir_all(&out)?;
    let res = run_in(opts, &herd, &trace, &dir, link_bps, chunk);
    let _ = std::fs::remove_dir_all(&dir);
    let mut results = res?;
    results.fidelity = std::fs::read_to_string(out.join("fidelity.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    std::fs::write(
        out.join("storm.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    plot::svgs(&results, &out)?;
    let table = report::markdown(&results);
    std::fs::write(out.join("README.md"), &table)?;
    println!("{table}");
    Ok(results)
}

fn run_in(
    opts: &Options,
    herd: &Path,
    trace: &Path,
    dir: &Path,
    link_bps: f64,
    chunk: u64,
) -> Result<Results> {
    let (mut image, mut profile) = synthetic(herd, trace, opts.image_scale, opts.seed)?;
    let mut verify = ["--verify-seed".to_owned(), opts.seed.to_string()];
    let mut disk = None;
    if opts.real_vms > 0 {
        anyhow::ensure!(
            opts.image_scale == 1,
            "--real-vms boots the real image: use --image-scale 1"
        );
        let d = crate::image::ensure(crate::image::Kind::Debian)?;
        image = d.root.clone();
        profile = dir.join("onto-debian.profile");
        run(Command::new(herd)
            .args(["replay", "image", "--trace"])
            .arg(trace)
            .arg("--onto")
            .arg(&image)
            .arg("--profile-out")
            .arg(&profile))
        .context("real VMs boot the Debian image: the trace must be of its size")?;
        verify = ["--verify-image".to_owned(), image.display().to_string()];
        disk = Some(d);
    }
    let env = Env {
        herd: herd.to_owned(),
        dir: dir.to_owned(),
        image_bytes: std::fs::metadata(&image)?.len(),
        image: image.clone(),
        profile,
        verify,
        disk,
    };
    let image_bytes = env.image_bytes;

    step("replaying the trace with all data local (the lower bound's second term)");
    let local = local_replay(&env, opts)?;
    let ws = local.trace_bytes;
    let lower_bound = ws as f64 / link_bps + local.secs;
    step(&format!(
        "working set {:.1} MiB in {} reads; local replay of {} VMs: {:.2} s; lower bound {:.2} s",
        ws as f64 / 1048576.0,
        local.trace_requests,
        opts.vms,
        local.secs,
        lower_bound
    ));
    let ws_chunks = chunk_bytes(&env.profile, chunk)?;

    let baselines = if opts.baselines.is_empty() {
        Baseline::ALL.to_vec()
    } else {
        opts.baselines.clone()
    };
    let n = opts.hosts + 1;
    let pb = crate::util::spinner(format!(
        "creating {n} hosts on one bridge ({} links)",
        opts.link
    ));
    let t = Instant::now();
    let mut fleet = Fleet::create(n, &opts.link, |i| {
        pb.set_message(format!("hosts up: {i}/{n}"))
    })?;
    pb.finish_and_clear();
    step(&format!(
        "fleet of {n} hosts up in {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    let mut out = Vec::new();
    for b in baselines {
        fleet::check_interrupted()?;
        let r = run_baseline(&mut fleet, &env, opts, b, link_bps);
        fleet.kill_all();
        clear_caches(&env.dir)?;
        let r = r.with_context(|| format!("baseline {}", b.name()))?;
        step(&format!(
            "{}: makespan {:.1} s ({:.2}× the lower bound){}, root sent {:.1} MiB, {} VM errors, {} wrong reads",
            r.name,
            r.makespan_secs,
            r.makespan_secs / lower_bound,
            r.extrapolated_makespan_secs
                .map(|e| format!(", {e:.0} s extrapolated to {} hosts", opts.hosts))
                .unwrap_or_default(),
            r.root_egress_bytes as f64 / 1048576.0,
            r.errors,
            r.mismatches
        ));
        out.push(r);
    }
    let tag = fleet.tag().to_owned();
    drop(fleet);
    let left = fleet::leftovers(&tag)?;
    anyhow::ensure!(
        left.is_empty(),
        "the fleet left behind: {}",
        left.join(", ")
    );
    Ok(Results {
        version: 1,
        hosts: opts.hosts,
        vms_per_host: opts.vms,
        fanout: opts.fanout,
        link: opts.link.clone(),
        link_bytes_per_s: link_bps,
        image_bytes,
        image_scale: opts.image_scale,
        time_scale: opts.time_scale,
        chunk_size: chunk,
        read_ahead: opts.read_ahead.clone(),
        cores: std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
        working_set_bytes: ws,
        working_set_chunks_bytes: ws_chunks,
        trace_requests: local.trace_requests,
        local_replay_secs: local.secs,
        lower_bound_secs: lower_bound,
        baselines: out,
        fidelity: None,
    })
}

/// The seeded synthetic image of the trace's size × `scale` and the trace
/// rebased onto it, written once and kept across runs (keyed by the
/// trace's content, so a re-recorded trace gets its own).
pub(crate) fn synthetic(
    herd: &Path,
    trace: &Path,
    scale: u64,
    seed: u64,
) -> Result<(PathBuf, PathBuf)> {
    let images = work_dir("storm-images");
    std::fs::create_dir_all(&images)?;
    let digest = {
        use sha2::Digest;
        let d = sha2::Sha256::digest(std::fs::read(trace)?);
        d.iter()
            .take(6)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let stem = format!(
        "{}-{digest}-x{scale}-s{seed}",
        trace
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("trace"),
    );
    let image = images.join(format!("{stem}.img"));
    let profile = images.join(format!("{stem}.profile"));
    if !(image.exists() && profile.exists()) {
        step(&format!("writing the synthetic image {}", image.display()));
        run(Command::new(herd)
            .args(["replay", "image", "--trace"])
            .arg(trace)
            .args(["--seed", &seed.to_string()])
            .args(["--image-scale", &scale.to_string()])
            .arg("--out")
            .arg(&image)
            .arg("--profile-out")
            .arg(&profile))?;
    }
    Ok((image, profile))
}

/// A profile's extents (offset, length, first access µs), read straight
/// from the v1 format (DESIGN.md): 24-byte records after the header.
pub fn profile_extents(profile: &Path) -> Result<Vec<(u64, u64, u64)>> {
    let bytes = std::fs::read(profile)?;
    let header = bytes
        .get(10..12)
        .map(|h| usize::from(u16::from_le_bytes([h[0], h[1]])))
        .with_context(|| format!("{} is not a profile", profile.display()))?;
    let u = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
    Ok(bytes
        .get(header..)
        .unwrap_or(&[])
        .chunks_exact(24)
        .map(|e| (u(&e[0..8]), u(&e[8..16]), u(&e[16..24])))
        .collect())
}

/// Bytes of the chunks the trace touches.
pub(crate) fn chunk_bytes(profile: &Path, chunk: u64) -> Result<u64> {
    let mut chunks = std::collections::BTreeSet::new();
    for (off, len, _) in profile_extents(profile)? {
        if len > 0 {
            chunks.extend(off / chunk..=(off + len - 1) / chunk);
        }
    }
    Ok(chunks.len() as u64 * chunk)
}

struct Local {
    secs: f64,
    trace_bytes: u64,
    trace_requests: u64,
}

fn replay_args(env: &Env, opts: &Options, uri: &str, start_at_ms: Option<u64>) -> Vec<String> {
    let mut v = vec![
        env.herd.display().to_string(),
        "replay".into(),
        "run".into(),
        "--trace".into(),
        env.profile.display().to_string(),
        "--uri".into(),
        uri.into(),
        "--vms".into(),
        opts.vms.to_string(),
        "--time-scale".into(),
        opts.time_scale.to_string(),
        env.verify[0].clone(),
        env.verify[1].clone(),
        "--json".into(),
    ];
    if let Some(t) = start_at_ms {
        v.push("--start-at-ms".into());
        v.push(t.to_string());
    }
    v
}

/// Runs a `herd replay run --json` to the end and returns its summary line.
pub fn replay_summary(cmd: &mut Command, what: &str) -> Result<serde_json::Value> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .context("cannot run herd replay")?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "{what} failed: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    summary_in(&text).with_context(|| format!("{what} printed no summary"))
}

/// The summary line of `herd replay run --json` output.
pub(crate) fn summary_in(text: &str) -> Option<serde_json::Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v.get("summary").cloned())
}

fn local_replay(env: &Env, opts: &Options) -> Result<Local> {
    let args = replay_args(env, opts, &env.image.display().to_string(), None);
    let summary = replay_summary(Command::new(&args[0]).args(&args[1..]), "local replay")?;
    let get = |k: &str| {
        summary[k]
            .as_f64()
            .with_context(|| format!("summary lacks {k}"))
    };
    anyhow::ensure!(
        get("verified_bytes")? >= get("bytes")? && get("bytes")? > 0.0,
        "local replay did not verify every byte: {summary}"
    );
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(Local {
        secs: get("boot_secs_max")?,
        trace_bytes: get("trace_bytes")? as u64,
        trace_requests: get("trace_requests")? as u64,
    })
}

fn clear_caches(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("cache-") || name.starts_with("copy-") {
            if p.is_dir() {
                std::fs::remove_dir_all(&p)?;
            } else {
                std::fs::remove_file(&p)?;
            }
        }
    }
    Ok(())
}

fn herd_args(env: &Env, opts: &Options, i: usize, upstream: &str, extra: &[String]) -> Vec<String> {
    let addr = host_addr(i);
    let mut v = vec![
        env.herd.display().to_string(),
        "serve".into(),
        "--upstream".into(),
        upstream.into(),
        "--listen".into(),
        format!("{addr}:{NBD_PORT}"),
        "--listen".into(),
        format!("unix:{}", sock(env, i).display()),
        "--cache-dir".into(),
        env.dir.join(format!("cache-{i}")).display().to_string(),
        "--chunk-size".into(),
        opts.chunk_size.clone(),
        "--read-ahead".into(),
        opts.read_ahead.clone(),
        "--metrics".into(),
        format!("{addr}:{METRICS_PORT}"),
        // 100 daemons share 2 cores: one connection thread each is plenty.
        "--workers".into(),
        "1".into(),
    ];
    v.extend_from_slice(extra);
    v
}

fn sock(env: &Env, i: usize) -> PathBuf {
    env.dir.join(format!("h{i}.sock"))
}

/// Host `i`'s herd metrics, as Prometheus text.
pub(crate) fn metrics_of(i: usize) -> Result<String> {
    http_get(
        std::net::SocketAddr::from((host_addr(i), METRICS_PORT)),
        "/metrics",
    )
}

/// CPU busy fraction between two /proc/stat samples.
fn cpu_sample() -> Result<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat")?;
    let line = s.lines().next().context("/proc/stat is empty")?;
    Ok(cpu_ticks(line))
}

/// (total, idle + iowait) ticks of /proc/stat's `cpu` line.
pub(crate) fn cpu_ticks(line: &str) -> (u64, u64) {
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total, idle)
}

/// The storm's progress bar: VMs booted of `total`, for baseline `b`.
pub(crate) fn boot_progress(total: usize, b: Baseline) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(total as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:>15} [{elapsed_precise}] {bar:25} {pos}/{len} VMs booted  {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_prefix(b.name());
    pb
}

/// Peak resident set of a process (VmHWM), in bytes.
fn peak_rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// Bytes a file holds on disk (a sparse cache file's real size).
fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map_or(0, |m| m.blocks() * 512)
}

fn dir_allocated(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| allocated(&e.path()))
                .sum()
        })
        .unwrap_or(0)
}

fn run_baseline(
    fleet: &mut Fleet,
    env: &Env,
    opts: &Options,
    b: Baseline,
    link_bps: f64,
) -> Result<BaselineResult> {
    let hosts = match b {
        Baseline::FullCopy => opts.full_copy_hosts.clamp(1, opts.hosts),
        Baseline::AllFromRoot => opts.all_from_root_hosts.clamp(1, opts.hosts),
        _ => opts.hosts,
    };
    let flat = b == Baseline::AllFromRoot;
    let with_profile = matches!(b, Baseline::TreePrefetch | Baseline::TreePrewarmed);
    let links_before = fleet.link_bytes()?;
    // The root: herd over the golden image (it also serves full copy).
    let mut root_extra = Vec::new();
    if with_profile {
        root_extra.push("--profile".to_owned());
        root_extra.push(env.profile.display().to_string());
    }
    let root_args = herd_args(env, opts, 0, &env.image.display().to_string(), &root_extra);
    let mut pids = vec![0u32; hosts + 1];
    pids[0] = fleet
        .spawn(0, &root_args, Stdio::null(), &env.dir.join("herd-0.log"))?
        .id();
    wait_metrics(0, Duration::from_secs(30), &env.dir)?;
    let root_url = |i: usize| format!("nbd://{}:{NBD_PORT}/herd", host_addr(i));
    if b != Baseline::FullCopy {
        // Parents before children, so each finds its parent listening.
        for (i, pid) in pids.iter_mut().enumerate().skip(1) {
            let ups = if flat {
                vec![0]
            } else {
                tree_upstreams(i, opts.fanout)
            };
            let alternates: Vec<String> = ups[1..]
                .iter()
                .flat_map(|&u| ["--upstream".to_owned(), root_url(u)])
                .collect();
            let args = herd_args(env, opts, i, &root_url(ups[0]), &alternates);
            *pid = fleet
                .spawn(
                    i,
                    &args,
                    Stdio::null(),
                    &env.dir.join(format!("herd-{i}.log")),
                )?
                .id();
        }
        wait_all_metrics((1..=hosts).collect(), Duration::from_secs(60), &env.dir)?;
    }
    let mut prewarm_secs = None;
    if b == Baseline::TreePrewarmed {
        let t = Instant::now();
        let pb = crate::util::spinner("pre-warming: every host prefetches the profile");
        fleet::wait_for(Duration::from_secs(opts.timeout), "pre-warming", || {
            fleet::check_interrupted()?;
            let mut done = 0;
            for i in 1..=hosts {
                let m = metrics_of(i)?;
                // The gauges appear once a host has learnt the profile.
                let (d, t) = (
                    prom_require(&m, "herd_prefetch_chunks_done").ok(),
                    prom_require(&m, "herd_prefetch_chunks_total").ok(),
                );
                if matches!((d, t), (Some(d), Some(t)) if t > 0 && d == t) {
                    done += 1;
                }
            }
            pb.set_message(format!("pre-warming: {done}/{hosts} hosts prefetched"));
            Ok(done == hosts)
        })?;
        pb.finish_and_clear();
        prewarm_secs = Some(t.elapsed().as_secs_f64());
    }

    // The storm: every host's replay starts at the same instant.
    let start_ms = crate::util::unix_ms() + 1500;
    let (tx, rx) = mpsc::channel::<Event>();
    for i in 1..=hosts {
        let args = match b {
            Baseline::FullCopy => {
                let copy = env.dir.join(format!("copy-{i}.img"));
                let replay = replay_args(env, opts, &copy.display().to_string(), Some(start_ms));
                let script = format!(
                    "truncate -s {size} {copy} && nbdcopy {src} {copy} && exec {replay}",
                    size = env.image_bytes,
                    copy = copy.display(),
                    src = root_url(0),
                    replay = replay.join(" ")
                );
                // The copy starts with the storm.
                let wait = format!(
                    "sleep {:.3}; {script}",
                    (start_ms.saturating_sub(crate::util::unix_ms())) as f64 / 1000.0
                );
                vec!["sh".into(), "-c".into(), wait]
            }
            _ => {
                let uri = format!("nbd+unix:///herd?socket={}", sock(env, i).display());
                replay_args(env, opts, &uri, Some(start_ms))
            }
        };
        let child = fleet.spawn(
            i,
            &args,
            Stdio::piped(),
            &env.dir.join(format!("replay-{i}.log")),
        )?;
        let stdout = child.stdout.take().context("replay stdout")?;
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                let ev = if let Some(sum) = v.get("summary") {
                    Event::Summary {
                        cpu_secs: sum["cpu_secs"].as_f64().unwrap_or(0.0),
                    }
                } else {
                    Event::Vm {
                        host: i,
                        end_ms: v["end_ms"].as_u64().unwrap_or(0),
                        rep: v,
                    }
                };
                if tx.send(ev).is_err() {
                    return;
                }
            }
            let _ = tx.send(Event::Exited);
        });
    }
    // Real VMs on the first hosts, started with the storm.
    let real = if b == Baseline::FullCopy {
        0
    } else {
        opts.real_vms.min(hosts)
    };
    if let Some(disk) = env.disk.as_ref().filter(|_| real > 0) {
        let accel = crate::demo::auto_accel(disk);
        for i in 1..=real {
            let ov = env.dir.join(format!("vm-{i}.qcow2"));
            crate::util::raw_overlay(
                &ov,
                &format!("nbd+unix:///herd?socket={}", sock(env, i).display()),
                env.image_bytes,
            )?;
            let qemu = crate::demo::qemu_args(disk, &ov, "qcow2", accel).join("' '");
            let script = format!(
                "sleep {:.3}; exec qemu-system-x86_64 '{qemu}'",
                (start_ms.saturating_sub(crate::util::unix_ms())) as f64 / 1000.0
            );
            let child = fleet.spawn(
                i,
                &["sh".into(), "-c".into(), script],
                Stdio::piped(),
                &env.dir.join(format!("vm-{i}.log")),
            )?;
            let stdout = child.stdout.take().context("qemu stdout")?;
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut last = String::new();
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if line.contains(crate::image::MARKER) {
                        let secs = crate::util::unix_ms().saturating_sub(start_ms) as f64 / 1000.0;
                        let _ = tx.send(Event::RealVm(Some(secs), String::new()));
                        return;
                    }
                    last = line;
                }
                let _ = tx.send(Event::RealVm(None, last));
            });
        }
    }
    drop(tx);
    let mut real_boots = Vec::new();

    let total_vms = hosts * opts.vms;
    let pb = boot_progress(total_vms, b);
    let mut reps: Vec<(usize, u64, serde_json::Value)> = Vec::new();
    let mut exited = 0;
    let mut cpu_samples = Vec::new();
    let mut replay_cpu = 0.0;
    let herd_cpu_before: f64 = pids.iter().map(|p| proc_cpu_secs(*p)).sum();
    let machine_before = cpu_sample()?;
    let mut last_cpu = machine_before;
    let mut last_tick = Instant::now();
    let storm_deadline = Instant::now() + Duration::from_secs(opts.timeout);
    let mut killed_at = None;
    let cache_dirs: Vec<PathBuf> = (1..=hosts)
        .map(|i| match b {
            Baseline::FullCopy => env.dir.join(format!("copy-{i}.img")),
            _ => env.dir.join(format!("cache-{i}")),
        })
        .collect();
    while exited < hosts || real_boots.len() < real {
        fleet::check_interrupted()?;
        if Instant::now() > storm_deadline {
            bail!(
                "the storm did not finish within {} s ({}/{total_vms} VMs booted)",
                opts.timeout,
                reps.len()
            );
        }
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(Event::Vm { host, end_ms, rep }) => {
                reps.push((host, end_ms, rep));
                pb.set_position(reps.len() as u64);
            }
            Ok(Event::Summary { cpu_secs }) => replay_cpu += cpu_secs,
            Ok(Event::Exited) => exited += 1,
            Ok(Event::RealVm(Some(secs), _)) => real_boots.push(secs),
            Ok(Event::RealVm(None, last)) => bail!("a real VM stopped before booting: {last}"),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        let now_ms = crate::util::unix_ms();
        if let (Some(at), None) = (opts.kill_relay_at, killed_at) {
            if now_ms >= start_ms + (at * 1000.0) as u64 && b != Baseline::FullCopy {
                // The host dies: its herd and its VMs.
                fleet.kill_host(1);
                killed_at = Some(at);
            }
        }
        if last_tick.elapsed() >= Duration::from_secs(1) {
            last_tick = Instant::now();
            let cur = cpu_sample()?;
            let (dt, di) = (cur.0 - last_cpu.0, cur.1 - last_cpu.1);
            if now_ms >= start_ms && dt > 0 {
                cpu_samples.push(1.0 - di as f64 / dt as f64);
            }
            last_cpu = cur;
            let links = fleet.link_bytes()?;
            let root_sent = links[0].sent.saturating_sub(links_before[0].sent);
            let cached: u64 = cache_dirs
                .iter()
                .map(|p| {
                    if p.is_dir() {
                        dir_allocated(p)
                    } else {
                        allocated(p)
                    }
                })
                .sum();
            pb.set_message(format!(
                "root sent {:.0} MiB, hosts hold {:.0} MiB, CPU {:.0} %",
                root_sent as f64 / 1048576.0,
                cached as f64 / 1048576.0,
                cpu_samples.last().copied().unwrap_or(0.0) * 100.0
            ));
        }
    }
    pb.finish_and_clear();
    // Failed replays say why in their logs.
    let booted_hosts: std::collections::BTreeSet<usize> = reps.iter().map(|r| r.0).collect();
    for i in 1..=hosts {
        // The killed host's VMs died with it.
        let died = killed_at.is_some() && i == 1;
        if !booted_hosts.contains(&i) && !died {
            let log = std::fs::read_to_string(env.dir.join(format!("replay-{i}.log")))
                .unwrap_or_default();
            bail!("host {i}'s VMs did not boot:\n{}", tail(&log, 20));
        }
    }
    // Every VM of every host that lived reported.
    let (expected, reported) = if killed_at.is_some() {
        let others = reps.iter().filter(|r| r.0 != 1).count();
        (total_vms - opts.vms, others)
    } else {
        (total_vms, reps.len())
    };
    anyhow::ensure!(
        reported == expected,
        "{reported} of {expected} VMs reported"
    );

    // Counters after the storm.
    let machine_after = cpu_sample()?;
    let herd_cpu = pids.iter().map(|p| proc_cpu_secs(*p)).sum::<f64>() - herd_cpu_before;
    let links_after = fleet.link_bytes()?;
    let root_metrics = metrics_of(0)?;
    // Pre-warming moved the working set before the storm: it counts.
    let root_egress = prom_require(&root_metrics, "herd_served_bytes_total")?;
    let mut level_bytes: BTreeMap<usize, u64> = BTreeMap::new();
    let (mut parents_down, mut failovers) = (0u64, 0u64);
    let mut rss = vec![peak_rss(pids[0]).unwrap_or(0)];
    let mut cache_max = 0u64;
    for i in 1..=hosts {
        if b != Baseline::FullCopy {
            if killed_at.is_some() && i == 1 {
                continue;
            }
            let m = metrics_of(i)?;
            let level = if flat { 1 } else { tree_level(i, opts.fanout) };
            *level_bytes.entry(level).or_default() +=
                prom_require(&m, "herd_upstream_read_bytes_total")?;
            parents_down += prom_require(&m, "herd_upstream_down_total")?;
            failovers += prom_require(&m, "herd_upstream_failovers_total")?;
            rss.push(peak_rss(pids[i]).unwrap_or(0));
        }
        let p = &cache_dirs[i - 1];
        cache_max = cache_max.max(if p.is_dir() {
            dir_allocated(p)
        } else {
            allocated(p)
        });
    }
    let mut boot: Vec<f64> = reps
        .iter()
        .map(|(_, end, _)| end.saturating_sub(start_ms) as f64 / 1000.0)
        .collect();
    boot.sort_by(f64::total_cmp);
    let makespan = boot.last().copied().unwrap_or(0.0);
    let sum = |k: &str| -> u64 { reps.iter().map(|r| r.2[k].as_u64().unwrap_or(0)).sum() };
    let root_link_bytes = links_after[0].sent.saturating_sub(links_before[0].sent);
    let scale = opts.hosts as f64 / hosts as f64;
    let extrapolated = (hosts < opts.hosts).then(|| {
        if b == Baseline::FullCopy {
            // The root's link carries every copy: the copy phase grows
            // linearly with hosts; the boot after it does not.
            let local = reps
                .iter()
                .map(|r| r.2["boot_secs"].as_f64().unwrap_or(0.0))
                .fold(0.0, f64::max);
            (makespan - local).max(0.0) * scale + local
        } else {
            // No VM is done before the root's link has carried every
            // host's working set.
            makespan.max(root_link_bytes as f64 * scale / link_bps)
        }
    });
    let levels = level_bytes.keys().max().copied().unwrap_or(0);
    Ok(BaselineResult {
        name: b.name().into(),
        hosts,
        vms: total_vms,
        boot_secs: boot,
        makespan_secs: makespan,
        extrapolated_makespan_secs: extrapolated,
        root_egress_bytes: root_egress,
        root_link_bytes,
        level_bytes: (1..=levels)
            .map(|l| level_bytes.get(&l).copied().unwrap_or(0))
            .collect(),
        peak_rss_bytes_max: rss.iter().copied().max().unwrap_or(0),
        peak_rss_bytes_mean: rss.iter().sum::<u64>() / rss.len().max(1) as u64,
        cache_bytes_max: cache_max,
        cpu_busy_mean: cpu_samples.iter().sum::<f64>() / cpu_samples.len().max(1) as f64,
        cpu_busy_peak: cpu_samples.iter().copied().fold(0.0, f64::max),
        cpu_secs_machine: ((machine_after.0 - machine_before.0)
            - (machine_after.1 - machine_before.1)) as f64
            / clock_ticks(),
        cpu_secs_herd: herd_cpu,
        cpu_secs_replay: replay_cpu,
        bytes_read: sum("bytes"),
        verified_bytes: sum("verified_bytes"),
        errors: sum("errors"),
        mismatches: sum("mismatches"),
        prewarm_secs,
        real_vm_boot_secs: real_boots,
        killed_relay_at_secs: killed_at,
        parents_down,
        failovers,
        vms_lost_with_killed_host: if killed_at.is_some() {
            opts.vms
                .saturating_sub(reps.iter().filter(|r| r.0 == 1).count())
        } else {
            0
        },
    })
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Whether host `i`'s herd serves NBD: its metrics answer before that,
/// while it gets or builds the image's manifest.
/// Whether host `i`'s herd listens for NBD clients.
pub(crate) fn serving(i: usize) -> bool {
    metrics_of(i).is_ok_and(|t| crate::util::prom_get(&t, "herd_serving") == Some(1))
}

/// Waits until every host's herd serves NBD, polling them
/// all each round (one at a time would sleep once per host).
fn wait_all_metrics(mut pending: Vec<usize>, timeout: Duration, dir: &Path) -> Result<()> {
    let t = Instant::now();
    while !pending.is_empty() {
        fleet::check_interrupted()?;
        pending.retain(|&i| !serving(i));
        if let Some(&i) = pending.first() {
            if t.elapsed() > timeout {
                let log =
                    std::fs::read_to_string(dir.join(format!("herd-{i}.log"))).unwrap_or_default();
                bail!(
                    "{} herds did not start within {} s; host {i}'s log:\n{}",
                    pending.len(),
                    timeout.as_secs(),
                    tail(&log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// Waits until host `i`'s herd serves NBD.
fn wait_metrics(i: usize, timeout: Duration, dir: &Path) -> Result<()> {
    fleet::wait_for(timeout, &format!("herd on host {i} to start"), || {
        fleet::check_interrupted()?;
        Ok(serving(i))
    })
    .with_context(|| {
        let log = std::fs::read_to_string(dir.join(format!("herd-{i}.log"))).unwrap_or_default();
        format!("host {i}'s herd log:\n{}", tail(&log, 20))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_hosts_list_parent_grandparent_then_root() {
        assert_eq!(tree_upstreams(1, 4), vec![0]);
        assert_eq!(tree_upstreams(2, 4), vec![1, 0]);
        assert_eq!(tree_upstreams(5, 4), vec![1, 0]);
        assert_eq!(tree_upstreams(6, 4), vec![2, 1, 0]);
        assert_eq!(tree_upstreams(7, 4), vec![2, 1, 0]);
        assert_eq!(tree_upstreams(30, 4), vec![8, 2, 0]);
    }

    #[test]
    fn the_root_has_one_child_and_the_tree_below_it_has_fanout_children() {
        assert_eq!(tree_parent(1, 4), 0);
        for i in 2..=5 {
            assert_eq!(tree_parent(i, 4), 1);
        }
        assert_eq!(tree_parent(6, 4), 2);
        assert_eq!(tree_parent(21, 4), 5);
        assert_eq!(tree_parent(22, 4), 6);
        assert_eq!(tree_level(1, 4), 1);
        assert_eq!(tree_level(5, 4), 2);
        assert_eq!(tree_level(21, 4), 3);
        assert_eq!(tree_level(22, 4), 4);
        // 100 hosts, fanout 4: 1 + 4 + 16 + 64 + 15 → five levels.
        assert_eq!(tree_level(100, 4), 5);
        let mut kids = vec![0; 101];
        for i in 1..=100 {
            kids[tree_parent(i, 4)] += 1;
        }
        assert_eq!(kids[0], 1);
        assert!(kids.iter().all(|&k| k <= 4));
    }

    #[test]
    fn rates_parse_in_tc_units() {
        assert!((rate_bytes("100mbit").unwrap_or(0.0) - 12.5e6).abs() < 1.0);
        assert!((rate_bytes("1gbit").unwrap_or(0.0) - 125e6).abs() < 1.0);
        assert!(rate_bytes("fast").is_err());
        assert!(rate_bytes("0mbit").is_err());
    }
}
