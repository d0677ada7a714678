//! `cargo xtask vagrant bench`: the boot storm of `cargo xtask bench storm`
//! on the testbed's guests — separate kernels, a real LIO target on the
//! root, virtio links shaped with `tc tbf` inside the guests, herd as the
//! appliance ships it — so the emulated fleet's figures can be checked on
//! real machines.
//!
//! ```text
//!  full-copy      host: open-iscsi logs in to LIO, dd copies LUN 1 to a
//!                 local file, then its VMs replay from that file
//!  all-from-root  host: herd, parent = the root's herd
//!  tree-lazy      host: herd in the storm bench's tree (the root has one
//!                 child, host 1; a --fanout-ary tree below it)
//!  tree-prefetch  as tree-lazy, the root's herd given the boot profile,
//!                 which reaches the hosts as in production
//! ```
//!
//! LIO serves the storm's seeded synthetic image as LUN 1 (the root's 4th
//! disk); the root's bench herd reads it with herd's iSCSI initiator. Bench
//! herds run beside the appliance's own (port 10810, metrics 9101), started
//! per baseline with empty caches and stopped after it. Every replayed byte
//! is checked against the seed. Guest clocks are offset-corrected (the
//! lowest-RTT sample over a multiplexed SSH connection), so all replays
//! start at one instant.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::{tree, Node};
use crate::appliance_test::IQN as IQN_LIO;
use crate::bench::storm::{self, Baseline, BaselineResult, Results};
use crate::util::{http_get, output, prom_get, prom_require, root, step, unix_ms, work_dir};

/// Port and metrics port of the bench herds (the appliance's herd keeps
/// 10809 and 9100).
const PORT: u16 = 10810;
const METRICS: u16 = 9101;
/// Where a guest keeps the bench's files.
const DIR: &str = "/var/tmp/herd-bench";
/// Seed of the synthetic image (the storm bench's default).
const SEED: u64 = 1;
const CHUNK: &str = "64KiB";
/// Clock ticks per second in the guests (Debian's kernel).
const GUEST_HZ: f64 = 100.0;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Replayed VMs per host node.
    #[arg(global = true, long = "bench-vms", default_value_t = 4)]
    pub vms: usize,
    /// Rate of every node's testbed link, egress, shaped inside the guest.
    #[arg(global = true, long = "bench-link", default_value = "20mbit")]
    pub link: String,
    /// Multiplies the trace's think times.
    #[arg(global = true, long = "bench-time-scale", default_value_t = 1.0)]
    pub time_scale: f64,
    /// Baselines to run (default: all four).
    #[arg(
        global = true,
        long = "bench-baselines",
        value_enum,
        value_delimiter = ','
    )]
    pub baselines: Vec<Baseline>,
    /// Give up on one storm after this many seconds.
    #[arg(global = true, long = "bench-timeout", default_value_t = 900)]
    pub timeout: u64,
    /// Where to write storm.json, the SVGs and README.md (default
    /// results/testbed/).
    #[arg(global = true, long = "bench-out")]
    pub out: Option<PathBuf>,
}

impl Args {
    /// The quick run `cargo xtask test` does inside the testbed cycle.
    #[must_use]
    pub fn quick(out: PathBuf) -> Self {
        Self {
            vms: 2,
            link: "100mbit".into(),
            time_scale: 0.5,
            baselines: vec![Baseline::TreeLazy, Baseline::TreePrefetch],
            timeout: 300,
            out: Some(out),
        }
    }
}

/// What `vagrant bench` writes: the storm's figures on the testbed, what
/// LIO sent the root's herd, and the emulated fleet's run at the same size
/// when one is at hand.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TestbedStorm {
    pub version: u32,
    pub nodes: usize,
    /// Testbed tree's fanout (the bench tree's too).
    pub fanout: usize,
    pub accel: String,
    pub guest_vcpus: u32,
    pub guest_memory_mib: u32,
    /// Bytes the root's herd read from LIO, per baseline (full copy: what
    /// the hosts' initiators read).
    pub lio_bytes: BTreeMap<String, u64>,
    /// Of those, what the root's herd had read before the storm started
    /// (prefetch begins when it starts).
    pub lio_bytes_before_storm: BTreeMap<String, u64>,
    pub storm: Results,
    /// `cargo xtask bench storm` with the same hosts, VMs, fanout, link,
    /// time scale and baselines (results/testbed/emulated/storm.json).
    pub emulated: Option<Results>,
}

/// The storm's synthetic image and its rebased trace (the image is LIO's
/// LUN 1 on the root).
pub fn synthetic() -> Result<(PathBuf, PathBuf)> {
    let herd = crate::demo::build_herd()?;
    storm::synthetic(&herd, &storm::default_trace(), 1, SEED)
}

/// One guest, reached over a multiplexed SSH connection.
struct Guest {
    i: usize,
    node: Node,
    key: PathBuf,
    control: PathBuf,
    /// Guest clock − this machine's clock, in ms.
    offset_ms: i64,
    /// The testbed interface (the one holding the node's address).
    iface: String,
}

impl Guest {
    fn ssh(&self) -> Command {
        let ctl = format!("ControlPath={}", self.control.display());
        crate::util::ssh_command(&self.key, &self.node.ip, 22, &["-o", &ctl])
    }

    /// The master connection every later command rides on; started apart,
    /// with no stdio, as a master forked by a command would hold that
    /// command's stdout open.
    fn connect(&self) -> Result<()> {
        let ctl = format!("ControlPath={}", self.control.display());
        let status = crate::util::ssh_command(
            &self.key,
            &self.node.ip,
            22,
            &[
                "-o",
                &ctl,
                "-o",
                "ControlMaster=yes",
                "-o",
                "ControlPersist=900",
                "-f",
                "-N",
            ],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
        anyhow::ensure!(status.success(), "cannot reach {} over SSH", self.node.name);
        Ok(())
    }

    fn sh(&self, script: &str) -> Result<String> {
        output(self.ssh().arg(script)).with_context(|| format!("on {}: {script}", self.node.name))
    }

    fn upload(&self, local: &Path, remote: &str) -> Result<()> {
        let status = self
            .ssh()
            .arg(format!("cat > {remote}"))
            .stdin(fs::File::open(local)?)
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(
            status.success(),
            "upload to {}:{remote} failed",
            self.node.name
        );
        Ok(())
    }

    /// The lowest-round-trip of a few samples bounds the error by half
    /// that round trip.
    fn measure_offset(&mut self) -> Result<()> {
        let mut best = (u64::MAX, 0i64);
        for _ in 0..7 {
            let t0 = unix_ms();
            let g: i64 = self.sh("date +%s%3N")?.trim().parse()?;
            let t1 = unix_ms();
            let mid = i64::try_from((t0 + t1) / 2)?;
            if t1 - t0 < best.0 {
                best = (t1 - t0, g - mid);
            }
        }
        self.offset_ms = best.1;
        Ok(())
    }

    fn metrics(&self) -> Result<String> {
        let ip: std::net::Ipv4Addr = self.node.ip.parse()?;
        http_get(std::net::SocketAddr::from((ip, METRICS)), "/metrics")
            .with_context(|| format!("bench herd metrics of {}", self.node.name))
    }

    fn serving(&self) -> bool {
        self.metrics()
            .is_ok_and(|t| prom_get(&t, "herd_serving") == Some(1))
    }

    /// (busy, total) CPU ticks of the guest.
    fn cpu(&self) -> Result<(u64, u64)> {
        let (total, idle) = storm::cpu_ticks(&self.sh("head -1 /proc/stat")?);
        Ok((total - idle, total))
    }

    fn tx_bytes(&self) -> Result<u64> {
        Ok(self
            .sh(&format!(
                "cat /sys/class/net/{}/statistics/tx_bytes",
                self.iface
            ))?
            .trim()
            .parse()?)
    }

    /// Stops bench herds and replays, logs out of LIO, empties the bench
    /// directory but for the trace.
    fn reset(&self) -> Result<()> {
        self.sh(&format!(
            "pkill -f '[h]erd serve .*:{PORT}' ; pkill -f '[h]erd replay run' ; \
             for i in $(seq 1 50); do pgrep -f '[h]erd (serve .*:{PORT}|replay run)' >/dev/null || break; sleep 0.1; done; \
             iscsiadm -m node -o delete >/dev/null 2>&1 ; iscsiadm -m session -u >/dev/null 2>&1 ; \
             mkdir -p {DIR} && find {DIR} -mindepth 1 -maxdepth 1 ! -name trace.profile -exec rm -rf {{}} + ; true"
        ))
        .map(drop)
    }

    /// Starts a bench herd in the background.
    fn start_herd(&self, upstreams: &[String], extra: &str) -> Result<()> {
        let ups: String = upstreams
            .iter()
            .map(|u| format!(" --upstream {u}"))
            .collect();
        self.sh(&format!(
            "cd {DIR} || exit 1; setsid herd serve{ups} --listen 0.0.0.0:{PORT} --cache-dir {DIR}/cache \
             --chunk-size {CHUNK} --read-ahead 0 --metrics 0.0.0.0:{METRICS} --workers 1 \
             --parent-timeout 300 {extra} > {DIR}/herd.log 2>&1 < /dev/null & echo $! > {DIR}/herd.pid"
        ))
        .map(drop)
    }

    /// (peak RSS bytes, CPU seconds) of the bench herd.
    fn herd_usage(&self) -> Result<(u64, f64)> {
        let out = self.sh(&format!(
            "p=$(cat {DIR}/herd.pid); grep VmHWM /proc/$p/status | awk '{{print $2}}'; \
             cut -d')' -f2 /proc/$p/stat | awk '{{print $12 + $13}}'"
        ))?;
        let mut l = out.lines();
        let kb: u64 = l.next().unwrap_or("0").trim().parse().unwrap_or(0);
        let ticks: f64 = l.next().unwrap_or("0").trim().parse().unwrap_or(0.0);
        Ok((kb * 1024, ticks / GUEST_HZ))
    }
}

/// Connects to every node, measures its clock offset, finds its testbed
/// interface and uploads the trace.
fn guests(nodes: &[Node], profile: &Path) -> Result<Vec<Guest>> {
    let (key, _) = crate::appliance_test::ssh_key()?;
    let ctl_dir = work_dir("testbed-ssh");
    fs::create_dir_all(&ctl_dir)?;
    let mut v = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let mut g = Guest {
            i,
            node: n.clone(),
            key: key.clone(),
            control: ctl_dir.join(format!("{}.sock", n.name)),
            offset_ms: 0,
            iface: String::new(),
        };
        let _ = fs::remove_file(&g.control);
        g.connect()?;
        g.iface = g
            .sh(&format!(
                "ip -o -4 addr show to {}/32 | awk '{{print $2}}'",
                n.ip
            ))?
            .trim()
            .to_owned();
        anyhow::ensure!(
            !g.iface.is_empty(),
            "{} has no interface with {}",
            n.name,
            n.ip
        );
        g.measure_offset()?;
        g.reset()?;
        g.upload(profile, &format!("{DIR}/trace.profile"))?;
        v.push(g);
    }
    Ok(v)
}

/// Shapes (or, with `None`, unshapes) every node's testbed link.
fn shape(guests: &[Guest], rate: Option<&str>) -> Result<()> {
    for g in guests {
        match rate {
            Some(r) => g.sh(&format!(
                "tc qdisc replace dev {} root tbf rate {r} burst 64kb latency 50ms",
                g.iface
            ))?,
            None => g.sh(&format!(
                "tc qdisc del dev {} root 2>/dev/null; true",
                g.iface
            ))?,
        };
    }
    Ok(())
}

fn close(guests: &[Guest]) {
    for g in guests {
        let _ = g.reset();
        let _ = g.sh(&format!("rm -rf {DIR}"));
        let ctl = format!("ControlPath={}", g.control.display());
        let _ = Command::new("ssh")
            .args(["-o", &ctl, "-O", "exit", &format!("root@{}", g.node.ip)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs the storm on a testbed that is up, writes its results and returns
/// them.
pub fn run(nodes: usize, fanout: usize, a: &Args) -> Result<TestbedStorm> {
    anyhow::ensure!(nodes >= 2, "the bench needs the root and at least one host");
    anyhow::ensure!(a.vms >= 1, "--bench-vms must be at least 1");
    let link_bps = storm::rate_bytes(&a.link)?;
    let chunk = storm::parse_size(CHUNK)?;
    let (image, profile) = synthetic()?;
    let image_bytes = fs::metadata(&image)?.len();
    let extents = storm::profile_extents(&profile)?;
    let ws: u64 = extents.iter().map(|e| e.1).sum();
    let ws_chunks = storm::chunk_bytes(&profile, chunk)?;
    let tb = tree(nodes, fanout);
    let guests = guests(&tb, &profile)?;
    let res = (|| {
        shape(&guests, Some(&a.link))?;
        let baselines = if a.baselines.is_empty() {
            vec![
                Baseline::FullCopy,
                Baseline::AllFromRoot,
                Baseline::TreeLazy,
                Baseline::TreePrefetch,
            ]
        } else {
            a.baselines.clone()
        };
        anyhow::ensure!(
            !baselines.contains(&Baseline::TreePrewarmed),
            "tree-prewarmed is an emulated-fleet baseline only"
        );
        let mut out = Vec::new();
        let mut lio = BTreeMap::new();
        let mut lio_early = BTreeMap::new();
        let mut local_secs = None;
        let mut trace_requests = 0;
        for b in baselines {
            let r = baseline(&guests, a, fanout, b, image_bytes)
                .with_context(|| format!("testbed baseline {}", b.name()))?;
            step(&format!(
                "testbed {}: makespan {:.1} s, LIO sent {:.1} MiB, root sent {:.1} MiB, {} errors, {} wrong reads",
                r.result.name,
                r.result.makespan_secs,
                r.lio_bytes as f64 / 1048576.0,
                r.result.root_egress_bytes as f64 / 1048576.0,
                r.result.errors,
                r.result.mismatches
            ));
            local_secs = local_secs.or(r.local_secs);
            trace_requests = r.trace_requests;
            lio.insert(r.result.name.clone(), r.lio_bytes);
            lio_early.insert(r.result.name.clone(), r.lio_before_storm);
            out.push(r.result);
            for g in &guests {
                g.reset()?;
            }
        }
        Ok((out, lio, lio_early, local_secs, trace_requests))
    })();
    let unshaped = shape(&guests, None);
    close(&guests);
    let (baselines, lio_bytes, lio_bytes_before_storm, local_secs, trace_requests) = res?;
    unshaped?;
    let local = local_secs.unwrap_or(0.0);
    let storm = Results {
        version: 1,
        hosts: nodes - 1,
        vms_per_host: a.vms,
        fanout,
        link: a.link.clone(),
        link_bytes_per_s: link_bps,
        image_bytes,
        image_scale: 1,
        time_scale: a.time_scale,
        chunk_size: chunk,
        read_ahead: "0".into(),
        cores: std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
        working_set_bytes: ws,
        working_set_chunks_bytes: ws_chunks,
        trace_requests,
        local_replay_secs: local,
        lower_bound_secs: ws as f64 / link_bps + local,
        baselines,
        fidelity: None,
    };
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| root().join("results/testbed"));
    fs::create_dir_all(&out)?;
    let r = TestbedStorm {
        version: 1,
        nodes,
        fanout,
        accel: super::driver().to_owned(),
        guest_vcpus: 1,
        guest_memory_mib: 768,
        lio_bytes,
        lio_bytes_before_storm,
        storm,
        emulated: None,
    };
    write(r, &out)
}

/// Writes storm.json, the SVGs and README.md into `out`, with the emulated
/// fleet's run at the same size (`out`/emulated/storm.json) if there is one.
fn write(mut r: TestbedStorm, out: &Path) -> Result<TestbedStorm> {
    r.emulated = fs::read_to_string(out.join("emulated/storm.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Results>(&t).ok())
        .filter(|e| {
            e.hosts == r.storm.hosts
                && e.vms_per_host == r.storm.vms_per_host
                && e.link == r.storm.link
                && e.fanout == r.storm.fanout
        });
    fs::write(out.join("storm.json"), serde_json::to_string_pretty(&r)?)?;
    storm::plot::svgs(&r.storm, out)?;
    let md = markdown(&r);
    fs::write(out.join("README.md"), &md)?;
    println!("{md}");
    Ok(r)
}

/// `cargo xtask vagrant report`: the report again from results/testbed/
/// (after an emulated run at the same size landed in emulated/).
pub fn report(a: &Args) -> Result<()> {
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| root().join("results/testbed"));
    let text = fs::read_to_string(out.join("storm.json")).with_context(|| {
        format!(
            "no testbed storm in {}: run `cargo xtask vagrant bench`",
            out.display()
        )
    })?;
    write(serde_json::from_str(&text)?, &out).map(drop)
}

struct Measured {
    result: BaselineResult,
    lio_bytes: u64,
    lio_before_storm: u64,
    local_secs: Option<f64>,
    trace_requests: u64,
}

fn replay_cmd(a: &Args, uri: &str, start_ms: Option<i64>) -> String {
    let start = start_ms
        .map(|s| format!(" --start-at-ms {s}"))
        .unwrap_or_default();
    format!(
        "herd replay run --trace {DIR}/trace.profile --uri {uri} --vms {} --time-scale {} \
         --verify-seed {SEED} --json{start}",
        a.vms, a.time_scale
    )
}

/// The device of LIO's LUN 1 once open-iscsi is logged in.
const LUN1_DEVICE: &str = "$(iscsiadm -m session -P 3 | awk '/Lun: 1[[:space:]]*$/ {f=1} f && /Attached scsi disk/ {print \"/dev/\" $4; exit}')";

fn baseline(
    guests: &[Guest],
    a: &Args,
    fanout: usize,
    b: Baseline,
    image_bytes: u64,
) -> Result<Measured> {
    let hosts = guests.len() - 1;
    let (root, hs) = (&guests[0], &guests[1..]);
    let url = |g: &Guest| format!("nbd://{}:{PORT}/herd", g.node.ip);
    if b == Baseline::FullCopy {
        // Free space for the copy, and the LUN attached before the storm.
        for g in hs {
            let free: u64 = g
                .sh(&format!("df --output=avail -B1 {DIR} | tail -1"))?
                .trim()
                .parse()?;
            anyhow::ensure!(
                free > image_bytes + (64 << 20),
                "{} has {} MiB free in {DIR}; the full copy needs {} MiB",
                g.node.name,
                free >> 20,
                (image_bytes >> 20) + 64
            );
            g.sh(&format!(
                "modprobe iscsi_tcp && iscsiadm -m discovery -t sendtargets -p {ip}:3260 >/dev/null && \
                 iscsiadm -m node -T {IQN_LIO} -p {ip}:3260 --login >/dev/null && \
                 for i in $(seq 1 100); do d={LUN1_DEVICE}; [ -b \"$d\" ] && exit 0; sleep 0.2; done; \
                 echo 'LIO LUN 1 did not attach' >&2; exit 1",
                ip = root.node.ip
            ))?;
        }
    } else {
        let extra = if b == Baseline::TreePrefetch {
            format!("--profile {DIR}/trace.profile")
        } else {
            String::new()
        };
        root.start_herd(&[format!("iscsi://127.0.0.1/{IQN_LIO}/1")], &extra)?;
        wait_serving(&[root], Duration::from_secs(120))?;
        // Parents before children: index order is.
        for g in hs {
            let ups = if b == Baseline::AllFromRoot {
                vec![0]
            } else {
                storm::tree_upstreams(g.i, fanout)
            };
            let ups: Vec<String> = ups.iter().map(|&u| url(&guests[u])).collect();
            g.start_herd(&ups, "")?;
        }
        wait_serving(&hs.iter().collect::<Vec<_>>(), Duration::from_secs(120))?;
    }
    // Counters before.
    let cpu_before: Vec<(u64, u64)> = guests.iter().map(Guest::cpu).collect::<Result<_>>()?;
    let tx_before = root.tx_bytes()?;
    // What the root's herd had read from LIO before the storm: with a
    // profile it prefetches from the moment it starts, as in production.
    let lio_before_storm = if b == Baseline::FullCopy {
        0
    } else {
        prom_require(&root.metrics()?, "herd_upstream_read_bytes_total")?
    };
    // The storm: each host starts at the same instant, in its own clock,
    // 1.5 s from now as in the emulated storm (launching takes ~0.1 s a
    // host; a late launch only makes its VMs look slower).
    let start = i64::try_from(unix_ms())? + 1500;
    for g in hs {
        let at = start + g.offset_ms;
        let script = if b == Baseline::FullCopy {
            format!(
                "while [ $(date +%s%3N) -lt {at} ]; do sleep 0.02; done; \
                 dd if={LUN1_DEVICE} of={DIR}/copy.img bs=1M iflag=direct status=none && {}",
                replay_cmd(a, &format!("{DIR}/copy.img"), Some(at))
            )
        } else {
            replay_cmd(a, &format!("nbd://127.0.0.1:{PORT}/herd"), Some(at))
        };
        g.sh(&format!(
            "cat > {DIR}/storm.sh <<'EOF'\n{script}\nEOF\n\
             setsid sh {DIR}/storm.sh > {DIR}/replay.json 2> {DIR}/replay.log < /dev/null & echo started"
        ))?;
    }
    let pb = storm::boot_progress(hosts * a.vms, b);
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let mut done = vec![false; hosts];
    while done.iter().any(|d| !d) {
        std::thread::sleep(Duration::from_secs(2));
        let mut booted = 0;
        for (k, g) in hs.iter().enumerate() {
            // Whether the script ran is asked before the file is read: a
            // replay that writes its summary and exits between the two
            // reads must not look like one that died without it.
            let s = g.sh(&format!(
                "pgrep -f '[s]h {DIR}/storm.sh' >/dev/null && echo running || echo exited; \
                 grep -c end_ms {DIR}/replay.json; grep -c summary {DIR}/replay.json; true"
            ))?;
            let l: Vec<&str> = s.lines().collect();
            booted += l
                .get(1)
                .and_then(|x| x.trim().parse::<u64>().ok())
                .unwrap_or(0);
            let summary = l.get(2).is_some_and(|x| x.trim() != "0");
            if summary {
                done[k] = true;
            } else if l.first() == Some(&"exited") {
                let log = g.sh(&format!(
                    "tail -20 {DIR}/replay.log; tail -5 {DIR}/herd.log 2>/dev/null; true"
                ))?;
                bail!("{}'s replay stopped without a summary:\n{log}", g.node.name);
            }
        }
        pb.set_position(booted);
        if Instant::now() > deadline {
            bail!("the testbed storm did not finish within {} s", a.timeout);
        }
    }
    pb.finish_and_clear();
    // Counters after.
    let cpu_after: Vec<(u64, u64)> = guests.iter().map(Guest::cpu).collect::<Result<_>>()?;
    let root_link_bytes = root.tx_bytes()?.saturating_sub(tx_before);
    let mut boot = Vec::new();
    let (mut bytes, mut verified, mut errors, mut mismatches) = (0u64, 0u64, 0u64, 0u64);
    let mut replay_cpu = 0.0;
    let mut trace_requests = 0;
    for g in hs {
        let at = start + g.offset_ms;
        let text = g.sh(&format!("cat {DIR}/replay.json"))?;
        let mut vms = 0;
        for v in text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        {
            if let Some(s) = v.get("summary") {
                replay_cpu += s["cpu_secs"].as_f64().unwrap_or(0.0);
                trace_requests = s["trace_requests"].as_u64().unwrap_or(0);
                continue;
            }
            let end = v["end_ms"].as_i64().context("a VM line without end_ms")?;
            boot.push((end - at).max(0) as f64 / 1000.0);
            bytes += v["bytes"].as_u64().unwrap_or(0);
            verified += v["verified_bytes"].as_u64().unwrap_or(0);
            errors += v["errors"].as_u64().unwrap_or(0);
            mismatches += v["mismatches"].as_u64().unwrap_or(0);
            vms += 1;
        }
        anyhow::ensure!(
            vms == a.vms,
            "{} reported {vms} of {} VMs",
            g.node.name,
            a.vms
        );
    }
    boot.sort_by(f64::total_cmp);
    let makespan = boot.last().copied().unwrap_or(0.0);
    // Bytes by level, RSS, CPU and cache of the herds.
    let mut level_bytes: BTreeMap<usize, u64> = BTreeMap::new();
    let (mut rss, mut herd_cpu, mut cache_max) = (Vec::new(), 0.0, 0u64);
    let (root_egress, lio_bytes);
    let (mut parents_down, mut failovers) = (0, 0);
    if b == Baseline::FullCopy {
        // Every host read the whole LUN from LIO over the root's link.
        lio_bytes = image_bytes * hosts as u64;
        root_egress = lio_bytes;
    } else {
        let m = root.metrics()?;
        root_egress = prom_require(&m, "herd_served_bytes_total")?;
        lio_bytes = prom_require(&m, "herd_upstream_read_bytes_total")?;
        let (r, c) = root.herd_usage()?;
        rss.push(r);
        herd_cpu += c;
        for g in hs {
            let m = g.metrics()?;
            let level = if b == Baseline::AllFromRoot {
                1
            } else {
                storm::tree_level(g.i, fanout)
            };
            *level_bytes.entry(level).or_default() +=
                prom_require(&m, "herd_upstream_read_bytes_total")?;
            parents_down += prom_require(&m, "herd_upstream_down_total")?;
            failovers += prom_require(&m, "herd_upstream_failovers_total")?;
            let (r, c) = g.herd_usage()?;
            rss.push(r);
            herd_cpu += c;
        }
    }
    for g in hs {
        let kb: u64 = g
            .sh(&format!(
                "du -sk {DIR}/cache {DIR}/copy.img 2>/dev/null | awk '{{s+=$1}} END {{print s+0}}'"
            ))?
            .trim()
            .parse()
            .unwrap_or(0);
        cache_max = cache_max.max(kb * 1024);
    }
    // With the copy on host 1, the replay with all data local (the lower
    // bound's second term), measured in the same guest.
    let local_secs = if b == Baseline::FullCopy {
        let s = hs[0].sh(&replay_cmd(a, &format!("{DIR}/copy.img"), None))?;
        let sum = storm::summary_in(&s).context("the local replay printed no summary")?;
        anyhow::ensure!(
            sum["verified_bytes"].as_u64() == sum["bytes"].as_u64(),
            "the local replay did not verify every byte: {sum}"
        );
        Some(sum["boot_secs_max"].as_f64().context("boot_secs_max")?)
    } else {
        None
    };
    let busy: Vec<f64> = cpu_before
        .iter()
        .zip(&cpu_after)
        .map(|(b, a)| (a.0 - b.0) as f64 / (a.1 - b.1).max(1) as f64)
        .collect();
    let busy_ticks: u64 = cpu_before
        .iter()
        .zip(&cpu_after)
        .map(|(b, a)| a.0 - b.0)
        .sum();
    let levels = level_bytes.keys().max().copied().unwrap_or(0);
    Ok(Measured {
        result: BaselineResult {
            name: b.name().into(),
            hosts,
            vms: hosts * a.vms,
            boot_secs: boot,
            makespan_secs: makespan,
            extrapolated_makespan_secs: None,
            root_egress_bytes: root_egress,
            root_link_bytes,
            level_bytes: (1..=levels)
                .map(|l| level_bytes.get(&l).copied().unwrap_or(0))
                .collect(),
            peak_rss_bytes_max: rss.iter().copied().max().unwrap_or(0),
            peak_rss_bytes_mean: rss.iter().sum::<u64>() / rss.len().max(1) as u64,
            cache_bytes_max: cache_max,
            // Per guest over the storm: the mean of the guests, and the
            // busiest one (not a per-second peak).
            cpu_busy_mean: busy.iter().sum::<f64>() / busy.len().max(1) as f64,
            cpu_busy_peak: busy.iter().copied().fold(0.0, f64::max),
            cpu_secs_machine: busy_ticks as f64 / GUEST_HZ,
            cpu_secs_herd: herd_cpu,
            cpu_secs_replay: replay_cpu,
            bytes_read: bytes,
            verified_bytes: verified,
            errors,
            mismatches,
            prewarm_secs: None,
            real_vm_boot_secs: Vec::new(),
            killed_relay_at_secs: None,
            parents_down,
            failovers,
            vms_lost_with_killed_host: 0,
        },
        lio_bytes,
        lio_before_storm,
        local_secs,
        trace_requests,
    })
}

fn wait_serving(gs: &[&Guest], limit: Duration) -> Result<()> {
    let t = Instant::now();
    let mut pending: Vec<&&Guest> = gs.iter().collect();
    while !pending.is_empty() {
        pending.retain(|g| !g.serving());
        if let Some(g) = pending.first() {
            if t.elapsed() > limit {
                let log = g
                    .sh(&format!("tail -20 {DIR}/herd.log"))
                    .unwrap_or_default();
                bail!(
                    "{}'s bench herd does not serve after {} s:\n{log}",
                    g.node.name,
                    limit.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    Ok(())
}

fn mib(b: u64) -> f64 {
    b as f64 / 1_048_576.0
}

/// The testbed's table, beside the emulated fleet's at the same size.
#[must_use]
pub fn markdown(r: &TestbedStorm) -> String {
    use std::fmt::Write;
    let s0 = &r.storm;
    let mut s = String::new();
    let _ = writeln!(s, "# Boot storm on the Vagrant testbed\n");
    let _ = writeln!(
        s,
        "`cargo xtask vagrant bench` ({} guests under {}, 1 vCPU and {} MiB each, on a {}-core machine): a root \
         running LIO with the storm's {:.0} MiB synthetic image as LUN 1 and {} host nodes, every node's testbed \
         link shaped `tc tbf` {} (egress, inside the guest); {} replayed VMs per host ({} in all), each replaying \
         the recorded Debian boot (time scale {}), every byte checked. Bench tree: the root has one child, host 1; \
         fanout {} below it. herd: {} KiB chunks, no read-ahead.\n",
        r.nodes,
        if r.accel == "kvm" { "KVM" } else { "TCG" },
        r.guest_memory_mib,
        s0.cores,
        mib(s0.image_bytes),
        s0.hosts,
        s0.link,
        s0.vms_per_host,
        s0.hosts * s0.vms_per_host,
        s0.time_scale,
        r.fanout,
        s0.chunk_size / 1024
    );
    let _ = writeln!(
        s,
        "Working set {:.1} MiB ({:.1} MiB in whole chunks). Lower bound = working set ÷ link ({:.2} s) + the \
         replay with all data local, in a guest ({}) = **{:.2} s**.\n",
        mib(s0.working_set_bytes),
        mib(s0.working_set_chunks_bytes),
        s0.working_set_bytes as f64 / s0.link_bytes_per_s,
        if s0.local_replay_secs > 0.0 {
            format!("{:.2} s", s0.local_replay_secs)
        } else {
            "not measured: needs the full-copy baseline".into()
        },
        s0.lower_bound_secs
    );
    let _ = writeln!(
        s,
        "The bound is the storm bench's: transfer, then boot. Prefetch overlaps the two (the boot's think time \
         hides the transfer), so a prefetching tree can beat it; max(transfer, local replay) is the bound no \
         storm can beat. LIO → root counts what the root's herd read from LIO, in brackets what it had read \
         before the storm started (with a profile it prefetches from its start, as in production).\n"
    );
    let _ = writeln!(
        s,
        "| baseline | testbed makespan (s) | ÷ lower bound | emulated makespan (s) | ÷ lower bound | LIO → root (MiB) | \
         root egress (MiB) | per level (MiB) | herd peak RSS max (MiB) | guest CPU busy mean / max | verified (MiB) | errors / wrong |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for b in &s0.baselines {
        let em = r.emulated.as_ref().and_then(|e| {
            storm::report::find(e, &b.name).map(|x| (x.makespan_secs, e.lower_bound_secs))
        });
        let lb = s0.lower_bound_secs;
        let _ = writeln!(
            s,
            "| {} | {:.1} | {} | {} | {} | {:.1} ({:.1}) | {:.1} | {} | {:.1} | {:.0} % / {:.0} % | {:.1} | {} / {} |",
            b.name,
            b.makespan_secs,
            if s0.local_replay_secs > 0.0 {
                format!("{:.2}", b.makespan_secs / lb)
            } else {
                "–".into()
            },
            em.map_or("–".into(), |(m, _)| format!("{m:.1}")),
            em.map_or("–".into(), |(m, l)| format!("{:.2}", m / l)),
            mib(r.lio_bytes.get(&b.name).copied().unwrap_or(0)),
            mib(r.lio_bytes_before_storm.get(&b.name).copied().unwrap_or(0)),
            mib(b.root_egress_bytes),
            b.level_bytes
                .iter()
                .map(|x| format!("{:.1}", mib(*x)))
                .collect::<Vec<_>>()
                .join(" / "),
            mib(b.peak_rss_bytes_max),
            b.cpu_busy_mean * 100.0,
            b.cpu_busy_peak * 100.0,
            mib(b.verified_bytes),
            b.errors,
            b.mismatches
        );
    }
    s
}
