//! One image of `herd serve`: its upstream (the image itself, or parents
//! with failover), its manifest, cache, profile and recorder, ready to be
//! exported under its name.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use herd::cache::ChunkCache;
use herd::config::{ImageConfig, ServeConfig};
use herd::export::nbd::{Export, Exports};
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

/// Where versions opened while serving keep their caches.
fn versions_dir(image: &ImageConfig) -> PathBuf {
    image.cache_dir.join("versions")
}

/// A fresh directory for a version opened while serving.
fn next_dir(image: &ImageConfig) -> Result<PathBuf> {
    let base = versions_dir(image);
    std::fs::create_dir_all(&base).with_context(|| format!("cannot create {}", base.display()))?;
    for n in 1u32.. {
        let d = base.join(format!("v{n}"));
        match std::fs::create_dir(&d) {
            Ok(()) => return Ok(d),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", d.display())),
        }
    }
    anyhow::bail!("no free version directory under {}", base.display())
}

/// The files of one version's cache.
const CACHE_FILES: [&str; 4] = [
    herd::cache::DATA_FILE,
    herd::cache::BITMAP_FILE,
    herd::manifest::CACHE_FILE,
    "herd-cache.manifest.source",
];

/// At startup, before the first version's cache opens in the image's
/// directory: a version a previous run opened while serving (kept under
/// `versions/`) that is the one now served takes the directory's place,
/// so a restart after an update keeps the update's chunks; the other
/// versions' caches are removed (no client can reach them any more).
fn restore_versions(image: &ImageConfig, identity: &herd::manifest::Identity) -> Result<()> {
    let base = versions_dir(image);
    let Ok(entries) = std::fs::read_dir(&base) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let dir = e.path();
        let theirs = herd::manifest::load(&dir.join(herd::manifest::CACHE_FILE))
            .ok()
            .map(|m| m.identity());
        if theirs.as_ref() == Some(identity) {
            for f in CACHE_FILES {
                let from = dir.join(f);
                if from.exists() {
                    std::fs::rename(&from, image.cache_dir.join(f)).with_context(|| {
                        format!(
                            "cannot move {} into {}",
                            from.display(),
                            image.cache_dir.display()
                        )
                    })?;
                }
            }
            tracing::info!(image = %image.name, identity = %identity.short(), from = %dir.display(), "the cache of the version served now, kept from the last run");
        }
    }
    std::fs::remove_dir_all(&base)
        .with_context(|| format!("cannot remove old versions under {}", base.display()))?;
    Ok(())
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
                Some(n) => n
                    .parents
                    .iter()
                    .map(|u| super::fleet::pinned(u, pin.as_deref()))
                    .collect(),
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
            .map(|u| super::fleet::pinned(u, pin.as_deref()))
            .collect();
        if list != p.parents() {
            p.set_parents(list);
        }
    }
    if first {
        restore_versions(image, &identity)?;
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
    if let Some(bytes) = image.cache_size {
        cache
            .set_cache_size(bytes)
            .with_context(|| format!("cannot bring the cache within {bytes} bytes"))?;
    }
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

/// The versions of one image this node serves, opened while serving.
pub(super) struct Versions {
    pub ctx: Arc<Ctx>,
    pub image: ImageConfig,
    pub exports: Arc<Exports>,
    /// Versions opened while serving, kept until retired.
    pub opened: std::sync::Mutex<Vec<Opened>>,
}

impl Versions {
    /// Opens the version after `previous` and makes it the latest; a
    /// version with `previous`'s identity is dropped (nothing changed).
    async fn publish_next(
        &self,
        previous: Arc<Export>,
        manifest: Option<Manifest>,
    ) -> Result<bool> {
        let dir = next_dir(&self.image)?;
        let opened = match open_version(
            &self.ctx,
            &self.image,
            Some(Next {
                dir: dir.clone(),
                manifest,
                previous: Arc::clone(&previous),
                parents: self.parents().map(|p| p.parents()).unwrap_or_default(),
            }),
        )
        .await
        {
            Ok(o) => o,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let identity = opened.export.identity();
        if identity == previous.identity() {
            opened.export.stop_tasks();
            drop(opened);
            let _ = std::fs::remove_dir_all(&dir);
            tracing::info!(image = %self.image.name, identity = %identity.short(), "the image is unchanged: no new version");
            return Ok(false);
        }
        self.exports.publish(Arc::clone(&opened.export))?;
        tracing::info!(
            image = %self.image.name,
            identity = %identity,
            previous = %previous.identity(),
            export = %opened.export.version_name(),
            "new version published: new clients get it, connected ones keep theirs"
        );
        self.opened
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(opened);
        Ok(true)
    }

    /// A root's image file: on each SIGHUP, a file that changed (replaced
    /// by a rename, or rewritten) becomes a new version.
    pub(super) async fn follow_root(self: Arc<Self>, mut hup: watch::Receiver<u64>) {
        let Some(UpstreamUrl::File(path)) = self.image.anchor().cloned() else {
            return;
        };
        let mut seen = file_state(&path);
        while hup.changed().await.is_ok() {
            let now = file_state(&path);
            if now == seen {
                tracing::info!(image = %self.image.name, path = %path.display(), "SIGHUP: the image file is unchanged");
                continue;
            }
            let Some(latest) = self.exports.latest(&self.image.name) else {
                continue;
            };
            tracing::info!(image = %self.image.name, path = %path.display(), "SIGHUP: the image file changed; building its manifest");
            match self.publish_next(latest, None).await {
                Ok(_) => seen = now,
                Err(e) => {
                    tracing::error!(image = %self.image.name, error = %herd::error_chain(&*e), "cannot open the new version; still serving the old one (SIGHUP to retry)")
                }
            }
        }
    }

    /// A child: holds its parent's latest-manifest connection, which the
    /// parent ends when it publishes a newer version; then reads the new
    /// manifest and opens that version, seeded from the one it has.
    pub(super) async fn follow_parent(self: Arc<Self>) {
        let name = self.image.name.clone();
        let mut held: Option<herd::upstream::nbd::NbdUpstream> = None;
        let mut warned = false;
        // The version that could not be opened, logged once.
        let mut failed: Option<herd::manifest::Identity> = None;
        loop {
            if let Some(up) = &held {
                // A reconnect means the parent ended the connection.
                if up.read_at(0, 8).await.is_ok() && up.connections_opened() == 1 {
                    tokio::time::sleep(FOLLOW_POLL).await;
                    continue;
                }
                held = None;
            }
            let Some(latest) = self.exports.latest(&name) else {
                return;
            };
            let Some(active) = self.parents().and_then(|p| p.active()) else {
                tokio::time::sleep(FOLLOW_POLL).await;
                continue;
            };
            let url = super::fleet::pinned(&active, None);
            match herd::manifest::fetch_held(&url).await {
                // Not herd: it has no versions to follow.
                Ok(None) => return,
                Ok(Some((m, up))) if m.identity() == latest.identity() => {
                    latest.cache.metrics().parent_identity_mismatch(false);
                    warned = false;
                    held = Some(up);
                }
                Ok(Some((m, up))) => {
                    let id = m.identity();
                    let again = failed == Some(id);
                    if !again {
                        tracing::info!(image = %name, parent = %url, identity = %id, "the parent serves a new version; opening it");
                    }
                    match self.publish_next(Arc::clone(&latest), Some(m)).await {
                        Ok(_) => {
                            latest.cache.metrics().parent_identity_mismatch(false);
                            failed = None;
                            held = Some(up);
                        }
                        Err(e) => {
                            latest.cache.metrics().parent_identity_mismatch(true);
                            if !again {
                                tracing::error!(image = %name, error = %herd::error_chain(&*e), "cannot open the parent's new version; still serving ours, and trying again each second");
                            }
                            failed = Some(id);
                        }
                    }
                }
                Err(e) => {
                    if !warned {
                        tracing::warn!(image = %name, parent = %url, error = %herd::error_chain(&e), "cannot read the parent's manifest; asking again");
                        warned = true;
                    }
                }
            }
            tokio::time::sleep(FOLLOW_POLL).await;
        }
    }

    /// The latest version's parents.
    pub(super) fn parents(&self) -> Option<Arc<FailoverUpstream>> {
        self.opened
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .last()
            .and_then(|o| o.parents.clone())
    }

    /// Forgets a retired version (its parents, profile sender) and
    /// removes its cache once nothing holds it.
    pub(super) fn retired(&self, export: &Arc<Export>) {
        let mut opened = self
            .opened
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        opened.retain(|o| !Arc::ptr_eq(&o.export, export));
    }
}

/// How often a child checks its held manifest connection.
const FOLLOW_POLL: Duration = Duration::from_secs(1);

/// What tells a changed image file: device, inode, size, mtime, ctime.
fn file_state(path: &Path) -> Option<(u64, u64, u64, i64, i64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    ))
}

/// Removes a retired version's cache files once nothing holds its cache
/// (at most `wait`): the directory too when it is one of `versions/`.
pub(super) async fn remove_cache(export: Arc<Export>, image: &ImageConfig, wait: Duration) {
    let dir = export.cache.data_dir().to_owned();
    let deadline = tokio::time::Instant::now() + wait;
    let cache = Arc::clone(&export.cache);
    drop(export);
    while Arc::strong_count(&cache) > 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if Arc::strong_count(&cache) > 1 {
        tracing::debug!(dir = %dir.display(), "a retired version's cache is still held; removing its files anyway");
    }
    drop(cache);
    let result = if dir.starts_with(versions_dir(image)) {
        std::fs::remove_dir_all(&dir)
    } else {
        CACHE_FILES
            .iter()
            .map(|f| std::fs::remove_file(dir.join(f)))
            .find(|r| {
                r.as_ref()
                    .is_err_and(|e| e.kind() != std::io::ErrorKind::NotFound)
            })
            .unwrap_or(Ok(()))
    };
    match result {
        Ok(()) => tracing::info!(dir = %dir.display(), "a retired version's cache removed"),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a retired version's cache")
        }
    }
}
