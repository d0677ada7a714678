//! Everything an iSCSI target can send: BHS headers, login/text key data,
//! sense data and SCSI parameter pages. Decoders must never panic.
#![no_main]

use herd::iscsi::{pdu, scsi, text};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let _ = pdu::decode(data);
    let _ = pdu::rejected_itt(data);
    if let Ok(pairs) = text::parse(data) {
        for (_, v) in &pairs {
            let _ = text::decode_binary(v);
        }
    }
    let _ = scsi::parse_sense(data);
    let _ = scsi::parse_capacity16(data);
    let _ = scsi::parse_capacity10(data);
    let _ = scsi::parse_inquiry(data);
    let _ = scsi::parse_serial(data);
    let _ = scsi::parse_designator(data);
    let _ = scsi::parse_block_limits(data);
    let _ = scsi::parse_report_luns(data);
    let _ = scsi::parse_lba_status(data);
});
