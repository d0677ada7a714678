//! Everything a parent can send the NBD client: greeting, option replies,
//! info and meta-context payloads, reply headers and block status.
#![no_main]

use herd::nbd::proto;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let _ = proto::decode_greeting(data);
    let _ = proto::decode_option_reply_header(data);
    let _ = proto::decode_info(data);
    let _ = proto::decode_reply_header(data);
    let _ = proto::decode_meta_context_reply(data);
    let _ = proto::decode_list_entry(data);
    if let Ok((id, descs)) = proto::decode_block_status(data) {
        let mut out = Vec::new();
        proto::encode_block_status(0, id, &descs, &mut out);
        assert_eq!(&out[proto::STRUCTURED_HEADER_LEN..], data);
    }
});
