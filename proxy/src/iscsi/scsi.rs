//! SCSI commands herd issues (SPC-4 / SBC-3) and the parsing of their
//! results: CDB builders and pure parsers for capacity, INQUIRY, VPD pages,
//! REPORT LUNS, GET LBA STATUS and sense data.

/// Status byte values.
pub const GOOD: u8 = 0x00;
pub const CHECK_CONDITION: u8 = 0x02;
pub const BUSY: u8 = 0x08;
pub const TASK_SET_FULL: u8 = 0x28;

/// Sense keys herd acts on.
pub const NOT_READY: u8 = 0x2;
pub const UNIT_ATTENTION: u8 = 0x6;

fn cdb(bytes: &[u8]) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[..bytes.len()].copy_from_slice(bytes);
    c
}

#[must_use]
pub fn test_unit_ready() -> [u8; 16] {
    cdb(&[0x00, 0, 0, 0, 0, 0])
}

/// INQUIRY: standard data (`page` None) or a VPD page.
#[must_use]
pub fn inquiry(page: Option<u8>, alloc: u16) -> [u8; 16] {
    let [hi, lo] = alloc.to_be_bytes();
    match page {
        None => cdb(&[0x12, 0, 0, hi, lo, 0]),
        Some(p) => cdb(&[0x12, 1, p, hi, lo, 0]),
    }
}

#[must_use]
pub fn read_capacity10() -> [u8; 16] {
    cdb(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0])
}

#[must_use]
pub fn read_capacity16() -> [u8; 16] {
    let mut c = cdb(&[0x9e, 0x10]);
    c[10..14].copy_from_slice(&32u32.to_be_bytes());
    c
}

/// GET LBA STATUS (SERVICE ACTION IN(16), action 0x12, SBC-3 5.7) from
/// `lba`, with `alloc` bytes for the answer.
#[must_use]
pub fn get_lba_status(lba: u64, alloc: u32) -> [u8; 16] {
    let mut c = cdb(&[0x9e, 0x12]);
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&alloc.to_be_bytes());
    c
}

/// One LBA status descriptor: `blocks` blocks from `lba` are mapped
/// (status 0), deallocated (1) or anchored (2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LbaStatus {
    pub lba: u64,
    pub blocks: u32,
    pub status: u8,
}

pub const LBA_MAPPED: u8 = 0;
pub const LBA_DEALLOCATED: u8 = 1;

/// The descriptors of GET LBA STATUS parameter data: a 4-byte parameter
/// data length, 4 reserved bytes, then 16 bytes a descriptor. A short
/// buffer keeps the whole descriptors it holds.
#[must_use]
pub fn parse_lba_status(b: &[u8]) -> Option<Vec<LbaStatus>> {
    let len = usize::try_from(be32(b, 0)?).ok()?;
    let end = b.len().min(len.saturating_add(4));
    let body = b.get(8..end)?;
    Some(
        body.chunks_exact(16)
            .map(|d| LbaStatus {
                lba: u64::from_be_bytes(d[0..8].try_into().unwrap_or_default()),
                blocks: u32::from_be_bytes(d[8..12].try_into().unwrap_or_default()),
                status: d[12] & 0x0f,
            })
            .collect(),
    )
}

#[must_use]
pub fn read16(lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x88;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

#[must_use]
pub fn report_luns(alloc: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0xa0;
    c[6..10].copy_from_slice(&alloc.to_be_bytes());
    c
}

/// Block count and size, and (READ CAPACITY(16) only) logical block
/// provisioning: `thin` (LBPME) and `zeroed` (LBPRZ: unmapped blocks read
/// as zeros).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub blocks: u64,
    pub block_size: u32,
    pub thin: bool,
    pub zeroed: bool,
}

impl Capacity {
    #[must_use]
    pub fn bytes(&self) -> u64 {
        self.blocks * u64::from(self.block_size)
    }
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

#[must_use]
pub fn parse_capacity16(b: &[u8]) -> Option<Capacity> {
    let last = u64::from_be_bytes(b.get(0..8)?.try_into().ok()?);
    let prov = b.get(14).copied().unwrap_or(0);
    Some(Capacity {
        blocks: last.checked_add(1)?,
        block_size: be32(b, 8)?,
        thin: prov & 0x80 != 0,
        zeroed: prov & 0x40 != 0,
    })
}

#[must_use]
pub fn parse_capacity10(b: &[u8]) -> Option<Capacity> {
    Some(Capacity {
        blocks: u64::from(be32(b, 0)?) + 1,
        block_size: be32(b, 4)?,
        thin: false,
        zeroed: false,
    })
}

/// The identifying strings of standard INQUIRY data.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Inquiry {
    pub device_type: u8,
    pub vendor: String,
    pub product: String,
    pub revision: String,
}

fn ascii(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim().to_owned()
}

#[must_use]
pub fn parse_inquiry(b: &[u8]) -> Option<Inquiry> {
    Some(Inquiry {
        device_type: b.first()? & 0x1f,
        vendor: ascii(b.get(8..16)?),
        product: ascii(b.get(16..32)?),
        revision: ascii(b.get(32..36).unwrap_or_default()),
    })
}

/// VPD 0x80: unit serial number.
#[must_use]
pub fn parse_serial(b: &[u8]) -> Option<String> {
    let len = usize::from(u16::from_be_bytes(b.get(2..4)?.try_into().ok()?));
    Some(ascii(b.get(4..4 + len)?))
}

/// VPD 0x83: the first designator, rendered as text or hex.
#[must_use]
pub fn parse_designator(b: &[u8]) -> Option<String> {
    let d = b.get(4..)?;
    let code_set = d.first()? & 0x0f;
    let len = usize::from(*d.get(3)?);
    let id = d.get(4..4 + len)?;
    Some(if code_set == 2 || code_set == 3 {
        ascii(id)
    } else {
        id.iter().map(|x| format!("{x:02x}")).collect()
    })
}

/// VPD 0xB0 block limits: maximum and optimal transfer length in blocks
/// (0 means "not reported").
#[must_use]
pub fn parse_block_limits(b: &[u8]) -> Option<(u32, u32)> {
    Some((be32(b, 8)?, be32(b, 12)?))
}

#[must_use]
pub fn parse_report_luns(b: &[u8]) -> Vec<u16> {
    let Some(len) = be32(b, 0) else {
        return Vec::new();
    };
    b.get(8..8 + len as usize)
        .unwrap_or_else(|| b.get(8..).unwrap_or_default())
        .chunks_exact(8)
        .map(super::pdu::decode_lun)
        .collect()
}

/// The meaningful part of sense data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

impl std::fmt::Display for Sense {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let key = match self.key {
            0x0 => "NO SENSE",
            0x1 => "RECOVERED ERROR",
            0x2 => "NOT READY",
            0x3 => "MEDIUM ERROR",
            0x4 => "HARDWARE ERROR",
            0x5 => "ILLEGAL REQUEST",
            0x6 => "UNIT ATTENTION",
            0x7 => "DATA PROTECT",
            0xb => "ABORTED COMMAND",
            _ => "OTHER",
        };
        write!(
            f,
            "{key} (key {:#x}, ASC {:#04x}, ASCQ {:#04x})",
            self.key, self.asc, self.ascq
        )
    }
}

/// Parses sense data in fixed (0x70/0x71) or descriptor (0x72/0x73) format.
#[must_use]
pub fn parse_sense(b: &[u8]) -> Option<Sense> {
    match b.first()? & 0x7f {
        0x70 | 0x71 => Some(Sense {
            key: b.get(2)? & 0x0f,
            asc: *b.get(12).unwrap_or(&0),
            ascq: *b.get(13).unwrap_or(&0),
        }),
        0x72 | 0x73 => Some(Sense {
            key: b.get(1)? & 0x0f,
            asc: *b.get(2)?,
            ascq: *b.get(3)?,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read16_cdb() {
        let c = read16(0x0102_0304_0506_0708, 128);
        assert_eq!(c[0], 0x88);
        assert_eq!(&c[2..10], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&c[10..14], &[0, 0, 0, 128]);
    }

    #[test]
    fn capacity_parsing() {
        let mut b = vec![0u8; 32];
        b[0..8].copy_from_slice(&131_071u64.to_be_bytes());
        b[8..12].copy_from_slice(&512u32.to_be_bytes());
        let c = parse_capacity16(&b).expect("valid");
        assert_eq!(c.bytes(), 64 << 20);
        assert!(!c.thin && !c.zeroed);
        // Byte 14: LBPME (0x80) and LBPRZ (0x40), as tgtd sets them for a
        // thin-provisioned LUN.
        b[14] = 0xc0;
        let c = parse_capacity16(&b).expect("valid");
        assert!(c.thin && c.zeroed);
        let c10 = parse_capacity10(&[0, 1, 0xff, 0xff, 0, 0, 2, 0]).expect("valid");
        assert_eq!(c10.blocks, 0x2_0000);
        assert!(parse_capacity16(&b[..5]).is_none());
    }

    #[test]
    fn get_lba_status_cdb_and_data() {
        let c = get_lba_status(0x10, 4096);
        assert_eq!(&c[..2], &[0x9e, 0x12]);
        assert_eq!(&c[2..10], &[0, 0, 0, 0, 0, 0, 0, 0x10]);
        assert_eq!(&c[10..14], &[0, 0, 0x10, 0]);
        // SBC-3 table 57/58: parameter data length (8 + 16n - 4 = 36 for
        // two descriptors), reserved, then LBA, block count, status.
        let mut b = vec![0, 0, 0, 36, 0, 0, 0, 0];
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0]);
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 1, 0, 1, 0, 0, 0]);
        assert_eq!(
            parse_lba_status(&b),
            Some(vec![
                LbaStatus {
                    lba: 0,
                    blocks: 8,
                    status: LBA_MAPPED
                },
                LbaStatus {
                    lba: 8,
                    blocks: 256,
                    status: LBA_DEALLOCATED
                }
            ])
        );
        // Truncated by the allocation length: the whole descriptors only.
        assert_eq!(parse_lba_status(&b[..30]).map(|d| d.len()), Some(1));
        assert_eq!(parse_lba_status(&b[..3]), None);
    }

    #[test]
    fn sense_formats() {
        let mut fixed = [0u8; 18];
        fixed[0] = 0x70;
        fixed[2] = 0x06;
        fixed[12] = 0x29;
        assert_eq!(
            parse_sense(&fixed),
            Some(Sense {
                key: UNIT_ATTENTION,
                asc: 0x29,
                ascq: 0
            })
        );
        assert_eq!(
            parse_sense(&[0x72, 0x02, 0x04, 0x01]),
            Some(Sense {
                key: NOT_READY,
                asc: 4,
                ascq: 1
            })
        );
        assert_eq!(parse_sense(&[0x10]), None);
        assert_eq!(parse_sense(&[]), None);
    }

    #[test]
    fn inquiry_and_vpd() {
        let mut b = vec![0u8; 36];
        b[8..16].copy_from_slice(b"IET     ");
        b[16..32].copy_from_slice(b"VIRTUAL-DISK    ");
        b[32..36].copy_from_slice(b"0001");
        let i = parse_inquiry(&b).expect("valid");
        assert_eq!(
            (i.vendor.as_str(), i.product.as_str()),
            ("IET", "VIRTUAL-DISK")
        );
        assert_eq!(
            parse_serial(&[0, 0x80, 0, 3, b'a', b'b', b'c']),
            Some("abc".into())
        );
        let mut bl = vec![0u8; 64];
        bl[8..12].copy_from_slice(&2048u32.to_be_bytes());
        assert_eq!(parse_block_limits(&bl), Some((2048, 0)));
        let mut luns = vec![0u8; 24];
        luns[3] = 16;
        luns[9] = 0;
        luns[17] = 1;
        assert_eq!(parse_report_luns(&luns), vec![0, 1]);
    }
}
