//! The commands the read-only LUN supports, and REPORT SUPPORTED OPERATION
//! CODES (SPC-4 6.35), which lists them with their CDB usage data.
//!
//! Initiators ask before they use optional features (Linux's sd probes for
//! WRITE SAME and friends this way; libiscsi checks the DPO bits), so the
//! table must say exactly what `scsi::execute` does: a unit test runs every
//! opcode through both. Write commands are listed: the LUN implements them
//! and answers DATA PROTECT, as a write-protected disk does.

use super::scsi::{Action, INVALID_FIELD_IN_CDB};

/// One supported command.
pub struct Command {
    pub op: u8,
    /// Service action, for opcodes that have them.
    pub sa: Option<u16>,
    /// CDB USAGE DATA: byte 0 is the opcode, then a mask of the bits the
    /// device server evaluates in each byte; its length is the CDB's.
    pub usage: &'static [u8],
}

const fn cmd(op: u8, usage: &'static [u8]) -> Command {
    Command {
        op,
        sa: None,
        usage,
    }
}

const fn sa(op: u8, sa: u16, usage: &'static [u8]) -> Command {
    Command {
        op,
        sa: Some(sa),
        usage,
    }
}

/// MAINTENANCE IN, REPORT SUPPORTED OPERATION CODES.
pub const MAINTENANCE_IN: u8 = 0xa3;
pub const REPORT_SUPPORTED_OPCODES: u16 = 0x0c;

/// Byte 1 of READ/WRITE/VERIFY CDBs: RDPROTECT/WRPROTECT (evaluated:
/// anything but 0 is refused, there is no protection information), DPO and
/// FUA (accepted, as MODE SENSE's DPOFUA says); VERIFY and WRITE AND
/// VERIFY have BYTCHK where FUA would be.
const RW: u8 = 0xf8;
const VFY: u8 = 0xf6;
const F4: u8 = 0xff;

/// Every command `scsi::execute` carries out, in opcode order.
#[rustfmt::skip]
pub const COMMANDS: &[Command] = &[
    cmd(0x00, &[0x00, 0, 0, 0, 0, 0]),             // TEST UNIT READY
    cmd(0x03, &[0x03, 0x01, 0, 0, F4, 0]),         // REQUEST SENSE
    cmd(0x04, &[0x04, F4, 0, 0, 0, 0]),            // FORMAT UNIT (write protected)
    cmd(0x08, &[0x08, 0x1f, F4, F4, F4, 0]),       // READ(6)
    cmd(0x0a, &[0x0a, 0x1f, F4, F4, F4, 0]),       // WRITE(6) (write protected)
    cmd(0x12, &[0x12, 0x01, F4, F4, F4, 0]),       // INQUIRY
    cmd(0x1a, &[0x1a, 0x08, F4, F4, F4, 0]),       // MODE SENSE(6)
    cmd(0x1b, &[0x1b, 0x01, 0, 0x0f, 0xf7, 0]),    // START STOP UNIT
    cmd(0x1e, &[0x1e, 0, 0, 0, 0x03, 0]),          // PREVENT ALLOW MEDIUM REMOVAL
    cmd(0x25, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]), // READ CAPACITY(10)
    cmd(0x28, &[0x28, RW, F4, F4, F4, F4, 0, F4, F4, 0]), // READ(10)
    cmd(0x2a, &[0x2a, RW, F4, F4, F4, F4, 0, F4, F4, 0]), // WRITE(10)
    cmd(0x2e, &[0x2e, VFY, F4, F4, F4, F4, 0, F4, F4, 0]), // WRITE AND VERIFY(10)
    cmd(0x2f, &[0x2f, VFY, F4, F4, F4, F4, 0, F4, F4, 0]), // VERIFY(10)
    cmd(0x35, &[0x35, 0, F4, F4, F4, F4, 0, F4, F4, 0]), // SYNCHRONIZE CACHE(10)
    cmd(0x41, &[0x41, RW, F4, F4, F4, F4, 0, F4, F4, 0]), // WRITE SAME(10)
    cmd(0x42, &[0x42, 0x01, 0, 0, 0, 0, 0, F4, F4, 0]), // UNMAP
    cmd(0x5a, &[0x5a, 0x18, F4, F4, 0, 0, 0, F4, F4, 0]), // MODE SENSE(10)
    cmd(0x88, &[0x88, RW, F4, F4, F4, F4, F4, F4, F4, F4, F4, F4, F4, F4, 0, 0]), // READ(16)
    cmd(0x89, &[0x89, RW, F4, F4, F4, F4, F4, F4, F4, F4, 0, 0, 0, F4, 0, 0]), // COMPARE AND WRITE
    cmd(0x8a, &[0x8a, RW, F4, F4, F4, F4, F4, F4, F4, F4, F4, F4, F4, F4, 0, 0]), // WRITE(16)
    cmd(0x8e, &[0x8e, VFY, F4, F4, F4, F4, F4, F4, F4, F4, F4, F4, F4, F4, 0, 0]), // WRITE AND VERIFY(16)
    cmd(0x8f, &[0x8f, VFY, F4, F4, F4, F4, F4, F4, F4, F4, F4, F4, F4, F4, 0, 0]), // VERIFY(16)
    cmd(0x91, &[0x91, 0, F4, F4, F4, F4, F4, F4, F4, F4, F4, F4, F4, F4, 0, 0]), // SYNCHRONIZE CACHE(16)
    cmd(0x93, &[0x93, 0xf9, F4, F4, F4, F4, F4, F4, F4, F4, F4, F4, F4, F4, 0, 0]), // WRITE SAME(16)
    cmd(0x9c, &[0x9c, RW, F4, F4, F4, F4, F4, F4, F4, F4, 0, 0, F4, F4, 0, 0]), // WRITE ATOMIC(16)
    sa(0x9e, 0x10, &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, F4, F4, F4, F4, 0, 0]), // READ CAPACITY(16)
    cmd(0xa0, &[0xa0, 0, F4, 0, 0, 0, F4, F4, F4, F4, 0, 0]), // REPORT LUNS
    sa(MAINTENANCE_IN, REPORT_SUPPORTED_OPCODES, &[0xa3, 0x0c, 0x87, F4, F4, F4, F4, F4, F4, F4, 0, 0]),
    cmd(0xa8, &[0xa8, RW, F4, F4, F4, F4, F4, F4, F4, F4, 0, 0]), // READ(12)
    cmd(0xaa, &[0xaa, RW, F4, F4, F4, F4, F4, F4, F4, F4, 0, 0]), // WRITE(12)
    cmd(0xae, &[0xae, VFY, F4, F4, F4, F4, F4, F4, F4, F4, 0, 0]), // WRITE AND VERIFY(12)
];

/// Whether `op` is one of the opcodes with service actions.
fn has_service_actions(op: u8) -> bool {
    COMMANDS.iter().any(|c| c.op == op && c.sa.is_some())
}

/// Command timeouts descriptor (SPC-4 7.7.3): length 0x0A, no nominal
/// time, and the 30 s after which a command is worth retrying.
const TIMEOUTS: [u8; 12] = [0, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 30];

/// REPORT SUPPORTED OPERATION CODES from a zero-padded CDB.
#[must_use]
pub fn report(c: &[u8; 16]) -> Action {
    let rctd = c[2] & 0x80 != 0;
    let (op, want_sa) = (c[3], u16::from_be_bytes([c[4], c[5]]));
    let alloc = u32::from_be_bytes([c[6], c[7], c[8], c[9]]);
    // REPORTING OPTIONS: byte 2, bits 2-0.
    let bad_options = Action::Check(INVALID_FIELD_IN_CDB.at(2, Some(2)));
    let mut data = match c[2] & 0x07 {
        0 => all(rctd),
        // One command by opcode: refused for an opcode with service actions.
        1 if has_service_actions(op) => return bad_options,
        1 => one(op, None, rctd),
        // By opcode and service action: refused for one without.
        2 if !has_service_actions(op) => return bad_options,
        2 => one(op, Some(want_sa), rctd),
        // Either: the service action counts only where there are some.
        3 => one(op, has_service_actions(op).then_some(want_sa), rctd),
        _ => return bad_options,
    };
    data.truncate(usize::try_from(alloc).unwrap_or(usize::MAX));
    Action::Data(data)
}

fn all(rctd: bool) -> Vec<u8> {
    let mut body = Vec::new();
    for c in COMMANDS {
        let [sa_hi, sa_lo] = c.sa.unwrap_or(0).to_be_bytes();
        let flags = u8::from(c.sa.is_some()) | (u8::from(rctd) << 1);
        let [len_hi, len_lo] = u16::try_from(c.usage.len()).unwrap_or(0).to_be_bytes();
        body.extend([c.op, 0, sa_hi, sa_lo, 0, flags, len_hi, len_lo]);
        if rctd {
            body.extend(TIMEOUTS);
        }
    }
    let mut b = u32::try_from(body.len())
        .unwrap_or(0)
        .to_be_bytes()
        .to_vec();
    b.extend(body);
    b
}

fn one(op: u8, sa: Option<u16>, rctd: bool) -> Vec<u8> {
    let Some(c) = COMMANDS.iter().find(|c| c.op == op && c.sa == sa) else {
        // SUPPORT 001b: not supported, no usage data.
        return vec![0, 0x01, 0, 0];
    };
    // CTDP, and SUPPORT 011b: supported as the standard says.
    let mut b = vec![0, u8::from(rctd) << 7 | 0x03];
    b.extend(u16::try_from(c.usage.len()).unwrap_or(0).to_be_bytes());
    b.extend(c.usage);
    if rctd {
        b.extend(TIMEOUTS);
    }
    b
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::scsi::{execute, Lun, INVALID_OPCODE};
    use super::*;
    use crate::iscsi::scsi as ini;

    fn lun() -> Lun {
        Lun {
            size: 1 << 20,
            block_size: 512,
            serial: "s".into(),
            naa: [0; 16],
            max_transfer_blocks: 2048,
        }
    }

    fn rsoc(flags: u8, op: u8, sa: u16) -> [u8; 12] {
        let [s0, s1] = sa.to_be_bytes();
        [0xa3, 0x0c, flags, op, s0, s1, 0, 0, 0xff, 0xff, 0, 0]
    }

    fn data(cdb: &[u8]) -> Vec<u8> {
        match execute(Some(&lun()), &[0], cdb) {
            Action::Data(d) => d,
            other => panic!("{cdb:02x?}: {other:?}"),
        }
    }

    #[test]
    fn table_is_sorted_and_usage_starts_with_the_opcode() {
        for w in COMMANDS.windows(2) {
            assert!(w[0].op < w[1].op, "{:02x} before {:02x}", w[0].op, w[1].op);
        }
        for c in COMMANDS {
            assert_eq!(c.usage[0], c.op);
            assert!(matches!(c.usage.len(), 6 | 10 | 12 | 16), "{:02x}", c.op);
            if let Some(sa) = c.sa {
                assert_eq!(u16::from(c.usage[1] & 0x1f), sa, "{:02x}", c.op);
            }
        }
    }

    /// The table and `execute` agree on every opcode: listed ones are
    /// carried out (or refused as write protected), the rest are invalid.
    #[test]
    fn table_matches_execute() {
        for op in 0..=u8::MAX {
            let mut cdb = [0u8; 16];
            cdb[0] = op;
            if let Some(c) = COMMANDS.iter().find(|c| c.op == op) {
                cdb[1] = u8::try_from(c.sa.unwrap_or(0)).unwrap();
            }
            let invalid = execute(Some(&lun()), &[0], &cdb) == Action::Check(INVALID_OPCODE);
            let listed = COMMANDS.iter().any(|c| c.op == op);
            assert_eq!(listed, !invalid, "opcode {op:#04x}");
        }
    }

    #[test]
    fn all_commands() {
        let d = data(&rsoc(0, 0, 0));
        let len = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
        assert_eq!(len, d.len() - 4);
        assert_eq!(len, COMMANDS.len() * 8);
        let read10 = d[4..].chunks(8).find(|x| x[0] == 0x28).unwrap();
        assert_eq!(read10, [0x28, 0, 0, 0, 0, 0, 0, 10]);
        let rc16 = d[4..].chunks(8).find(|x| x[0] == 0x9e).unwrap();
        assert_eq!(rc16, [0x9e, 0, 0, 0x10, 0, 0x01, 0, 16]);
        // RCTD: each descriptor carries a 12-byte timeouts descriptor.
        let d = data(&rsoc(0x80, 0, 0));
        assert_eq!(d.len(), 4 + COMMANDS.len() * 20);
        assert_eq!(d[4 + 5] & 0x02, 0x02);
        assert_eq!(&d[4 + 8..4 + 10], &[0, 0x0a]);
        // The allocation length truncates.
        let mut cdb = rsoc(0, 0, 0);
        cdb[8..10].copy_from_slice(&[0, 6]);
        assert_eq!(data(&cdb).len(), 6);
    }

    #[test]
    fn one_command() {
        // WRITE AND VERIFY(10): supported, DPO evaluated (MODE SENSE says
        // DPOFUA).
        let d = data(&rsoc(1, 0x2e, 0));
        assert_eq!(&d[..4], &[0, 0x03, 0, 10]);
        assert_eq!(d[4], 0x2e);
        assert_eq!(d[5] & 0x10, 0x10);
        // Not supported: SUPPORT 001b.
        assert_eq!(data(&rsoc(1, 0x15, 0)), [0, 0x01, 0, 0]);
        // Opcode with service actions needs option 2 (or 3).
        let refused = Action::Check(INVALID_FIELD_IN_CDB.at(2, Some(2)));
        assert_eq!(execute(Some(&lun()), &[0], &rsoc(1, 0x9e, 0x10)), refused);
        assert_eq!(execute(Some(&lun()), &[0], &rsoc(2, 0x28, 0)), refused);
        assert_eq!(execute(Some(&lun()), &[0], &rsoc(5, 0x28, 0)), refused);
        let d = data(&rsoc(2, 0x9e, 0x10));
        assert_eq!(&d[..6], &[0, 0x03, 0, 16, 0x9e, 0x10]);
        assert_eq!(data(&rsoc(2, 0x9e, 0x12)), [0, 0x01, 0, 0]);
        assert_eq!(data(&rsoc(3, 0x28, 0x55))[1], 0x03);
        // RCTD: CTDP and the timeouts descriptor after the usage data.
        let d = data(&rsoc(0x81, 0x28, 0));
        assert_eq!(d[1], 0x83);
        assert_eq!(d.len(), 4 + 10 + 12);
    }

    #[test]
    fn other_maintenance_in_actions_are_invalid_fields() {
        let cdb = [0xa3, 0x0d, 0, 0, 0, 0, 0, 0, 0, 0xff, 0, 0];
        let want = INVALID_FIELD_IN_CDB.at(1, Some(4));
        assert_eq!(execute(Some(&lun()), &[0], &cdb), Action::Check(want));
        // Fixed format: SKSV | C/D | BPV | bit 4, field pointer 1; the rest
        // decodes as before.
        let s = want.fixed();
        assert_eq!(&s[15..18], &[0xcc, 0, 1]);
        assert_eq!(ini::parse_sense(&s).map(|s| s.asc), Some(0x24));
        assert_eq!(INVALID_FIELD_IN_CDB.fixed()[15..18], [0, 0, 0]);
    }
}
