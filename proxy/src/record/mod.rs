//! The eBPF boot recorder: watches the kernel read one image (a block
//! device, or a file through the page cache) and turns those reads into a
//! boot profile.
//!
//! ```text
//!  tracepoint ─▶ herd-ebpf program (filters by device / inode)
//!            ─▶ ring buffer ─▶ [`bpf::Session`] ─▶ ProfileBuilder ─▶ boot.profile
//! ```
//!
//! The kernel side is `ebpf/herd-ebpf`, built by `cargo xtask build-ebpf`;
//! [`object_path`] finds the object it produced. The daemon-side recorder
//! for hosts without BPF is [`daemon`].

mod bpf;
pub mod daemon;
mod target;
pub mod tracefs;

pub use bpf::{Session, Totals};
pub use target::{Target, TargetKind};
pub use tracefs::ensure_tracefs;

use std::path::{Path, PathBuf};

use thiserror::Error;

/// Environment variable naming the eBPF object to load.
pub const OBJECT_ENV: &str = "HERD_BPF_OBJECT";
/// The object's file name, next to the binary or in the install dir.
pub const OBJECT_NAME: &str = "herd-ebpf.o";

#[derive(Debug, Error)]
pub enum RecordError {
    #[error(
        "recording needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN): run herd record as root, \
         or record inside the daemon with `herd serve --record-profile FILE`"
    )]
    NoCapability,
    #[error(
        "the eBPF object {OBJECT_NAME} was not found (looked in: {looked}); build it with \
         `cargo xtask build-ebpf` or point {OBJECT_ENV} at it"
    )]
    NoObject { looked: String },
    #[error(
        "tracefs is not mounted at /sys/kernel/tracing and mounting it failed; run \
         `mount -t tracefs nodev /sys/kernel/tracing`"
    )]
    Tracefs(#[source] std::io::Error),
    #[error("tracepoint {tracepoint} has field `{field}` at offset {found:?}, the recorder expects {want}")]
    Layout {
        tracepoint: &'static str,
        field: &'static str,
        found: Option<usize>,
        want: usize,
    },
    #[error("{path} is not usable as a recording target")]
    Target {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is neither a block device nor a regular file")]
    NotBlockOrFile(PathBuf),
    #[error("cannot load the eBPF programs")]
    Load(#[source] aya::EbpfError),
    #[error("cannot attach {program}")]
    Attach {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {0} is missing from the object")]
    Map(&'static str),
    #[error("eBPF map access failed")]
    MapAccess(#[source] aya::maps::MapError),
    #[error("reading the ring buffer failed")]
    Ring(#[source] std::io::Error),
}

/// Finds the eBPF object: `$HERD_BPF_OBJECT`, then next to the running
/// binary, then `target/herd/` above it (a cargo build tree), then
/// `/usr/lib/herd/`.
///
/// # Errors
/// `NoObject` listing every place looked.
pub fn object_path() -> Result<PathBuf, RecordError> {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os(OBJECT_ENV) {
        candidates.push(PathBuf::from(p));
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_owned))
    {
        candidates.push(dir.join(OBJECT_NAME));
        if let Some(target) = dir.parent() {
            candidates.push(target.join("herd").join(OBJECT_NAME));
        }
    }
    candidates.push(PathBuf::from("/usr/lib/herd").join(OBJECT_NAME));
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| RecordError::NoObject {
            looked: candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Whether this process may load tracing BPF programs: CAP_BPF with
/// CAP_PERFMON, or CAP_SYS_ADMIN, in the effective set.
#[must_use]
pub fn has_bpf_capability() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |bit: u32| eff >> bit & 1 == 1;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
}
