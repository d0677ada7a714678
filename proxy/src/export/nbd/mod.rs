//! NBD export: a read-only NBD server (fixed newstyle) over TCP or Unix
//! sockets, backed by the chunk cache.
//!
//! One task per connection reads requests in order (`transmission`), spawns
//! a task per READ so replies go out as soon as their data is ready (out of
//! order), and one writer task per connection serialises the replies.
//! Negotiation lives in `handshake`, one function per option reply.

mod exports;
mod handshake;
pub mod limits;
mod transmission;
pub mod zerocopy;

use std::sync::Arc;

use tokio::sync::watch;

use crate::cache::{CacheError, ChunkCache};
use crate::manifest::Manifest;
use crate::nbd::proto;
use crate::net::Listener;
use crate::prefetch::propagate::{Published, Shared};
use crate::record::daemon::ClientRecorder;

pub use exports::{valid_image_name, Exports, ExportsError, Retired, MIN_PREFIX};

/// One image that is exported: under a name, backed by its cache, its
/// manifest as the side export `herd-manifest/NAME`, and its boot profile
/// (when this proxy has one) as the side export `herd-profile/NAME`.
pub struct Export {
    pub name: String,
    pub description: String,
    pub cache: Arc<ChunkCache>,
    /// Bytes fetched ahead when a connection's sequential READ misses (0: off).
    pub read_ahead: u64,
    pub profile: watch::Receiver<Shared>,
    /// Records clients' reads (`--record-profile`).
    pub recorder: Option<Arc<ClientRecorder>>,
    /// Connections reading the image now (side exports not counted).
    pub clients: std::sync::atomic::AtomicUsize,
    /// Set once a newer version of the image is published.
    superseded: watch::Sender<bool>,
    /// Since when it has had no client (`None` while it has some).
    idle: std::sync::Mutex<Option<std::time::Instant>>,
    /// The tasks that serve this version alone (prefetch, parent polls,
    /// bitmap sync): stopped when it is retired.
    tasks: std::sync::Mutex<Vec<tokio::task::AbortHandle>>,
}

/// The `key=value` fields of an image's description (`Export::describe`);
/// empty for an export that is not a herd image (a side export, another
/// server's).
#[must_use]
pub fn image_fields(description: &str) -> Vec<(&str, &str)> {
    let fields: Vec<(&str, &str)> = description
        .split("; ")
        .filter_map(|f| f.split_once('='))
        .collect();
    if fields.iter().any(|(k, _)| *k == "identity") {
        fields
    } else {
        Vec::new()
    }
}

/// Counts a connection reading an image while it lives.
pub struct ClientGuard(Arc<Export>);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        let n = self
            .0
            .clients
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed)
            .saturating_sub(1);
        if n == 0 {
            *self
                .0
                .idle
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some(std::time::Instant::now());
        }
        self.0.cache.metrics().client(false);
    }
}

/// What one connection reads from.
#[derive(Clone)]
pub enum Backing {
    Image,
    /// The profile, as it was when the client connected.
    Profile(Arc<Published>),
    /// The image's manifest; `true` when asked for by the image's plain
    /// name (it follows the latest version: the connection ends when a
    /// newer one is published).
    Manifest(Arc<Manifest>, bool),
}

impl Backing {
    /// The bytes of a side export; `None` for the image.
    #[must_use]
    pub fn side_bytes(&self) -> Option<SideBytes> {
        match self {
            Self::Image => None,
            Self::Profile(p) => Some(SideBytes::Profile(Arc::clone(p))),
            Self::Manifest(m, _) => Some(SideBytes::Manifest(Arc::clone(m))),
        }
    }
}

/// A side export's bytes, held for the life of a connection.
pub enum SideBytes {
    Profile(Arc<Published>),
    Manifest(Arc<Manifest>),
}

impl std::ops::Deref for SideBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Self::Profile(p) => &p.bytes,
            Self::Manifest(m) => m.bytes(),
        }
    }
}

impl Export {
    /// Transmission flags advertised to clients.
    #[must_use]
    pub fn tflags() -> u16 {
        proto::TFLAG_HAS_FLAGS
            | proto::TFLAG_READ_ONLY
            | proto::TFLAG_SEND_FLUSH
            | proto::TFLAG_CAN_MULTI_CONN
            | proto::TFLAG_SEND_CACHE
    }

    /// An export of `cache` under `name`, described as `description`.
    #[must_use]
    pub fn new(
        name: String,
        description: String,
        cache: Arc<ChunkCache>,
        read_ahead: u64,
        profile: watch::Receiver<Shared>,
        recorder: Option<Arc<ClientRecorder>>,
    ) -> Self {
        Self {
            name,
            description,
            cache,
            read_ahead,
            profile,
            recorder,
            clients: std::sync::atomic::AtomicUsize::new(0),
            superseded: watch::channel(false).0,
            idle: std::sync::Mutex::new(None),
            tasks: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// The version this export serves: its manifest's identity.
    #[must_use]
    pub fn identity(&self) -> crate::manifest::Identity {
        self.cache.manifest().identity()
    }

    /// `NAME@IDENTITY`: the export name that pins this version.
    #[must_use]
    pub fn version_name(&self) -> String {
        format!("{}@{}", self.name, self.identity())
    }

    /// Resolves once a newer version of the image is published.
    pub async fn superseded(&self) {
        let mut rx = self.superseded.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Ties `task` to this version: it stops when the version is retired.
    pub fn own_task(&self, task: tokio::task::AbortHandle) {
        self.tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(task);
    }

    /// Stops every task of this version (it was retired).
    pub fn stop_tasks(&self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
        {
            t.abort();
        }
    }

    /// The description `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION` give:
    /// what it proxies, then its state now as `key=value` fields, which
    /// `herd image list` reads (`image_fields` parses them).
    #[must_use]
    pub fn describe(&self) -> String {
        let c = &self.cache;
        format!(
            "{}; identity={}; size={}; cached={}/{}; zero={}; clients={}",
            self.description,
            c.manifest().identity(),
            c.size(),
            c.chunks_present(),
            c.chunks_total(),
            c.chunks_zero(),
            self.clients.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Counts a client of the image until the guard drops.
    #[must_use]
    pub fn client(self: &Arc<Self>) -> ClientGuard {
        *self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        self.clients
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.cache.metrics().client(true);
        ClientGuard(Arc::clone(self))
    }

    /// Size of what `backing` exports.
    #[must_use]
    pub fn size_of(&self, backing: &Backing) -> u64 {
        match backing {
            Backing::Image => self.cache.size(),
            Backing::Profile(p) => p.bytes.len() as u64,
            Backing::Manifest(m, _) => m.bytes().len() as u64,
        }
    }
}

/// The errno an NBD client sees for a failed cache operation.
#[must_use]
pub fn errno_for(e: &CacheError) -> u32 {
    match e {
        CacheError::OutOfRange { .. } => proto::EINVAL,
        CacheError::Dir { .. }
        | CacheError::Bitmap(_)
        | CacheError::Fetch { .. }
        | CacheError::Data { .. }
        | CacheError::Abandoned { .. }
        | CacheError::Joined { .. }
        | CacheError::Corrupt { .. }
        | CacheError::Manifest(_) => proto::EIO,
    }
}

enum HandshakeErrorRef<'a> {
    Routine(&'a handshake::HandshakeError),
    Other(&'a handshake::HandshakeError),
}

fn classify(e: &handshake::HandshakeError) -> HandshakeErrorRef<'_> {
    match e {
        handshake::HandshakeError::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
            ) =>
        {
            HandshakeErrorRef::Routine(e)
        }
        _ => HandshakeErrorRef::Other(e),
    }
}

/// Who may connect, how, and how much they may take.
pub struct Access {
    /// STARTTLS (`--tls on|require`).
    pub tls: Option<crate::tls::Server>,
    /// `--allow`: the networks TCP clients may come from; empty allows any.
    /// Unix-socket clients are local and always allowed.
    pub allow: Vec<ipnet::IpNet>,
    /// Connection counts and reply budgets.
    pub gate: Arc<limits::Gate>,
    /// `--spin-us`: how long a connection that sends back to back is
    /// polled for its next request before its task sleeps (zero: never).
    pub spin: std::time::Duration,
    /// `hit_send`: how large resident hits leave (`zerocopy`).
    pub hit_send: zerocopy::HitSend,
    /// The threads client connections run on (`cores`).
    pub cores: Arc<crate::cores::Cores>,
}

impl Access {
    fn admits(&self, ip: Option<std::net::IpAddr>) -> bool {
        match ip {
            Some(ip) if !self.allow.is_empty() => self.allow.iter().any(|n| n.contains(&ip)),
            _ => true,
        }
    }
}

/// Accepts connections until the listener fails; each runs in its own task
/// so a misbehaving client only ever closes its own connection.
pub async fn serve(listener: Listener, exports: Arc<Exports>, access: Arc<Access>) {
    loop {
        match listener.accept().await {
            Ok(crate::net::Accepted {
                socket,
                peer,
                ip,
                dup,
            }) => {
                if !access.admits(ip) {
                    tracing::info!(%peer, "connection refused: address not in --allow");
                    crate::metrics::connection_refused("allow");
                    continue;
                }
                let slot = match access.gate.admit(ip) {
                    Ok(slot) => slot,
                    Err(why) => {
                        tracing::info!(%peer, reason = %why, "connection refused");
                        crate::metrics::connection_refused("limit");
                        if let Ok(stream) = socket.into_stream() {
                            tokio::spawn(async move { handshake::refuse(stream, &why).await });
                        }
                        continue;
                    }
                };
                crate::metrics::connection();
                let exports = Arc::clone(&exports);
                let cores = Arc::clone(&access.cores);
                let access = Arc::clone(&access);
                cores.place(async move {
                    let _slot = slot;
                    let stream = match socket.into_stream() {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::warn!(%peer, error = %e, "cannot register the connection");
                            return;
                        }
                    };
                    tracing::debug!(%peer, "client connected");
                    match transmission::run(stream, dup, &exports, &access)
                        .await
                        .as_ref()
                        .map_err(classify)
                    {
                        Ok(()) => tracing::debug!(%peer, "client disconnected"),
                        // A peer that hangs up mid-handshake (a port
                        // check, a probe) is routine: not worth a line each.
                        Err(HandshakeErrorRef::Routine(e)) => {
                            tracing::debug!(%peer, error = %crate::error_chain(e), "connection closed")
                        }
                        Err(HandshakeErrorRef::Other(e)) => {
                            tracing::info!(%peer, error = %crate::error_chain(e), "connection closed");
                            if matches!(
                                e,
                                handshake::HandshakeError::Tls(_)
                                    | handshake::HandshakeError::TlsRequired
                            ) {
                                crate::metrics::connection_refused("tls");
                            }
                        }
                    }
                });
            }
            Err(e) => {
                // EMFILE and friends are transient: back off, keep serving.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}
