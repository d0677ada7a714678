//! One version of an image of `herd serve`: its upstream (the image
//! itself, or parents with failover), manifest, cache, profile and
//! recorder, ready to be exported under the image's name.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use herd::cache::{shared::SharedChunks, ChunkCache};
use herd::config::{ImageConfig, ServeConfig};
use herd::export::nbd::Export;
use herd::fleet::etcd::Membership;
use herd::io::Engine;
use herd::manifest::Manifest;
use herd::prefetch::propagate;
use herd::prefetch::propagate::Published;
use herd::profile::{identity_of_upstream, ImageId, Profile};
use herd::record::daemon::ClientRecorder;
use herd::upstream::failover::FailoverUpstream;
use herd::upstream::file::FileUpstream;
use herd::upstream::iscsi::{IscsiTarget, IscsiUpstream};
use herd::upstream::seeded::SeededUpstream;
use herd::upstream::{Upstream, UpstreamUrl};
use tokio::sync::watch;

/// Opens the image itself: a file or a LUN (a root, a trust anchor).
pub(super) async fn open_anchor(
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
                spin: cfg.spin,
                sessions: cfg.connections,
            };
            let up = IscsiUpstream::connect(t).await.with_context(|| {
                format!("cannot read LUN {lun} of iSCSI target {target} at {host}:{port}")
            })?;
            Arc::new(up)
        }
        other => anyhow::bail!("{other} is a parent, not an image"),
    })
}

/// The image's manifest, and whether a herd parent gave it: the parent's,
/// for a herd parent; otherwise this node is a trust anchor and takes a
/// given one (`first` version only), reuses the one in `dir`, or builds it
/// (before it listens: no manifest, no service).
async fn obtain_manifest(
    cfg: &ServeConfig,
    image: &ImageConfig,
    upstream: &Arc<dyn Upstream>,
    source: &UpstreamUrl,
    dir: &Path,
    first: bool,
) -> Result<(Manifest, bool)> {
    let size = upstream.size();
    let asked = std::time::Instant::now();
    if let Some(m) = herd::manifest::fetch_from_parent(source)
        .await
        .with_context(|| format!("parent {source} sent no usable manifest"))?
    {
        m.fits(&format!("from parent {source}"), size, cfg.chunk_size)?;
        if let Some(path) = image.manifest.as_ref().filter(|_| first) {
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
            image = %image.name,
            identity = %m.identity(),
            chunks = m.chunks(),
            bytes = m.bytes().len(),
            ms = asked.elapsed().as_millis(),
            "manifest from the parent"
        );
        return Ok((m, true));
    }
    let (m, origin) = herd::manifest::for_anchor(
        Arc::clone(upstream),
        source,
        image.manifest.as_deref().filter(|_| first),
        dir,
        cfg.chunk_size,
    )
    .await
    .with_context(|| format!("no manifest for {}", upstream.describe()))?;
    tracing::info!(image = %image.name, identity = %m.identity(), chunks = m.chunks(), ?origin, "manifest ready");
    Ok((m, false))
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

/// One version of an image, open: what it exports and what the node keeps
/// for it.
pub(super) struct Opened {
    pub export: Arc<Export>,
    pub parents: Option<Arc<FailoverUpstream>>,
    /// The profile's sender, where no task of the version holds it: it
    /// lives as long as the version (a closed channel would read as a
    /// changed profile and end every connection to the profile export).
    pub _profile: Option<watch::Sender<propagate::Shared>>,
}

/// What every version of every image is opened with.
pub(super) struct Ctx {
    pub cfg: ServeConfig,
    pub engine: Engine,
    /// The fleet's parents at startup (empty without a fleet, or at a root).
    pub fleet: Vec<UpstreamUrl>,
    pub membership: Option<watch::Receiver<Membership>>,
    /// Every version of every image, by content: a chunk one holds is
    /// stored once, whichever other image reads it.
    pub shared: Arc<SharedChunks>,
}

/// A version opened while serving, after the first.
pub(super) struct Next {
    /// Its cache directory (under the image's `versions/`).
    pub dir: PathBuf,
    /// The manifest the parent announced (a child), else built (a root).
    pub manifest: Option<Manifest>,
    /// The version it follows: its chunks seed the new one (a child), its
    /// profile carries over (a root).
    pub previous: Arc<Export>,
    /// The parents the previous version reads from now (a child): the
    /// fleet may have moved them since startup.
    pub parents: Vec<UpstreamUrl>,
}

/// Opens one version of `image`: its upstream, manifest, cache, profile
/// and recorder; spawns its prefetch, parent polls and bitmap sync, tied
/// to its export (stopped when it is retired). `next` is `None` for the
/// version a node starts with.
pub(super) async fn open_version(
    ctx: &Ctx,
    image: &ImageConfig,
    next: Option<Next>,
) -> Result<Opened> {
    let cfg = &ctx.cfg;
    let name = &image.name;
    let first = next.is_none();
    let dir = next
        .as_ref()
        .map_or_else(|| image.cache_dir.clone(), |n| n.dir.clone());
    // A child's later version reads the parent's copy of that version.
    let pin = next
        .as_ref()
        .and_then(|n| n.manifest.as_ref())
        .map(|m| m.identity().to_string());
    let (upstream, parents, source): (Arc<dyn Upstream>, _, _) = match image.anchor() {
        Some(url) => (open_anchor(url, cfg, &ctx.engine).await?, None, url.clone()),
        None => {
            let list = match next.as_ref().filter(|n| !n.parents.is_empty()) {
                Some(n) => n.parents.iter().map(|u| u.pinned(pin.as_deref())).collect(),
                None => {
                    super::fleet::parents_of(&ctx.fleet, image, cfg.named_images, pin.as_deref())
                }
            };
            anyhow::ensure!(!list.is_empty(), "image `{name}` has no parent");
            let shown: Vec<String> = list.iter().map(ToString::to_string).collect();
            let p = FailoverUpstream::connect(list, cfg.failover)
                .await
                .with_context(|| {
                    format!(
                        "image `{name}`: parents unreachable or refused the export: {}",
                        shown.join(", ")
                    )
                })?;
            let active = p
                .active()
                .or_else(|| p.parents().into_iter().next())
                .context("no parent")?;
            tracing::info!(image = %name, parent = %active, parents = ?shown, size = p.size(), "connected to parent");
            (Arc::clone(&p) as Arc<dyn Upstream>, Some(p), active)
        }
    };
    let (manifest, from_parent) = match next.as_ref().and_then(|n| n.manifest.clone()) {
        Some(m) => {
            m.fits(
                &format!("from parent {source}"),
                upstream.size(),
                cfg.chunk_size,
            )?;
            (m, true)
        }
        None => obtain_manifest(cfg, image, &upstream, &source, &dir, first)
            .await
            .with_context(|| format!("image `{name}`"))?,
    };
    let manifest = Arc::new(manifest);
    let identity = manifest.identity();
    // Reads go to the parent's copy of this very version from now on: a
    // newer one published there never mixes into this one.
    let pin = Some(identity.to_string());
    if let (Some(p), true) = (&parents, from_parent) {
        let list: Vec<UpstreamUrl> = p
            .parents()
            .iter()
            .map(|u| u.pinned(pin.as_deref()))
            .collect();
        if list != p.parents() {
            p.set_parents(list);
        }
    }
    if first {
        super::versions::restore_versions(image, &identity)?;
    }
    herd::metrics::ImageMetrics::identity(name, &identity.to_string());
    // A child's later version takes what the previous one holds.
    let seeded = match (&next, &parents) {
        (Some(n), Some(_)) => Some(Arc::new(SeededUpstream::new(
            upstream.clone(),
            Arc::clone(&n.previous.cache),
            Arc::clone(&manifest),
        ))),
        _ => None,
    };
    let upstream: Arc<dyn Upstream> = match &seeded {
        Some(s) => Arc::clone(s) as Arc<dyn Upstream>,
        None => upstream,
    };
    let cache = ChunkCache::open(
        name,
        &dir,
        upstream,
        cfg.chunk_size,
        ctx.engine.clone(),
        manifest,
    )
    .with_context(|| format!("cannot use cache directory {}", dir.display()))?;
    cache.set_fetch_buffer(cfg.fetch_buffer);
    if cfg.cache_writes == herd::cache::CacheWrites::Direct {
        cache.set_direct_writes();
    }
    if let Some(bytes) = image.cache_size {
        cache
            .set_cache_size(bytes)
            .with_context(|| format!("cannot bring the cache within {bytes} bytes"))?;
    }
    ctx.shared.join(name, &cache);
    tracing::info!(
        image = %name,
        identity = %identity.short(),
        dir = %dir.display(),
        chunk_size = cfg.chunk_size,
        present = cache.chunks_present(),
        total = cache.chunks_total(),
        "cache ready"
    );
    // The image's identity (32 sampled blocks read from the upstream) is
    // needed to check a given profile and to stamp a recorded one.
    let sampled = if first && (image.profile.is_some() || image.record_profile.is_some()) {
        Some(
            identity_of_upstream(cache.upstream())
                .await
                .context("cannot read the image's identity samples")?,
        )
    } else {
        None
    };
    let mut tasks = Vec::new();
    if let Some(s) = seeded {
        tasks.push(tokio::spawn(s.seed(Arc::clone(&cache))));
    }
    let (profile_tx, profile_rx) = tokio::sync::watch::channel(None);
    let carried = next
        .as_ref()
        .filter(|_| parents.is_none())
        .and_then(|n| n.previous.profile.borrow().clone())
        .filter(|p| p.profile.image_size == cache.size());
    let profile_tx = if let (Some(path), Some(id)) = (&image.profile, &sampled) {
        let published = load_profile(path, cache.size(), id)?;
        let _ = profile_tx.send(Some(Arc::new(published)));
        Some(profile_tx)
    } else if let Some(p) = carried {
        // A root's new version boots like the old: the working set moves
        // little between versions, and prefetch skips what is held.
        tracing::info!(image = %name, extents = p.profile.extents.len(), "boot profile carried to the new version");
        let _ = profile_tx.send(Some(p));
        Some(profile_tx)
    } else if let Some(p) = &parents {
        tasks.push(tokio::spawn(propagate::poll_parent(
            Arc::clone(p),
            cache.size(),
            profile_tx,
        )));
        None
    } else {
        Some(profile_tx)
    };
    tasks.push(tokio::spawn(propagate::follow(
        Arc::clone(&cache),
        profile_rx.clone(),
        cfg.prefetch,
    )));
    if let (Some(rx), Some(p)) = (ctx.membership.clone(), &parents) {
        tasks.push(tokio::spawn(super::fleet::follow_fleet(
            rx,
            Arc::clone(p),
            cfg.node.clone(),
            image.clone(),
            cfg.named_images,
            from_parent.then(|| identity.to_string()),
        )));
    }
    let recorder = match (&image.record_profile, sampled) {
        (Some(path), Some(id)) => {
            tracing::info!(image = %name, path = %path.display(), "recording what clients read");
            Some(Arc::new(ClientRecorder::new(
                path.clone(),
                cache.size(),
                id,
            )))
        }
        _ => None,
    };
    if let Some(rec) = recorder.clone() {
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tick.tick().await;
                if let Err(e) = rec.save() {
                    tracing::warn!(error = %e, "cannot write the recorded profile");
                }
            }
        }));
    }
    let syncer = Arc::clone(&cache);
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            if let Err(e) = syncer.sync() {
                tracing::warn!(error = %herd::error_chain(&e), "bitmap sync failed");
            }
        }
    }));
    let description = format!("herd proxy of {}", cache.upstream().describe());
    let export = Arc::new(Export::new(
        name.clone(),
        description,
        cache,
        cfg.read_ahead,
        profile_rx,
        recorder,
    ));
    for t in tasks {
        export.own_task(t.abort_handle());
    }
    Ok(Opened {
        export,
        parents,
        _profile: profile_tx,
    })
}

/// Settles and syncs a version's cache and writes its recorded profile,
/// at shutdown.
pub(super) async fn close_image(export: &Export) -> Result<()> {
    let cache = &export.cache;
    if !cache.settle(Duration::from_secs(10)).await {
        tracing::warn!(image = %export.name, "chunks still being cached at exit will be fetched again");
    }
    cache.sync().context("final bitmap sync failed")?;
    if let Some(rec) = &export.recorder {
        rec.save().context("cannot write the recorded profile")?;
        let p = rec.profile();
        tracing::info!(
            image = %export.name,
            extents = p.extents.len(),
            bytes = p.bytes(),
            "recorded profile written"
        );
    }
    Ok(())
}
