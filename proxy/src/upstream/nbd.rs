//! NBD client upstream: reads from a parent herd, qemu-nbd or nbdkit.
//!
//! ```text
//!  NbdUpstream ── pool of N slots ── Conn ── writer (mutex) ──▶ parent
//!                                       └── reader task ◀── simple replies,
//!                                            routed by handle to oneshots
//! ```
//!
//! Fixed newstyle handshake with NBD_OPT_GO. Many requests are in flight per
//! connection (replies may come back in any order). A lost connection fails
//! its in-flight requests, which are retried once on a fresh connection; a
//! slot reconnects lazily, so reads recover as soon as the parent returns.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::oneshot;

use super::{ReadFuture, Upstream, UpstreamError, UpstreamResult, UpstreamUrl};
use crate::io::lowat::RecvLowat;
use crate::io::ring_stream::{self, Driven, RingRx, RingTx, DIRECT_MIN};
use crate::io::IoBuf;
use crate::nbd::proto::{self, Info, InfoRequest, Request};
use crate::net::BoxStream;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Extra pool connections give up sooner: a parent that caps its clients
/// accepts the TCP connection but never greets.
const EXTRA_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the parent told us in the handshake.
#[derive(Debug, Clone, Copy)]
pub struct ExportInfo {
    pub size: u64,
    pub tflags: u16,
    pub max_block: u32,
}

enum Fault {
    Errno(u32),
    Lost,
}

struct Pending {
    len: usize,
    tx: oneshot::Sender<Result<IoBuf, Fault>>,
}

/// The send side of a parent connection.
enum Writer {
    Tokio(tokio::sync::Mutex<WriteHalf<BoxStream>>),
    Ring(RingTx),
}

struct Conn {
    writer: Writer,
    pending: Mutex<HashMap<u64, Pending>>,
    dead: AtomicBool,
    next_handle: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Conn {
    fn kill(&self) {
        let drained: Vec<Pending> = {
            let Ok(mut p) = self.pending.lock() else {
                return;
            };
            self.dead.store(true, Ordering::SeqCst);
            p.drain().map(|(_, v)| v).collect()
        };
        for p in drained {
            let _ = p.tx.send(Err(Fault::Lost));
        }
    }

    async fn read(&self, offset: u64, len: u32) -> Result<IoBuf, Fault> {
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        // Alone on the connection: sent at once, not through the ring.
        let alone = {
            let Ok(mut p) = self.pending.lock() else {
                return Err(Fault::Lost);
            };
            if self.dead.load(Ordering::SeqCst) {
                return Err(Fault::Lost);
            }
            let alone = p.is_empty();
            p.insert(
                handle,
                Pending {
                    len: len as usize,
                    tx,
                },
            );
            alone
        };
        let mut req = Vec::with_capacity(proto::REQUEST_LEN);
        proto::encode_request(
            &Request {
                flags: 0,
                command: proto::CMD_READ,
                handle,
                offset,
                length: len,
            },
            &mut req,
        );
        match &self.writer {
            Writer::Tokio(w) => {
                let mut w = w.lock().await;
                if w.write_all(&req).await.is_err() || w.flush().await.is_err() {
                    drop(w);
                    self.kill();
                }
            }
            Writer::Ring(w) => {
                // At once when alone, or when the answer is read in place:
                // a ring send's completion would wake the reader for
                // nothing, and large answers come too far apart to batch.
                let now = alone || len as usize >= DIRECT_MIN;
                let sent = if now { w.send_now(req) } else { w.send(req) };
                if sent.is_err() {
                    self.kill();
                }
            }
        }
        rx.await.unwrap_or(Err(Fault::Lost))
    }
}

/// What a simple reply header answers.
enum Answer {
    /// This request, with this NBD error (0: the payload follows).
    To(Pending, u32),
    /// The connection was dropped meanwhile: nobody is waiting.
    Gone,
    /// A malformed header or an unknown handle: the connection is unusable.
    Broken,
}

/// Decodes a reply header and takes the request it answers off the
/// connection's pending list (both readers, epoll and ring, share this).
fn answer(conn: &std::sync::Weak<Conn>, hdr: &[u8; proto::SIMPLE_REPLY_LEN]) -> Answer {
    let Ok(proto::ReplyHeader::Simple { error, handle }) = proto::decode_reply_header(hdr) else {
        // We never ask for structured replies: anything else is a
        // protocol violation, so the connection is unusable.
        tracing::warn!("parent sent a malformed reply header; dropping the connection");
        return Answer::Broken;
    };
    let Some(c) = conn.upgrade() else {
        return Answer::Gone;
    };
    let pending = c.pending.lock().ok().and_then(|mut p| p.remove(&handle));
    match pending {
        Some(p) => Answer::To(p, error),
        None => {
            tracing::warn!(
                handle,
                "parent replied to an unknown handle; dropping the connection"
            );
            Answer::Broken
        }
    }
}

async fn reader_loop(conn: std::sync::Weak<Conn>, mut r: ReadHalf<BoxStream>) {
    let mut hdr = [0u8; proto::SIMPLE_REPLY_LEN];
    loop {
        if r.read_exact(&mut hdr).await.is_err() {
            break;
        }
        let (p, error) = match answer(&conn, &hdr) {
            Answer::To(p, error) => (p, error),
            Answer::Gone => return,
            Answer::Broken => break,
        };
        if error != 0 {
            let _ = p.tx.send(Err(Fault::Errno(error)));
            continue;
        }
        // Filled by read_exact or discarded.
        let mut buf = IoBuf::scratch(p.len);
        if r.read_exact(&mut buf).await.is_err() {
            let _ = p.tx.send(Err(Fault::Lost));
            break;
        }
        let _ = p.tx.send(Ok(buf));
    }
    if let Some(c) = conn.upgrade() {
        c.kill();
    }
}

/// What the ring reader does after taking bytes.
enum Flow {
    /// Go on.
    On,
    /// Nobody waits any more: stop without killing the connection.
    Gone,
    /// The connection is unusable.
    Broken,
}

/// The ring reader's place in the stream of replies.
#[derive(Default)]
struct Replies {
    hdr: [u8; proto::SIMPLE_REPLY_LEN],
    /// Header bytes in.
    have: usize,
    /// The reply whose payload is arriving: who waits, the buffer, bytes in.
    body: Option<(Pending, IoBuf, usize)>,
    /// That payload is large: it (and what follows) is received in place.
    direct: bool,
}

impl Replies {
    /// Bytes sure to arrive, whatever the parent answers, while no payload
    /// is arriving: the rest of a header begun, and a header for each of
    /// the `pending` requests it does not answer.
    fn certain(&self, pending: usize) -> usize {
        let len = proto::SIMPLE_REPLY_LEN;
        if self.have > 0 {
            len - self.have + len * pending.saturating_sub(1)
        } else {
            len * pending
        }
    }

    /// Where the next bytes of the stream go.
    fn dest(&mut self) -> &mut [u8] {
        match self.body.as_mut() {
            Some((_, buf, got)) => &mut buf[*got..],
            None => &mut self.hdr[self.have..],
        }
    }

    /// Accounts for `n` bytes written into `dest`: a whole payload goes to
    /// its caller; a whole header answers an error or empty reply, or
    /// starts the payload.
    fn took(&mut self, conn: &std::sync::Weak<Conn>, n: usize) -> Flow {
        if let Some((_, buf, got)) = self.body.as_mut() {
            *got += n;
            if *got == buf.len() {
                if let Some((p, buf, _)) = self.body.take() {
                    let _ = p.tx.send(Ok(buf));
                }
            }
            return Flow::On;
        }
        self.have += n;
        if self.have < self.hdr.len() {
            return Flow::On;
        }
        self.have = 0;
        match answer(conn, &self.hdr) {
            Answer::To(p, error) if error != 0 => {
                let _ = p.tx.send(Err(Fault::Errno(error)));
            }
            Answer::To(p, _) if p.len == 0 => {
                let _ = p.tx.send(Ok(IoBuf::scratch(0)));
            }
            // Every byte is written through `dest` before it is handed out.
            Answer::To(p, _) => {
                self.direct = p.len >= DIRECT_MIN;
                let buf = IoBuf::scratch(p.len);
                self.body = Some((p, buf, 0));
            }
            Answer::Gone => return Flow::Gone,
            Answer::Broken => return Flow::Broken,
        }
        Flow::On
    }
}

/// `reader_loop` for a connection on its own ring: replies are parsed as
/// they stream in, small payloads copied once from the provided buffer they
/// arrived in to the buffer the caller gets; while large ones arrive, each
/// header and payload is received straight into place instead.
async fn ring_reader_loop(conn: std::sync::Weak<Conn>, mut rx: RingRx) {
    let mut st = Replies::default();
    let mut lowat = RecvLowat::new(rx.as_raw_fd(), "nbd");
    'outer: loop {
        let pending = || {
            conn.upgrade()
                .map_or(0, |c| c.pending.lock().map_or(0, |p| p.len()))
        };
        if st.direct && st.body.is_some() {
            // With other requests in flight, wake once the payload and the
            // next header are in: not on each segment. Alone, the payload
            // is taken as it arrives, so its copy overlaps the transfer
            // (waiting for all of it cost a quarter of the relay's 1M QD1).
            match pending() {
                0 => lowat.at_most(0),
                _ => lowat.wait_for(st.dest().len() + proto::SIMPLE_REPLY_LEN),
            }
        } else if lowat.get() > 1 {
            lowat.at_most(st.certain(pending()));
        }
        if st.direct {
            let n = match rx.recv_into(st.dest()).await {
                Ok(n) if n > 0 => n,
                _ => break,
            };
            match st.took(&conn, n) {
                Flow::On => continue,
                Flow::Gone => return,
                Flow::Broken => break,
            }
        }
        let Ok(Some(chunk)) = rx.recv().await else {
            break;
        };
        let mut data: &[u8] = &chunk;
        while !data.is_empty() {
            let dest = st.dest();
            let n = dest.len().min(data.len());
            dest[..n].copy_from_slice(&data[..n]);
            data = &data[n..];
            match st.took(&conn, n) {
                Flow::On => {}
                Flow::Gone => return,
                Flow::Broken => break 'outer,
            }
        }
    }
    if let Some((p, _, _)) = st.body {
        let _ = p.tx.send(Err(Fault::Lost));
    }
    if let Some(c) = conn.upgrade() {
        c.kill();
    }
}

/// Moves a plain TCP parent connection onto a ring of its own when
/// `net_io` asks for it; TLS and Unix-socket links stay on tokio.
fn drive(s: BoxStream) -> std::io::Result<Result<(RingTx, RingRx), BoxStream>> {
    if !s.as_any().is::<TcpStream>() {
        return Ok(Err(s));
    }
    let Ok(tcp) = s.into_any().downcast::<TcpStream>() else {
        return Err(std::io::Error::other("stream type changed under us"));
    };
    match ring_stream::drive(tcp.into_std()?, ring_stream::configured(), "nbd")? {
        Driven::Ring(tx, rx) => Ok(Ok((tx, rx))),
        Driven::Tokio(tcp) => Ok(Err(Box::new(tcp))),
    }
}

pub(super) async fn connect_stream(url: &UpstreamUrl) -> std::io::Result<BoxStream> {
    match url {
        UpstreamUrl::NbdTcp { host, port, .. } => {
            let s = TcpStream::connect((host.as_str(), *port)).await?;
            s.set_nodelay(true)?;
            // A parent whose host vanishes (power, link) never sends a RST:
            // keepalive finds an idle connection dead in ~5 s, and the user
            // timeout one with unacknowledged requests in 10 s. Failover
            // reacts sooner (probes); this bounds what is left behind.
            let sock = socket2::SockRef::from(&s);
            sock.set_tcp_keepalive(
                &socket2::TcpKeepalive::new()
                    .with_time(Duration::from_secs(2))
                    .with_interval(Duration::from_secs(1))
                    .with_retries(3),
            )?;
            sock.set_tcp_user_timeout(Some(Duration::from_secs(10)))?;
            Ok(Box::new(s))
        }
        UpstreamUrl::NbdUnix { socket, .. } => Ok(Box::new(UnixStream::connect(socket).await?)),
        UpstreamUrl::File(_) | UpstreamUrl::Iscsi { .. } => {
            Err(std::io::Error::other("not an NBD URL"))
        }
    }
}

/// Runs the client side of the fixed newstyle handshake up to transmission.
async fn handshake(
    s: BoxStream,
    url: &UpstreamUrl,
    export: &str,
    addr: &str,
) -> UpstreamResult<(BoxStream, ExportInfo)> {
    let mut s = greet(s, url, addr).await?;
    let info = go(&mut s, export, addr).await?;
    Ok((s, info))
}

/// Connects to `url` and greets it: options may follow on the stream.
pub(super) async fn options(url: &UpstreamUrl, addr: &str) -> UpstreamResult<BoxStream> {
    let s = connect_stream(url)
        .await
        .map_err(|source| UpstreamError::Connect {
            addr: addr.to_owned(),
            source,
        })?;
    greet(s, url, addr).await
}

/// Reads the greeting, sends the client flags and, as the URL and this
/// process's `--tls` ask, upgrades to TLS: options may follow on the
/// returned stream.
pub(super) async fn greet(
    mut s: BoxStream,
    url: &UpstreamUrl,
    addr: &str,
) -> UpstreamResult<BoxStream> {
    greeting(&mut s, addr).await?;
    let (required, host) = match url {
        UpstreamUrl::NbdTcp { tls, host, .. } => (*tls, host.as_str()),
        UpstreamUrl::NbdUnix { tls, .. } => (*tls, "localhost"),
        UpstreamUrl::File(_) | UpstreamUrl::Iscsi { .. } => (false, ""),
    };
    let client = match crate::tls::client() {
        Some(c) if required || c.mode != crate::tls::Mode::Off => c,
        Some(_) | None if !required => return Ok(s),
        _ => {
            return Err(UpstreamError::Handshake {
                addr: addr.to_owned(),
                reason: crate::tls::TlsError::NoCa.to_string(),
            })
        }
    };
    let required = required || client.mode == crate::tls::Mode::Require;
    starttls(s, client, host, required, addr).await
}

/// NBD_OPT_STARTTLS, then the TLS handshake. A parent that refuses is
/// used in plain text only when TLS is not required.
async fn starttls(
    mut s: BoxStream,
    client: &crate::tls::Client,
    host: &str,
    required: bool,
    addr: &str,
) -> UpstreamResult<BoxStream> {
    let fail = |reason: String| UpstreamError::Handshake {
        addr: addr.to_owned(),
        reason,
    };
    send_option(&mut s, proto::OPT_STARTTLS, &[], addr).await?;
    let (reply, payload) = read_option_reply(&mut s, addr).await?;
    if reply != proto::REP_ACK {
        let msg = String::from_utf8_lossy(&payload);
        if required {
            send_abort(&mut s).await;
            return Err(fail(format!(
                "the parent does not offer TLS, which this link requires (STARTTLS reply {reply:#x}: {msg})"
            )));
        }
        tracing::debug!(%addr, reply, %msg, "parent refused STARTTLS; this link stays plain (--tls on)");
        return Ok(s);
    }
    let upgraded = client.connect(host, s).await;
    crate::metrics::tls_handshake("upstream", upgraded.is_ok());
    upgraded.map_err(|e| fail(format!("TLS handshake failed: {e}")))
}

/// Sends option `opt` with `payload`.
pub(super) async fn send_option(
    s: &mut BoxStream,
    opt: u32,
    payload: &[u8],
    addr: &str,
) -> UpstreamResult<()> {
    let mut out = Vec::new();
    proto::encode_option(opt, payload, &mut out);
    let sent = async {
        s.write_all(&out).await?;
        s.flush().await
    };
    sent.await.map_err(|e| UpstreamError::Handshake {
        addr: addr.to_owned(),
        reason: format!("I/O error: {e}"),
    })
}

/// Reads one option reply: its type and payload (bounded in length).
pub(super) async fn read_option_reply(
    s: &mut BoxStream,
    addr: &str,
) -> UpstreamResult<(u32, Vec<u8>)> {
    let fail = |reason: String| UpstreamError::Handshake {
        addr: addr.to_owned(),
        reason,
    };
    let io = |e: std::io::Error| fail(format!("I/O error: {e}"));
    let mut h = [0u8; proto::OPTION_REPLY_HEADER_LEN];
    s.read_exact(&mut h).await.map_err(io)?;
    let rep = proto::decode_option_reply_header(&h).map_err(|e| fail(e.to_string()))?;
    if rep.len > proto::MAX_OPTION_LEN {
        return Err(fail(format!(
            "option reply of {} bytes is too long",
            rep.len
        )));
    }
    let mut payload = vec![0u8; rep.len as usize];
    s.read_exact(&mut payload).await.map_err(io)?;
    Ok((rep.reply, payload))
}

/// The exports an NBD server lists (`NBD_OPT_LIST`), each with its
/// description: what `herd image list` shows of a running node.
///
/// # Errors
/// `Connect` or `Handshake` (a server that refuses to list, or says
/// something malformed).
pub async fn list_exports(url: &UpstreamUrl) -> UpstreamResult<Vec<(String, String)>> {
    let addr = url.to_string();
    let fail = |reason: String| UpstreamError::Handshake {
        addr: addr.clone(),
        reason,
    };
    let mut s = options(url, &addr).await?;
    send_option(&mut s, proto::OPT_LIST, &[], &addr).await?;
    let mut out = Vec::new();
    loop {
        let (reply, payload) = read_option_reply(&mut s, &addr).await?;
        match reply {
            proto::REP_ACK => break,
            proto::REP_SERVER => {
                out.push(proto::decode_list_entry(&payload).map_err(|e| fail(e.to_string()))?);
                if out.len() > MAX_LISTED {
                    return Err(fail(format!("lists more than {MAX_LISTED} exports")));
                }
            }
            other => {
                return Err(fail(format!(
                    "LIST refused ({other:#x}): {}",
                    String::from_utf8_lossy(&payload)
                )))
            }
        }
    }
    send_abort(&mut s).await;
    Ok(out)
}

/// Most exports `list_exports` takes from one server.
const MAX_LISTED: usize = 4096;

/// NBD_OPT_ABORT, best effort: the server may already have gone.
pub(super) async fn send_abort(s: &mut BoxStream) {
    let mut out = Vec::new();
    proto::encode_option(proto::OPT_ABORT, &[], &mut out);
    let _ = s.write_all(&out).await;
    let _ = s.flush().await;
}

/// Reads the greeting and sends the client flags.
async fn greeting(s: &mut BoxStream, addr: &str) -> UpstreamResult<()> {
    let fail = |reason: String| UpstreamError::Handshake {
        addr: addr.to_owned(),
        reason,
    };
    let io = |e: std::io::Error| fail(format!("I/O error: {e}"));
    let mut greet = [0u8; proto::GREETING_LEN];
    s.read_exact(&mut greet).await.map_err(io)?;
    let flags = proto::decode_greeting(&greet)
        .map_err(|e| fail(format!("not an NBD newstyle server ({e})")))?;
    if flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(fail("server does not support fixed newstyle".into()));
    }
    let mut cflags = proto::FLAG_C_FIXED_NEWSTYLE;
    if flags & proto::FLAG_NO_ZEROES != 0 {
        cflags |= proto::FLAG_C_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes()).await.map_err(io)?;
    Ok(())
}

/// NBD_OPT_GO for `export`: on success the stream is in transmission.
pub(super) async fn go(s: &mut BoxStream, export: &str, addr: &str) -> UpstreamResult<ExportInfo> {
    let fail = |reason: String| UpstreamError::Handshake {
        addr: addr.to_owned(),
        reason,
    };
    let req = InfoRequest {
        name: export.to_owned(),
        infos: vec![proto::INFO_BLOCK_SIZE],
    };
    send_option(s, proto::OPT_GO, &proto::encode_info_request(&req), addr).await?;

    let mut size = None;
    let mut tflags = 0;
    let mut max_block = proto::MAX_REQUEST;
    loop {
        let (reply, payload) = read_option_reply(s, addr).await?;
        match reply {
            proto::REP_ACK => break,
            proto::REP_INFO => {
                match proto::decode_info(&payload).map_err(|e| fail(e.to_string()))? {
                    Info::Export {
                        size: sz,
                        tflags: f,
                    } => {
                        size = Some(sz);
                        tflags = f;
                    }
                    Info::BlockSize { max, .. } => max_block = max.clamp(4096, proto::MAX_REQUEST),
                    Info::Other(_) => {}
                }
            }
            proto::REP_ERR_UNKNOWN => {
                // Leave politely, so the server does not log a dropped
                // handshake for a child that asks before it has the export.
                send_abort(s).await;
                return Err(UpstreamError::NoSuchExport {
                    addr: addr.to_owned(),
                    export: export.to_owned(),
                });
            }
            e if e & proto::REP_FLAG_ERROR != 0 => {
                let what = match e {
                    proto::REP_ERR_UNSUP => "NBD_OPT_GO not supported",
                    proto::REP_ERR_POLICY => "refused by policy",
                    _ => "error",
                };
                let msg = String::from_utf8_lossy(&payload);
                return Err(fail(format!(
                    "{what} for export `{export}` (reply {e:#x}) {msg}"
                )));
            }
            other => return Err(fail(format!("unexpected option reply {other:#x}"))),
        }
    }
    let size = size.ok_or_else(|| fail("server sent no export size".into()))?;
    Ok(ExportInfo {
        size,
        tflags,
        max_block,
    })
}

/// NBD client upstream with a small connection pool.
pub struct NbdUpstream {
    url: UpstreamUrl,
    export: String,
    info: ExportInfo,
    slots: Vec<tokio::sync::Mutex<Option<Arc<Conn>>>>,
    next: AtomicUsize,
    /// Slots in use: shrinks when the parent caps its connections.
    effective: AtomicUsize,
    /// Connections opened so far (the first included).
    opened: AtomicU64,
}

impl NbdUpstream {
    /// Connects once to learn the export's size; more connections open on
    /// demand up to `connections`.
    ///
    /// # Errors
    /// `Connect` when the parent is unreachable, `Handshake` when it is not
    /// an NBD server or lacks the export.
    pub async fn connect(url: UpstreamUrl, connections: usize) -> UpstreamResult<Self> {
        let export = match &url {
            UpstreamUrl::NbdTcp { export, .. } | UpstreamUrl::NbdUnix { export, .. } => {
                export.clone()
            }
            other @ (UpstreamUrl::File(_) | UpstreamUrl::Iscsi { .. }) => {
                return Err(UpstreamError::Open {
                    path: other.to_string(),
                    source: std::io::Error::other("not an NBD URL"),
                })
            }
        };
        let slots: Vec<_> = (0..connections.max(1))
            .map(|_| tokio::sync::Mutex::new(None))
            .collect();
        let effective = AtomicUsize::new(slots.len());
        let mut up = Self {
            url,
            export,
            info: ExportInfo {
                size: 0,
                tflags: 0,
                max_block: proto::MAX_REQUEST,
            },
            slots,
            next: AtomicUsize::new(0),
            effective,
            opened: AtomicU64::new(0),
        };
        let (conn, info) = up.open(HANDSHAKE_TIMEOUT).await?;
        up.info = info;
        *up.slots[0].get_mut() = Some(conn);
        Ok(up)
    }

    #[must_use]
    pub fn info(&self) -> ExportInfo {
        self.info
    }

    /// Connections opened so far. Above one, a connection was lost and
    /// replaced: what a client holding one connection to watch for the
    /// server ending it (a side export that changed) must notice.
    #[must_use]
    pub fn connections_opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    async fn open(&self, handshake_timeout: Duration) -> UpstreamResult<(Arc<Conn>, ExportInfo)> {
        self.opened.fetch_add(1, Ordering::Relaxed);
        let addr = self.url.to_string();
        let s = tokio::time::timeout(CONNECT_TIMEOUT, connect_stream(&self.url))
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
            .map_err(|source| UpstreamError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let (s, info) = tokio::time::timeout(
            handshake_timeout,
            handshake(s, &self.url, &self.export, &addr),
        )
        .await
        .unwrap_or_else(|_| {
            Err(UpstreamError::Handshake {
                addr: addr.clone(),
                reason: "timed out".into(),
            })
        })?;
        let io = |source| UpstreamError::Connect {
            addr: addr.clone(),
            source,
        };
        let conn = match drive(s).map_err(io)? {
            Ok((tx, rx)) => Arc::new_cyclic(|weak| Conn {
                writer: Writer::Ring(tx),
                pending: Mutex::new(HashMap::new()),
                dead: AtomicBool::new(false),
                next_handle: AtomicU64::new(1),
                reader: tokio::spawn(ring_reader_loop(weak.clone(), rx)),
            }),
            Err(s) => {
                let (r, w) = tokio::io::split(s);
                Arc::new_cyclic(|weak| Conn {
                    writer: Writer::Tokio(tokio::sync::Mutex::new(w)),
                    pending: Mutex::new(HashMap::new()),
                    dead: AtomicBool::new(false),
                    next_handle: AtomicU64::new(1),
                    reader: tokio::spawn(reader_loop(weak.clone(), r)),
                })
            }
        };
        Ok((conn, info))
    }

    async fn conn(&self) -> UpstreamResult<Arc<Conn>> {
        let n = self
            .effective
            .load(Ordering::Relaxed)
            .clamp(1, self.slots.len());
        let i = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut slot = self.slots[i].lock().await;
        if i >= self.effective.load(Ordering::Relaxed) {
            // The pool shrank while we queued for this slot.
            drop(slot);
            if let Some(live) = self.any_live(i) {
                return Ok(live);
            }
            slot = self.slots[i].lock().await;
        }
        if let Some(c) = slot.as_ref() {
            if !c.dead.load(Ordering::SeqCst) {
                return Ok(Arc::clone(c));
            }
        }
        let timeout = if self.any_live(i).is_some() {
            EXTRA_HANDSHAKE_TIMEOUT
        } else {
            HANDSHAKE_TIMEOUT
        };
        let (c, info) = match self.open(timeout).await {
            Ok(x) => x,
            Err(e) => {
                // A parent that caps its clients (qemu-nbd's default is one)
                // still serves us over the connections we already have.
                drop(slot);
                if let Some(live) = self.any_live(i) {
                    // Shrink the pool so later reads don't wait on it again.
                    let n = self
                        .effective
                        .fetch_min(i.max(1), Ordering::Relaxed)
                        .min(i.max(1));
                    tracing::info!(connections = n, error = %crate::error_chain(&e), "parent refused another connection; using fewer");
                    return Ok(live);
                }
                return Err(e);
            }
        };
        if info.size != self.info.size {
            return Err(UpstreamError::Handshake {
                addr: self.url.to_string(),
                reason: format!(
                    "export size changed from {} to {} bytes",
                    self.info.size, info.size
                ),
            });
        }
        tracing::info!(parent = %self.url, slot = i, "connected to parent");
        *slot = Some(Arc::clone(&c));
        Ok(c)
    }

    fn any_live(&self, except: usize) -> Option<Arc<Conn>> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != except)
            .find_map(|(_, s)| {
                let g = s.try_lock().ok()?;
                g.as_ref()
                    .filter(|c| !c.dead.load(Ordering::SeqCst))
                    .map(Arc::clone)
            })
    }

    async fn read_piece(&self, offset: u64, len: u32) -> UpstreamResult<IoBuf> {
        // One retry on a fresh connection hides a parent restart.
        for _ in 0..2 {
            let c = self.conn().await?;
            match c.read(offset, len).await {
                Ok(b) => return Ok(b),
                Err(Fault::Errno(errno)) => {
                    return Err(UpstreamError::Remote {
                        offset,
                        len: len as usize,
                        errno,
                    })
                }
                Err(Fault::Lost) => c.kill(),
            }
        }
        Err(UpstreamError::ConnectionLost {
            addr: self.url.to_string(),
        })
    }

    async fn read(&self, offset: u64, len: usize) -> UpstreamResult<IoBuf> {
        if offset.saturating_add(len as u64) > self.info.size {
            return Err(UpstreamError::OutOfRange {
                offset,
                len,
                size: self.info.size,
            });
        }
        let max = self.info.max_block as usize;
        if len <= max {
            return self
                .read_piece(offset, u32::try_from(len).unwrap_or(u32::MAX))
                .await;
        }
        // Every piece is copied in or the read fails.
        let mut out = IoBuf::scratch(len);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(max);
            let piece = self
                .read_piece(offset + done as u64, u32::try_from(n).unwrap_or(u32::MAX))
                .await?;
            out[done..done + n].copy_from_slice(&piece);
            done += n;
        }
        Ok(out)
    }
}

impl Upstream for NbdUpstream {
    fn size(&self) -> u64 {
        self.info.size
    }

    fn read_at(&self, offset: u64, len: usize) -> ReadFuture<'_> {
        Box::pin(self.read(offset, len))
    }

    fn describe(&self) -> String {
        self.url.to_string()
    }

    fn extents(&self) -> super::ExtentsFuture<'_> {
        Box::pin(super::nbd_map::extents(&self.url, self.info.size))
    }
}
