//! `herd serve`: the daemon. It opens the image (a root) or its parents
//! (failover between them, from `--upstream` or fleet membership), gets the
//! manifest, opens the cache and serves NBD.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use herd::cache::ChunkCache;
use herd::config::{FileConfig, OneOrMany, ServeConfig};
use herd::export::nbd::{self as nbd_export, Export};
use herd::fleet::etcd::{Membership, Registration};
use herd::fleet::{Member, Source};
use herd::io::Engine;
use herd::manifest::Manifest;
use herd::net::Listener;
use herd::prefetch::propagate;
use herd::prefetch::propagate::Published;
use herd::profile::{identity_of_upstream, ImageId, Profile};
use herd::record::daemon::ClientRecorder;
use herd::upstream::failover::FailoverUpstream;
use herd::upstream::file::FileUpstream;
use herd::upstream::iscsi::{IscsiTarget, IscsiUpstream};
use herd::upstream::{Upstream, UpstreamUrl};
use tokio::sync::watch;

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
    /// What drives the sockets to the parent (iSCSI session, NBD
    /// connections): epoll (default) or uring (a ring each owns).
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
    /// polled for its next one before its task sleeps (default 50; 0:
    /// never). Wins QD1 latency on an idle machine for a little CPU.
    #[arg(long)]
    spin_us: Option<u64>,
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
            listen_iscsi: Some(self.listen_iscsi),
            iscsi_target_iqn: self.iscsi_target_iqn,
            iscsi_target_chap: self.iscsi_target_chap,
            iscsi_target_mutual_chap: self.iscsi_target_mutual_chap,
            idle_timeout: self.idle_timeout,
            write_timeout: self.write_timeout,
            spin_us: self.spin_us,
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

/// Opens the image itself: a file or a LUN (a root, a trust anchor).
async fn open_anchor(
    url: &UpstreamUrl,
    cfg: &ServeConfig,
    engine: &Engine,
) -> Result<Arc<dyn Upstream>> {
    Ok(match url {
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
                net_io: cfg.net_io,
                digests: cfg.iscsi.digests,
            };
            let up = IscsiUpstream::connect(t).await.with_context(|| {
                format!("cannot read LUN {lun} of iSCSI target {target} at {host}:{port}")
            })?;
            Arc::new(up)
        }
        other => anyhow::bail!("{other} is a parent, not an image"),
    })
}

/// Where children reach this node: `--advertise`, else the first TCP listener.
fn advertise(cfg: &ServeConfig) -> Result<String> {
    if let Some(a) = &cfg.advertise {
        return Ok(a.clone());
    }
    let tcp = cfg.listen.iter().find_map(|l| match l {
        herd::net::ListenAddr::Tcp(a) => Some(a.clone()),
        herd::net::ListenAddr::Unix(_) => None,
    });
    match tcp {
        Some(a) if !a.starts_with("0.0.0.0:") && !a.starts_with("[::]:") => Ok(a),
        Some(a) => {
            anyhow::bail!("listening on {a}: give --advertise HOST:PORT, the address children use")
        }
        None => anyhow::bail!("a fleet node needs a TCP --listen (or --advertise)"),
    }
}

/// The fleet's parents first, then the given ones, without repeats.
fn combine(fleet: Vec<UpstreamUrl>, given: &[UpstreamUrl]) -> Vec<UpstreamUrl> {
    let mut out = fleet;
    for g in given {
        if !out.contains(g) {
            out.push(g.clone());
        }
    }
    out
}

/// The cache and parents, once open: the node joins its fleet before it has
/// them, and its status record reports them from then on.
type CacheSlot = Arc<std::sync::OnceLock<(Arc<ChunkCache>, Option<Arc<FailoverUpstream>>)>>;

/// What the status record in etcd says about this node.
fn status_of(slot: &CacheSlot) -> serde_json::Value {
    match slot.get() {
        None => serde_json::json!({ "serving": false }),
        Some((cache, parents)) => serde_json::json!({
            "serving": true,
            "present": cache.chunks_present(),
            "total": cache.chunks_total(),
            "zero": cache.chunks_zero(),
            "active": parents.as_ref().and_then(|p| p.active()).map(|u| u.to_string()),
        }),
    }
}

/// Joins the fleet, if any: the parent list to start from (empty at a
/// root) and, for etcd, the membership to follow.
async fn join_fleet(
    cfg: &ServeConfig,
    is_root: bool,
    slot: &CacheSlot,
) -> Result<(Vec<UpstreamUrl>, Option<watch::Receiver<Membership>>)> {
    let given: Vec<UpstreamUrl> = if is_root {
        Vec::new()
    } else {
        cfg.upstreams.clone()
    };
    match &cfg.fleet {
        None => Ok((given, None)),
        Some(Source::File(path)) => {
            let view = herd::fleet::file::load(path)?;
            if is_root {
                anyhow::ensure!(
                    view.root.name == cfg.node,
                    "this node serves the image itself, but fleet file {} names `{}` as the root, not `{}` (give --node)",
                    path.display(),
                    view.root.name,
                    cfg.node
                );
                return Ok((given, None));
            }
            let ups = view.upstreams(&cfg.node);
            anyhow::ensure!(
                !ups.is_empty(),
                "node `{}` is not a member of fleet file {} (give --node NAME)",
                cfg.node,
                path.display()
            );
            tracing::info!(node = %cfg.node, parent = ?view.tree.parent_of(&cfg.node), depth = view.tree.depth(&cfg.node), "fleet file read");
            Ok((combine(ups, &given), None))
        }
        Some(source @ Source::Etcd { endpoints, prefix }) => {
            let reg = Registration {
                endpoints: endpoints.clone(),
                prefix: prefix.clone(),
                member: Member {
                    name: cfg.node.clone(),
                    addr: advertise(cfg)?,
                    metrics: cfg.metrics.clone(),
                    slot: 0,
                },
                root: is_root.then(|| (cfg.fanout, cfg.export_name.clone())),
                ttl: cfg.lease_ttl,
            };
            let status_slot = Arc::clone(slot);
            let mut rx = herd::fleet::etcd::join(reg, Arc::new(move || status_of(&status_slot)));
            if is_root {
                return Ok((given, Some(rx)));
            }
            let node = cfg.node.clone();
            let view = {
                let joined = tokio::time::timeout(
                    JOIN_WAIT,
                    rx.wait_for(|m| {
                        m.view
                            .as_ref()
                            .is_some_and(|v| !v.upstreams(&node).is_empty())
                    }),
                )
                .await;
                match joined {
                    Ok(Ok(m)) => m.view.clone(),
                    _ => None,
                }
            };
            match view {
                Some(v) => {
                    tracing::info!(node = %cfg.node, parent = ?v.tree.parent_of(&cfg.node), members = v.members.len(), "joined the fleet");
                    Ok((combine(v.upstreams(&cfg.node), &given), Some(rx)))
                }
                None => {
                    let why = rx
                        .borrow()
                        .error
                        .clone()
                        .unwrap_or_else(|| format!("no answer in {JOIN_WAIT:?}"));
                    anyhow::ensure!(
                        !given.is_empty(),
                        "fleet {source}: {why}; give --upstream to serve without it"
                    );
                    tracing::warn!(fleet = %source, error = %why, "fleet unreachable; serving from the given upstreams and joining when it answers");
                    Ok((given, Some(rx)))
                }
            }
        }
    }
}

/// How long a node waits for etcd at startup before it falls back to the
/// given upstreams.
const JOIN_WAIT: Duration = Duration::from_secs(5);

/// Follows membership: every new view gives this node a new parent list.
async fn follow_fleet(
    mut rx: watch::Receiver<Membership>,
    parents: Arc<FailoverUpstream>,
    node: String,
    given: Vec<UpstreamUrl>,
) {
    while rx.changed().await.is_ok() {
        let view = rx.borrow_and_update().view.clone();
        if let Some(v) = view {
            let list = combine(v.upstreams(&node), &given);
            if !list.is_empty() && list != parents.parents() {
                parents.set_parents(list);
            }
        }
    }
}

/// The image's manifest: the parent's, for a herd parent; otherwise this
/// node is a trust anchor and takes a given one, reuses its own, or builds
/// it (before it listens: no manifest, no service).
async fn obtain_manifest(
    cfg: &ServeConfig,
    upstream: &Arc<dyn Upstream>,
    source: &UpstreamUrl,
) -> Result<Manifest> {
    let size = upstream.size();
    let asked = std::time::Instant::now();
    if let Some(m) = herd::manifest::fetch_from_parent(source)
        .await
        .with_context(|| format!("parent {source} sent no usable manifest"))?
    {
        m.fits(&format!("from parent {source}"), size, cfg.chunk_size)?;
        if let Some(path) = &cfg.manifest {
            let given = herd::manifest::load(path)?;
            anyhow::ensure!(
                given.identity() == m.identity(),
                "--manifest {} is image {}, but parent {} serves image {}",
                path.display(),
                given.identity(),
                source,
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
        source,
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
    // Certificates are checked before anything connects or listens.
    let tls_server = herd::tls::Server::new(&cfg.tls).context("TLS for the export")?;
    if let Some(c) = herd::tls::Client::new(&cfg.tls).context("TLS to parents")? {
        if herd::tls::set_client(c).is_err() {
            anyhow::bail!("TLS to parents was already set up");
        }
    }
    let engine = Engine::start(256, false).context("cannot start the I/O engine")?;
    tracing::info!(backend = ?engine.backend(), "file I/O engine");
    let anchor = cfg.first_upstream().filter(|u| !u.is_nbd()).cloned();
    let slot: CacheSlot = Arc::default();
    let (parent_list, membership) = join_fleet(&cfg, anchor.is_some(), &slot).await?;
    let (upstream, parents, source): (Arc<dyn Upstream>, _, _) = match &anchor {
        Some(url) => (open_anchor(url, &cfg, &engine).await?, None, url.clone()),
        None => {
            let list: Vec<String> = parent_list.iter().map(ToString::to_string).collect();
            let p = FailoverUpstream::connect(parent_list, cfg.failover)
                .await
                .with_context(|| {
                    format!(
                        "parents unreachable or refused the export: {}",
                        list.join(", ")
                    )
                })?;
            let active = p
                .active()
                .or_else(|| p.parents().into_iter().next())
                .context("no parent")?;
            tracing::info!(parent = %active, parents = ?list, size = p.size(), "connected to parent");
            (Arc::clone(&p) as Arc<dyn Upstream>, Some(p), active)
        }
    };
    if let (Some(rx), Some(p)) = (membership, &parents) {
        tokio::spawn(follow_fleet(
            rx,
            Arc::clone(p),
            cfg.node.clone(),
            cfg.upstreams.clone(),
        ));
    }
    herd::metrics::image_size(upstream.size());
    let manifest = Arc::new(obtain_manifest(&cfg, &upstream, &source).await?);
    herd::metrics::image_identity(&manifest.identity().to_string());
    let cache = ChunkCache::open(&cfg.cache_dir, upstream, cfg.chunk_size, engine, manifest)
        .with_context(|| format!("cannot use cache directory {}", cfg.cache_dir.display()))?;
    cache.set_fetch_buffer(cfg.fetch_buffer);
    if let Some(bytes) = cfg.cache_size {
        cache
            .set_cache_size(bytes)
            .with_context(|| format!("cannot bring the cache within {bytes} bytes"))?;
    }
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
    let _ = slot.set((Arc::clone(&cache), parents.clone()));
    if let Some(p) = &parents {
        tokio::spawn(herd::manifest::watch_parent(
            Arc::clone(&cache),
            Arc::clone(p),
            Duration::from_secs(5),
        ));
    }
    let (profile_tx, profile_rx) = tokio::sync::watch::channel(None);
    if let (Some(path), Some(id)) = (&cfg.profile, &identity) {
        let published = load_profile(path, cache.size(), id)?;
        let _ = profile_tx.send(Some(Arc::new(published)));
    } else if let Some(p) = &parents {
        tokio::spawn(propagate::poll_parent(
            Arc::clone(p),
            cache.size(),
            profile_tx,
        ));
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
    let access = Arc::new(nbd_export::Access {
        tls: tls_server,
        allow: cfg.allow.clone(),
        gate: nbd_export::limits::Gate::new(cfg.limits),
        spin: cfg.spin,
    });
    for addr in &cfg.listen {
        let l = Listener::bind(addr).await?;
        tracing::info!(listen = %l.local_addr(), export = %cfg.export_name, tls = ?cfg.tls.mode, "serving NBD");
        tokio::spawn(nbd_export::serve(
            l,
            Arc::clone(&export),
            Arc::clone(&access),
        ));
    }
    if !cfg.iscsi_target.listen.is_empty() {
        let target = Arc::new(iscsi_target(&cfg, Arc::clone(&export))?);
        for addr in &cfg.iscsi_target.listen {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for iSCSI on {addr}"))?;
            tracing::info!(listen = %l.local_addr().map_or_else(|_| addr.clone(), |a| a.to_string()), iqn = %target.iqn, "serving iSCSI");
            tokio::spawn(herd::export::iscsi::serve(
                l,
                Arc::clone(&target),
                Arc::clone(&access),
            ));
        }
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
        herd::export::iscsi::default_iqn(&host, &cfg.export_name)
    });
    Ok(herd::export::iscsi::Target::new(iqn, auth, export))
}

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
