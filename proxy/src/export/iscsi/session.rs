//! One iSCSI connection of herd's target: the login phase, then the full
//! feature phase.
//!
//! The reader takes PDUs in order, keeps the CmdSN window, and spawns a
//! task per SCSI command so reads complete out of order; one writer task
//! owns StatSN and stamps every PDU's sequence numbers as it sends it, so
//! StatSN follows the wire order. A command's task holds reply bytes
//! against the connection's budget (as the NBD export does). ABORT TASK
//! and LUN RESET remove tasks from the in-flight map; the writer drops
//! what an aborted task queued. Error recovery level 0: a header digest
//! error or a protocol violation closes the connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, Semaphore};

use super::login::{self, Login, Negotiated};
use super::scsi::{self, Action, Sense, INVALID_FIELD_IN_CDB as INVALID_FIELD};
use super::Target;
use crate::cache::Data;
use crate::export::nbd::limits::{Budget, Hold};
use crate::io::spin::Spin;
use crate::iscsi::pdu::{
    digest, padded, PduError, Sn, BHS_LEN, OP_DATA_IN, OP_LOGIN_RESP, RESERVED_TAG,
    STAGE_FULL_FEATURE,
};
use crate::iscsi::target_pdu::{
    self as tp, DataIn, InitiatorHeader, InitiatorPdu, LoginResp, REJECT_DIGEST, REJECT_PROTOCOL,
    REJECT_UNSUPPORTED,
};
use crate::iscsi::text;
use crate::metrics as m;

/// Commands an initiator may have outstanding (MaxCmdSN − ExpCmdSN + 1).
pub const WINDOW: u32 = 64;
/// A login has this long to reach the full-feature phase.
const LOGIN_TIME: Duration = Duration::from_secs(30);
/// AHS bytes we read and skip (none are negotiated).
const MAX_AHS: usize = 1024;
/// MEDIUM ERROR, UNRECOVERED READ ERROR: a read the cache could not serve.
const READ_ERROR: Sense = scsi::sense(0x03, 0x11, 0x00);

#[derive(Debug, Error)]
pub enum SessionError {
    #[error("I/O error")]
    Io(#[from] std::io::Error),
    #[error("malformed PDU")]
    Pdu(#[from] PduError),
    #[error("login PDU expected, got opcode {0:#04x}")]
    NotLogin(u8),
    #[error("login failed: status {0:#04x}/{1:#04x}")]
    LoginFailed(u8, u8),
    #[error("login did not finish within {LOGIN_TIME:?}")]
    LoginTimeout,
    #[error("login text: {0}")]
    Text(#[from] text::TextError),
    #[error("header digest mismatch")]
    HeaderDigest,
    #[error("data segment of {0} bytes is larger than the {max} we accept", max = login::OUR_MAX_RECV_DSL)]
    TooLong(usize),
    #[error("writing a reply timed out")]
    WriteStall,
}

/// One PDU as queued for the writer: its header (sequence numbers filled
/// in at send time) and data.
struct Out {
    bhs: [u8; BHS_LEN],
    /// A status-bearing PDU: carries StatSN and advances it.
    status: bool,
    data: Payload,
}

enum Payload {
    None,
    Bytes(Vec<u8>),
    /// A range of a cache read (shared by the Data-In PDUs it is cut into).
    Read(Arc<Data>, std::ops::Range<usize>),
}

impl Payload {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::None => &[],
            Self::Bytes(b) => b,
            Self::Read(d, r) => &d[r.clone()],
        }
    }
}

/// What a task hands the writer: PDUs, and the command they answer (so
/// an aborted command's are dropped).
struct Reply {
    task: Option<u32>,
    pdus: Vec<Out>,
    /// Held until written: the reply bytes against the budget.
    _hold: Option<Hold>,
    /// Close the connection once sent (logout).
    last: bool,
}

impl Reply {
    fn one(pdu: Vec<u8>, status: bool) -> Self {
        Self::of(None, vec![split(pdu, status)])
    }

    fn of(task: Option<u32>, pdus: Vec<Out>) -> Self {
        Self {
            task,
            pdus,
            _hold: None,
            last: false,
        }
    }
}

/// An encoded PDU (header, data, padding) as an `Out`.
fn split(mut pdu: Vec<u8>, status: bool) -> Out {
    let mut bhs = [0u8; BHS_LEN];
    bhs.copy_from_slice(&pdu[..BHS_LEN]);
    let len = (usize::from(bhs[5]) << 16) | (usize::from(bhs[6]) << 8) | usize::from(bhs[7]);
    pdu.truncate(BHS_LEN + len);
    let data = if len == 0 {
        Payload::None
    } else {
        Payload::Bytes(pdu.split_off(BHS_LEN))
    };
    Out { bhs, status, data }
}

/// Sequence numbers placeholders: the writer fills them.
const NO_SN: Sn = Sn {
    stat_sn: 0,
    exp_cmd_sn: 0,
    max_cmd_sn: 0,
};

/// Reads one PDU: header, AHS (skipped), data; checks digests.
async fn read_pdu<R: AsyncRead + Unpin>(
    r: &mut R,
    hdr_digest: bool,
    data_digest: bool,
) -> Result<
    (
        Result<InitiatorHeader, PduError>,
        [u8; BHS_LEN],
        Vec<u8>,
        bool,
    ),
    SessionError,
> {
    let mut bhs = [0u8; BHS_LEN];
    r.read_exact(&mut bhs).await?;
    let ahs_len = usize::from(bhs[4]) * 4;
    let data_len = (usize::from(bhs[5]) << 16) | (usize::from(bhs[6]) << 8) | usize::from(bhs[7]);
    if data_len > login::OUR_MAX_RECV_DSL as usize {
        return Err(SessionError::TooLong(data_len));
    }
    if ahs_len > MAX_AHS {
        return Err(SessionError::Pdu(PduError::TooLong {
            len: ahs_len,
            max: MAX_AHS,
        }));
    }
    let mut ahs = vec![0u8; ahs_len];
    r.read_exact(&mut ahs).await?;
    if hdr_digest {
        let mut d = [0u8; 4];
        r.read_exact(&mut d).await?;
        let mut whole = bhs.to_vec();
        whole.extend_from_slice(&ahs);
        if digest(&whole) != d {
            return Err(SessionError::HeaderDigest);
        }
    }
    let mut data = vec![0u8; padded(data_len)];
    r.read_exact(&mut data).await?;
    let mut data_ok = true;
    if data_digest && data_len > 0 {
        let mut d = [0u8; 4];
        r.read_exact(&mut d).await?;
        data_ok = digest(&data) == d;
    }
    data.truncate(data_len);
    Ok((tp::decode_initiator(&bhs), bhs, data, data_ok))
}

/// Serial number arithmetic (RFC 1982) for 32-bit sequence numbers:
/// `a - b` as a signed distance.
fn sn_diff(a: u32, b: u32) -> i64 {
    i64::from(a.wrapping_sub(b) as i32)
}

/// Runs one connection to the end.
///
/// # Errors
/// I/O errors, a failed or timed-out login, protocol violations.
pub async fn run<S>(
    stream: S,
    local: String,
    target: Arc<Target>,
    budget: Arc<Budget>,
    write_stall: Duration,
    spin: Option<Spin>,
) -> Result<(), SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (r, w) = tokio::io::split(stream);
    // Buffered: one recv takes every PDU already queued, and an empty
    // buffer tells the spin that the initiator has nothing more on the way.
    let mut r = BufReader::with_capacity(64 << 10, r);
    let mut w = BufWriter::with_capacity(64 << 10, w);
    let address = format!("{local},1");
    let (neg, start) = match tokio::time::timeout(
        LOGIN_TIME,
        login_phase(&mut r, &mut w, &target, &address),
    )
    .await
    {
        Ok(res) => res?,
        Err(_) => return Err(SessionError::LoginTimeout),
    };
    m::iscsi_target_login(true);
    tracing::info!(
        initiator = %neg.initiator,
        discovery = neg.discovery,
        header_digest = neg.header_digest,
        data_digest = neg.data_digest,
        max_send_dsl = neg.max_send_dsl,
        "iSCSI login"
    );
    let sns = Arc::new(Sns {
        exp_cmd_sn: AtomicU32::new(start.exp_cmd_sn),
    });
    let in_flight: Arc<Mutex<HashMap<u32, tokio::task::AbortHandle>>> =
        Arc::new(Mutex::new(HashMap::new()));
    let (tx, rx) = mpsc::channel::<Reply>(WINDOW as usize * 2);
    let writer = tokio::spawn(write_replies(
        w,
        rx,
        start.stat_sn,
        Arc::clone(&sns),
        Arc::clone(&in_flight),
        neg.clone(),
        write_stall,
    ));
    let res = full_feature(
        &mut r, &tx, &target, &neg, &sns, &in_flight, &budget, &address, spin,
    )
    .await;
    // Outstanding tasks end with the connection.
    for (_, h) in in_flight
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .drain()
    {
        h.abort();
    }
    drop(tx);
    let written = writer.await.unwrap_or(Ok(()));
    res.and(written)
}

/// The connection's ExpCmdSN, shared by the reader (which advances it) and
/// the writer (which stamps it, with MaxCmdSN, on every PDU).
struct Sns {
    exp_cmd_sn: AtomicU32,
}

/// Where the full-feature phase starts.
struct Start {
    stat_sn: u32,
    exp_cmd_sn: u32,
}

async fn login_phase<R, W>(
    r: &mut R,
    w: &mut W,
    target: &Target,
    address: &str,
) -> Result<(Negotiated, Start), SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut nonce = [0u8; 17];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut nonce);
    let mut login = Login::new(
        target.iqn.clone(),
        address.to_owned(),
        target.auth.clone(),
        nonce,
    );
    let mut stat_sn: u32 = rand::random::<u32>() >> 8;
    loop {
        let (pdu, bhs, data, _) = read_pdu(r, false, false).await?;
        let InitiatorPdu::LoginReq {
            transit,
            csg,
            nsg,
            isid,
            tsih,
            itt,
            cmd_sn,
            ..
        } = pdu?.pdu
        else {
            return Err(SessionError::NotLogin(bhs[0] & 0x3f));
        };
        let keys = text::parse(&data)?;
        let a = login.step(transit, csg, nsg, &keys);
        let done = a.status == (0, 0) && a.transit && a.nsg == STAGE_FULL_FEATURE;
        let tsih = if done && tsih == 0 {
            target.next_tsih()
        } else {
            tsih
        };
        let pairs: Vec<(&str, String)> = a
            .keys
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        let mut out = Vec::new();
        tp::encode_login_resp(
            &LoginResp {
                transit: a.transit,
                csg: a.csg,
                nsg: a.nsg,
                isid,
                tsih,
                itt,
                sn: Sn {
                    stat_sn,
                    exp_cmd_sn: cmd_sn,
                    max_cmd_sn: cmd_sn.wrapping_add(WINDOW - 1),
                },
                status_class: a.status.0,
                status_detail: a.status.1,
            },
            &text::encode(&pairs),
            &mut out,
        );
        debug_assert_eq!(out[0], OP_LOGIN_RESP);
        w.write_all(&out).await?;
        w.flush().await?;
        stat_sn = stat_sn.wrapping_add(1);
        if a.status != (0, 0) {
            m::iscsi_target_login(false);
            return Err(SessionError::LoginFailed(a.status.0, a.status.1));
        }
        if done {
            return Ok((
                login.negotiated(),
                Start {
                    stat_sn,
                    exp_cmd_sn: cmd_sn,
                },
            ));
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn full_feature<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
    tx: &mpsc::Sender<Reply>,
    target: &Arc<Target>,
    neg: &Negotiated,
    sns: &Sns,
    in_flight: &Arc<Mutex<HashMap<u32, tokio::task::AbortHandle>>>,
    budget: &Arc<Budget>,
    address: &str,
    mut spin: Option<Spin>,
) -> Result<(), SessionError> {
    let slots = Arc::new(Semaphore::new(WINDOW as usize));
    let mut collecting: HashMap<u32, Collect> = HashMap::new();
    let mut next_ttt: u32 = 1;
    // PDUs read since the connection last waited for one.
    let mut batch = 0u32;
    loop {
        if let Some(s) = spin.as_mut() {
            if r.buffer().is_empty() {
                s.wait(batch).await;
                batch = 0;
            }
        }
        batch = batch.saturating_add(1);
        let (decoded, bhs, data, data_ok) = read_pdu(r, neg.header_digest, neg.data_digest).await?;
        let h = match decoded {
            Ok(h) => h,
            Err(e) => {
                tracing::debug!(error = %e, "rejecting an unknown PDU");
                reject(tx, REJECT_UNSUPPORTED, &bhs).await;
                continue;
            }
        };
        if !data_ok {
            m::iscsi_target_digest_error();
            reject(tx, REJECT_DIGEST, &bhs).await;
            continue;
        }
        // The CmdSN window (§3.2.2.1), for commands that are not immediate.
        if let Some(cmd_sn) = windowed(&h.pdu) {
            let exp = sns.exp_cmd_sn.load(Ordering::Acquire);
            let d = sn_diff(cmd_sn, exp);
            if !(0..i64::from(WINDOW)).contains(&d) {
                tracing::debug!(cmd_sn, exp, "CmdSN outside the window; rejected");
                reject(tx, REJECT_PROTOCOL, &bhs).await;
                continue;
            }
            sns.exp_cmd_sn
                .store(cmd_sn.wrapping_add(1), Ordering::Release);
        }
        match h.pdu {
            InitiatorPdu::ScsiCmd {
                lun,
                itt,
                expected_len,
                cdb,
                ..
            } => {
                if neg.discovery {
                    reject(tx, REJECT_PROTOCOL, &bhs).await;
                    continue;
                }
                m::iscsi_target_command();
                let unit = (lun == 0).then_some(&target.lun);
                let action = scsi::execute(unit, &[0], &cdb);
                if let Action::Compare {
                    offset,
                    len,
                    data_len,
                } = action
                {
                    // VERIFY with BYTCHK: solicit its data-out first.
                    let held: u64 = collecting.values().map(|c| c.data.len() as u64).sum();
                    if data_len > COLLECT_MAX || held + data_len > COLLECT_MAX {
                        let mut out = Vec::new();
                        // TASK SET FULL: the initiator retries later.
                        tp::encode_scsi_resp(itt, 0x28, NO_SN, 0, 0, 0, &[], &mut out);
                        send(tx, Reply::one(out, true)).await;
                        continue;
                    }
                    let mut c = Collect {
                        lun,
                        ttt: next_ttt,
                        offset,
                        len,
                        data: Vec::with_capacity(usize::try_from(data_len).unwrap_or(0)),
                        total: u32::try_from(data_len).unwrap_or(u32::MAX),
                        burst_end: 0,
                        r2t_sn: 0,
                    };
                    next_ttt = next_ttt.wrapping_add(1) & 0x7fff_ffff;
                    c.ask(itt, neg.max_burst, tx).await;
                    collecting.insert(itt, c);
                    continue;
                }
                let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                    return Ok(());
                };
                let (target, tx2, budget) = (Arc::clone(target), tx.clone(), Arc::clone(budget));
                let max_send = neg.max_send_dsl;
                let max_burst = neg.max_burst;
                let mut map = in_flight
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let task = tokio::spawn(async move {
                    let reply = command(
                        &target,
                        &budget,
                        action,
                        lun,
                        itt,
                        expected_len,
                        max_send,
                        max_burst,
                    )
                    .await;
                    let _ = tx2.send(reply).await;
                    drop(slot);
                });
                map.insert(itt, task.abort_handle());
            }
            InitiatorPdu::NopOut { itt, lun, .. } => {
                if itt != RESERVED_TAG {
                    let mut out = Vec::new();
                    tp::encode_nop_in(itt, RESERVED_TAG, lun, NO_SN, &data, &mut out);
                    send(tx, Reply::one(out, true)).await;
                }
            }
            InitiatorPdu::TextReq { itt, .. } => {
                let keys = text::parse(&data).unwrap_or_default();
                let answer = text::get(&keys, "SendTargets")
                    .and_then(|v| login::send_targets(v, &target.iqn, address))
                    .unwrap_or_default();
                let pairs: Vec<(&str, String)> = answer
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.clone()))
                    .collect();
                let mut out = Vec::new();
                tp::encode_text_resp(
                    itt,
                    RESERVED_TAG,
                    false,
                    NO_SN,
                    &text::encode(&pairs),
                    &mut out,
                );
                send(tx, Reply::one(out, true)).await;
            }
            InitiatorPdu::TaskMgmt {
                function,
                lun,
                itt,
                referenced,
                ..
            } => {
                // A VERIFY still collecting its data-out is a task too.
                let collected = match function {
                    1 => collecting.remove(&referenced).is_some(),
                    2..=6 => {
                        collecting.clear();
                        false
                    }
                    _ => false,
                };
                let response = if collected {
                    0
                } else {
                    task_management(in_flight, function, lun, referenced)
                };
                let mut out = Vec::new();
                tp::encode_task_mgmt_resp(itt, response, NO_SN, &mut out);
                send(tx, Reply::one(out, true)).await;
            }
            InitiatorPdu::LogoutReq { itt, reason, .. } => {
                // 0 close the session, 1 the connection; 2 (recovery) is
                // not supported at error recovery level 0.
                let response = if reason <= 1 { 0 } else { 2 };
                let mut out = Vec::new();
                tp::encode_logout_resp(itt, response, NO_SN, &mut out);
                let mut reply = Reply::one(out, true);
                reply.last = true;
                send(tx, reply).await;
                tracing::debug!(initiator = %neg.initiator, "iSCSI logout");
                return Ok(());
            }
            InitiatorPdu::DataOut {
                itt, ttt, offset, ..
            } => {
                // Unsolicited data (for a refused write) is dropped.
                let Some(c) = collecting.get_mut(&itt) else {
                    continue;
                };
                let fits = c.data.len() + data.len() <= c.burst_end as usize;
                if ttt != c.ttt || offset as usize != c.data.len() || !fits {
                    reject(tx, REJECT_PROTOCOL, &bhs).await;
                    continue;
                }
                c.data.extend_from_slice(&data);
                if c.data.len() < c.burst_end as usize {
                    continue;
                }
                if c.data.len() < c.total as usize {
                    c.ask(itt, neg.max_burst, tx).await;
                    continue;
                }
                let Some(c) = collecting.remove(&itt) else {
                    continue;
                };
                let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                    return Ok(());
                };
                let (target, tx2) = (Arc::clone(target), tx.clone());
                let mut map = in_flight
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let task = tokio::spawn(async move {
                    let reply = compare(&target, itt, c).await;
                    let _ = tx2.send(reply).await;
                    drop(slot);
                });
                map.insert(itt, task.abort_handle());
            }
            InitiatorPdu::Snack { .. } | InitiatorPdu::LoginReq { .. } => {
                reject(tx, REJECT_PROTOCOL, &bhs).await;
            }
        }
    }
}

/// Data-out a connection may be collecting for VERIFY at once.
const COLLECT_MAX: u64 = 2 << 20;

/// A VERIFY with BYTCHK collecting its data-out, one burst per R2T.
struct Collect {
    lun: u16,
    ttt: u32,
    offset: u64,
    len: u64,
    data: Vec<u8>,
    total: u32,
    /// Where the burst asked for last ends.
    burst_end: u32,
    r2t_sn: u32,
}

impl Collect {
    /// Asks for the next burst (MaxOutstandingR2T is 1).
    async fn ask(&mut self, itt: u32, max_burst: u32, tx: &mpsc::Sender<Reply>) {
        let at = self.burst_end;
        let n = (self.total - at).min(max_burst.max(512));
        self.burst_end = at + n;
        let mut out = Vec::new();
        tp::encode_r2t(self.lun, itt, self.ttt, NO_SN, self.r2t_sn, at, n, &mut out);
        self.r2t_sn += 1;
        send(tx, Reply::one(out, false)).await;
    }
}

/// VERIFY's compare: the data-out against the image, 1 MiB at a time;
/// with one block of data-out, against every block.
async fn compare(target: &Target, itt: u32, c: Collect) -> Reply {
    let status = |status: u8, sense: &[u8]| {
        let mut out = Vec::new();
        tp::encode_scsi_resp(itt, status, NO_SN, 0, 0, 0, sense, &mut out);
        Reply::of(Some(itt), vec![split(out, true)])
    };
    const STEP: u64 = 1 << 20;
    let mut at = 0;
    while at < c.len {
        let n = STEP.min(c.len - at);
        let image = match target
            .export
            .cache
            .read(c.offset + at, usize::try_from(n).unwrap_or(0))
            .await
        {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(offset = c.offset + at, error = %crate::error_chain(&e), "iSCSI verify read failed");
                return status(2, &READ_ERROR.fixed());
            }
        };
        let same = if c.data.len() as u64 == c.len {
            let from = usize::try_from(at).unwrap_or(0);
            c.data.get(from..from + image.len()) == Some(&image[..])
        } else {
            !c.data.is_empty() && image.chunks(c.data.len()).all(|b| b == &c.data[..b.len()])
        };
        if !same {
            return status(2, &scsi::MISCOMPARE.fixed());
        }
        at += n;
    }
    status(0, &[])
}

/// CmdSN of a PDU the window counts (not immediate).
fn windowed(p: &InitiatorPdu) -> Option<u32> {
    match p {
        InitiatorPdu::ScsiCmd {
            immediate: false,
            cmd_sn,
            ..
        }
        | InitiatorPdu::TextReq {
            immediate: false,
            cmd_sn,
            ..
        }
        | InitiatorPdu::TaskMgmt {
            immediate: false,
            cmd_sn,
            ..
        }
        | InitiatorPdu::LogoutReq {
            immediate: false,
            cmd_sn,
            ..
        } => Some(*cmd_sn),
        _ => None,
    }
}

/// Task management (§11.5): the response code.
fn task_management(
    in_flight: &Mutex<HashMap<u32, tokio::task::AbortHandle>>,
    function: u8,
    _lun: u16,
    referenced: u32,
) -> u8 {
    let mut map = in_flight
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match function {
        // ABORT TASK: done, or "task does not exist".
        1 => match map.remove(&referenced) {
            Some(h) => {
                h.abort();
                0
            }
            None => 1,
        },
        // ABORT TASK SET, CLEAR TASK SET, CLEAR ACA, LOGICAL UNIT RESET,
        // TARGET WARM RESET: one LUN, so every task goes.
        2..=6 => {
            for (_, h) in map.drain() {
                h.abort();
            }
            0
        }
        // TARGET COLD RESET, TASK REASSIGN and the rest: not supported.
        _ => 5,
    }
}

async fn send(tx: &mpsc::Sender<Reply>, reply: Reply) {
    let _ = tx.send(reply).await;
}

async fn reject(tx: &mpsc::Sender<Reply>, reason: u8, bhs: &[u8; BHS_LEN]) {
    m::iscsi_target_reject();
    let mut out = Vec::new();
    tp::encode_reject(reason, NO_SN, bhs, &mut out);
    send(tx, Reply::one(out, true)).await;
}

/// Executes one SCSI command; its reply PDUs.
#[allow(clippy::too_many_arguments)]
async fn command(
    target: &Target,
    budget: &Budget,
    action: Action,
    lun: u16,
    itt: u32,
    expected: u32,
    max_send: u32,
    max_burst: u32,
) -> Reply {
    let status = |status: u8, sense: &[u8], under: u32| {
        let mut out = Vec::new();
        tp::encode_scsi_resp(itt, status, NO_SN, 0, under, 0, sense, &mut out);
        Reply::of(Some(itt), vec![split(out, true)])
    };
    let (data, hold) = match action {
        Action::Good => return status(0, &[], expected),
        Action::Check(s) => return status(2, &s.fixed(), 0),
        Action::Data(bytes) => (
            Arc::new(Data::Owned(crate::io::IoBuf::from_slice(&bytes))),
            None,
        ),
        Action::Read { len: 0, .. } => return status(0, &[], expected),
        // Taken by the reader (it needs the data-out first).
        Action::Compare { .. } => return status(2, &INVALID_FIELD.fixed(), 0),
        Action::Read { offset, len } => {
            let hold = budget.hold(len.min(u64::from(expected))).await;
            if let Some(rec) = &target.export.recorder {
                rec.note(offset, len);
            }
            match target
                .export
                .cache
                .read(offset, usize::try_from(len).unwrap_or(usize::MAX))
                .await
            {
                Ok(d) => {
                    target.export.cache.metrics().served(len);
                    (Arc::new(d), hold)
                }
                Err(e) => {
                    tracing::warn!(offset, len, error = %crate::error_chain(&e), "iSCSI read failed");
                    return status(2, &READ_ERROR.fixed(), 0);
                }
            }
        }
    };
    let have = u32::try_from(data.len()).unwrap_or(u32::MAX);
    let send = have.min(expected);
    let (under, over) = (expected.saturating_sub(have), have.saturating_sub(expected));
    if send == 0 {
        let mut out = Vec::new();
        tp::encode_scsi_resp(itt, 0, NO_SN, 0, under, over, &[], &mut out);
        return Reply::of(Some(itt), vec![split(out, true)]);
    }
    let mut pdus = Vec::new();
    let (mut at, mut data_sn) = (0u32, 0u32);
    let per = max_send.max(512);
    while at < send {
        let n = per.min(send - at);
        let last = at + n == send;
        // A burst ends at each MaxBurstLength boundary (F bit).
        let burst_end = last || (at + n) % max_burst.max(per) == 0;
        let bhs = tp::encode_data_in_header(&DataIn {
            final_: burst_end,
            status: last,
            underflow: under,
            overflow: over,
            lun,
            itt,
            sn: NO_SN,
            data_sn,
            offset: at,
            data_len: n,
        });
        pdus.push(Out {
            bhs,
            status: last,
            data: Payload::Read(Arc::clone(&data), at as usize..(at + n) as usize),
        });
        at += n;
        data_sn += 1;
    }
    Reply {
        task: Some(itt),
        pdus,
        _hold: hold,
        last: false,
    }
}

/// Sends replies in order, stamping StatSN (advanced by status-bearing
/// PDUs), ExpCmdSN and MaxCmdSN, and digests where negotiated.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut w: BufWriter<W>,
    mut rx: mpsc::Receiver<Reply>,
    mut stat_sn: u32,
    sns: Arc<Sns>,
    in_flight: Arc<Mutex<HashMap<u32, tokio::task::AbortHandle>>>,
    neg: Negotiated,
    write_stall: Duration,
) -> Result<(), SessionError> {
    let pad = [0u8; 4];
    while let Some(reply) = rx.recv().await {
        if let Some(itt) = reply.task {
            // Gone from the map: aborted, and must not be answered.
            let live = in_flight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&itt)
                .is_some();
            if !live {
                continue;
            }
        }
        let io = async {
            for mut out in reply.pdus {
                let exp = sns.exp_cmd_sn.load(Ordering::Acquire);
                let data_in = out.bhs[0] & 0x3f == OP_DATA_IN;
                if out.status || !data_in {
                    out.bhs[24..28].copy_from_slice(&stat_sn.to_be_bytes());
                }
                if out.status {
                    stat_sn = stat_sn.wrapping_add(1);
                }
                out.bhs[28..32].copy_from_slice(&exp.to_be_bytes());
                out.bhs[32..36].copy_from_slice(&exp.wrapping_add(WINDOW - 1).to_be_bytes());
                w.write_all(&out.bhs).await?;
                if neg.header_digest {
                    w.write_all(&digest(&out.bhs)).await?;
                }
                let data = out.data.bytes();
                if !data.is_empty() {
                    let fill = &pad[..padded(data.len()) - data.len()];
                    w.write_all(data).await?;
                    w.write_all(fill).await?;
                    if neg.data_digest {
                        let mut h = crc32c::crc32c(data);
                        h = crc32c::crc32c_append(h, fill);
                        w.write_all(&h.to_le_bytes()).await?;
                    }
                }
            }
            if rx.is_empty() || reply.last {
                w.flush().await?;
            }
            Ok::<(), std::io::Error>(())
        };
        match tokio::time::timeout(write_stall, io).await {
            Ok(r) => r?,
            Err(_) => return Err(SessionError::WriteStall),
        }
        if reply.last {
            return Ok(());
        }
    }
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn serial_arithmetic_wraps() {
        assert_eq!(sn_diff(5, 3), 2);
        assert_eq!(sn_diff(3, 5), -2);
        assert_eq!(sn_diff(1, u32::MAX), 2);
        assert_eq!(sn_diff(u32::MAX, 1), -2);
    }

    #[test]
    fn split_keeps_header_and_data() {
        let mut out = Vec::new();
        tp::encode_nop_in(1, RESERVED_TAG, [0; 8], NO_SN, b"abcde", &mut out);
        let o = split(out, true);
        assert_eq!(o.data.bytes(), b"abcde");
        assert_eq!(o.bhs[7], 5);
    }
}
