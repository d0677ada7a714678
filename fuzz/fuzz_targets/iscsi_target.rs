//! Everything an initiator can send herd's iSCSI target: BHS headers,
//! login keys driven through the login state machine (CHAP included), and
//! CDBs run against the read-only disk. Nothing may panic, and a READ
//! never reaches past the image.
#![no_main]

use herd::export::iscsi::{login, scsi};
use herd::iscsi::{target_pdu, text};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let _ = target_pdu::decode_initiator(data);
    let lun = scsi::Lun {
        size: 1 << 30,
        block_size: 512,
        serial: "0123456789abcdef".into(),
        naa: [0x60; 16],
        max_transfer_blocks: 2048,
    };
    for cdb in data.chunks(16) {
        if let scsi::Action::Read { offset, len } = scsi::execute(Some(&lun), &[0], cdb) {
            assert!(offset.checked_add(len).is_some_and(|end| end <= lun.size));
        }
        let _ = scsi::execute(None, &[0, 1], cdb);
    }
    if let Ok(keys) = text::parse(&data[1..]) {
        let auth = login::Auth {
            chap: (data[0] & 1 != 0).then(|| ("u".to_owned(), b"0123456789ab".to_vec())),
            mutual: (data[0] & 2 != 0).then(|| ("t".to_owned(), b"ba9876543210".to_vec())),
        };
        let mut l = login::Login::new("iqn.t".into(), "127.0.0.1:3260,1".into(), auth, [3; 17]);
        for stage in 0..4u8 {
            let _ = l.step(data[0] & 4 != 0, stage & 3, (data[0] >> 4) & 3, &keys);
        }
        let _ = l.negotiated();
    }
});
