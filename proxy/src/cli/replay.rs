//! `herd replay run`: replay a recorded boot as N VMs against an NBD export
//! or a local file, checking every byte. `herd replay image`: write the
//! seeded synthetic image a trace is replayed on, and the trace rebased onto
//! it (scaled, with the new image's identity).

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use herd::io::Engine;
use herd::profile::identity_of_file;
use herd::replay::{self, pattern, Scaling, Schedule, Verify, VmReport};
use herd::upstream::file::FileUpstream;
use herd::upstream::nbd::NbdUpstream;
use herd::upstream::{Upstream, UpstreamUrl};

use super::profile::load;

#[derive(clap::Subcommand)]
pub enum ReplayCmd {
    /// Replay a recorded boot as VMs reading an export; one JSON line per VM.
    Run(RunArgs),
    /// Write a seeded synthetic image for a trace and the trace rebased onto it.
    Image(ImageArgs),
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// The boot profile to replay (recorded first accesses with their times).
    #[arg(long)]
    trace: PathBuf,
    /// What the VMs read: nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, or a file.
    #[arg(long)]
    uri: String,
    /// VMs to replay at once, each with its own connection.
    #[arg(long, default_value_t = 1)]
    vms: usize,
    /// Multiplies the recorded think times (0.5 = twice as fast).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Replays the same access shape on a K× larger image (offsets and lengths ×K).
    #[arg(long, default_value_t = 1)]
    image_scale: u64,
    /// Reads that began within this many µs of their burst's first were in flight together.
    #[arg(long, default_value_t = 1000)]
    overlap_us: u64,
    /// Check bytes against the synthetic image of this seed (`herd replay image`).
    #[arg(long, conflicts_with_all = ["verify_image", "no_verify"])]
    verify_seed: Option<u64>,
    /// Check bytes against this image file.
    #[arg(long, conflicts_with = "no_verify")]
    verify_image: Option<PathBuf>,
    /// Do not check bytes.
    #[arg(long)]
    no_verify: bool,
    /// Start at this Unix time in milliseconds (so many hosts start together).
    #[arg(long)]
    start_at_ms: Option<u64>,
    /// Print JSON lines (one per VM, then a summary) instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct ImageArgs {
    /// The recorded boot profile to rebase.
    #[arg(long)]
    trace: PathBuf,
    /// Seed of the synthetic image.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Image size = the trace's image size × K.
    #[arg(long, default_value_t = 1)]
    image_scale: u64,
    /// Where to write the image.
    #[arg(long, required_unless_present = "onto")]
    out: Option<PathBuf>,
    /// Rebase onto this existing image instead of writing one (its size
    /// must be the trace's × --image-scale): replays then check bytes with
    /// --verify-image.
    #[arg(long, conflicts_with = "out")]
    onto: Option<PathBuf>,
    /// Where to write the rebased profile (scaled, this image's identity).
    #[arg(long)]
    profile_out: PathBuf,
}

pub fn run(cmd: ReplayCmd) -> Result<()> {
    match cmd {
        ReplayCmd::Run(a) => run_vms(&a),
        ReplayCmd::Image(a) => image(&a),
    }
}

/// Summary line after the per-VM lines.
#[derive(serde::Serialize)]
struct Summary {
    vms: usize,
    trace_bytes: u64,
    trace_requests: usize,
    think_secs: f64,
    bytes: u64,
    verified_bytes: u64,
    errors: u64,
    mismatches: u64,
    boot_secs_min: f64,
    boot_secs_median: f64,
    boot_secs_max: f64,
    /// CPU seconds this process used (user + system): the replay's own cost.
    cpu_secs: f64,
}

fn run_vms(a: &RunArgs) -> Result<()> {
    anyhow::ensure!(a.vms >= 1, "--vms must be at least 1");
    let profile = load(&a.trace)?;
    let scaling = Scaling {
        time_scale: a.time_scale,
        image_scale: a.image_scale,
        overlap: Duration::from_micros(a.overlap_us),
        ..Scaling::default()
    };
    let schedule = Arc::new(
        replay::schedule(&profile, &scaling)
            .with_context(|| format!("cannot replay {}", a.trace.display()))?,
    );
    let verify = Arc::new(if let Some(seed) = a.verify_seed {
        Verify::Pattern(seed)
    } else if let Some(p) = &a.verify_image {
        Verify::File(Arc::new(
            std::fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?,
        ))
    } else if a.no_verify {
        Verify::None
    } else {
        bail!("say how to check the bytes: --verify-seed, --verify-image or --no-verify");
    });
    let url: UpstreamUrl = a.uri.parse()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let reports = rt.block_on(replay_all(a, &url, schedule.clone(), verify))?;
    let summary = summarise(&schedule, &reports);
    if a.json {
        println!("{}", serde_json::json!({ "summary": summary }));
    } else {
        print_table(&summary);
    }
    if summary.errors > 0 || summary.mismatches > 0 {
        bail!(
            "{} read error(s) and {} wrong read(s) across {} VMs",
            summary.errors,
            summary.mismatches,
            summary.vms
        );
    }
    Ok(())
}

async fn open_reader(url: &UpstreamUrl, engine: Option<&Engine>) -> Result<Arc<dyn Upstream>> {
    Ok(match (url, engine) {
        (UpstreamUrl::File(p), Some(engine)) => Arc::new(
            FileUpstream::open(p, engine.clone(), false)
                .with_context(|| format!("cannot read {}", p.display()))?,
        ),
        (UpstreamUrl::NbdTcp { .. } | UpstreamUrl::NbdUnix { .. }, _) => Arc::new(
            NbdUpstream::connect(url.clone(), 1)
                .await
                .with_context(|| format!("cannot open {url}"))?,
        ),
        _ => bail!("replay reads an NBD export or a local file, not {url}"),
    })
}

async fn replay_all(
    a: &RunArgs,
    url: &UpstreamUrl,
    schedule: Arc<Schedule>,
    verify: Arc<Verify>,
) -> Result<Vec<VmReport>> {
    if let Some(at) = a.start_at_ms {
        let wait = at.saturating_sub(replay::unix_ms());
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
    let start_ms = replay::unix_ms();
    let start = Instant::now();
    let engine = match url {
        UpstreamUrl::File(_) => {
            Some(Engine::start(256, false).context("cannot start the I/O engine")?)
        }
        _ => None,
    };
    // Each VM opens its disk as part of its boot, as qemu does.
    let mut set = tokio::task::JoinSet::new();
    for vm in 0..a.vms {
        let (url, engine, schedule, verify) = (
            url.clone(),
            engine.clone(),
            schedule.clone(),
            verify.clone(),
        );
        let image_scale = a.image_scale;
        set.spawn(async move {
            let reader = open_reader(&url, engine.as_ref()).await?;
            replay::check_size(&schedule, reader.size(), image_scale)?;
            Ok::<_, anyhow::Error>(
                replay::replay_vm(vm, reader, schedule, verify, start_ms, start).await,
            )
        });
    }
    let mut out = Vec::with_capacity(a.vms);
    let mut first_err = None;
    // A bar for people; JSON lines for programs.
    let pb = if a.json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(a.vms as u64)
    };
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "[{elapsed_precise}] {bar:30} {pos}/{len} VMs booted",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    while let Some(done) = set.join_next().await {
        pb.inc(1);
        match done.context("a VM task failed")? {
            Ok(r) => {
                if a.json {
                    // One line per VM as it finishes: the storm bench's progress.
                    let mut stdout = std::io::stdout().lock();
                    writeln!(stdout, "{}", serde_json::to_string(&r)?)?;
                    stdout.flush()?;
                }
                out.push(r);
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    pb.finish_and_clear();
    if let Some(e) = first_err {
        return Err(e);
    }
    out.sort_by_key(|r| r.vm);
    Ok(out)
}

fn summarise(schedule: &Schedule, reports: &[VmReport]) -> Summary {
    let mut boots: Vec<f64> = reports.iter().map(|r| r.boot_secs).collect();
    boots.sort_by(f64::total_cmp);
    Summary {
        vms: reports.len(),
        trace_bytes: schedule.bytes(),
        trace_requests: schedule.requests(),
        think_secs: schedule.think_time().as_secs_f64(),
        bytes: reports.iter().map(|r| r.bytes).sum(),
        verified_bytes: reports.iter().map(|r| r.verified_bytes).sum(),
        errors: reports.iter().map(|r| r.errors).sum(),
        mismatches: reports.iter().map(|r| r.mismatches).sum(),
        boot_secs_min: boots.first().copied().unwrap_or(0.0),
        boot_secs_median: boots.get(boots.len() / 2).copied().unwrap_or(0.0),
        boot_secs_max: boots.last().copied().unwrap_or(0.0),
        cpu_secs: own_cpu_secs(),
    }
}

/// CPU time this process has used so far.
fn own_cpu_secs() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    use nix::sys::time::TimeValLike;
    getrusage(UsageWho::RUSAGE_SELF).map_or(0.0, |u| {
        #[allow(clippy::cast_precision_loss)]
        let secs = |t: nix::sys::time::TimeVal| t.num_microseconds() as f64 / 1e6;
        secs(u.user_time()) + secs(u.system_time())
    })
}

#[allow(clippy::cast_precision_loss)] // byte counts shown in MiB
fn print_table(s: &Summary) {
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    println!("replayed VMs        : {}", s.vms);
    println!(
        "trace               : {:.1} MiB in {} reads, {:.2} s of think time",
        mib(s.trace_bytes),
        s.trace_requests,
        s.think_secs
    );
    println!(
        "boot time           : min {:.2} s, median {:.2} s, max {:.2} s",
        s.boot_secs_min, s.boot_secs_median, s.boot_secs_max
    );
    println!(
        "bytes read/verified : {:.1} / {:.1} MiB",
        mib(s.bytes),
        mib(s.verified_bytes)
    );
    println!("errors / wrong reads: {} / {}", s.errors, s.mismatches);
}

fn image(a: &ImageArgs) -> Result<()> {
    let profile = load(&a.trace)?;
    let mut scaled = replay::scale_profile(&profile, a.image_scale)?;
    let size = scaled.image_size;
    let target = match (&a.onto, &a.out) {
        (Some(onto), _) => {
            let have = std::fs::metadata(onto)
                .with_context(|| format!("cannot read {}", onto.display()))?
                .len();
            anyhow::ensure!(
                have == size,
                "{} is {have} bytes, but the trace × {} is for {size}",
                onto.display(),
                a.image_scale
            );
            onto.clone()
        }
        (None, Some(out)) => {
            write_pattern(out, a.seed, size)?;
            out.clone()
        }
        (None, None) => bail!("give --out or --onto"),
    };
    let f = std::fs::File::open(&target)?;
    scaled.identity = identity_of_file(&f, size)?;
    std::fs::write(&a.profile_out, scaled.encode())
        .with_context(|| format!("cannot write {}", a.profile_out.display()))?;
    println!(
        "{}: {} bytes; {}: {} extents, {} bytes",
        target.display(),
        size,
        a.profile_out.display(),
        scaled.extents.len(),
        scaled.bytes()
    );
    Ok(())
}

/// Writes the synthetic image of `seed` (via a temporary name, so a
/// half-written image is never taken for a whole one).
fn write_pattern(out: &std::path::Path, seed: u64, size: u64) -> Result<()> {
    let tmp = out.with_extension("partial");
    {
        let f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = std::io::BufWriter::with_capacity(4 << 20, f);
        let mut buf = vec![0u8; 4 << 20];
        let mut at = 0u64;
        while at < size {
            let n = usize::try_from((size - at).min(buf.len() as u64))?;
            pattern::fill(seed, at, &mut buf[..n]);
            w.write_all(&buf[..n])
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            at += n as u64;
        }
        let f = w
            .into_inner()
            .map_err(std::io::IntoInnerError::into_error)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, out)?;
    Ok(())
}
