//! Everything a client can send the server: option headers, INFO/GO and
//! meta-context payloads and transmission requests. Decoders must never
//! panic.
#![no_main]

use herd::nbd::proto;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let _ = proto::decode_option_header(data);
    let _ = proto::decode_request(data);
    if let Ok(req) = proto::decode_info_request(data) {
        // What decodes must re-encode to the same bytes.
        assert_eq!(proto::encode_info_request(&req), data);
    }
    if let Ok(req) = proto::decode_meta_context_request(data) {
        assert_eq!(proto::encode_meta_context_request(&req), data);
    }
});
