//! iSCSI target: serves the image as a read-only LUN (RFC 7143; SBC-3/SPC-4)
//! to hosts that attach iSCSI (open-iscsi, libvirt pools, qemu's
//! `iscsi://`), beside the NBD export and through the same chunk cache.
//!
//! ```text
//!  login.rs    login negotiation: None / CHAP (one-way, mutual), keys (pure)
//!  scsi.rs     the read-only disk: INQUIRY/VPD, READ CAPACITY, READ, … (pure)
//!  opcodes.rs  the commands it supports; REPORT SUPPORTED OPERATION CODES
//!  session.rs  one connection: login phase, CmdSN window, Data-In, TMF
//! ```
//!
//! PDU codecs are shared with the initiator (`crate::iscsi::pdu`,
//! `crate::iscsi::target_pdu`). Connections count against the NBD
//! export's limits (`--max-connections*`, reply budgets, `--allow`).

pub mod login;
pub mod opcodes;
pub mod scsi;
mod session;

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use crate::export::nbd::{Access, Export, Exports};
use crate::io::spin::{Side, Spin};

pub use login::Auth;
pub use session::SessionError;

/// Block size of the LUN.
pub const BLOCK_SIZE: u32 = 512;
/// Largest READ the target asks for (VPD Block Limits): 1 MiB, so one
/// command's reply stays within a connection's reply budget.
pub const MAX_TRANSFER_BLOCKS: u32 = (1 << 20) / BLOCK_SIZE;

/// The target: its name, who may log in, and the LUN it serves.
pub struct Target {
    pub iqn: String,
    pub auth: Auth,
    pub export: Arc<Export>,
    pub lun: scsi::Lun,
    /// Shared by every version's target: a TSIH is never reused.
    tsih: Arc<AtomicU16>,
}

impl Target {
    /// A target named `iqn` over `export`; the LUN's serial and NAA
    /// designator come from the image's identity, so a new image version
    /// is a new LUN identity to initiators.
    #[must_use]
    pub fn new(iqn: String, auth: Auth, export: Arc<Export>) -> Self {
        let id = export.cache.manifest().identity();
        let mut naa = [0u8; 16];
        naa.copy_from_slice(&id.0[..16]);
        let serial: String = id.to_string().chars().take(16).collect();
        let lun = scsi::Lun {
            size: export.cache.size(),
            block_size: BLOCK_SIZE,
            serial,
            naa,
            max_transfer_blocks: MAX_TRANSFER_BLOCKS,
        };
        Self {
            iqn,
            auth,
            export,
            lun,
            tsih: Arc::new(AtomicU16::new(0)),
        }
    }

    /// This target over another version of the image (a new LUN
    /// identity: new sessions see it, running ones keep theirs).
    #[must_use]
    pub fn with_export(&self, export: Arc<Export>) -> Self {
        let mut t = Self::new(self.iqn.clone(), self.auth.clone(), export);
        t.tsih = Arc::clone(&self.tsih);
        t
    }

    /// A new session's TSIH (never 0).
    fn next_tsih(&self) -> u16 {
        loop {
            let t = self.tsih.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
            if t != 0 {
                return t;
            }
        }
    }
}

/// The default target name: herd's naming authority, the host and the
/// export.
#[must_use]
pub fn default_iqn(host: &str, export: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect()
    };
    format!("iqn.2026-12.io.herd:{}.{}", clean(host), clean(export))
}

/// Accepts iSCSI connections until the listener fails. Each connection
/// serves the default image's latest version in `exports` when it
/// connects, and counts as its client until it closes (so the version
/// is not retired under it).
pub async fn serve(
    listener: tokio::net::TcpListener,
    target: Arc<Target>,
    exports: Arc<Exports>,
    access: Arc<Access>,
) {
    let mut target = target;
    let local = listener
        .local_addr()
        .map_or_else(|_| "0.0.0.0:3260".to_owned(), |a| a.to_string());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "iSCSI accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let ip = peer.ip();
        if !access.allow.is_empty() && !access.allow.iter().any(|n| n.contains(&ip)) {
            tracing::info!(%peer, "iSCSI connection refused: address not in --allow");
            crate::metrics::connection_refused("allow");
            continue;
        }
        let slot = match access.gate.admit(Some(ip)) {
            Ok(s) => s,
            Err(why) => {
                tracing::info!(%peer, reason = %why, "iSCSI connection refused");
                crate::metrics::connection_refused("limit");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // Where the initiator reached us: what SendTargets should name.
        let here = stream
            .local_addr()
            .map_or_else(|_| local.clone(), |a| a.to_string());
        if let Some(latest) = exports.default_export() {
            if !Arc::ptr_eq(&latest, &target.export) {
                target = Arc::new(target.with_export(latest));
            }
        }
        // The spin peeks through a dup of the socket (none: no spin).
        let spin = Spin::for_socket(&stream, access.spin, Side::Target)
            .ok()
            .flatten();
        // Out of this reactor, into the one of the core that serves it.
        let socket = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "cannot move the iSCSI connection to a core");
                continue;
            }
        };
        let (target, access) = (Arc::clone(&target), Arc::clone(&access));
        let cores = Arc::clone(&access.cores);
        cores.place(async move {
            let _slot = slot;
            let stream = match tokio::net::TcpStream::from_std(socket) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "cannot register the iSCSI connection");
                    return;
                }
            };
            let _client = target.export.client();
            let budget = Arc::new(access.gate.budget());
            let stall = access.gate.write_stall();
            match session::run(stream, here, target, budget, stall, spin).await {
                Ok(()) => tracing::debug!(%peer, "iSCSI connection closed"),
                Err(SessionError::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::UnexpectedEof
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::BrokenPipe
                    ) =>
                {
                    tracing::debug!(%peer, "iSCSI connection closed by the initiator");
                }
                Err(e) => {
                    tracing::info!(%peer, error = %crate::error_chain(&e), "iSCSI connection closed");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_are_valid_iqns() {
        assert_eq!(
            default_iqn("Host_1", "herd"),
            "iqn.2026-12.io.herd:host-1.herd"
        );
    }
}
