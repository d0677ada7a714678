//! NBD export: a read-only NBD server (fixed newstyle) over TCP or Unix
//! sockets, backed by the chunk cache.
//!
//! One task per connection reads requests in order (`transmission`), spawns
//! a task per READ so replies go out as soon as their data is ready (out of
//! order), and one writer task per connection serialises the replies.
//! Negotiation lives in `handshake`, one function per option reply.

mod handshake;
pub mod limits;
pub mod spin;
mod transmission;
mod zerocopy;

use std::sync::Arc;

use tokio::sync::watch;

use crate::cache::{CacheError, ChunkCache};
use crate::manifest::{Manifest, MANIFEST_EXPORT};
use crate::nbd::proto;
use crate::net::Listener;
use crate::prefetch::propagate::{Published, Shared, PROFILE_EXPORT};
use crate::record::daemon::ClientRecorder;

/// What is exported: the image under a name, backed by the cache, its
/// manifest as the side export `herd-manifest`, and the boot profile (when
/// this proxy has one) as the side export `herd-profile`.
pub struct Export {
    pub name: String,
    pub description: String,
    pub cache: Arc<ChunkCache>,
    /// Bytes fetched ahead when a connection's sequential READ misses (0: off).
    pub read_ahead: u64,
    pub profile: watch::Receiver<Shared>,
    /// Records clients' reads (`--record-profile`).
    pub recorder: Option<Arc<ClientRecorder>>,
}

/// What one connection reads from.
#[derive(Clone)]
pub enum Backing {
    Image,
    /// The profile, as it was when the client connected.
    Profile(Arc<Published>),
    /// The image's manifest.
    Manifest(Arc<Manifest>),
}

impl Backing {
    /// The bytes of a side export; `None` for the image.
    #[must_use]
    pub fn side_bytes(&self) -> Option<SideBytes> {
        match self {
            Self::Image => None,
            Self::Profile(p) => Some(SideBytes::Profile(Arc::clone(p))),
            Self::Manifest(m) => Some(SideBytes::Manifest(Arc::clone(m))),
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

    /// What a client asking for `name` gets ("" is the default export, as
    /// qemu and nbdkit treat it), if anything.
    #[must_use]
    pub fn select(&self, name: &str) -> Option<Backing> {
        if name.is_empty() || name == self.name {
            return Some(Backing::Image);
        }
        if name == PROFILE_EXPORT {
            return self.profile.borrow().clone().map(Backing::Profile);
        }
        if name == MANIFEST_EXPORT {
            return Some(Backing::Manifest(Arc::clone(self.cache.manifest())));
        }
        None
    }

    /// Size of what `backing` exports.
    #[must_use]
    pub fn size_of(&self, backing: &Backing) -> u64 {
        match backing {
            Backing::Image => self.cache.size(),
            Backing::Profile(p) => p.bytes.len() as u64,
            Backing::Manifest(m) => m.bytes().len() as u64,
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
pub async fn serve(listener: Listener, export: Arc<Export>, access: Arc<Access>) {
    loop {
        match listener.accept().await {
            Ok(crate::net::Accepted {
                stream,
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
                        tokio::spawn(async move { handshake::refuse(stream, &why).await });
                        continue;
                    }
                };
                crate::metrics::connection();
                let export = Arc::clone(&export);
                let access = Arc::clone(&access);
                tokio::spawn(async move {
                    let _slot = slot;
                    tracing::debug!(%peer, "client connected");
                    match transmission::run(stream, dup, &export, &access)
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
