//! The target's side of the PDU codec (RFC 7143 §11): initiator PDUs
//! decoded, target PDUs encoded, as pure functions over bytes. Shares the
//! BHS layout helpers and opcodes of [`super::pdu`].

use super::pdu::{
    be16, be32, decode_lun, encode_lun, finish, put32, PduError, Sn, BHS_LEN, FINAL, IMMEDIATE,
    OP_DATA_IN, OP_LOGIN_REQ, OP_LOGIN_RESP, OP_LOGOUT_REQ, OP_LOGOUT_RESP, OP_NOP_IN, OP_NOP_OUT,
    OP_R2T, OP_REJECT, OP_SCSI_CMD, OP_SCSI_RESP, OP_TEXT_REQ, OP_TEXT_RESP, RESERVED_TAG,
};

/// Initiator opcodes the initiator side never sends.
pub const OP_TASK_MGMT_REQ: u8 = 0x02;
pub const OP_DATA_OUT: u8 = 0x05;
pub const OP_SNACK: u8 = 0x10;
pub const OP_TASK_MGMT_RESP: u8 = 0x22;

/// Reject reasons (§11.17.1).
pub const REJECT_DIGEST: u8 = 0x02;
pub const REJECT_SNACK: u8 = 0x03;
pub const REJECT_PROTOCOL: u8 = 0x04;
pub const REJECT_UNSUPPORTED: u8 = 0x05;
pub const REJECT_INVALID_FIELD: u8 = 0x09;

/// A decoded initiator PDU header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitiatorPdu {
    NopOut {
        itt: u32,
        ttt: u32,
        lun: [u8; 8],
        cmd_sn: u32,
        exp_stat_sn: u32,
    },
    ScsiCmd {
        immediate: bool,
        final_: bool,
        read: bool,
        write: bool,
        lun: u16,
        itt: u32,
        expected_len: u32,
        cmd_sn: u32,
        exp_stat_sn: u32,
        cdb: [u8; 16],
    },
    TaskMgmt {
        immediate: bool,
        function: u8,
        lun: u16,
        itt: u32,
        referenced: u32,
        cmd_sn: u32,
        exp_stat_sn: u32,
    },
    LoginReq {
        transit: bool,
        cont: bool,
        csg: u8,
        nsg: u8,
        isid: [u8; 6],
        tsih: u16,
        itt: u32,
        cid: u16,
        cmd_sn: u32,
        exp_stat_sn: u32,
    },
    TextReq {
        immediate: bool,
        final_: bool,
        cont: bool,
        itt: u32,
        ttt: u32,
        cmd_sn: u32,
        exp_stat_sn: u32,
    },
    DataOut {
        final_: bool,
        lun: u16,
        itt: u32,
        ttt: u32,
        data_sn: u32,
        offset: u32,
    },
    LogoutReq {
        immediate: bool,
        reason: u8,
        itt: u32,
        cid: u16,
        cmd_sn: u32,
        exp_stat_sn: u32,
    },
    Snack {
        itt: u32,
    },
}

impl InitiatorPdu {
    /// The initiator task tag.
    #[must_use]
    pub fn itt(&self) -> u32 {
        match self {
            Self::NopOut { itt, .. }
            | Self::ScsiCmd { itt, .. }
            | Self::TaskMgmt { itt, .. }
            | Self::LoginReq { itt, .. }
            | Self::TextReq { itt, .. }
            | Self::DataOut { itt, .. }
            | Self::LogoutReq { itt, .. }
            | Self::Snack { itt } => *itt,
        }
    }
}

/// Parsed initiator BHS: the PDU, its AHS and data segment lengths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitiatorHeader {
    pub pdu: InitiatorPdu,
    pub ahs_len: usize,
    pub data_len: usize,
}

/// Decodes an initiator PDU's BHS.
///
/// # Errors
/// `Short` for fewer than 48 bytes, `Opcode` for an opcode an initiator
/// may not send.
pub fn decode_initiator(b: &[u8]) -> Result<InitiatorHeader, PduError> {
    if b.len() < BHS_LEN {
        return Err(PduError::Short { have: b.len() });
    }
    let immediate = b[0] & IMMEDIATE != 0;
    let op = b[0] & 0x3f;
    let f = b[1];
    let ahs_len = usize::from(b[4]) * 4;
    let data_len = (usize::from(b[5]) << 16) | (usize::from(b[6]) << 8) | usize::from(b[7]);
    let itt = be32(b, 16);
    let pdu = match op {
        OP_NOP_OUT => InitiatorPdu::NopOut {
            itt,
            ttt: be32(b, 20),
            lun: b[8..16].try_into().unwrap_or([0; 8]),
            cmd_sn: be32(b, 24),
            exp_stat_sn: be32(b, 28),
        },
        OP_SCSI_CMD => InitiatorPdu::ScsiCmd {
            immediate,
            final_: f & FINAL != 0,
            read: f & 0x40 != 0,
            write: f & 0x20 != 0,
            lun: decode_lun(&b[8..16]),
            itt,
            expected_len: be32(b, 20),
            cmd_sn: be32(b, 24),
            exp_stat_sn: be32(b, 28),
            cdb: b[32..48].try_into().unwrap_or([0; 16]),
        },
        OP_TASK_MGMT_REQ => InitiatorPdu::TaskMgmt {
            immediate,
            function: f & 0x7f,
            lun: decode_lun(&b[8..16]),
            itt,
            referenced: be32(b, 20),
            cmd_sn: be32(b, 24),
            exp_stat_sn: be32(b, 28),
        },
        OP_LOGIN_REQ => InitiatorPdu::LoginReq {
            transit: f & 0x80 != 0,
            cont: f & 0x40 != 0,
            csg: (f >> 2) & 3,
            nsg: f & 3,
            isid: b[8..14].try_into().unwrap_or([0; 6]),
            tsih: be16(b, 14),
            itt,
            cid: be16(b, 20),
            cmd_sn: be32(b, 24),
            exp_stat_sn: be32(b, 28),
        },
        OP_TEXT_REQ => InitiatorPdu::TextReq {
            immediate,
            final_: f & FINAL != 0,
            cont: f & 0x40 != 0,
            itt,
            ttt: be32(b, 20),
            cmd_sn: be32(b, 24),
            exp_stat_sn: be32(b, 28),
        },
        OP_DATA_OUT => InitiatorPdu::DataOut {
            final_: f & FINAL != 0,
            lun: decode_lun(&b[8..16]),
            itt,
            ttt: be32(b, 20),
            data_sn: be32(b, 36),
            offset: be32(b, 40),
        },
        OP_LOGOUT_REQ => InitiatorPdu::LogoutReq {
            immediate,
            reason: f & 0x7f,
            itt,
            cid: be16(b, 20),
            cmd_sn: be32(b, 24),
            exp_stat_sn: be32(b, 28),
        },
        OP_SNACK => InitiatorPdu::Snack { itt },
        other => return Err(PduError::Opcode(other)),
    };
    Ok(InitiatorHeader {
        pdu,
        ahs_len,
        data_len,
    })
}

fn put_sn(b: &mut [u8; BHS_LEN], sn: Sn) {
    put32(b, 24, sn.stat_sn);
    put32(b, 28, sn.exp_cmd_sn);
    put32(b, 32, sn.max_cmd_sn);
}

/// A Login Response (§11.13).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginResp {
    pub transit: bool,
    pub csg: u8,
    pub nsg: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub sn: Sn,
    pub status_class: u8,
    pub status_detail: u8,
}

pub fn encode_login_resp(r: &LoginResp, data: &[u8], out: &mut Vec<u8>) {
    let mut b = [0u8; BHS_LEN];
    b[0] = OP_LOGIN_RESP;
    b[1] = (if r.transit { 0x80 } else { 0 }) | (r.csg & 3) << 2 | (r.nsg & 3);
    // Version-max and version-active: 0.
    b[8..14].copy_from_slice(&r.isid);
    b[14..16].copy_from_slice(&r.tsih.to_be_bytes());
    put32(&mut b, 16, r.itt);
    put_sn(&mut b, r.sn);
    b[36] = r.status_class;
    b[37] = r.status_detail;
    finish(b, data, out);
}

/// A Text Response (§11.11), final unless `more`.
pub fn encode_text_resp(itt: u32, ttt: u32, more: bool, sn: Sn, data: &[u8], out: &mut Vec<u8>) {
    let mut b = [0u8; BHS_LEN];
    b[0] = OP_TEXT_RESP;
    b[1] = if more { 0x40 } else { FINAL };
    b[8..16].copy_from_slice(&[0; 8]);
    put32(&mut b, 16, itt);
    put32(&mut b, 20, ttt);
    put_sn(&mut b, sn);
    finish(b, data, out);
}

/// The header of one SCSI Data-In PDU (§11.7); `data_len` bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataIn {
    pub final_: bool,
    /// GOOD status carried in this (final) PDU.
    pub status: bool,
    /// Bytes short of the expected transfer length (U bit) or past it (O).
    pub underflow: u32,
    pub overflow: u32,
    pub lun: u16,
    pub itt: u32,
    pub sn: Sn,
    pub data_sn: u32,
    pub offset: u32,
    pub data_len: u32,
}

/// Encodes a Data-In BHS only: the caller sends `data_len` bytes and the
/// padding after it (so the data can come from its own buffer).
#[must_use]
pub fn encode_data_in_header(d: &DataIn) -> [u8; BHS_LEN] {
    let mut b = [0u8; BHS_LEN];
    b[0] = OP_DATA_IN;
    let mut f = if d.final_ { FINAL } else { 0 };
    if d.status {
        f |= 0x01;
        if d.underflow > 0 {
            f |= 0x02;
        } else if d.overflow > 0 {
            f |= 0x04;
        }
    }
    b[1] = f;
    b[5..8].copy_from_slice(&(d.data_len & 0x00ff_ffff).to_be_bytes()[1..]);
    b[8..16].copy_from_slice(&encode_lun(d.lun));
    put32(&mut b, 16, d.itt);
    put32(&mut b, 20, RESERVED_TAG);
    // StatSN is only valid with the status.
    put_sn(
        &mut b,
        Sn {
            stat_sn: if d.status { d.sn.stat_sn } else { 0 },
            ..d.sn
        },
    );
    put32(&mut b, 36, d.data_sn);
    put32(&mut b, 40, d.offset);
    if d.status {
        put32(&mut b, 44, d.underflow.max(d.overflow));
    }
    b
}

/// A SCSI Response (§11.4): `status` (0 GOOD, 2 CHECK CONDITION) and, for
/// CHECK CONDITION, the sense data.
#[allow(clippy::too_many_arguments)]
pub fn encode_scsi_resp(
    itt: u32,
    status: u8,
    sn: Sn,
    exp_data_sn: u32,
    underflow: u32,
    overflow: u32,
    sense: &[u8],
    out: &mut Vec<u8>,
) {
    let mut b = [0u8; BHS_LEN];
    b[0] = OP_SCSI_RESP;
    b[1] = 0x80
        | if underflow > 0 {
            0x02
        } else if overflow > 0 {
            0x04
        } else {
            0
        };
    // Response 0: command completed at target.
    b[3] = status;
    put32(&mut b, 16, itt);
    put_sn(&mut b, sn);
    put32(&mut b, 36, exp_data_sn);
    put32(&mut b, 44, underflow.max(overflow));
    let mut data = Vec::new();
    if !sense.is_empty() {
        data.extend_from_slice(&u16::try_from(sense.len()).unwrap_or(0).to_be_bytes());
        data.extend_from_slice(sense);
    }
    finish(b, &data, out);
}

/// A NOP-In (§11.19): the answer to a ping (`itt` set, `ttt` reserved,
/// the ping's data echoed).
pub fn encode_nop_in(itt: u32, ttt: u32, lun: [u8; 8], sn: Sn, data: &[u8], out: &mut Vec<u8>) {
    let mut b = [0u8; BHS_LEN];
    b[0] = OP_NOP_IN;
    b[1] = FINAL;
    b[8..16].copy_from_slice(&lun);
    put32(&mut b, 16, itt);
    put32(&mut b, 20, ttt);
    put_sn(&mut b, sn);
    finish(b, data, out);
}

/// A Ready To Transfer (§11.8): asks for `len` bytes of data-out at
/// `offset`. It carries StatSN but does not advance it.
#[allow(clippy::too_many_arguments)]
pub fn encode_r2t(
    lun: u16,
    itt: u32,
    ttt: u32,
    sn: Sn,
    r2t_sn: u32,
    offset: u32,
    len: u32,
    out: &mut Vec<u8>,
) {
    let mut b = [0u8; BHS_LEN];
    b[0] = OP_R2T;
    b[1] = FINAL;
    b[8..16].copy_from_slice(&encode_lun(lun));
    put32(&mut b, 16, itt);
    put32(&mut b, 20, ttt);
    put_sn(&mut b, sn);
    put32(&mut b, 36, r2t_sn);
    put32(&mut b, 40, offset);
    put32(&mut b, 44, len);
    finish(b, &[], out);
}

/// A Logout Response (§11.15): `response` 0 closed successfully.
pub fn encode_logout_resp(itt: u32, response: u8, sn: Sn, out: &mut Vec<u8>) {
    let mut b = [0u8; BHS_LEN];
    b[0] = OP_LOGOUT_RESP;
    b[1] = FINAL;
    b[2] = response;
    put32(&mut b, 16, itt);
    put_sn(&mut b, sn);
    finish(b, &[], out);
}

/// A Task Management Function Response (§11.6): `response` 0 function
/// complete, 1 task does not exist, 5 function not supported.
pub fn encode_task_mgmt_resp(itt: u32, response: u8, sn: Sn, out: &mut Vec<u8>) {
    let mut b = [0u8; BHS_LEN];
    b[0] = OP_TASK_MGMT_RESP;
    b[1] = FINAL;
    b[2] = response;
    put32(&mut b, 16, itt);
    put_sn(&mut b, sn);
    finish(b, &[], out);
}

/// A Reject (§11.17) carrying the rejected PDU's header.
pub fn encode_reject(reason: u8, sn: Sn, rejected: &[u8], out: &mut Vec<u8>) {
    let mut b = [0u8; BHS_LEN];
    b[0] = OP_REJECT;
    b[1] = FINAL;
    b[2] = reason;
    put32(&mut b, 16, RESERVED_TAG);
    put_sn(&mut b, sn);
    let hdr = &rejected[..rejected.len().min(BHS_LEN)];
    finish(b, hdr, out);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::pdu::{self, decode, TargetPdu};
    use super::*;

    const SN: Sn = Sn {
        stat_sn: 5,
        exp_cmd_sn: 9,
        max_cmd_sn: 72,
    };

    #[test]
    fn initiator_pdus_the_initiator_encodes_decode_back() {
        let mut out = Vec::new();
        let req = pdu::LoginReq {
            transit: true,
            csg: pdu::STAGE_OPERATIONAL,
            nsg: pdu::STAGE_FULL_FEATURE,
            isid: [0x80, 1, 2, 3, 4, 5],
            tsih: 0,
            itt: 3,
            cid: 1,
            cmd_sn: 7,
            exp_stat_sn: 2,
        };
        pdu::encode_login(&req, b"A=B\0", &mut out);
        let h = decode_initiator(&out).unwrap();
        assert_eq!(h.data_len, 4);
        assert_eq!(
            h.pdu,
            InitiatorPdu::LoginReq {
                transit: true,
                cont: false,
                csg: 1,
                nsg: 3,
                isid: req.isid,
                tsih: 0,
                itt: 3,
                cid: 1,
                cmd_sn: 7,
                exp_stat_sn: 2,
            }
        );
        out.clear();
        let mut cdb = [0u8; 16];
        cdb[0] = 0x28;
        pdu::encode_scsi_cmd(
            &pdu::ScsiCmd {
                lun: 300,
                itt: 11,
                read: true,
                expected_len: 4096,
                cmd_sn: 8,
                exp_stat_sn: 3,
                cdb,
            },
            &mut out,
        );
        let h = decode_initiator(&out).unwrap();
        assert!(matches!(
            h.pdu,
            InitiatorPdu::ScsiCmd {
                read: true,
                write: false,
                final_: true,
                lun: 300,
                itt: 11,
                expected_len: 4096,
                cmd_sn: 8,
                ..
            }
        ));
        out.clear();
        pdu::encode_logout(4, 1, 9, 5, &mut out);
        assert!(matches!(
            decode_initiator(&out).unwrap().pdu,
            InitiatorPdu::LogoutReq {
                immediate: true,
                reason: 0,
                itt: 4,
                cid: 1,
                ..
            }
        ));
        assert_eq!(
            decode_initiator(&[0u8; 47]),
            Err(PduError::Short { have: 47 })
        );
        let mut bad = [0u8; 48];
        bad[0] = OP_LOGIN_RESP;
        assert_eq!(decode_initiator(&bad), Err(PduError::Opcode(OP_LOGIN_RESP)));
    }

    #[test]
    fn target_pdus_decode_with_the_initiators_decoder() {
        let mut out = Vec::new();
        encode_login_resp(
            &LoginResp {
                transit: true,
                csg: 1,
                nsg: 3,
                isid: [0; 6],
                tsih: 0x21,
                itt: 3,
                sn: SN,
                status_class: 0,
                status_detail: 0,
            },
            b"X=Y\0",
            &mut out,
        );
        let h = decode(&out).unwrap();
        assert_eq!(h.data_len, 4);
        assert!(matches!(
            h.pdu,
            TargetPdu::LoginResp {
                transit: true,
                csg: 1,
                nsg: 3,
                tsih: 0x21,
                itt: 3,
                sn: SN,
                ..
            }
        ));
        let d = encode_data_in_header(&DataIn {
            final_: true,
            status: true,
            underflow: 512,
            overflow: 0,
            lun: 0,
            itt: 7,
            sn: SN,
            data_sn: 2,
            offset: 8192,
            data_len: 4096,
        });
        assert_eq!(
            decode(&d).unwrap().pdu,
            TargetPdu::DataIn {
                final_: true,
                has_status: true,
                status: 0,
                underflow: true,
                overflow: false,
                itt: 7,
                sn: SN,
                data_sn: 2,
                offset: 8192,
                residual: 512,
            }
        );
        assert_eq!(decode(&d).unwrap().data_len, 4096);
        out.clear();
        encode_scsi_resp(9, 2, SN, 0, 0, 0, &[0x70; 18], &mut out);
        let h = decode(&out).unwrap();
        assert_eq!(h.data_len, 20, "sense length + sense");
        assert!(matches!(
            h.pdu,
            TargetPdu::ScsiResp {
                status: 2,
                itt: 9,
                ..
            }
        ));
        out.clear();
        encode_nop_in(5, RESERVED_TAG, [0; 8], SN, b"ping", &mut out);
        assert!(matches!(
            decode(&out).unwrap().pdu,
            TargetPdu::NopIn {
                itt: 5,
                ttt: RESERVED_TAG,
                ..
            }
        ));
        out.clear();
        encode_reject(REJECT_PROTOCOL, SN, &[1u8; 48], &mut out);
        let h = decode(&out).unwrap();
        assert_eq!(h.data_len, 48);
        assert_eq!(pdu::rejected_itt(&out[48..]), Some(0x0101_0101));
        out.clear();
        encode_r2t(0, 7, 9, SN, 0, 4096, 8192, &mut out);
        assert!(matches!(
            decode(&out).unwrap().pdu,
            TargetPdu::R2t { itt: 7, sn: SN }
        ));
        assert_eq!(&out[40..48], &[0, 0, 16, 0, 0, 0, 32, 0]);
        out.clear();
        encode_logout_resp(4, 0, SN, &mut out);
        assert!(matches!(
            decode(&out).unwrap().pdu,
            TargetPdu::LogoutResp {
                response: 0,
                itt: 4,
                ..
            }
        ));
    }
}
