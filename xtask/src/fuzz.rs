//! `cargo xtask fuzz`: builds every cargo-fuzz target in `fuzz/` and runs
//! each for a number of executions or seconds, with libFuzzer and
//! AddressSanitizer on the nightly toolchain the machine image ships.
//! Installs cargo-fuzz when it is missing. A full run writes
//! `results/fuzz.json` (target, executions, corpus size, crashes).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::util::{output, root, run_visible, step};

/// The cargo-fuzz release these machines were checked with.
const CARGO_FUZZ: &str = "0.13.2";

#[derive(clap::Args, Debug, Clone)]
pub struct Options {
    /// Executions per target (libFuzzer `-runs`).
    #[arg(long, default_value_t = 10_000_000)]
    pub runs: u64,
    /// Seconds per target instead of a number of executions.
    #[arg(long)]
    pub time: Option<u64>,
    /// Only these targets (default: all in fuzz/Cargo.toml).
    #[arg(long, value_delimiter = ',')]
    pub targets: Vec<String>,
    /// A few seconds per target; checks that every target builds and runs,
    /// writes no results.
    #[arg(long)]
    pub brief: bool,
    /// Fuzz running daemons over sockets instead (proxy/tests/socket_fuzz.rs,
    /// release build): hostile clients, and a hostile parent; writes
    /// results/socket-fuzz.json.
    #[arg(long)]
    pub socket: bool,
    /// With --socket: hostile client sessions.
    #[arg(long, default_value_t = 100_000)]
    pub sessions: u64,
    /// With --socket: reads through the hostile parent.
    #[arg(long, default_value_t = 5_000)]
    pub reads: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TargetResult {
    pub target: String,
    pub executions: u64,
    pub seconds: f64,
    pub corpus: usize,
    pub crashes: usize,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    pub version: u32,
    pub toolchain: String,
    pub cargo_fuzz: String,
    pub targets: Vec<TargetResult>,
}

fn fuzz_dir() -> PathBuf {
    root().join("fuzz")
}

/// cargo-fuzz and a nightly toolchain, installed if missing.
fn ensure_tools() -> Result<String> {
    if output(Command::new("rustc").args(["+nightly", "--version"])).is_err() {
        step("installing a nightly Rust toolchain (cargo-fuzz needs it)");
        run_visible(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let installed = output(Command::new("cargo").args(["fuzz", "--version"])).unwrap_or_default();
    if !installed.contains(CARGO_FUZZ) {
        step(&format!("installing cargo-fuzz {CARGO_FUZZ}"));
        run_visible(Command::new("cargo").args([
            "install",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ,
            "--locked",
        ]))?;
    }
    Ok(
        output(Command::new("rustc").args(["+nightly", "--version"]))?
            .trim()
            .to_owned(),
    )
}

/// The targets fuzz/Cargo.toml declares.
fn targets() -> Result<Vec<String>> {
    let text = output(
        Command::new("cargo")
            .args(["+nightly", "fuzz", "list"])
            .current_dir(fuzz_dir()),
    )?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| {
        d.filter(|e| e.as_ref().is_ok_and(|e| e.path().is_file()))
            .count()
    })
}

/// libFuzzer's last "Done N runs in S second(s)" line, or its last
/// status line ("#N  DONE ..." / "#N  pulse ...") for the count.
fn executions(log: &str) -> Option<u64> {
    log.lines().rev().find_map(|l| {
        if let Some(rest) = l.strip_prefix("Done ") {
            return rest.split_whitespace().next()?.parse().ok();
        }
        let rest = l.strip_prefix('#')?;
        let n = rest.split_whitespace().next()?;
        n.parse().ok()
    })
}

fn run_target(name: &str, opts: &Options) -> Result<TargetResult> {
    let corpus = fuzz_dir().join("corpus").join(name);
    let artifacts = fuzz_dir().join("artifacts").join(name);
    std::fs::create_dir_all(&corpus)?;
    let before = count_files(&artifacts);
    let limit = match (opts.brief, opts.time) {
        (true, _) => "-max_total_time=3".to_owned(),
        (false, Some(s)) => format!("-max_total_time={s}"),
        (false, None) => format!("-runs={}", opts.runs),
    };
    let t = Instant::now();
    let out = Command::new("cargo")
        .args(["+nightly", "fuzz", "run", name, "--"])
        .arg(&limit)
        .current_dir(fuzz_dir())
        .output()
        .with_context(|| format!("cannot run the {name} target"))?;
    let seconds = t.elapsed().as_secs_f64();
    let log = String::from_utf8_lossy(&out.stderr);
    let crashes = count_files(&artifacts).saturating_sub(before);
    if !out.status.success() || crashes > 0 {
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        bail!(
            "fuzz target {name} failed ({}), {crashes} new artifact(s) in {}:\n{}",
            out.status,
            artifacts.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let executions = executions(&log)
        .with_context(|| format!("{name}: no execution count in libFuzzer's output"))?;
    Ok(TargetResult {
        target: name.to_owned(),
        executions,
        seconds,
        corpus: count_files(&corpus),
        crashes,
    })
}

/// Builds and runs the targets; a crash fails the run.
///
/// # Errors
/// Tools that cannot be installed, a target that does not build, a crash.
pub fn run_fuzz(opts: &Options) -> Result<Results> {
    if opts.socket {
        run_socket(opts)?;
        return Ok(Results {
            version: 1,
            toolchain: String::new(),
            cargo_fuzz: String::new(),
            targets: Vec::new(),
        });
    }
    let toolchain = ensure_tools()?;
    let names = if opts.targets.is_empty() {
        targets()?
    } else {
        opts.targets.clone()
    };
    anyhow::ensure!(
        !names.is_empty(),
        "no fuzz targets found in fuzz/Cargo.toml"
    );
    step("building the fuzz targets (nightly, AddressSanitizer)");
    run_visible(
        Command::new("cargo")
            .args(["+nightly", "fuzz", "build"])
            .current_dir(fuzz_dir()),
    )?;
    let mut results = Vec::new();
    for name in &names {
        step(&format!("fuzzing {name}"));
        let r = run_target(name, opts)?;
        println!(
            "{:<18} {:>12} executions in {:>6.1} s, corpus {:>5}, crashes {}",
            r.target, r.executions, r.seconds, r.corpus, r.crashes
        );
        results.push(r);
    }
    let cargo_fuzz = output(Command::new("cargo").args(["fuzz", "--version"]))?
        .trim()
        .to_owned();
    let mut res = Results {
        version: 1,
        toolchain,
        cargo_fuzz,
        targets: results,
    };
    if !opts.brief {
        let out = root().join("results/fuzz.json");
        // A run of some targets updates their rows and keeps the others.
        if !opts.targets.is_empty() {
            if let Some(old) = std::fs::read_to_string(&out)
                .ok()
                .and_then(|t| serde_json::from_str::<Results>(&t).ok())
            {
                let fresh: Vec<String> = res.targets.iter().map(|t| t.target.clone()).collect();
                res.targets.extend(
                    old.targets
                        .into_iter()
                        .filter(|t| !fresh.contains(&t.target)),
                );
                res.targets.sort_by(|a, b| a.target.cmp(&b.target));
            }
        }
        std::fs::write(&out, serde_json::to_string_pretty(&res)?)?;
        step(&format!("results in {}", out.display()));
    }
    Ok(res)
}

/// The socket-level fuzz at length: both tests of
/// `proxy/tests/socket_fuzz.rs` with large counts (each bounded to an
/// hour), their figures gathered into `results/socket-fuzz.json`.
///
/// # Errors
/// A test that fails (its seed is in the output) or writes no figures.
fn run_socket(opts: &Options) -> Result<()> {
    let out = std::env::temp_dir().join(format!("herd-socket-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&out)?;
    step(&format!(
        "socket fuzz: {} hostile client sessions, {} reads through a hostile parent",
        opts.sessions, opts.reads
    ));
    let ran = run_visible(
        Command::new("cargo")
            .args([
                "test",
                "--release",
                "--locked",
                "-p",
                "herd",
                "--test",
                "socket_fuzz",
            ])
            .args(["--", "--nocapture", "--test-threads=1"])
            .env("HERD_SOCKET_FUZZ_SESSIONS", opts.sessions.to_string())
            .env("HERD_SOCKET_FUZZ_READS", opts.reads.to_string())
            .env("HERD_SOCKET_FUZZ_SECONDS", "3600")
            .env("HERD_SOCKET_FUZZ_OUT", &out)
            .current_dir(root()),
    );
    let read = |name: &str| -> Result<serde_json::Value> {
        let p = out.join(format!("{name}.json"));
        let text = std::fs::read_to_string(&p)
            .with_context(|| format!("the socket fuzz wrote no {}", p.display()))?;
        Ok(serde_json::from_str(&text)?)
    };
    let figures = (|| -> Result<serde_json::Value> {
        ran?;
        Ok(serde_json::json!({
            "version": 1,
            "hostile_clients": read("clients")?,
            "hostile_parent": read("parent")?,
        }))
    })();
    let _ = std::fs::remove_dir_all(&out);
    let figures = figures?;
    let path = root().join("results/socket-fuzz.json");
    std::fs::write(&path, serde_json::to_string_pretty(&figures)?)?;
    step(&format!("results in {}", path.display()));
    Ok(())
}

/// The brief run `cargo xtask test` makes: every target builds and runs a
/// few seconds without a crash.
///
/// # Errors
/// As [`run_fuzz`], or a target that ran no executions.
pub fn brief() -> Result<()> {
    let r = run_fuzz(&Options {
        runs: 0,
        time: None,
        targets: Vec::new(),
        brief: true,
        socket: false,
        sessions: 0,
        reads: 0,
    })?;
    for t in &r.targets {
        anyhow::ensure!(t.executions > 0, "{} ran no executions", t.target);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::executions;

    #[test]
    fn reads_libfuzzer_counts() {
        let log = "#2\tINITED cov: 10 ft: 10 corp: 1/1b\n#65536\tpulse  cov: 80\nDone 1000000 runs in 7 second(s)\n";
        assert_eq!(executions(log), Some(1_000_000));
        let timed =
            "#1024\tpulse cov: 3\n#84512\tDONE   cov: 91 ft: 200 corp: 40/1kb exec/s: 28170\n";
        assert_eq!(executions(timed), Some(84_512));
        assert_eq!(executions("nothing"), None);
    }
}
