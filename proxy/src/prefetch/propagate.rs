//! How a profile travels down the tree: every proxy that has one serves it
//! as a second, read-only NBD export named [`PROFILE_EXPORT`] on the same
//! listeners; a child polls its parent for that export and, when the bytes
//! change, validates them, serves them to its own children and restarts
//! its prefetch. Any NBD client can read it too
//! (`nbdcopy nbd://parent/herd-profile boot.profile`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{plan, run};
use crate::cache::ChunkCache;
use crate::config::PrefetchSettings;
use crate::manifest::ReadAllError;
use crate::profile::Profile;
use crate::upstream::nbd::NbdUpstream;
use crate::upstream::UpstreamUrl;

/// The side export that carries the profile.
pub const PROFILE_EXPORT: &str = "herd-profile";
/// Largest profile a child accepts from its parent (≈2.8 M extents).
pub const MAX_PROFILE_BYTES: u64 = 64 << 20;
/// How often a child asks its parent for the profile.
pub const POLL: Duration = Duration::from_secs(2);

/// A validated profile, in both forms: the bytes the side export serves and
/// the decoded extents prefetch plans from (decoded once, where it arrives).
#[derive(Debug)]
pub struct Published {
    pub bytes: Vec<u8>,
    pub profile: Profile,
}

/// The profile a proxy currently serves and prefetches.
pub type Shared = Option<Arc<Published>>;

/// The parent's profile export, for an NBD parent.
#[must_use]
pub fn profile_url(parent: &UpstreamUrl) -> Option<UpstreamUrl> {
    parent.with_export(PROFILE_EXPORT)
}

async fn fetch(url: &UpstreamUrl) -> Result<Vec<u8>, String> {
    let up = NbdUpstream::connect(url.clone(), 1)
        .await
        .map_err(|e| crate::error_chain(&e))?;
    crate::manifest::read_all(&up, MAX_PROFILE_BYTES)
        .await
        .map_err(|e| match e {
            ReadAllError::Oversized(size) => {
                format!("parent's profile is {size} bytes, over {MAX_PROFILE_BYTES}")
            }
            ReadAllError::Upstream(e) => crate::error_chain(&e),
        })
}

/// A child's loop: ask the parent for its profile every [`POLL`], publish
/// it when it changes. A parent without one simply answers "no such
/// export"; the child keeps asking.
pub async fn poll_parent(url: UpstreamUrl, image_size: u64, tx: watch::Sender<Shared>) {
    let mut logged_missing = false;
    loop {
        match fetch(&url).await {
            Ok(bytes) => {
                let same = tx.borrow().as_ref().is_some_and(|p| p.bytes == bytes);
                if !same {
                    match Profile::decode(&bytes) {
                        Ok(p) if p.image_size == image_size => {
                            tracing::info!(
                                extents = p.extents.len(),
                                bytes = p.bytes(),
                                "learnt the boot profile from the parent"
                            );
                            let _ = tx.send(Some(Arc::new(Published { bytes, profile: p })));
                        }
                        Ok(p) => tracing::warn!(
                            profile_size = p.image_size,
                            image_size,
                            "the parent's profile is for an image of another size; ignored"
                        ),
                        Err(e) => {
                            tracing::warn!(error = %e, "the parent's profile is invalid; ignored")
                        }
                    }
                }
            }
            Err(e) => {
                if !logged_missing {
                    tracing::debug!(error = %e, "parent has no profile (yet)");
                    logged_missing = true;
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Every proxy's loop: (re)plan and run prefetch whenever the profile
/// changes. `Full` mode starts at once, before any profile is known.
pub async fn follow(
    cache: Arc<ChunkCache>,
    mut rx: watch::Receiver<Shared>,
    settings: PrefetchSettings,
) {
    let mut current: Option<tokio::task::JoinHandle<()>> = None;
    let mut first = true;
    loop {
        let published = rx.borrow_and_update().clone();
        let profile = published.as_ref().map(|p| &p.profile);
        if let Some(p) = profile {
            crate::metrics::profile_extents(p.extents.len());
        }
        if profile.is_some() || first {
            let chunks = plan(
                profile,
                cache.chunk_size(),
                cache.chunks_total(),
                settings.mode,
            );
            if let Some(h) = current.take() {
                h.abort();
            }
            current = Some(tokio::spawn(run(Arc::clone(&cache), chunks, settings)));
        }
        first = false;
        if rx.changed().await.is_err() {
            return;
        }
    }
}
