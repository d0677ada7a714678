//! What a fleet hands a node: the fleet file an operator writes and the
//! member records other nodes put in etcd. Neither may panic a node.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = herd::fleet::file::parse(std::path::Path::new("fleet.toml"), text);
    }
    let _ = serde_json::from_slice::<herd::fleet::Member>(data);
});
