//! iSCSI PDU codec (RFC 7143 §11): the 48-byte Basic Header Segment of every
//! PDU the initiator sends or receives, as pure functions over bytes.
//!
//! All multi-byte fields are big-endian. A PDU is the BHS, then
//! `TotalAHSLength * 4` bytes of additional header segments (skipped: herd
//! negotiates none), then `DataSegmentLength` bytes of data padded to a
//! multiple of 4. Digests are not negotiated (HeaderDigest=None).

use thiserror::Error;

pub const BHS_LEN: usize = 48;

/// Initiator opcodes.
pub const OP_NOP_OUT: u8 = 0x00;
pub const OP_SCSI_CMD: u8 = 0x01;
pub const OP_LOGIN_REQ: u8 = 0x03;
pub const OP_TEXT_REQ: u8 = 0x04;
pub const OP_LOGOUT_REQ: u8 = 0x06;
/// Target opcodes.
pub const OP_NOP_IN: u8 = 0x20;
pub const OP_SCSI_RESP: u8 = 0x21;
pub const OP_LOGIN_RESP: u8 = 0x23;
pub const OP_TEXT_RESP: u8 = 0x24;
pub const OP_DATA_IN: u8 = 0x25;
pub const OP_LOGOUT_RESP: u8 = 0x26;
pub const OP_R2T: u8 = 0x31;
pub const OP_ASYNC: u8 = 0x32;
pub const OP_REJECT: u8 = 0x3f;

/// The Immediate bit of byte 0.
pub const IMMEDIATE: u8 = 0x40;
/// Final bit of byte 1.
pub const FINAL: u8 = 0x80;
/// Reserved task tag ("no task").
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// Login stages (CSG / NSG).
pub const STAGE_SECURITY: u8 = 0;
pub const STAGE_OPERATIONAL: u8 = 1;
pub const STAGE_FULL_FEATURE: u8 = 3;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PduError {
    #[error("PDU header is {have} bytes, need {BHS_LEN}")]
    Short { have: usize },
    #[error("unknown target opcode {0:#04x}")]
    Opcode(u8),
    #[error("data segment of {len} bytes exceeds the negotiated {max}")]
    TooLong { len: usize, max: usize },
}

pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
pub(crate) fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// CRC32C digest as iSCSI sends it: the 32-bit value in little-endian byte
/// order (RFC 7143 §13.1; what Linux and libiscsi put on the wire).
#[must_use]
pub fn digest(bytes: &[u8]) -> [u8; 4] {
    crc32c::crc32c(bytes).to_le_bytes()
}

/// Inserts digests into an encoded PDU (BHS, data, padding): a header
/// digest after the BHS and, when there is data, a data digest at the end.
pub fn add_digests(pdu: &mut Vec<u8>, header: bool, data: bool) {
    let has_data = pdu.len() > BHS_LEN;
    if data && has_data {
        let d = digest(&pdu[BHS_LEN..]);
        pdu.extend_from_slice(&d);
    }
    if header {
        let h = digest(&pdu[..BHS_LEN]);
        pdu.splice(BHS_LEN..BHS_LEN, h);
    }
}

/// Bytes of data (plus padding) that follow a BHS with this length field.
#[must_use]
pub fn padded(len: usize) -> usize {
    len.next_multiple_of(4)
}

/// Encodes an 8-byte LUN field (SAM: peripheral or flat addressing).
#[must_use]
pub fn encode_lun(lun: u16) -> [u8; 8] {
    let mut b = [0u8; 8];
    if lun < 256 {
        b[1] = u8::try_from(lun).unwrap_or(0);
    } else {
        b[0] = 0x40 | u8::try_from((lun >> 8) & 0x3f).unwrap_or(0);
        b[1] = u8::try_from(lun & 0xff).unwrap_or(0);
    }
    b
}

/// Decodes an 8-byte LUN field from REPORT LUNS.
#[must_use]
pub fn decode_lun(b: &[u8]) -> u16 {
    (u16::from(b[0] & 0x3f) << 8) | u16::from(b[1])
}

// ----------------------------------------------------------------- requests

/// A Login Request (§11.12).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginReq {
    pub transit: bool,
    pub csg: u8,
    pub nsg: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// Writes a complete PDU (header, data, padding) to `out`.
pub(crate) fn finish(mut bhs: [u8; BHS_LEN], data: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(data.len()).unwrap_or(0) & 0x00ff_ffff;
    bhs[5..8].copy_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(&bhs);
    out.extend_from_slice(data);
    out.resize(out.len() + padded(data.len()) - data.len(), 0);
}

pub fn encode_login(r: &LoginReq, data: &[u8], out: &mut Vec<u8>) {
    let mut b = [0u8; BHS_LEN];
    b[0] = IMMEDIATE | OP_LOGIN_REQ;
    b[1] = (if r.transit { 0x80 } else { 0 }) | (r.csg & 3) << 2 | (r.nsg & 3);
    b[8..14].copy_from_slice(&r.isid);
    b[14..16].copy_from_slice(&r.tsih.to_be_bytes());
    put32(&mut b, 16, r.itt);
    b[20..22].copy_from_slice(&r.cid.to_be_bytes());
    put32(&mut b, 24, r.cmd_sn);
    put32(&mut b, 28, r.exp_stat_sn);
    finish(b, data, out);
}

/// A SCSI Command (§11.3), read or no-data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiCmd {
    pub lun: u16,
    pub itt: u32,
    pub read: bool,
    pub expected_len: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub cdb: [u8; 16],
}

pub fn encode_scsi_cmd(c: &ScsiCmd, out: &mut Vec<u8>) {
    let mut b = [0u8; BHS_LEN];
    b[0] = OP_SCSI_CMD;
    // Final, Read, task attribute SIMPLE (1).
    b[1] = FINAL | if c.read { 0x40 } else { 0 } | 1;
    b[8..16].copy_from_slice(&encode_lun(c.lun));
    put32(&mut b, 16, c.itt);
    put32(&mut b, 20, c.expected_len);
    put32(&mut b, 24, c.cmd_sn);
    put32(&mut b, 28, c.exp_stat_sn);
    b[32..48].copy_from_slice(&c.cdb);
    finish(b, &[], out);
}

/// A Text Request (§11.10), single PDU.
pub fn encode_text(
    itt: u32,
    cmd_sn: u32,
    exp_stat_sn: u32,
    ttt: u32,
    data: &[u8],
    out: &mut Vec<u8>,
) {
    let mut b = [0u8; BHS_LEN];
    b[0] = IMMEDIATE | OP_TEXT_REQ;
    b[1] = FINAL;
    put32(&mut b, 16, itt);
    put32(&mut b, 20, ttt);
    put32(&mut b, 24, cmd_sn);
    put32(&mut b, 28, exp_stat_sn);
    finish(b, data, out);
}

/// A NOP-Out (§11.18): a ping (`itt` set) or the answer to a NOP-In
/// (`itt` reserved, `ttt` copied from it).
pub fn encode_nop_out(itt: u32, ttt: u32, cmd_sn: u32, exp_stat_sn: u32, out: &mut Vec<u8>) {
    let mut b = [0u8; BHS_LEN];
    b[0] = IMMEDIATE | OP_NOP_OUT;
    b[1] = FINAL;
    put32(&mut b, 16, itt);
    put32(&mut b, 20, ttt);
    put32(&mut b, 24, cmd_sn);
    put32(&mut b, 28, exp_stat_sn);
    finish(b, &[], out);
}

/// A Logout Request closing the session (§11.14, reason 0).
pub fn encode_logout(itt: u32, cid: u16, cmd_sn: u32, exp_stat_sn: u32, out: &mut Vec<u8>) {
    let mut b = [0u8; BHS_LEN];
    b[0] = IMMEDIATE | OP_LOGOUT_REQ;
    b[1] = FINAL;
    put32(&mut b, 16, itt);
    b[20..22].copy_from_slice(&cid.to_be_bytes());
    put32(&mut b, 24, cmd_sn);
    put32(&mut b, 28, exp_stat_sn);
    finish(b, &[], out);
}

// ---------------------------------------------------------------- responses

/// Sequence numbers every target PDU of the full-feature phase carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sn {
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// A decoded target PDU header; `data_len` bytes (padded) follow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPdu {
    LoginResp {
        transit: bool,
        csg: u8,
        nsg: u8,
        tsih: u16,
        itt: u32,
        sn: Sn,
        status_class: u8,
        status_detail: u8,
    },
    TextResp {
        final_: bool,
        itt: u32,
        ttt: u32,
        sn: Sn,
    },
    DataIn {
        final_: bool,
        has_status: bool,
        status: u8,
        underflow: bool,
        overflow: bool,
        itt: u32,
        sn: Sn,
        data_sn: u32,
        offset: u32,
        residual: u32,
    },
    ScsiResp {
        response: u8,
        status: u8,
        underflow: bool,
        overflow: bool,
        itt: u32,
        sn: Sn,
        residual: u32,
    },
    NopIn {
        itt: u32,
        ttt: u32,
        sn: Sn,
    },
    LogoutResp {
        response: u8,
        itt: u32,
        sn: Sn,
    },
    Async {
        event: u8,
        sn: Sn,
        param3: u16,
    },
    Reject {
        reason: u8,
        sn: Sn,
    },
    R2t {
        itt: u32,
        sn: Sn,
    },
}

/// Parsed BHS: the PDU, its data segment length and AHS length in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub pdu: TargetPdu,
    pub ahs_len: usize,
    pub data_len: usize,
}

fn sn(b: &[u8]) -> Sn {
    Sn {
        stat_sn: be32(b, 24),
        exp_cmd_sn: be32(b, 28),
        max_cmd_sn: be32(b, 32),
    }
}

/// Decodes a target PDU's BHS.
///
/// # Errors
/// `Short` for fewer than 48 bytes, `Opcode` for an opcode a target may not
/// send.
pub fn decode(b: &[u8]) -> Result<Header, PduError> {
    if b.len() < BHS_LEN {
        return Err(PduError::Short { have: b.len() });
    }
    let op = b[0] & 0x3f;
    let f = b[1];
    let ahs_len = usize::from(b[4]) * 4;
    let data_len = (usize::from(b[5]) << 16) | (usize::from(b[6]) << 8) | usize::from(b[7]);
    let itt = be32(b, 16);
    let pdu = match op {
        OP_LOGIN_RESP => TargetPdu::LoginResp {
            transit: f & 0x80 != 0,
            csg: (f >> 2) & 3,
            nsg: f & 3,
            tsih: be16(b, 14),
            itt,
            sn: sn(b),
            status_class: b[36],
            status_detail: b[37],
        },
        OP_TEXT_RESP => TargetPdu::TextResp {
            final_: f & 0x80 != 0,
            itt,
            ttt: be32(b, 20),
            sn: sn(b),
        },
        OP_DATA_IN => TargetPdu::DataIn {
            final_: f & 0x80 != 0,
            has_status: f & 0x01 != 0,
            status: b[3],
            overflow: f & 0x04 != 0,
            underflow: f & 0x02 != 0,
            itt,
            sn: sn(b),
            data_sn: be32(b, 36),
            offset: be32(b, 40),
            residual: be32(b, 44),
        },
        OP_SCSI_RESP => TargetPdu::ScsiResp {
            response: b[2],
            status: b[3],
            overflow: f & 0x04 != 0,
            underflow: f & 0x02 != 0,
            itt,
            sn: sn(b),
            residual: be32(b, 44),
        },
        OP_NOP_IN => TargetPdu::NopIn {
            itt,
            ttt: be32(b, 20),
            sn: sn(b),
        },
        OP_LOGOUT_RESP => TargetPdu::LogoutResp {
            response: b[2],
            itt,
            sn: sn(b),
        },
        OP_ASYNC => TargetPdu::Async {
            event: b[36],
            sn: sn(b),
            param3: be16(b, 42),
        },
        OP_REJECT => TargetPdu::Reject {
            reason: b[2],
            sn: sn(b),
        },
        OP_R2T => TargetPdu::R2t { itt, sn: sn(b) },
        other => return Err(PduError::Opcode(other)),
    };
    Ok(Header {
        pdu,
        ahs_len,
        data_len,
    })
}

/// The ITT of the PDU a Reject carries in its data segment.
#[must_use]
pub fn rejected_itt(data: &[u8]) -> Option<u32> {
    (data.len() >= BHS_LEN).then(|| be32(data, 16))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_request_layout() {
        let r = LoginReq {
            transit: true,
            csg: STAGE_SECURITY,
            nsg: STAGE_OPERATIONAL,
            isid: [0x80, 0, 0, 0x48, 0x45, 0x52],
            tsih: 0,
            itt: 7,
            cid: 1,
            cmd_sn: 9,
            exp_stat_sn: 0,
        };
        let mut out = Vec::new();
        encode_login(&r, b"AuthMethod=None\0", &mut out);
        assert_eq!(out.len(), 48 + 16);
        assert_eq!(out[0], 0x43, "immediate login request");
        assert_eq!(out[1], 0x81, "T=1 CSG=0 NSG=1");
        assert_eq!(&out[5..8], &[0, 0, 16]);
        assert_eq!(&out[8..14], &r.isid);
        assert_eq!(&out[16..20], &7u32.to_be_bytes());
        assert_eq!(&out[20..22], &1u16.to_be_bytes());
        assert_eq!(&out[24..28], &9u32.to_be_bytes());
        assert_eq!(&out[48..], b"AuthMethod=None\0");
    }

    #[test]
    fn data_is_padded_to_four_bytes() {
        let mut out = Vec::new();
        encode_text(1, 2, 3, RESERVED_TAG, b"SendTargets=All\0\0", &mut out);
        assert_eq!(out.len(), 48 + 20);
        assert_eq!(&out[5..8], &[0, 0, 17], "length excludes padding");
        assert_eq!(padded(17), 20);
    }

    #[test]
    fn scsi_read_command_layout() {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x88;
        let c = ScsiCmd {
            lun: 1,
            itt: 0x1234,
            read: true,
            expected_len: 65536,
            cmd_sn: 5,
            exp_stat_sn: 6,
            cdb,
        };
        let mut out = Vec::new();
        encode_scsi_cmd(&c, &mut out);
        assert_eq!(out.len(), 48);
        assert_eq!(out[0], 0x01);
        assert_eq!(out[1], 0xc1, "F, R, SIMPLE");
        assert_eq!(&out[8..16], &[0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&out[20..24], &65536u32.to_be_bytes());
        assert_eq!(out[32], 0x88);
    }

    #[test]
    fn crc32c_digest_known_value() {
        // RFC 3720 appendix B.4: 32 bytes of zeroes -> CRC32C 0x8a9136aa.
        assert_eq!(digest(&[0u8; 32]), 0x8a91_36aau32.to_le_bytes());
        let mut p = vec![0u8; 48];
        p.extend_from_slice(&[1, 2, 3, 4]);
        add_digests(&mut p, true, true);
        assert_eq!(p.len(), 48 + 4 + 4 + 4);
        assert_eq!(&p[48..52], &digest(&[0u8; 48]));
        assert_eq!(&p[56..60], &digest(&[1, 2, 3, 4]));
    }

    #[test]
    fn lun_addressing() {
        assert_eq!(encode_lun(5), [0, 5, 0, 0, 0, 0, 0, 0]);
        assert_eq!(encode_lun(300), [0x41, 44, 0, 0, 0, 0, 0, 0]);
        assert_eq!(decode_lun(&encode_lun(300)), 300);
        assert_eq!(decode_lun(&encode_lun(1)), 1);
    }

    fn target(op: u8, f: u8) -> [u8; 48] {
        let mut b = [0u8; 48];
        b[0] = op;
        b[1] = f;
        b
    }

    #[test]
    fn decodes_data_in_with_status() {
        let mut b = target(OP_DATA_IN, 0x81 | 0x02);
        b[3] = 0;
        b[5..8].copy_from_slice(&[0, 0x10, 0]);
        b[16..20].copy_from_slice(&9u32.to_be_bytes());
        b[24..28].copy_from_slice(&3u32.to_be_bytes());
        b[32..36].copy_from_slice(&40u32.to_be_bytes());
        b[40..44].copy_from_slice(&8192u32.to_be_bytes());
        b[44..48].copy_from_slice(&512u32.to_be_bytes());
        let h = decode(&b).expect("valid");
        assert_eq!(h.data_len, 4096);
        assert_eq!(
            h.pdu,
            TargetPdu::DataIn {
                final_: true,
                has_status: true,
                status: 0,
                underflow: true,
                overflow: false,
                itt: 9,
                sn: Sn {
                    stat_sn: 3,
                    exp_cmd_sn: 0,
                    max_cmd_sn: 40
                },
                data_sn: 0,
                offset: 8192,
                residual: 512,
            }
        );
    }

    #[test]
    fn decodes_login_response_status() {
        let mut b = target(OP_LOGIN_RESP, 0x87);
        b[14..16].copy_from_slice(&0x22u16.to_be_bytes());
        b[36] = 2;
        b[37] = 1;
        let h = decode(&b).expect("valid");
        assert!(matches!(
            h.pdu,
            TargetPdu::LoginResp {
                transit: true,
                csg: 1,
                nsg: 3,
                tsih: 0x22,
                status_class: 2,
                status_detail: 1,
                ..
            }
        ));
    }

    #[test]
    fn malformed_headers_are_errors() {
        assert_eq!(decode(&[0u8; 10]), Err(PduError::Short { have: 10 }));
        // An initiator opcode arriving from a target.
        assert_eq!(decode(&target(OP_SCSI_CMD, 0)), Err(PduError::Opcode(1)));
        let mut ahs = target(OP_NOP_IN, 0x80);
        ahs[4] = 2;
        assert_eq!(decode(&ahs).expect("valid").ahs_len, 8);
        assert_eq!(rejected_itt(&[0u8; 5]), None);
    }
}
