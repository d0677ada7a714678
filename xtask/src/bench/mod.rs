//! `cargo xtask bench <suite>`: benchmarks that compare herd with its peers
//! side by side in one run. Never timed assertions in tests: these machines
//! are noisy, so results are medians over interleaved rounds, as ratios
//! (the recorder bench has no peer: it reports its own event rate).

pub mod dataplane;
pub mod failover;
pub mod forward;
pub mod iscsi;
mod plot;
pub mod recorder;
mod report;
pub mod rss;
pub mod sparse;
pub mod storm;
pub mod update;

use std::process::Child;

use anyhow::Result;

/// Processes killed (in reverse) on drop: a bench that fails part-way
/// leaves nothing running.
#[derive(Default)]
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in self.0.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[derive(clap::Subcommand, Debug)]
pub enum Suite {
    /// herd vs nbdkit vs qemu-nbd with fio's nbd engine (hit path and relay).
    Dataplane(dataplane::Options),
    /// herd's iSCSI initiator vs iscsi-perf on one tgtd LUN.
    Iscsi(iscsi::Options),
    /// The eBPF recorder's event rate and drops under fio load (needs root).
    Recorder(recorder::Options),
    /// Failover: how long a client's read stalls when a parent dies, hangs,
    /// loses its link, returns errors, or the root restarts.
    Failover(failover::Options),
    /// A boot storm on an emulated fleet: herd's tree against full copy and all-from-root.
    Storm(storm::Options),
    /// A sparse image copied whole and prefetched: herd's tree vs nbdkit's file plugin.
    Sparse(sparse::Options),
    /// A node's memory (RSS) serving a 15 GiB image to 64 clients under load.
    Rss(rss::Options),
    /// A rolling update through a warm tree: what moves, how long it takes.
    Update(update::Options),
}

pub fn run(suite: &Suite) -> Result<()> {
    match suite {
        Suite::Dataplane(o) => dataplane::run_bench(o).map(drop),
        Suite::Iscsi(o) => iscsi::run_bench(o).map(drop),
        Suite::Recorder(o) => recorder::run_bench(o).map(drop),
        Suite::Storm(o) => storm::run_job(o),
        Suite::Failover(o) => failover::run_bench(o),
        Suite::Sparse(o) => sparse::run_bench(o).map(drop),
        Suite::Rss(o) => rss::run_bench(o).map(drop),
        Suite::Update(o) => update::run_bench(o).map(drop),
    }
}
