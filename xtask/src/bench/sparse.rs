//! `cargo xtask bench sparse`: a sparse image (4 GiB holding 300 MiB of
//! data by default) copied whole with `nbdcopy`, from nbdkit's file plugin
//! serving the file, and from a cold herd tree (root → relay → leaf), side
//! by side in interleaved rounds; then a leaf filled by `--prefetch full`.
//!
//! ```text
//!   nbdkit file IMG ─────────────────────────────▶ nbdcopy … null:
//!   nbdkit --filter=noextents file IMG ──────────▶ nbdcopy … null:   (hole-blind)
//!   herd root(IMG) ─▶ relay ─▶ leaf ─────────────▶ nbdcopy … null:   (cold, then warm)
//!   herd root(IMG) ─▶ relay ─▶ leaf --prefetch full                  (until full)
//! ```
//!
//! Reported per run: seconds and the bytes the root served, as ratios to
//! nbdkit's time and to the data. Results: `results/sparse/`.

use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::Procs;
use crate::demo::build_herd;
use crate::util::{
    free_port, http_get, median, output, prom_get, prom_require, root, run, step, work_dir,
};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 64 << 10;
/// Data lies in extents of this size, 4 KiB off a chunk boundary.
const EXTENT: u64 = 4 * MIB;

#[derive(clap::Args, Debug, Clone)]
pub struct Options {
    /// Image size in MiB.
    #[arg(long, default_value_t = 4096)]
    pub image_mib: u64,
    /// Data in the image, MiB (the rest is holes).
    #[arg(long, default_value_t = 300)]
    pub data_mib: u64,
    /// Interleaved rounds; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// 256 MiB holding 24 MiB, one round; checks, writes no results.
    #[arg(long)]
    pub quick: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Run {
    pub name: String,
    pub seconds: Vec<f64>,
    pub median_seconds: f64,
    /// Bytes the source served (herd: the root's image bytes; nbdkit: what
    /// nbdcopy read).
    pub root_bytes: Vec<u64>,
    /// Median root bytes over the bytes of data in the image.
    pub bytes_ratio: f64,
    /// The nbdkit run (file plugin, block status on) in the same image
    /// state (cold or cached) its time is compared with.
    pub baseline: String,
    /// Median seconds over the baseline's.
    pub time_ratio: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    pub version: u32,
    pub image_bytes: u64,
    pub data_bytes: u64,
    /// The data rounded out to 64 KiB chunks: what a chunk cache must move.
    pub data_chunk_bytes: u64,
    pub manifest_read_bytes: u64,
    pub manifest_seconds: f64,
    pub rounds: usize,
    pub runs: Vec<Run>,
}

fn wait_port(port: u16) -> Result<()> {
    crate::util::wait_port(port, Duration::from_secs(60))
}

/// Writes the sparse image: `data` bytes of pseudo-random data in
/// `EXTENT`-sized extents spread evenly, each 4 KiB past a chunk boundary.
fn make_image(path: &Path, size: u64, data: u64) -> Result<Vec<(u64, u64)>> {
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    let n = data.div_ceil(EXTENT).max(1);
    let stride = size / n / CHUNK * CHUNK;
    anyhow::ensure!(
        stride > EXTENT + CHUNK,
        "the image is too small for its data"
    );
    let mut extents = Vec::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut left = data;
    for i in 0..n {
        let len = left.min(EXTENT);
        let off = i * stride + 4096 * (1 + i % 15);
        let mut buf = vec![0u8; usize::try_from(len)?];
        for w in buf.chunks_mut(8) {
            // xorshift64: incompressible, and never a page of zeros.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
        }
        f.write_all_at(&buf, off)?;
        extents.push((off, len));
        left -= len;
    }
    f.sync_all()?;
    Ok(extents)
}

fn chunk_bytes(extents: &[(u64, u64)]) -> u64 {
    let mut chunks = std::collections::BTreeSet::new();
    for &(off, len) in extents {
        chunks.extend(off / CHUNK..(off + len).div_ceil(CHUNK));
    }
    chunks.len() as u64 * CHUNK
}

struct Bench {
    herd: PathBuf,
    image: PathBuf,
    manifest: PathBuf,
    scratch: PathBuf,
}

impl Bench {
    fn spawn(&self, cmd: &mut Command, log: &str) -> Result<Child> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.scratch.join(log))?)
            .spawn()
            .with_context(|| format!("cannot start {cmd:?}"))
    }

    /// A herd node on fresh ports with a fresh cache; (child, nbd port,
    /// metrics address).
    fn herd(&self, name: &str, upstream: &str, extra: &[&str]) -> Result<(Child, u16, SocketAddr)> {
        let (port, mport) = (free_port()?, free_port()?);
        let cache = self.scratch.join(format!("{name}-cache"));
        let _ = std::fs::remove_dir_all(&cache);
        let child = self.spawn(
            Command::new(&self.herd)
                .args(["serve", "--upstream", upstream, "--chunk-size", "64KiB"])
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .args(["--metrics", &format!("127.0.0.1:{mport}")])
                .arg("--cache-dir")
                .arg(&cache)
                .args(extra),
            &format!("{name}.log"),
        )?;
        wait_port(port)?;
        Ok((child, port, SocketAddr::from(([127, 0, 0, 1], mport))))
    }

    /// root → relay → leaf; returns the processes, the leaf's URL and the
    /// metrics of the root and the leaf.
    fn tree(&self, leaf_extra: &[&str]) -> Result<(Procs, String, SocketAddr, SocketAddr)> {
        let mut p = Procs::default();
        let manifest = self.manifest.to_str().context("utf8 path")?;
        let image = self.image.to_str().context("utf8 path")?;
        let (c, rport, rmet) = self.herd("root", image, &["--manifest", manifest])?;
        p.0.push(c);
        let (c, mport, _) = self.herd("relay", &format!("nbd://127.0.0.1:{rport}/herd"), &[])?;
        p.0.push(c);
        let (c, lport, lmet) =
            self.herd("leaf", &format!("nbd://127.0.0.1:{mport}/herd"), leaf_extra)?;
        p.0.push(c);
        Ok((p, format!("nbd://127.0.0.1:{lport}/herd"), rmet, lmet))
    }

    fn nbdkit(&self, filter: &[&str]) -> Result<(Procs, String)> {
        let port = free_port()?;
        let c = self.spawn(
            Command::new("nbdkit")
                .args(["-f", "-i", "127.0.0.1", "-p", &port.to_string()])
                .args(filter)
                .arg("file")
                .arg(&self.image),
            "nbdkit.log",
        )?;
        let p = Procs(vec![c]);
        wait_port(port)?;
        Ok((p, format!("nbd://127.0.0.1:{port}/")))
    }
}

fn copy(url: &str) -> Result<f64> {
    let t = Instant::now();
    run(Command::new("nbdcopy").args([url, "null:"]))?;
    Ok(t.elapsed().as_secs_f64())
}

fn metric(addr: SocketAddr, name: &str) -> Result<u64> {
    prom_require(&http_get(addr, "/metrics")?, name)
}

/// Waits until the leaf's full prefetch is done; returns the seconds.
fn prefetched(leaf: SocketAddr, started: Instant) -> Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let text = http_get(leaf, "/metrics")?;
        // Not yet exported counts as not done.
        let (done, total) = (
            prom_get(&text, "herd_prefetch_chunks_done"),
            prom_get(&text, "herd_prefetch_chunks_total"),
        );
        if let (Some(d), Some(t)) = (done, total) {
            if t > 0 && d == t {
                return Ok(started.elapsed().as_secs_f64());
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "prefetch at {done:?}/{total:?} chunks after 600 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

type Sample = (f64, u64);

const NBDKIT_COLD: &str = "nbdkit file, image cold";
const NBDKIT_CACHED: &str = "nbdkit file, image cached";

/// The image out of the page cache: the next reader goes to the disk.
fn drop_caches() -> Result<()> {
    run(&mut Command::new("sync"))?;
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("cannot drop the page cache (root?)")
}

/// One round of every run, in order: (name, baseline, sample).
fn round(
    b: &Bench,
    data_chunks: u64,
    image_bytes: u64,
) -> Result<Vec<(&'static str, &'static str, Sample)>> {
    let mut out = Vec::new();
    {
        let (_p, url) = b.nbdkit(&[])?;
        drop_caches()?;
        // nbdcopy asks for what block status calls data; counted as the
        // data chunks, as herd's are.
        out.push((NBDKIT_COLD, NBDKIT_COLD, (copy(&url)?, data_chunks)));
        out.push((NBDKIT_CACHED, NBDKIT_CACHED, (copy(&url)?, data_chunks)));
    }
    {
        let (_p, url) = b.nbdkit(&["--filter=noextents"])?;
        // Without block status nbdcopy reads every byte.
        out.push((
            "nbdkit file, no block status",
            NBDKIT_CACHED,
            (copy(&url)?, image_bytes),
        ));
    }
    {
        let mut p = Procs::default();
        let manifest = b.manifest.to_str().context("utf8 path")?;
        let image = b.image.to_str().context("utf8 path")?;
        let (c, port, met) = b.herd("alone", image, &["--manifest", manifest])?;
        p.0.push(c);
        drop_caches()?;
        let secs = copy(&format!("nbd://127.0.0.1:{port}/herd"))?;
        out.push((
            "herd root alone, image cold",
            NBDKIT_COLD,
            (secs, metric(met, "herd_served_bytes_total")?),
        ));
    }
    {
        let (_p, url, root, _) = b.tree(&[])?;
        drop_caches()?;
        let cold = copy(&url)?;
        let served = metric(root, "herd_served_bytes_total")?;
        out.push(("herd tree, image cold", NBDKIT_COLD, (cold, served)));
        let warm = copy(&url)?;
        let again = metric(root, "herd_served_bytes_total")? - served;
        out.push(("herd leaf, warm", NBDKIT_CACHED, (warm, again)));
    }
    {
        let started = Instant::now();
        let (_p, _url, root, leaf) = b.tree(&["--prefetch", "full"])?;
        let secs = prefetched(leaf, started)?;
        out.push((
            "herd prefetch full",
            NBDKIT_CACHED,
            (secs, metric(root, "herd_served_bytes_total")?),
        ));
    }
    Ok(out)
}

/// Runs the bench; in `--quick` mode only checks.
///
/// # Errors
/// A tool that fails, or (always) herd moving more than 1.05× the data.
pub fn run_bench(opts: &Options) -> Result<Results> {
    let (image_mib, data_mib, rounds) = if opts.quick {
        (256, 24, 1)
    } else {
        (opts.image_mib, opts.data_mib, opts.rounds.max(1))
    };
    let herd = build_herd()?;
    let scratch = work_dir("sparse");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let image = scratch.join("sparse.img");
    step(&format!(
        "writing a {image_mib} MiB image holding {data_mib} MiB of data"
    ));
    let extents = make_image(&image, image_mib * MIB, data_mib * MIB)?;
    let data_bytes: u64 = extents.iter().map(|e| e.1).sum();
    let data_chunk_bytes = chunk_bytes(&extents);
    let manifest = scratch.join("sparse.herd-manifest");
    let t = Instant::now();
    let built = output(
        Command::new(&herd)
            .args(["manifest", "build", "--json", "--out"])
            .arg(&manifest)
            .arg(&image),
    )?;
    let manifest_seconds = t.elapsed().as_secs_f64();
    let v: serde_json::Value = serde_json::from_str(built.trim())?;
    let manifest_read_bytes = v["read_bytes"].as_u64().context("read_bytes")?;
    let b = Bench {
        herd,
        image,
        manifest,
        scratch: scratch.clone(),
    };
    let mut samples: Vec<(&'static str, &'static str, Vec<Sample>)> = Vec::new();
    for r in 0..rounds {
        step(&format!("round {}/{rounds}", r + 1));
        for (name, base, s) in round(&b, data_chunk_bytes, image_mib * MIB)? {
            match samples.iter_mut().find(|(n, _, _)| *n == name) {
                Some((_, _, v)) => v.push(s),
                None => samples.push((name, base, vec![s])),
            }
        }
    }
    let median_of = |name: &str| {
        samples
            .iter()
            .find(|(n, _, _)| *n == name)
            .map_or(1.0, |(_, _, v)| {
                median(&v.iter().map(|s| s.0).collect::<Vec<_>>())
            })
    };
    #[allow(clippy::cast_precision_loss)]
    let runs: Vec<Run> = samples
        .iter()
        .map(|(name, base, v)| {
            let secs: Vec<f64> = v.iter().map(|s| s.0).collect();
            let bytes: Vec<f64> = v.iter().map(|s| s.1 as f64).collect();
            let m = median(&secs);
            Run {
                name: (*name).to_owned(),
                median_seconds: m,
                baseline: (*base).to_owned(),
                time_ratio: m / median_of(base).max(1e-9),
                bytes_ratio: median(&bytes) / data_bytes as f64,
                seconds: secs,
                root_bytes: v.iter().map(|s| s.1).collect(),
            }
        })
        .collect();
    let res = Results {
        version: 1,
        image_bytes: image_mib * MIB,
        data_bytes,
        data_chunk_bytes,
        manifest_read_bytes,
        manifest_seconds,
        rounds,
        runs,
    };
    validate(&res)?;
    println!("{}", report(&res));
    if !opts.quick {
        let out = root().join("results/sparse");
        std::fs::create_dir_all(&out)?;
        std::fs::write(out.join("sparse.json"), serde_json::to_string_pretty(&res)?)?;
        std::fs::write(out.join("README.md"), report(&res))?;
        step(&format!("results in {}", out.display()));
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(res)
}

/// What must hold in every run: herd moves the data chunks and no more
/// (≤ 1.05× the data, at least the data), the manifest read only them.
///
/// # Errors
/// The first figure out of bounds.
pub fn validate(r: &Results) -> Result<()> {
    anyhow::ensure!(
        r.manifest_read_bytes == r.data_chunk_bytes,
        "the manifest build read {} bytes for {} in data chunks",
        r.manifest_read_bytes,
        r.data_chunk_bytes
    );
    for name in [
        "herd root alone, image cold",
        "herd tree, image cold",
        "herd prefetch full",
    ] {
        let run = r
            .runs
            .iter()
            .find(|x| x.name == name)
            .with_context(|| format!("no `{name}` run"))?;
        for &b in &run.root_bytes {
            anyhow::ensure!(
                b == r.data_chunk_bytes,
                "{name}: the root served {b} bytes for {} in data chunks",
                r.data_chunk_bytes
            );
        }
        anyhow::ensure!(
            run.bytes_ratio <= 1.05,
            "{name}: {:.3}× the data",
            run.bytes_ratio
        );
    }
    Ok(())
}

#[allow(clippy::cast_precision_loss)]
fn report(r: &Results) -> String {
    let mib = |b: u64| b as f64 / MIB as f64;
    let mut s = format!(
        "# Sparse image: holes never move\n\n{:.0} MiB image, {:.0} MiB of data ({:.1} MiB in 64 KiB chunks), \
         {} round(s), medians. `cargo xtask bench sparse`.\n\n\
         Manifest build: read {:.1} MiB in {:.2} s (SEEK_DATA: only the data chunks).\n\n\
         | run | seconds | × nbdkit (same image state) | MiB from the source | × data |\n|---|---|---|---|---|\n",
        mib(r.image_bytes),
        mib(r.data_bytes),
        mib(r.data_chunk_bytes),
        r.rounds,
        mib(r.manifest_read_bytes),
        r.manifest_seconds
    );
    for run in &r.runs {
        let bytes = median(&run.root_bytes.iter().map(|&b| b as f64).collect::<Vec<_>>());
        s.push_str(&format!(
            "| {} | {:.2} | {:.2} | {:.1} | {:.3} |\n",
            run.name,
            run.median_seconds,
            run.time_ratio,
            bytes / MIB as f64,
            run.bytes_ratio
        ));
    }
    s
}
