//! `cargo xtask bench storm --fidelity`: how faithful is a replay? Boots the
//! real Debian VM (qemu, TCG) through a herd root that records what it
//! reads (`--record-profile`, no read-ahead), then replays that very trace
//! against the image file and through a herd root → leaf chain, and puts
//! the durations and byte/request counts side by side. `--save-trace`
//! keeps the recording as the storm's trace.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::demo::{self, Proxy};
use crate::image::{self, Kind};
use crate::util::{prom_require, raw_overlay, spinner, step};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fidelity {
    pub version: u32,
    pub accel: String,
    pub image_bytes: u64,
    /// The real boot (qemu, to the guest's boot marker).
    pub real_boot_secs: f64,
    /// Bytes and read requests the real VM sent to herd.
    pub real_bytes: u64,
    pub real_requests: u64,
    /// The trace: unique bytes, replay requests, think time.
    pub trace_bytes: u64,
    pub trace_requests: u64,
    pub trace_think_secs: f64,
    /// First to last read of the recording (the guest's power-off included):
    /// what a replay should last.
    pub trace_span_secs: f64,
    pub replay_local_secs: f64,
    pub replay_leaf_secs: f64,
    pub replay_leaf_bytes: u64,
}

fn summary(herd: &Path, trace: &Path, uri: &str, image: &Path) -> Result<serde_json::Value> {
    super::replay_summary(
        Command::new(herd)
            .args(["replay", "run", "--json", "--trace"])
            .arg(trace)
            .args(["--uri", uri, "--verify-image"])
            .arg(image),
        &format!("replay against {uri}"),
    )
}

/// Records a real boot and replays it; `save` copies the trace into the repo.
pub fn run(herd: &Path, dir: &Path, save: bool) -> Result<Fidelity> {
    crate::deps::ensure(crate::deps::PACKAGES)?;
    let disk = image::ensure(Kind::Debian)?;
    let size = std::fs::metadata(&disk.root)?.len();
    let accel = demo::auto_accel(&disk);
    let trace = dir.join("recorded.profile");
    let img = disk.root.display().to_string();
    let rec = Proxy::start_with(
        herd,
        dir,
        "rec",
        &img,
        "64KiB",
        "0",
        &["--record-profile", &trace.display().to_string()],
    )?;
    let ov = dir.join("rec.qcow2");
    raw_overlay(&ov, &rec.url(), size)?;
    let pb = spinner(format!(
        "booting the Debian VM through a recording herd ({accel})"
    ));
    let real = demo::boot(
        &disk,
        &ov,
        "qcow2",
        accel,
        std::time::Duration::from_secs(300),
        Some(&pb),
    )?;
    pb.finish_and_clear();
    let m = crate::util::http_get(
        std::net::SocketAddr::from(([127, 0, 0, 1], rec.metrics)),
        "/metrics",
    )?;
    let real_bytes = prom_require(&m, "herd_served_bytes_total")?;
    let real_requests = prom_require(&m, "herd_served_requests_total")?;
    rec.stop()?;
    step(&format!(
        "real boot: {real:.2} s, {:.1} MiB in {real_requests} requests",
        real_bytes as f64 / 1_048_576.0
    ));

    let local = summary(herd, &trace, &img, &disk.root)?;
    let r = Proxy::start(herd, dir, "fid-root", &img, "64KiB", "0")?;
    let l = Proxy::start(herd, dir, "fid-leaf", &r.url(), "64KiB", "0")?;
    let leaf = summary(herd, &trace, &l.url(), &disk.root)?;
    drop(l);
    drop(r);
    let f = |v: &serde_json::Value, k: &str| {
        v[k].as_f64().with_context(|| format!("summary lacks {k}"))
    };
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let fid = Fidelity {
        version: 1,
        accel: accel.into(),
        image_bytes: size,
        real_boot_secs: real,
        real_bytes,
        real_requests,
        trace_bytes: f(&local, "trace_bytes")? as u64,
        trace_requests: f(&local, "trace_requests")? as u64,
        trace_think_secs: f(&local, "think_secs")?,
        trace_span_secs: super::profile_extents(&trace)?
            .last()
            .map_or(0.0, |e| e.2 as f64 / 1e6),
        replay_local_secs: f(&local, "boot_secs_max")?,
        replay_leaf_secs: f(&leaf, "boot_secs_max")?,
        replay_leaf_bytes: f(&leaf, "bytes")? as u64,
    };
    if save {
        let dst = super::default_trace();
        std::fs::create_dir_all(dst.parent().context("trace path")?)?;
        std::fs::copy(&trace, &dst)?;
        step(&format!("trace saved to {}", dst.display()));
    }
    Ok(fid)
}
