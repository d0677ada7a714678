//! `cargo xtask test`: installs what is missing, then runs every test:
//! formatting and lints, the workspace's unit and end-to-end tests (with
//! `HERD_STRICT=1`, so a missing tool fails instead of skipping; the eBPF
//! recorder's tests run as root, as CI does), real VM boots through a chain
//! of herd proxies, boot profiles recorded, merged and prefetched on real
//! boots, and a quick boot storm on an emulated fleet (every baseline, plus
//! a real VM beside replayed ones).

use anyhow::{bail, Context, Result};

use crate::bench::dataplane;
use crate::demo::{self, Accel};
use crate::image::Kind;
use crate::util::{cargo, root, run_visible, step};

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Skip the Debian VM boot (the busybox boot still runs).
    #[arg(long)]
    pub quick: bool,
    /// Run only the xtask checks whose name contains this (no fmt, clippy
    /// or cargo tests): for working on one check.
    #[arg(long)]
    pub check: Option<String>,
}

/// A self-contained check run after the cargo tests.
type Smoke = fn() -> Result<()>;

pub fn run(opts: &Options) -> Result<()> {
    crate::deps::ensure(crate::deps::PACKAGES)?;
    let only = opts.check.as_deref();
    if only.is_none() {
        cargo_checks()?;
    }
    run_checks(opts, &|name: &str| only.is_none_or(|o| name.contains(o)))
}

/// fmt, clippy and every cargo test (unit and end-to-end).
fn cargo_checks() -> Result<()> {
    // Before the cargo tests: the recorder's tests load this object.
    crate::ebpf::build()?;
    step("cargo fmt --check");
    run_visible(
        cargo()
            .current_dir(root())
            .args(["fmt", "--all", "--check"]),
    )?;
    // The eBPF crate is outside the workspace; rustfmt checks it directly.
    run_visible(
        std::process::Command::new("rustfmt")
            .current_dir(root())
            .args(["--check", "--edition", "2021", "ebpf/herd-ebpf/src/main.rs"]),
    )?;
    step("cargo clippy");
    run_visible(cargo().current_dir(root()).args([
        "clippy",
        "--locked",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("cargo test (unit + end-to-end against qemu-nbd, nbdkit, nbdcopy, qemu-img)");
    run_visible(cargo().current_dir(root()).env("HERD_STRICT", "1").args([
        "test",
        "--locked",
        "--workspace",
    ]))?;
    // The parent links' end-to-end tests (tgtd restart, CHAP, digests,
    // many readers, parent loss and recovery) again on the epoll fallback,
    // forced by the setting, so neither path rots.
    step("cargo test: parent links again on the epoll fallback (--net-io epoll)");
    run_visible(
        cargo()
            .current_dir(root())
            .env("HERD_STRICT", "1")
            .env("HERD_TEST_NET_IO", "epoll")
            .args([
                "test", "--locked", "-p", "herd", "--test", "iscsi", "--test", "chain", "--test",
                "failover",
            ]),
    )
}

fn run_checks(opts: &Options, wanted: &dyn Fn(&str) -> bool) -> Result<()> {
    let mut kinds = vec![Kind::Busybox];
    if !opts.quick {
        kinds.push(Kind::Debian);
    }
    let mut tally = Tally::default();
    for kind in kinds {
        let name = format!("vm_boots_through_chain_{kind:?}").to_lowercase();
        if !wanted(&name) {
            continue;
        }
        let o = demo::Options {
            image: kind,
            levels: 3,
            chunk_size: "64KiB".into(),
            read_ahead: "256KiB".into(),
            accel: Accel::Auto,
            compare_local: false,
            no_storm: true,
        };
        let outcome = demo::run_demo(&o).and_then(|r| {
            println!("{r}");
            check(&r)
        });
        tally.record(&name, outcome);
    }
    // The benchmark harnesses must not rot: --quick runs must produce
    // well-formed, complete JSON. The appliance and the testbed are proven
    // end to end (the slow ones are left out of --quick).
    let mut smokes: Vec<(&str, Smoke)> = vec![
        (
            "storm_quick_every_byte_verified_root_egress_bounded_nothing_left",
            storm_smoke,
        ),
        (
            "failover_quick_every_fault_no_error_no_wrong_byte_nothing_left",
            failover_smoke,
        ),
        ("bench_dataplane_quick_produces_complete_json", bench_smoke),
        ("bench_iscsi_quick_produces_complete_json", iscsi_smoke),
        (
            "bench_sparse_quick_root_serves_only_data_chunks",
            sparse_smoke,
        ),
        ("bench_rss_quick_measures_both_nodes", rss_smoke),
        ("bench_update_quick_moves_only_changed_chunks", update_smoke),
        (
            "vm_boots_from_iscsi_through_a_leaf_root_egress_bounded",
            iscsi_boot_smoke,
        ),
        (
            "vm_boots_from_an_overlay_pinned_to_the_old_version_after_an_update",
            pinned_boot_smoke,
        ),
        ("vagrantfile_validates", crate::vagrant::validate),
        (
            "fuzz_targets_build_and_run_briefly_without_a_crash",
            crate::fuzz::brief,
        ),
    ];
    if !opts.quick {
        smokes.push((
            "boot_profiles_record_agree_and_prefetch",
            boot_profile_smoke,
        ));
        smokes.push(("appliance_boots_as_root_node_lio_to_nbd", appliance_smoke));
        smokes.push((
            "testbed_cycle_lio_herd_kernel_nbd_iscsi_vm_boot",
            testbed_smoke,
        ));
    }
    for (name, smoke) in smokes {
        if wanted(name) {
            tally.record(name, smoke());
        }
    }
    println!(
        "xtask checks: {} passed, {} failed",
        tally.passed, tally.failed
    );
    if tally.passed + tally.failed == 0 {
        bail!("no xtask check matches --check");
    }
    if tally.failed > 0 {
        bail!("{} xtask check(s) failed", tally.failed);
    }
    Ok(())
}

/// Counts the xtask checks and prints each outcome like libtest does.
#[derive(Default)]
struct Tally {
    passed: usize,
    failed: usize,
}

impl Tally {
    fn record(&mut self, name: &str, outcome: Result<()>) {
        match outcome {
            Ok(()) => {
                self.passed += 1;
                println!("test {name} ... ok");
            }
            Err(e) => {
                self.failed += 1;
                println!("test {name} ... FAILED: {e:#}");
            }
        }
    }
}

fn boot_profile_smoke() -> Result<()> {
    let r = crate::boot_profile::run_checks(&demo::build_herd()?)?;
    println!("{r}");
    Ok(())
}

fn bench_smoke() -> Result<()> {
    let out = crate::util::work_dir("bench-smoke");
    let _ = std::fs::remove_dir_all(&out);
    let o = dataplane::Options {
        quick: true,
        size_mib: None,
        runtime: None,
        reps: None,
        out: Some(out.clone()),
        chunk_size: None,
        baseline_herd: None,
        herd_only: false,
        groups: Vec::new(),
        patterns: Vec::new(),
    };
    dataplane::run_bench(&o)?;
    let text = std::fs::read_to_string(out.join("dataplane.json"))?;
    let r: dataplane::Results = serde_json::from_str(&text)?;
    dataplane::validate(&r)?;
    let svg = std::fs::read_to_string(out.join("dataplane.svg"))?;
    anyhow::ensure!(
        svg.contains("<svg") && svg.contains("herd"),
        "SVG lacks the chart"
    );
    // Each herd row says what bounds it, and the relays are set beside
    // the forwarder, every pattern.
    let md = std::fs::read_to_string(out.join("README.md"))?;
    for p in dataplane::PATTERNS {
        let row = report_row(&md, "## What bounds each row", p.name)?;
        anyhow::ensure!(
            ["loopback (", "CPU (", "server core (", "latency ("]
                .iter()
                .any(|v| row.contains(v))
                && !row.contains('–'),
            "{}: no verdict in {row}",
            p.name
        );
        let row = report_row(&md, "## Beside a relay that only forwards", p.name)?;
        anyhow::ensure!(!row.contains('–'), "{}: forwarder row {row}", p.name);
    }
    Ok(())
}

/// The row for `pattern` in the report's section headed `heading`.
fn report_row<'a>(md: &'a str, heading: &str, pattern: &str) -> Result<&'a str> {
    md.split(heading)
        .nth(1)
        .with_context(|| format!("the report lacks {heading:?}"))?
        .lines()
        .find(|l| l.starts_with(&format!("| {pattern} |")))
        .with_context(|| format!("no {pattern} row under {heading:?}"))
}

/// The memory bench on a small image: both nodes measured under load (the
/// bench fails if the clients read nothing); no bound asserted here.
fn rss_smoke() -> Result<()> {
    let o = crate::bench::rss::Options {
        image_gib: 1,
        clients: 8,
        seconds: 5,
        quick: true,
        herd_args: Vec::new(),
    };
    let r = crate::bench::rss::run_bench(&o)?;
    anyhow::ensure!(r.nodes.len() == 2, "nodes missing");
    for n in &r.nodes {
        anyhow::ensure!(
            n.hwm_mib > 0.0 && n.rss_peak_mib > 0.0,
            "{} not sampled",
            n.name
        );
    }
    Ok(())
}

/// The sparse bench on a small image: its own checks hold (the root reads
/// and serves exactly the data chunks, copy and prefetch alike).
fn sparse_smoke() -> Result<()> {
    let o = crate::bench::sparse::Options {
        image_mib: 0,
        data_mib: 0,
        rounds: 1,
        quick: true,
    };
    let r = crate::bench::sparse::run_bench(&o)?;
    anyhow::ensure!(r.runs.len() == 7, "runs missing: {}", r.runs.len());
    Ok(())
}

/// The update bench on a 64 MiB image: its own checks hold (each link
/// moves the changed chunks and at most 1.1× them, the leaf takes the
/// rest from its old version, whose cache goes when it retires).
fn update_smoke() -> Result<()> {
    let o = crate::bench::update::Options {
        image_mib: 0,
        changed_percent: 5.0,
        quick: true,
    };
    let r = crate::bench::update::run_bench(&o)?;
    anyhow::ensure!(
        r.changed_chunks == 51,
        "changed {} chunks",
        r.changed_chunks
    );
    Ok(())
}

/// Every fault of the failover bench, two rounds each, in namespaces with
/// real herds: the bench itself fails on any read error, any wrong byte, or
/// a fault the leaf did not fail over from; then nothing may be left.
fn failover_smoke() -> Result<()> {
    let o = crate::bench::failover::Options {
        rounds: 2,
        image_mib: 64,
        link: "200mbit".into(),
        faults: Vec::new(),
        quick: true,
    };
    crate::bench::failover::run_bench(&o)?;
    let ps = crate::util::output(std::process::Command::new("ps").args(["-eo", "args"]))?;
    let stray: Vec<&str> = ps
        .lines()
        .filter(|l| (l.contains("herd serve") || l.contains("nbdkit")) && l.contains("/failover/"))
        .collect();
    anyhow::ensure!(stray.is_empty(), "processes left: {stray:?}");
    let ns = crate::util::output(std::process::Command::new("ip").args(["netns", "list"]))?;
    let mine = format!("hs{}-", std::process::id());
    anyhow::ensure!(!ns.contains(&mine), "namespaces left: {ns}");
    Ok(())
}

/// A quick storm, every baseline: the replay checks every byte, the tree
/// sends each chunk from the root once, all-from-root once per host, and
/// the fleet leaves nothing behind.
fn storm_smoke() -> Result<()> {
    use crate::bench::storm;
    let out = crate::util::work_dir("storm-smoke");
    let _ = std::fs::remove_dir_all(&out);
    let o = storm::Options::quick(out.clone());
    let r = storm::run_bench(&o)?;
    let back: storm::Results =
        serde_json::from_str(&std::fs::read_to_string(out.join("storm.json"))?)?;
    anyhow::ensure!(back.version == 1, "storm.json version {}", back.version);
    anyhow::ensure!(
        back.baselines.len() == storm::Baseline::ALL.len(),
        "{} of {} baselines in storm.json",
        back.baselines.len(),
        storm::Baseline::ALL.len()
    );
    for svg in ["cdf.svg", "timeline.svg", "bars.svg"] {
        let text = std::fs::read_to_string(out.join(svg))?;
        anyhow::ensure!(
            text.contains("<svg") && text.contains("tree-lazy"),
            "{svg} lacks the chart"
        );
    }
    let ws = r.working_set_chunks_bytes;
    anyhow::ensure!(ws > 0 && r.working_set_bytes > 0, "empty working set");
    for b in &r.baselines {
        anyhow::ensure!(
            b.vms == b.hosts * o.vms && b.boot_secs.len() == b.vms,
            "{}: {} of {} VMs reported",
            b.name,
            b.boot_secs.len(),
            b.hosts * o.vms
        );
        anyhow::ensure!(
            b.errors == 0 && b.mismatches == 0,
            "{}: {} read errors, {} wrong reads",
            b.name,
            b.errors,
            b.mismatches
        );
        // No fault was injected: a parent found down would be a false
        // alarm of the health probes under storm load.
        anyhow::ensure!(
            b.parents_down == 0 && b.failovers == 0,
            "{}: parents found down {} times, {} reads failed over, with no fault",
            b.name,
            b.parents_down,
            b.failovers
        );
        // Every VM read the whole working set and every byte was checked.
        anyhow::ensure!(
            b.bytes_read == b.vms as u64 * r.working_set_bytes && b.verified_bytes == b.bytes_read,
            "{}: read {} bytes, verified {}, expected {} per VM",
            b.name,
            b.bytes_read,
            b.verified_bytes,
            r.working_set_bytes
        );
        let egress = b.root_egress_bytes as f64;
        match b.name.as_str() {
            "tree-lazy" | "tree-prefetch" | "tree-prewarmed" => anyhow::ensure!(
                egress >= ws as f64 && egress <= 1.05 * ws as f64,
                "{}: the root sent {egress} bytes for {ws} bytes of chunks (each should leave once)",
                b.name
            ),
            "all-from-root" => {
                let want = (b.hosts as u64 * ws) as f64;
                anyhow::ensure!(
                    egress >= 0.95 * want && egress <= 1.05 * want,
                    "all-from-root: the root sent {egress} bytes, expected ~{want} ({} hosts × {ws})",
                    b.hosts
                );
            }
            "full-copy" => {
                let want = (b.hosts as u64 * r.image_bytes) as f64;
                anyhow::ensure!(
                    egress >= want && egress <= 1.01 * want,
                    "full-copy: the root sent {egress} bytes, expected {want}"
                );
            }
            other => bail!("unknown baseline {other}"),
        }
    }
    // Nothing left: namespaces and links (checked by the bench itself
    // before it returns), processes, and the work folder.
    let ps = crate::util::output(std::process::Command::new("ps").args(["-eo", "args"]))?;
    let stray: Vec<&str> = ps
        .lines()
        .filter(|l| {
            l.contains("herd serve") && l.contains("/storm-") || l.contains("herd replay run")
        })
        .collect();
    anyhow::ensure!(stray.is_empty(), "processes left: {stray:?}");
    let dirs: Vec<String> = std::fs::read_dir(crate::util::work_dir(""))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("storm-") && n != "storm-images" && n != "storm-smoke")
        .collect();
    anyhow::ensure!(dirs.is_empty(), "work folders left: {dirs:?}");
    println!("{}", std::fs::read_to_string(out.join("README.md"))?);
    // Real VMs in a storm: a tiny one on the real Debian image, a real
    // qemu guest booting on host 1 beside the replays.
    let mut o = storm::Options::quick(crate::util::work_dir("storm-smoke-real"));
    o.hosts = 2;
    o.vms = 2;
    o.real_vms = 1;
    o.baselines = vec![storm::Baseline::TreePrefetch];
    let r = storm::run_bench(&o)?;
    let b = r.baselines.first().context("no baseline ran")?;
    anyhow::ensure!(
        b.real_vm_boot_secs.len() == 1 && b.real_vm_boot_secs[0] > 0.0,
        "the real VM did not boot: {:?}",
        b.real_vm_boot_secs
    );
    anyhow::ensure!(
        b.errors == 0 && b.mismatches == 0 && b.verified_bytes == b.bytes_read && b.bytes_read > 0,
        "replays beside the real VM: {} errors, {} wrong, {} of {} bytes verified",
        b.errors,
        b.mismatches,
        b.verified_bytes,
        b.bytes_read
    );
    Ok(())
}

fn appliance_smoke() -> Result<()> {
    let r = crate::appliance_test::run_check()?;
    println!("{r}");
    Ok(())
}

fn testbed_smoke() -> Result<()> {
    let out = crate::util::work_dir("testbed-bench-quick");
    let _ = std::fs::remove_dir_all(&out);
    let r = crate::vagrant::cycle(&crate::vagrant::Options {
        action: crate::vagrant::Action::Cycle,
        nodes: 3,
        fanout: 2,
        bench: true,
        storm: crate::vagrant::bench::Args::quick(out.clone()),
    })?;
    println!("{r}");
    // The quick storm: every replayed byte checked, and each chunk of the
    // working set left LIO once.
    let text = std::fs::read_to_string(out.join("storm.json"))?;
    let s: crate::vagrant::bench::TestbedStorm = serde_json::from_str(&text)?;
    anyhow::ensure!(
        s.storm.baselines.len() == 2,
        "quick testbed storm: {} baselines",
        s.storm.baselines.len()
    );
    for b in &s.storm.baselines {
        anyhow::ensure!(
            b.vms == s.storm.hosts * s.storm.vms_per_host
                && b.boot_secs.len() == b.vms
                && b.bytes_read > 0
                && b.verified_bytes == b.bytes_read
                && b.errors == 0
                && b.mismatches == 0,
            "testbed {}: {} VMs, {} bytes read, {} verified, {} errors, {} wrong",
            b.name,
            b.boot_secs.len(),
            b.bytes_read,
            b.verified_bytes,
            b.errors,
            b.mismatches
        );
        let lio = s.lio_bytes.get(&b.name).copied().unwrap_or(0);
        let ws = s.storm.working_set_chunks_bytes;
        anyhow::ensure!(
            lio >= s.storm.working_set_bytes && lio as f64 <= ws as f64 * 1.05,
            "testbed {}: the root read {lio} bytes from LIO; the working set is {} ({ws} in whole chunks)",
            b.name,
            s.storm.working_set_bytes
        );
    }
    Ok(())
}

fn iscsi_smoke() -> Result<()> {
    let out = crate::util::work_dir("bench-iscsi-smoke");
    let _ = std::fs::remove_dir_all(&out);
    let r = crate::bench::iscsi::run_bench(&crate::bench::iscsi::Options {
        quick: true,
        out: Some(out.clone()),
    })?;
    let text = std::fs::read_to_string(out.join("iscsi.json"))?;
    let back: crate::bench::iscsi::Results = serde_json::from_str(&text)?;
    anyhow::ensure!(
        back.rows.len() == r.rows.len() && !back.rows.is_empty(),
        "rows missing"
    );
    for row in &back.rows {
        anyhow::ensure!(
            row.herd_median_iops > 0.0
                && row.epoll_median_iops > 0.0
                && row.herd_1w_median_iops > 0.0
                && row.epoll_1w_median_iops > 0.0
                && row.iscsi_perf_median_iops > 0.0,
            "{}: no rate measured",
            row.pattern
        );
    }
    anyhow::ensure!(
        back.target_rows.len() == back.rows.len(),
        "target rows missing"
    );
    for row in &back.target_rows {
        anyhow::ensure!(
            row.herd_target_median_iops > 0.0 && row.tgtd_median_iops > 0.0,
            "{}: no target rate measured",
            row.pattern
        );
    }
    Ok(())
}

/// qemu boots the busybox VM from `iscsi://` on a leaf's target (root →
/// leaf, the leaf serving iSCSI): the VM reaches its marker, its reads
/// came by iSCSI, and the root sent at most twice what the leaf served
/// plus 8 MiB (a tree that moved the image fails).
fn iscsi_boot_smoke() -> Result<()> {
    with_busybox("iscsi-boot", |bin, disk, size, dir| {
        let root = demo::Proxy::start(
            bin,
            dir,
            "root",
            &disk.root.to_string_lossy(),
            "64KiB",
            "256KiB",
        )?;
        let port = crate::util::free_port()?;
        let iqn = "iqn.2026-12.io.herd:boot.herd";
        let listen = format!("127.0.0.1:{port}");
        let leaf = demo::Proxy::start_with(
            bin,
            dir,
            "leaf",
            &root.url(),
            "64KiB",
            "256KiB",
            &["--listen-iscsi", &listen, "--iscsi-target-iqn", iqn],
        )?;
        crate::util::wait_port(port, std::time::Duration::from_secs(20))?;
        let overlay = dir.join("vm.qcow2");
        crate::util::raw_overlay(&overlay, &format!("iscsi://{listen}/{iqn}/0"), size)?;
        let (secs, accel) = boot_busybox(disk, &overlay)?;
        let commands = demo::metric(leaf.metrics, "herd_iscsi_target_commands_total")?;
        let served = demo::metric(leaf.metrics, "herd_served_bytes_total")?;
        let egress = demo::metric(root.metrics, "herd_served_bytes_total")?;
        println!(
            "booted from iSCSI in {secs:.1} s ({accel}): {commands} SCSI commands, leaf served {:.1} MiB, root sent {:.1} MiB",
            served as f64 / f64::from(1 << 20),
            egress as f64 / f64::from(1 << 20)
        );
        anyhow::ensure!(commands > 0 && served > 0, "the VM read nothing by iSCSI");
        anyhow::ensure!(
            egress <= 2 * served + (8 << 20),
            "the root sent {egress} bytes for {served} the VM read"
        );
        Ok(())
    })
}

/// A qcow2 overlay whose backing name pins version A of a leaf's image
/// still boots after version B, unbootable (its first MiB zeroed), was
/// published down the tree; the plain name serves B.
fn pinned_boot_smoke() -> Result<()> {
    with_busybox("pinned-boot", |bin, disk, size, dir| {
        let golden = dir.join("golden.img");
        std::fs::copy(&disk.root, &golden)?;
        // Version A stays while the overlay has not yet connected.
        let keep = ["--retire-after", "600"];
        let start = |name: &str, upstream: &str| {
            demo::Proxy::start_with(bin, dir, name, upstream, "64KiB", "256KiB", &keep)
        };
        let root = start("root", &golden.to_string_lossy())?;
        let leaf = start("leaf", &root.url())?;
        let node = format!("nbd://127.0.0.1:{}", leaf.port);
        let old = latest_identity(bin, &node)?;
        let overlay = dir.join("vm.qcow2");
        crate::util::raw_overlay(&overlay, &format!("{node}/herd@{old}"), size)?;
        step("publishing version B (first MiB zeroed) at the root");
        let next = dir.join("golden.img.new");
        std::fs::copy(&golden, &next)?;
        let f = std::fs::OpenOptions::new().write(true).open(&next)?;
        std::os::unix::fs::FileExt::write_all_at(&f, &vec![0u8; 1 << 20], 0)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&next, &golden)?;
        crate::util::run(
            std::process::Command::new("kill").args(["-HUP", &root.pid().to_string()]),
        )?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while demo::metric(leaf.metrics, "herd_image_versions")? != 2 {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "version B did not reach the leaf in 120 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let new = latest_identity(bin, &node)?;
        anyhow::ensure!(new != old, "the leaf's latest is still {old}");
        // The plain name is B, its first MiB zeros; the overlay reads A's.
        let zeros = |format: &str, target: &str| -> Result<bool> {
            let out = std::process::Command::new("qemu-io")
                .args(["-r", "-f", format, "-c", "read -P 0 0 1M", target])
                .output()
                .context("cannot run qemu-io")?;
            let text = String::from_utf8_lossy(&out.stdout);
            // qemu-io fails a read whose bytes are not the pattern; any
            // other failure is the check's.
            if text.contains("Pattern verification failed") {
                return Ok(false);
            }
            anyhow::ensure!(
                out.status.success() && text.contains("read 1048576/1048576 bytes"),
                "qemu-io {target}: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(true)
        };
        anyhow::ensure!(
            zeros("raw", &format!("{node}/herd"))?,
            "the latest version is not B"
        );
        anyhow::ensure!(
            !zeros("qcow2", &overlay.to_string_lossy())?,
            "the overlay pinned to A reads B's zeros"
        );
        let (secs, accel) = boot_busybox(disk, &overlay)?;
        println!("booted version {old} after {new} was published, in {secs:.1} s ({accel})");
        Ok(())
    })
}

/// Runs `check` with the release herd, the busybox disk, its size and a
/// fresh work directory `name` (removed afterwards, pass or fail).
fn with_busybox(
    name: &str,
    check: impl FnOnce(&std::path::Path, &crate::image::Disk, u64, &std::path::Path) -> Result<()>,
) -> Result<()> {
    crate::deps::ensure(crate::deps::PACKAGES)?;
    let bin = demo::build_herd()?;
    let disk = crate::image::ensure(Kind::Busybox)?;
    let size = std::fs::metadata(&disk.root)?.len();
    let dir = crate::util::work_dir(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let res = check(&bin, &disk, size, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    res
}

/// Boots the busybox VM from `overlay` (qcow2), KVM if it works here:
/// (seconds to the marker, accelerator).
fn boot_busybox(
    disk: &crate::image::Disk,
    overlay: &std::path::Path,
) -> Result<(f64, &'static str)> {
    let accel = demo::auto_accel(disk);
    let secs = demo::boot(
        disk,
        overlay,
        "qcow2",
        accel,
        std::time::Duration::from_secs(180),
        None,
    )?;
    Ok((secs, accel))
}

/// The identity (16 hex digits, enough to pin it) of the latest version
/// of the default image `node` serves, from `herd image list`.
fn latest_identity(bin: &std::path::Path, node: &str) -> Result<String> {
    let text = crate::util::output(std::process::Command::new(bin).args(["image", "list", node]))?;
    text.lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some("herd")).then(|| f.next().map(str::to_owned))?
        })
        .with_context(|| format!("no `herd` row in herd image list:\n{text}"))
}

/// What must hold after a boot through the chain.
fn check(r: &demo::Report) -> Result<()> {
    anyhow::ensure!(r.vm_read_bytes > 0, "the leaf served no bytes");
    anyhow::ensure!(r.root_served_bytes > 0, "the root served no bytes");
    // Chunks are fetched once per level: the root can never send more than
    // the image, however much the VM re-reads.
    anyhow::ensure!(
        r.root_served_bytes <= r.image_size,
        "root served {} bytes of a {}-byte image",
        r.root_served_bytes,
        r.image_size
    );
    // Near the working set: what the VM read (re-reads included), rounded
    // out to chunks and widened by read-ahead at each level, measured at
    // 1.28x for Debian. A tree that moved the whole image fails this.
    let bound = 2 * r.vm_read_bytes + (8 << 20);
    anyhow::ensure!(
        r.root_served_bytes <= bound,
        "root served {} bytes for a boot that read {} (bound {bound})",
        r.root_served_bytes,
        r.vm_read_bytes
    );
    // Each chunk is read off the root's disk at most once (read-ahead may
    // read chunks the relay never asks for, so served and read can differ).
    anyhow::ensure!(
        r.root_file_bytes <= r.image_size,
        "root read {} bytes of a {}-byte image",
        r.root_file_bytes,
        r.image_size
    );
    Ok(())
}
