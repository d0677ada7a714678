//! `herd serve`: the daemon. It opens the image (a root) or its parents
//! (failover between them, from `--upstream` or fleet membership), gets the
//! manifest, opens the cache and serves NBD.

mod fleet;
mod image;
mod versions;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use herd::config::{FileConfig, OneOrMany, ServeConfig};
use herd::export::nbd::{self as nbd_export, Export, Exports};
use herd::io::Engine;
use herd::net::Listener;
use tokio::sync::watch;

use fleet::CacheSlot;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// TOML file with the same keys as these flags (flags win).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Image source: a path, file://PATH, nbd://HOST[:PORT]/EXPORT or
    /// nbd+unix:///EXPORT?socket=PATH. Repeat for alternate parents, in
    /// order: a read that fails or stalls on one goes to the next.
    #[arg(long)]
    upstream: Vec<String>,
    /// Fleet membership: a fleet TOML file or etcd://HOST:PORT[,HOST:PORT]/PREFIX.
    /// Parents come from it (given upstreams follow as fallbacks).
    #[arg(long)]
    fleet: Option<String>,
    /// This node's name in the fleet (default: the host name).
    #[arg(long)]
    node: Option<String>,
    /// Where children reach this node, HOST:PORT (default: the first TCP --listen).
    #[arg(long)]
    advertise: Option<String>,
    /// Seconds an etcd registration outlives a dead node (default 5).
    #[arg(long)]
    lease_ttl: Option<u64>,
    /// Children per node, published by the root of an etcd fleet (default 4).
    #[arg(long)]
    fanout: Option<u32>,
    /// Seconds a parent may leave one read unanswered before it goes to
    /// the next parent (default 30; hung parents are caught sooner by probes).
    #[arg(long)]
    request_timeout: Option<f64>,
    /// Seconds between health probes of each parent (default 0.25).
    #[arg(long)]
    probe_interval: Option<f64>,
    /// Seconds after which an unanswered probe marks a parent down (default 0.75).
    #[arg(long)]
    probe_timeout: Option<f64>,
    /// Seconds a down parent must answer probes before it is used again (default 5).
    #[arg(long)]
    rejoin_after: Option<f64>,
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
    /// Connections to the parent (default 4): NBD connections, or iSCSI
    /// sessions (one per core up to this many, cores beyond sharing; a
    /// core whose login the target refuses shares another's).
    #[arg(long)]
    connections: Option<usize>,
    /// Seconds to keep retrying an unreachable parent at startup (default 30).
    #[arg(long)]
    parent_timeout: Option<u64>,
    /// Bytes to fetch ahead of a sequential reader that misses (0: off;
    /// default 256KiB).
    #[arg(long)]
    read_ahead: Option<String>,
    /// Threads that serve client connections, each connection on one
    /// (default: one per core).
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
    /// What drives the sockets to the parent (iSCSI session, NBD
    /// connections): uring (default: a ring each owns) or epoll.
    #[arg(long)]
    net_io: Option<String>,
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
    /// TLS on NBD links (NBD_OPT_STARTTLS): off (default), on (offered to
    /// children, used with parents that offer it), require (children must
    /// upgrade before any option; parents must offer it).
    #[arg(long, value_enum)]
    tls: Option<herd::tls::Mode>,
    /// PEM certificate (chain) this node presents to children, and to
    /// parents that ask for one.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// PEM CA: parents' certificates must chain to it, and so must every
    /// child's client certificate (which is then required).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Client certificate name (subject CN, DNS or IP SAN) allowed to
    /// connect; repeat for more. Without it any certificate the CA signed.
    #[arg(long)]
    tls_allow: Vec<String>,
    /// Network TCP clients may connect from (ADDR/PREFIX or ADDR); repeat
    /// for more. Without it any address.
    #[arg(long)]
    allow: Vec<String>,
    /// Most NBD connections at once (default 1024); more are refused.
    #[arg(long)]
    max_connections: Option<usize>,
    /// Most NBD connections from one address (default 64).
    #[arg(long)]
    max_connections_per_client: Option<usize>,
    /// Reply bytes one connection may hold in memory (default 2MiB, at
    /// most half of --reply-buffer); a client that stops reading stalls
    /// once it is full.
    #[arg(long)]
    connection_buffer: Option<String>,
    /// Reply bytes all connections together may hold (default 8MiB).
    #[arg(long)]
    reply_buffer: Option<String>,
    /// Fetched bytes that may wait in memory for the cache disk (default
    /// 8MiB); fetching waits beyond it.
    #[arg(long)]
    fetch_buffer: Option<String>,
    /// Bytes the cache directory's data file may hold (e.g. 20GiB;
    /// default: the whole image). Past it the least recently used chunks
    /// are evicted, a boot profile's last.
    #[arg(long)]
    cache_size: Option<String>,
    /// How fetched runs reach the cache's data file: direct (default:
    /// O_DIRECT, past the page cache, for large runs a reader takes from
    /// memory as they arrive; the rest buffered) or buffered.
    #[arg(long)]
    cache_writes: Option<String>,
    /// Also serve the image as a read-only iSCSI LUN (LUN 0) on HOST:PORT
    /// (repeatable; 3260 is iSCSI's port).
    #[arg(long)]
    listen_iscsi: Vec<String>,
    /// The iSCSI target's name (default: iqn.2026-12.io.herd:HOST.EXPORT).
    #[arg(long)]
    iscsi_target_iqn: Option<String>,
    /// File holding USER:SECRET: initiators must log in with CHAP as USER.
    #[arg(long)]
    iscsi_target_chap: Option<PathBuf>,
    /// File holding USER:SECRET the target answers mutual CHAP with.
    #[arg(long)]
    iscsi_target_mutual_chap: Option<PathBuf>,
    /// Close NBD connections that send no request for this many seconds
    /// (default 0: never).
    #[arg(long)]
    idle_timeout: Option<u64>,
    /// Close an NBD connection whose client leaves a reply unread for this
    /// many seconds (default 60).
    #[arg(long)]
    write_timeout: Option<u64>,
    /// Microseconds an NBD connection that sends requests back to back is
    /// polled for its next one, and the iSCSI session with one command in
    /// flight for its answer, before the task sleeps (default 50; 0:
    /// never). Wins QD1 latency on an idle machine for a little CPU.
    #[arg(long)]
    spin_us: Option<u64>,
    /// How large reads served from the page cache leave: auto (default:
    /// sendfile, but copied by herd while two or more clients on this
    /// host stream at once), sendfile or copy.
    #[arg(long)]
    hit_send: Option<String>,
    /// Seconds an old version of an image that no client reads is kept
    /// after a newer one is published (default 60).
    #[arg(long)]
    retire_after: Option<f64>,
}

impl ServeArgs {
    fn into_config(self) -> Result<ServeConfig> {
        let upstream = match self.upstream.len() {
            0 => None,
            1 => self.upstream.into_iter().next().map(OneOrMany::One),
            _ => Some(OneOrMany::Many(self.upstream)),
        };
        let file = match &self.config {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        let flags = FileConfig {
            upstream,
            fleet: self.fleet,
            node: self.node,
            advertise: self.advertise,
            lease_ttl: self.lease_ttl,
            fanout: self.fanout,
            request_timeout: self.request_timeout,
            probe_interval: self.probe_interval,
            probe_timeout: self.probe_timeout,
            rejoin_after: self.rejoin_after,
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
            net_io: self.net_io,
            profile: self.profile,
            manifest: self.manifest,
            record_profile: self.record_profile,
            prefetch: self.prefetch,
            prefetch_concurrency: self.prefetch_concurrency,
            prefetch_rate: self.prefetch_rate,
            tls: self.tls.map(|m| match m {
                herd::tls::Mode::Off => "off".to_owned(),
                herd::tls::Mode::On => "on".to_owned(),
                herd::tls::Mode::Require => "require".to_owned(),
            }),
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
            tls_ca: self.tls_ca,
            tls_allow: Some(self.tls_allow),
            allow: Some(self.allow),
            max_connections: self.max_connections,
            max_connections_per_client: self.max_connections_per_client,
            connection_buffer: self.connection_buffer,
            reply_buffer: self.reply_buffer,
            fetch_buffer: self.fetch_buffer,
            cache_size: self.cache_size,
            cache_writes: self.cache_writes,
            listen_iscsi: Some(self.listen_iscsi),
            iscsi_target_iqn: self.iscsi_target_iqn,
            iscsi_target_chap: self.iscsi_target_chap,
            iscsi_target_mutual_chap: self.iscsi_target_mutual_chap,
            idle_timeout: self.idle_timeout,
            write_timeout: self.write_timeout,
            spin_us: self.spin_us,
            hit_send: self.hit_send,
            image: None,
            retire_after: self.retire_after,
        };
        Ok(file.merge(flags).validate()?)
    }
}

/// Runs the daemon until SIGTERM or Ctrl-C.
///
/// # Errors
/// Bad settings, an unusable upstream, cache directory or listener.
pub fn run(args: ServeArgs) -> Result<()> {
    let workers = args.workers;
    let cfg = args.into_config()?;
    herd::io::ring_stream::configure(cfg.net_io);
    raise_open_file_limit(cfg.limits.max_connections);
    // Client connections on a thread per core by default, everything else
    // on one control worker, plus the io_uring thread for file I/O
    // (DESIGN.md, "Runtime model", has the measurements behind this).
    let workers = workers
        .unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
        })
        .clamp(1, 256);
    let cores =
        herd::cores::Cores::start(workers).context("cannot start the connection threads")?;
    let rt = herd::cores::control_runtime().context("cannot start the async runtime")?;
    rt.block_on(serve_async(cfg, Arc::new(cores)))
}

/// Raises the open-file soft limit to the hard one: a client connection
/// holds two descriptors (socket and the zero-copy sender's dup), so
/// systemd's default soft limit of 1024 would refuse clients long before
/// `--max-connections` (1024). Warns when even the hard limit is short.
fn raise_open_file_limit(max_connections: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let limit = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    // Two per connection, plus the cache, parents, rings and listeners.
    let needed = 2 * max_connections as u64 + 256;
    if limit < needed {
        tracing::warn!(
            limit,
            needed,
            max_connections,
            "the open-file limit is below what --max-connections needs; raise LimitNOFILE"
        );
    }
}

async fn serve_async(cfg: ServeConfig, cores: Arc<herd::cores::Cores>) -> Result<()> {
    if let Some(addr) = &cfg.metrics {
        herd::metrics::install(addr)?;
        cores.register_metrics();
    }
    // Certificates are checked before anything connects or listens.
    let tls_server = herd::tls::Server::new(&cfg.tls).context("TLS for the export")?;
    if let Some(c) = herd::tls::Client::new(&cfg.tls).context("TLS to parents")? {
        if herd::tls::set_client(c).is_err() {
            anyhow::bail!("TLS to parents was already set up");
        }
    }
    let engine = Engine::start(256, false).context("cannot start the I/O engine")?;
    tracing::info!(backend = ?engine.backend(), "file I/O engine");
    let is_root = cfg.images[0].anchor().is_some();
    let slot: CacheSlot = Arc::default();
    let (fleet_parents, membership) = fleet::join_fleet(&cfg, is_root, &slot).await?;
    let ctx = Arc::new(image::Ctx {
        cfg: cfg.clone(),
        engine,
        fleet: fleet_parents,
        membership,
        shared: herd::cache::shared::SharedChunks::new(),
    });
    // One after another: a root builds each manifest reading its image,
    // and the disk serves one sequential reader best.
    let mut first = Vec::with_capacity(cfg.images.len());
    for img in &cfg.images {
        first.push(image::open_version(&ctx, img, None).await?);
    }
    let exports = Arc::new(
        Exports::new(first.iter().map(|o| Arc::clone(&o.export)).collect())
            .context("cannot export these images")?,
    );
    // SIGHUP: a root looks at its image files again (a new version).
    let (hup_tx, hup_rx) = watch::channel(0u64);
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut hup) = signal(SignalKind::hangup()) {
            while hup.recv().await.is_some() {
                hup_tx.send_modify(|n| *n += 1);
            }
        }
    });
    let mut versions = Vec::with_capacity(cfg.images.len());
    for (img, opened) in cfg.images.iter().zip(first) {
        let is_child = opened.parents.is_some();
        let v = Arc::new(versions::Versions {
            ctx: Arc::clone(&ctx),
            image: img.clone(),
            exports: Arc::clone(&exports),
            opened: std::sync::Mutex::new(vec![opened]),
        });
        if is_child {
            tokio::spawn(Arc::clone(&v).follow_parent());
        } else {
            tokio::spawn(Arc::clone(&v).follow_root(hup_rx.clone()));
        }
        versions.push(v);
    }
    let _ = slot.set(Arc::clone(&versions[0]));
    tokio::spawn(retire_loop(
        Arc::clone(&exports),
        versions,
        cfg.retire_after,
    ));
    let access = Arc::new(nbd_export::Access {
        tls: tls_server,
        allow: cfg.allow.clone(),
        gate: nbd_export::limits::Gate::new(cfg.limits),
        spin: cfg.spin,
        hit_send: cfg.hit_send,
        cores,
    });
    for addr in &cfg.listen {
        let l = Listener::bind(addr).await?;
        tracing::info!(listen = %l.local_addr(), images = ?exports.names(), tls = ?cfg.tls.mode, "serving NBD");
        tokio::spawn(nbd_export::serve(
            l,
            Arc::clone(&exports),
            Arc::clone(&access),
        ));
    }
    if !cfg.iscsi_target.listen.is_empty() {
        // The default image (its latest version) is LUN 0 of the target.
        let default = exports
            .default_export()
            .context("no image to serve over iSCSI")?;
        let target = Arc::new(iscsi_target(&cfg, default)?);
        for addr in &cfg.iscsi_target.listen {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for iSCSI on {addr}"))?;
            tracing::info!(listen = %l.local_addr().map_or_else(|_| addr.clone(), |a| a.to_string()), iqn = %target.iqn, "serving iSCSI");
            tokio::spawn(herd::export::iscsi::serve(
                l,
                Arc::clone(&target),
                Arc::clone(&exports),
                Arc::clone(&access),
            ));
        }
    }
    herd::metrics::serving();
    shutdown_signal().await;
    tracing::info!("shutting down");
    for e in exports.all() {
        image::close_image(&e).await?;
    }
    Ok(())
}

/// Retires superseded versions nobody has read for `grace`: stops their
/// tasks, drops their parent connections (which lets the parent retire
/// its copy in turn) and removes their caches.
async fn retire_loop(
    exports: Arc<Exports>,
    versions: Vec<Arc<versions::Versions>>,
    grace: Duration,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        for old in exports.retire_idle(grace) {
            old.stop_tasks();
            tracing::info!(image = %old.name, identity = %old.identity(), "an old version nobody reads is retired");
            if let Some(v) = versions.iter().find(|v| v.image.name == old.name) {
                v.retired(&old);
                let image = v.image.clone();
                tokio::spawn(async move {
                    versions::remove_cache(old, &image, Duration::from_secs(30)).await;
                });
            }
        }
    }
}

/// The iSCSI target of `--listen-iscsi`: its name and credentials.
fn iscsi_target(cfg: &ServeConfig, export: Arc<Export>) -> Result<herd::export::iscsi::Target> {
    let creds = |p: &Option<std::path::PathBuf>| -> Result<Option<(String, Vec<u8>)>> {
        let Some(p) = p else { return Ok(None) };
        let raw = std::fs::read_to_string(p)
            .with_context(|| format!("cannot read CHAP credentials {}", p.display()))?;
        let (user, secret) = raw
            .trim_end_matches(['\r', '\n'])
            .split_once(':')
            .with_context(|| format!("{} must hold USER:SECRET", p.display()))?;
        // RFC 7143 §12.1.3: at least 12 bytes where IPsec is absent.
        anyhow::ensure!(
            secret.len() >= 12,
            "the CHAP secret in {} is {} bytes; iSCSI needs at least 12",
            p.display(),
            secret.len()
        );
        Ok(Some((user.to_owned(), secret.as_bytes().to_vec())))
    };
    let auth = herd::export::iscsi::Auth {
        chap: creds(&cfg.iscsi_target.chap)?,
        mutual: creds(&cfg.iscsi_target.mutual_chap)?,
    };
    let iqn = cfg.iscsi_target.iqn.clone().unwrap_or_else(|| {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "host".into());
        herd::export::iscsi::default_iqn(&host, &export.name)
    });
    Ok(herd::export::iscsi::Target::new(iqn, auth, export))
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
