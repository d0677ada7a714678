//! A TCP stream driven by an io_uring ring of its own: the session that owns
//! the stream owns the ring, so no thread is crossed to send or receive.
//!
//! ```text
//!  callers ── send(bytes) ─▶ queue ─▶ one SendMsg in flight ──────────────▶ socket
//!                             (what queued meanwhile goes out as one iovec batch)
//!  owner task ◀─ ring fd readable (tokio's epoll) ◀─ CQEs ◀─ multishot recv into
//!                                                           the provided-buffer ring
//! ```
//!
//! The socket is non-blocking and registered with the ring, so a receive
//! waits on the socket's own wakeup (no io-wq thread) and one armed
//! multishot receive yields every segment that arrives, each into a buffer
//! the kernel picks from a ring the owner refills. The ring's fd sits in
//! tokio's reactor: the task that owns the session wakes when completions
//! are posted and reaps them from shared memory, so a request costs one
//! `io_uring_enter` to send and none to receive. Sends are ordered by
//! keeping one in flight; whatever callers queue meanwhile is sent as one
//! `sendmsg` when it completes. A large payload whose length the owner
//! knows is received in place instead (`recv_into`): the multishot receive
//! is stopped and `recv(2)` fills the caller's buffer, so its bytes are
//! copied once, as on epoll, not twice. DESIGN.md ("Runtime model") has the
//! measurements that chose this over tokio's epoll path and over the file
//! engine's thread.

use std::alloc::Layout;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use tokio::io::unix::AsyncFd;

/// Payloads at least this large are received in place (`RingRx::recv_into`,
/// or `recv(2)` on epoll) and the requests that ask for them go out at once
/// (`RingTx::send_now`), on the iSCSI session and the NBD client alike:
/// smaller ones arrive through the multishot receive and are copied, which
/// costs less than stopping it, and batch with their neighbours' sends.
pub const DIRECT_MIN: usize = 32 * 1024;

/// user_data of the multishot receive.
const RECV: u64 = 1;
/// user_data of the send in flight.
const SEND: u64 = 2;
/// user_data of the cancellation issued when the stream is dropped.
const CANCEL: u64 = 3;
/// user_data of the cancellation that stops the multishot receive before
/// a payload is received in place (`RingRx::recv_into`).
const STOP: u64 = 4;
/// The provided-buffer group (one per ring).
const BGID: u16 = 0;
/// Provided buffers: enough for a 1 MiB reply and more in flight.
const BUFS: u16 = 64;
const BUF_SIZE: usize = 64 * 1024;
/// The most iovecs one sendmsg takes (UIO_MAXIOV).
const MAX_IOV: usize = 1024;
/// How long a dropped stream waits for the kernel to let go of its buffers.
const DRAIN: Duration = Duration::from_secs(2);

/// A ring's counters, `herd_ring_completions_total{link,op}`, resolved
/// once per stream: a labelled `counter!` is a registry lookup, and these
/// move several times per command.
struct Counters {
    send_now: metrics::Counter,
    rearm: metrics::Counter,
    recv: metrics::Counter,
    send: metrics::Counter,
    recv_in_place: metrics::Counter,
    recv_then_header: metrics::Counter,
    recv_empty: metrics::Counter,
}

impl Counters {
    fn new(link: &'static str) -> Self {
        let c = |op: &'static str| metrics::counter!("herd_ring_completions_total", "link" => link, "op" => op);
        Self {
            send_now: c("send_now"),
            rearm: c("rearm"),
            recv: c("recv"),
            send: c("send"),
            recv_in_place: c("recv_in_place"),
            recv_then_header: c("recv_then_header"),
            recv_empty: c("recv_empty"),
        }
    }
}

/// What drives a network stream: `net_io` in the configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NetIo {
    /// A ring the stream owns (this module): the default; falls back to
    /// epoll, logged, where io_uring is unavailable or restricted.
    #[default]
    Uring,
    /// tokio's reactor: the fallback, and a setting (DESIGN.md).
    Epoll,
}

impl std::str::FromStr for NetIo {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "uring" => Ok(Self::Uring),
            "epoll" => Ok(Self::Epoll),
            other => Err(format!("`{other}` is neither uring nor epoll")),
        }
    }
}

static CONFIGURED: std::sync::OnceLock<NetIo> = std::sync::OnceLock::new();

/// Sets the process's `net_io` (once, at start) for links opened deep in
/// the upstream code (NBD parent connections).
pub fn configure(io: NetIo) {
    let _ = CONFIGURED.set(io);
}

/// The process's `net_io`: a ring unless configured otherwise.
#[must_use]
pub fn configured() -> NetIo {
    CONFIGURED.get().copied().unwrap_or_default()
}

/// A TCP stream on the path `NetIo` chose.
pub enum Driven {
    Ring(RingTx, RingRx),
    /// Epoll: asked for, or io_uring failed (logged once per process).
    Tokio(tokio::net::TcpStream),
}

/// Puts a connected stream on the path `io` asks for, falling back to
/// epoll (logged once) when a ring cannot be set up, and counts it in
/// `herd_net_streams_total{link,io}`.
///
/// # Errors
/// When the socket cannot be handed to tokio either.
pub fn drive(sock: std::net::TcpStream, io: NetIo, link: &'static str) -> io::Result<Driven> {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let sock = match io {
        NetIo::Epoll => sock,
        NetIo::Uring => match split(sock, link) {
            Ok((tx, rx)) => {
                metrics::counter!("herd_net_streams_total", "link" => link, "io" => "uring")
                    .increment(1);
                return Ok(Driven::Ring(tx, rx));
            }
            Err((e, sock)) => {
                WARNED.call_once(|| {
                    tracing::warn!(error = %e, "io_uring unavailable for sockets; using epoll");
                });
                sock
            }
        },
    };
    sock.set_nonblocking(true)?;
    metrics::counter!("herd_net_streams_total", "link" => link, "io" => "epoll").increment(1);
    Ok(Driven::Tokio(tokio::net::TcpStream::from_std(sock)?))
}

/// Sets a stream up on a ring of its own and splits it into the send side
/// (shared by callers) and the receive side (owned by one task).
///
/// # Errors
/// When io_uring, multishot receive (Linux 6.0) or provided-buffer rings
/// (5.19) are unavailable, or the process may not create rings; the socket
/// comes back with the error so the caller can fall back to epoll.
pub fn split(
    sock: std::net::TcpStream,
    link: &'static str,
) -> Result<(RingTx, RingRx), (io::Error, std::net::TcpStream)> {
    match setup(&sock) {
        Ok((ring, bufs, afd)) => Ok(assemble(ring, bufs, afd, OwnedFd::from(sock), link)),
        Err(e) => Err((e, sock)),
    }
}

type Parts = (IoUring, ProvidedBufs, AsyncFd<RingFd>);

/// Everything that can fail, done before the socket is given up.
fn setup(sock: &std::net::TcpStream) -> io::Result<Parts> {
    sock.set_nonblocking(true)?;
    // No IPI to a running thread for a completion: it runs its task work
    // at its next syscall, and a sleeping one is still woken. The flag
    // tells a spinning reader (`arrived`) that such work waits, so it
    // enters the kernel only then.
    let ring = IoUring::builder()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .build(64)?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    if !(probe.is_supported(opcode::RecvMulti::CODE)
        && probe.is_supported(opcode::SendMsg::CODE)
        && probe.is_supported(opcode::AsyncCancel2::CODE))
    {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "io_uring lacks recv/sendmsg/cancel",
        ));
    }
    ring.submitter().register_files(&[sock.as_raw_fd()])?;
    let bufs = ProvidedBufs::new()?;
    // SAFETY: the entries array is page-aligned, holds BUFS entries and
    // lives in `Shared` until the ring is dropped (see `Shared::drop`).
    unsafe {
        ring.submitter()
            .register_buf_ring_with_flags(bufs.ring as u64, BUFS, BGID, 0)?;
    }
    // SAFETY: the ring's fd stays open while `afd` lives: `RingRx` drops
    // `afd` (its first field) before its Arc to `Shared`, which owns the ring.
    let afd = unsafe {
        AsyncFd::register_with_interest(RingFd(ring.as_raw_fd()), tokio::io::Interest::READABLE)
    }?;
    Ok((ring, bufs, afd))
}

fn assemble(
    ring: IoUring,
    bufs: ProvidedBufs,
    afd: AsyncFd<RingFd>,
    fd: OwnedFd,
    link: &'static str,
) -> (RingTx, RingRx) {
    let shared = Arc::new(Shared {
        ring,
        fd,
        q: Mutex::new(SendQueue::default()),
        inflight: AtomicUsize::new(0),
        bufs,
        link,
        counters: Counters::new(link),
    });
    let mut rx = RingRx {
        sock: None,
        afd,
        shared: Arc::clone(&shared),
        ready: VecDeque::new(),
        front_used: 0,
        tail: 0,
        armed: false,
        armed_on: None,
        stopping: false,
        placed: 0,
        drained: false,
        empty: 0,
        eof: false,
        error: None,
    };
    for bid in 0..BUFS {
        rx.give_back(bid);
    }
    // Armed on the first `recv`: a failure to arm then ends the stream.
    (RingTx { shared }, rx)
}

/// The ring's fd as tokio's reactor sees it (readable: completions posted).
struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// The socket as tokio's reactor sees it while payloads are received in
/// place; `Shared` owns (and closes) it.
struct SockFd(RawFd);

impl AsRawFd for SockFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// The provided-buffer ring's memory: the entries the kernel takes buffers
/// from and the buffers themselves.
struct ProvidedBufs {
    ring: *mut types::BufRingEntry,
    mem: *mut u8,
    ring_layout: Layout,
    mem_layout: Layout,
    /// The kernel may still write here: never free it.
    leak: bool,
}

// SAFETY: the pointers are to heap memory owned by this value; entries are
// written only by the one `RingRx` and buffers read only after the kernel
// handed them over in a CQE.
unsafe impl Send for ProvidedBufs {}
// SAFETY: as above; `&ProvidedBufs` only reads the pointers.
unsafe impl Sync for ProvidedBufs {}

impl ProvidedBufs {
    fn new() -> io::Result<Self> {
        let bad = |_| io::Error::from(io::ErrorKind::InvalidInput);
        // 16 bytes an entry; the kernel wants the ring page-aligned.
        let ring_layout = Layout::from_size_align(usize::from(BUFS) * 16, 4096).map_err(bad)?;
        let mem_layout =
            Layout::from_size_align(usize::from(BUFS) * BUF_SIZE, 4096).map_err(bad)?;
        // SAFETY: both layouts have a non-zero size.
        let ring = unsafe { std::alloc::alloc_zeroed(ring_layout) };
        // SAFETY: as above.
        let mem = unsafe { std::alloc::alloc(mem_layout) };
        if ring.is_null() || mem.is_null() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        Ok(Self {
            ring: ring.cast(),
            mem,
            ring_layout,
            mem_layout,
            leak: false,
        })
    }

    fn buf(&self, bid: u16) -> *mut u8 {
        // SAFETY: bid < BUFS, so the offset stays inside `mem`.
        unsafe { self.mem.add(usize::from(bid) * BUF_SIZE) }
    }
}

impl Drop for ProvidedBufs {
    fn drop(&mut self) {
        if self.leak {
            return;
        }
        // SAFETY: allocated in `new` with these layouts; `Shared::drop`
        // leaks this value instead when the kernel may still use it.
        unsafe {
            std::alloc::dealloc(self.ring.cast(), self.ring_layout);
            std::alloc::dealloc(self.mem, self.mem_layout);
        }
    }
}

/// A sendmsg the kernel owns: the buffers, their iovecs and the header stay
/// put until its completion.
struct Flight {
    /// Owned only so the iovecs stay valid.
    _bufs: Vec<Vec<u8>>,
    iov: Vec<libc::iovec>,
    /// First iovec not yet fully sent.
    first: usize,
    msg: Box<libc::msghdr>,
}

// SAFETY: the raw pointers point into `bufs` and `iov`, which this value
// owns; it moves between threads only under the queue's mutex.
unsafe impl Send for Flight {}

impl Flight {
    fn new(bufs: Vec<Vec<u8>>) -> Self {
        let iov = bufs
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: an all-zero msghdr is valid (no name, no control).
        let msg: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        let mut f = Self {
            _bufs: bufs,
            iov,
            first: 0,
            msg,
        };
        f.point();
        f
    }

    /// Points the header at the iovecs still to send.
    fn point(&mut self) {
        let rest = &mut self.iov[self.first..];
        self.msg.msg_iov = rest.as_mut_ptr();
        self.msg.msg_iovlen = rest.len() as _;
    }

    /// Accounts `n` bytes sent; true when everything went.
    fn advance(&mut self, mut n: usize) -> bool {
        while n > 0 && self.first < self.iov.len() {
            let v = &mut self.iov[self.first];
            if n >= v.iov_len {
                n -= v.iov_len;
                self.first += 1;
            } else {
                // SAFETY: n < iov_len, so the pointer stays in its buffer.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                v.iov_len -= n;
                n = 0;
            }
        }
        self.point();
        self.first == self.iov.len()
    }

    fn sqe(&self) -> squeue::Entry {
        opcode::SendMsg::new(types::Fixed(0), &raw const *self.msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(SEND)
    }
}

#[derive(Default)]
struct SendQueue {
    flight: Option<Flight>,
    queued: Vec<Vec<u8>>,
    /// The connection failed or was shut down: sends fail at once.
    closed: bool,
}

struct Shared {
    ring: IoUring,
    fd: OwnedFd,
    /// Guards the submission queue as well as the sends.
    q: Mutex<SendQueue>,
    /// Ops the kernel still owns (multishot recv counts once).
    inflight: AtomicUsize,
    bufs: ProvidedBufs,
    link: &'static str,
    counters: Counters,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, SendQueue> {
        self.q
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues one SQE; the caller holds the queue lock, which is what makes
    /// the shared submission queue single-producer.
    fn push(&self, _q: &SendQueue, sqe: &squeue::Entry) -> io::Result<()> {
        // SAFETY: every push happens under the queue lock (witnessed by
        // `_q`), so this is the only submission-queue handle alive.
        let mut sq = unsafe { self.ring.submission_shared() };
        // SAFETY: what the entry points at (a Flight's header and buffers,
        // or nothing) lives until its completion is reaped.
        if unsafe { sq.push(sqe) }.is_err() {
            return Err(io::Error::other("io_uring submission queue full"));
        }
        self.inflight.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Submits what was pushed. The caller holds the queue lock too, so
    /// an op is issued by the thread that pushed it: the completion of a
    /// receive runs as the issuing thread's task work, and the owner's
    /// receive issued by a sender's `io_uring_enter` would post only when
    /// that thread runs again (a stall of a scheduler slice when it waits
    /// for a CPU).
    fn submit(&self, _q: &SendQueue) -> io::Result<()> {
        self.ring.submitter().submit().map(drop)
    }

    fn shutdown(&self) {
        let _ = nix::sys::socket::shutdown(self.fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.shutdown();
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fixed(0)).all())
            .build()
            .user_data(CANCEL);
        {
            let q = self.lock();
            let _ = self.push(&q, &cancel);
        }
        // Wait until the kernel is done with the buffers and headers it was
        // given; the shutdown makes every op end at once.
        let deadline = Instant::now() + DRAIN;
        let ts = types::Timespec::new().nsec(100_000_000);
        while self.inflight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = self.ring.submitter().submit_with_args(1, &args);
            // SAFETY: the receive side is gone (it holds an Arc to us), so
            // this is the only completion-queue handle.
            let cq = unsafe { self.ring.completion_shared() };
            for cqe in cq {
                if cqe.user_data() != RECV || !cqueue::more(cqe.flags()) {
                    self.inflight.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
        if self.inflight.load(Ordering::Acquire) > 0 {
            tracing::warn!(
                link = self.link,
                "io_uring ops outlived their stream; leaking its buffers"
            );
            self.bufs.leak = true;
            std::mem::forget(self.lock().flight.take());
        }
    }
}

/// The send side: any task may send; bytes go out in the order sent.
#[derive(Clone)]
pub struct RingTx {
    shared: Arc<Shared>,
}

impl RingTx {
    /// Sends `bytes` after everything sent before. Returns once queued (one
    /// `io_uring_enter` when nothing is in flight); a failure to deliver
    /// surfaces on the receive side, which ends the connection.
    ///
    /// # Errors
    /// When the connection has already failed or been shut down.
    pub fn send(&self, bytes: Vec<u8>) -> io::Result<()> {
        self.enqueue(bytes, false)
    }

    /// Sends `bytes`, with `send(2)` at once when nothing is in flight: for
    /// a request alone on the link (queue depth 1), or one whose answer is
    /// large. A send through the ring posts a completion, and posting one
    /// wakes the owner's thread, which at queue depth 1 sleeps until the
    /// answer, and while large answers stream waits on the socket: a second
    /// wakeup per request for nothing, and large answers come too far
    /// apart for sends to batch. What `send(2)` leaves goes through the ring.
    ///
    /// # Errors
    /// As `send`, or when the socket refuses the bytes.
    pub fn send_now(&self, bytes: Vec<u8>) -> io::Result<()> {
        self.enqueue(bytes, true)
    }

    /// Queues `bytes` behind the send in flight, or starts one: with
    /// `send(2)` first when `now`, the ring taking what it leaves.
    fn enqueue(&self, bytes: Vec<u8>, now: bool) -> io::Result<()> {
        let mut q = self.shared.lock();
        if q.closed {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        if q.flight.is_some() {
            q.queued.push(bytes);
            return Ok(());
        }
        let mut sent = 0;
        if now {
            use nix::sys::socket::{send, MsgFlags};
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
            sent = loop {
                match send(self.shared.fd.as_raw_fd(), &bytes, flags) {
                    Ok(n) => break n,
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(nix::errno::Errno::EAGAIN) => break 0,
                    Err(e) => {
                        q.closed = true;
                        return Err(e.into());
                    }
                }
            };
            self.shared.counters.send_now.increment(1);
            if sent == bytes.len() {
                return Ok(());
            }
        }
        let mut f = Flight::new(vec![bytes]);
        f.advance(sent);
        let sqe = f.sqe();
        q.flight = Some(f);
        self.shared.push(&q, &sqe)?;
        self.shared.submit(&q)
    }

    /// Ends the connection both ways: the receive side sees end of stream.
    pub fn shutdown(&self) {
        self.shared.lock().closed = true;
        self.shared.shutdown();
    }
}

/// The receive side, owned by one task: it also reaps the send completions.
pub struct RingRx {
    /// The socket in tokio's reactor while the multishot receive is stopped
    /// for in-place receives (`recv_into`); dropped (deregistered) when it
    /// is armed again. Dropped before `shared`, which owns the socket.
    sock: Option<AsyncFd<SockFd>>,
    /// Dropped before `shared`: deregistered while the ring's fd is still open.
    afd: AsyncFd<RingFd>,
    shared: Arc<Shared>,
    /// Received buffers not yet handed out: (buffer id, length).
    ready: VecDeque<(u16, usize)>,
    /// Bytes of the front ready buffer `recv_into` already copied out.
    front_used: usize,
    /// Our copy of the provided-buffer ring's tail.
    tail: u16,
    armed: bool,
    /// The thread that armed the receive: its completions run as that
    /// thread's task work, so the receive follows the thread reading it.
    armed_on: Option<std::thread::ThreadId>,
    /// A `STOP` for the armed receive is in flight.
    stopping: bool,
    /// Bytes `recv_into` had `recv(2)` place (not copied from a buffer).
    placed: u64,
    /// The last in-place `recv(2)` took less than asked, or nothing: the
    /// socket is drained, so the next one waits for readiness first, as
    /// tokio's streams do, instead of a `recv(2)` that finds nothing (at
    /// 64K QD16 those tripled the receives per command).
    drained: bool,
    /// In-place `recv(2)`s that found nothing.
    empty: u64,
    eof: bool,
    error: Option<io::Error>,
}

/// Received bytes in a provided buffer; the buffer goes back to the kernel
/// when this is dropped.
pub struct Chunk<'a> {
    rx: &'a mut RingRx,
    bid: u16,
    /// The bytes `[start, len)` of the buffer are this chunk's.
    start: usize,
    len: usize,
}

impl std::ops::Deref for Chunk<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the kernel wrote `len` bytes into buffer `bid` and handed
        // it over in a CQE; it is not given back until this chunk drops.
        unsafe { self.rx.received(self.bid, self.start, self.len) }
    }
}

impl Drop for Chunk<'_> {
    fn drop(&mut self) {
        self.rx.give_back(self.bid);
    }
}

impl RingRx {
    /// Bytes `[start, len)` of provided buffer `bid`.
    ///
    /// # Safety
    /// The kernel handed `bid` over with `len` bytes in a CQE, and it is
    /// not given back while the slice lives.
    unsafe fn received(&self, bid: u16, start: usize, len: usize) -> &[u8] {
        // SAFETY: per the contract; start <= len <= BUF_SIZE.
        unsafe { std::slice::from_raw_parts(self.shared.bufs.buf(bid).add(start), len - start) }
    }

    /// Returns buffer `bid` to the kernel.
    fn give_back(&mut self, bid: u16) {
        let ring = self.shared.bufs.ring;
        let slot = usize::from(self.tail & (BUFS - 1));
        // SAFETY: slot < BUFS; only this value writes entries, and the
        // kernel reads an entry only once the tail below covers it.
        unsafe {
            let e = &mut *ring.add(slot);
            e.set_addr(self.shared.bufs.buf(bid) as u64);
            e.set_len(BUF_SIZE as u32);
            e.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail is the u16 overlaying entry 0's reserved field,
        // aligned and inside the ring; the kernel reads it atomically.
        let tail = unsafe { &*types::BufRingEntry::tail(ring).cast::<AtomicU16>() };
        tail.store(self.tail, Ordering::Release);
    }

    /// Arms the multishot receive.
    fn arm(&mut self) -> io::Result<()> {
        // Its bytes come as completions now: socket readiness would only
        // wake the reactor for nothing.
        self.sock = None;
        // Bytes left in the socket when it is next stopped are tried at once.
        self.drained = false;
        let sqe = opcode::RecvMulti::new(types::Fixed(0), BGID)
            .build()
            .user_data(RECV);
        let q = self.shared.lock();
        self.shared.push(&q, &sqe)?;
        self.armed = true;
        self.armed_on = Some(std::thread::current().id());
        self.shared.submit(&q)
    }

    /// Moves the armed receive to this thread when another armed it (the
    /// login ran elsewhere, or the owner task moved): its completions
    /// would otherwise post only when that thread next enters the kernel
    /// or is woken for them, a second wakeup per arrival, and this
    /// thread's spin could not run them. Stops it here; `recv` or
    /// `arrived` re-arms once it has ended.
    fn follow(&mut self) -> io::Result<()> {
        if self.armed && !self.stopping && self.armed_on != Some(std::thread::current().id()) {
            self.shared.counters.rearm.increment(1);
            self.stop()?;
        }
        Ok(())
    }

    /// Cancels the armed multishot receive; it has ended once its last
    /// completion (without `MORE`) is reaped.
    fn stop(&mut self) -> io::Result<()> {
        self.stopping = true;
        let stop = opcode::AsyncCancel2::new(types::CancelBuilder::user_data(RECV))
            .build()
            .user_data(STOP);
        self.issue(&stop)
    }

    /// Reaps every posted completion.
    fn reap(&mut self) {
        let mut recvs = 0u64;
        let mut sends = 0u64;
        let shared = Arc::clone(&self.shared);
        // SAFETY: only the receive side (this, `&mut`) reads completions
        // while the stream lives.
        let cq = unsafe { shared.ring.completion_shared() };
        for cqe in cq {
            match cqe.user_data() {
                RECV => {
                    recvs += 1;
                    let more = cqueue::more(cqe.flags());
                    if !more {
                        self.armed = false;
                        self.stopping = false;
                        self.shared.inflight.fetch_sub(1, Ordering::AcqRel);
                    }
                    let res = cqe.result();
                    if res > 0 {
                        if let Some(bid) = cqueue::buffer_select(cqe.flags()) {
                            self.ready.push_back((bid, res as usize));
                        }
                    } else if res == 0 {
                        self.eof = true;
                    } else if res != -libc::ENOBUFS && res != -libc::ECANCELED {
                        // Out of buffers just needs re-arming once some
                        // are back, a stopped receive re-arming when bytes
                        // are wanted again; anything else ends the stream.
                        self.error = Some(io::Error::from_raw_os_error(-res));
                    }
                }
                SEND => {
                    sends += 1;
                    self.shared.inflight.fetch_sub(1, Ordering::AcqRel);
                    self.sent(cqe.result());
                }
                _ => {
                    self.shared.inflight.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
        if recvs > 0 {
            self.shared.counters.recv.increment(recvs);
        }
        if sends > 0 {
            self.shared.counters.send.increment(sends);
        }
    }

    /// Completes the send in flight and starts the next batch.
    fn sent(&mut self, res: i32) {
        let mut q = self.shared.lock();
        let next = match q.flight.as_mut() {
            Some(f) if res > 0 => {
                if f.advance(res as usize) {
                    if q.queued.is_empty() {
                        q.flight = None;
                        None
                    } else {
                        let n = q.queued.len().min(MAX_IOV);
                        let f = Flight::new(q.queued.drain(..n).collect());
                        let sqe = f.sqe();
                        q.flight = Some(f);
                        Some(sqe)
                    }
                } else {
                    // A short send: the rest goes before anything queued.
                    Some(f.sqe())
                }
            }
            _ => {
                q.closed = true;
                q.flight = None;
                q.queued.clear();
                if self.error.is_none() {
                    self.error = Some(if res < 0 {
                        io::Error::from_raw_os_error(-res)
                    } else {
                        io::ErrorKind::WriteZero.into()
                    });
                }
                None
            }
        };
        if let Some(sqe) = next {
            let pushed = self.shared.push(&q, &sqe);
            let submitted = pushed.and_then(|()| self.shared.submit(&q));
            drop(q);
            if let Err(e) = submitted {
                self.error = Some(e);
            }
        }
    }

    /// Whether `recv` has something to return at once, without sleeping:
    /// for a spin at queue depth 1. It reads shared memory and enters the
    /// kernel only when completions wait as task work (`IORING_SQ_TASKRUN`).
    pub fn arrived(&mut self) -> bool {
        if self.has_news() {
            return true;
        }
        if let Err(e) = self.follow() {
            self.error = Some(e);
            return true;
        }
        if !self.armed {
            // Stopped by `recv_into`: what arrives next must be caught.
            if let Err(e) = self.arm() {
                self.error = Some(e);
                return true;
            }
        }
        {
            let q = self.shared.lock();
            // SAFETY: the queue lock is held (as for every push), so this
            // is the only submission-queue handle alive; only its flags are read.
            let taskrun = unsafe { self.shared.ring.submission_shared() }.taskrun();
            // Runs this thread's task work, which posts the completions.
            if taskrun {
                if let Err(e) = self.shared.submit(&q) {
                    self.error = Some(e);
                    return true;
                }
            }
        }
        // SAFETY: only this value reads completions.
        let posted = !unsafe { self.shared.ring.completion_shared() }.is_empty();
        if posted {
            self.reap();
        }
        self.has_news()
    }

    /// Bytes, an error or the end of the stream for `recv` to return.
    fn has_news(&self) -> bool {
        !self.ready.is_empty() || self.error.is_some() || self.eof
    }

    /// Waits for the next received bytes; `None` at end of stream.
    ///
    /// # Errors
    /// When the connection failed (receive or send).
    pub async fn recv(&mut self) -> io::Result<Option<Chunk<'_>>> {
        loop {
            if let Some((bid, len)) = self.ready.pop_front() {
                let start = std::mem::take(&mut self.front_used);
                return Ok(Some(Chunk {
                    rx: self,
                    bid,
                    start,
                    len,
                }));
            }
            if let Some(e) = self.error.take() {
                self.eof = true;
                return Err(e);
            }
            if self.eof {
                return Ok(None);
            }
            self.follow()?;
            if !self.armed {
                self.arm()?;
            }
            self.completions().await?;
        }
    }

    /// Bytes received in place so far (`recv_into`), not copied.
    #[must_use]
    pub fn placed(&self) -> u64 {
        self.placed
    }

    /// In-place `recv(2)`s so far that found nothing there.
    #[must_use]
    pub fn empty_receives(&self) -> u64 {
        self.empty
    }

    /// Waits for completions to be posted and reaps them.
    async fn completions(&mut self) -> io::Result<()> {
        loop {
            let mut guard = self.afd.readable().await?;
            // SAFETY: only this value reads completions.
            let empty = unsafe { self.shared.ring.completion_shared() }.is_empty();
            if empty {
                guard.clear_ready();
                continue;
            }
            drop(guard);
            self.reap();
            return Ok(());
        }
    }

    /// Pushes one op of this side's own and submits it.
    fn issue(&mut self, sqe: &squeue::Entry) -> io::Result<()> {
        {
            let q = self.shared.lock();
            self.shared.push(&q, sqe)?;
            self.shared.submit(&q)?;
        }
        // A cancellation is often done by the time the call returns.
        // SAFETY: only this value reads completions.
        if !unsafe { self.shared.ring.completion_shared() }.is_empty() {
            self.reap();
        }
        Ok(())
    }

    /// Receives the next bytes of the stream into `dst`; 0 at end of
    /// stream. For a large payload whose length the owner knows: bytes
    /// already received into provided buffers are copied out first, then
    /// the multishot receive is stopped and `recv(2)` fills `dst` directly,
    /// so the kernel's copy is the only one. The next `recv` or `arrived`
    /// re-arms.
    ///
    /// The receive is stopped, not raced: only a stopped receive leaves
    /// the socket's bytes to `recv(2)` in order, since a multishot receive
    /// takes whatever arrives whenever this thread enters the kernel.
    ///
    /// When nothing is there it waits on the socket's readiness in tokio's
    /// reactor, as the epoll path does, or on completions (a send's, which
    /// starts the next batch). A readiness poll on the ring would complete
    /// as task work that then wakes the ring's fd: two steps for one.
    ///
    /// # Errors
    /// When the connection failed (receive or send).
    pub async fn recv_into(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        self.recv_into_then(dst, &mut []).await
    }

    /// [`RingRx::recv_into`] into `dst` and then `tail` (filled only once
    /// `dst` is full), in one `recvmsg(2)`: a payload and the header after
    /// it come in one call, not two. Returns the bytes placed in both.
    ///
    /// # Errors
    /// As `recv_into`.
    pub async fn recv_into_then(&mut self, dst: &mut [u8], tail: &mut [u8]) -> io::Result<usize> {
        let want = dst.len() + tail.len();
        if dst.is_empty() {
            return Ok(0);
        }
        loop {
            if let Some(&(bid, len)) = self.ready.front() {
                let n = (len - self.front_used).min(want);
                // SAFETY: `bid` came in a CQE with `len` bytes and goes
                // back only below, once every byte is copied out.
                let src = unsafe { self.received(bid, self.front_used, self.front_used + n) };
                let (head, rest) = src.split_at(n.min(dst.len()));
                dst[..head.len()].copy_from_slice(head);
                tail[..rest.len()].copy_from_slice(rest);
                self.front_used += n;
                if self.front_used == len {
                    self.ready.pop_front();
                    self.front_used = 0;
                    self.give_back(bid);
                }
                return Ok(n);
            }
            if let Some(e) = self.error.take() {
                self.eof = true;
                return Err(e);
            }
            if self.eof {
                return Ok(0);
            }
            if self.armed {
                if !self.stopping {
                    self.stop()?;
                    continue;
                }
                self.completions().await?;
                continue;
            }
            if !self.drained {
                let got = recv_now(self.shared.fd.as_raw_fd(), dst, tail);
                if let Some(done) = self.took_in_place(got, dst.len(), want) {
                    return done;
                }
            }
            // Reaped here too: a send's completion starts the next batch.
            // SAFETY: only this value reads completions.
            if !unsafe { self.shared.ring.completion_shared() }.is_empty() {
                self.reap();
                continue;
            }
            if self.sock.is_none() {
                // SAFETY: `shared` owns the socket and outlives `sock`,
                // which is declared (so dropped) before it.
                self.sock = Some(unsafe {
                    AsyncFd::register_with_interest(
                        SockFd(self.shared.fd.as_raw_fd()),
                        tokio::io::Interest::READABLE,
                    )
                }?);
            }
            let Some(sock) = self.sock.as_ref() else {
                continue;
            };
            tokio::select! {
                biased;
                ready = sock.readable() => {
                    let mut guard = ready?;
                    // Stale readiness (nothing there) is cleared, and so is
                    // readiness after a short read (unless more came since).
                    let got = guard.try_io(|s| recv_now(s.get_ref().0, dst, tail));
                    if matches!(got, Ok(Ok(n)) if n < want) {
                        guard.clear_ready();
                    }
                    if let Ok(got) = got {
                        if let Some(done) = self.took_in_place(got, dst.len(), want) {
                            return done;
                        }
                    }
                }
                ring = self.afd.readable() => {
                    let mut guard = ring?;
                    // SAFETY: only this value reads completions.
                    if unsafe { self.shared.ring.completion_shared() }.is_empty() {
                        guard.clear_ready();
                    }
                }
            }
        }
    }

    /// What a `recv(2)` of up to `want` bytes into place gave, accounted:
    /// `None` when nothing was there (or it was interrupted) and the
    /// receive goes on.
    /// `dst` is what was asked for in place, `want` that and the tail.
    fn took_in_place(
        &mut self,
        got: io::Result<usize>,
        dst: usize,
        want: usize,
    ) -> Option<io::Result<usize>> {
        match got {
            Ok(0) => {
                self.eof = true;
                Some(Ok(0))
            }
            Ok(n) => {
                self.shared.counters.recv_in_place.increment(1);
                if n > dst {
                    // The next header came with the payload.
                    self.shared.counters.recv_then_header.increment(1);
                }
                self.placed += n as u64;
                self.drained = n < want;
                Some(Ok(n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.shared.counters.recv_empty.increment(1);
                self.empty += 1;
                self.drained = true;
                None
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
            Err(e) => Some(Err(e)),
        }
    }
}

/// One non-blocking receive into `dst`, then `tail` (`recv(2)` when
/// there is no tail, else `recvmsg(2)` with both).
pub fn recv_now(fd: RawFd, dst: &mut [u8], tail: &mut [u8]) -> io::Result<usize> {
    use nix::sys::socket::{recv, recvmsg, MsgFlags};
    if tail.is_empty() {
        return recv(fd, dst, MsgFlags::MSG_DONTWAIT).map_err(io::Error::from);
    }
    let mut iov = [io::IoSliceMut::new(dst), io::IoSliceMut::new(tail)];
    recvmsg::<()>(fd, &mut iov, None, MsgFlags::MSG_DONTWAIT)
        .map(|m| m.bytes)
        .map_err(io::Error::from)
}

/// The socket, for options on it (`io::lowat`); open while this lives.
impl AsRawFd for RingRx {
    fn as_raw_fd(&self) -> RawFd {
        self.shared.fd.as_raw_fd()
    }
}

impl Drop for RingRx {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.shutdown();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    }

    async fn read_n(rx: &mut RingRx, n: usize) -> Vec<u8> {
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            let c = rx.recv().await.unwrap().expect("stream ended early");
            got.extend_from_slice(&c);
        }
        got
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bytes_sent_by_many_tasks_arrive_whole_and_in_each_senders_order() {
        let (c, mut peer) = pair();
        let (tx, mut rx) = split(c, "test").map_err(|e| e.0).unwrap();
        // The peer echoes everything back.
        let echo = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            let mut total = 0usize;
            loop {
                let n = peer.read(&mut buf).unwrap();
                if n == 0 {
                    return total;
                }
                peer.write_all(&buf[..n]).unwrap();
                total += n;
            }
        });
        // Two senders, each numbering its 8-byte records, plus one large
        // send that spans many provided buffers and short sends.
        let mut tasks = Vec::new();
        for who in 0u32..2 {
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0u32..2000 {
                    let mut rec = who.to_le_bytes().to_vec();
                    rec.extend_from_slice(&i.to_le_bytes());
                    tx.send(rec).unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let big: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
        tx.send(big.clone()).unwrap();
        let got = read_n(&mut rx, 2 * 2000 * 8 + big.len()).await;
        let (recs, tail) = got.split_at(2 * 2000 * 8);
        let mut next = [0u32; 2];
        for r in recs.chunks(8) {
            let who = u32::from_le_bytes(r[..4].try_into().unwrap()) as usize;
            let i = u32::from_le_bytes(r[4..].try_into().unwrap());
            assert_eq!(i, next[who], "sender {who}'s records out of order");
            next[who] += 1;
        }
        assert_eq!(next, [2000, 2000]);
        assert_eq!(tail, &big[..], "the large send arrived changed");
        tx.shutdown();
        assert!(
            rx.recv().await.unwrap().is_none(),
            "no end of stream after shutdown"
        );
        assert!(
            tx.send(vec![1]).is_err(),
            "a send after shutdown was accepted"
        );
        drop((tx, rx));
        assert_eq!(echo.join().unwrap(), 2 * 2000 * 8 + big.len());
    }

    /// The byte at `i` of record `r`'s payload.
    fn pattern(r: usize, i: usize) -> u8 {
        ((i * 7 + r * 13) % 251) as u8
    }

    /// Mixing `recv` (provided buffers) and `recv_into` (in place) keeps
    /// the stream's order: each record is a 4-byte length and a payload;
    /// large payloads go in place, small ones through buffers, and the
    /// peer pauses mid-payload so in-place receives also wait.
    #[tokio::test]
    async fn payloads_received_in_place_and_through_buffers_keep_the_stream_order() {
        const SIZES: [usize; 8] = [16, 1 << 20, 100, 300 << 10, 4096, 2 << 20, 0, 70_000];
        let (c, mut peer) = pair();
        let (_tx, mut rx) = split(c, "test").map_err(|e| e.0).unwrap();
        let writer = std::thread::spawn(move || {
            for (r, &len) in SIZES.iter().enumerate() {
                let mut rec = (len as u32).to_le_bytes().to_vec();
                rec.extend((0..len).map(|i| pattern(r, i)));
                let (a, b) = rec.split_at(rec.len() / 2);
                peer.write_all(a).unwrap();
                std::thread::sleep(Duration::from_millis(20));
                peer.write_all(b).unwrap();
            }
        });
        // Bytes a chunk brought beyond what was asked of it.
        let mut spare: Vec<u8> = Vec::new();
        for (r, &len) in SIZES.iter().enumerate() {
            while spare.len() < 4 {
                let c = rx.recv().await.unwrap().expect("stream ended early");
                spare.extend_from_slice(&c);
            }
            let got_len = u32::from_le_bytes(spare[..4].try_into().unwrap()) as usize;
            assert_eq!(got_len, len, "record {r}'s length");
            spare.drain(..4);
            let mut payload = vec![0u8; len];
            let mut got = spare.len().min(len);
            payload[..got].copy_from_slice(&spare[..got]);
            spare.drain(..got);
            while got < len {
                if len - got >= 64 << 10 {
                    let n = rx.recv_into(&mut payload[got..]).await.unwrap();
                    assert!(n > 0, "stream ended inside record {r}");
                    got += n;
                } else {
                    let c = rx.recv().await.unwrap().expect("stream ended early");
                    let n = c.len().min(len - got);
                    payload[got..got + n].copy_from_slice(&c[..n]);
                    spare.extend_from_slice(&c[n..]);
                    got += n;
                }
            }
            let bad = (0..len).find(|&i| payload[i] != pattern(r, i));
            assert_eq!(bad, None, "record {r} ({len} bytes) differs at this byte");
        }
        assert!(spare.is_empty(), "bytes after the last record");
        assert!(
            rx.placed() >= 1 << 20,
            "only {} bytes were received in place",
            rx.placed()
        );
        writer.join().unwrap();
        assert!(rx.recv().await.unwrap().is_none(), "no end of stream");
    }

    /// A payload that arrives in pieces is received in place with at most
    /// one `recv(2)` that finds nothing per pause: after a short receive
    /// the next waits for readiness (three empty ones per pause before).
    #[tokio::test]
    async fn a_payload_arriving_in_pieces_costs_at_most_one_empty_receive_a_pause() {
        const PIECES: usize = 16;
        const PIECE: usize = 64 << 10;
        let (c, mut peer) = pair();
        let (_tx, mut rx) = split(c, "test").map_err(|e| e.0).unwrap();
        let writer = std::thread::spawn(move || {
            for p in 0..PIECES {
                let piece: Vec<u8> = (0..PIECE).map(|i| pattern(p, i)).collect();
                peer.write_all(&piece).unwrap();
                std::thread::sleep(Duration::from_millis(10));
            }
            peer
        });
        let mut payload = vec![0u8; PIECES * PIECE];
        let mut got = 0;
        while got < payload.len() {
            let n = rx.recv_into(&mut payload[got..]).await.unwrap();
            assert!(n > 0, "stream ended early");
            got += n;
        }
        let bad = (0..payload.len()).find(|&i| payload[i] != pattern(i / PIECE, i % PIECE));
        assert_eq!(bad, None);
        assert!(
            rx.empty_receives() <= PIECES as u64,
            "{} empty receives for {PIECES} pauses",
            rx.empty_receives()
        );
        drop(writer.join().unwrap());
    }

    /// A receive armed on one thread (as a login on another runtime does)
    /// moves to the thread that reads on, without losing or reordering a
    /// byte: its completions would otherwise be the first thread's task work.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_receive_armed_on_another_thread_follows_its_reader() {
        let (c, mut peer) = pair();
        let (_tx, rx) = split(c, "test").map_err(|e| e.0).unwrap();
        peer.write_all(b"first").unwrap();
        let h = tokio::runtime::Handle::current();
        // The arming thread stays alive (a thread's exit cancels what it
        // issued, which would re-arm here anyway).
        let (back, handed) = std::sync::mpsc::channel();
        let (release, held) = std::sync::mpsc::channel::<()>();
        let armer = std::thread::spawn(move || {
            let mut rx = rx;
            assert_eq!(h.block_on(read_n(&mut rx, 5)), b"first");
            back.send((rx, std::thread::current().id())).unwrap();
            let _ = held.recv();
        });
        let (mut rx, armed_by) = handed.recv().unwrap();
        assert_eq!(rx.armed_on, Some(armed_by));
        let writer = std::thread::spawn(move || {
            for i in 0u32..1000 {
                peer.write_all(&i.to_le_bytes()).unwrap();
            }
            peer
        });
        let got = read_n(&mut rx, 4000).await;
        for (i, b) in got.chunks(4).enumerate() {
            assert_eq!(u32::from_le_bytes(b.try_into().unwrap()), i as u32);
        }
        assert_eq!(
            rx.armed_on,
            Some(std::thread::current().id()),
            "the receive stayed on the thread that armed it"
        );
        drop(writer.join().unwrap());
        release.send(()).unwrap();
        armer.join().unwrap();
    }

    /// A receive in place that waits on the socket still reaps the send
    /// completions: the peer answers only once it has every byte sent, and
    /// all but the first send wait in the queue for the one in flight. The
    /// peer starts reading late, so the sends go short and each rest goes
    /// only once a completion is reaped.
    #[tokio::test]
    async fn sends_queued_while_a_payload_is_received_in_place_still_go_out() {
        const SENDS: usize = 256;
        const MSG: usize = 64 << 10;
        const ANSWER: usize = 1 << 20;
        let (c, mut peer) = pair();
        let (tx, mut rx) = split(c, "test").map_err(|e| e.0).unwrap();
        let answerer = std::thread::spawn(move || {
            let mut got = vec![0u8; SENDS * MSG];
            std::thread::sleep(Duration::from_millis(100));
            peer.read_exact(&mut got).unwrap();
            peer.write_all(&vec![7u8; ANSWER]).unwrap();
            got
        });
        // Stop the multishot receive first, so the wait below is on the
        // socket, not on a receive's completion.
        let mut first = [0u8; 1];
        let waiting = tokio::time::timeout(Duration::from_millis(50), rx.recv_into(&mut first));
        assert!(
            waiting.await.is_err(),
            "bytes arrived before any were asked for"
        );
        for i in 0..SENDS {
            tx.send(vec![i as u8; MSG]).unwrap();
        }
        let mut answer = vec![0u8; ANSWER];
        let mut at = 0;
        while at < ANSWER {
            let n = tokio::time::timeout(Duration::from_secs(10), rx.recv_into(&mut answer[at..]))
                .await
                .expect("queued sends never went out")
                .unwrap();
            assert!(n > 0, "stream ended early");
            at += n;
        }
        assert!(answer.iter().all(|&b| b == 7));
        let got = answerer.join().unwrap();
        for (i, m) in got.chunks(MSG).enumerate() {
            assert!(m.iter().all(|&b| b == i as u8), "send {i} arrived changed");
        }
        assert!(rx.placed() > 0, "nothing was received in place");
    }

    /// A request alone goes out with `send(2)`, leaving the ring nothing
    /// to complete; what the socket does not take at once follows through
    /// the ring, before anything sent after it.
    #[tokio::test]
    async fn a_send_alone_goes_at_once_and_its_rest_through_the_ring_in_order() {
        const BIG: usize = 32 << 20;
        let (c, mut peer) = pair();
        let (tx, mut rx) = split(c, "test").map_err(|e| e.0).unwrap();
        tx.send_now(vec![1u8; 100]).unwrap();
        assert_eq!(
            tx.shared.inflight.load(Ordering::Acquire),
            0,
            "a send alone went through the ring"
        );
        let mut small = [0u8; 100];
        peer.read_exact(&mut small).unwrap();
        assert!(small.iter().all(|&b| b == 1));
        // More than a loopback socket takes at once.
        tx.send_now(vec![2u8; BIG]).unwrap();
        assert_eq!(
            tx.shared.inflight.load(Ordering::Acquire),
            1,
            "the rest of a large send is not on the ring"
        );
        tx.send_now(vec![3u8; 10]).unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; BIG + 10];
            peer.read_exact(&mut got).unwrap();
            peer.write_all(&[9]).unwrap();
            got
        });
        // The receive side reaps the send completions while it waits.
        let answer = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("the rest never went out")
            .unwrap()
            .map(|c| c.to_vec());
        assert_eq!(answer, Some(vec![9]));
        let got = reader.join().unwrap();
        assert!(
            got[..BIG].iter().all(|&b| b == 2),
            "the large send arrived changed"
        );
        assert_eq!(&got[BIG..], &[3u8; 10], "a later send overtook the rest");
    }

    #[tokio::test]
    async fn a_peer_that_closes_ends_the_stream() {
        let (c, mut peer) = pair();
        let (_tx, mut rx) = split(c, "test").map_err(|e| e.0).unwrap();
        peer.write_all(b"last words").unwrap();
        drop(peer);
        assert_eq!(read_n(&mut rx, 10).await, b"last words");
        assert!(rx.recv().await.unwrap().is_none());
    }
}
