//! The target's login phase (RFC 7143 §6, §13): security negotiation
//! (None, or CHAP-MD5 one-way and mutual) and operational negotiation, as
//! a pure state machine over the requests' stages and keys. The session
//! module moves PDUs; this decides what to answer.

use crate::iscsi::pdu::{STAGE_FULL_FEATURE, STAGE_OPERATIONAL, STAGE_SECURITY};
use crate::iscsi::{chap, text};

/// Largest data segment we accept from an initiator (declared as our
/// MaxRecvDataSegmentLength).
pub const OUR_MAX_RECV_DSL: u32 = 256 * 1024;
/// Largest burst we allow (MaxBurstLength is the lesser of both offers).
pub const OUR_MAX_BURST: u32 = 16 * 1024 * 1024 - 512;
/// RFC 7143 default for MaxRecvDataSegmentLength when not declared.
const DEFAULT_DSL: u32 = 8192;

/// Login status (class, detail) of §11.13.5.
pub const AUTH_FAILED: (u8, u8) = (2, 1);
pub const NOT_FOUND: (u8, u8) = (2, 3);
pub const MISSING_PARAMETER: (u8, u8) = (2, 7);
pub const INITIATOR_ERROR: (u8, u8) = (2, 0);
pub const NO_SESSION_SLOT: (u8, u8) = (3, 2);

/// Who may log in, and as what.
#[derive(Clone)]
pub struct Auth {
    /// One-way CHAP: the user name and secret initiators must present.
    pub chap: Option<(String, Vec<u8>)>,
    /// Mutual CHAP: what we answer with when an initiator challenges us.
    pub mutual: Option<(String, Vec<u8>)>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("chap", &self.chap.as_ref().map(|(u, _)| u))
            .field("mutual", &self.mutual.as_ref().map(|(u, _)| u))
            .finish()
    }
}

/// What a finished login negotiated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub discovery: bool,
    pub initiator: String,
    /// Largest data segment we may send (the initiator's
    /// MaxRecvDataSegmentLength).
    pub max_send_dsl: u32,
    pub max_burst: u32,
    pub header_digest: bool,
    pub data_digest: bool,
}

/// The answer to one login request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub transit: bool,
    pub csg: u8,
    pub nsg: u8,
    /// Status class and detail: (0, 0) success.
    pub status: (u8, u8),
    pub keys: Vec<(String, String)>,
}

/// Where a login stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chap {
    /// No CHAP exchange begun.
    Idle,
    /// We sent CHAP_A; waiting for CHAP_N/CHAP_R to our challenge.
    Challenged { id: u8, challenge: [u8; 16] },
    /// The initiator proved itself.
    Done,
}

/// One connection's login negotiation.
pub struct Login {
    auth: Auth,
    target: String,
    /// TargetAddress for SendTargets ("host:port,1").
    pub address: String,
    chap: Chap,
    initiator: Option<String>,
    discovery: bool,
    max_send_dsl: u32,
    max_burst: u32,
    header_digest: bool,
    data_digest: bool,
    /// TargetPortalGroupTag declared once.
    tpgt_sent: bool,
    /// Randomness for CHAP challenges (given, so tests are deterministic).
    nonce: [u8; 17],
}

/// A failed answer with no keys.
fn fail(csg: u8, status: (u8, u8)) -> Answer {
    Answer {
        transit: false,
        csg,
        nsg: csg,
        status,
        keys: Vec::new(),
    }
}

impl Login {
    /// `nonce`: 17 random bytes (CHAP identifier and challenge).
    #[must_use]
    pub fn new(target: String, address: String, auth: Auth, nonce: [u8; 17]) -> Self {
        Self {
            auth,
            target,
            address,
            chap: Chap::Idle,
            initiator: None,
            discovery: false,
            max_send_dsl: DEFAULT_DSL,
            max_burst: 256 * 1024,
            header_digest: false,
            data_digest: false,
            tpgt_sent: false,
            nonce,
        }
    }

    /// What was negotiated, once the answer moved to full feature.
    #[must_use]
    pub fn negotiated(&self) -> Negotiated {
        Negotiated {
            discovery: self.discovery,
            initiator: self.initiator.clone().unwrap_or_default(),
            max_send_dsl: self.max_send_dsl,
            max_burst: self.max_burst,
            header_digest: self.header_digest,
            data_digest: self.data_digest,
        }
    }

    /// Answers a login request of stage `csg` (asking to move to `nsg` if
    /// `transit`) carrying `keys`.
    pub fn step(&mut self, transit: bool, csg: u8, nsg: u8, keys: &[(String, String)]) -> Answer {
        if let Some(name) = text::get(keys, "InitiatorName") {
            self.initiator = Some(name.to_owned());
        }
        if let Some(t) = text::get(keys, "SessionType") {
            self.discovery = t == "Discovery";
        }
        if self.initiator.is_none() {
            return fail(csg, MISSING_PARAMETER);
        }
        if !self.discovery {
            match text::get(keys, "TargetName") {
                Some(t) if t == self.target => {}
                Some(_) => return fail(csg, NOT_FOUND),
                None if self.tpgt_sent => {}
                None => return fail(csg, MISSING_PARAMETER),
            }
        }
        let mut out: Vec<(String, String)> = Vec::new();
        if !self.tpgt_sent && !self.discovery {
            out.push(("TargetPortalGroupTag".into(), "1".into()));
            self.tpgt_sent = true;
        }
        match csg {
            STAGE_SECURITY => {
                if let Err(status) = self.security(keys, &mut out) {
                    return fail(csg, status);
                }
                // Leaving security needs CHAP done when CHAP is required.
                let proven = self.auth.chap.is_none() || self.chap == Chap::Done;
                if transit && proven && (nsg == STAGE_OPERATIONAL || nsg == STAGE_FULL_FEATURE) {
                    if nsg == STAGE_FULL_FEATURE {
                        self.operational(keys, &mut out);
                    }
                    return Answer {
                        transit: true,
                        csg,
                        nsg,
                        status: (0, 0),
                        keys: out,
                    };
                }
                Answer {
                    transit: false,
                    csg,
                    nsg: csg,
                    status: (0, 0),
                    keys: out,
                }
            }
            STAGE_OPERATIONAL => {
                // An initiator may skip security only where none is needed.
                if self.auth.chap.is_some() && self.chap != Chap::Done {
                    return fail(csg, AUTH_FAILED);
                }
                self.operational(keys, &mut out);
                let go = transit && nsg == STAGE_FULL_FEATURE;
                Answer {
                    transit: go,
                    csg,
                    nsg: if go { nsg } else { csg },
                    status: (0, 0),
                    keys: out,
                }
            }
            _ => fail(csg, INITIATOR_ERROR),
        }
    }

    /// The security stage's keys: AuthMethod, then the CHAP exchange.
    fn security(
        &mut self,
        keys: &[(String, String)],
        out: &mut Vec<(String, String)>,
    ) -> Result<(), (u8, u8)> {
        if let Some(methods) = text::get(keys, "AuthMethod") {
            let offered: Vec<&str> = methods.split(',').collect();
            let want = if self.auth.chap.is_some() {
                "CHAP"
            } else {
                "None"
            };
            if !offered.contains(&want) {
                return Err(AUTH_FAILED);
            }
            out.push(("AuthMethod".into(), want.into()));
        }
        let Some((user, secret)) = self.auth.chap.clone() else {
            return Ok(());
        };
        if let Some(algs) = text::get(keys, "CHAP_A") {
            if !algs.split(',').any(|a| a == "5") {
                return Err(AUTH_FAILED);
            }
            let id = self.nonce[0];
            let mut challenge = [0u8; 16];
            challenge.copy_from_slice(&self.nonce[1..]);
            self.chap = Chap::Challenged { id, challenge };
            out.push(("CHAP_A".into(), "5".into()));
            out.push(("CHAP_I".into(), id.to_string()));
            out.push(("CHAP_C".into(), text::encode_binary(&challenge)));
            return Ok(());
        }
        if let (Some(name), Some(resp)) = (text::get(keys, "CHAP_N"), text::get(keys, "CHAP_R")) {
            let Chap::Challenged { id, challenge } = self.chap else {
                return Err(INITIATOR_ERROR);
            };
            let expected = chap::response(id, &secret, &challenge);
            if name != user || text::decode_binary(resp).as_deref() != Some(&expected[..]) {
                return Err(AUTH_FAILED);
            }
            self.chap = Chap::Done;
            // Mutual CHAP: the initiator challenges us in turn.
            if let (Some(i), Some(c)) = (text::get(keys, "CHAP_I"), text::get(keys, "CHAP_C")) {
                let (Some((muser, msecret)), Ok(id), Some(c)) = (
                    self.auth.mutual.clone(),
                    i.parse::<u8>(),
                    text::decode_binary(c),
                ) else {
                    return Err(AUTH_FAILED);
                };
                // A challenge equal to ours would let a reflection attack
                // through (RFC 7143 §12.1.3).
                if c == challenge {
                    return Err(AUTH_FAILED);
                }
                out.push(("CHAP_N".into(), muser));
                out.push((
                    "CHAP_R".into(),
                    text::encode_binary(&chap::response(id, &msecret, &c)),
                ));
            }
        }
        Ok(())
    }

    /// Operational keys (§13): each answered with the negotiated value.
    fn operational(&mut self, keys: &[(String, String)], out: &mut Vec<(String, String)>) {
        for (k, v) in keys {
            let answer = match k.as_str() {
                // Handled in the security stage, or declarations.
                "InitiatorName" | "InitiatorAlias" | "SessionType" | "TargetName"
                | "AuthMethod" | "CHAP_A" | "CHAP_N" | "CHAP_R" | "CHAP_I" | "CHAP_C" => continue,
                "HeaderDigest" | "DataDigest" => {
                    // The first of the initiator's list we support.
                    let pick = v
                        .split(',')
                        .find(|d| *d == "CRC32C" || *d == "None")
                        .unwrap_or("Reject");
                    let on = pick == "CRC32C";
                    if k == "HeaderDigest" {
                        self.header_digest = on;
                    } else {
                        self.data_digest = on;
                    }
                    pick.to_owned()
                }
                "MaxRecvDataSegmentLength" => {
                    // Declarative: how much we may put in one PDU to them.
                    self.max_send_dsl = v.parse().unwrap_or(DEFAULT_DSL).clamp(512, 16_777_215);
                    out.push((
                        "MaxRecvDataSegmentLength".into(),
                        OUR_MAX_RECV_DSL.to_string(),
                    ));
                    continue;
                }
                "MaxBurstLength" => {
                    let n = v.parse().unwrap_or(OUR_MAX_BURST).clamp(512, OUR_MAX_BURST);
                    self.max_burst = n;
                    n.to_string()
                }
                "FirstBurstLength" => v
                    .parse()
                    .unwrap_or(65536u32)
                    .clamp(512, OUR_MAX_BURST)
                    .to_string(),
                "MaxConnections" | "MaxOutstandingR2T" => "1".into(),
                // We take no unsolicited data: writes are refused anyway.
                "InitialR2T" => "Yes".into(),
                "ImmediateData" => "No".into(),
                "DataPDUInOrder" | "DataSequenceInOrder" => "Yes".into(),
                "ErrorRecoveryLevel" => "0".into(),
                "DefaultTime2Wait" => "2".into(),
                "DefaultTime2Retain" => "0".into(),
                "IFMarker" | "OFMarker" => "No".into(),
                "SendTargets" if self.discovery => continue,
                _ => "NotUnderstood".into(),
            };
            out.push((k.clone(), answer));
        }
        if self.discovery {
            return;
        }
        // Keep our data segments within what the burst allows.
        self.max_send_dsl = self.max_send_dsl.min(self.max_burst);
    }
}

/// The SendTargets answer (§12.3 of RFC 7143's text mode): our target and
/// where to reach it; `None` for a request naming another target.
#[must_use]
pub fn send_targets(value: &str, target: &str, address: &str) -> Option<Vec<(String, String)>> {
    if value != "All" && value != target && !value.is_empty() {
        return None;
    }
    Some(vec![
        ("TargetName".into(), target.into()),
        ("TargetAddress".into(), address.into()),
    ])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const IQN: &str = "iqn.2026-12.io.herd:test";

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn login(chap: bool) -> Login {
        let auth = Auth {
            chap: chap.then(|| ("alice".into(), b"s3cret-s3cret".to_vec())),
            mutual: chap.then(|| ("herd".into(), b"target-secret".to_vec())),
        };
        Login::new(IQN.into(), "127.0.0.1:3260,1".into(), auth, [7; 17])
    }

    fn get<'a>(a: &'a Answer, k: &str) -> Option<&'a str> {
        text::get(&a.keys, k)
    }

    #[test]
    fn none_login_straight_to_full_feature() {
        let mut l = login(false);
        let a = l.step(
            true,
            STAGE_SECURITY,
            STAGE_OPERATIONAL,
            &kv(&[
                ("InitiatorName", "iqn.x"),
                ("TargetName", IQN),
                ("SessionType", "Normal"),
                ("AuthMethod", "CHAP,None"),
            ]),
        );
        assert_eq!(a.status, (0, 0));
        assert!(a.transit);
        assert_eq!(get(&a, "AuthMethod"), Some("None"));
        assert_eq!(get(&a, "TargetPortalGroupTag"), Some("1"));
        let a = l.step(
            true,
            STAGE_OPERATIONAL,
            STAGE_FULL_FEATURE,
            &kv(&[
                ("HeaderDigest", "CRC32C,None"),
                ("DataDigest", "None"),
                ("MaxRecvDataSegmentLength", "65536"),
                ("MaxBurstLength", "262144"),
                ("ImmediateData", "Yes"),
                ("X-Unknown", "1"),
            ]),
        );
        assert!(a.transit && a.nsg == STAGE_FULL_FEATURE && a.status == (0, 0));
        assert_eq!(get(&a, "HeaderDigest"), Some("CRC32C"));
        assert_eq!(get(&a, "DataDigest"), Some("None"));
        assert_eq!(get(&a, "ImmediateData"), Some("No"));
        assert_eq!(get(&a, "X-Unknown"), Some("NotUnderstood"));
        assert_eq!(get(&a, "MaxRecvDataSegmentLength"), Some("262144"));
        let n = l.negotiated();
        assert_eq!(n.max_send_dsl, 65536);
        assert_eq!(n.max_burst, 262_144);
        assert!(n.header_digest && !n.data_digest && !n.discovery);
    }

    #[test]
    fn chap_one_way_and_mutual() {
        let mut l = login(true);
        let a = l.step(
            true,
            STAGE_SECURITY,
            STAGE_OPERATIONAL,
            &kv(&[
                ("InitiatorName", "iqn.x"),
                ("TargetName", IQN),
                ("AuthMethod", "CHAP,None"),
            ]),
        );
        assert_eq!(get(&a, "AuthMethod"), Some("CHAP"));
        assert!(!a.transit, "CHAP must happen first");
        let a = l.step(
            true,
            STAGE_SECURITY,
            STAGE_OPERATIONAL,
            &kv(&[("CHAP_A", "5")]),
        );
        let id: u8 = get(&a, "CHAP_I").unwrap().parse().unwrap();
        let c = text::decode_binary(get(&a, "CHAP_C").unwrap()).unwrap();
        let r = chap::response(id, b"s3cret-s3cret", &c);
        let mine = [9u8; 16];
        let a = l.step(
            true,
            STAGE_SECURITY,
            STAGE_OPERATIONAL,
            &kv(&[
                ("CHAP_N", "alice"),
                ("CHAP_R", &text::encode_binary(&r)),
                ("CHAP_I", "3"),
                ("CHAP_C", &text::encode_binary(&mine)),
            ]),
        );
        assert_eq!(a.status, (0, 0));
        assert!(a.transit);
        assert_eq!(get(&a, "CHAP_N"), Some("herd"));
        assert_eq!(
            text::decode_binary(get(&a, "CHAP_R").unwrap()).unwrap(),
            chap::response(3, b"target-secret", &mine).to_vec()
        );
    }

    #[test]
    fn bad_logins_fail_with_their_status() {
        // Wrong CHAP response.
        let mut l = login(true);
        l.step(
            false,
            STAGE_SECURITY,
            STAGE_SECURITY,
            &kv(&[
                ("InitiatorName", "iqn.x"),
                ("TargetName", IQN),
                ("AuthMethod", "CHAP"),
            ]),
        );
        l.step(
            false,
            STAGE_SECURITY,
            STAGE_SECURITY,
            &kv(&[("CHAP_A", "5")]),
        );
        let a = l.step(
            true,
            STAGE_SECURITY,
            STAGE_OPERATIONAL,
            &kv(&[("CHAP_N", "alice"), ("CHAP_R", "0x00112233")]),
        );
        assert_eq!(a.status, AUTH_FAILED);
        // Skipping CHAP by starting in the operational stage.
        let mut l = login(true);
        let a = l.step(
            true,
            STAGE_OPERATIONAL,
            STAGE_FULL_FEATURE,
            &kv(&[("InitiatorName", "iqn.x"), ("TargetName", IQN)]),
        );
        assert_eq!(a.status, AUTH_FAILED);
        // Only None offered where CHAP is required.
        let mut l = login(true);
        let a = l.step(
            true,
            STAGE_SECURITY,
            STAGE_OPERATIONAL,
            &kv(&[
                ("InitiatorName", "iqn.x"),
                ("TargetName", IQN),
                ("AuthMethod", "None"),
            ]),
        );
        assert_eq!(a.status, AUTH_FAILED);
        // Another target, and no initiator name.
        let mut l = login(false);
        let a = l.step(
            true,
            STAGE_SECURITY,
            STAGE_OPERATIONAL,
            &kv(&[("InitiatorName", "iqn.x"), ("TargetName", "iqn.other")]),
        );
        assert_eq!(a.status, NOT_FOUND);
        let a = login(false).step(true, STAGE_SECURITY, STAGE_OPERATIONAL, &[]);
        assert_eq!(a.status, MISSING_PARAMETER);
    }

    #[test]
    fn discovery_sessions_need_no_target_name() {
        let mut l = login(false);
        let a = l.step(
            true,
            STAGE_SECURITY,
            STAGE_FULL_FEATURE,
            &kv(&[
                ("InitiatorName", "iqn.x"),
                ("SessionType", "Discovery"),
                ("AuthMethod", "None"),
            ]),
        );
        assert_eq!(a.status, (0, 0));
        assert!(l.negotiated().discovery);
        assert_eq!(get(&a, "TargetPortalGroupTag"), None);
        let st = send_targets("All", IQN, "127.0.0.1:3260,1").unwrap();
        assert_eq!(text::get(&st, "TargetName"), Some(IQN));
        assert!(send_targets("iqn.else", IQN, "x").is_none());
    }
}
