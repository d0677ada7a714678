//! Versions of one image while serving: a root's SIGHUP, a child's
//! follower, the caches of versions opened while serving (under the
//! image's `versions/`), and their removal once a version is retired.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use herd::config::ImageConfig;
use herd::export::nbd::{Export, Exports};
use herd::manifest::stamp::Stamp;
use herd::manifest::Manifest;
use herd::upstream::failover::FailoverUpstream;
use herd::upstream::{Upstream, UpstreamUrl};
use tokio::sync::watch;

use super::image::{open_version, Ctx, Next, Opened};

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
pub(super) fn restore_versions(
    image: &ImageConfig,
    identity: &herd::manifest::Identity,
) -> Result<()> {
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
        let mut seen = Stamp::of_file(&path);
        while hup.changed().await.is_ok() {
            let now = Stamp::of_file(&path);
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
            let url = active.pinned(None);
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
