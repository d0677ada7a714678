//! The login phase (RFC 7143 §6): security negotiation (None or CHAP-MD5),
//! operational negotiation, redirects.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::pdu::{self, LoginReq, TargetPdu};
use super::{chap, text, IscsiError};

/// What we ask for; the target may lower the sizes.
pub const OUR_MAX_RECV_DSL: u32 = 256 * 1024;
const OUR_MAX_BURST: u32 = 16 * 1024 * 1024 - 512;

/// CHAP credentials (the secret never appears in logs or URLs).
#[derive(Clone)]
pub struct Chap {
    pub user: String,
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for Chap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chap")
            .field("user", &self.user)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Who logs in where.
#[derive(Debug, Clone)]
pub struct LoginSpec {
    pub initiator: String,
    /// `None` for a discovery session.
    pub target: Option<String>,
    pub chap: Option<Chap>,
    pub isid: [u8; 6],
    /// Offer CRC32C header and data digests (else None only).
    pub digests: bool,
}

/// Negotiated session parameters.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// Largest data segment the target accepts from us.
    pub max_xmit_dsl: u32,
    pub max_burst: u32,
    pub first_burst: u32,
    pub tsih: u16,
    /// Next CmdSN to use and the StatSN we expect next.
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub max_cmd_sn: u32,
    /// CRC32C digests negotiated for the full-feature phase.
    pub header_digest: bool,
    pub data_digest: bool,
}

/// Outcome of a login attempt.
pub enum Outcome {
    LoggedIn(Params),
    /// Class 1: log in at this address instead ("host:port").
    Redirect(String),
}

struct Exchange {
    itt: u32,
    cmd_sn: u32,
    exp_stat_sn: u32,
    max_cmd_sn: u32,
    tsih: u16,
}

async fn round<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    spec: &LoginSpec,
    ex: &mut Exchange,
    transit: bool,
    csg: u8,
    nsg: u8,
    keys: &[(&str, String)],
) -> Result<(bool, u8, Vec<(String, String)>), LoginReply> {
    let mut out = Vec::new();
    pdu::encode_login(
        &LoginReq {
            transit,
            csg,
            nsg,
            isid: spec.isid,
            tsih: ex.tsih,
            itt: ex.itt,
            cid: 0,
            cmd_sn: ex.cmd_sn,
            exp_stat_sn: ex.exp_stat_sn,
        },
        &text::encode(keys),
        &mut out,
    );
    s.write_all(&out)
        .await
        .map_err(|e| LoginReply::Err(IscsiError::Io(e)))?;
    s.flush()
        .await
        .map_err(|e| LoginReply::Err(IscsiError::Io(e)))?;
    let mut bhs = [0u8; pdu::BHS_LEN];
    s.read_exact(&mut bhs)
        .await
        .map_err(|e| LoginReply::Err(IscsiError::Io(e)))?;
    let h = pdu::decode(&bhs).map_err(|e| LoginReply::Err(IscsiError::Pdu(e)))?;
    if h.data_len > 64 * 1024 {
        return Err(LoginReply::Err(IscsiError::Protocol(format!(
            "login response of {} bytes",
            h.data_len
        ))));
    }
    let mut rest = vec![0u8; h.ahs_len + pdu::padded(h.data_len)];
    s.read_exact(&mut rest)
        .await
        .map_err(|e| LoginReply::Err(IscsiError::Io(e)))?;
    let data = &rest[h.ahs_len..h.ahs_len + h.data_len];
    let TargetPdu::LoginResp {
        transit: t,
        nsg: next,
        tsih,
        sn,
        status_class,
        status_detail,
        ..
    } = h.pdu
    else {
        return Err(LoginReply::Err(IscsiError::Protocol(format!(
            "expected a login response, got {:?}",
            h.pdu
        ))));
    };
    let keys = text::parse(data).map_err(|e| LoginReply::Err(IscsiError::Text(e)))?;
    match status_class {
        0 => {}
        1 => {
            let addr = text::get(&keys, "TargetAddress").unwrap_or_default();
            let addr = addr.split(',').next().unwrap_or_default().to_owned();
            return Err(LoginReply::Redirect(addr));
        }
        _ => {
            return Err(LoginReply::Err(IscsiError::LoginRejected {
                class: status_class,
                detail: status_detail,
            }))
        }
    }
    ex.tsih = tsih;
    ex.exp_stat_sn = sn.stat_sn.wrapping_add(1);
    ex.max_cmd_sn = sn.max_cmd_sn;
    Ok((t, next, keys))
}

enum LoginReply {
    Err(IscsiError),
    Redirect(String),
}

fn num(keys: &[(String, String)], k: &str) -> Option<u32> {
    text::get(keys, k).and_then(|v| v.parse().ok())
}

/// Runs the login phase on a fresh connection.
///
/// # Errors
/// `Io`, `Pdu` or `Protocol` for a broken exchange; `LoginRejected` (e.g.
/// authentication failure, class 2 detail 1); `AuthRequired` when the target
/// wants CHAP and no credentials were given.
pub async fn login<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    spec: &LoginSpec,
) -> Result<Outcome, IscsiError> {
    let mut ex = Exchange {
        itt: 0,
        cmd_sn: 1,
        exp_stat_sn: 0,
        max_cmd_sn: 1,
        tsih: 0,
    };
    match run(s, spec, &mut ex).await {
        Ok(p) => Ok(Outcome::LoggedIn(p)),
        Err(LoginReply::Redirect(a)) => Ok(Outcome::Redirect(a)),
        Err(LoginReply::Err(e)) => Err(e),
    }
}

async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    spec: &LoginSpec,
    ex: &mut Exchange,
) -> Result<Params, LoginReply> {
    let mut sec: Vec<(&str, String)> = vec![("InitiatorName", spec.initiator.clone())];
    match &spec.target {
        Some(t) => {
            sec.push(("SessionType", "Normal".into()));
            sec.push(("TargetName", t.clone()));
        }
        None => sec.push(("SessionType", "Discovery".into())),
    }
    // --- security stage
    if let Some(c) = &spec.chap {
        sec.push(("AuthMethod", "CHAP,None".into()));
        let (_, _, keys) = round(
            s,
            spec,
            ex,
            false,
            pdu::STAGE_SECURITY,
            pdu::STAGE_OPERATIONAL,
            &sec,
        )
        .await?;
        if text::get(&keys, "AuthMethod") == Some("CHAP") {
            let (_, _, keys) = round(
                s,
                spec,
                ex,
                false,
                pdu::STAGE_SECURITY,
                pdu::STAGE_OPERATIONAL,
                &[("CHAP_A", "5".into())],
            )
            .await?;
            let id = text::get(&keys, "CHAP_I").and_then(|v| v.parse::<u8>().ok());
            let challenge = text::get(&keys, "CHAP_C").and_then(text::decode_binary);
            let (Some(id), Some(challenge)) = (id, challenge) else {
                return Err(LoginReply::Err(IscsiError::Protocol(
                    "target sent no usable CHAP challenge".into(),
                )));
            };
            let resp = chap::response(id, &c.secret, &challenge);
            let (t, nsg, _) = round(
                s,
                spec,
                ex,
                true,
                pdu::STAGE_SECURITY,
                pdu::STAGE_OPERATIONAL,
                &[
                    ("CHAP_N", c.user.clone()),
                    ("CHAP_R", text::encode_binary(&resp)),
                ],
            )
            .await?;
            if !(t && nsg == pdu::STAGE_OPERATIONAL) {
                return Err(LoginReply::Err(IscsiError::Protocol(
                    "target did not leave the security stage after CHAP".into(),
                )));
            }
        } else {
            // The target chose None: finish the security stage.
            let (t, _, _) = round(
                s,
                spec,
                ex,
                true,
                pdu::STAGE_SECURITY,
                pdu::STAGE_OPERATIONAL,
                &[],
            )
            .await?;
            if !t {
                return Err(LoginReply::Err(IscsiError::Protocol(
                    "target held the security stage".into(),
                )));
            }
        }
    } else {
        sec.push(("AuthMethod", "None".into()));
        let (t, _, keys) = round(
            s,
            spec,
            ex,
            true,
            pdu::STAGE_SECURITY,
            pdu::STAGE_OPERATIONAL,
            &sec,
        )
        .await
        .map_err(|e| match e {
            LoginReply::Err(IscsiError::LoginRejected {
                class: 2,
                detail: 1 | 2,
            }) => LoginReply::Err(IscsiError::AuthRequired),
            other => other,
        })?;
        if !t {
            let wants = text::get(&keys, "AuthMethod").unwrap_or("?").to_owned();
            if wants != "None" {
                return Err(LoginReply::Err(IscsiError::AuthRequired));
            }
        }
    }
    // --- operational stage
    let digest_offer = if spec.digests { "CRC32C,None" } else { "None" };
    let mut op: Vec<(&str, String)> = vec![
        ("HeaderDigest", digest_offer.into()),
        ("DataDigest", digest_offer.into()),
        ("MaxRecvDataSegmentLength", OUR_MAX_RECV_DSL.to_string()),
        ("DefaultTime2Wait", "2".into()),
        ("DefaultTime2Retain", "0".into()),
        ("ErrorRecoveryLevel", "0".into()),
    ];
    if spec.target.is_some() {
        op.extend([
            ("MaxConnections", "1".into()),
            ("InitialR2T", "Yes".into()),
            ("ImmediateData", "Yes".into()),
            ("MaxBurstLength", OUR_MAX_BURST.to_string()),
            ("FirstBurstLength", "262144".into()),
            ("MaxOutstandingR2T", "1".into()),
            ("DataPDUInOrder", "Yes".into()),
            ("DataSequenceInOrder", "Yes".into()),
        ]);
    }
    let mut params = Params {
        max_xmit_dsl: 8192,
        max_burst: 262_144,
        first_burst: 65_536,
        tsih: 0,
        cmd_sn: ex.cmd_sn,
        exp_stat_sn: 0,
        max_cmd_sn: 0,
        header_digest: false,
        data_digest: false,
    };
    for _ in 0..8 {
        let (t, nsg, keys) = round(
            s,
            spec,
            ex,
            true,
            pdu::STAGE_OPERATIONAL,
            pdu::STAGE_FULL_FEATURE,
            &op,
        )
        .await?;
        if let Some(v) = num(&keys, "MaxRecvDataSegmentLength") {
            params.max_xmit_dsl = v;
        }
        if let Some(v) = num(&keys, "MaxBurstLength") {
            params.max_burst = v.min(OUR_MAX_BURST);
        }
        if let Some(v) = num(&keys, "FirstBurstLength") {
            params.first_burst = v;
        }
        for (k, v) in &keys {
            let on = match v.as_str() {
                "None" => false,
                "CRC32C" if spec.digests => true,
                _ if k == "HeaderDigest" || k == "DataDigest" => {
                    return Err(LoginReply::Err(IscsiError::Protocol(format!(
                        "target insists on {k}={v} (enable iscsi_digests for CRC32C)"
                    ))))
                }
                _ => continue,
            };
            match k.as_str() {
                "HeaderDigest" => params.header_digest = on,
                "DataDigest" => params.data_digest = on,
                _ => {}
            }
        }
        if t && nsg == pdu::STAGE_FULL_FEATURE {
            params.tsih = ex.tsih;
            params.exp_stat_sn = ex.exp_stat_sn;
            params.max_cmd_sn = ex.max_cmd_sn;
            return Ok(params);
        }
        // The target has more to say: answer with no new keys.
        op.clear();
    }
    Err(LoginReply::Err(IscsiError::Protocol(
        "operational negotiation did not converge".into(),
    )))
}
