//! `herd record`: record a boot with the eBPF recorder.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use herd::profile::{identity_of_file, unix_now, ProfileBuilder, Summary};
use herd::record::{self, RecordError, Session, Target};

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["device", "file"])))]
pub struct RecordArgs {
    /// Record reads of this block device (block:block_rq_issue).
    #[arg(long)]
    device: Option<PathBuf>,
    /// Record reads of this image file through the page cache
    /// (filemap:mm_filemap_add_to_page_cache).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Where to write the profile.
    #[arg(long)]
    out: PathBuf,
    /// Stop after this many seconds (else when COMMAND exits, or on Ctrl-C).
    #[arg(long)]
    duration: Option<f64>,
    /// Do not drop the image's cached pages first (reads served from the
    /// page cache are then invisible to the recorder).
    #[arg(long)]
    keep_page_cache: bool,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Command to run while recording (e.g. a qemu boot).
    #[arg(last = true)]
    command: Vec<String>,
}

pub fn record(args: &RecordArgs) -> Result<()> {
    if !record::has_bpf_capability() {
        bail!(RecordError::NoCapability);
    }
    let object = record::object_path()?;
    record::ensure_tracefs()?;
    record::tracefs::check_layout()?;
    let (path, device) = match (&args.device, &args.file) {
        (Some(d), _) => (d, true),
        (None, Some(f)) => (f, false),
        (None, None) => bail!("give --device or --file"),
    };
    let target = Target::open(path, device)?;
    // Identity first: its sample reads must not end up in the recording.
    let identity = identity_of_file(&target.file, target.size)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if !args.keep_page_cache {
        target
            .evict_page_cache()
            .with_context(|| format!("cannot drop the cached pages of {}", path.display()))?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(run(args, &object, target, identity))
}

async fn run(
    args: &RecordArgs,
    object: &std::path::Path,
    target: Target,
    identity: herd::profile::ImageId,
) -> Result<()> {
    let mut session = Session::start(object, target.kind)?;
    let mut builder = ProfileBuilder::new(target.size, 4096);
    tracing::info!(target = %target.path.display(), kind = ?target.kind, "recording");
    let mut child = match args.command.split_first() {
        Some((prog, rest)) => Some(
            tokio::process::Command::new(prog)
                .args(rest)
                .spawn()
                .with_context(|| format!("cannot run {prog}"))?,
        ),
        None => None,
    };
    let deadline = args
        .duration
        .map(|s| tokio::time::Instant::now() + Duration::from_secs_f64(s.max(0.0)));
    let mut status = None;
    let mut last_log = tokio::time::Instant::now();
    loop {
        let wait_child = async {
            match child.as_mut() {
                Some(c) => c.wait().await.ok(),
                None => std::future::pending().await,
            }
        };
        let until = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            s = wait_child => { status = s; break; }
            () = until => break,
            _ = tokio::signal::ctrl_c() => break,
            r = session.pump(&mut builder, Duration::from_millis(250)) => r?,
        }
        if last_log.elapsed() >= Duration::from_secs(5) {
            last_log = tokio::time::Instant::now();
            let t = session.totals()?;
            tracing::info!(
                events = t.events,
                drops = t.drops,
                mib = builder.bytes() >> 20,
                "recording"
            );
        }
    }
    // Events of the last moments may still be in the ring.
    tokio::time::sleep(Duration::from_millis(100)).await;
    session.drain(&mut builder);
    let totals = session.totals()?;
    let secs = session.started.elapsed().as_secs_f64();
    let profile = builder.finish(identity, unix_now());
    profile
        .save(&args.out)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    let summary = Summary::of(&profile, 64 << 10);
    let events_per_s = totals.events as f64 / secs.max(1e-3);
    if args.json {
        let v = serde_json::json!({
            "events": totals.events,
            "drops": totals.drops,
            "seconds": secs,
            "events_per_second": events_per_s,
            "bytes_read": totals.bytes_read,
            "profile": summary,
            "out": args.out,
        });
        println!("{v}");
    } else {
        eprintln!(
            "recorded {} events in {secs:.1} s ({events_per_s:.0}/s), {} dropped; {} extents, {:.1} MiB → {}",
            totals.events,
            totals.drops,
            profile.extents.len(),
            profile.bytes() as f64 / f64::from(1 << 20),
            args.out.display()
        );
    }
    if totals.drops > 0 {
        tracing::warn!(
            drops = totals.drops,
            "the ring buffer overflowed: the profile misses reads"
        );
    }
    if let Some(s) = status {
        if !s.success() {
            bail!("the command exited with {s} (the profile was still written)");
        }
    }
    Ok(())
}
