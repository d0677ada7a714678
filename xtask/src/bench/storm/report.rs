//! The storm's Markdown report: one row per baseline, the targets, and the
//! figures the closing note quotes.

use std::fmt::Write;

use super::{BaselineResult, Results};
use crate::util::percentile;

fn mib(b: u64) -> f64 {
    b as f64 / 1_048_576.0
}

/// Makespan at the full host count (extrapolated where it ran on fewer).
#[must_use]
pub fn makespan(b: &BaselineResult) -> f64 {
    b.extrapolated_makespan_secs.unwrap_or(b.makespan_secs)
}

pub fn find<'a>(r: &'a Results, name: &str) -> Option<&'a BaselineResult> {
    r.baselines.iter().find(|b| b.name == name)
}

pub fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Boot storm on an emulated fleet\n");
    let _ = writeln!(
        s,
        "`cargo xtask bench storm`: {} hosts (network namespaces on one bridge, every link `tc tbf` {} each way, \
         the root's too) plus a root holding a {:.0} MiB synthetic image; {} replayed VMs per host ({} in all), \
         each replaying one recorded Debian boot (`xtask/traces/`, time scale {}, image scale {}) through `herd replay`, \
         every byte checked. herd: {} KiB chunks, read-ahead {}, tree fanout {}. {} cores.\n",
        r.hosts,
        r.link,
        mib(r.image_bytes),
        r.vms_per_host,
        r.hosts * r.vms_per_host,
        r.time_scale,
        r.image_scale,
        r.chunk_size / 1024,
        r.read_ahead,
        r.fanout,
        r.cores
    );
    let _ = writeln!(
        s,
        "Working set: {:.1} MiB in {} reads ({:.1} MiB in whole chunks). Lower bound = working set ÷ link rate \
         ({:.2} s) + the replay with all data local ({:.2} s) = **{:.2} s**.\n",
        mib(r.working_set_bytes),
        r.trace_requests,
        mib(r.working_set_chunks_bytes),
        r.working_set_bytes as f64 / r.link_bytes_per_s,
        r.local_replay_secs,
        r.lower_bound_secs
    );
    let _ = writeln!(
        s,
        "| baseline | hosts | makespan (s) | ÷ lower bound | boot p50 / p99 (s) | root egress (MiB) | ÷ working set | \
         per level (MiB) | peak RSS max (MiB) | cache max (MiB) | CPU busy mean / peak | CPU-s machine / herd / replay | verified (MiB) | errors / wrong |"
    );
    let _ = writeln!(
        s,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for b in &r.baselines {
        let ms = match b.extrapolated_makespan_secs {
            Some(x) => format!(
                "{:.1} (measured); **{x:.0}** at {} hosts",
                b.makespan_secs, r.hosts
            ),
            None => format!("**{:.1}**", b.makespan_secs),
        };
        let levels = b
            .level_bytes
            .iter()
            .map(|l| format!("{:.0}", mib(*l)))
            .collect::<Vec<_>>()
            .join(" / ");
        let _ = writeln!(
            s,
            "| {} | {} | {ms} | {:.2} | {:.1} / {:.1} | {:.1} | {:.2} | {} | {:.0} | {:.0} | {:.0} % / {:.0} % | {:.0} / {:.0} / {:.0} | {:.0} | {} / {} |",
            b.name,
            b.hosts,
            makespan(b) / r.lower_bound_secs,
            percentile(&b.boot_secs, 0.5),
            percentile(&b.boot_secs, 0.99),
            mib(b.root_egress_bytes),
            b.root_egress_bytes as f64 / r.working_set_bytes.max(1) as f64,
            if levels.is_empty() { "–".into() } else { levels },
            mib(b.peak_rss_bytes_max),
            mib(b.cache_bytes_max),
            b.cpu_busy_mean * 100.0,
            b.cpu_busy_peak * 100.0,
            b.cpu_secs_machine,
            b.cpu_secs_herd,
            b.cpu_secs_replay,
            mib(b.verified_bytes),
            b.errors,
            b.mismatches
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "## Targets\n");
    let best_tree = ["tree-prefetch", "tree-prewarmed", "tree-lazy"]
        .iter()
        .find_map(|n| find(r, n));
    if let Some(p) = find(r, "tree-prefetch") {
        let _ = writeln!(
            s,
            "- herd tree + prefetch (from the storm's start) makespan ÷ lower bound: **{:.2}** (target ≤ 1.25)",
            p.makespan_secs / r.lower_bound_secs
        );
    }
    if let Some(p) = find(r, "tree-prewarmed") {
        let _ = writeln!(
            s,
            "- herd tree pre-warmed ({:.1} s of prefetch before the storm) makespan ÷ lower bound: **{:.2}**",
            p.prewarm_secs.unwrap_or(0.0),
            p.makespan_secs / r.lower_bound_secs
        );
    }
    if let Some(l) = find(r, "tree-lazy") {
        let _ = writeln!(
            s,
            "- herd tree root egress ÷ working set: **{:.2}** (target ≤ 1.10; ÷ working set in whole chunks: {:.2})",
            l.root_egress_bytes as f64 / r.working_set_bytes.max(1) as f64,
            l.root_egress_bytes as f64 / r.working_set_chunks_bytes.max(1) as f64
        );
    }
    if let Some(t) = best_tree {
        for other in ["full-copy", "all-from-root"] {
            if let Some(o) = find(r, other) {
                let _ = writeln!(
                    s,
                    "- {} speed-up over {other}: **{:.1}×** ({:.1} s vs {:.1} s{})",
                    t.name,
                    makespan(o) / t.makespan_secs.max(1e-9),
                    t.makespan_secs,
                    makespan(o),
                    if o.extrapolated_makespan_secs.is_some() {
                        format!(", extrapolated from {} hosts", o.hosts)
                    } else {
                        String::new()
                    }
                );
            }
        }
    }
    for b in r.baselines.iter().filter(|b| b.name != "full-copy") {
        let _ = writeln!(
            s,
            "- {}: herds found a parent down {} times and re-issued {} reads to another parent",
            b.name, b.parents_down, b.failovers
        );
    }
    for b in r
        .baselines
        .iter()
        .filter(|b| !b.real_vm_boot_secs.is_empty())
    {
        let real: Vec<String> = b
            .real_vm_boot_secs
            .iter()
            .map(|t| format!("{t:.1}"))
            .collect();
        let _ = writeln!(
            s,
            "- {}: real Debian VMs (qemu) booted in {} s next to the replayed VMs' p50 {:.1} s (replays run \
             the trace at time scale {}; a real boot is not stretched)",
            b.name,
            real.join(", "),
            percentile(&b.boot_secs, 0.5),
            r.time_scale
        );
    }
    for b in r
        .baselines
        .iter()
        .filter(|b| b.killed_relay_at_secs.is_some())
    {
        let _ = writeln!(
            s,
            "- {}: host 1 (the relay above every other host) was killed at {:.1} s; {} of its VMs died with it, and the VMs of every other host saw {} errors and {} wrong reads",
            b.name,
            b.killed_relay_at_secs.unwrap_or(0.0),
            b.vms_lost_with_killed_host,
            b.errors,
            b.mismatches
        );
    }
    let (verified, read, errors): (u64, u64, u64) = r.baselines.iter().fold((0, 0, 0), |a, b| {
        (
            a.0 + b.verified_bytes,
            a.1 + b.bytes_read,
            a.2 + b.errors + b.mismatches,
        )
    });
    let _ = writeln!(
        s,
        "- bytes verified: {:.0} of {:.0} MiB read; VM errors and wrong reads: **{errors}**",
        mib(verified),
        mib(read)
    );
    if let Some(f) = &r.fidelity {
        let _ = writeln!(s, "\n## Replay fidelity (`--fidelity`, `fidelity.json`)\n");
        let _ = writeln!(
            s,
            "The real Debian VM ({}) booted through a recording herd: marker at {:.2} s, last read at {:.2} s, \
             {:.1} MiB in {} requests. Its trace replayed as one VM: {:.2} s on the image file, {:.2} s through a \
             herd root → leaf ({:.2}× and {:.2}× the recorded span), {:.1} MiB in {} requests (the trace merges \
             sequential reads into extents of up to 1 MiB).",
            f.accel.to_uppercase(),
            f.real_boot_secs,
            f.trace_span_secs,
            mib(f.real_bytes),
            f.real_requests,
            f.replay_local_secs,
            f.replay_leaf_secs,
            f.replay_local_secs / f.trace_span_secs.max(1e-9),
            f.replay_leaf_secs / f.trace_span_secs.max(1e-9),
            mib(f.trace_bytes),
            f.trace_requests
        );
    }
    let _ = writeln!(
        s,
        "\nCharts: `cdf.svg` (boot-time CDF), `timeline.svg` (VMs booted over time), `bars.svg` \
         (makespan, root egress). Raw: `storm.json`. Full copy and all-from-root run on fewer hosts (their \
         root link would take far longer at full size): full copy's copy phase is extrapolated linearly (the root's \
         link carries every copy), all-from-root's makespan to at least the time the root's link needs for every \
         host's bytes."
    );
    s
}
