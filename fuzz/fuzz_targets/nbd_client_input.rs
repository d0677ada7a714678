//! Everything a parent can send the NBD client: greeting, option replies,
//! info payloads and reply headers.
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
});
