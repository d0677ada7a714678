//! `cargo xtask bench rss`: a node's memory under load. A root serves a
//! 15 GiB image (a data block in every 64 KiB chunk, holes between, so it
//! is quick to write yet every chunk must be fetched and stored); a leaf
//! relays it, cold, to 64 fio clients (nbd engine, random reads of 4 KiB
//! to 1 MiB) and to one more client that sends reads and never reads the
//! replies. The leaf's and the root's resident memory are sampled through
//! the run; their peaks (VmHWM) are reported beside the target the
//! hardening issue sets: 64 MiB + the bitmap.
//!
//! ```text
//!   herd root (image) ─▶ herd leaf ─▶ 64 × fio nbd + 1 client that stops reading
//! ```
//!
//! Results: `results/rss/`.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::Procs;
use crate::demo::build_herd;
use crate::util::{free_port, http_get, output, prom_require, root, step, work_dir};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 64 << 10;

#[derive(clap::Args, Debug, Clone)]
pub struct Options {
    /// Image size in GiB.
    #[arg(long, default_value_t = 15)]
    pub image_gib: u64,
    /// fio clients (one connection each).
    #[arg(long, default_value_t = 64)]
    pub clients: u32,
    /// Seconds of load.
    #[arg(long, default_value_t = 30)]
    pub seconds: u64,
    /// 1 GiB, 8 clients, 5 s; checks, writes no results.
    #[arg(long)]
    pub quick: bool,
    /// A `herd serve` flag for both nodes (repeat; e.g. `--herd-arg=--reply-buffer=8MiB`).
    /// Results then go to `results/rss/tuned/`.
    #[arg(long = "herd-arg", allow_hyphen_values = true)]
    pub herd_args: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    /// Highest VmRSS seen while sampling, and the kernel's VmHWM at the end.
    pub rss_peak_mib: f64,
    pub hwm_mib: f64,
    /// The cache bitmap (a bit per chunk) and the manifest (32 bytes of
    /// digest per chunk plus its allocation map) in memory.
    pub bitmap_mib: f64,
    pub manifest_mib: f64,
    /// herd's own account of reply and fetch buffers at their peaks.
    pub reply_buffer_peak_mib: f64,
    pub fetch_buffer_peak_mib: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    pub version: u32,
    pub image_gib: u64,
    pub clients: u32,
    pub seconds: u64,
    /// What the fio clients read from the leaf, MiB/s in all.
    pub client_mib_s: f64,
    /// Bytes the leaf fetched from the root.
    pub fetched_mib: f64,
    pub target_mib: f64,
    /// Flags given to both nodes beyond the defaults.
    pub herd_args: Vec<String>,
    pub nodes: Vec<Node>,
}

/// A 4 KiB pseudo-random block at the start of every chunk, holes between:
/// every chunk holds data (none is the zero chunk), the file takes 1/16 of
/// its size on disk and writes in seconds.
fn make_image(path: &Path, size: u64) -> Result<()> {
    let stamp = path.with_extension("done");
    if stamp.exists() && std::fs::metadata(path).map(|m| m.len()).ok() == Some(size) {
        return Ok(());
    }
    step(&format!("writing a {} GiB image", size >> 30));
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut block = vec![0u8; 4096];
    for c in 0..size / CHUNK {
        for w in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all_at(&block, c * CHUNK)?;
    }
    f.sync_all()?;
    std::fs::write(stamp, b"")?;
    Ok(())
}

/// VmRSS and VmHWM of `pid`, MiB.
fn rss(pid: u32) -> Option<(f64, f64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |k: &str| -> Option<f64> {
        let l = s.lines().find(|l| l.starts_with(k))?;
        let kb: f64 = l.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn herd(
    bin: &Path,
    scratch: &Path,
    name: &str,
    upstream: &str,
    extra: &[String],
) -> Result<(Child, u16, SocketAddr)> {
    let (port, mport) = (free_port()?, free_port()?);
    let cache = scratch.join(format!("{name}-cache"));
    let _ = std::fs::remove_dir_all(&cache);
    let child = Command::new(bin)
        .args(["serve", "--upstream", upstream, "--chunk-size", "64KiB"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics", &format!("127.0.0.1:{mport}")])
        .arg("--cache-dir")
        .arg(&cache)
        // The 64 clients come from one address.
        .args(["--max-connections-per-client", "128"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(scratch.join(format!("{name}.log")))?)
        .spawn()
        .context("cannot start herd")?;
    // The root hashes the whole image before it listens.
    crate::util::wait_port(port, Duration::from_secs(600))?;
    Ok((child, port, SocketAddr::from(([127, 0, 0, 1], mport))))
}

/// Sends `n` reads of 60 KiB (copied replies, not sendfile'd) and never
/// reads a reply: it must cost the leaf no more than its reply budget.
fn stuck_client(port: u16, n: u64, size: u64) -> Result<TcpStream> {
    use std::io::Read;
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    let mut g = [0u8; 18];
    s.read_exact(&mut g)?;
    let mut out = 3u32.to_be_bytes().to_vec();
    let req = herd::nbd::proto::InfoRequest {
        name: "herd".into(),
        infos: vec![],
    };
    herd::nbd::proto::encode_option(
        herd::nbd::proto::OPT_GO,
        &herd::nbd::proto::encode_info_request(&req),
        &mut out,
    );
    s.write_all(&out)?;
    // Option replies up to the ACK.
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h)?;
        let r = herd::nbd::proto::decode_option_reply_header(&h)?;
        let mut p = vec![0u8; r.len as usize];
        s.read_exact(&mut p)?;
        if r.reply == herd::nbd::proto::REP_ACK {
            break;
        }
        anyhow::ensure!(
            r.reply & herd::nbd::proto::REP_FLAG_ERROR == 0,
            "GO refused"
        );
    }
    let len = 60 << 10;
    let mut reqs = Vec::new();
    for i in 0..n {
        herd::nbd::proto::encode_request(
            &herd::nbd::proto::Request {
                flags: 0,
                command: herd::nbd::proto::CMD_READ,
                handle: i,
                offset: (i * 7919 * CHUNK) % (size - len),
                length: u32::try_from(len)?,
            },
            &mut reqs,
        );
    }
    s.write_all(&reqs)?;
    Ok(s)
}

pub fn run_bench(opts: &Options) -> Result<Results> {
    crate::deps::ensure(&["fio"])?;
    let (gib, clients, seconds) = if opts.quick {
        (1, 8, 5)
    } else {
        (opts.image_gib, opts.clients, opts.seconds)
    };
    let size = gib << 30;
    let bin = build_herd()?;
    let scratch = work_dir("bench-rss");
    std::fs::create_dir_all(&scratch)?;
    let image = scratch.join(format!("image-{gib}G.raw"));
    make_image(&image, size)?;
    let mut procs = Procs::default();
    step("starting the root (it hashes the image) and the leaf");
    let extra = &opts.herd_args;
    let (c, rport, rmet) = herd(
        &bin,
        &scratch,
        "root",
        image.to_str().context("utf8")?,
        extra,
    )?;
    let root_pid = c.id();
    procs.0.push(c);
    let (c, lport, lmet) = herd(
        &bin,
        &scratch,
        "leaf",
        &format!("nbd://127.0.0.1:{rport}/herd"),
        extra,
    )?;
    let leaf_pid = c.id();
    procs.0.push(c);

    // Sample both nodes' RSS while the load runs.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut peak = (0.0f64, 0.0f64);
            while !stop.load(Ordering::Acquire) {
                if let Some((r, _)) = rss(leaf_pid) {
                    peak.0 = peak.0.max(r);
                }
                if let Some((r, _)) = rss(root_pid) {
                    peak.1 = peak.1.max(r);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        })
    };
    let _stuck = stuck_client(lport, 4000, size)?;
    step(&format!(
        "{clients} fio clients for {seconds} s, and one that stops reading"
    ));
    let started = Instant::now();
    let out = output(
        Command::new("fio")
            .args([
                "--name=rss",
                "--ioengine=nbd",
                "--rw=randread",
                "--bsrange=4k-1m",
                "--iodepth=2",
                "--group_reporting",
                "--output-format=json",
                "--time_based",
                "--randrepeat=0",
            ])
            .arg(format!("--uri=nbd://127.0.0.1:{lport}/herd"))
            .arg(format!("--numjobs={clients}"))
            .arg(format!("--runtime={seconds}")),
    )?;
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Release);
    let (leaf_peak, root_peak) = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("sampler panicked"))?;
    let json = &out[out.find('{').context("fio printed no JSON")?..];
    let v: serde_json::Value = serde_json::from_str(json).context("fio JSON")?;
    let client_mib_s = v["jobs"][0]["read"]["bw_bytes"]
        .as_f64()
        .context("fio JSON lacks read bandwidth")?
        / MIB as f64;
    anyhow::ensure!(
        client_mib_s > 0.0,
        "the clients read nothing in {elapsed:.0} s"
    );

    let chunks = size / CHUNK;
    let bitmap_mib = (chunks.div_ceil(8)) as f64 / MIB as f64;
    // Digests (32 B a chunk) and the allocation map (a bit per 4 KiB).
    let manifest_mib = (chunks * 32 + (size / 4096).div_ceil(8)) as f64 / MIB as f64;
    let mut nodes = Vec::new();
    let leaf_metrics = http_get(lmet, "/metrics")?;
    let fetched_mib =
        prom_require(&leaf_metrics, "herd_upstream_read_bytes_total")? as f64 / MIB as f64;
    for (name, pid, peak, met) in [
        ("leaf", leaf_pid, leaf_peak, lmet),
        ("root", root_pid, root_peak, rmet),
    ] {
        let m = http_get(met, "/metrics")?;
        let (_, hwm) = rss(pid).context("the node exited")?;
        nodes.push(Node {
            name: name.into(),
            rss_peak_mib: peak,
            hwm_mib: hwm,
            bitmap_mib,
            manifest_mib,
            reply_buffer_peak_mib: prom_require(&m, "herd_reply_buffer_bytes_peak")? as f64
                / MIB as f64,
            fetch_buffer_peak_mib: prom_require(&m, "herd_cache_unpersisted_bytes_peak")? as f64
                / MIB as f64,
        });
    }
    drop(procs);
    let r = Results {
        version: 1,
        image_gib: gib,
        clients,
        seconds,
        client_mib_s,
        fetched_mib,
        target_mib: 64.0 + bitmap_mib,
        herd_args: opts.herd_args.clone(),
        nodes,
    };
    let table = report(&r);
    println!("{table}");
    if !opts.quick {
        let dir = if r.herd_args.is_empty() {
            root().join("results/rss")
        } else {
            root().join("results/rss/tuned")
        };
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("rss.json"), serde_json::to_string_pretty(&r)?)?;
        std::fs::write(dir.join("README.md"), &table)?;
    }
    Ok(r)
}

fn report(r: &Results) -> String {
    let mut s = format!(
        "# Memory under load\n\n`cargo xtask bench rss`: a root serves a {} GiB image, a leaf relays it (cold) to \
         {} fio clients (nbd engine, random reads of 4 KiB–1 MiB, QD2 each) for {} s, plus one client that \
         sends 4000 reads and never reads a reply. The clients read {:.0} MiB/s in all; the leaf fetched \
         {:.0} MiB from the root. Default limits: {} MiB of replies per connection, {} MiB in all, {} MiB of \
         fetched bytes waiting for the disk{}.\n\n\
         Target (hardening issue): RSS ≤ 64 MiB + the bitmap = **{:.1} MiB**.\n\n\
         | node | peak RSS (sampled, MiB) | VmHWM (MiB) | ÷ target | bitmap (MiB) | manifest (MiB) | reply buffers at peak (MiB) | fetch buffer at peak (MiB) |\n\
         |---|---|---|---|---|---|---|---|\n",
        r.image_gib,
        r.clients,
        r.seconds,
        r.client_mib_s,
        r.fetched_mib,
        herd::export::nbd::limits::DEFAULT_CONNECTION_BUFFER >> 20,
        herd::export::nbd::limits::DEFAULT_SERVER_BUFFER >> 20,
        herd::cache::DEFAULT_FETCH_BUFFER >> 20,
        if r.herd_args.is_empty() {
            String::new()
        } else {
            format!("; both nodes also given `{}`", r.herd_args.join(" "))
        },
        r.target_mib
    );
    for n in &r.nodes {
        s.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} |\n",
            n.name,
            n.rss_peak_mib,
            n.hwm_mib,
            n.hwm_mib / r.target_mib,
            n.bitmap_mib,
            n.manifest_mib,
            n.reply_buffer_peak_mib,
            n.fetch_buffer_peak_mib
        ));
    }
    s
}
