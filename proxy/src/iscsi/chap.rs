//! CHAP with MD5 (RFC 1994, as iSCSI uses it in RFC 7143 §12.1.3).

use md5::{Digest, Md5};

/// The response to a challenge: MD5(identifier ‖ secret ‖ challenge).
#[must_use]
pub fn response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector() {
        // MD5 of 0x01 || "secret" || 0x00..0x0f, computed independently with
        // python3 hashlib.
        let challenge: Vec<u8> = (0u8..16).collect();
        let r = response(1, b"secret", &challenge);
        assert_eq!(
            super::super::text::encode_binary(&r),
            "0x740e86463bda3a4d7017d6e0fba0699d"
        );
    }
}
