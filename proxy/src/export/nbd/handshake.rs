//! Server side of fixed newstyle negotiation.

use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use std::sync::Arc;

use super::{Backing, Export, Exports};
use crate::nbd::proto::{self, ProtoError};
use crate::net::BoxStream;
use crate::tls;

/// Longest a client may take to reach transmission.
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// Most options one client may send before we give up on it.
const MAX_OPTIONS: usize = 64;

#[derive(Debug, Error)]
pub enum HandshakeError {
    #[error("I/O during handshake")]
    Io(#[from] std::io::Error),
    #[error("malformed handshake")]
    Proto(#[from] ProtoError),
    #[error("client flags {0:#x} include unknown bits")]
    ClientFlags(u32),
    #[error("client asked for unknown export `{0}` with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    #[error("client sent more than {MAX_OPTIONS} options")]
    TooManyOptions,
    #[error("handshake timed out")]
    Timeout,
    #[error("TLS handshake failed")]
    Tls(#[source] std::io::Error),
    #[error("client did not start TLS, which this server requires (--tls require)")]
    TlsRequired,
}

/// How negotiation ended.
pub enum Outcome {
    Transmission {
        structured: bool,
        /// `base:allocation` was selected for the chosen export: the
        /// context id BLOCK_STATUS replies carry.
        allocation: Option<u32>,
        /// The image the client chose (or whose side export it reads).
        export: Arc<Export>,
        backing: Backing,
        /// The stream is TLS: replies cannot be `sendfile`d.
        secure: bool,
    },
    Closed,
}

/// Whether an unknown export name may be logged at info now: at most
/// once a second, so hostile clients cannot flood the log.
fn unknown_name_logged_now() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    LAST.swap(now, Ordering::Relaxed) != now
}

/// The id herd gives `base:allocation`, its only metadata context.
pub const ALLOCATION_ID: u32 = 1;

struct Negotiation<'a> {
    s: BoxStream,
    exports: &'a Exports,
    tls: Option<&'a tls::Server>,
    /// TLS has been initiated on `s`.
    secure: bool,
    /// An option was refused with `ERR_TLS_REQD`: a hang-up after that is
    /// a refusal worth a log line, not a routine close.
    refused_plain: bool,
    structured: bool,
    no_zeroes: bool,
    /// The export `base:allocation` was last selected for.
    meta_for: Option<String>,
}

/// Runs negotiation on `s`; `Ok(Transmission)` means the returned stream
/// (TLS if the client started it) is ready for requests.
///
/// # Errors
/// Malformed input, I/O errors, a failed TLS handshake, a plain client
/// under `--tls require`, or the timeout; the caller closes.
pub async fn negotiate(
    s: BoxStream,
    exports: &Exports,
    tls: Option<&tls::Server>,
) -> Result<(BoxStream, Outcome), HandshakeError> {
    let mut n = Negotiation {
        s,
        exports,
        tls,
        secure: false,
        refused_plain: false,
        structured: false,
        no_zeroes: false,
        meta_for: None,
    };
    let outcome = tokio::time::timeout(TIMEOUT, n.run())
        .await
        .unwrap_or(Err(HandshakeError::Timeout))?;
    Ok((n.s, outcome))
}

/// Greets a client that is over a connection limit and answers every
/// option with `NBD_REP_ERR_POLICY` and `why`, so it reports the reason;
/// `NBD_OPT_EXPORT_NAME` cannot be refused and closes. Bounded in options
/// and time; errors end it quietly (the refusal was logged at accept).
pub async fn refuse(mut s: BoxStream, why: &str) {
    let run = async {
        let mut out = Vec::with_capacity(proto::GREETING_LEN);
        proto::encode_greeting(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES, &mut out);
        s.write_all(&out).await?;
        s.flush().await?;
        let _cflags = s.read_u32().await?;
        for _ in 0..MAX_OPTIONS {
            let mut h = [0u8; proto::OPTION_HEADER_LEN];
            s.read_exact(&mut h).await?;
            let opt = proto::decode_option_header(&h)?;
            let mut skip = (&mut s).take(u64::from(opt.len));
            tokio::io::copy(&mut skip, &mut tokio::io::sink()).await?;
            let (rep, msg) = match opt.option {
                proto::OPT_EXPORT_NAME => break,
                proto::OPT_ABORT => (proto::REP_ACK, ""),
                _ => (proto::REP_ERR_POLICY, why),
            };
            let mut out = Vec::new();
            proto::encode_option_reply(opt.option, rep, msg.as_bytes(), &mut out);
            s.write_all(&out).await?;
            s.flush().await?;
            if opt.option == proto::OPT_ABORT {
                break;
            }
        }
        Ok::<(), HandshakeError>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), run).await;
}

/// Stands in for the stream while the TLS acceptor owns it.
fn no_stream() -> BoxStream {
    Box::new(tokio::io::join(tokio::io::empty(), tokio::io::sink()))
}

impl Negotiation<'_> {
    /// Under `--tls require`, before STARTTLS: every option but STARTTLS
    /// and ABORT is refused.
    fn must_upgrade(&self) -> bool {
        !self.secure && self.tls.is_some_and(|t| t.mode == tls::Mode::Require)
    }

    async fn run(&mut self) -> Result<Outcome, HandshakeError> {
        let mut out = Vec::with_capacity(proto::GREETING_LEN);
        proto::encode_greeting(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES, &mut out);
        self.s.write_all(&out).await?;
        self.s.flush().await?;
        let cflags = self.s.read_u32().await?;
        if cflags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
            return Err(HandshakeError::ClientFlags(cflags));
        }
        self.no_zeroes = cflags & proto::FLAG_C_NO_ZEROES != 0;
        for _ in 0..MAX_OPTIONS {
            let mut h = [0u8; proto::OPTION_HEADER_LEN];
            match self.s.read_exact(&mut h).await {
                Err(e) if self.refused_plain && e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(HandshakeError::TlsRequired)
                }
                r => r?,
            };
            let opt = proto::decode_option_header(&h)?;
            let mut payload = vec![0u8; opt.len as usize];
            self.s.read_exact(&mut payload).await?;
            tracing::trace!(
                option = proto::option_name(opt.option),
                len = opt.len,
                "option"
            );
            if opt.option == proto::OPT_STARTTLS {
                self.starttls(&payload).await?;
                continue;
            }
            if self.must_upgrade() && opt.option != proto::OPT_ABORT {
                if opt.option == proto::OPT_EXPORT_NAME {
                    // It cannot be refused: the spec says to close.
                    return Err(HandshakeError::TlsRequired);
                }
                self.refused_plain = true;
                self.reply(
                    opt.option,
                    proto::REP_ERR_TLS_REQD,
                    b"TLS required: send NBD_OPT_STARTTLS first",
                )
                .await?;
                continue;
            }
            let chosen = match opt.option {
                proto::OPT_EXPORT_NAME => return self.export_name(&payload).await,
                proto::OPT_ABORT => {
                    // The client may already have closed; ignore errors.
                    let _ = self.reply(proto::OPT_ABORT, proto::REP_ACK, &[]).await;
                    if self.refused_plain {
                        return Err(HandshakeError::TlsRequired);
                    }
                    return Ok(Outcome::Closed);
                }
                proto::OPT_LIST => self.list(&payload).await?,
                proto::OPT_STRUCTURED_REPLY => self.structured_reply(&payload).await?,
                proto::OPT_INFO | proto::OPT_GO => self.info_or_go(opt.option, &payload).await?,
                proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                    self.meta_context(opt.option, &payload).await?;
                    None
                }
                other => {
                    self.reply(other, proto::REP_ERR_UNSUP, b"option not supported")
                        .await?;
                    None
                }
            };
            if let Some((name, export, backing)) = chosen {
                return Ok(self.transmission(&name, export, backing));
            }
        }
        Err(HandshakeError::TooManyOptions)
    }

    /// STARTTLS: acknowledged and the stream upgraded when this server has
    /// TLS and the session is still plain (the spec's FORCEDTLS and
    /// SELECTIVETLS rules), refused otherwise.
    async fn starttls(&mut self, payload: &[u8]) -> Result<(), HandshakeError> {
        let Some(tls) = self.tls else {
            self.reply(
                proto::OPT_STARTTLS,
                proto::REP_ERR_UNSUP,
                b"TLS is not enabled on this server",
            )
            .await?;
            return Ok(());
        };
        if self.secure || !payload.is_empty() {
            let why: &[u8] = if self.secure {
                b"TLS is already running"
            } else {
                b"STARTTLS takes no data"
            };
            self.reply(proto::OPT_STARTTLS, proto::REP_ERR_INVALID, why)
                .await?;
            return Ok(());
        }
        self.reply(proto::OPT_STARTTLS, proto::REP_ACK, &[]).await?;
        let plain = std::mem::replace(&mut self.s, no_stream());
        let upgraded = tls.accept(plain).await;
        crate::metrics::tls_handshake("export", upgraded.is_ok());
        self.s = upgraded.map_err(HandshakeError::Tls)?;
        self.secure = true;
        self.refused_plain = false;
        // Nothing said in plain text carries over into the TLS session.
        self.structured = false;
        self.meta_for = None;
        Ok(())
    }

    async fn reply(&mut self, option: u32, reply: u32, payload: &[u8]) -> std::io::Result<()> {
        let mut out = Vec::with_capacity(proto::OPTION_REPLY_HEADER_LEN + payload.len());
        proto::encode_option_reply(option, reply, payload, &mut out);
        self.s.write_all(&out).await?;
        self.s.flush().await
    }

    async fn export_name(&mut self, payload: &[u8]) -> Result<Outcome, HandshakeError> {
        let name = String::from_utf8_lossy(payload).into_owned();
        let Some((export, backing)) = self.select(&name) else {
            // The spec leaves the server no way to refuse but closing.
            return Err(HandshakeError::UnknownExport(name));
        };
        let mut out = Vec::with_capacity(134);
        proto::encode_export_name_reply(
            export.size_of(&backing),
            Export::tflags(),
            self.no_zeroes,
            &mut out,
        );
        self.s.write_all(&out).await?;
        self.s.flush().await?;
        Ok(self.transmission(&name, export, backing))
    }

    /// The export `name` picks; a name that matches none is logged with
    /// the names there are, so an operator's typo shows where to look.
    fn select(&self, name: &str) -> Option<(Arc<Export>, Backing)> {
        let found = self.exports.select(name);
        // A missing side export (no profile yet) is routine for children;
        // and a client cycling through names gets one line a second.
        if found.is_none() && !name.starts_with("herd-") {
            if unknown_name_logged_now() {
                tracing::info!(asked = %name, images = ?self.exports.names(), "client asked for an export that does not exist");
            } else {
                tracing::debug!(asked = %name, "client asked for an export that does not exist");
            }
        }
        found
    }

    fn transmission(&self, name: &str, export: Arc<Export>, backing: Backing) -> Outcome {
        Outcome::Transmission {
            structured: self.structured,
            allocation: (self.structured && self.meta_for.as_deref() == Some(name))
                .then_some(ALLOCATION_ID),
            export,
            backing,
            secure: self.secure,
        }
    }

    /// LIST_META_CONTEXT and SET_META_CONTEXT. herd knows one context,
    /// `base:allocation`; unknown queries are ignored, as the spec says,
    /// so a client asking only for others gets no context and carries on.
    async fn meta_context(&mut self, option: u32, payload: &[u8]) -> Result<(), HandshakeError> {
        let set = option == proto::OPT_SET_META_CONTEXT;
        if set {
            // A SET replaces the selection even when it fails.
            self.meta_for = None;
        }
        if set && !self.structured {
            self.reply(
                option,
                proto::REP_ERR_INVALID,
                b"SET_META_CONTEXT needs structured replies first",
            )
            .await?;
            return Ok(());
        }
        let Ok(req) = proto::decode_meta_context_request(payload) else {
            self.reply(
                option,
                proto::REP_ERR_INVALID,
                b"malformed meta context request",
            )
            .await?;
            return Ok(());
        };
        if self.select(&req.export).is_none() {
            let msg = format!("no export named `{}`", req.export);
            self.reply(option, proto::REP_ERR_UNKNOWN, msg.as_bytes())
                .await?;
            return Ok(());
        }
        let wanted = if set {
            req.queries
                .iter()
                .any(|q| q == proto::CONTEXT_BASE_ALLOCATION)
        } else {
            // LIST: no query means "all"; `base:` is the namespace wildcard.
            req.queries.is_empty()
                || req
                    .queries
                    .iter()
                    .any(|q| q == "base:" || q == proto::CONTEXT_BASE_ALLOCATION)
        };
        if wanted {
            // LIST replies carry id 0, which clients disregard.
            let id = if set { ALLOCATION_ID } else { 0 };
            let rep = proto::encode_meta_context_reply(id, proto::CONTEXT_BASE_ALLOCATION);
            self.reply(option, proto::REP_META_CONTEXT, &rep).await?;
            if set {
                self.meta_for = Some(req.export);
            }
        } else {
            tracing::debug!(queries = ?req.queries, "no metadata context matched");
        }
        self.reply(option, proto::REP_ACK, &[]).await?;
        Ok(())
    }

    async fn list(
        &mut self,
        payload: &[u8],
    ) -> Result<Option<(String, Arc<Export>, Backing)>, HandshakeError> {
        if !payload.is_empty() {
            self.reply(
                proto::OPT_LIST,
                proto::REP_ERR_INVALID,
                b"LIST takes no data",
            )
            .await?;
            return Ok(None);
        }
        for (name, description) in self.exports.listing() {
            let entry = proto::encode_list_entry(&name, &description);
            self.reply(proto::OPT_LIST, proto::REP_SERVER, &entry)
                .await?;
        }
        self.reply(proto::OPT_LIST, proto::REP_ACK, &[]).await?;
        Ok(None)
    }

    async fn structured_reply(
        &mut self,
        payload: &[u8],
    ) -> Result<Option<(String, Arc<Export>, Backing)>, HandshakeError> {
        if payload.is_empty() {
            self.structured = true;
            self.reply(proto::OPT_STRUCTURED_REPLY, proto::REP_ACK, &[])
                .await?;
        } else {
            self.reply(
                proto::OPT_STRUCTURED_REPLY,
                proto::REP_ERR_INVALID,
                b"STRUCTURED_REPLY takes no data",
            )
            .await?;
        }
        Ok(None)
    }

    async fn info_or_go(
        &mut self,
        option: u32,
        payload: &[u8],
    ) -> Result<Option<(String, Arc<Export>, Backing)>, HandshakeError> {
        let Ok(req) = proto::decode_info_request(payload) else {
            self.reply(option, proto::REP_ERR_INVALID, b"malformed INFO/GO request")
                .await?;
            return Ok(None);
        };
        let Some((export, backing)) = self.select(&req.name) else {
            let msg = format!("no export named `{}`", req.name);
            self.reply(option, proto::REP_ERR_UNKNOWN, msg.as_bytes())
                .await?;
            return Ok(None);
        };
        let size = export.size_of(&backing);
        self.reply(
            option,
            proto::REP_INFO,
            &proto::encode_info_export(size, Export::tflags()),
        )
        .await?;
        // Always sent: clients that honour it never send oversized requests.
        self.reply(
            option,
            proto::REP_INFO,
            &proto::encode_info_block_size(1, 4096, proto::MAX_REQUEST),
        )
        .await?;
        for info in &req.infos {
            let (kind, text) = match *info {
                proto::INFO_NAME => (proto::INFO_NAME, export.name.clone()),
                proto::INFO_DESCRIPTION => (proto::INFO_DESCRIPTION, export.describe()),
                _ => continue,
            };
            let mut p = kind.to_be_bytes().to_vec();
            p.extend_from_slice(text.as_bytes());
            self.reply(option, proto::REP_INFO, &p).await?;
        }
        self.reply(option, proto::REP_ACK, &[]).await?;
        Ok((option == proto::OPT_GO).then_some((req.name, export, backing)))
    }
}
