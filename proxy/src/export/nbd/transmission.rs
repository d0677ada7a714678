//! Transmission phase: decode, validate, execute, encode.
//!
//! Validation happens once, here, before anything executes: read-only
//! commands, range, maximum size. A bad magic or short read closes the
//! connection; an invalid request gets an error reply (after draining any
//! write payload) and the connection stays in sync.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};

use super::handshake::{self, HandshakeError, Outcome};
use super::limits::Hold;
use super::zerocopy::{Sent, Stream, ZeroCopy};
use super::{errno_for, Export};
use crate::cache::Data;
use crate::io::spin::{Side, Spin};
use crate::io::IoBuf;
use crate::metrics as m;
use crate::nbd::proto::{self, Request};
use crate::net::BoxStream;

/// Requests one connection may have executing at once; bounds memory at
/// `MAX_IN_FLIGHT * 32 MiB` in the worst case.
const MAX_IN_FLIGHT: usize = 64;

/// Receive buffer: room for hundreds of request headers.
const READ_BUF: usize = 16 << 10;

/// A reply on its way to the writer, with the memory it holds.
struct Queued {
    reply: Reply,
    _hold: Option<Hold>,
}

impl From<Reply> for Queued {
    fn from(reply: Reply) -> Self {
        Self { reply, _hold: None }
    }
}

enum Reply {
    Ok {
        handle: u64,
        offset: u64,
        data: Option<Payload>,
    },
    Err {
        handle: u64,
        errno: u32,
    },
    /// BLOCK_STATUS: (length, flags) descriptors for context `id`.
    Status {
        handle: u64,
        id: u32,
        descs: Vec<(u32, u32)>,
    },
}

/// A READ reply's data: bytes in memory, or a resident range of the cache
/// data file that the writer `sendfile`s.
enum Payload {
    Buf(Data),
    /// A range over several fetched runs, sent piece after piece
    /// (`ChunkCache::read_pieces`): no copy into one buffer.
    Parts(Vec<Data>),
    File {
        offset: u64,
        len: usize,
        /// Counts this hit among the connection's queued large hits
        /// until sent.
        _stream: Stream,
    },
    /// A side export's bytes (profile, manifest): counted apart from the
    /// image's, so "bytes served" stays the image payload.
    Side(Data),
    /// A structured READ over chunks of zeros: `spans` (offset, length,
    /// zeros?) cover the request; zero spans leave as OFFSET_HOLE chunks,
    /// the others as OFFSET_DATA from `data` (the whole range; `None` when
    /// every span is zeros).
    Sparse {
        data: Option<Data>,
        spans: Vec<(u64, u64, bool)>,
    },
}

impl Payload {
    fn len(&self) -> usize {
        match self {
            Self::Buf(b) | Self::Side(b) => b.len(),
            Self::Parts(p) => p.iter().map(|d| d.len()).sum(),
            Self::File { len, .. } => *len,
            Self::Sparse { spans, .. } => spans
                .iter()
                .filter(|s| !s.2)
                .map(|s| usize::try_from(s.1).unwrap_or(0))
                .sum(),
        }
    }
}

/// Serves one connection from greeting to disconnect.
///
/// # Errors
/// Handshake failures and transport errors; either way the connection ends.
pub async fn run(
    stream: BoxStream,
    dup: Option<OwnedFd>,
    exports: &super::Exports,
    access: &super::Access,
) -> Result<(), HandshakeError> {
    let (stream, outcome) = handshake::negotiate(stream, exports, access.tls.as_ref()).await?;
    let limits = access.gate.limits;
    let budget = access.gate.budget();
    let (structured, allocation, export, backing, dup) = match outcome {
        Outcome::Transmission {
            structured,
            allocation,
            export,
            backing,
            secure,
        } => {
            // Bytes sent around TLS would reach the client unencrypted.
            let dup = if secure { None } else { dup };
            (structured, allocation, export, backing, dup)
        }
        Outcome::Closed => return Ok(()),
    };
    let export = &export;
    let _client = matches!(backing, super::Backing::Image).then(|| export.client());
    let (r, w) = tokio::io::split(stream);
    // Buffered: one recv takes every request already queued, and a short
    // recv lets the runtime mark the socket not-ready, so waiting for the
    // next request costs no EAGAIN recv (measured: one syscall of five per
    // 4 KiB request at QD1).
    let mut r = tokio::io::BufReader::with_capacity(READ_BUF, r);
    let (tx, rx) = mpsc::channel::<Queued>(MAX_IN_FLIGHT * 2);
    // One dup serves the zero-copy sender and the spin (no fd more per
    // connection); TLS connections have none and are not spun for.
    let dup = dup.map(Arc::new);
    let mut spin = dup
        .clone()
        .and_then(|fd| Spin::new(fd, access.spin, Side::Export));
    let zero_copy = dup.and_then(|fd| match ZeroCopy::new(fd, access.hit_send) {
        Ok(z) => Some(z),
        Err(e) => {
            tracing::debug!(error = %e, "no zero-copy replies on this connection");
            None
        }
    });
    let streams = zero_copy.as_ref().map(ZeroCopy::streams);
    let writer = tokio::spawn(write_replies(
        ReplyWriter {
            w,
            pending: Vec::with_capacity(16 << 10),
            zero_copy,
            file: Arc::clone(export.cache.data_file()),
            cache: Arc::clone(&export.cache),
        },
        rx,
        structured,
        limits.write_stall,
    ));
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let size = export.size_of(&backing);
    // A side export (profile, manifest): bytes in memory, no cache.
    let side = backing.side_bytes();
    let mut hdr = [0u8; proto::REQUEST_LEN];
    // End of this connection's previous READ: a READ starting there is
    // sequential and earns read-ahead when it misses.
    let mut last_end = u64::MAX;
    // A profile connection ends when the profile changes, and one to the
    // latest manifest when a newer version is published: children hold
    // them, and their closing tells them to read the new one.
    type Ends = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
    let mut superseded: Option<Ends> = match &backing {
        super::Backing::Profile(ours) => {
            let ours = Arc::clone(ours);
            let mut rx = export.profile.clone();
            Some(Box::pin(async move {
                let _ = rx
                    .wait_for(|p| !p.as_ref().is_some_and(|p| Arc::ptr_eq(p, &ours)))
                    .await;
            }))
        }
        super::Backing::Manifest(_, true) => {
            let export = Arc::clone(export);
            Some(Box::pin(async move { export.superseded().await }))
        }
        _ => None,
    };
    // Requests read since the connection last waited for one.
    let mut batch = 0u32;
    let result = loop {
        if let Some(s) = spin.as_mut() {
            if r.buffer().is_empty() {
                s.wait(batch).await;
                batch = 0;
            }
        }
        batch = batch.saturating_add(1);
        let next = async {
            match limits.idle_timeout {
                Some(t) => tokio::time::timeout(t, r.read_exact(&mut hdr))
                    .await
                    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into())),
                None => r.read_exact(&mut hdr).await,
            }
        };
        let got = tokio::select! {
            got = next => got,
            // The writer gave up (its client stopped reading): end here too.
            () = tx.closed() => break Ok(()),
            () = async { if let Some(s) = superseded.as_mut() { s.await } else { std::future::pending().await } } => {
                tracing::debug!("profile or version changed; closing a connection to the old one");
                break Ok(());
            }
        };
        if let Err(e) = got {
            // A client that just closes without DISC is normal.
            break if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Ok(())
            } else if e.kind() == std::io::ErrorKind::TimedOut {
                tracing::info!(
                    idle_s = limits.idle_timeout.map_or(0, |t| t.as_secs()),
                    "closing an idle connection (--idle-timeout)"
                );
                Ok(())
            } else {
                Err(e.into())
            };
        }
        let req = match proto::decode_request(&hdr) {
            Ok(r) => r,
            Err(e) => break Err(HandshakeError::Proto(e)),
        };
        m::request();
        tracing::trace!(
            cmd = proto::command_name(req.command),
            offset = req.offset,
            len = req.length,
            "request"
        );
        let err = |errno| Reply::Err {
            handle: req.handle,
            errno,
        };
        match req.command {
            proto::CMD_READ | proto::CMD_CACHE => {
                if let Some(errno) = invalid_range(&req, size) {
                    if tx.send(Queued::from(err(errno))).await.is_err() {
                        break Ok(());
                    }
                    continue;
                }
                if let Some(bytes) = &side {
                    let hold = if req.command == proto::CMD_READ {
                        match budget.hold(u64::from(req.length)).await {
                            Some(h) => Some(h),
                            None => break Ok(()),
                        }
                    } else {
                        None
                    };
                    // (The range was validated against the side export's length.)
                    let at = usize::try_from(req.offset).unwrap_or(usize::MAX);
                    let data = (req.command == proto::CMD_READ)
                        .then(|| bytes.get(at..at.saturating_add(req.length as usize)))
                        .flatten()
                        .map(|b| Payload::Side(Data::Owned(IoBuf::from_slice(b))));
                    let ok = Reply::Ok {
                        handle: req.handle,
                        offset: req.offset,
                        data,
                    };
                    if tx
                        .send(Queued {
                            reply: ok,
                            _hold: hold,
                        })
                        .await
                        .is_err()
                    {
                        break Ok(());
                    }
                    continue;
                }
                let sequential = req.offset == last_end;
                // Replies that carry bytes in memory hold them against the
                // connection's budget until written (sendfile'd ones don't).
                let mut hold = None;
                if req.command == proto::CMD_READ {
                    if let Some(rec) = &export.recorder {
                        rec.note(req.offset, u64::from(req.length));
                    }
                    last_end = req.offset + u64::from(req.length);
                    let len = req.length as usize;
                    // Hits are answered from here, without a task: large
                    // resident ones by sendfile, others by a NOWAIT read.
                    let hit = if let Some(streams) = streams.as_ref().filter(|_| {
                        len >= ZERO_COPY_MIN && export.cache.try_hit_resident(req.offset, len)
                    }) {
                        Some(Payload::File {
                            offset: req.offset,
                            len,
                            _stream: streams.enter(),
                        })
                    } else {
                        let Some(h) = budget.hold(u64::from(req.length)).await else {
                            break Ok(());
                        };
                        hold = Some(h);
                        export
                            .cache
                            .try_read_cached(req.offset, len)
                            .map(|b| Payload::Buf(Data::Owned(b)))
                    };
                    if let Some(data) = hit {
                        let ok = Reply::Ok {
                            handle: req.handle,
                            offset: req.offset,
                            data: Some(data),
                        };
                        if tx
                            .send(Queued {
                                reply: ok,
                                _hold: hold,
                            })
                            .await
                            .is_err()
                        {
                            break Ok(());
                        }
                        continue;
                    }
                }
                if sequential && req.command == proto::CMD_READ && export.read_ahead > 0 {
                    export.cache.read_ahead(last_end, export.read_ahead);
                }
                let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                    break Ok(());
                };
                let (export, tx) = (Arc::clone(export), tx.clone());
                tokio::spawn(async move {
                    let reply = execute(&export, &req, structured).await;
                    let _ = tx.send(Queued { reply, _hold: hold }).await;
                    drop(permit);
                });
            }
            proto::CMD_WRITE => {
                // Drain the payload so the stream stays in sync, then refuse.
                let mut sink = tokio::io::sink();
                let mut payload = (&mut r).take(u64::from(req.length));
                match tokio::io::copy(&mut payload, &mut sink).await {
                    Ok(n) if n == u64::from(req.length) => {}
                    Ok(_) => break Ok(()),
                    Err(e) => break Err(e.into()),
                }
                if tx.send(Queued::from(err(proto::EPERM))).await.is_err() {
                    break Ok(());
                }
            }
            proto::CMD_TRIM | proto::CMD_WRITE_ZEROES => {
                if tx.send(Queued::from(err(proto::EPERM))).await.is_err() {
                    break Ok(());
                }
            }
            proto::CMD_FLUSH => {
                let ok = Reply::Ok {
                    handle: req.handle,
                    offset: req.offset,
                    data: None,
                };
                if tx.send(Queued::from(ok)).await.is_err() {
                    break Ok(());
                }
            }
            proto::CMD_DISC => break Ok(()),
            proto::CMD_BLOCK_STATUS => {
                // Needs `base:allocation` selected for this export (which
                // implies structured replies); else EINVAL, as the spec says.
                let reply = match allocation {
                    Some(id) if req.length > 0 && invalid_status_range(&req, size).is_none() => {
                        Reply::Status {
                            handle: req.handle,
                            id,
                            descs: block_status(export, side.is_some(), &req),
                        }
                    }
                    _ => err(proto::EINVAL),
                };
                if tx.send(Queued::from(reply)).await.is_err() {
                    break Ok(());
                }
            }
            _ => {
                if tx.send(Queued::from(err(proto::EINVAL))).await.is_err() {
                    break Ok(());
                }
            }
        }
    };
    // Replies still in flight are delivered before the socket closes.
    drop(tx);
    let _ = writer.await;
    result
}

/// Most descriptors in one BLOCK_STATUS reply (512 KiB); the client asks
/// again from where it ends.
const MAX_DESCRIPTORS: usize = 64 << 10;

/// The spec bounds BLOCK_STATUS by the image, not by the READ size cap.
fn invalid_status_range(req: &Request, size: u64) -> Option<u32> {
    match req.offset.checked_add(u64::from(req.length)) {
        Some(end) if end <= size => None,
        _ => Some(proto::EINVAL),
    }
}

/// `base:allocation` of the request's range, from the manifest: what is
/// a hole and what is zeros is known at every node without asking the
/// parent. A side export is all data.
fn block_status(export: &Export, side: bool, req: &Request) -> Vec<(u32, u32)> {
    if side {
        return vec![(req.length, 0)];
    }
    let max = if req.flags & proto::CMD_FLAG_REQ_ONE != 0 {
        1
    } else {
        MAX_DESCRIPTORS
    };
    export
        .cache
        .manifest()
        .block_status(req.offset, u64::from(req.length), max)
}

fn invalid_range(req: &Request, size: u64) -> Option<u32> {
    if req.length > proto::MAX_REQUEST {
        return Some(proto::EINVAL);
    }
    match req.offset.checked_add(u64::from(req.length)) {
        Some(end) if end <= size => None,
        _ => Some(proto::EINVAL),
    }
}

async fn execute(export: &Arc<Export>, req: &Request, structured: bool) -> Reply {
    let cache = &export.cache;
    let res = if req.command == proto::CMD_READ {
        // Structured replies send chunks of zeros as holes: no bytes.
        let spans = if structured && req.flags & proto::CMD_FLAG_DF == 0 {
            cache.zero_spans(req.offset, u64::from(req.length))
        } else {
            Vec::new()
        };
        if spans.iter().any(|s| s.2) {
            let data = if spans.iter().all(|s| s.2) {
                Ok(None)
            } else {
                cache.read(req.offset, req.length as usize).await.map(Some)
            };
            data.map(|data| Some(Payload::Sparse { data, spans }))
        } else {
            cache
                .read_pieces(req.offset, req.length as usize)
                .await
                .map(|mut p| match p.len() {
                    1 => p.pop().map(Payload::Buf),
                    _ => Some(Payload::Parts(p)),
                })
        }
    } else {
        cache
            .ensure(req.offset, u64::from(req.length))
            .await
            .map(|()| None)
    };
    match res {
        Ok(data) => Reply::Ok {
            handle: req.handle,
            offset: req.offset,
            data,
        },
        Err(e) => {
            tracing::warn!(offset = req.offset, len = req.length, error = %crate::error_chain(&e), "request failed");
            Reply::Err {
                handle: req.handle,
                errno: errno_for(&e),
            }
        }
    }
}

/// Headers and small payloads are gathered in `pending` and leave in one
/// write per batch; a large payload leaves with whatever is pending in one
/// `writev`, so a 1 MiB reply is one syscall and one wake-up for the client,
/// not a lone 16-byte header first.
struct ReplyWriter {
    w: tokio::io::WriteHalf<BoxStream>,
    pending: Vec<u8>,
    zero_copy: Option<ZeroCopy>,
    /// The cache data file, source of `Payload::File`.
    file: Arc<File>,
    /// The image's cache, whose series count what is sent.
    cache: Arc<crate::cache::ChunkCache>,
}

/// Cached READs at least this large are `sendfile`d (when resident).
const ZERO_COPY_MIN: usize = 64 << 10;
/// Payloads at least this large are not copied into `pending`.
const LARGE: usize = 128 << 10;
/// Every connection has one: 64 connections at 256 KiB held 16 MiB
/// (`cargo xtask bench rss`).
const PENDING_CAP: usize = 64 << 10;

impl ReplyWriter {
    async fn push(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.pending.len() + bytes.len() > PENDING_CAP {
            self.flush().await?;
        }
        self.pending.extend_from_slice(bytes);
        Ok(())
    }

    /// Queues `data`, or sends it at once with what is pending if large
    /// (no copy into the pending buffer).
    async fn send_bytes(&mut self, data: &[u8]) -> std::io::Result<()> {
        if data.len() >= LARGE {
            self.send_with(data).await
        } else {
            self.push(data).await
        }
    }

    /// Sends `pending` and `data` together.
    async fn send_with(&mut self, data: &[u8]) -> std::io::Result<()> {
        let total = self.pending.len() + data.len();
        let mut done = 0;
        while done < total {
            let p = self.pending.len();
            let bufs = if done < p {
                [
                    std::io::IoSlice::new(&self.pending[done..]),
                    std::io::IoSlice::new(data),
                ]
            } else {
                [
                    std::io::IoSlice::new(&data[done - p..]),
                    std::io::IoSlice::new(&[]),
                ]
            };
            let n = self.w.write_vectored(&bufs).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            done += n;
        }
        self.pending.clear();
        Ok(())
    }

    /// Sends `pending` and `len` bytes of the cache file at `offset`:
    /// `sendfile`d, or read piece by piece from the page cache and sent
    /// with what is pending (`zerocopy`, `hit_send`).
    async fn send_file(&mut self, offset: u64, len: usize) -> std::io::Result<Sent> {
        // Not reached: File payloads are only made with zero-copy on.
        let z = self
            .zero_copy
            .as_mut()
            .ok_or(std::io::ErrorKind::Unsupported)?;
        if !z.copies(len) {
            z.sendfile(&self.pending, &self.file, offset, len).await?;
            self.pending.clear();
            return Ok(Sent::Spliced);
        }
        let mut buf = z.take_buf(len);
        let (mut at, mut left) = (offset, len);
        while left > 0 {
            let n = left.min(buf.len());
            // Resident (the reader checked): no wait on the disk.
            std::os::unix::fs::FileExt::read_exact_at(&*self.file, &mut buf[..n], at)?;
            self.send_with(&buf[..n]).await?;
            at += n as u64;
            left -= n;
        }
        if let Some(z) = self.zero_copy.as_mut() {
            z.keep_buf(buf);
        }
        Ok(Sent::Copied)
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.pending.is_empty() {
            self.w.write_all(&self.pending).await?;
            self.pending.clear();
        }
        self.w.flush().await
    }
}

/// The connection's only writer: replies leave in completion order, and
/// those already queued share one flush. (Replying inline from the reader
/// when idle saved nothing at QD1 and cost 20 % at QD32: measured.)
async fn write_replies(
    mut w: ReplyWriter,
    mut rx: mpsc::Receiver<Queued>,
    structured: bool,
    stall: std::time::Duration,
) -> std::io::Result<()> {
    // A client that stops reading leaves a write pending: past `stall` the
    // connection ends, giving its budget back (dropping `rx` drops every
    // queued reply and unblocks the reader).
    let stuck = || {
        tracing::info!(
            stall_s = stall.as_secs(),
            "closing a connection whose client stopped reading its replies"
        );
        std::io::Error::from(std::io::ErrorKind::TimedOut)
    };
    // The deadline is per reply (and per flush), not per batch: a client
    // that keeps reading on a slow link keeps the queue full, so a batch
    // can last as long as the whole transfer (a 336 MiB nbdcopy at
    // 10 Mbit/s was cut at 60 s when the deadline covered the batch).
    while let Some(q) = rx.recv().await {
        tokio::time::timeout(stall, encode_reply(&mut w, q.reply, structured))
            .await
            .map_err(|_| stuck())??;
        // Batch replies that are already queued into one flush.
        while let Ok(more) = rx.try_recv() {
            tokio::time::timeout(stall, encode_reply(&mut w, more.reply, structured))
                .await
                .map_err(|_| stuck())??;
        }
        tokio::time::timeout(stall, w.flush())
            .await
            .map_err(|_| stuck())??;
    }
    w.flush().await?;
    w.w.shutdown().await
}

async fn encode_reply(w: &mut ReplyWriter, reply: Reply, structured: bool) -> std::io::Result<()> {
    let mut hdr = Vec::with_capacity(64);
    match reply {
        Reply::Ok {
            handle,
            offset,
            data: Some(Payload::Sparse { data, spans }),
        } => {
            let n = spans.len();
            let mut sent = 0u64;
            for (i, (at, len, zero)) in spans.into_iter().enumerate() {
                let flags = if i + 1 == n {
                    proto::REPLY_FLAG_DONE
                } else {
                    0
                };
                hdr.clear();
                let len32 = u32::try_from(len).unwrap_or(u32::MAX);
                if zero {
                    proto::encode_offset_hole(flags, handle, at, len32, &mut hdr);
                    w.push(&hdr).await?;
                    continue;
                }
                let from = usize::try_from(at - offset).unwrap_or(usize::MAX);
                let Some(bytes) = data
                    .as_deref()
                    .and_then(|d| d.get(from..from.saturating_add(len32 as usize)))
                else {
                    return Err(std::io::ErrorKind::InvalidData.into());
                };
                proto::encode_structured_header(
                    flags,
                    proto::REPLY_TYPE_OFFSET_DATA,
                    handle,
                    len32.saturating_add(8),
                    &mut hdr,
                );
                hdr.extend_from_slice(&at.to_be_bytes());
                w.push(&hdr).await?;
                w.send_bytes(bytes).await?;
                sent += len;
            }
            if sent > 0 {
                w.cache.metrics().served(sent);
            }
        }
        Reply::Status { handle, id, descs } => {
            proto::encode_block_status(handle, id, &descs, &mut hdr);
            w.push(&hdr).await?;
        }
        Reply::Ok {
            handle,
            offset,
            data,
        } => {
            let len = data.as_ref().map_or(0, |d| d.len());
            if !structured {
                proto::encode_simple_reply(0, handle, &mut hdr);
            } else if len > 0 {
                let plen = u32::try_from(8 + len).unwrap_or(u32::MAX);
                proto::encode_structured_header(
                    proto::REPLY_FLAG_DONE,
                    proto::REPLY_TYPE_OFFSET_DATA,
                    handle,
                    plen,
                    &mut hdr,
                );
                hdr.extend_from_slice(&offset.to_be_bytes());
            } else {
                proto::encode_structured_header(
                    proto::REPLY_FLAG_DONE,
                    proto::REPLY_TYPE_NONE,
                    handle,
                    0,
                    &mut hdr,
                );
            }
            w.push(&hdr).await?;
            let side = matches!(data, Some(Payload::Side(_)));
            match data {
                Some(Payload::Buf(d) | Payload::Side(d)) => w.send_bytes(&d).await?,
                Some(Payload::Parts(parts)) => {
                    for d in parts {
                        w.send_bytes(&d).await?;
                    }
                }
                Some(Payload::File { offset, len, .. }) => match w.send_file(offset, len).await? {
                    Sent::Spliced => w.cache.metrics().served_zero_copy(len as u64),
                    Sent::Copied => w.cache.metrics().served_hit_copy(len as u64),
                },
                // Encoded above.
                Some(Payload::Sparse { .. }) | None => {}
            }
            if len > 0 && side {
                m::served_side(len as u64);
            } else if len > 0 {
                w.cache.metrics().served(len as u64);
            }
        }
        Reply::Err { handle, errno } => {
            if structured {
                proto::encode_structured_error(handle, errno, "", &mut hdr);
            } else {
                proto::encode_simple_reply(errno, handle, &mut hdr);
            }
            w.push(&hdr).await?;
        }
    }
    Ok(())
}
