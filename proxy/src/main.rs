//! `herd`: the herd proxy daemon and its command-line tools.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

mod cli;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use herd::cache::ChunkCache;
use herd::config::{FileConfig, ServeConfig};
use herd::export::nbd::{self as nbd_export, Export};
use herd::io::Engine;
use herd::manifest::Manifest;
use herd::net::Listener;
use herd::prefetch::propagate;
use herd::prefetch::propagate::Published;
use herd::profile::{identity_of_upstream, ImageId, Profile};
use herd::record::daemon::ClientRecorder;
use herd::upstream::file::FileUpstream;
use herd::upstream::iscsi::{IscsiTarget, IscsiUpstream};
use herd::upstream::nbd::NbdUpstream;
use herd::upstream::{Upstream, UpstreamError, UpstreamUrl};

#[derive(Parser)]
#[command(
    name = "herd",
    version,
    about = "Serve one VM image to a fleet through a tree of caching NBD proxies"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve an image over NBD, fetching chunks from the upstream on demand.
    Serve(Box<ServeArgs>),
    /// iSCSI tools.
    #[command(subcommand)]
    Iscsi(IscsiCmd),
    /// Record which bytes of an image a boot reads (eBPF; needs root).
    Record(cli::record::RecordArgs),
    /// Inspect, merge and compare boot profiles.
    #[command(subcommand)]
    Profile(cli::profile::ProfileCmd),
    /// Replay recorded boots as many emulated VMs (the boot-storm client).
    #[command(subcommand)]
    Replay(cli::replay::ReplayCmd),
    /// Image manifests: the per-chunk digests every node checks fetches against.
    #[command(subcommand)]
    Manifest(cli::manifest::ManifestCmd),
    /// Cache directories, offline.
    #[command(subcommand)]
    Cache(cli::cache::CacheCmd),
}

#[derive(Subcommand)]
enum IscsiCmd {
    /// Show what a target offers: targets, LUNs, capacity, block size, vendor, limits.
    Probe {
        /// iscsi://[user@]host[:port][/<target-iqn>[/<lun>]]
        url: String,
        /// File holding the CHAP secret (else HERD_ISCSI_SECRET).
        #[arg(long)]
        iscsi_secret_file: Option<PathBuf>,
        /// Our initiator IQN.
        #[arg(long, default_value = herd::config::DEFAULT_INITIATOR)]
        iscsi_initiator: String,
    },
    /// Measure the initiator alone: read a LUN for a while, print JSON.
    Bench(cli::iscsi::BenchArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML file with the same keys as these flags (flags win).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Image source: a path, file://PATH, nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH.
    #[arg(long)]
    upstream: Option<String>,
    /// Where to serve: HOST:PORT or unix:PATH (repeatable).
    #[arg(long)]
    listen: Vec<String>,
    /// Directory for the chunk cache (data file + bitmap).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Export name clients ask for ("" always works too).
    #[arg(long)]
    export_name: Option<String>,
    /// Cache chunk size, a power of two from 4KiB to 32MiB (default 64KiB).
    #[arg(long)]
    chunk_size: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    metrics: Option<String>,
    /// NBD connections to the parent (default 4).
    #[arg(long)]
    connections: Option<usize>,
    /// Seconds to keep retrying an unreachable parent at startup (default 30).
    #[arg(long)]
    parent_timeout: Option<u64>,
    /// Bytes to fetch ahead of a sequential reader that misses (0: off;
    /// default 256KiB).
    #[arg(long)]
    read_ahead: Option<String>,
    /// Async worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// File holding the CHAP secret for iscsi://USER@… (else HERD_ISCSI_SECRET).
    #[arg(long)]
    iscsi_secret_file: Option<PathBuf>,
    /// Our iSCSI initiator IQN.
    #[arg(long)]
    iscsi_initiator: Option<String>,
    /// Offer CRC32C header and data digests to the iSCSI target.
    #[arg(long)]
    iscsi_digests: bool,
    /// What drives the iSCSI session socket: epoll (default) or uring.
    #[arg(long)]
    iscsi_socket: Option<String>,
    /// Read the local upstream through the page cache instead of O_DIRECT.
    #[arg(long)]
    no_direct_io: bool,
    /// Boot profile to prefetch and pass down the tree (children learn it
    /// from their parent).
    #[arg(long)]
    profile: Option<PathBuf>,
    /// The image's manifest, made by `herd manifest build` (a root, or a
    /// node over qemu-nbd/nbdkit); children get theirs from the parent.
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// Record what this proxy's clients read into a profile.
    #[arg(long)]
    record_profile: Option<PathBuf>,
    /// What to fetch ahead of demand: none, profile (default), full.
    #[arg(long)]
    prefetch: Option<String>,
    /// Upstream reads prefetch keeps in flight (default 2).
    #[arg(long)]
    prefetch_concurrency: Option<usize>,
    /// Cap prefetch at this many bytes per second (e.g. 50MiB).
    #[arg(long)]
    prefetch_rate: Option<String>,
}

impl ServeArgs {
    fn into_config(self) -> Result<ServeConfig> {
        let file = match &self.config {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        let flags = FileConfig {
            upstream: self.upstream,
            listen: Some(self.listen),
            cache_dir: self.cache_dir,
            export_name: self.export_name,
            chunk_size: self.chunk_size,
            metrics: self.metrics,
            connections: self.connections,
            direct_io: self.no_direct_io.then_some(false),
            parent_timeout: self.parent_timeout,
            read_ahead: self.read_ahead,
            iscsi_secret_file: self.iscsi_secret_file,
            iscsi_initiator: self.iscsi_initiator,
            iscsi_recovery: None,
            iscsi_digests: self.iscsi_digests.then_some(true),
            iscsi_socket: self.iscsi_socket,
            profile: self.profile,
            manifest: self.manifest,
            record_profile: self.record_profile,
            prefetch: self.prefetch,
            prefetch_concurrency: self.prefetch_concurrency,
            prefetch_rate: self.prefetch_rate,
        };
        Ok(file.merge(flags).validate()?)
    }
}

fn main() -> std::process::ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: journald and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Cli::parse();
    let res = match args.command {
        Command::Serve(args) => {
            let workers = args.workers;
            (*args).into_config().and_then(|c| serve(c, workers))
        }
        Command::Iscsi(IscsiCmd::Probe {
            url,
            iscsi_secret_file,
            iscsi_initiator,
        }) => cli::iscsi::probe(&url, iscsi_secret_file, iscsi_initiator),
        Command::Iscsi(IscsiCmd::Bench(b)) => cli::iscsi::bench(&b),
        Command::Record(r) => cli::record::record(&r),
        Command::Profile(p) => cli::profile::run(p),
        Command::Replay(r) => cli::replay::run(r),
        Command::Manifest(m) => cli::manifest::run(m),
        Command::Cache(c) => cli::cache::run(c),
    };
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herd: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn serve(cfg: ServeConfig, workers: Option<usize>) -> Result<()> {
    // One worker per core by default, plus the io_uring thread for file
    // I/O (DESIGN.md has the measurements behind this).
    let workers = workers
        .unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
        })
        .clamp(1, 256);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .thread_name("herd-worker")
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(serve_async(cfg))
}

async fn open_upstream(cfg: &ServeConfig, engine: &Engine) -> Result<Arc<dyn Upstream>> {
    Ok(match &cfg.upstream {
        UpstreamUrl::File(p) => {
            let up = FileUpstream::open(p, engine.clone(), cfg.direct_io)
                .with_context(|| format!("upstream file {} is unreadable", p.display()))?;
            tracing::info!(path = %p.display(), size = up.size(), direct = up.is_direct(), "serving from local file");
            Arc::new(up)
        }
        UpstreamUrl::Iscsi {
            host,
            port,
            target,
            lun,
            user,
        } => {
            let chap = match user {
                Some(u) => Some(herd::iscsi::Chap {
                    user: u.clone(),
                    secret: cfg.iscsi.secret()?,
                }),
                None => None,
            };
            let t = IscsiTarget {
                portal: herd::iscsi::Portal {
                    host: host.clone(),
                    port: *port,
                },
                target: target.clone(),
                lun: *lun,
                initiator: cfg.iscsi.initiator.clone(),
                chap,
                recovery: cfg.iscsi.recovery,
                socket: if cfg.iscsi.uring_socket {
                    herd::iscsi::SocketMode::Uring(engine.clone())
                } else {
                    herd::iscsi::SocketMode::Epoll
                },
                digests: cfg.iscsi.digests,
            };
            let up = IscsiUpstream::connect(t).await.with_context(|| {
                format!("cannot read LUN {lun} of iSCSI target {target} at {host}:{port}")
            })?;
            Arc::new(up)
        }
        url => {
            let up = connect_parent(url, cfg)
                .await
                .with_context(|| format!("parent {url} is unreachable or refused the export"))?;
            tracing::info!(parent = %url, size = up.size(), "connected to parent");
            Arc::new(up)
        }
    })
}

/// Connects to the parent, retrying while it is unreachable (not when it
/// answers wrongly) until `parent_timeout`.
async fn connect_parent(
    url: &UpstreamUrl,
    cfg: &ServeConfig,
) -> Result<NbdUpstream, UpstreamError> {
    let deadline = tokio::time::Instant::now() + cfg.parent_timeout;
    let mut wait = Duration::from_millis(100);
    loop {
        match NbdUpstream::connect(url.clone(), cfg.connections).await {
            Err(e @ UpstreamError::Connect { .. })
                if tokio::time::Instant::now() + wait < deadline =>
            {
                tracing::warn!(error = %herd::error_chain(&e), retry_in = ?wait, "parent not reachable yet");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

/// The image's manifest: the parent's, for a herd parent; otherwise this
/// node is a trust anchor and takes a given one, reuses its own, or builds
/// it (before it listens: no manifest, no service).
async fn obtain_manifest(cfg: &ServeConfig, upstream: &Arc<dyn Upstream>) -> Result<Manifest> {
    let size = upstream.size();
    let asked = std::time::Instant::now();
    if let Some(m) = herd::manifest::fetch_from_parent(&cfg.upstream)
        .await
        .with_context(|| format!("parent {} sent no usable manifest", cfg.upstream))?
    {
        m.fits(
            &format!("from parent {}", cfg.upstream),
            size,
            cfg.chunk_size,
        )?;
        if let Some(path) = &cfg.manifest {
            let given = herd::manifest::load(path)?;
            anyhow::ensure!(
                given.identity() == m.identity(),
                "--manifest {} is image {}, but parent {} serves image {}",
                path.display(),
                given.identity(),
                cfg.upstream,
                m.identity()
            );
        }
        tracing::info!(
            identity = %m.identity(),
            chunks = m.chunks(),
            bytes = m.bytes().len(),
            ms = asked.elapsed().as_millis(),
            "manifest from the parent"
        );
        return Ok(m);
    }
    let (m, origin) = herd::manifest::for_anchor(
        Arc::clone(upstream),
        &cfg.upstream,
        cfg.manifest.as_deref(),
        &cfg.cache_dir,
        cfg.chunk_size,
    )
    .await
    .with_context(|| format!("no manifest for {}", upstream.describe()))?;
    tracing::info!(identity = %m.identity(), chunks = m.chunks(), ?origin, "manifest ready");
    Ok(m)
}

async fn serve_async(cfg: ServeConfig) -> Result<()> {
    if let Some(addr) = &cfg.metrics {
        herd::metrics::install(addr)?;
    }
    let engine = Engine::start(256, false).context("cannot start the I/O engine")?;
    tracing::info!(backend = ?engine.backend(), "file I/O engine");
    let upstream = open_upstream(&cfg, &engine).await?;
    herd::metrics::image_size(upstream.size());
    let manifest = Arc::new(obtain_manifest(&cfg, &upstream).await?);
    herd::metrics::image_identity(&manifest.identity().to_string());
    let cache = ChunkCache::open(&cfg.cache_dir, upstream, cfg.chunk_size, engine, manifest)
        .with_context(|| format!("cannot use cache directory {}", cfg.cache_dir.display()))?;
    tracing::info!(
        dir = %cfg.cache_dir.display(),
        chunk_size = cfg.chunk_size,
        present = cache.chunks_present(),
        total = cache.chunks_total(),
        "cache ready"
    );
    // The image's identity (32 sampled blocks read from the upstream) is
    // needed to check a given profile and to stamp a recorded one.
    let identity = if cfg.profile.is_some() || cfg.record_profile.is_some() {
        Some(
            identity_of_upstream(cache.upstream())
                .await
                .context("cannot read the image's identity samples")?,
        )
    } else {
        None
    };
    if herd::manifest::manifest_url(&cfg.upstream).is_some() {
        tokio::spawn(herd::manifest::watch_parent(
            Arc::clone(&cache),
            cfg.upstream.clone(),
            Duration::from_secs(5),
        ));
    }
    let (profile_tx, profile_rx) = tokio::sync::watch::channel(None);
    if let (Some(path), Some(id)) = (&cfg.profile, &identity) {
        let published = load_profile(path, cache.size(), id)?;
        let _ = profile_tx.send(Some(Arc::new(published)));
    } else if let Some(url) = propagate::profile_url(&cfg.upstream) {
        tokio::spawn(propagate::poll_parent(url, cache.size(), profile_tx));
    }
    tokio::spawn(propagate::follow(
        Arc::clone(&cache),
        profile_rx.clone(),
        cfg.prefetch,
    ));
    let recorder = match (&cfg.record_profile, identity) {
        (Some(path), Some(id)) => {
            tracing::info!(path = %path.display(), "recording what clients read");
            Some(Arc::new(ClientRecorder::new(
                path.clone(),
                cache.size(),
                id,
            )))
        }
        _ => None,
    };
    if let Some(rec) = recorder.clone() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tick.tick().await;
                if let Err(e) = rec.save() {
                    tracing::warn!(error = %e, "cannot write the recorded profile");
                }
            }
        });
    }
    let export = Arc::new(Export {
        name: cfg.export_name.clone(),
        description: format!("herd proxy of {}", cache.upstream().describe()),
        cache: Arc::clone(&cache),
        read_ahead: cfg.read_ahead,
        profile: profile_rx,
        recorder: recorder.clone(),
    });
    for addr in &cfg.listen {
        let l = Listener::bind(addr).await?;
        tracing::info!(listen = %l.local_addr(), export = %cfg.export_name, "serving NBD");
        tokio::spawn(nbd_export::serve(l, Arc::clone(&export)));
    }
    herd::metrics::serving();
    let syncer = Arc::clone(&cache);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            if let Err(e) = syncer.sync() {
                tracing::warn!(error = %herd::error_chain(&e), "bitmap sync failed");
            }
        }
    });
    shutdown_signal().await;
    tracing::info!("shutting down");
    if !cache.settle(Duration::from_secs(10)).await {
        tracing::warn!("chunks still being cached at exit will be fetched again");
    }
    cache.sync().context("final bitmap sync failed")?;
    if let Some(rec) = recorder {
        rec.save().context("cannot write the recorded profile")?;
        let p = rec.profile();
        tracing::info!(
            extents = p.extents.len(),
            bytes = p.bytes(),
            "recorded profile written"
        );
    }
    Ok(())
}

/// Reads the root's profile and refuses one recorded on another image.
fn load_profile(path: &std::path::Path, size: u64, id: &ImageId) -> Result<Published> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read profile {}", path.display()))?;
    let p = Profile::decode(&bytes)
        .with_context(|| format!("{} is not a usable profile", path.display()))?;
    p.check_image(size, id)
        .with_context(|| format!("profile {} does not fit this image", path.display()))?;
    tracing::info!(path = %path.display(), extents = p.extents.len(), bytes = p.bytes(), "boot profile loaded");
    Ok(Published { bytes, profile: p })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
