//! iSCSI initiator (RFC 7143), read-mostly: what the root proxy uses to
//! fetch the golden image from a LIO (or tgt) target. The codecs serve
//! herd's own target too (`export::iscsi`).
//!
//! ```text
//!  pdu.rs    BHS codec (pure)          text.rs  key=value (pure)
//!  target_pdu.rs  the target's side of the BHS codec (pure)
//!  scsi.rs   CDBs, sense, VPD (pure)   chap.rs  CHAP-MD5
//!  login.rs  login phase: security (None / CHAP), operational keys, redirect
//!  session.rs full-feature phase: CmdSN window, many READs in flight,
//!             Data-In reassembly by offset, NOP-In, async logout, Reject
//! ```
//!
//! Error recovery level 0: a lost connection is handled by logging in again
//! and reissuing the commands (see `upstream::iscsi`).

pub mod chap;
pub mod login;
pub mod pdu;
pub mod scsi;
pub mod session;
pub mod stream;
pub mod target_pdu;
pub mod text;

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub use login::{Chap, LoginSpec};
pub use session::Session;

/// Default iSCSI port.
pub const ISCSI_PORT: u16 = 3260;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const LOGIN_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Error)]
pub enum IscsiError {
    #[error("I/O error")]
    Io(#[from] std::io::Error),
    #[error("malformed PDU")]
    Pdu(#[from] pdu::PduError),
    #[error("malformed text keys")]
    Text(#[from] text::TextError),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("login rejected: {}", login_status(*.class, *.detail))]
    LoginRejected { class: u8, detail: u8 },
    #[error("target requires CHAP authentication; put the user in the URL (iscsi://USER@host/...) and the secret in --iscsi-secret-file or HERD_ISCSI_SECRET")]
    AuthRequired,
    #[error("too many login redirects")]
    Redirects,
    #[error("timed out during {0}")]
    Timeout(&'static str),
}

/// RFC 7143 §11.13.5 status classes and details, for operators.
fn login_status(class: u8, detail: u8) -> String {
    let what = match (class, detail) {
        (2, 1) => "authentication failed (wrong CHAP user or secret)",
        (2, 2) => "authorization failure (initiator not allowed; check the target's ACL)",
        (2, 3) => "target not found (check the IQN)",
        (2, 4) => "target removed",
        (2, 7) => "missing parameter",
        (2, _) => "initiator error",
        (3, 1) => "target error",
        (3, 2) => "service unavailable",
        (3, 3) => "out of resources",
        _ => "error",
    };
    format!("{what} (status class {class}, detail {detail})")
}

/// Where a target listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Portal {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for Portal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

fn parse_portal(s: &str) -> Option<Portal> {
    let (h, p) = s.rsplit_once(':')?;
    Some(Portal {
        host: h.trim_start_matches('[').trim_end_matches(']').to_owned(),
        port: p.parse().ok()?,
    })
}

async fn dial(p: &Portal) -> Result<TcpStream, IscsiError> {
    let s = tokio::time::timeout(
        CONNECT_TIMEOUT,
        TcpStream::connect((p.host.as_str(), p.port)),
    )
    .await
    .map_err(|_| IscsiError::Timeout("connect"))??;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Connects and logs in, following up to four redirects.
///
/// # Errors
/// Any `IscsiError` of connect or login.
pub async fn open(
    portal: &Portal,
    spec: &LoginSpec,
) -> Result<(TcpStream, login::Params), IscsiError> {
    let mut at = portal.clone();
    for _ in 0..4 {
        let mut s = dial(&at).await?;
        let out = tokio::time::timeout(LOGIN_TIMEOUT, login::login(&mut s, spec))
            .await
            .map_err(|_| IscsiError::Timeout("login"))??;
        match out {
            login::Outcome::LoggedIn(p) => return Ok((s, p)),
            login::Outcome::Redirect(addr) => {
                tracing::info!(from = %at, to = %addr, "iSCSI login redirected");
                at = parse_portal(&addr).ok_or_else(|| {
                    IscsiError::Protocol(format!("bad redirect address `{addr}`"))
                })?;
            }
        }
    }
    Err(IscsiError::Redirects)
}

/// Logs in to `spec.target` and starts the full-feature phase for `lun`.
///
/// # Errors
/// As `open`.
pub async fn connect(
    portal: &Portal,
    spec: &LoginSpec,
    lun: u16,
    io: crate::io::ring_stream::NetIo,
    spin: std::time::Duration,
) -> Result<Arc<Session>, IscsiError> {
    let (s, params) = open(portal, spec).await?;
    Ok(Session::start(s, params, lun, io, spin)?)
}

/// A SendTargets result: target name and its portals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    pub target: String,
    pub addresses: Vec<String>,
}

/// Runs a discovery session with `SendTargets=All`.
///
/// # Errors
/// Login or protocol errors.
pub async fn discover(
    portal: &Portal,
    initiator: &str,
    chap: Option<Chap>,
) -> Result<Vec<Discovered>, IscsiError> {
    let spec = LoginSpec {
        initiator: initiator.to_owned(),
        target: None,
        chap,
        isid: isid(),
        digests: false,
    };
    let (mut s, params) = open(portal, &spec).await?;
    let mut out = Vec::new();
    let mut req = text::encode(&[("SendTargets", "All".into())]);
    let mut all = Vec::new();
    let mut ttt = pdu::RESERVED_TAG;
    let mut exp_stat_sn = params.exp_stat_sn;
    // A long list arrives in several Text responses (C bit); each is
    // acknowledged with an empty Text request carrying the TTT.
    for _ in 0..64 {
        out.clear();
        pdu::encode_text(1, params.cmd_sn, exp_stat_sn, ttt, &req, &mut out);
        s.write_all(&out).await?;
        let mut bhs = [0u8; pdu::BHS_LEN];
        s.read_exact(&mut bhs).await?;
        let h = pdu::decode(&bhs)?;
        if h.data_len > 1 << 20 {
            return Err(IscsiError::Protocol(
                "SendTargets response too large".into(),
            ));
        }
        let mut data = vec![0u8; h.ahs_len + pdu::padded(h.data_len)];
        s.read_exact(&mut data).await?;
        all.extend_from_slice(&data[h.ahs_len..h.ahs_len + h.data_len]);
        let TargetPdu::TextResp {
            final_, ttt: t, sn, ..
        } = h.pdu
        else {
            return Err(IscsiError::Protocol(format!(
                "expected a Text response, got {:?}",
                h.pdu
            )));
        };
        exp_stat_sn = sn.stat_sn.wrapping_add(1);
        if final_ {
            break;
        }
        ttt = t;
        req.clear();
    }
    let mut found: Vec<Discovered> = Vec::new();
    for (k, v) in text::parse(&all)? {
        match k.as_str() {
            "TargetName" => found.push(Discovered {
                target: v,
                addresses: Vec::new(),
            }),
            "TargetAddress" => {
                if let Some(d) = found.last_mut() {
                    d.addresses.push(v);
                }
            }
            _ => {}
        }
    }
    out.clear();
    pdu::encode_logout(2, 0, params.cmd_sn, exp_stat_sn, &mut out);
    let _ = s.write_all(&out).await;
    Ok(found)
}

use pdu::TargetPdu;

/// A per-process ISID (type "random", RFC 7143 §11.12.5) so two herd
/// processes on one host get distinct sessions.
#[must_use]
pub fn isid() -> [u8; 6] {
    let pid = std::process::id().to_be_bytes();
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        .to_be_bytes();
    [0x80, pid[2], pid[3], t[1], t[2], t[3]]
}
