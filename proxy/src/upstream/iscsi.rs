//! iSCSI upstream: the root reads the golden image from a LIO/tgt LUN.
//!
//! Reads are split by the negotiated MaxBurstLength and the LUN's block
//! limits (VPD 0xB0), issued concurrently on one session, and reissued on a
//! fresh session if the connection drops, for up to `recovery` before the
//! reader sees an error. UNIT ATTENTION is retried at once; NOT READY after
//! a second.
//!
//! Each core (`crate::cores`) reads over a session of its own, logged in
//! from that core on its first read, so a miss and its answer stay on the
//! connection's thread: with one session on the control worker every
//! answer crossed to the caller's core and back (DESIGN.md, Runtime
//! model). Reads off the cores (prefetch, start-up) share the session
//! logged in first.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use super::{Extents, ExtentsFuture, ReadFuture, Upstream, UpstreamError, UpstreamResult};
use crate::io::IoBuf;
use crate::iscsi::scsi::{self, Capacity, Sense};
use crate::iscsi::session::{Completion, Fault};
use crate::iscsi::{self as is, Chap, IscsiError, LoginSpec, Portal, Session};

/// How to reach one LUN.
#[derive(Clone)]
pub struct IscsiTarget {
    pub portal: Portal,
    pub target: String,
    pub lun: u16,
    pub initiator: String,
    pub chap: Option<Chap>,
    /// How long reads wait for a lost target to come back.
    pub recovery: Duration,
    /// What drives the session's socket.
    pub net_io: crate::io::ring_stream::NetIo,
    /// Offer CRC32C header and data digests.
    pub digests: bool,
    /// How long the session polls for the answer to its one command in
    /// flight before sleeping (`io::spin`; zero: never).
    pub spin: Duration,
    /// Most sessions the cores log in (one each up to this many; core `c`
    /// uses session `c % sessions`), besides the one logged in at start-up.
    pub sessions: usize,
}

impl IscsiTarget {
    fn spec(&self) -> LoginSpec {
        LoginSpec {
            initiator: self.initiator.clone(),
            target: Some(self.target.clone()),
            chap: self.chap.clone(),
            isid: is::isid(),
            digests: self.digests,
        }
    }

    fn url(&self) -> String {
        format!("iscsi://{}/{}/{}", self.portal, self.target, self.lun)
    }
}

/// A failed command, for errors.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("SCSI status {status:#04x} with sense {sense}")]
    Check { status: u8, sense: Sense },
    #[error("SCSI status {0:#04x}")]
    Status(u8),
    #[error("target rejected the command (reason {0:#04x})")]
    Rejected(u8),
    #[error("iSCSI response {0:#04x}")]
    Response(u8),
    #[error("short transfer: {got} of {want} bytes")]
    Short { got: usize, want: usize },
}

/// How often an idle or busy session is pinged, and how long the target
/// has to answer: a target that hangs (the process stopped, its host gone
/// without a RST) is dropped in at most 4 s and the reads in flight are
/// reissued on a new login, instead of waiting for TCP to give up.
const PING_INTERVAL: Duration = Duration::from_secs(2);
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes asked of GET LBA STATUS at a time: 4095 descriptors.
const LBA_STATUS_ALLOC: u32 = 64 << 10;

/// One session's place: empty until logged in, a dead session until a
/// read logs in again.
type Slot = Arc<Mutex<Place>>;

/// How long a core whose login was refused reads through another slot's
/// session before it tries a login of its own again.
const LOGIN_RETRY: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Place {
    session: Option<Arc<Session>>,
    /// Until when this slot's reads go through another slot's session:
    /// its last login was refused while others were live (a target that
    /// caps the sessions of one initiator).
    borrowing: Option<tokio::time::Instant>,
}

impl Place {
    fn live(&self) -> Option<Arc<Session>> {
        self.session.as_ref().filter(|s| !s.is_dead()).cloned()
    }
}

/// The sessions: slot 0 for reads off the cores, then one slot per core
/// up to a most.
struct Sessions {
    slots: std::sync::Mutex<Vec<Slot>>,
    /// Slots for the cores (at least one).
    most: usize,
}

impl Sessions {
    fn new(most: usize) -> Self {
        Self {
            slots: std::sync::Mutex::default(),
            most: most.max(1),
        }
    }

    fn list(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The calling thread's slot: cores beyond the most share.
    fn here(&self) -> Slot {
        let i = crate::cores::current().map_or(0, |c| c % self.most + 1);
        let mut v = self.list();
        if v.len() <= i {
            v.resize_with(i + 1, Slot::default);
        }
        Arc::clone(&v[i])
    }

    /// A live session of another slot, for a slot that cannot log in.
    /// Slots busy logging in are skipped, not waited for.
    fn borrow(&self, from: &Slot) -> Option<Arc<Session>> {
        let slots = self.list().clone();
        slots
            .iter()
            .filter(|s| !Arc::ptr_eq(s, from))
            .find_map(|s| s.try_lock().ok()?.live())
    }
}

pub struct IscsiUpstream {
    t: IscsiTarget,
    sessions: Arc<Sessions>,
    cap: Capacity,
    max_xfer: usize,
}

fn iscsi_err(t: &IscsiTarget, source: IscsiError) -> UpstreamError {
    UpstreamError::Iscsi {
        addr: t.url(),
        source,
    }
}

impl IscsiUpstream {
    /// Logs in, waits out UNIT ATTENTION, reads capacity and block limits.
    ///
    /// # Errors
    /// Login failures (bad IQN, authentication, unreachable) or a LUN that
    /// cannot report its capacity.
    pub async fn connect(t: IscsiTarget) -> UpstreamResult<Self> {
        let session = is::connect(&t.portal, &t.spec(), t.lun, t.net_io, t.spin)
            .await
            .map_err(|e| iscsi_err(&t, e))?;
        let sessions = Sessions::new(t.sessions);
        sessions.here().lock().await.session = Some(Arc::clone(&session));
        let mut up = Self {
            t,
            sessions: Arc::new(sessions),
            cap: Capacity {
                blocks: 0,
                block_size: 512,
                thin: false,
                zeroed: false,
            },
            max_xfer: 0,
        };
        up.simple(scsi::test_unit_ready(), 0).await?;
        let cap = match up.simple(scsi::read_capacity16(), 32).await {
            Ok(c) => scsi::parse_capacity16(&c.data),
            Err(_) => None,
        };
        let cap = match cap {
            Some(c) => c,
            None => {
                let c = up.simple(scsi::read_capacity10(), 8).await?;
                scsi::parse_capacity10(&c.data).ok_or_else(|| {
                    up.scsi_err(
                        "READ CAPACITY",
                        CommandError::Short {
                            got: c.data.len(),
                            want: 8,
                        },
                    )
                })?
            }
        };
        up.cap = cap;
        let limit_blocks = match up.simple(scsi::inquiry(Some(0xb0), 64), 64).await {
            Ok(c) => scsi::parse_block_limits(&c.data).map_or(0, |(max, _)| max),
            Err(_) => 0,
        };
        let bs = cap.block_size as usize;
        let mut max = (session.params.max_burst as usize).max(bs) / bs * bs;
        if limit_blocks > 0 {
            max = max.min(limit_blocks as usize * bs);
        }
        up.max_xfer = max.clamp(bs, 16 << 20);
        tracing::info!(
            target = %up.t.target,
            lun = up.t.lun,
            bytes = cap.bytes(),
            block_size = cap.block_size,
            max_transfer = up.max_xfer,
            header_digest = session.params.header_digest,
            data_digest = session.params.data_digest,
            "iSCSI LUN ready"
        );
        up.start_pinger();
        Ok(up)
    }

    #[must_use]
    pub fn capacity(&self) -> Capacity {
        self.cap
    }

    #[must_use]
    pub fn max_transfer(&self) -> usize {
        self.max_xfer
    }

    fn scsi_err(&self, op: &'static str, source: CommandError) -> UpstreamError {
        UpstreamError::Scsi {
            addr: self.t.url(),
            op,
            source,
        }
    }

    /// Starts the NOP-Out pinger, which pings every live session at once;
    /// it stops when the upstream is dropped.
    fn start_pinger(&self) {
        let sessions = Arc::downgrade(&self.sessions);
        let target = self.t.target.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PING_INTERVAL).await;
                let Some(sessions) = sessions.upgrade() else {
                    return;
                };
                let slots = sessions.list().clone();
                drop(sessions);
                // The live sessions: the pinger never logs in itself, nor
                // waits for a slot that a login holds (nothing to ping yet).
                let live: Vec<Arc<Session>> = slots
                    .iter()
                    .filter_map(|slot| slot.try_lock().ok()?.live())
                    .collect();
                let pings = live.iter().enumerate().map(|(i, s)| {
                    (i, async move {
                        tokio::time::timeout(PING_TIMEOUT, s.ping()).await.is_err()
                    })
                });
                for (i, unanswered) in futures_join(pings.collect()).await {
                    // A lost session (Err inside) is the readers' to re-login.
                    if unanswered {
                        crate::metrics::iscsi_ping_failure();
                        tracing::warn!(%target, timeout = ?PING_TIMEOUT, "iSCSI target did not answer a NOP-Out ping; dropping the session and logging in again");
                        live[i].kill();
                    }
                }
            }
        });
    }

    /// The calling core's session, logged in (again) if it has none. A
    /// core whose login is refused while another session is live reads
    /// through that one for `LOGIN_RETRY`, then tries again: a target may
    /// cap the sessions of one initiator below `connections`.
    async fn session(&self) -> UpstreamResult<Arc<Session>> {
        let slot = self.sessions.here();
        let mut g = slot.lock().await;
        if let Some(s) = g.live() {
            return Ok(s);
        }
        let now = tokio::time::Instant::now();
        if g.borrowing.is_some_and(|until| now < until) {
            if let Some(s) = self.sessions.borrow(&slot) {
                return Ok(s);
            }
        }
        let again = g.session.is_some();
        let login = is::connect(
            &self.t.portal,
            &self.t.spec(),
            self.t.lun,
            self.t.net_io,
            self.t.spin,
        )
        .await
        .map_err(|e| iscsi_err(&self.t, e));
        let s = match login {
            Ok(s) => s,
            Err(e) => {
                let Some(other) = self.sessions.borrow(&slot) else {
                    return Err(e);
                };
                crate::metrics::iscsi_shared_login();
                if g.borrowing.is_none() {
                    tracing::warn!(
                        target = %self.t.target,
                        core = ?crate::cores::current(),
                        error = %crate::error_chain(&e),
                        retry_s = LOGIN_RETRY.as_secs(),
                        "iSCSI login refused while other sessions are live; this core's reads share one of them"
                    );
                }
                g.borrowing = Some(tokio::time::Instant::now() + LOGIN_RETRY);
                return Ok(other);
            }
        };
        if again {
            tracing::info!(target = %self.t.target, core = ?crate::cores::current(), "iSCSI session re-established");
        } else {
            tracing::info!(target = %self.t.target, core = ?crate::cores::current(), "iSCSI session established");
        }
        g.session = Some(Arc::clone(&s));
        g.borrowing = None;
        Ok(s)
    }

    /// Runs one command with retries: UNIT ATTENTION and BUSY at once (a few
    /// times), NOT READY after a pause, a lost connection by logging in
    /// again until `recovery`, counted from its first failure, runs out.
    async fn command(
        &self,
        op: &'static str,
        cdb: [u8; 16],
        len: usize,
    ) -> UpstreamResult<Completion> {
        // Read from the clock only once something failed: a command that
        // succeeds first time (nearly all) needs no deadline.
        let mut started = None;
        let mut past_deadline = || {
            let now = tokio::time::Instant::now();
            now >= *started.get_or_insert(now) + self.t.recovery
        };
        let mut quick_retries = 0;
        loop {
            let s = match self.session().await {
                Ok(s) => s,
                Err(e) => {
                    // The session worked before (connect() fails fast at
                    // startup), so any login failure now may be a target
                    // that is restarting and not configured yet ("target
                    // not found"): retry at a calm pace until `recovery`.
                    if past_deadline() {
                        return Err(e);
                    }
                    tracing::debug!(error = %crate::error_chain(&e), "iSCSI login failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            match s.command(cdb, len).await {
                Ok(c) if c.status == scsi::GOOD => return Ok(c),
                Ok(c) => {
                    let retry_now = matches!(
                        c.sense,
                        Some(Sense {
                            key: scsi::UNIT_ATTENTION,
                            ..
                        })
                    ) || c.status == scsi::BUSY
                        || c.status == scsi::TASK_SET_FULL;
                    let not_ready = matches!(
                        c.sense,
                        Some(Sense {
                            key: scsi::NOT_READY,
                            ..
                        })
                    );
                    if retry_now && quick_retries < 8 {
                        quick_retries += 1;
                        continue;
                    }
                    if not_ready && !past_deadline() {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                    let err = match c.sense {
                        Some(sense) => CommandError::Check {
                            status: c.status,
                            sense,
                        },
                        None => CommandError::Status(c.status),
                    };
                    return Err(self.scsi_err(op, err));
                }
                Err(Fault::Lost) => {
                    if past_deadline() {
                        return Err(UpstreamError::ConnectionLost { addr: self.t.url() });
                    }
                    tracing::warn!(target = %self.t.target, "iSCSI connection lost; reissuing");
                }
                Err(Fault::Rejected(r)) => return Err(self.scsi_err(op, CommandError::Rejected(r))),
                Err(Fault::Response(r)) => return Err(self.scsi_err(op, CommandError::Response(r))),
            }
        }
    }

    /// The LUN's mapped ranges by GET LBA STATUS, when the LUN says its
    /// unmapped blocks read as zeros (LBPME and LBPRZ in READ CAPACITY(16):
    /// tgtd with `thin_provisioning`). LIO answers GET LBA STATUS with
    /// ILLEGAL REQUEST (its SERVICE ACTION IN(16) knows READ CAPACITY(16)
    /// and REPORT REFERRALS only): then `None`, and the root reads it all.
    async fn lba_status(&self) -> UpstreamResult<Extents> {
        if !(self.cap.thin && self.cap.zeroed) {
            tracing::info!(target = %self.t.target, "the LUN does not report unmapped blocks as zeros (LBPME/LBPRZ); reading all of it");
            return Ok(None);
        }
        let bs = u64::from(self.cap.block_size);
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut lba = 0u64;
        while lba < self.cap.blocks {
            let c = match self
                .command(
                    "GET LBA STATUS",
                    scsi::get_lba_status(lba, LBA_STATUS_ALLOC),
                    LBA_STATUS_ALLOC as usize,
                )
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::info!(target = %self.t.target, error = %crate::error_chain(&e), "no GET LBA STATUS; reading all of the LUN");
                    return Ok(None);
                }
            };
            let descs = scsi::parse_lba_status(&c.data).unwrap_or_default();
            let before = lba;
            for d in descs {
                // Descriptors must continue where the last ended.
                if d.lba != lba || d.blocks == 0 {
                    break;
                }
                let blocks = u64::from(d.blocks).min(self.cap.blocks - lba);
                if d.status != scsi::LBA_DEALLOCATED {
                    match out.last_mut() {
                        Some((o, n)) if *o + *n == lba * bs => *n += blocks * bs,
                        _ => out.push((lba * bs, blocks * bs)),
                    }
                }
                lba += blocks;
                if lba >= self.cap.blocks {
                    break;
                }
            }
            if lba == before {
                tracing::warn!(target = %self.t.target, lba, "GET LBA STATUS made no progress; reading all of the LUN");
                return Ok(None);
            }
        }
        tracing::info!(
            target = %self.t.target,
            extents = out.len(),
            mapped_bytes = out.iter().map(|e| e.1).sum::<u64>(),
            "allocation from GET LBA STATUS"
        );
        Ok(Some(out))
    }

    async fn simple(&self, cdb: [u8; 16], len: usize) -> UpstreamResult<Completion> {
        self.command("command", cdb, len).await
    }

    async fn read_blocks(&self, lba: u64, bytes: usize) -> UpstreamResult<IoBuf> {
        let blocks = u32::try_from(bytes / self.cap.block_size as usize).unwrap_or(u32::MAX);
        let c = self
            .command("READ(16)", scsi::read16(lba, blocks), bytes)
            .await?;
        if c.data.len() != bytes {
            return Err(self.scsi_err(
                "READ(16)",
                CommandError::Short {
                    got: c.data.len(),
                    want: bytes,
                },
            ));
        }
        Ok(c.data)
    }

    async fn read(&self, offset: u64, len: usize) -> UpstreamResult<IoBuf> {
        let size = self.cap.bytes();
        let end = offset.saturating_add(len as u64);
        if end > size {
            return Err(UpstreamError::OutOfRange { offset, len, size });
        }
        let bs = u64::from(self.cap.block_size);
        let start = offset / bs * bs;
        let stop = end.next_multiple_of(bs).min(size);
        let span = usize::try_from(stop - start).unwrap_or(usize::MAX);
        // Block-aligned and within one command (a cache's chunk fetches):
        // the command's buffer is the answer, not copied, and no pieces
        // are gathered (their vectors and boxed futures were a tenth of
        // the initiator's user time at 64 KiB QD16).
        if offset == start && span == len && len > 0 && span <= self.max_xfer {
            return self.read_blocks(start / bs, span).await;
        }
        // Issue every piece before awaiting any: they pipeline on the session.
        let mut pieces = Vec::new();
        let mut at = 0usize;
        while at < span {
            let n = (span - at).min(self.max_xfer);
            pieces.push((at, self.read_blocks((start + at as u64) / bs, n)));
            at += n;
        }
        let results = futures_join(pieces).await;
        let skip = usize::try_from(offset - start).unwrap_or(0);
        // Not zeroed: the pieces tile [skip, skip + len), each checked to
        // be whole, so every byte is copied in or the read fails (zeroing
        // was a tenth of the CPU of a 1 MiB read split into 256 KiB ones).
        let mut out = IoBuf::scratch(len);
        for (at, piece) in results {
            let piece = piece?;
            // Copy the overlap of [at, at+piece) with [skip, skip+len).
            let from = at.max(skip);
            let to = (at + piece.len()).min(skip + len);
            if from < to {
                out[from - skip..to - skip].copy_from_slice(&piece[from - at..to - at]);
            }
        }
        Ok(out)
    }
}

/// Polls all futures concurrently (they share one session, so starting them
/// together is what fills the CmdSN window).
async fn futures_join<F, T>(items: Vec<(usize, F)>) -> Vec<(usize, T)>
where
    F: std::future::Future<Output = T>,
{
    let mut futs: Vec<(usize, std::pin::Pin<Box<F>>, Option<T>)> = items
        .into_iter()
        .map(|(a, f)| (a, Box::pin(f), None))
        .collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (_, f, out) in &mut futs {
            if out.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *out = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    futs.into_iter()
        .filter_map(|(a, _, o)| o.map(|v| (a, v)))
        .collect()
}

impl Upstream for IscsiUpstream {
    fn size(&self) -> u64 {
        self.cap.bytes()
    }

    fn read_at(&self, offset: u64, len: usize) -> ReadFuture<'_> {
        Box::pin(self.read(offset, len))
    }

    fn describe(&self) -> String {
        self.t.url()
    }

    fn source_kind(&self) -> &'static str {
        "image"
    }

    fn extents(&self) -> ExtentsFuture<'_> {
        Box::pin(self.lba_status())
    }
}
