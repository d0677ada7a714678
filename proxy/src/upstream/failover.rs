//! Several parents, one upstream: a read that fails or stalls on one parent
//! is re-issued to the next, so a client below never sees a parent die.
//!
//! ```text
//!  cache fetch ──▶ FailoverUpstream::read_at
//!                    ├ parent 1 (tree parent)   ── NBD pool ─┐ first parent that is up
//!                    ├ parent 2 (alternate)     ── NBD pool  │ takes the read; a lost
//!                    └ parent n (the root)      ── NBD pool ─┘ or stalled one is re-issued
//!                  prober: every `probe_interval`, one small read per parent on a
//!                  held connection to its `herd-manifest` export (served from memory)
//! ```
//!
//! Three deadlines bound a read: a parent that stops answering is caught by
//! its probe (`probe_timeout`, default 0.75 s: a hung process, a dead link),
//! which marks it down and wakes every read waiting on it; a parent that
//! answers probes but not one read is left after `request_timeout`; and when
//! every parent is down, a read keeps cycling through them for
//! `give_up` (the startup `parent_timeout`) before the client sees EIO, so a
//! root that restarts costs a pause, not an error. The cache's single-flight
//! map sits above this: joiners of a fetch follow its re-issued read, and a
//! switch never fetches a chunk twice.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::health::{Change, Health};
use super::nbd::NbdUpstream;
use super::{ReadFuture, Upstream, UpstreamError, UpstreamResult, UpstreamUrl};
use crate::io::IoBuf;

/// How a node fails over between parents.
#[derive(Debug, Clone, Copy)]
pub struct FailoverSettings {
    /// NBD connections per parent.
    pub connections: usize,
    /// A read one parent has not answered in this long goes to the next,
    /// even when the parent still answers probes.
    pub request_timeout: Duration,
    /// How often every parent is probed.
    pub probe_interval: Duration,
    /// A probe unanswered this long marks the parent down.
    pub probe_timeout: Duration,
    /// A down parent is taken back after answering probes this long.
    pub rejoin_after: Duration,
    /// How long a read (or the startup) waits while every parent is down.
    pub give_up: Duration,
}

impl Default for FailoverSettings {
    fn default() -> Self {
        Self {
            connections: crate::config::DEFAULT_CONNECTIONS,
            request_timeout: Duration::from_secs(30),
            probe_interval: Duration::from_millis(250),
            probe_timeout: Duration::from_millis(750),
            rejoin_after: Duration::from_secs(5),
            give_up: Duration::from_secs(crate::config::DEFAULT_PARENT_TIMEOUT),
        }
    }
}

/// The side export probes read: served from memory by every herd node.
const PROBE_EXPORT: &str = crate::manifest::MANIFEST_EXPORT;
const PROBE_LEN: usize = 64;

struct Parent {
    url: UpstreamUrl,
    label: String,
    /// Its `herd_upstream_active` label: the URL without a version pin,
    /// so a series outlives the versions that pass through the parent.
    metric: String,
    data: tokio::sync::Mutex<Option<Arc<NbdUpstream>>>,
    probe: tokio::sync::Mutex<Option<Arc<NbdUpstream>>>,
    /// Set once a parent is found to have no `herd-manifest` (qemu-nbd,
    /// nbdkit): probes then read the image export itself.
    probe_image: AtomicBool,
    health: Mutex<Health>,
    /// Bumped whenever the parent goes down: wakes reads waiting on it.
    downs: watch::Sender<u64>,
}

impl Parent {
    fn new(url: UpstreamUrl, rejoin_after: Duration) -> Self {
        Self {
            label: url.to_string(),
            metric: url.pinned(None).to_string(),
            url,
            data: tokio::sync::Mutex::new(None),
            probe: tokio::sync::Mutex::new(None),
            probe_image: AtomicBool::new(false),
            health: Mutex::new(Health::new(rejoin_after)),
            downs: watch::channel(0).0,
        }
    }

    /// This parent's server under `url` (another export): health and the
    /// probe connection carry over, the data connections do not.
    fn retarget(&self, url: UpstreamUrl) -> Self {
        let health = self.health.lock().map_or_else(|e| *e.into_inner(), |h| *h);
        let probe = self.probe.try_lock().ok().and_then(|g| g.clone());
        Self {
            label: url.to_string(),
            metric: url.pinned(None).to_string(),
            url,
            data: tokio::sync::Mutex::new(None),
            probe: tokio::sync::Mutex::new(probe),
            probe_image: AtomicBool::new(self.probe_image.load(Ordering::Relaxed)),
            health: Mutex::new(health),
            downs: watch::channel(0).0,
        }
    }

    fn is_up(&self) -> bool {
        self.health.lock().map(|h| h.is_up()).unwrap_or(false)
    }

    async fn data(
        &self,
        connections: usize,
        size: Option<u64>,
    ) -> UpstreamResult<Arc<NbdUpstream>> {
        let mut slot = self.data.lock().await;
        if let Some(up) = slot.as_ref() {
            return Ok(Arc::clone(up));
        }
        let up = Arc::new(NbdUpstream::connect(self.url.clone(), connections).await?);
        if let Some(size) = size {
            if up.size() != size {
                return Err(UpstreamError::Handshake {
                    addr: self.label.clone(),
                    reason: format!(
                        "serves {} bytes, but this node's image is {size} bytes",
                        up.size()
                    ),
                });
            }
        }
        *slot = Some(Arc::clone(&up));
        Ok(up)
    }

    /// One small read on the held probe connection.
    async fn probe(&self) -> UpstreamResult<()> {
        let mut slot = self.probe.lock().await;
        if slot.is_none() {
            let image = self.probe_image.load(Ordering::Relaxed);
            let url = if image {
                self.url.clone()
            } else {
                self.url
                    .with_export(PROBE_EXPORT)
                    .unwrap_or_else(|| self.url.clone())
            };
            match NbdUpstream::connect(url, 1).await {
                Ok(up) => *slot = Some(Arc::new(up)),
                Err(UpstreamError::NoSuchExport { .. }) if !image => {
                    self.probe_image.store(true, Ordering::Relaxed);
                    *slot = Some(Arc::new(NbdUpstream::connect(self.url.clone(), 1).await?));
                }
                Err(e) => return Err(e),
            }
        }
        let Some(up) = slot.as_ref() else {
            return Err(UpstreamError::ConnectionLost {
                addr: self.label.clone(),
            });
        };
        let len = PROBE_LEN.min(usize::try_from(up.size()).unwrap_or(PROBE_LEN));
        match up.read_at(0, len).await {
            Ok(_) => Ok(()),
            Err(e) => {
                *slot = None;
                Err(e)
            }
        }
    }

    /// Records a failure; returns whether the parent just went down (its
    /// pool is then dropped: see [`Parent::reset`]).
    fn failed(&self, why: &str) -> bool {
        let change = self
            .health
            .lock()
            .ok()
            .and_then(|mut h| h.failed(Instant::now()));
        if change == Some(Change::WentDown) {
            tracing::warn!(parent = %self.label, reason = why, "parent is down; reads go to the next upstream");
            crate::metrics::upstream_down();
            self.reset();
            self.downs.send_modify(|g| *g += 1);
            true
        } else {
            false
        }
    }

    fn answered(&self) -> bool {
        let change = self
            .health
            .lock()
            .ok()
            .and_then(|mut h| h.answered(Instant::now()));
        if let Some(Change::CameBack { down_for }) = change {
            tracing::info!(parent = %self.label, down_ms = down_for.as_millis(), "parent answers again; taken back");
            true
        } else {
            false
        }
    }

    /// Forgets the connections of a parent that went down: a read cut off
    /// mid-request may have left half a request on one. Never waits: a
    /// connect in progress (which holds the lock) makes a fresh pool anyway.
    fn reset(&self) {
        if let Ok(mut g) = self.data.try_lock() {
            *g = None;
        }
    }
}

/// Why one attempt on one parent ended.
enum Attempt {
    /// The parent answered with an error for this range: it is alive.
    Refused(UpstreamError),
    /// Connection lost, unreachable, or answered wrongly.
    Failed(UpstreamError),
    /// The prober (or another read) found the parent down meanwhile.
    WentDown,
    /// `request_timeout` passed.
    Deadline,
}

/// An upstream over an ordered list of NBD parents (tree parent first, the
/// root last), changeable at run time when membership changes.
pub struct FailoverUpstream {
    parents: RwLock<Arc<Vec<Arc<Parent>>>>,
    settings: FailoverSettings,
    size: u64,
    /// The parent metrics and logs call active: the first one up.
    active: Mutex<Option<String>>,
}

impl FailoverUpstream {
    /// Connects to the first parent of `urls` that answers, cycling through
    /// them for `settings.give_up` while none does; starts the prober.
    ///
    /// # Errors
    /// The last parent's error when none answered in time, or at once when
    /// a lone parent answers but is unusable (no such export, not NBD).
    pub async fn connect(
        urls: Vec<UpstreamUrl>,
        settings: FailoverSettings,
    ) -> UpstreamResult<Arc<Self>> {
        let parents: Vec<Arc<Parent>> = urls
            .into_iter()
            .map(|u| Arc::new(Parent::new(u, settings.rejoin_after)))
            .collect();
        let Some(first) = parents.first() else {
            return Err(UpstreamError::Open {
                path: "(no upstream)".into(),
                source: std::io::Error::other("no parents given"),
            });
        };
        let started = tokio::time::Instant::now();
        let deadline = started + settings.give_up;
        // A fleet starts all at once: while the tree parent may still be
        // starting, wait for it rather than load an alternate (the root).
        let grace = settings.rejoin_after * 2;
        let mut wait = Duration::from_millis(100);
        let (size, found) = 'found: loop {
            let mut last = None;
            let tried = if started.elapsed() < grace {
                1
            } else {
                parents.len()
            };
            for (i, p) in parents.iter().enumerate().take(tried) {
                match p.data(settings.connections, None).await {
                    Ok(up) => break 'found (up.size(), i),
                    Err(e @ UpstreamError::Connect { .. }) => last = Some(e),
                    Err(e) if parents.len() == 1 => return Err(e),
                    Err(e) => {
                        tracing::warn!(parent = %p.label, error = %crate::error_chain(&e), "parent unusable; trying the next");
                        last = Some(e);
                    }
                }
            }
            let e = last.unwrap_or_else(|| UpstreamError::ConnectionLost {
                addr: first.label.clone(),
            });
            if tokio::time::Instant::now() + wait >= deadline {
                return Err(e);
            }
            tracing::warn!(error = %crate::error_chain(&e), retry_in = ?wait, "no parent reachable yet");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
        };
        // Parents that did not answer are down until they have answered
        // probes for `rejoin_after`: reads and the manifest go to the one
        // that did.
        for p in &parents[..found] {
            p.failed("unreachable at start");
        }
        let me = Arc::new(Self {
            parents: RwLock::new(Arc::new(parents)),
            settings,
            size,
            active: Mutex::new(None),
        });
        me.update_active();
        tokio::spawn(prober(Arc::downgrade(&me)));
        Ok(me)
    }

    fn snapshot(&self) -> Arc<Vec<Arc<Parent>>> {
        self.parents
            .read()
            .map(|p| Arc::clone(&p))
            .unwrap_or_else(|e| Arc::clone(&e.into_inner()))
    }

    /// The parents in order, as URLs.
    #[must_use]
    pub fn parents(&self) -> Vec<UpstreamUrl> {
        self.snapshot().iter().map(|p| p.url.clone()).collect()
    }

    /// The parent reads go to now (the first one up), if any is up.
    #[must_use]
    pub fn active(&self) -> Option<UpstreamUrl> {
        self.snapshot()
            .iter()
            .find(|p| p.is_up())
            .map(|p| p.url.clone())
    }

    /// Replaces the parent list (membership changed), keeping the
    /// connections and health of parents that stay.
    pub fn set_parents(&self, urls: Vec<UpstreamUrl>) {
        if urls.is_empty() {
            return;
        }
        let old = self.snapshot();
        let new: Vec<Arc<Parent>> = urls
            .into_iter()
            .map(|u| {
                if let Some(p) = old.iter().find(|p| p.url == u) {
                    return Arc::clone(p);
                }
                // The same server under another export (a version pinned):
                // its health and probe connection carry over.
                match old
                    .iter()
                    .find(|p| p.url.with_export("") == u.with_export(""))
                {
                    Some(p) => Arc::new(p.retarget(u)),
                    None => Arc::new(Parent::new(u, self.settings.rejoin_after)),
                }
            })
            .collect();
        let labels: Vec<&str> = new.iter().map(|p| p.label.as_str()).collect();
        tracing::info!(parents = ?labels, "upstream list changed");
        for p in old.iter().filter(|p| !new.iter().any(|n| n.url == p.url)) {
            crate::metrics::upstream_active(&p.metric, false);
        }
        if let Ok(mut g) = self.parents.write() {
            *g = Arc::new(new);
        }
        self.update_active();
    }

    fn update_active(&self) {
        let parents = self.snapshot();
        let now = parents.iter().find(|p| p.is_up()).map(|p| p.label.clone());
        let Ok(mut active) = self.active.lock() else {
            return;
        };
        if *active == now {
            return;
        }
        for p in parents.iter() {
            crate::metrics::upstream_active(&p.metric, now.as_deref() == Some(p.label.as_str()));
        }
        match (&*active, &now) {
            (Some(a), Some(b)) => tracing::info!(from = %a, to = %b, "active parent changed"),
            (None, Some(b)) => tracing::info!(parent = %b, "active parent"),
            (_, None) => tracing::warn!("every parent is down"),
        }
        *active = now;
    }

    async fn attempt(
        &self,
        p: &Parent,
        offset: u64,
        len: usize,
        up: bool,
    ) -> Result<IoBuf, Attempt> {
        let mut downs = p.downs.subscribe();
        // A parent already down (tried as a last resort) gets a short leash.
        let limit = if up {
            self.settings.request_timeout
        } else {
            self.settings.probe_timeout * 2
        };
        let read = async {
            let conn = p
                .data(self.settings.connections, Some(self.size))
                .await
                .map_err(|e| match e {
                    // An answer, not an outage: the parent no longer has
                    // this export (a version it retired). Waiting for it
                    // would not bring it back.
                    e @ UpstreamError::NoSuchExport { .. } => Attempt::Refused(e),
                    e => Attempt::Failed(e),
                })?;
            conn.read_at(offset, len).await.map_err(|e| match e {
                e @ UpstreamError::Remote { .. } => Attempt::Refused(e),
                e => Attempt::Failed(e),
            })
        };
        tokio::select! {
            r = read => r,
            _ = downs.changed(), if up => Err(Attempt::WentDown),
            () = tokio::time::sleep(limit) => Err(Attempt::Deadline),
        }
    }

    async fn read(&self, offset: u64, len: usize) -> UpstreamResult<IoBuf> {
        let started = tokio::time::Instant::now();
        let mut wait = Duration::from_millis(50);
        let mut last: Option<UpstreamError> = None;
        // The parent of the previous attempt (an Arc: no allocation per read).
        let mut previous: Option<Arc<Parent>> = None;
        loop {
            let mut unreachable = false;
            let parents = self.snapshot();
            // Parents that are up, in order; then the others, as a last resort.
            let order = parents
                .iter()
                .filter(|p| p.is_up())
                .chain(parents.iter().filter(|p| !p.is_up()));
            for p in order {
                let up = p.is_up();
                if previous.as_ref().is_some_and(|prev| !Arc::ptr_eq(prev, p)) {
                    crate::metrics::upstream_failover();
                }
                previous = Some(Arc::clone(p));
                match self.attempt(p, offset, len, up).await {
                    Ok(buf) => {
                        if !up && p.answered() {
                            self.update_active();
                        }
                        return Ok(buf);
                    }
                    Err(Attempt::Refused(e)) => {
                        tracing::warn!(parent = %p.label, error = %crate::error_chain(&e), "parent refused a read; asking the next");
                        last = Some(e);
                    }
                    Err(Attempt::Failed(e)) => {
                        unreachable = true;
                        if p.failed(&crate::error_chain(&e)) {
                            self.update_active();
                        }
                        last = Some(e);
                    }
                    Err(Attempt::WentDown) => {
                        unreachable = true;
                        p.reset();
                        last = Some(UpstreamError::ConnectionLost {
                            addr: p.label.clone(),
                        });
                    }
                    Err(Attempt::Deadline) => {
                        unreachable = true;
                        crate::metrics::upstream_deadline();
                        if p.failed("read deadline passed") {
                            self.update_active();
                        }
                        last = Some(UpstreamError::Read {
                            offset,
                            len,
                            source: std::io::ErrorKind::TimedOut.into(),
                        });
                    }
                }
            }
            // Every parent failed this read. If each one answered (with an
            // error), that is the answer; if some were unreachable, wait for
            // one to come back (a root restarting).
            if !unreachable || started.elapsed() + wait >= self.settings.give_up {
                return Err(last.unwrap_or(UpstreamError::ConnectionLost {
                    addr: self.describe(),
                }));
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(1));
        }
    }
}

/// Probes every parent each `probe_interval` until the upstream is dropped.
async fn prober(me: std::sync::Weak<FailoverUpstream>) {
    loop {
        let Some(up) = me.upgrade() else { return };
        let (interval, timeout) = (up.settings.probe_interval, up.settings.probe_timeout);
        let parents = up.snapshot();
        drop(up);
        let mut probes = tokio::task::JoinSet::new();
        for p in parents.iter() {
            let p = Arc::clone(p);
            probes.spawn(async move {
                match tokio::time::timeout(timeout, p.probe()).await {
                    Ok(Ok(())) => p.answered(),
                    Ok(Err(e)) => p.failed(&format!("probe failed: {}", crate::error_chain(&e))),
                    Err(_) => {
                        // The connection may be wedged mid-request: open anew.
                        *p.probe.lock().await = None;
                        p.failed("probe unanswered")
                    }
                }
            });
        }
        let mut changed = false;
        while let Some(r) = probes.join_next().await {
            changed |= r.unwrap_or(false);
        }
        if changed {
            if let Some(up) = me.upgrade() {
                up.update_active();
            }
        }
        tokio::time::sleep(interval).await;
    }
}

impl Upstream for FailoverUpstream {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, len: usize) -> ReadFuture<'_> {
        Box::pin(self.read(offset, len))
    }

    fn describe(&self) -> String {
        self.active()
            .or_else(|| self.snapshot().first().map(|p| p.url.clone()))
            .map_or_else(|| "(no parent)".into(), |u| u.to_string())
    }

    fn extents(&self) -> super::ExtentsFuture<'_> {
        let url = self
            .active()
            .or_else(|| self.snapshot().first().map(|p| p.url.clone()));
        Box::pin(async move {
            match url {
                Some(url) => super::nbd_map::extents(&url, self.size).await,
                None => Ok(None),
            }
        })
    }
}
