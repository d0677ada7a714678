//! `cargo xtask build-ebpf`: builds the recorder's eBPF programs
//! (`ebpf/herd-ebpf`) for `bpfel-unknown-none`.
//!
//! The recipe (verified here, shared/MACHINE-NOTES.md): Debian's rustc-web
//! toolchain (Rust 1.96 on LLVM 22, with a matching std source for
//! `-Z build-std=core`), bpf-linker 0.13 built against LLVM 22, BTF emitted
//! by the linker. The userspace keeps using the rustup toolchain; only this
//! crate is built with /usr/bin/cargo. The object lands in
//! `target/herd/herd-ebpf.o`, where the herd binary looks for it.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use crate::util::{cargo, root, run, spinner, step, work_dir};

/// Debian packages of the eBPF toolchain.
pub const PACKAGES: &[&str] = &["rustc-web", "cargo-web", "rust-web-src", "llvm-22-dev"];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Where herd finds the object (`target/herd/`, see `herd::record::object_path`).
const OBJECT: &str = "herd-ebpf.o";

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo"),
        PathBuf::from,
    )
}

/// bpf-linker, installed once per machine into `$CARGO_HOME/bin` (a clean
/// clone reuses it).
fn ensure_bpf_linker() -> Result<PathBuf> {
    let bin = cargo_home().join("bin").join("bpf-linker");
    let current = Command::new(&bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if current.contains(BPF_LINKER_VERSION) {
        return Ok(bin);
    }
    let pb = spinner(format!(
        "cargo install bpf-linker@{BPF_LINKER_VERSION} against LLVM 22 (once, ~2 min)"
    ));
    run(cargo().env("LLVM_PREFIX", "/usr/lib/llvm-22").args([
        "install",
        &format!("bpf-linker@{BPF_LINKER_VERSION}"),
        "--locked",
        "--no-default-features",
        "--features",
        "llvm-22",
    ]))?;
    pb.finish_and_clear();
    Ok(bin)
}

/// Builds the eBPF object and returns its path.
pub fn build() -> Result<PathBuf> {
    crate::deps::ensure(PACKAGES)?;
    let linker = ensure_bpf_linker()?;
    let krate = root().join("ebpf/herd-ebpf");
    let target_dir = work_dir("ebpf-build");
    let pb = spinner("building the eBPF recorder (bpfel-unknown-none)");
    let mut cmd = Command::new("/usr/bin/cargo");
    // The outer cargo's environment (rustup toolchain, flags, target dir)
    // must not leak into this build.
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "RUSTC_WRAPPER",
        "RUSTDOC",
        "CARGO",
    ] {
        cmd.env_remove(var);
    }
    run(cmd
        .current_dir(&krate)
        .env("RUSTC", "/usr/bin/rustc")
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &linker)
        .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf")
        .env("CARGO_TARGET_DIR", &target_dir)
        .args([
            "build",
            "--locked",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ]))?;
    pb.finish_and_clear();
    let built = target_dir.join("bpfel-unknown-none/release/herd-ebpf");
    let out = work_dir(OBJECT);
    std::fs::copy(&built, &out)
        .with_context(|| format!("cannot copy {} to {}", built.display(), out.display()))?;
    step(&format!("eBPF object: {}", out.display()));
    Ok(out)
}
