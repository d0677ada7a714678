//! herd proxy library: serves one read-only VM image over NBD, fetching
//! chunks on demand from an upstream (a local file at the root, a parent
//! proxy elsewhere) and caching them on local disk.
//!
//! ```text
//!   upstream::{file, nbd, iscsi} ──▶ cache (chunks + bitmap, single-flight) ──▶ export::nbd
//!                                        ▲                                  │ (+ herd-profile)
//!                prefetch (profile order, demand first)          record::daemon
//! ```
//!
//! `manifest` holds the per-chunk digests every fetch is checked against;
//! `profile` is the boot-profile format; `record` the eBPF recorder that
//! produces one from a real boot; `prefetch` moves a profile's chunks down
//! the tree ahead of demand.

pub mod cache;
pub mod config;
pub mod cores;
pub mod export;
pub mod fleet;
pub mod io;
pub mod iscsi;
pub mod le;
pub mod manifest;
pub mod metrics;
pub mod nbd;
pub mod net;
pub mod prefetch;
pub mod profile;
pub mod record;
pub mod replay;
pub mod size;
pub mod tls;
pub mod upstream;

/// Renders an error with its chain of causes: "a: b: c".
#[must_use]
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
