//! Login and Text key=value pairs (RFC 7143 §6): UTF-8 `key=value` strings,
//! each ended by a NUL byte.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TextError {
    #[error("text key/value data is not UTF-8")]
    Utf8,
    #[error("text pair `{0}` has no `=`")]
    NoEquals(String),
    #[error("text pair exceeds 8192 bytes")]
    TooLong,
}

/// Parses NUL-separated `key=value` pairs; empty entries (padding) are
/// skipped.
///
/// # Errors
/// `Utf8`, `NoEquals` or `TooLong` for malformed data.
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    let mut out = Vec::new();
    for raw in data.split(|&b| b == 0).filter(|p| !p.is_empty()) {
        if raw.len() > 8192 {
            return Err(TextError::TooLong);
        }
        let s = std::str::from_utf8(raw).map_err(|_| TextError::Utf8)?;
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| TextError::NoEquals(s.to_owned()))?;
        out.push((k.to_owned(), v.to_owned()));
    }
    Ok(out)
}

/// Encodes pairs as `key=value\0…`.
#[must_use]
pub fn encode(pairs: &[(&str, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// The last value of `key`, if present.
#[must_use]
pub fn get<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Parses a CHAP binary value: `0x` hex or `0b` base64 (RFC 7143 §6.1).
#[must_use]
pub fn decode_binary(v: &str) -> Option<Vec<u8>> {
    let hex = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X"))?;
    if hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Encodes bytes as a `0x` hex value.
#[must_use]
pub fn encode_binary(b: &[u8]) -> String {
    let mut s = String::with_capacity(2 + b.len() * 2);
    s.push_str("0x");
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_padding() {
        let enc = encode(&[
            ("InitiatorName", "iqn.x".into()),
            ("AuthMethod", "None".into()),
        ]);
        assert_eq!(enc, b"InitiatorName=iqn.x\0AuthMethod=None\0");
        let mut padded = enc.clone();
        padded.extend_from_slice(&[0, 0]);
        let p = parse(&padded).expect("valid");
        assert_eq!(get(&p, "AuthMethod"), Some("None"));
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn values_may_contain_equals_and_bad_pairs_fail() {
        let p = parse(b"TargetAddress=10.0.0.1:3260,1\0X=a=b\0").expect("valid");
        assert_eq!(get(&p, "X"), Some("a=b"));
        assert!(matches!(parse(b"novalue\0"), Err(TextError::NoEquals(_))));
        assert_eq!(parse(&[0xff, b'=', 0]), Err(TextError::Utf8));
    }

    #[test]
    fn binary_values() {
        assert_eq!(decode_binary("0x0aFf"), Some(vec![0x0a, 0xff]));
        assert_eq!(decode_binary("0x0"), None);
        assert_eq!(decode_binary("12"), None);
        assert_eq!(encode_binary(&[1, 0xab]), "0x01ab");
    }
}
