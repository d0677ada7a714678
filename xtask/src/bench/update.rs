//! `cargo xtask bench update`: a rolling update through a warm three-level
//! tree. A 1 GiB image (by default) is read whole through root → relay →
//! leaf; then 5 % of its 64 KiB chunks change, the new file is renamed
//! into place and the root gets SIGHUP. Measured: how long the new version
//! takes to reach the leaf, the bytes each link moves while the leaf reads
//! the new version whole, what the leaf took from its old version's cache,
//! and the leaf's cache on disk before and after the old version retires.
//!
//! ```text
//!   herd root(IMG) ─▶ relay ─▶ leaf ──▶ nbdcopy … null:   (warm the tree: version A)
//!   mv B IMG; kill -HUP root            (version B published, goes down the tree)
//!   leaf ──▶ nbdcopy … null:            (all of B: only changed chunks move)
//! ```
//!
//! The baseline is what an update cost before versions: a new tree with
//! cold caches, which moves the whole image again (the first read's
//! bytes).
//!
//! Then the two versions as two images of one tree (a root serving both
//! files, a leaf with both): the leaf reads both whole, and its disk is
//! measured against the two images' sizes (what it held before chunks
//! were shared between images). Results: `results/update/`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::Procs;
use crate::demo::build_herd;
use crate::util::{free_port, http_get, prom_require, root, run, step, work_dir};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 64 << 10;

#[derive(clap::Args, Debug, Clone)]
pub struct Options {
    /// Image size in MiB.
    #[arg(long, default_value_t = 1024)]
    pub image_mib: u64,
    /// Share of the image's chunks the update changes, in percent.
    #[arg(long, default_value_t = 5.0)]
    pub changed_percent: f64,
    /// 64 MiB; checks, writes no results.
    #[arg(long)]
    pub quick: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    pub version: u32,
    pub image_bytes: u64,
    pub changed_chunks: u64,
    pub changed_bytes: u64,
    /// Reading version A whole through the cold tree.
    pub cold_read_seconds: f64,
    /// Bytes the root served for it: what a new tree moves again.
    pub cold_root_bytes: u64,
    /// SIGHUP to the leaf serving two versions.
    pub propagate_seconds: f64,
    /// Reading version B whole at the leaf, after it arrived.
    pub update_read_seconds: f64,
    /// Bytes the root and the relay served during the update.
    pub update_root_bytes: u64,
    pub update_relay_bytes: u64,
    /// Bytes the leaf's B took from its A instead of the relay.
    pub leaf_seeded_bytes: u64,
    /// Update root bytes over the changed chunks' bytes (target ≤ 1.1).
    pub moved_ratio: f64,
    /// Update root bytes over a cold tree's (what an update cost before).
    pub vs_new_tree: f64,
    /// The leaf's cache directory on disk (allocated bytes), with both
    /// versions and after A retired.
    pub leaf_disk_both: u64,
    pub leaf_disk_after: u64,
    /// Two images (A and B) read whole at one leaf: its cache on disk,
    /// the bytes it fetched for B, and what B read from A's cache.
    pub twins_disk: u64,
    pub twins_b_fetched: u64,
    pub twins_b_shared: u64,
    /// Disk saved against storing both images whole.
    pub twins_saved: f64,
}

struct Bench {
    herd: PathBuf,
    scratch: PathBuf,
}

impl Bench {
    /// A herd node; (child, nbd port, metrics address).
    fn herd(&self, name: &str, upstream: &str) -> Result<(Child, u16, SocketAddr)> {
        self.herd_with(name, &["--upstream", upstream])
    }

    /// A herd node of `[[image]]` tables: (name, upstream) each.
    fn herd_of(&self, name: &str, images: &[(&str, String)]) -> Result<(Child, u16, SocketAddr)> {
        let text: String = images
            .iter()
            .map(|(n, up)| format!("[[image]]\nname = \"{n}\"\nupstream = \"{up}\"\n"))
            .collect();
        let path = self.scratch.join(format!("{name}.toml"));
        std::fs::write(&path, text)?;
        self.herd_with(name, &["--config", path.to_str().context("utf8 path")?])
    }

    fn herd_with(&self, name: &str, source: &[&str]) -> Result<(Child, u16, SocketAddr)> {
        let (port, mport) = (free_port()?, free_port()?);
        let cache = self.scratch.join(format!("{name}-cache"));
        let child = Command::new(&self.herd)
            .arg("serve")
            .args(source)
            .args(["--chunk-size", "64KiB"])
            // The old version outlives the new one's reading and seeding
            // (seconds), so the disk with both is measured.
            .args(["--read-ahead", "0", "--retire-after", "10"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics", &format!("127.0.0.1:{mport}")])
            .arg("--cache-dir")
            .arg(&cache)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(
                self.scratch.join(format!("{name}.log")),
            )?)
            .spawn()
            .context("cannot start herd")?;
        crate::util::wait_port(port, Duration::from_secs(120))?;
        Ok((child, port, SocketAddr::from(([127, 0, 0, 1], mport))))
    }
}

fn metric(addr: SocketAddr, name: &str) -> Result<u64> {
    prom_require(&http_get(addr, "/metrics")?, name)
}

/// Polls `addr` until `name` is `want` (at most 10 minutes).
fn wait_metric(addr: SocketAddr, name: &str, want: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if metric(addr, name)? == want {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{name} is not {want} after 600 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn copy(url: &str) -> Result<f64> {
    let t = Instant::now();
    run(Command::new("nbdcopy").args([url, "null:"]))?;
    Ok(t.elapsed().as_secs_f64())
}

/// Allocated bytes under `dir`.
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.blocks() * 512,
                Err(_) => {}
            }
        }
    }
    total
}

/// Pseudo-random bytes (xorshift64): incompressible, never zeros.
fn fill(buf: &mut [u8], mut x: u64) {
    for w in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
    }
}

/// Runs the bench; in `--quick` mode only checks.
///
/// # Errors
/// A tool that fails, or (always) an update that moves more than 1.1× the
/// changed chunks from the root.
pub fn run_bench(opts: &Options) -> Result<Results> {
    let image_mib = if opts.quick { 64 } else { opts.image_mib };
    let size = image_mib * MIB;
    let chunks = size / CHUNK;
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let changed = ((chunks as f64 * opts.changed_percent / 100.0).round() as u64).clamp(1, chunks);
    let herd = build_herd()?;
    let scratch = work_dir("update");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let image = scratch.join("golden.img");
    step(&format!("writing a {image_mib} MiB image"));
    let mut a = vec![0u8; usize::try_from(size)?];
    fill(&mut a, 0x9e37_79b9_7f4a_7c15);
    std::fs::write(&image, &a)?;
    let b = Bench {
        herd,
        scratch: scratch.clone(),
    };
    let mut p = Procs::default();
    let img = image.to_str().context("utf8 path")?;
    let (c, rport, rmet) = b.herd("root", img)?;
    p.0.push(c);
    let (c, mport, mmet) = b.herd("relay", &format!("nbd://127.0.0.1:{rport}/herd"))?;
    p.0.push(c);
    let (c, lport, lmet) = b.herd("leaf", &format!("nbd://127.0.0.1:{mport}/herd"))?;
    p.0.push(c);
    let leaf_url = format!("nbd://127.0.0.1:{lport}/herd");
    step("reading version A through the cold tree");
    let cold_read_seconds = copy(&leaf_url)?;
    let cold_root_bytes = metric(rmet, "herd_served_bytes_total")?;

    step(&format!(
        "changing {changed} of {chunks} chunks; SIGHUP to the root"
    ));
    let stride = chunks / changed;
    for k in 0..changed {
        let c = usize::try_from(k * stride + stride / 2)?;
        let at = c * usize::try_from(CHUNK)?;
        fill(&mut a[at..at + 4096], 0x1234_5678 + k);
    }
    let next = scratch.join("golden.img.new");
    std::fs::write(&next, &a)?;
    drop(a);
    // Version A's file stays, for the two-image leaf at the end.
    let old = scratch.join("a.img");
    std::fs::hard_link(&image, &old)?;
    std::fs::rename(&next, &image)?;
    let (root_before, relay_before) = (
        metric(rmet, "herd_served_bytes_total")?,
        metric(mmet, "herd_served_bytes_total")?,
    );
    let pid = p.0[0].id().to_string();
    let t = Instant::now();
    run(Command::new("kill").args(["-HUP", &pid]))?;
    wait_metric(lmet, "herd_image_versions", 2)?;
    let propagate_seconds = t.elapsed().as_secs_f64();
    step("reading version B at the leaf");
    let update_read_seconds = copy(&leaf_url)?;
    let update_root_bytes = metric(rmet, "herd_served_bytes_total")? - root_before;
    let update_relay_bytes = metric(mmet, "herd_served_bytes_total")? - relay_before;
    // What clients did not read of B is copied in the background.
    wait_metric(
        lmet,
        "herd_version_seeded_bytes_total",
        size - changed * CHUNK,
    )?;
    let leaf_seeded_bytes = metric(lmet, "herd_version_seeded_bytes_total")?;
    let leaf_cache = scratch.join("leaf-cache");
    let leaf_disk_both = disk_usage(&leaf_cache);
    step("waiting for version A to retire");
    for m in [lmet, mmet, rmet] {
        wait_metric(m, "herd_image_versions", 1)?;
    }
    // The retired cache is removed once its last holder lets go.
    std::thread::sleep(Duration::from_secs(1));
    let leaf_disk_after = disk_usage(&leaf_cache);
    drop(p);

    step("two images, A and B, read whole at one leaf");
    let mut p = Procs::default();
    let file = |f: &Path| f.to_str().map(str::to_owned).context("utf8 path");
    let (c, rport, _) = b.herd_of("root2", &[("a", file(&old)?), ("b", file(&image)?)])?;
    p.0.push(c);
    let parent = |n: &str| format!("nbd://127.0.0.1:{rport}/{n}");
    let (c, tport, tmet) = b.herd_of("twins", &[("a", parent("a")), ("b", parent("b"))])?;
    p.0.push(c);
    copy(&format!("nbd://127.0.0.1:{tport}/a"))?;
    copy(&format!("nbd://127.0.0.1:{tport}/b"))?;
    let twins_b_fetched = metric(tmet, "herd_upstream_read_bytes_total{image=\"b\"}")?;
    let twins_b_shared = metric(tmet, "herd_cache_shared_bytes_total{image=\"b\"}")?;
    drop(p);
    let twins_disk = disk_usage(&scratch.join("twins-cache"));
    let changed_bytes = changed * CHUNK;
    #[allow(clippy::cast_precision_loss)]
    let res = Results {
        version: 2,
        image_bytes: size,
        changed_chunks: changed,
        changed_bytes,
        cold_read_seconds,
        cold_root_bytes,
        propagate_seconds,
        update_read_seconds,
        update_root_bytes,
        update_relay_bytes,
        leaf_seeded_bytes,
        moved_ratio: update_root_bytes as f64 / changed_bytes as f64,
        vs_new_tree: update_root_bytes as f64 / cold_root_bytes.max(1) as f64,
        leaf_disk_both,
        leaf_disk_after,
        twins_disk,
        twins_b_fetched,
        twins_b_shared,
        twins_saved: 1.0 - twins_disk as f64 / (2 * size) as f64,
    };
    validate(&res)?;
    println!("{}", report(&res));
    if !opts.quick {
        let out = root().join("results/update");
        std::fs::create_dir_all(&out)?;
        std::fs::write(out.join("update.json"), serde_json::to_string_pretty(&res)?)?;
        std::fs::write(out.join("README.md"), report(&res))?;
        step(&format!("results in {}", out.display()));
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(res)
}

/// What must hold in every run: every changed chunk moved from the root
/// and from the relay, and no more than 1.1× them; the leaf took every
/// other byte from its old version; the old version's cache went.
///
/// # Errors
/// The first figure out of bounds.
pub fn validate(r: &Results) -> Result<()> {
    for (link, bytes) in [
        ("root", r.update_root_bytes),
        ("relay", r.update_relay_bytes),
    ] {
        anyhow::ensure!(
            bytes >= r.changed_bytes && r.moved_ratio <= 1.1,
            "the {link} served {bytes} bytes for {} changed",
            r.changed_bytes
        );
    }
    anyhow::ensure!(
        r.leaf_seeded_bytes == r.image_bytes - r.changed_bytes,
        "the leaf took {} bytes from its old version, not {}",
        r.leaf_seeded_bytes,
        r.image_bytes - r.changed_bytes
    );
    anyhow::ensure!(
        r.cold_root_bytes == r.image_bytes,
        "the cold read moved {} bytes from the root",
        r.cold_root_bytes
    );
    anyhow::ensure!(
        r.leaf_disk_after < r.leaf_disk_both,
        "the leaf's cache did not shrink when A retired ({} → {} bytes)",
        r.leaf_disk_both,
        r.leaf_disk_after
    );
    // B's cache holds the changed chunks only; the rest it reads from A's.
    anyhow::ensure!(
        r.twins_b_fetched == r.changed_bytes && r.twins_b_shared == r.image_bytes - r.changed_bytes,
        "the two-image leaf fetched {} bytes of B and shared {}, not {} and {}",
        r.twins_b_fetched,
        r.twins_b_shared,
        r.changed_bytes,
        r.image_bytes - r.changed_bytes
    );
    anyhow::ensure!(
        r.twins_disk < r.image_bytes + r.changed_bytes + 4 * MIB,
        "the two-image leaf holds {} bytes for {} + {} of content",
        r.twins_disk,
        r.image_bytes,
        r.changed_bytes
    );
    Ok(())
}

#[allow(clippy::cast_precision_loss)]
fn report(r: &Results) -> String {
    let mib = |b: u64| b as f64 / MIB as f64;
    format!(
        "# Rolling update through a warm tree\n\n\
         {:.0} MiB image, {} of {} 64 KiB chunks changed ({:.1} MiB), root → relay → leaf. \
         `cargo xtask bench update`.\n\n\
         | step | seconds | MiB from the root | MiB from the relay |\n|---|---|---|---|\n\
         | version A, cold tree, read whole at the leaf | {:.2} | {:.1} | |\n\
         | SIGHUP → the leaf serves version B | {:.2} | | |\n\
         | version B read whole at the leaf | {:.2} | {:.2} | {:.2} |\n\n\
         - Moved by the update: **{:.3}× the changed chunks** from the root (target ≤ 1.1), \
         {:.4}× what a new tree with cold caches moves again.\n\
         - The leaf took {:.1} MiB of B from its cache of A, read locally.\n\
         - The leaf's cache on disk: {:.1} MiB with both versions, {:.1} MiB after A retired.\n\n\
         ## Two similar images on one leaf\n\n\
         A and B as two images (`[[image]]` tables) of one root → leaf tree, both read whole \
         at the leaf: its cache holds **{:.1} MiB** for {:.1} MiB of images \
         (**{:.1} % saved**); B fetched {:.1} MiB (its changed chunks) and read {:.1} MiB \
         from A's cache.\n",
        mib(r.image_bytes),
        r.changed_chunks,
        r.image_bytes / CHUNK,
        mib(r.changed_bytes),
        r.cold_read_seconds,
        mib(r.cold_root_bytes),
        r.propagate_seconds,
        r.update_read_seconds,
        mib(r.update_root_bytes),
        mib(r.update_relay_bytes),
        r.moved_ratio,
        r.vs_new_tree,
        mib(r.leaf_seeded_bytes),
        mib(r.leaf_disk_both),
        mib(r.leaf_disk_after),
        mib(r.twins_disk),
        mib(2 * r.image_bytes),
        100.0 * r.twins_saved,
        mib(r.twins_b_fetched),
        mib(r.twins_b_shared),
    )
}
