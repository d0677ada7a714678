//! SCSI command emulation for a read-only direct-access LUN (SBC-3 / SPC-4).
//!
//! [`execute`] maps one CDB to an [`Action`] for the target to carry out, so
//! the session code only moves bytes. CDBs arrive from the network: nothing
//! here may panic, so fields are read from a zero-padded copy of the CDB
//! once its length has been checked against the opcode's group.

use super::opcodes;

/// What the image looks like as a LUN.
#[derive(Debug, Clone)]
pub struct Lun {
    /// Image size in bytes. The LUN has floor(size / block_size) blocks: a
    /// trailing partial block is not addressable.
    pub size: u64,
    /// Logical block size in bytes (512).
    pub block_size: u32,
    /// Unit serial number (VPD 0x80), ASCII.
    pub serial: String,
    /// Body of the NAA designator in VPD 0x83, derived by the caller from the
    /// image identity; byte 0's high nibble is forced to 6 (IEEE Registered
    /// Extended) when encoding.
    pub naa: [u8; 16],
    /// Largest transfer in blocks the target prefers (VPD 0xB0 maximum and
    /// optimal transfer length).
    pub max_transfer_blocks: u32,
}

impl Lun {
    /// Addressable blocks; a zero block size (a caller bug) gives none
    /// rather than a division panic.
    fn blocks(&self) -> u64 {
        self.size.checked_div(self.block_size.into()).unwrap_or(0)
    }

    fn last_lba(&self) -> u64 {
        self.blocks().saturating_sub(1)
    }
}

/// Sense data for CHECK CONDITION.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    /// Sense-key specific field pointer (SPC-4 4.5.2.4.2) of an ILLEGAL
    /// REQUEST caused by the CDB: the byte, and the field's most
    /// significant bit if it does not start at bit 7. Initiators tell "not
    /// implemented" from "wrong value" by it (libiscsi does for MAINTENANCE
    /// IN).
    pub cdb_field: Option<(u16, Option<u8>)>,
}

impl Sense {
    /// Fixed-format sense data (response code 0x70, 18 bytes, additional
    /// length 10).
    #[must_use]
    pub fn fixed(&self) -> [u8; 18] {
        let mut b = [0u8; 18];
        b[0] = 0x70;
        b[2] = self.key & 0x0f;
        b[7] = 10;
        b[12] = self.asc;
        b[13] = self.ascq;
        if let Some((byte, bit)) = self.cdb_field {
            // SKSV, C/D (the error is in the CDB), BPV and the bit pointer.
            b[15] = 0x80 | 0x40 | bit.map_or(0, |bit| 0x08 | (bit & 0x07));
            b[16..18].copy_from_slice(&byte.to_be_bytes());
        }
        b
    }

    /// This sense, pointing at a field of the CDB.
    #[must_use]
    pub const fn at(self, byte: u16, bit: Option<u8>) -> Self {
        Self {
            cdb_field: Some((byte, bit)),
            ..self
        }
    }
}

pub(super) const fn sense(key: u8, asc: u8, ascq: u8) -> Sense {
    Sense {
        key,
        asc,
        ascq,
        cdb_field: None,
    }
}

/// DATA PROTECT, WRITE PROTECTED.
pub const WRITE_PROTECTED: Sense = sense(0x07, 0x27, 0x00);
/// ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE.
pub const INVALID_OPCODE: Sense = sense(0x05, 0x20, 0x00);
/// ILLEGAL REQUEST, INVALID FIELD IN CDB.
pub const INVALID_FIELD_IN_CDB: Sense = sense(0x05, 0x24, 0x00);
/// ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE.
pub const LBA_OUT_OF_RANGE: Sense = sense(0x05, 0x21, 0x00);
/// ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED.
pub const LUN_NOT_SUPPORTED: Sense = sense(0x05, 0x25, 0x00);
/// ILLEGAL REQUEST, SAVING PARAMETERS NOT SUPPORTED (MODE SENSE of saved
/// values: nothing is saveable).
pub const SAVING_NOT_SUPPORTED: Sense = sense(0x05, 0x39, 0x00);
/// NO SENSE: what REQUEST SENSE reports, as nothing is ever pending.
pub const NO_SENSE: Sense = sense(0, 0, 0);

/// What the target does for one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Read `len` bytes of the image at byte `offset` and send them
    /// (Data-In). `len` may be 0: transfer length 0 is GOOD with no data.
    Read { offset: u64, len: u64 },
    /// Send these bytes (already truncated to the CDB's ALLOCATION LENGTH).
    Data(Vec<u8>),
    /// GOOD status, no data.
    Good,
    /// CHECK CONDITION with this sense.
    Check(Sense),
    /// VERIFY with BYTCHK: take `data_len` bytes of data-out and compare
    /// them with `len` bytes of the image at `offset` (when `data_len` is
    /// shorter, one block is compared with every block of the range).
    Compare {
        offset: u64,
        len: u64,
        data_len: u64,
    },
}

/// MISCOMPARE, MISCOMPARE DURING VERIFY OPERATION.
pub const MISCOMPARE: Sense = sense(0x0e, 0x1d, 0x00);

const INQUIRY: u8 = 0x12;
const REPORT_LUNS: u8 = 0xa0;
const REQUEST_SENSE: u8 = 0x03;

const VENDOR: &[u8; 8] = b"HERD    ";
const PRODUCT: &[u8; 16] = b"herd image      ";
const REVISION: &[u8; 4] = b"0001";
/// Keeps "HERD    " + serial within the one-byte designator length of VPD
/// 0x83.
const MAX_SERIAL: usize = 255 - VENDOR.len();
/// Peripheral qualifier 3 / device type 0x1F: no LUN at this address.
const NO_DEVICE: u8 = 0x7f;
const VPD_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2];

use Action::{Check, Data, Good};

/// Executes `cdb` for `lun` (None: the addressed LUN does not exist; `luns`
/// lists the LUN numbers that exist, for REPORT LUNS).
#[must_use]
pub fn execute(lun: Option<&Lun>, luns: &[u16], cdb: &[u8]) -> Action {
    let Some(&op) = cdb.first() else {
        return Check(INVALID_OPCODE);
    };
    // SPC-4: a LUN that is not there answers only these three.
    if lun.is_none() && !matches!(op, INQUIRY | REPORT_LUNS | REQUEST_SENSE) {
        return Check(LUN_NOT_SUPPORTED);
    }
    let Some(need) = cdb_len(op) else {
        return Check(INVALID_OPCODE);
    };
    if cdb.len() < need {
        return Check(INVALID_FIELD_IN_CDB);
    }
    // iSCSI pads short CDBs to 16 bytes; bytes past `need` are ignored.
    let mut c = [0u8; 16];
    c.iter_mut().zip(cdb).for_each(|(d, s)| *d = *s);
    let Some(lun) = lun else {
        return match op {
            INQUIRY => inquiry(None, &c),
            REPORT_LUNS => report_luns(luns, &c),
            _ => request_sense(LUN_NOT_SUPPORTED, &c),
        };
    };
    match op {
        // TEST UNIT READY, START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL:
        // the medium is always there and cannot be ejected.
        0x00 | 0x1b | 0x1e => Good,
        REQUEST_SENSE => request_sense(NO_SENSE, &c),
        INQUIRY => inquiry(Some(lun), &c),
        0x25 => read_capacity10(lun),
        0x9e => service_action_in(lun, &c),
        0x08 | 0x28 | 0xa8 | 0x88 => read(lun, &c),
        REPORT_LUNS => report_luns(luns, &c),
        0x1a | 0x5a => mode_sense(lun, &c),
        0x2f | 0x8f => verify(lun, &c),
        // MAINTENANCE IN: REPORT SUPPORTED OPERATION CODES only.
        opcodes::MAINTENANCE_IN if u16::from(c[1] & 0x1f) == opcodes::REPORT_SUPPORTED_OPCODES => {
            opcodes::report(&c)
        }
        // The SERVICE ACTION field (byte 1, bits 4-0) names no command.
        opcodes::MAINTENANCE_IN => Check(INVALID_FIELD_IN_CDB.at(1, Some(4))),
        // SYNCHRONIZE CACHE(10/16): nothing is ever dirty; GOOD once the
        // range is on the LUN.
        0x35 | 0x91 => extent(lun, lba_blocks(&c)).map_or_else(Check, |_| Good),
        // WRITE(6/10/12/16), WRITE AND VERIFY(10/12/16), WRITE SAME(10/16),
        // UNMAP, COMPARE AND WRITE, FORMAT UNIT, WRITE ATOMIC(16).
        0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e | 0x41 | 0x93 | 0x42 | 0x89 | 0x04
        | 0x9c => Check(WRITE_PROTECTED),
        // MODE SELECT(6/10): no mode parameter is changeable, so the command
        // is not implemented at all.
        0x15 | 0x55 => Check(INVALID_OPCODE),
        _ => Check(INVALID_OPCODE),
    }
}

/// CDB length by the opcode's group code; groups 3, 6 and 7 are reserved
/// or vendor specific, and none of their commands is implemented.
fn cdb_len(op: u8) -> Option<usize> {
    match op >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// Big-endian field of `n` bytes at `at`; bytes past the end read as 0.
fn be(c: &[u8], at: usize, n: usize) -> u64 {
    c.iter()
        .skip(at)
        .take(n)
        .fold(0, |v, &b| (v << 8) | u64::from(b))
}

/// Truncates `data` to the ALLOCATION LENGTH.
fn data_in(mut data: Vec<u8>, alloc: u64) -> Action {
    data.truncate(usize::try_from(alloc).unwrap_or(usize::MAX));
    Data(data)
}

/// LBA and block count of a READ, VERIFY or SYNCHRONIZE CACHE CDB: the
/// three share their layout for each CDB size.
fn lba_blocks(c: &[u8; 16]) -> (u64, u64) {
    match cdb_len(c[0]) {
        // READ(6): 21-bit LBA, and a transfer length of 0 means 256 blocks.
        Some(6) => (be(c, 1, 3) & 0x1f_ffff, u64::from(c[4].wrapping_sub(1)) + 1),
        Some(10) => (be(c, 2, 4), be(c, 7, 2)),
        Some(12) => (be(c, 2, 4), be(c, 6, 4)),
        _ => (be(c, 2, 8), be(c, 10, 4)),
    }
}

/// Byte offset and length of `blocks` blocks from `lba`, if all are on the
/// LUN.
fn extent(lun: &Lun, (lba, blocks): (u64, u64)) -> Result<(u64, u64), Sense> {
    let bs = u64::from(lun.block_size);
    match lba.checked_add(blocks) {
        // end <= size / bs, so neither product can overflow.
        Some(end) if end <= lun.blocks() => Ok((lba * bs, blocks * bs)),
        _ => Err(LBA_OUT_OF_RANGE),
    }
}

fn read(lun: &Lun, c: &[u8; 16]) -> Action {
    // RDPROTECT (not in READ(6)): the LUN has no protection information.
    if c[0] != 0x08 && c[1] >> 5 != 0 {
        return Check(INVALID_FIELD_IN_CDB);
    }
    extent(lun, lba_blocks(c)).map_or_else(Check, |(offset, len)| Action::Read { offset, len })
}

/// VERIFY(10/16): the range is checked first (SBC-4 5.33), then BYTCHK:
/// 0 a medium check (always good), 1 compare data-out with the range, 3
/// compare one block of data-out with each block.
fn verify(lun: &Lun, c: &[u8; 16]) -> Action {
    // VRPROTECT: the LUN has no protection information.
    if c[1] >> 5 != 0 {
        return Check(INVALID_FIELD_IN_CDB);
    }
    let (offset, len) = match extent(lun, lba_blocks(c)) {
        Ok(r) => r,
        Err(s) => return Check(s),
    };
    match ((c[1] >> 1) & 3, len) {
        (0, _) | (1 | 3, 0) => Good,
        (1, _) => Action::Compare {
            offset,
            len,
            data_len: len,
        },
        (3, _) => Action::Compare {
            offset,
            len,
            data_len: u64::from(lun.block_size),
        },
        _ => Check(INVALID_FIELD_IN_CDB),
    }
}

fn request_sense(sense: Sense, c: &[u8; 16]) -> Action {
    // DESC asks for descriptor format, which is as easy to give.
    let data = if c[1] & 0x01 != 0 {
        vec![0x72, sense.key, sense.asc, sense.ascq, 0, 0, 0, 0]
    } else {
        sense.fixed().to_vec()
    };
    data_in(data, u64::from(c[4]))
}

fn inquiry(lun: Option<&Lun>, c: &[u8; 16]) -> Action {
    let page = c[2];
    let data = match (c[1] & 0x03, page) {
        (0, 0) => standard_inquiry(lun.is_some()),
        (1, _) => match vpd(lun, page) {
            Some(d) => d,
            None => return Check(INVALID_FIELD_IN_CDB),
        },
        // A page code without EVPD, or the obsolete CMDDT bit.
        _ => return Check(INVALID_FIELD_IN_CDB),
    };
    data_in(data, be(c, 3, 2))
}

/// Standard INQUIRY data (SPC-4), with version descriptors.
fn standard_inquiry(present: bool) -> Vec<u8> {
    let mut b = [0u8; 96];
    b[0] = if present { 0x00 } else { NO_DEVICE };
    b[2] = 0x06; // SPC-4
    b[3] = 0x12; // HiSup, response data format 2
    b[4] = 96 - 5;
    b[7] = 0x02; // CmdQue
    b[8..16].copy_from_slice(VENDOR);
    b[16..32].copy_from_slice(PRODUCT);
    b[32..36].copy_from_slice(REVISION);
    // SAM-5, iSCSI, SPC-4, SBC-3, none claiming a revision.
    let versions: [u16; 4] = [0x00a0, 0x0960, 0x0460, 0x04c0];
    for (d, v) in b[58..66].chunks_exact_mut(2).zip(versions) {
        d.copy_from_slice(&v.to_be_bytes());
    }
    b.to_vec()
}

/// The serial as printable ASCII, short enough for every page it goes in.
fn serial(lun: &Lun) -> Vec<u8> {
    lun.serial
        .bytes()
        .map(|b| {
            if b == b' ' || b.is_ascii_graphic() {
                b
            } else {
                b'_'
            }
        })
        .take(MAX_SERIAL)
        .collect()
}

/// A VPD page, or None for one not supported. A missing LUN gets each
/// page's header alone, with qualifier 3 saying there is nothing behind it.
fn vpd(lun: Option<&Lun>, page: u8) -> Option<Vec<u8>> {
    if !VPD_PAGES.contains(&page) {
        return None;
    }
    let Some(lun) = lun else {
        return Some(vec![NO_DEVICE, page, 0, 0]);
    };
    let body = match page {
        0x00 => VPD_PAGES.to_vec(),
        0x80 => serial(lun),
        0x83 => {
            let mut naa = lun.naa;
            naa[0] = 0x60 | (naa[0] & 0x0f);
            // Binary code set, LU association, NAA.
            let mut d = vec![0x01, 0x03, 0x00, 16];
            d.extend_from_slice(&naa);
            let mut t10 = VENDOR.to_vec();
            t10.extend(serial(lun));
            // ASCII code set, LU association, T10 vendor ID.
            d.extend([0x02, 0x01, 0x00, u8::try_from(t10.len()).unwrap_or(u8::MAX)]);
            d.extend(t10);
            d
        }
        0xb0 => {
            // Block limits, from byte 4: granularity 1 block, maximum and
            // optimal transfer length; no UNMAP, WRITE SAME or CAW limits.
            let mut p = [0u8; 0x3c];
            p[2..4].copy_from_slice(&1u16.to_be_bytes());
            p[4..8].copy_from_slice(&lun.max_transfer_blocks.to_be_bytes());
            p[8..12].copy_from_slice(&lun.max_transfer_blocks.to_be_bytes());
            p.to_vec()
        }
        0xb1 => {
            // Block device characteristics: medium rotation rate 1, i.e.
            // non-rotating, so initiators skip seek-avoiding heuristics.
            let mut p = [0u8; 0x3c];
            p[1] = 1;
            p.to_vec()
        }
        // Logical block provisioning: fully provisioned, no UNMAP.
        _ => vec![0; 4],
    };
    let mut v = vec![0x00, page];
    v.extend(u16::try_from(body.len()).unwrap_or(u16::MAX).to_be_bytes());
    v.extend(body);
    Some(v)
}

fn read_capacity10(lun: &Lun) -> Action {
    let mut b = [0u8; 8];
    // 0xFFFFFFFF tells the initiator to use READ CAPACITY(16).
    let last = u32::try_from(lun.last_lba()).unwrap_or(u32::MAX);
    b[0..4].copy_from_slice(&last.to_be_bytes());
    b[4..8].copy_from_slice(&lun.block_size.to_be_bytes());
    Data(b.to_vec())
}

/// SERVICE ACTION IN(16): READ CAPACITY(16) only.
fn service_action_in(lun: &Lun, c: &[u8; 16]) -> Action {
    if c[1] & 0x1f != 0x10 {
        return Check(INVALID_FIELD_IN_CDB);
    }
    // No protection, one logical block per physical block, LBPME = 0.
    let mut b = [0u8; 32];
    b[0..8].copy_from_slice(&lun.last_lba().to_be_bytes());
    b[8..12].copy_from_slice(&lun.block_size.to_be_bytes());
    data_in(b.to_vec(), be(c, 10, 4))
}

fn report_luns(luns: &[u16], c: &[u8; 16]) -> Action {
    // SELECT REPORT: 0 and 2 list every LUN; 1 asks for well-known LUNs,
    // of which there are none.
    let list: &[u16] = match c[2] {
        0 | 2 => luns,
        1 => &[],
        _ => return Check(INVALID_FIELD_IN_CDB),
    };
    let len = u32::try_from(list.len().saturating_mul(8)).unwrap_or(u32::MAX);
    let mut b = Vec::with_capacity(8 + list.len().saturating_mul(8));
    b.extend(len.to_be_bytes());
    b.extend([0u8; 4]);
    for &l in list {
        let [hi, lo] = l.to_be_bytes();
        // Peripheral device addressing below 256, flat space above.
        let first = if l < 256 { 0 } else { 0x40 | (hi & 0x3f) };
        b.extend([first, lo, 0, 0, 0, 0, 0, 0]);
    }
    data_in(b, be(c, 6, 4))
}

/// A mode page: code, length and (for current values) its fields. For
/// changeable values the fields stay zero: nothing can be changed.
fn mode_page(code: u8, len: usize, changeable: bool) -> Vec<u8> {
    // `len` is one of this file's constants, at least 12.
    let mut p = vec![0u8; len];
    p[0] = code;
    p[1] = u8::try_from(len - 2).unwrap_or(0);
    if !changeable {
        match code {
            // Control: QUEUE ALGORITHM MODIFIER 1, unrestricted reordering,
            // which is safe as nothing writes.
            0x0a => p[3] = 0x10,
            // Informational exceptions: DEXCPT, none are ever reported.
            0x1c => p[2] = 0x08,
            // Caching: WCE = 0 (nothing to write back), RCD = 0.
            _ => {}
        }
    }
    p
}

/// MODE SENSE(6) and (10).
fn mode_sense(lun: &Lun, c: &[u8; 16]) -> Action {
    let ten = c[0] == 0x5a;
    let dbd = c[1] & 0x08 != 0;
    let (pc, page, subpage) = (c[2] >> 6, c[2] & 0x3f, c[3]);
    if pc == 3 {
        return Check(SAVING_NOT_SUPPORTED);
    }
    // No subpages: only subpage 0, or 0xFF ("all") with page 0x3F.
    if subpage != 0 && !(page == 0x3f && subpage == 0xff) {
        return Check(INVALID_FIELD_IN_CDB);
    }
    let changeable = pc == 1;
    let mut pages = Vec::new();
    for (code, len) in [(0x08, 20), (0x0a, 12), (0x1c, 12)] {
        if page == code || page == 0x3f {
            pages.extend(mode_page(code, len, changeable));
        }
    }
    if pages.is_empty() {
        return Check(INVALID_FIELD_IN_CDB);
    }
    // Short LBA block descriptor (SBC-3), also under LLBAA, which only
    // allows a long one: a block count saturating to 0xFFFFFFFF (READ
    // CAPACITY(16) tells the rest) and a 3-byte block length. Nothing in
    // it is changeable.
    let mut bd = [0u8; 8];
    if !changeable {
        let blocks = u32::try_from(lun.blocks()).unwrap_or(u32::MAX);
        bd[..4].copy_from_slice(&blocks.to_be_bytes());
        bd[4..].copy_from_slice(&lun.block_size.min(0xff_ffff).to_be_bytes());
    }
    let bd = if dbd { &[][..] } else { &bd[..] };
    // Device-specific parameter: WP (the LUN is write protected) and
    // DPOFUA (READs accept DPO and FUA: every read is of the image).
    const WP: u8 = 0x80 | 0x10;
    let bdl = u8::try_from(bd.len()).unwrap_or(0);
    let mut b = if ten {
        let [hi, lo] = u16::try_from(bd.len() + pages.len() + 6)
            .unwrap_or(u16::MAX)
            .to_be_bytes();
        vec![hi, lo, 0, WP, 0, 0, 0, bdl]
    } else {
        let len = u8::try_from(bd.len() + pages.len() + 3).unwrap_or(u8::MAX);
        vec![len, 0, WP, bdl]
    };
    b.extend_from_slice(bd);
    b.extend(pages);
    let alloc = if ten { be(c, 7, 2) } else { u64::from(c[4]) };
    data_in(b, alloc)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::iscsi::scsi as ini;

    /// 2048 whole blocks and a partial one.
    fn lun() -> Lun {
        sized((1 << 20) + 100, 512)
    }

    fn sized(size: u64, block_size: u32) -> Lun {
        let (serial, naa) = ("abc123".into(), [0xff; 16]);
        Lun {
            size,
            block_size,
            serial,
            naa,
            max_transfer_blocks: 2048,
        }
    }

    fn run(cdb: &[u8]) -> Action {
        execute(Some(&lun()), &[0], cdb)
    }

    fn data_on(l: Option<&Lun>, cdb: &[u8]) -> Vec<u8> {
        match execute(l, &[0], cdb) {
            Data(d) => d,
            other => panic!("{cdb:02x?}: expected data, got {other:?}"),
        }
    }

    fn data(cdb: &[u8]) -> Vec<u8> {
        data_on(Some(&lun()), cdb)
    }

    fn chk(cdb: &[u8], want: Sense) {
        assert_eq!(run(cdb), Check(want), "{cdb:02x?}");
    }

    /// A 10-byte CDB with a 4-byte LBA at 2 and a 2-byte length at 7.
    fn cdb10(op: u8, flags: u8, lba: u32, len: u16) -> [u8; 10] {
        let ([a, b, c, d], [e, f]) = (lba.to_be_bytes(), len.to_be_bytes());
        [op, flags, a, b, c, d, 0, e, f, 0]
    }

    fn parsed(s: Sense) -> Option<ini::Sense> {
        let (key, asc, ascq) = (s.key, s.asc, s.ascq);
        Some(ini::Sense { key, asc, ascq })
    }

    #[test]
    fn sense_and_request_sense() {
        let b = LBA_OUT_OF_RANGE.fixed();
        assert_eq!((b[0], b[2], b[7], b[12], b[13]), (0x70, 5, 10, 0x21, 0));
        assert_eq!(ini::parse_sense(&b), parsed(LBA_OUT_OF_RANGE));
        assert_eq!(data(&[0x03, 0, 0, 0, 252, 0]), NO_SENSE.fixed().to_vec());
        assert_eq!(data(&[0x03, 0, 0, 0, 8, 0]).len(), 8);
        let desc = data(&[0x03, 1, 0, 0, 252, 0]);
        assert_eq!(ini::parse_sense(&desc), parsed(NO_SENSE));
    }

    #[test]
    fn standard_inquiry_layout() {
        let b = data(&ini::inquiry(None, 255));
        assert_eq!(b.len(), 96);
        assert_eq!(&b[..8], &[0, 0, 6, 0x12, 91, 0, 0, 0x02]);
        let i = ini::parse_inquiry(&b).unwrap();
        assert_eq!(i.device_type, 0);
        assert_eq!(
            [&*i.vendor, &*i.product, &*i.revision],
            ["HERD", "herd image", "0001"]
        );
        assert_eq!(
            &b[58..66],
            &[0x00, 0xa0, 0x09, 0x60, 0x04, 0x60, 0x04, 0xc0]
        );
        assert_eq!(data(&ini::inquiry(None, 36)).len(), 36);
        assert_eq!(run(&ini::inquiry(None, 0)), Data(vec![]));
        chk(&[0x12, 0, 0x80, 0, 255, 0], INVALID_FIELD_IN_CDB); // page, no EVPD
        chk(&[0x12, 2, 0, 0, 255, 0], INVALID_FIELD_IN_CDB); // CMDDT
    }

    #[test]
    fn vpd_pages() {
        let vpd = |page| data(&ini::inquiry(Some(page), 255));
        assert_eq!(vpd(0), vec![0, 0, 0, 6, 0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
        let b = vpd(0x80);
        assert_eq!(&b[..2], &[0, 0x80]);
        assert_eq!(ini::parse_serial(&b), Some("abc123".into()));

        // The NAA designator first, its high nibble forced to 6, then T10.
        let b = vpd(0x83);
        assert_eq!((&b[..2], usize::from(b[3])), (&[0, 0x83][..], b.len() - 4));
        assert_eq!(&b[4..8], &[0x01, 0x03, 0, 16]);
        assert_eq!(
            ini::parse_designator(&b),
            Some(format!("6f{}", "ff".repeat(15)))
        );
        assert_eq!(&b[24..28], &[0x02, 0x01, 0, 14]);
        assert_eq!(&b[28..], b"HERD    abc123");

        let b = vpd(0xb0);
        assert_eq!((b.len(), &b[..4]), (64, &[0, 0xb0, 0, 0x3c][..]));
        assert_eq!(&b[6..8], &[0, 1]);
        assert_eq!(ini::parse_block_limits(&b), Some((2048, 2048)));
        assert!(b[16..].iter().all(|&x| x == 0));
        let b = vpd(0xb1);
        assert_eq!(
            (b.len(), &b[..8]),
            (64, &[0, 0xb1, 0, 0x3c, 0, 1, 0, 0][..])
        );
        assert_eq!(vpd(0xb2), vec![0, 0xb2, 0, 4, 0, 0, 0, 0]);

        chk(&ini::inquiry(Some(0x86), 255), INVALID_FIELD_IN_CDB);
        assert_eq!(data(&ini::inquiry(Some(0x83), 10)).len(), 10);
    }

    #[test]
    fn odd_serials_stay_within_the_designator() {
        let mut l = lun();
        l.serial = format!("é\n{}", "x".repeat(400));
        let b = data_on(Some(&l), &ini::inquiry(Some(0x83), 1024));
        assert_eq!((&b[24..28], b.len()), (&[0x02, 0x01, 0, 255][..], 28 + 255));
        let s = data_on(Some(&l), &ini::inquiry(Some(0x80), 1024));
        assert_eq!(&s[4..8], b"___x");
    }

    #[test]
    fn read_capacity() {
        let b = data(&ini::read_capacity16());
        let c = ini::parse_capacity16(&b).unwrap();
        assert_eq!(
            (c.blocks, c.block_size, c.thin, c.zeroed),
            (2048, 512, false, false)
        );
        assert_eq!(b.len(), 32);
        assert!(b[12..].iter().all(|&x| x == 0));
        let c = ini::parse_capacity10(&data(&ini::read_capacity10())).unwrap();
        assert_eq!((c.blocks, c.block_size), (2048, 512));

        let big = sized(4 << 40, 512); // 2^33 blocks
        assert_eq!(
            &data_on(Some(&big), &ini::read_capacity10())[..4],
            &[0xff; 4]
        );
        let b = data_on(Some(&big), &ini::read_capacity16());
        assert_eq!(ini::parse_capacity16(&b).unwrap().blocks, 1 << 33);

        let mut c16 = ini::read_capacity16();
        c16[13] = 12;
        assert_eq!(data(&c16).len(), 12);
        chk(&ini::get_lba_status(0, 64), INVALID_FIELD_IN_CDB);
    }

    #[test]
    fn read_ranges() {
        let r = |offset, len| Action::Read { offset, len };
        assert_eq!(run(&ini::read16(2047, 1)), r(2047 * 512, 512));
        chk(&ini::read16(2047, 2), LBA_OUT_OF_RANGE);
        chk(&ini::read16(2048, 1), LBA_OUT_OF_RANGE);
        chk(&ini::read16(u64::MAX, 2), LBA_OUT_OF_RANGE);
        assert_eq!(run(&ini::read16(0, 2048)), r(0, 1 << 20));
        assert_eq!(run(&ini::read16(5, 0)), r(2560, 0));
        assert_eq!(run(&cdb10(0x28, 0, 2047, 1)), r(2047 * 512, 512));
        chk(&cdb10(0x28, 0, 2048, 1), LBA_OUT_OF_RANGE);
        chk(&cdb10(0x28, 0x20, 0, 1), INVALID_FIELD_IN_CDB); // RDPROTECT
        let mut c16 = ini::read16(0, 1);
        c16[1] = 0xe0;
        chk(&c16, INVALID_FIELD_IN_CDB);
        // READ(12): LBA at 2, length at 6.
        assert_eq!(
            run(&[0xa8, 0, 0, 0, 0, 10, 0, 0, 0, 3, 0, 0]),
            r(5120, 1536)
        );
        // READ(6): 21-bit LBA, length 0 means 256 blocks.
        assert_eq!(run(&[0x08, 0xe0, 0, 1, 0, 0]), r(512, 256 * 512));
        assert_eq!(run(&[0x08, 0, 0x07, 0x00, 0, 0]), r(1792 * 512, 256 * 512));
        chk(&[0x08, 0, 0x07, 0x01, 0, 0], LBA_OUT_OF_RANGE);
        assert_eq!(run(&[0x08, 0, 0x07, 0xff, 1, 0]), r(2047 * 512, 512));
    }

    #[test]
    fn report_luns_layout() {
        let luns = |cdb: &[u8]| data_on(None, cdb);
        let Data(b) = execute(Some(&lun()), &[0, 1, 300], &ini::report_luns(4096)) else {
            panic!("no data");
        };
        assert_eq!(
            (&b[..8], &b[24..26]),
            (&[0, 0, 0, 24, 0, 0, 0, 0][..], &[0x41, 0x2c][..])
        );
        assert_eq!(ini::parse_report_luns(&b), vec![0, 1, 300]);
        assert_eq!(ini::parse_report_luns(&b[..16]), vec![0]);
        assert_eq!(
            luns(&ini::report_luns(4096)),
            vec![0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(luns(&ini::report_luns(12)).len(), 12);
        let mut c = ini::report_luns(4096);
        c[2] = 1; // well-known LUNs only: none
        assert_eq!(data(&c), vec![0; 8]);
        c[2] = 9;
        chk(&c, INVALID_FIELD_IN_CDB);
    }

    #[test]
    fn mode_sense_6() {
        // All pages, with a block descriptor.
        let b = data(&[0x1a, 0, 0x3f, 0, 255, 0]);
        assert_eq!(b.len(), 4 + 8 + 20 + 12 + 12);
        assert_eq!(&b[..12], &[55, 0, 0x90, 8, 0, 0, 8, 0, 0, 0, 2, 0]);
        assert_eq!(&b[12..15], &[0x08, 18, 0]); // WCE = RCD = 0
        assert_eq!((&b[32..34], &b[44..46]), (&[0x0a, 10][..], &[0x1c, 10][..]));
        assert_eq!(data(&[0x1a, 0, 0x3f, 0, 4, 0]), vec![55, 0, 0x90, 8]);
        // DBD, caching page only.
        let b = data(&[0x1a, 0x08, 0x08, 0, 255, 0]);
        assert_eq!((&b[..4], b.len()), (&[23, 0, 0x90, 0][..], 24));
        // Changeable values: nothing is.
        let b = data(&[0x1a, 0x08, 0x40 | 0x3f, 0, 255, 0]);
        assert_eq!(b.len(), 48);
        let (caching, rest) = b[4..].split_at(20);
        let (control, iec) = rest.split_at(12);
        for (p, code) in [(caching, 0x08), (control, 0x0a), (iec, 0x1c)] {
            assert_eq!(p[..2], [code, u8::try_from(p.len() - 2).unwrap()]);
            assert!(p[2..].iter().all(|&x| x == 0), "page {code:#x}");
        }
        chk(&[0x1a, 0, 0x19, 0, 255, 0], INVALID_FIELD_IN_CDB);
        chk(&[0x1a, 0, 0x08, 1, 255, 0], INVALID_FIELD_IN_CDB);
        chk(&[0x1a, 0, 0xc8, 0, 255, 0], SAVING_NOT_SUPPORTED);
        // Too many blocks for the short descriptor: 0xFFFFFFFF.
        let b = data_on(Some(&sized(4 << 40, 512)), &[0x1a, 0, 0x3f, 0xff, 255, 0]);
        assert_eq!(&b[4..8], &[0xff; 4]);
    }

    #[test]
    fn mode_sense_10() {
        let b = data(&[0x5a, 0, 0x0a, 0, 0, 0, 0, 1, 0, 0]);
        assert_eq!(b.len(), 8 + 8 + 12);
        assert_eq!(&b[..8], &[0, 26, 0, 0x90, 0, 0, 0, 8]);
        assert_eq!(&b[16..20], &[0x0a, 10, 0, 0x10]);
        // LLBAA still gets the short descriptor.
        let b = data(&[0x5a, 0x10, 0x1c, 0, 0, 0, 0, 1, 0, 0]);
        assert_eq!(
            &b[..16],
            &[0, 26, 0, 0x90, 0, 0, 0, 8, 0, 0, 8, 0, 0, 0, 2, 0]
        );
        assert_eq!(&b[16..19], &[0x1c, 10, 0x08]);
        let b = data(&[0x5a, 0x18, 0x08, 0, 0, 0, 0, 1, 0, 0]); // DBD
        assert_eq!((&b[..8], b.len()), (&[0, 26, 0, 0x90, 0, 0, 0, 0][..], 28));
        assert_eq!(data(&[0x5a, 0, 0x3f, 0, 0, 0, 0, 0, 3, 0]).len(), 3);
    }

    #[test]
    fn writes_are_data_protect() {
        let writes = [
            0x0a, 0x2a, 0xaa, 0x8a, 0x2e, 0xae, 0x8e, 0x41, 0x93, 0x42, 0x89, 0x04, 0x9c,
        ];
        for op in writes {
            chk(&[op; 16], WRITE_PROTECTED);
        }
        assert_eq!(
            ini::parse_sense(&WRITE_PROTECTED.fixed()).unwrap().key,
            0x07
        );
        chk(&[0x15, 0, 0, 0, 0, 0], INVALID_OPCODE);
        chk(&cdb10(0x55, 0, 0, 0), INVALID_OPCODE);
    }

    #[test]
    fn simple_unknown_and_short_commands() {
        assert_eq!(run(&ini::test_unit_ready()), Good);
        assert_eq!(run(&[0x1b, 0, 0, 0, 1, 0]), Good);
        assert_eq!(run(&[0x1e, 0, 0, 0, 1, 0]), Good);
        chk(&[0xa4, 0x0c, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0], INVALID_OPCODE);
        chk(&[0xc0; 16], INVALID_OPCODE);
        chk(&[], INVALID_OPCODE);
        chk(&[0x12, 0, 0, 0], INVALID_FIELD_IN_CDB);
        chk(&ini::read16(0, 1)[..15], INVALID_FIELD_IN_CDB);
        chk(&cdb10(0x28, 0, 0, 1)[..9], INVALID_FIELD_IN_CDB);
    }

    #[test]
    fn sync_cache_and_verify() {
        assert_eq!(run(&cdb10(0x35, 0, 2047, 1)), Good);
        chk(&cdb10(0x35, 0, 2048, 1), LBA_OUT_OF_RANGE);
        chk(&cdb10(0x2f, 0, 2040, 9), LBA_OUT_OF_RANGE);
        chk(&cdb10(0x2f, 0x20, 0, 1), INVALID_FIELD_IN_CDB); // VRPROTECT
        let mut c = ini::read16(0, 0);
        c[0] = 0x91;
        assert_eq!(run(&c), Good);
        c[0] = 0x8f;
        c[13] = 5;
        assert_eq!(run(&c), Good);
        c[1] = 0x02; // BYTCHK = 1: compare with data-out
        assert_eq!(
            run(&c),
            Action::Compare {
                offset: 0,
                len: 5 * 512,
                data_len: 5 * 512
            }
        );
        c[1] = 0x06; // BYTCHK = 3: one block against each
        assert!(matches!(run(&c), Action::Compare { data_len: 512, .. }));
        c[1] = 0x04; // BYTCHK = 2: reserved
        chk(&c, INVALID_FIELD_IN_CDB);
        // The range is checked before BYTCHK.
        let mut far = cdb10(0x2f, 0x02, 2048, 1);
        chk(&far, LBA_OUT_OF_RANGE);
        far[1] = 0;
        chk(&far, LBA_OUT_OF_RANGE);
    }

    #[test]
    fn missing_lun() {
        let b = data_on(None, &ini::inquiry(None, 255));
        assert_eq!((b[0], b.len()), (0x7f, 96));
        assert_eq!(
            data_on(None, &ini::inquiry(Some(0x83), 255)),
            vec![0x7f, 0x83, 0, 0]
        );
        let s = data_on(None, &[0x03, 0, 0, 0, 18, 0]);
        assert_eq!(ini::parse_sense(&s), parsed(LUN_NOT_SUPPORTED));
        let cdbs = [
            ini::test_unit_ready(),
            ini::read16(0, 1),
            ini::read_capacity16(),
            [0xc0; 16],
        ];
        for cdb in cdbs {
            assert_eq!(execute(None, &[0], &cdb), Check(LUN_NOT_SUPPORTED));
        }
    }

    #[test]
    fn no_input_panics() {
        let odd = [(u64::MAX, 0), (u64::MAX, 1), (0, u32::MAX), (1 << 20, 512)];
        let luns = odd.map(|(size, bs)| sized(size, bs));
        let (mut x, mut reads) = (0x9e37_79b9_7f4a_7c15_u64, 0);
        for op in 0..=255u8 {
            for len in 0..=16 {
                // All-zero fields, all-ones fields, then xorshift64 noise.
                for round in 0..6 {
                    let mut cdb = [0u8; 16];
                    for b in &mut cdb {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        *b = [0, 0xff, x.to_le_bytes()[0]][round.min(2)];
                    }
                    cdb[0] = op;
                    for l in &luns {
                        if let Action::Read { offset, len } =
                            execute(Some(l), &[0, 7, 999], &cdb[..len])
                        {
                            assert!(offset.checked_add(len).is_some_and(|e| e <= l.size));
                            reads += 1;
                        }
                    }
                    let _ = execute(None, &[], &cdb[..len]);
                }
            }
        }
        assert!(reads > 100, "the noise reached READ {reads} times");
    }
}
