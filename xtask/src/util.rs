//! Shared helpers: paths, running commands with their full command line in
//! errors, and progress spinners.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), PathBuf::from)
}

/// Build products of xtask jobs (images, apt lists), kept across runs.
pub fn work_dir(sub: &str) -> PathBuf {
    root().join("target").join("herd").join(sub)
}

/// Runs a command to completion, failing with the full command line and its
/// stderr tail.
pub fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(15).collect();
        bail!(
            "{cmd:?} failed ({}):\n{}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(())
}

/// Runs a command, returning its stdout.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command with inherited stdio (cargo builds, test runs).
pub fn run_visible(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// A spinner showing the step and elapsed time.
pub fn spinner(msg: impl Into<String>) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.set_message(msg.into());
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

/// Prints a step line (kept visible in CI logs where spinners are hidden).
pub fn step(msg: &str) {
    eprintln!("xtask: {msg}");
}

pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// A qcow2 overlay at `out` over the raw image `backing` (a path or an
/// nbd:// URL, not opened now: `-u`), so a VM's writes never reach it.
pub fn raw_overlay(out: &std::path::Path, backing: &str, size: u64) -> Result<()> {
    let _ = std::fs::remove_file(out);
    run(Command::new("qemu-img")
        .args([
            "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", backing,
        ])
        .arg(out)
        .arg(size.to_string()))
}

/// Runs `cmd` as root on a test VM over SSH with the test key (no host-key
/// checks: the VMs are throwaway), returning its stdout.
pub fn ssh_root(key: &std::path::Path, host: &str, port: u16, cmd: &str) -> Result<String> {
    output(ssh_command(key, host, port, &[]).arg(cmd))
}

/// `ssh root@host` with the options every test VM needs (no host-key
/// prompts, key only) and `extra` ones; the remote command is for the
/// caller to add.
pub fn ssh_command(key: &std::path::Path, host: &str, port: u16, extra: &[&str]) -> Command {
    let mut c = Command::new("ssh");
    c.args(["-q", "-o", "StrictHostKeyChecking=no"])
        .args(["-o", "UserKnownHostsFile=/dev/null"])
        .args(["-o", "ConnectTimeout=10", "-o", "BatchMode=yes"])
        .args(extra)
        .arg("-i")
        .arg(key)
        .args(["-p", &port.to_string(), &format!("root@{host}")]);
    c
}

/// One sample's value from Prometheus text, if present. Counters are
/// integral; the text format may still print them as "1e3".
pub fn prom_get(text: &str, name: &str) -> Option<u64> {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    herd::metrics::sample(text, name).map(|v| v as u64)
}

/// Loop-mounts the file system image `raw` at `mnt`, runs `f` on it and
/// unmounts (best effort), whether `f` succeeded or not.
pub fn with_mounted<T>(
    raw: &std::path::Path,
    mnt: &std::path::Path,
    f: impl FnOnce(&std::path::Path) -> Result<T>,
) -> Result<T> {
    std::fs::create_dir_all(mnt)?;
    run(Command::new("mount").args(["-o", "loop"]).arg(raw).arg(mnt))?;
    let out = f(mnt);
    let _ = run(Command::new("umount").arg(mnt));
    let _ = std::fs::remove_dir(mnt);
    out
}

/// Waits until something listens on 127.0.0.1:`port`, for `limit` at most.
pub fn wait_port(port: u16, limit: Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!(
        "nothing listens on 127.0.0.1:{port} after {} s",
        limit.as_secs()
    )
}

/// A TCP port on 127.0.0.1 that was free a moment ago, outside the
/// ephemeral range (`herd::net::unused_port`).
pub fn free_port() -> Result<u16> {
    Ok(herd::net::unused_port()?)
}

/// The value at fraction `p` (0..=1) of a sorted sample, nearest rank; 0
/// for none.
#[must_use]
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)]
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The median of a sample (mean of the two middle values for an even count;
/// 0 for none).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => s[n / 2],
        _ => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// One sample's value from Prometheus text; a missing metric is an error,
/// so a renamed metric cannot pass for 0.
pub fn prom_require(text: &str, name: &str) -> Result<u64> {
    prom_get(text, name).with_context(|| format!("metric {name} is missing"))
}

/// GET `path` over HTTP/1.1 and return the body (metrics endpoints).
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("{addr} unreachable"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("{addr}: not an HTTP reply"))?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "{addr}{path}: {}",
        head.lines().next().unwrap_or("")
    );
    Ok(body.to_owned())
}

/// Unix time in milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Kernel clock ticks per second (`/proc` CPU times are in ticks).
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// CPU seconds every core of the machine has spent busy (all but idle and
/// iowait) since boot, from /proc/stat; 0 if it cannot be read.
pub fn machine_busy_secs() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(line) = s.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    // user nice system idle iowait irq softirq steal ...
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    let busy = f.iter().take(8).sum::<u64>().saturating_sub(idle);
    busy as f64 / clock_ticks()
}

/// CPU seconds (user + system) a running process has used; 0 once gone.
pub fn proc_cpu_secs(pid: u32) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the line.
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    f.iter().sum::<u64>() as f64 / clock_ticks()
}
