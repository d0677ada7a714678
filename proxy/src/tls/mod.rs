//! TLS on NBD links, negotiated with `NBD_OPT_STARTTLS` as qemu-nbd and
//! nbdkit do: the export's server side (`Server`), the upstream client side
//! (`Client`), X.509 files in PEM, and client authorisation by certificate
//! name (`--tls-allow`). `certs` makes a CA and certificates in the file
//! layout qemu, libnbd and nbdkit read.
//!
//! rustls with the ring provider: no C toolchain beyond what ring needs,
//! TLS 1.2 and 1.3 (the NBD spec's floor is 1.2).

pub mod certs;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use thiserror::Error;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::net::BoxStream;

/// `--tls`: what a node asks of the peers on its NBD links.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Plain text; STARTTLS is answered "unsupported".
    #[default]
    Off,
    /// TLS when the peer asks (export) or offers (upstream), plain otherwise.
    On,
    /// TLS or nothing: before it, every option but STARTTLS gets
    /// `NBD_REP_ERR_TLS_REQD`; a parent that will not upgrade is refused.
    Require,
}

/// The files and names behind `--tls-*`.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub mode: Mode,
    /// PEM certificate chain this node presents (to children, and to
    /// parents that ask for a client certificate).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// PEM CA certificates: verify parents with them, and require children
    /// to present a certificate they signed.
    pub ca: Option<PathBuf>,
    /// Client certificate names (subject CN or a DNS SAN) allowed to
    /// connect; empty: any certificate the CA signed.
    pub allow: Vec<String>,
}

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read {what} from {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no {what}")]
    Empty { what: &'static str, path: PathBuf },
    #[error("--tls {0:?} needs --tls-cert and --tls-key (the certificate this node presents)")]
    NoCert(Mode),
    #[error("--tls-allow needs --tls-ca: names are only trusted on certificates the CA signed")]
    AllowWithoutCa,
    #[error("an nbds:// upstream needs --tls-ca to verify the parent's certificate")]
    NoCa,
    #[error("bad TLS configuration")]
    Rustls(#[from] rustls::Error),
    #[error("bad client verifier: {0}")]
    Verifier(String),
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |source| TlsError::Read {
        what: "certificates",
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(err)?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what: "certificate",
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| match source {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::Empty {
            what: "private key",
            path: path.to_owned(),
        },
        source => TlsError::Read {
            what: "private key",
            path: path.to_owned(),
            source,
        },
    })
}

fn read_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in read_certs(path)? {
        roots.add(c)?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The export's side: accepts STARTTLS.
pub struct Server {
    pub mode: Mode,
    acceptor: TlsAcceptor,
}

impl Server {
    /// `None` for `--tls off`.
    ///
    /// # Errors
    /// Missing or unreadable files, a key that does not match, `--tls-allow`
    /// without a CA.
    pub fn new(s: &Settings) -> Result<Option<Self>, TlsError> {
        if s.mode == Mode::Off {
            return Ok(None);
        }
        let (Some(cert), Some(key)) = (&s.cert, &s.key) else {
            return Err(TlsError::NoCert(s.mode));
        };
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?;
        let builder = match &s.ca {
            Some(ca) => {
                let inner = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(read_roots(ca)?),
                    provider(),
                )
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
                builder.with_client_cert_verifier(Arc::new(Allowed {
                    inner,
                    names: s.allow.clone(),
                }))
            }
            None if !s.allow.is_empty() => return Err(TlsError::AllowWithoutCa),
            None => builder.with_no_client_auth(),
        };
        let config = builder.with_single_cert(read_certs(cert)?, read_key(key)?)?;
        Ok(Some(Self {
            mode: s.mode,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        }))
    }

    /// Runs the server side of the TLS handshake on a stream that has just
    /// acknowledged STARTTLS.
    ///
    /// # Errors
    /// The handshake's failure (bad or unknown certificate, name not
    /// allowed, I/O), as rustls words it.
    pub async fn accept(&self, s: BoxStream) -> std::io::Result<BoxStream> {
        Ok(Box::new(self.acceptor.accept(s).await?))
    }
}

/// Checks the chain with webpki, then the name against `--tls-allow`.
#[derive(Debug)]
struct Allowed {
    inner: Arc<dyn ClientCertVerifier>,
    names: Vec<String>,
}

/// Why a verified client certificate was still refused.
#[derive(Error)]
#[error("client certificate names {names:?} are not in --tls-allow")]
struct NotAllowed {
    names: Vec<String>,
}

/// rustls prints its errors' causes with `Debug`: this reads as the log
/// line an operator needs.
impl std::fmt::Debug for NotAllowed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl ClientCertVerifier for Allowed {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.names.is_empty() {
            return Ok(ok);
        }
        let mut names = cert_names(end_entity);
        names.dedup();
        if names.iter().any(|n| self.names.contains(n)) {
            Ok(ok)
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(NotAllowed { names }))),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A certificate's names: subject common names, then DNS and IP SANs.
/// Unparseable certificates have none (webpki has already accepted the
/// chain, so this does not happen in practice).
#[must_use]
pub fn cert_names(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push((*d).to_owned()),
                GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => <[u8; 4]>::try_from(*b).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(*b).ok().map(IpAddr::from),
                        _ => None,
                    };
                    names.extend(ip.map(|ip| ip.to_string()));
                }
                _ => {}
            }
        }
    }
    names
}

/// The upstream side: STARTTLS to parents.
pub struct Client {
    pub mode: Mode,
    connector: TlsConnector,
}

impl Client {
    /// `None` when this node has no CA to verify parents with: its parent
    /// links stay plain, and an `nbds://` upstream is refused. With a CA,
    /// `nbds://` upstreams always use TLS, and `nbd://` ones as `mode` says.
    ///
    /// # Errors
    /// Unreadable files, a certificate without its key.
    pub fn new(s: &Settings) -> Result<Option<Self>, TlsError> {
        let Some(ca) = &s.ca else {
            return Ok(None);
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(read_roots(ca)?);
        let config = match (&s.cert, &s.key) {
            (Some(cert), Some(key)) => {
                builder.with_client_auth_cert(read_certs(cert)?, read_key(key)?)?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => return Err(TlsError::NoCert(s.mode)),
        };
        Ok(Some(Self {
            mode: s.mode,
            connector: TlsConnector::from(Arc::new(config)),
        }))
    }

    /// Runs the client side of the TLS handshake after the parent
    /// acknowledged STARTTLS; the parent's certificate must name `host`.
    ///
    /// # Errors
    /// A host that is no valid server name; the handshake's failure.
    pub async fn connect(&self, host: &str, s: BoxStream) -> std::io::Result<BoxStream> {
        let name = ServerName::try_from(host.to_owned()).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("`{host}` is not a server name for TLS: {e}"),
            )
        })?;
        Ok(Box::new(self.connector.connect(name, s).await?))
    }
}

static CLIENT: OnceLock<Client> = OnceLock::new();

/// Sets the TLS every NBD connection to a parent uses, once, at start.
/// Process-wide like the socket options those connections get: the
/// manifest, profile, probe and data connections all open through
/// `upstream::nbd`, and none should be able to skip it.
///
/// # Errors
/// Returns the client back when one is already set.
pub fn set_client(c: Client) -> Result<(), Client> {
    CLIENT.set(c)
}

/// The process's client TLS, if any.
#[must_use]
pub fn client() -> Option<&'static Client> {
    CLIENT.get()
}
