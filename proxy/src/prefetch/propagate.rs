//! How a profile travels down the tree: every proxy that has one serves it
//! as a second, read-only NBD export named [`PROFILE_EXPORT`] on the same
//! listeners; a child reads it from its active parent, holds that
//! connection (the parent closes it when its profile changes) and, when the
//! bytes change, validates them, serves them to its own children and
//! restarts its prefetch. Any NBD client can read it too
//! (`nbdcopy nbd://parent/herd-profile boot.profile`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{plan, run};
use crate::cache::ChunkCache;
use crate::config::PrefetchSettings;
use crate::manifest::ReadAllError;
use crate::profile::Profile;
use crate::upstream::failover::FailoverUpstream;
use crate::upstream::nbd::NbdUpstream;
use crate::upstream::{Upstream, UpstreamUrl};

/// The side export that carries the profile.
pub const PROFILE_EXPORT: &str = "herd-profile";
/// Largest profile a child accepts from its parent (≈2.8 M extents).
pub const MAX_PROFILE_BYTES: u64 = 64 << 20;
/// How often a child checks its held profile connection.
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

/// The parent's profile export of the image `parent` names, for an NBD
/// parent.
#[must_use]
pub fn profile_url(parent: &UpstreamUrl) -> Option<UpstreamUrl> {
    parent.side_export(PROFILE_EXPORT)
}

/// Longest pause between asks while the parent has no profile.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

fn describe(e: ReadAllError) -> String {
    match e {
        ReadAllError::Oversized(size) => {
            format!("parent's profile is {size} bytes, over {MAX_PROFILE_BYTES}")
        }
        ReadAllError::Upstream(e) => crate::error_chain(&e),
    }
}

fn publish(bytes: Vec<u8>, image_size: u64, tx: &watch::Sender<Shared>) {
    if tx.borrow().as_ref().is_some_and(|p| p.bytes == bytes) {
        return;
    }
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
        Err(e) => tracing::warn!(error = %e, "the parent's profile is invalid; ignored"),
    }
}

/// A child's loop: learn the active parent's profile and follow it.
///
/// Once read, the profile's connection is held: the parent closes it when
/// its profile changes, and a small read every [`POLL`] on it notices that
/// (and a parent restart) without a new connection. While the parent has
/// no profile the child asks again with a new connection, backing off from
/// [`POLL`] to a minute; a change of active parent starts over at once.
pub async fn poll_parent(
    parents: Arc<FailoverUpstream>,
    image_size: u64,
    tx: watch::Sender<Shared>,
) {
    let mut held: Option<(UpstreamUrl, NbdUpstream)> = None;
    let mut backoff = POLL;
    let mut asked: Option<(UpstreamUrl, tokio::time::Instant)> = None;
    loop {
        let url = parents.active().as_ref().and_then(profile_url);
        if held.as_ref().map(|h| &h.0) != url.as_ref() {
            held = None;
        }
        if let Some((_, up)) = &held {
            // A reconnect (the read is retried once) means the parent
            // ended the connection: its profile changed.
            if up.read_at(0, up.size().min(8) as usize).await.is_err()
                || up.connections_opened() > 1
            {
                tracing::debug!("the parent's profile connection closed; asking again");
                held = None;
                asked = None;
            }
        }
        if let (None, Some(url)) = (&held, url) {
            let due = asked
                .as_ref()
                .is_none_or(|(u, at)| *u != url || at.elapsed() >= backoff);
            if due {
                if asked.as_ref().is_some_and(|(u, _)| *u != url) {
                    backoff = POLL;
                }
                asked = Some((url.clone(), tokio::time::Instant::now()));
                match NbdUpstream::connect(url.clone(), 1).await {
                    Ok(up) => match crate::manifest::read_all(&up, MAX_PROFILE_BYTES).await {
                        Ok(bytes) => {
                            publish(bytes, image_size, &tx);
                            held = Some((url, up));
                            backoff = POLL;
                        }
                        Err(e) => {
                            tracing::warn!(error = %describe(e), "cannot read the parent's profile")
                        }
                    },
                    Err(e) => {
                        tracing::debug!(error = %crate::error_chain(&e), next_in = ?backoff, "parent has no profile (yet)");
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
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
            cache.metrics().profile_extents(p.extents.len());
            // Under a cap, the profile's chunks are evicted last.
            cache.pin_profile(&plan(
                Some(p),
                cache.chunk_size(),
                cache.chunks_total(),
                crate::config::PrefetchMode::Profile,
            ));
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
