//! The Markdown table of a dataplane run, with herd ÷ best peer ratios.

use std::fmt::Write;

use super::dataplane::{pinned_pattern, Results, FORWARDER, PATTERNS, PLACEMENTS};

fn cell<'a>(r: &'a Results, server: &str, pattern: &str) -> Option<&'a super::dataplane::Cell> {
    r.cells
        .iter()
        .find(|c| c.server == server && c.pattern == pattern)
}

fn servers(r: &Results, group: &str) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for c in r.cells.iter().filter(|c| c.group == group) {
        if !v.contains(&c.server) {
            v.push(c.server.clone());
        }
    }
    v
}

fn is_baseline(name: &str) -> bool {
    name.starts_with("herd baseline")
}

/// A peer: neither herd (any build) nor the forwarder, a reference.
fn is_peer(name: &str) -> bool {
    !name.starts_with("herd") && name != FORWARDER
}

/// The herd build measured in `group` (not its baseline).
fn herd_name(r: &Results, group: &str) -> Option<String> {
    servers(r, group)
        .into_iter()
        .find(|n| n.starts_with("herd") && !is_baseline(n))
}

/// The best peer's name and median for one group and pattern.
fn best_peer(r: &Results, group: &str, pattern: &str) -> Option<(String, f64)> {
    servers(r, group)
        .into_iter()
        .filter(|n| is_peer(n))
        .filter_map(|n| cell(r, &n, pattern).map(|c| (n, c.median)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .filter(|(_, m)| *m > 0.0)
}

/// herd's median ÷ the best peer's median for one group and pattern (a
/// baseline herd build is not a peer).
pub fn ratio(r: &Results, group: &str, pattern: &str) -> Option<f64> {
    let h = cell(r, &herd_name(r, group)?, pattern)?.median;
    best_peer(r, group, pattern).map(|(_, best)| h / best)
}

/// herd's median ÷ its baseline build's, when the run had one.
pub fn ratio_to_baseline(r: &Results, group: &str, pattern: &str) -> Option<f64> {
    let herd = herd_name(r, group)?;
    let base = servers(r, group).into_iter().find(|n| is_baseline(n))?;
    let (h, b) = (
        cell(r, &herd, pattern)?.median,
        cell(r, &base, pattern)?.median,
    );
    (b > 0.0).then(|| h / b)
}

pub fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Dataplane benchmark\n");
    let _ = writeln!(
        s,
        "`cargo xtask bench dataplane`: fio (nbd engine) on loopback, {} MiB image, \
         {} repetition(s) interleaved in an order that turns each round, medians (min–max). {} cores. Hit path: {} s per job after 1 s warm-up. \
         Relays: every job starts a fresh, cold child and makes one pass (each block read once, in fio's random \
         or sequential order) for at most {} s, so every first read of a chunk is a miss. Ceilings measured in \
         the same run: loopback TCP (iperf3) {:.0} MiB/s, memory copy {:.0} MiB/s.\n",
        r.image_mib,
        r.reps,
        r.cores,
        r.runtime_s,
        r.runtime_s,
        r.ceilings.loopback_tcp_mib_s,
        r.ceilings.memcpy_mib_s
    );
    let _ = writeln!(
        s,
        "Patterns: QD is the total queue depth (iodepth × fio jobs). Chart: `dataplane.svg`; raw numbers: `dataplane.json`; the iSCSI initiator and target benchmark: `iscsi.md`; the boot storm at fleet scale: `storm/README.md`, and on the Vagrant testbed beside the emulated fleet at the same size: `testbed/README.md`. \
         Where herd falls short of its targets, and why: `DESIGN.md`, Known limits.\n"
    );
    for (group, title) in [
        ("hit", "Serving a warm image (hit path)"),
        ("relay", "Relaying from a parent, cold cache (miss path)"),
        (
            "tls",
            "Serving a warm image over TLS (hit path; client certificates verified)",
        ),
    ] {
        let names = servers(r, group);
        if names.is_empty() {
            // Not measured in this run (`--group`).
            continue;
        }
        let _ = writeln!(s, "## {title}\n");
        table_head(&mut s, "pattern", &names);
        for p in PATTERNS {
            let label = format!("{} ({})", p.name, if p.iops { "IOPS" } else { "MiB/s" });
            table_row(&mut s, r, &names, group, &label, p.name);
        }
        s.push('\n');
    }
    forwarder_table(&mut s, r);
    tls_cost(&mut s, r);
    pinned(&mut s, r);
    qd1_cpu(&mut s, r);
    let _ = writeln!(
        s,
        "## Fraction of the loopback TCP ceiling (MiB/s patterns)\n"
    );
    let _ = writeln!(
        s,
        "| server | 64k-rand-qd8 | 1m-seq-qd1 | 1m-seq-qd8 |\n|---|---|---|---|"
    );
    for group in ["hit", "relay"] {
        for n in servers(r, group) {
            let _ = write!(s, "| {n} |");
            for p in ["64k-rand-qd8", "1m-seq-qd1", "1m-seq-qd8"] {
                match cell(r, &n, p) {
                    Some(c) => {
                        let f = c.median / r.ceilings.loopback_tcp_mib_s;
                        let _ = write!(s, " {:.0} % |", f * 100.0);
                    }
                    None => s.push_str(" – |"),
                }
            }
            s.push('\n');
        }
    }
    bounds(&mut s, r);
    s
}

/// What limits one row: the loopback ceiling, the machine's cores, the
/// server's one busy core, or neither (round trips), with the server's
/// and the machine's cores busy; "–" for runs that did not record them.
fn bound(r: &Results, c: &super::dataplane::Cell, iops: bool) -> String {
    if c.machine_cpu.is_empty() || c.cpu.is_empty() {
        return "–".into();
    }
    let (server, all) = (
        crate::util::median(&c.cpu),
        crate::util::median(&c.machine_cpu),
    );
    #[allow(clippy::cast_precision_loss)]
    let cores = r.cores as f64;
    let verdict = if !iops && c.median >= 0.8 * r.ceilings.loopback_tcp_mib_s {
        "loopback"
    } else if all >= 0.9 * cores {
        "CPU"
    } else if server >= 0.9 {
        "server core"
    } else {
        "latency"
    };
    format!("{verdict} ({server:.1}/{all:.1})")
}

fn bounds(s: &mut String, r: &Results) {
    let _ = writeln!(
        s,
        "\n## What bounds each row\n\n\
         **loopback**: at least 80 % of the loopback TCP ceiling; **CPU**: the machine's {} cores at least 90 % busy \
         (client, server and everything else); **server core**: the server kept 0.9 of a core or more busy while cores \
         were left; **latency**: neither, cores idle while requests wait on round trips (and, for relays, on the parent \
         and the cache disk). In brackets: cores busy, server / machine \
         (medians over the rounds).\n",
        r.cores
    );
    let names = servers_of(r, &["hit", "relay"]);
    let _ = write!(s, "| pattern |");
    for n in &names {
        let _ = write!(s, " {n} |");
    }
    let _ = writeln!(s, "\n|---|{}", "---|".repeat(names.len()));
    for p in PATTERNS {
        let _ = write!(s, "| {} |", p.name);
        for n in &names {
            let v = cell(r, n, p.name).map_or_else(|| "–".into(), |c| bound(r, c, p.iops));
            let _ = write!(s, " {v} |");
        }
        s.push('\n');
    }
}

fn servers_of(r: &Results, groups: &[&str]) -> Vec<String> {
    groups.iter().flat_map(|g| servers(r, g)).collect()
}

/// The relays beside the forwarder that only moves bytes between fio and
/// the same warm root: what the two loopback crossings alone allow.
fn forwarder_table(s: &mut String, r: &Results) {
    let Some(herd) = herd_name(r, "relay") else {
        return;
    };
    // Any pattern: `--pattern` may have left out the first.
    if !PATTERNS
        .iter()
        .any(|p| cell(r, FORWARDER, p.name).is_some())
    {
        return;
    }
    let _ = writeln!(
        s,
        "## Beside a relay that only forwards\n\n\
         The {FORWARDER} column is no relay: fio's requests and the root's replies pass through it by \
         `splice(2)`, one for one, parsed by nobody and cached nowhere, over the same two loopback crossings. \
         It is what those crossings allow a middle process that does no work, a reference rather than a bound: \
         a relay that fetches ahead or in larger runs than fio asks for can beat it.\n\n\
         | pattern | best peer relay | forwarder ÷ best peer | herd ÷ forwarder |\n|---|---|---|---|"
    );
    for p in PATTERNS {
        let (Some(f), Some(h)) = (cell(r, FORWARDER, p.name), cell(r, &herd, p.name)) else {
            continue;
        };
        let peer = best_peer(r, "relay", p.name).map_or_else(
            || "– | –".to_owned(),
            |(n, m)| format!("{n} | {:.2}", f.median / m),
        );
        let herd_part = if f.median > 0.0 {
            format!("{:.2}", h.median / f.median)
        } else {
            "–".to_owned()
        };
        let _ = writeln!(s, "| {} | {peer} | {herd_part} |", p.name);
    }
    s.push('\n');
}

/// What TLS costs each server: its TLS median ÷ its plain one.
fn tls_cost(s: &mut String, r: &Results) {
    let pairs = [
        ("herd", "herd (warm)", "herd TLS (warm)"),
        ("nbdkit", "nbdkit file", "nbdkit file TLS"),
    ];
    if !pairs
        .iter()
        .any(|(_, _, t)| cell(r, t, PATTERNS[0].name).is_some())
    {
        return;
    }
    let _ = writeln!(
        s,
        "## What TLS costs (TLS ÷ plain, same server, same run)\n\n\
         TLS replies cannot be `sendfile`d (the bytes must pass through the encryption), so herd's \
         zero-copy hit path becomes a read from the cache's page cache and an encrypted write.\n"
    );
    let _ = write!(s, "| pattern |");
    for (n, _, _) in pairs {
        let _ = write!(s, " {n} |");
    }
    let _ = writeln!(s, "\n|---|{}", "---|".repeat(pairs.len()));
    for p in PATTERNS {
        let _ = write!(s, "| {} |", p.name);
        for (_, plain, tls) in pairs {
            match (cell(r, plain, p.name), cell(r, tls, p.name)) {
                (Some(a), Some(b)) if a.median > 0.0 => {
                    let _ = write!(s, " {:.2} |", b.median / a.median);
                }
                _ => s.push_str(" – |"),
            }
        }
        s.push('\n');
    }
    s.push('\n');
}

/// The 4 KiB QD1 runs with fixed CPUs (fio on CPU 0).
fn pinned(s: &mut String, r: &Results) {
    let names = servers(r, "pinned");
    if names.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "## 4k-rand-qd1 with fixed CPUs (IOPS)\n\n\
         One request per round trip: when server and fio run on different vCPUs, each request and each \
         reply wakes an idle vCPU, which costs a VM more than the servers' own work. Unpinned, the figure \
         depends on where the scheduler puts the threads; here fio is pinned to CPU 0 and the server to \
         CPU 0 (same) or CPU 1 (split).\n"
    );
    table_head(s, "placement", &names);
    for (placement, _) in PLACEMENTS {
        table_row(
            s,
            r,
            &names,
            "pinned",
            placement,
            &pinned_pattern(placement),
        );
    }
    s.push('\n');
}

/// What the servers' 4 KiB QD1 figures cost in CPU: herd spins for a
/// client that sends back to back (`--spin-us`), so its gain is shown
/// beside the cores it kept busy.
fn qd1_cpu(s: &mut String, r: &Results) {
    let names = servers(r, "hit");
    let pattern = PATTERNS[0].name;
    let rows: Vec<(String, String)> = std::iter::once(("unpinned".to_owned(), pattern.to_owned()))
        .chain(
            PLACEMENTS
                .iter()
                .map(|(p, _)| ((*p).to_owned(), pinned_pattern(p))),
        )
        .filter(|(_, pat)| {
            names
                .iter()
                .any(|n| cell(r, n, pat).is_some_and(|c| !c.cpu.is_empty()))
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "## CPU for {pattern}: cores busy (IOPS per core-second)\n\n\
         The server's user + system time over each fio run (warm-up included) ÷ its wall time, medians. \
         herd polls a connection that sends back to back for up to 50 µs before it sleeps \
         (`--spin-us`): IOPS bought with CPU show here.\n"
    );
    let _ = write!(s, "| placement |");
    for n in &names {
        let _ = write!(s, " {n} |");
    }
    s.push('\n');
    let _ = writeln!(s, "|---|{}", "---|".repeat(names.len()));
    for (label, pat) in rows {
        let _ = write!(s, "| {label} |");
        for n in &names {
            match cell(r, n, &pat).filter(|c| !c.cpu.is_empty()) {
                Some(c) => {
                    let cores = crate::util::median(&c.cpu);
                    let per = if cores > 0.0 { c.median / cores } else { 0.0 };
                    let _ = write!(s, " {cores:.2} ({per:.0}) |");
                }
                None => s.push_str(" – |"),
            }
        }
        s.push('\n');
    }
    s.push('\n');
}

/// `| first | server… | herd ÷ best peer |` and the separator line.
fn table_head(s: &mut String, first: &str, names: &[String]) {
    let _ = write!(s, "| {first} |");
    for n in names {
        let _ = write!(s, " {n} |");
    }
    let _ = write!(s, " herd ÷ best peer |");
    let extra = if names.iter().any(|n| is_baseline(n)) {
        let _ = write!(s, " herd ÷ baseline |");
        1
    } else {
        0
    };
    s.push('\n');
    let _ = writeln!(s, "|---|{}---|", "---|".repeat(names.len() + extra));
}

/// One row: every server's median (min–max) for `pattern`, then herd's ratio.
fn table_row(
    s: &mut String,
    r: &Results,
    names: &[String],
    group: &str,
    label: &str,
    pattern: &str,
) {
    let _ = write!(s, "| {label} |");
    for n in names {
        match cell(r, n, pattern) {
            Some(c) => {
                let _ = write!(s, " {:.0} ({:.0}–{:.0}) |", c.median, c.min, c.max);
            }
            None => s.push_str(" – |"),
        }
    }
    match ratio(r, group, pattern) {
        Some(x) => {
            let _ = write!(s, " **{x:.2}** |");
        }
        None => s.push_str(" – |"),
    }
    if names.iter().any(|n| is_baseline(n)) {
        match ratio_to_baseline(r, group, pattern) {
            Some(x) => {
                let _ = write!(s, " **{x:.3}** |");
            }
            None => s.push_str(" – |"),
        }
    }
    s.push('\n');
}
