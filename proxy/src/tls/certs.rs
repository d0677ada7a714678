//! A CA and certificates for a fleet's NBD links, written in the layout
//! qemu (`tls-creds-x509,dir=`), libnbd (`tls-certificates=`) and nbdkit
//! (`--tls-certificates`) read: `ca-cert.pem`, `NAME-cert.pem`,
//! `NAME-key.pem` (`server-*` and `client-*` by convention).
//!
//! Every certificate carries both the server and client purposes: a herd
//! relay presents the same one to its children and to its parent.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CertError {
    #[error("cannot make the certificate for `{what}`")]
    Make {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot read the CA in {dir}")]
    Ca {
        dir: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("file stem `{0}` must be a plain name (letters, digits, '-', '_')")]
    Stem(String),
}

/// One certificate to issue.
#[derive(Debug, Clone)]
pub struct Request {
    /// Files are `STEM-cert.pem` and `STEM-key.pem`.
    pub stem: String,
    /// The first is the subject CN; all are SANs (IP addresses as IP SANs).
    pub names: Vec<String>,
    /// Days of validity from now; a negative value makes a certificate
    /// that expired that many days ago (for testing refusals).
    pub days: i64,
}

const CA_CERT: &str = "ca-cert.pem";
const CA_KEY: &str = "ca-key.pem";

fn write(path: &Path, text: &str, private: bool) -> Result<(), CertError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |what, source| CertError::Io {
        what,
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(|e| io("create", e))?;
    f.write_all(text.as_bytes()).map_err(|e| io("write", e))
}

fn read(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|source| CertError::Io {
        what: "read",
        path: path.to_owned(),
        source,
    })
}

/// Makes `dir/ca-cert.pem` and `dir/ca-key.pem` unless they exist, then
/// issues each request with that CA. Returns the files written.
///
/// # Errors
/// Unreadable CA files, a bad name, a file that cannot be written.
pub fn make(dir: &Path, requests: &[Request]) -> Result<Vec<PathBuf>, CertError> {
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
        what: "create",
        path: dir.to_owned(),
        source,
    })?;
    let mut written = Vec::new();
    let (ca_cert, ca_key) = (dir.join(CA_CERT), dir.join(CA_KEY));
    let ca_err = |source| CertError::Ca {
        dir: dir.to_owned(),
        source,
    };
    let issuer = if ca_key.exists() && ca_cert.exists() {
        let key = KeyPair::from_pem(&read(&ca_key)?).map_err(ca_err)?;
        Issuer::from_ca_cert_pem(&read(&ca_cert)?, key).map_err(ca_err)?
    } else {
        let make_err = |source| CertError::Make {
            what: "herd CA".into(),
            source,
        };
        let key = KeyPair::generate().map_err(make_err)?;
        let mut params = CertificateParams::default();
        // A CA of its own name: a certificate from another herd CA is then
        // "unknown issuer", not a signature that fails to check.
        let tag = blake3::hash(key.public_key_pem().as_bytes()).to_hex();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("herd CA {}", &tag[..12]));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(3650);
        let cert = params.self_signed(&key).map_err(make_err)?;
        write(&ca_cert, &cert.pem(), false)?;
        write(&ca_key, &key.serialize_pem(), true)?;
        written.extend([ca_cert.clone(), ca_key.clone()]);
        Issuer::new(params, key)
    };
    for r in requests {
        if r.stem.is_empty()
            || !r
                .stem
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(CertError::Stem(r.stem.clone()));
        }
        let what = r.names.first().cloned().unwrap_or_else(|| r.stem.clone());
        let make_err = |source| CertError::Make {
            what: what.clone(),
            source,
        };
        let key = KeyPair::generate().map_err(make_err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, &what);
        for n in &r.names {
            let san = match n.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(n.clone().try_into().map_err(make_err)?),
            };
            params.subject_alt_names.push(san);
        }
        // qemu refuses certificates whose key usage lacks key
        // encipherment, though an ECDSA key only ever signs.
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        if r.days >= 0 {
            params.not_before = now - time::Duration::days(1);
            params.not_after = now + time::Duration::days(r.days.max(1));
        } else {
            params.not_before = now - time::Duration::days(-r.days + 30);
            params.not_after = now - time::Duration::days(-r.days);
        }
        let cert = params.signed_by(&key, &issuer).map_err(make_err)?;
        let (c, k) = (
            dir.join(format!("{}-cert.pem", r.stem)),
            dir.join(format!("{}-key.pem", r.stem)),
        );
        write(&c, &cert.pem(), false)?;
        write(&k, &key.serialize_pem(), true)?;
        written.extend([c, k]);
    }
    Ok(written)
}
