//! Everything an iSCSI target can send: BHS headers, login/text key data,
//! sense data and SCSI parameter pages, and the same bytes as a stream cut
//! into pieces of a size the input picks. Decoders must never panic.
#![no_main]

use herd::iscsi::{pdu, scsi, stream, text};
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
    let step = usize::from(data[0]) + 1;
    for digests in [false, true] {
        let mut p = stream::PduStream::new(digests, digests);
        'feed: for piece in data[1..].chunks(step) {
            let mut input = piece;
            loop {
                match p.next(&mut input) {
                    Ok(Some(_)) => {}
                    // Whatever it did not yield it keeps: input is used up.
                    Ok(None) => {
                        assert!(input.is_empty());
                        break;
                    }
                    Err(_) => break 'feed,
                }
            }
        }
    }
});
