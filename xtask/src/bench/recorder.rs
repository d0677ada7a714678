//! `cargo xtask bench recorder`: how many reads per second the eBPF
//! recorder keeps up with, and whether it drops any. fio (io_uring, 4 KiB
//! random reads, 2 jobs × QD32) reads a sparse file through the page cache
//! (`--file`: every page added is an event) and a loop device over it
//! with O_DIRECT (`--device`: every request is an event); no disk I/O, so
//! the event rate is the tracepoints' and the ring's, not the disk's.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::util::{output, root, step, work_dir};

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Seconds per run.
    #[arg(long, default_value_t = 8)]
    pub seconds: u64,
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub target: &'static str,
    pub events: u64,
    pub drops: u64,
    pub events_per_second: f64,
}

fn record(
    herd: &Path,
    target: &[&str],
    fio_file: &str,
    direct: bool,
    secs: u64,
) -> Result<(u64, u64, f64)> {
    let out = work_dir("bench-recorder/out.profile");
    let text = output(
        Command::new(herd)
            .arg("record")
            .args(target)
            .arg("--out")
            .arg(&out)
            .args([
                "--json",
                "--",
                "fio",
                "--name=r",
                "--rw=randread",
                "--bs=4k",
            ])
            .arg(format!("--filename={fio_file}"))
            .args([
                "--ioengine=io_uring",
                "--iodepth=32",
                "--numjobs=2",
                "--readonly",
            ])
            .arg(format!("--direct={}", u8::from(direct)))
            .args([
                "--time_based",
                &format!("--runtime={secs}"),
                "--output-format=terse",
            ]),
    )?;
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("herd record printed no JSON")?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    Ok((
        v["events"].as_u64().unwrap_or(0),
        v["drops"].as_u64().unwrap_or(0),
        v["events_per_second"].as_f64().unwrap_or(0.0),
    ))
}

pub fn run_bench(o: &Options) -> Result<Vec<Row>> {
    crate::deps::ensure(&["fio"])?;
    crate::ebpf::build()?;
    let herd = crate::demo::build_herd()?;
    let dir = work_dir("bench-recorder");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("sparse.img");
    std::fs::File::create(&file)?.set_len(4 << 30)?;
    let f = file.display().to_string();
    let mut rows = Vec::new();
    let (events, drops, rate) = record(&herd, &["--file", &f], &f, false, o.seconds)?;
    rows.push(Row {
        target: "file (page cache)",
        events,
        drops,
        events_per_second: rate,
    });
    let dev = output(Command::new("losetup").args(["-r", "-f", "--show", &f]))?;
    let dev = dev.trim().to_owned();
    let res = record(&herd, &["--device", &dev], &dev, true, o.seconds);
    let _ = Command::new("losetup").args(["-d", &dev]).status();
    let (events, drops, rate) = res?;
    rows.push(Row {
        target: "loop device (O_DIRECT)",
        events,
        drops,
        events_per_second: rate,
    });
    let _ = std::fs::remove_file(&file);
    for r in &rows {
        step(&format!(
            "recorder, {}: {} events, {:.0}/s, {} dropped",
            r.target, r.events, r.events_per_second, r.drops
        ));
    }
    let json = serde_json::json!({ "version": 1, "seconds": o.seconds, "rows": rows });
    std::fs::write(
        root().join("results/recorder.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    Ok(rows)
}
