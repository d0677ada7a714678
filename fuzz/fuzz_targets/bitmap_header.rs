//! The on-disk cache bitmap header: a corrupt file must be refused, never
//! crash the daemon.
#![no_main]

use herd::cache::bitmap::{self, Decoded};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Decoded::Current(h) = bitmap::decode_header(data) {
        assert_eq!(
            bitmap::decode_header(&bitmap::encode_header(&h)),
            Decoded::Current(h)
        );
    }
});
