//! One image of `herd serve`: its upstream (the image itself, or parents
//! with failover), its manifest, cache, profile and recorder, ready to be
//! exported under its name.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use herd::cache::ChunkCache;
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
            };
            let up = IscsiUpstream::connect(t).await.with_context(|| {
                format!("cannot read LUN {lun} of iSCSI target {target} at {host}:{port}")
            })?;
            Arc::new(up)
        }
        other => anyhow::bail!("{other} is a parent, not an image"),
    })
}

/// The image's manifest: the parent's, for a herd parent; otherwise this
/// node is a trust anchor and takes a given one, reuses its own, or builds
/// it (before it listens: no manifest, no service).
async fn obtain_manifest(
    cfg: &ServeConfig,
    image: &ImageConfig,
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
        if let Some(path) = &image.manifest {
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
        return Ok(m);
    }
    let (m, origin) = herd::manifest::for_anchor(
        Arc::clone(upstream),
        source,
        image.manifest.as_deref(),
        &image.cache_dir,
        cfg.chunk_size,
    )
    .await
    .with_context(|| format!("no manifest for {}", upstream.describe()))?;
    tracing::info!(image = %image.name, identity = %m.identity(), chunks = m.chunks(), ?origin, "manifest ready");
    Ok(m)
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

/// One image, open: what it exports and what the node keeps running for it.
pub(super) struct Opened {
    pub export: Arc<Export>,
    pub parents: Option<Arc<FailoverUpstream>>,
    /// The profile's sender, where no task of the image holds it.
    pub _profile: Option<watch::Sender<propagate::Shared>>,
}

/// Opens one image: its upstream (`fleet` lists the fleet's parents;
/// `membership` follows an etcd fleet), manifest, cache, profile and
/// recorder; spawns its prefetch, parent watch and bitmap sync.
pub(super) async fn open_image(
    cfg: &ServeConfig,
    image: &ImageConfig,
    engine: &Engine,
    fleet: &[UpstreamUrl],
    membership: Option<watch::Receiver<Membership>>,
) -> Result<Opened> {
    let name = &image.name;
    let (upstream, parents, source): (Arc<dyn Upstream>, _, _) = match image.anchor() {
        Some(url) => (open_anchor(url, cfg, engine).await?, None, url.clone()),
        None => {
            let list = super::fleet::parents_of(fleet, image, cfg.named_images);
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
    if let (Some(rx), Some(p)) = (membership, &parents) {
        tokio::spawn(super::fleet::follow_fleet(
            rx,
            Arc::clone(p),
            cfg.node.clone(),
            image.clone(),
            cfg.named_images,
        ));
    }
    let manifest = Arc::new(
        obtain_manifest(cfg, image, &upstream, &source)
            .await
            .with_context(|| format!("image `{name}`"))?,
    );
    herd::metrics::ImageMetrics::identity(name, &manifest.identity().to_string());
    let cache = ChunkCache::open(
        name,
        &image.cache_dir,
        upstream,
        cfg.chunk_size,
        engine.clone(),
        manifest,
    )
    .with_context(|| format!("cannot use cache directory {}", image.cache_dir.display()))?;
    cache.set_fetch_buffer(cfg.fetch_buffer);
    if let Some(bytes) = image.cache_size {
        cache
            .set_cache_size(bytes)
            .with_context(|| format!("cannot bring the cache within {bytes} bytes"))?;
    }
    tracing::info!(
        image = %name,
        dir = %image.cache_dir.display(),
        chunk_size = cfg.chunk_size,
        present = cache.chunks_present(),
        total = cache.chunks_total(),
        "cache ready"
    );
    // The image's identity (32 sampled blocks read from the upstream) is
    // needed to check a given profile and to stamp a recorded one.
    let identity = if image.profile.is_some() || image.record_profile.is_some() {
        Some(
            identity_of_upstream(cache.upstream())
                .await
                .context("cannot read the image's identity samples")?,
        )
    } else {
        None
    };
    if let Some(p) = &parents {
        tokio::spawn(herd::manifest::watch_parent(
            Arc::clone(&cache),
            Arc::clone(p),
            Duration::from_secs(5),
        ));
    }
    // The sender lives as long as the image is served (in `Opened` or in
    // the parent poll): a closed channel would read as a changed profile
    // and end every connection to the profile export at once.
    let (profile_tx, profile_rx) = tokio::sync::watch::channel(None);
    let profile_tx = if let (Some(path), Some(id)) = (&image.profile, &identity) {
        let published = load_profile(path, cache.size(), id)?;
        let _ = profile_tx.send(Some(Arc::new(published)));
        Some(profile_tx)
    } else if let Some(p) = &parents {
        tokio::spawn(propagate::poll_parent(
            Arc::clone(p),
            cache.size(),
            profile_tx,
        ));
        None
    } else {
        Some(profile_tx)
    };
    tokio::spawn(propagate::follow(
        Arc::clone(&cache),
        profile_rx.clone(),
        cfg.prefetch,
    ));
    let recorder = match (&image.record_profile, identity) {
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
    let description = format!("herd proxy of {}", cache.upstream().describe());
    Ok(Opened {
        export: Arc::new(Export::new(
            name.clone(),
            description,
            cache,
            cfg.read_ahead,
            profile_rx,
            recorder,
        )),
        parents,
        _profile: profile_tx,
    })
}

/// Settles and syncs an image's cache and writes its recorded profile, at
/// shutdown.
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
