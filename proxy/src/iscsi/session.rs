//! A logged-in iSCSI session (one connection, ErrorRecoveryLevel 0) in the
//! full-feature phase.
//!
//! ```text
//!  command() ─ CmdSN window (ExpCmdSN..=MaxCmdSN) ─ writer ──▶ target
//!                                                   reader ◀── Data-In (by offset),
//!                                                              SCSI Response, NOP-In,
//!                                                              Async, Reject
//! ```
//!
//! The socket is driven by a ring the session owns (`io::ring_stream`, the
//! default) or by tokio's epoll reactor (`net_io = "epoll"`); received bytes
//! go through the streaming PDU parser (`stream.rs`) either way. Many
//! commands are in flight at once; each waits on a oneshot keyed by its
//! Initiator Task Tag. When the connection drops, every pending command
//! fails with `Fault::Lost` and the caller (the upstream) logs in again and
//! reissues it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use std::os::fd::AsRawFd;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};

use crate::io::lowat::RecvLowat;
use crate::io::ring_stream::{self, Driven, NetIo, RingRx, RingTx, DIRECT_MIN};
use crate::io::spin::{Side, Spin};

use super::login::Params;
use super::pdu::{self, ScsiCmd, Sn, TargetPdu};
use super::scsi::{self, Sense};
use super::stream::{Event, PduStream, StreamError};
use crate::io::IoBuf;

/// Result of one SCSI command.
#[derive(Debug)]
pub struct Completion {
    pub status: u8,
    pub sense: Option<Sense>,
    pub data: IoBuf,
    pub residual: u32,
}

/// Why a command did not complete.
#[derive(Debug)]
pub enum Fault {
    /// The connection is gone; the command may be reissued elsewhere.
    Lost,
    /// The target rejected the PDU (reason code).
    Rejected(u8),
    /// The target answered with an iSCSI response code other than 0.
    Response(u8),
}

/// Bytes asked of each receive.
const RECV_SIZE: usize = 512 * 1024;

struct Pending {
    /// Filled in order (DataPDUInOrder): `..received` is the target's.
    buf: IoBuf,
    received: usize,
    tx: oneshot::Sender<Result<Completion, Fault>>,
}

struct State {
    cmd_sn: u32,
    exp_stat_sn: u32,
    max_cmd_sn: u32,
    next_itt: u32,
    pending: HashMap<u32, Pending>,
}

enum Tx {
    Epoll(OwnedWriteHalf),
    Ring(RingTx),
}

/// The receive side: the socket's reader, its QD1 spin (if on), whether
/// large payloads are arriving (read straight into place) and the bytes
/// the socket waits for before it wakes the reader.
struct Rx {
    io: RxIo,
    spin: Option<Spin>,
    direct: bool,
    lowat: RecvLowat,
}

enum RxIo {
    /// The spin peeks at the socket.
    Epoll(OwnedReadHalf),
    /// The spin looks for completions (`RingRx::arrived`).
    Ring(RingRx),
}

impl RxIo {
    /// Reads what has arrived into `dst`, waiting for some; 0 when the
    /// connection is over.
    async fn read(&mut self, dst: &mut [u8]) -> usize {
        match self {
            Self::Epoll(r) => r.read(dst).await.unwrap_or(0),
            Self::Ring(r) => r.recv_into(dst).await.unwrap_or(0),
        }
    }

    /// As `read`, into `dst` and then `tail`, in one receive. A read short
    /// of both drained the socket: the next one waits for more first,
    /// instead of trying a receive that finds nothing.
    async fn read_then(&mut self, dst: &mut [u8], tail: &mut [u8]) -> usize {
        let r = match self {
            Self::Epoll(r) => r,
            Self::Ring(r) => return r.recv_into_then(dst, tail).await.unwrap_or(0),
        };
        let want = dst.len() + tail.len();
        let fd = r.as_ref().as_raw_fd();
        loop {
            if r.readable().await.is_err() {
                return 0;
            }
            let mut short = None;
            // tokio clears readiness when the closure says WouldBlock, and
            // keeps what arrived since: so a short read reports it too.
            let got = r.as_ref().try_io(tokio::io::Interest::READABLE, || {
                let n = ring_stream::recv_now(fd, dst, tail)?;
                if n > 0 && n < want {
                    short = Some(n);
                    return Err(std::io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            });
            if let Some(n) = short {
                return n;
            }
            match got {
                Ok(n) => return n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => return 0,
            }
        }
    }
}

impl Rx {
    /// Feeds whatever arrives next to `parser` and acts on what it yields;
    /// `None` when the connection is over (EOF, error, bad PDU), else how
    /// many commands completed. `completed` is how many the previous pump
    /// completed: one, leaving none in flight, means queue depth 1, the
    /// case the spin is for.
    ///
    /// While large payloads arrive, both paths read exactly up to the next
    /// payload and the payload straight into its command's buffer; a ring
    /// then leaves its multishot receive stopped (`RingRx::recv_into`).
    async fn pump(
        &mut self,
        scratch: &mut Vec<u8>,
        parser: &mut PduStream,
        session: &std::sync::Weak<Session>,
        completed: u32,
    ) -> Option<u32> {
        if let Some(s) = self.spin.as_mut() {
            let idle = spun_for(session, completed);
            match &mut self.io {
                RxIo::Epoll(_) => s.wait(idle).await,
                RxIo::Ring(r) => s.wait_until(idle, || r.arrived()).await,
            };
        }
        if let Some((itt, at, left)) = parser.payload_wanted() {
            // Judged by the whole payload: the tail a short read left of a
            // large one still goes in place, not into scratch with the
            // PDUs after it (a tenth of the CPU at 1M QD8, on both paths).
            self.direct = parser.payload_len().unwrap_or(left) >= DIRECT_MIN;
            if self.direct {
                let placed = read_direct(
                    &mut self.io,
                    &mut self.lowat,
                    parser,
                    session,
                    itt,
                    at,
                    left,
                )
                .await;
                if let Some(placed) = placed {
                    return placed;
                }
            }
        }
        scratch.clear();
        if self.lowat.get() > 1 {
            self.lowat.at_most(certain(session));
        }
        match (parser.until_payload(), &mut self.io) {
            // Large payloads are coming: read up to the next one.
            (Some(want), io) if self.direct && want > 0 => {
                scratch.resize(want, 0);
                let n = io.read(scratch).await;
                if n == 0 {
                    return None;
                }
                scratch.truncate(n);
                consume(parser, scratch, session).await
            }
            (_, RxIo::Epoll(r)) => {
                // read_buf appends into spare capacity: no zero-filling.
                scratch.reserve(RECV_SIZE);
                if r.read_buf(scratch).await.unwrap_or(0) == 0 {
                    return None;
                }
                consume(parser, scratch, session).await
            }
            (_, RxIo::Ring(r)) => match r.recv().await {
                Ok(Some(chunk)) => consume(parser, &chunk, session).await,
                _ => None,
            },
        }
    }
}

/// What a spin is told was handled since its last wait: the commands
/// completed, if they left none in flight (queue depth 1, the case it is
/// for), else none. With others in flight their answers are on the way,
/// and a spin would take CPU from the target when it shares the machine.
fn spun_for(session: &std::sync::Weak<Session>, completed: u32) -> u32 {
    let idle = session
        .upgrade()
        .is_some_and(|s| s.lock().pending.is_empty());
    if idle {
        completed
    } else {
        0
    }
}

/// Bytes sure to arrive whatever the target answers: every command in
/// flight (and ping) will get at least one BHS, one of them maybe a PDU
/// already begun.
fn certain(session: &std::sync::Weak<Session>) -> usize {
    let pending = session.upgrade().map_or(0, |s| s.lock().pending.len());
    match pending {
        0 => 0,
        n => 1 + (n - 1) * pdu::BHS_LEN,
    }
}

/// Reads what has arrived of Data-In `itt`'s payload (`left` bytes from
/// buffer offset `at`) from the socket straight into its command's buffer.
/// `None` when the command cannot take it there (unknown, or not next in
/// order): the caller reads into scratch and `consume` decides. Otherwise
/// what `pump` returns.
async fn read_direct(
    r: &mut RxIo,
    lowat: &mut RecvLowat,
    parser: &mut PduStream,
    session: &std::sync::Weak<Session>,
    itt: u32,
    at: usize,
    left: usize,
) -> Option<Option<u32>> {
    // The buffer is taken out for the read: no lock, and no strong
    // reference that would keep a dropped session's socket open, is held
    // across it.
    let Some(s) = session.upgrade() else {
        return Some(None);
    };
    let (mut buf, others) = {
        let mut st = s.lock();
        let others = st.pending.len() > 1;
        let p = st.pending.get_mut(&itt)?;
        if p.received != at || at + left > p.buf.len() {
            return None;
        }
        (std::mem::replace(&mut p.buf, IoBuf::scratch(0)), others)
    };
    drop(s);
    // The header after the payload comes in the same receive, if it is
    // there: one receive per PDU where it took two (and a third that
    // found nothing before each wait).
    let mut tail = [0u8; TAIL_MAX];
    let after = parser.after_payload().min(TAIL_MAX);
    // Wake once the payload is whole, and the header after it if another
    // command will answer: not on each segment of it.
    lowat.wait_for(left + if others { after } else { 0 });
    let got = r
        .read_then(&mut buf[at..at + left], &mut tail[..after])
        .await;
    if got == 0 {
        return Some(None);
    }
    let n = got.min(left);
    parser.data_received(&buf[at..at + n]);
    {
        let Some(s) = session.upgrade() else {
            return Some(None);
        };
        let mut st = s.lock();
        // Gone if the session was killed meanwhile: its caller has its
        // answer (Lost), and the buffer is dropped.
        if let Some(p) = st.pending.get_mut(&itt) {
            p.buf = buf;
            p.received = at + n;
        }
    }
    // The PDU, if its payload is now whole, and what the tail brought.
    Some(consume(parser, &tail[..got - n], session).await)
}

/// The most a direct read takes after a payload (`PduStream::after_payload`:
/// padding, data digest, the next BHS and its header digest).
const TAIL_MAX: usize = 3 + 4 + pdu::BHS_LEN + 4;

/// Acts on every event `input` completes: Data-In payload is copied
/// straight into its command's buffer. Returns how many commands it
/// completed, `None` when the connection must end.
async fn consume(
    parser: &mut PduStream,
    mut input: &[u8],
    session: &std::sync::Weak<Session>,
) -> Option<u32> {
    let mut completed = 0;
    loop {
        let event = match parser.next(&mut input) {
            Ok(Some(e)) => e,
            Ok(None) => return Some(completed),
            Err(StreamError::Digest { header, data }) => {
                // ERL 0: a digest error ends the connection; the commands
                // are reissued on a new one.
                tracing::warn!(
                    header,
                    data,
                    "iSCSI digest mismatch; dropping the connection"
                );
                crate::metrics::iscsi_digest_error();
                return None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "iSCSI target sent a bad PDU; dropping the connection");
                return None;
            }
        };
        let s = session.upgrade()?;
        match event {
            Event::Data { itt, offset, bytes } => {
                let mut st = s.lock();
                if let Some(p) = st.pending.get_mut(&itt) {
                    // Bytes past what was asked for (overflow) are dropped.
                    if offset < p.buf.len() {
                        if offset != p.received {
                            // Buffers are not zeroed first: a gap would
                            // hand out stale bytes.
                            tracing::warn!(
                                itt,
                                offset,
                                expected = p.received,
                                "iSCSI target sent Data-In out of order (DataPDUInOrder=Yes); dropping the connection"
                            );
                            return None;
                        }
                        let end = (offset + bytes.len()).min(p.buf.len());
                        p.buf[offset..end].copy_from_slice(&bytes[..end - offset]);
                        p.received = end;
                    }
                }
            }
            Event::Pdu { pdu, payload } => {
                if matches!(
                    pdu,
                    TargetPdu::ScsiResp { .. }
                        | TargetPdu::DataIn {
                            has_status: true,
                            ..
                        }
                ) {
                    completed += 1;
                }
                if !handle(&s, pdu, &payload).await {
                    return None;
                }
            }
        }
    }
}

pub struct Session {
    /// Raw fd for shutdown(2); valid while `writer` (which owns it) lives.
    fd: std::os::fd::RawFd,
    /// The send side; its lock keeps PDUs on the wire in CmdSN order.
    writer: tokio::sync::Mutex<Tx>,
    state: Mutex<State>,
    window: Notify,
    dead: AtomicBool,
    pub params: Params,
    pub lun: u16,
    reader: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// `herd_iscsi_commands_total`, resolved once (a lookup per command
    /// otherwise).
    commands: metrics::Counter,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.shutdown();
        if let Ok(mut r) = self.reader.lock() {
            if let Some(h) = r.take() {
                h.abort();
            }
        }
    }
}

/// Serial number arithmetic (RFC 1982, 32 bits): a <= b.
fn sn_lte(a: u32, b: u32) -> bool {
    a == b || (a < b && b - a < 1 << 31) || (a > b && a - b > 1 << 31)
}

impl Session {
    /// Starts the full-feature phase on a logged-in connection.
    ///
    /// # Errors
    /// If the socket cannot be handed over to io_uring.
    pub fn start(
        stream: TcpStream,
        params: Params,
        lun: u16,
        io: NetIo,
        spin: std::time::Duration,
    ) -> std::io::Result<Arc<Self>> {
        let fd = stream.as_raw_fd();
        let (tx, rx, spin) = match ring_stream::drive(stream.into_std()?, io, "iscsi")? {
            Driven::Tokio(stream) => {
                // The spin only peeks, through a dup of its own.
                let spin = Spin::for_socket(&stream, spin, Side::Iscsi)?;
                let (r, w) = stream.into_split();
                (Tx::Epoll(w), RxIo::Epoll(r), spin)
            }
            Driven::Ring(w, r) => (Tx::Ring(w), RxIo::Ring(r), Spin::probed(spin, Side::Iscsi)),
        };
        let rx = Rx {
            io: rx,
            spin,
            direct: false,
            lowat: RecvLowat::new(fd, "iscsi"),
        };
        let s = Arc::new(Self {
            fd,
            writer: tokio::sync::Mutex::new(tx),
            state: Mutex::new(State {
                cmd_sn: params.cmd_sn,
                exp_stat_sn: params.exp_stat_sn,
                max_cmd_sn: params.max_cmd_sn,
                next_itt: 1,
                pending: HashMap::new(),
            }),
            window: Notify::new(),
            dead: AtomicBool::new(false),
            params,
            lun,
            reader: Mutex::new(None),
            commands: crate::metrics::iscsi_commands(),
        });
        let h = tokio::spawn(reader_loop(
            Arc::downgrade(&s),
            rx,
            params.header_digest,
            params.data_digest,
        ));
        if let Ok(mut g) = s.reader.lock() {
            *g = Some(h);
        }
        Ok(s)
    }

    /// Wakes a receive blocked in the kernel so the reader can end.
    fn shutdown(&self) {
        // The socket stays open (`writer` keeps it) as long as `self` lives.
        let _ = nix::sys::socket::shutdown(self.fd, nix::sys::socket::Shutdown::Both);
    }

    /// Sends one PDU (digests added) on the locked send side; `large`:
    /// its answer is a payload read in place (`DIRECT_MIN` or more).
    async fn send(&self, w: &mut Tx, mut pdu: Vec<u8>, large: bool) -> bool {
        pdu::add_digests(&mut pdu, self.params.header_digest, self.params.data_digest);
        match w {
            Tx::Epoll(w) => w.write_all(&pdu).await.is_ok(),
            // Sent at once, not through the ring (`RingTx::send_now`),
            // when alone in flight, or when its answer is large: a ring
            // send's completion wakes the reader for nothing, and large
            // answers arrive too far apart for sends to batch behind it.
            Tx::Ring(w) if large || self.lock().pending.len() <= 1 => w.send_now(pdu).is_ok(),
            Tx::Ring(w) => w.send(pdu).is_ok(),
        }
    }

    #[must_use]
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Fails everything pending; later commands fail at once.
    pub fn kill(&self) {
        let drained: Vec<Pending> = {
            let mut st = self.lock();
            self.dead.store(true, Ordering::SeqCst);
            st.pending.drain().map(|(_, p)| p).collect()
        };
        self.shutdown();
        for p in drained {
            let _ = p.tx.send(Err(Fault::Lost));
        }
        self.window.notify_waiters();
    }

    /// Issues a command reading up to `read_len` bytes and waits for it.
    pub async fn command(&self, cdb: [u8; 16], read_len: usize) -> Result<Completion, Fault> {
        let (tx, rx) = oneshot::channel();
        let mut tx = Some(tx);
        let mut out = Vec::with_capacity(pdu::BHS_LEN);
        loop {
            let notified = self.window.notified();
            // The writer lock orders PDUs on the wire by CmdSN.
            let mut w = self.writer.lock().await;
            let issued = self.try_issue(&cdb, read_len, &mut out, &mut tx)?;
            if issued {
                if !self
                    .send(&mut w, std::mem::take(&mut out), read_len >= DIRECT_MIN)
                    .await
                {
                    drop(w);
                    self.kill();
                }
                break;
            }
            drop(w);
            // Window closed: wait for a response to open it.
            notified.await;
        }
        rx.await.unwrap_or(Err(Fault::Lost))
    }

    /// Takes a CmdSN if the window is open and registers the command;
    /// returns whether it did (the PDU is then in `out`).
    fn try_issue(
        &self,
        cdb: &[u8; 16],
        read_len: usize,
        out: &mut Vec<u8>,
        tx: &mut Option<oneshot::Sender<Result<Completion, Fault>>>,
    ) -> Result<bool, Fault> {
        let mut st = self.lock();
        if self.is_dead() {
            return Err(Fault::Lost);
        }
        if !sn_lte(st.cmd_sn, st.max_cmd_sn) {
            return Ok(false);
        }
        let Some(tx) = tx.take() else {
            return Err(Fault::Lost);
        };
        let itt = st.next_itt;
        st.next_itt = st.next_itt.wrapping_add(1).max(1) % pdu::RESERVED_TAG;
        let cmd = ScsiCmd {
            lun: self.lun,
            itt,
            read: read_len > 0,
            expected_len: u32::try_from(read_len).unwrap_or(u32::MAX),
            cmd_sn: st.cmd_sn,
            exp_stat_sn: st.exp_stat_sn,
            cdb: *cdb,
        };
        st.cmd_sn = st.cmd_sn.wrapping_add(1);
        pdu::encode_scsi_cmd(&cmd, out);
        st.pending.insert(
            itt,
            Pending {
                buf: IoBuf::scratch(read_len),
                received: 0,
                tx,
            },
        );
        crate::metrics::iscsi_command(&self.commands, st.pending.len());
        Ok(true)
    }

    /// Pings the target (NOP-Out with a task tag, RFC 7143 §11.18) and
    /// waits for its NOP-In: proof that the target still processes PDUs.
    ///
    /// # Errors
    /// `Lost` when the session is dead or dies meanwhile.
    pub async fn ping(&self) -> Result<(), Fault> {
        let (tx, rx) = oneshot::channel();
        let mut out = Vec::new();
        {
            let mut st = self.lock();
            if self.is_dead() {
                return Err(Fault::Lost);
            }
            let itt = st.next_itt;
            st.next_itt = st.next_itt.wrapping_add(1).max(1) % pdu::RESERVED_TAG;
            // Immediate: it carries CmdSN but does not take one.
            pdu::encode_nop_out(itt, pdu::RESERVED_TAG, st.cmd_sn, st.exp_stat_sn, &mut out);
            st.pending.insert(
                itt,
                Pending {
                    buf: IoBuf::zeroed(0),
                    received: 0,
                    tx,
                },
            );
        }
        let mut w = self.writer.lock().await;
        if !self.send(&mut w, out, false).await {
            drop(w);
            self.kill();
        }
        rx.await.unwrap_or(Err(Fault::Lost)).map(drop)
    }

    /// Sends a NOP-Out answering a target ping.
    async fn pong(&self, ttt: u32) {
        let mut out = Vec::new();
        {
            let st = self.lock();
            pdu::encode_nop_out(pdu::RESERVED_TAG, ttt, st.cmd_sn, st.exp_stat_sn, &mut out);
        }
        let mut w = self.writer.lock().await;
        if !self.send(&mut w, out, false).await {
            drop(w);
            self.kill();
        }
    }

    /// Logs out politely (best effort).
    pub async fn logout(&self) {
        let mut out = Vec::new();
        {
            let mut st = self.lock();
            let itt = st.next_itt;
            st.next_itt = st.next_itt.wrapping_add(1).max(1);
            pdu::encode_logout(itt, 0, st.cmd_sn, st.exp_stat_sn, &mut out);
        }
        let mut w = self.writer.lock().await;
        let _ = self.send(&mut w, out, false).await;
    }

    fn update_sn(&self, sn: Sn, has_stat: bool) {
        let mut st = self.lock();
        if has_stat && sn_lte(st.exp_stat_sn, sn.stat_sn) {
            st.exp_stat_sn = sn.stat_sn.wrapping_add(1);
        }
        // MaxCmdSN only moves forward, and only when the pair is sane.
        if sn_lte(sn.exp_cmd_sn, sn.max_cmd_sn.wrapping_add(1))
            && sn_lte(st.max_cmd_sn, sn.max_cmd_sn)
        {
            st.max_cmd_sn = sn.max_cmd_sn;
        }
        drop(st);
        self.window.notify_waiters();
    }

    fn complete(&self, itt: u32, f: impl FnOnce(IoBuf, usize) -> Result<Completion, Fault>) {
        let p = self.lock().pending.remove(&itt);
        if let Some(Pending { buf, received, tx }) = p {
            let _ = tx.send(f(buf, received));
        }
    }
}

fn finish(
    mut data: IoBuf,
    received: usize,
    status: u8,
    sense: Option<Sense>,
    residual: u32,
) -> Result<Completion, Fault> {
    data.truncate(received);
    Ok(Completion {
        status,
        sense,
        data,
        residual,
    })
}

async fn reader_loop(
    session: std::sync::Weak<Session>,
    mut rx: Rx,
    header_digest: bool,
    data_digest: bool,
) {
    // One receive may bring many PDUs, or part of one: the parser takes
    // whatever arrives.
    let mut parser = PduStream::new(header_digest, data_digest);
    let mut scratch: Vec<u8> = Vec::new();
    let mut completed = 0;
    while let Some(n) = rx
        .pump(&mut scratch, &mut parser, &session, completed)
        .await
    {
        completed = n;
    }
    if let Some(s) = session.upgrade() {
        s.kill();
    }
}

/// Acts on one target PDU; `false` ends the connection.
async fn handle(s: &Session, pdu: TargetPdu, payload: &[u8]) -> bool {
    match pdu {
        // Its payload was placed as it streamed in (`consume`).
        TargetPdu::DataIn {
            has_status,
            status,
            itt,
            sn,
            residual,
            ..
        } => {
            if has_status {
                s.update_sn(sn, true);
                s.complete(itt, |b, n| finish(b, n, status, None, residual));
            } else {
                s.update_sn(sn, false);
            }
        }
        TargetPdu::ScsiResp {
            response,
            status,
            itt,
            sn,
            residual,
            ..
        } => {
            s.update_sn(sn, true);
            let sense = (payload.len() > 2)
                .then(|| scsi::parse_sense(&payload[2..]))
                .flatten();
            if response == 0 {
                s.complete(itt, |b, n| finish(b, n, status, sense, residual));
            } else {
                s.complete(itt, |_, _| Err(Fault::Response(response)));
            }
        }
        TargetPdu::NopIn { itt, ttt, sn } => {
            s.update_sn(sn, true);
            if itt != pdu::RESERVED_TAG {
                // The answer to our ping.
                s.complete(itt, |b, _| {
                    Ok(Completion {
                        status: scsi::GOOD,
                        sense: None,
                        data: b,
                        residual: 0,
                    })
                });
            } else if ttt != pdu::RESERVED_TAG {
                s.pong(ttt).await;
            }
        }
        TargetPdu::Async { event, sn, param3 } => {
            s.update_sn(sn, true);
            match event {
                // The target asks us to log out within param3 seconds:
                // stop issuing here; callers log in anew.
                1 => {
                    tracing::info!(
                        within_s = param3,
                        "iSCSI target requests logout; reconnecting"
                    );
                    s.logout().await;
                    s.kill();
                }
                2 | 3 => {
                    tracing::info!(event, "iSCSI target drops the connection");
                    return false;
                }
                _ => tracing::debug!(event, "iSCSI async event ignored"),
            }
        }
        TargetPdu::Reject { reason, sn } => {
            s.update_sn(sn, true);
            tracing::warn!(reason, "iSCSI target rejected a PDU");
            if let Some(itt) = pdu::rejected_itt(payload) {
                s.complete(itt, |_, _| Err(Fault::Rejected(reason)));
            }
        }
        TargetPdu::LogoutResp { .. } => return false,
        other => {
            tracing::warn!(pdu = ?other, "unexpected iSCSI PDU in full-feature phase; dropping the connection");
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::sn_lte;

    #[test]
    fn serial_number_arithmetic_wraps() {
        assert!(sn_lte(1, 1));
        assert!(sn_lte(1, 2));
        assert!(!sn_lte(2, 1));
        assert!(sn_lte(u32::MAX, 0), "0 follows u32::MAX");
        assert!(!sn_lte(0, u32::MAX));
    }
}
