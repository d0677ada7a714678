//! The manifest decoder: a parent or a disk can hand it any bytes; it must
//! refuse them or decode them to something that encodes back to the same
//! bytes, never panic.
#![no_main]

use herd::manifest::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::decode(data) {
        assert_eq!(m.bytes(), data);
        let digests: Vec<[u8; 32]> = (0..m.chunks())
            .map(|i| {
                let mut d = [0u8; 32];
                d.copy_from_slice(m.digest(i).unwrap_or(&[0; 32]));
                d
            })
            .collect();
        let again =
            Manifest::with_allocation(m.image_size(), m.chunk_size(), &digests, &m.allocation());
        assert_eq!(again.as_ref().map(Manifest::bytes), Ok(data));
        // Checking arbitrary bytes against it must not panic either.
        let _ = m.bad_chunks(0, data);
        let _ = m.block_status(0, m.image_size(), 64);
    }
});
