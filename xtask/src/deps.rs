//! Installs what herd's jobs need from Debian's packages, idempotently.
//!
//! qemu-system-x86 must come from bookworm-backports to match the
//! preinstalled qemu-utils 10.x, but the machine's apt sources list no
//! backports suite. Rather than edit /etc/apt, apt runs with a private
//! sources folder and lists under target/herd/apt (recipe in
//! shared/MACHINE-NOTES.md).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use crate::util::{output, run, spinner, step, work_dir};

/// Every Debian package a job here uses.
pub const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-utils",
    "qemu-block-extra",
    "nbdkit",
    "libnbd-bin",
    "fio",
    "busybox-static",
    "debootstrap",
    "e2fsprogs",
    "cpio",
    "kmod",
    "xz-utils",
    "curl",
    "iperf3",
    "tgt",
    "libiscsi-bin",
    // Fleet membership: a real etcd in the tests; protoc for etcd-client's
    // generated code (the herd binary's build needs it), with the
    // well-known .proto files it imports (only a Recommends of protoc, so
    // --no-install-recommends leaves them out).
    "etcd-server",
    "protobuf-compiler",
    "libprotobuf-dev",
];

const SOURCES: &str = "Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";

fn apt_dir() -> PathBuf {
    work_dir("apt")
}

/// apt options that point at the private sources and lists.
pub fn apt_opts() -> Vec<String> {
    let d = apt_dir();
    vec![
        "-o".into(),
        format!("Dir::Etc::SourceList={}", d.join("sources.list").display()),
        "-o".into(),
        format!("Dir::Etc::SourceParts={}", d.join("sources.d").display()),
        "-o".into(),
        format!("Dir::State::Lists={}", d.join("lists").display()),
        "-o".into(),
        "DPkg::Lock::Timeout=600".into(),
    ]
}

/// Writes the private sources and runs `apt-get update` once per checkout
/// (again if the lists are older than a day).
pub fn ensure_lists() -> Result<()> {
    let d = apt_dir();
    std::fs::create_dir_all(d.join("sources.d"))?;
    std::fs::create_dir_all(d.join("lists/partial"))?;
    std::fs::write(d.join("sources.list"), "")?;
    std::fs::write(d.join("sources.d/debian.sources"), SOURCES)?;
    let stamp = d.join("updated");
    let fresh = std::fs::metadata(&stamp)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age.as_secs() < 86_400);
    if !fresh {
        let pb = spinner("apt-get update (bookworm + backports)");
        run(Command::new("apt-get").args(apt_opts()).arg("update"))?;
        pb.finish_and_clear();
        std::fs::write(&stamp, "")?;
    }
    Ok(())
}

fn missing(pkgs: &[&str]) -> Result<Vec<String>> {
    // dpkg-query exits non-zero when a package is unknown; read its stdout
    // either way.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Status}\n"])
        .args(pkgs)
        .output()
        .context("cannot run dpkg-query")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(pkgs
        .iter()
        .filter(|p| {
            !text
                .lines()
                .any(|l| l.split_once(' ') == Some((p, "installed")))
        })
        .map(|p| (*p).to_owned())
        .collect())
}

/// Installs whichever of `pkgs` are missing, preferring bookworm-backports.
pub fn ensure(pkgs: &[&str]) -> Result<()> {
    let need = missing(pkgs)?;
    if need.is_empty() {
        return Ok(());
    }
    step(&format!("installing {}", need.join(" ")));
    ensure_lists()?;
    let pb = spinner(format!("apt-get install {}", need.join(" ")));
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(apt_opts())
        .args([
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "-t",
            "bookworm-backports",
        ])
        .args(&need))?;
    pb.finish_and_clear();
    let still = missing(pkgs)?;
    anyhow::ensure!(
        still.is_empty(),
        "apt-get did not install {}",
        still.join(" ")
    );
    Ok(())
}

/// `cargo xtask deps`: install everything.
pub fn run_all() -> Result<()> {
    ensure(PACKAGES)?;
    let v = output(Command::new("qemu-system-x86_64").arg("--version"))?;
    step(&format!("ready: {}", v.lines().next().unwrap_or("qemu")));
    Ok(())
}
