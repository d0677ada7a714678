//! Boot profiles come from files and from a parent proxy: a damaged or
//! hostile one must be refused, never crash the daemon. Inputs are also
//! tried with a repaired checksum, to reach the extent checks behind it.
#![no_main]

use herd::profile::{reseal, Profile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Profile::decode(data);
    let mut sealed = data.to_vec();
    reseal(&mut sealed);
    if let Ok(p) = Profile::decode(&sealed) {
        assert_eq!(Profile::decode(&p.encode()).ok(), Some(p));
    }
});
