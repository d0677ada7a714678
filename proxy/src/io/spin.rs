//! Adaptive spin: a socket whose peer answers back to back is polled for
//! a short while before its task sleeps on the runtime's reactor.
//!
//! At queue depth 1 a round trip's cost here is dominated by waking an
//! idle vCPU (~90–100 µs on this machine kind, against ~10 µs of work),
//! not by the syscall interface; a task that does not sleep between
//! messages that come back to back handles more of them. So before
//! waiting for the next message the task yields to the runtime (another
//! task sends the reply or the next command) and peeks at the socket, for
//! at most `window`, yielding its CPU (`sched_yield`) between peeks.
//!
//! Three sides use it: the NBD export and the iSCSI target wait for a
//! client's next request (`Side::Export`, `Side::Target`), and the iSCSI
//! initiator's session waits for the target's answer to the one command in
//! flight (`Side::Iscsi`).
//!
//! Whether that pays depends on where the peer runs, which this side
//! cannot see: with the peer on another, idle vCPU it saves a wake-up;
//! on the same vCPU the peer cannot send while this side spins, and
//! the spin only adds syscalls (measured on the export: 0.73–0.82× the
//! IOPS with both pinned to one vCPU). So each connection measures it:
//! the time from one wait for a message to the next is its cycle, and the
//! cycles of the mode in use (64) are compared with a short trial of the
//! other (16); spinning is kept only while its cycles are 5 % shorter.
//! Within spinning, a spin that ends without a message backs off: the
//! next 1, 3, 7 … 63 waits sleep at once, so a peer with think time longer
//! than the window costs at most one window every 64 messages.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{recv, MsgFlags};

use crate::metrics as m;

/// Backoff exponent cap: after idle spins, at most 2^6 − 1 waits skipped.
const MAX_BACKOFF: u32 = 6;

/// Default window: long enough for a client's next request after its
/// reply on an idle machine, short enough to cost little when none comes.
pub const DEFAULT_WINDOW: Duration = Duration::from_micros(50);

/// Cycles in the mode in use before the other one is tried.
const RUN: u32 = 64;
/// Cycles the other mode is tried for.
const TRIAL: u32 = 16;
/// Spinning is kept only while its mean cycle is below this share of
/// sleeping's: it costs CPU, so a tie goes to sleeping.
const SPIN_MARGIN: f64 = 0.95;
/// Longer cycles (a client thinking) count as this long, so one pause
/// does not decide.
const CYCLE_CAP: Duration = Duration::from_millis(2);

/// Whose wait spins: each side has its own metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// An NBD export connection waiting for its client's next request.
    Export,
    /// An iSCSI initiator session waiting for its target's answer.
    Iscsi,
    /// An iSCSI target connection waiting for its initiator's next command.
    Target,
}

impl Side {
    pub const ALL: [Self; 3] = [Self::Export, Self::Iscsi, Self::Target];
}

/// One connection's spin state.
pub struct Spin {
    /// The connection's dup of the client socket (shared with its
    /// zero-copy sender), only peeked at; `None` where the caller probes
    /// for itself (`wait_until`: a ring's completions).
    fd: Option<Arc<OwnedFd>>,
    window: Duration,
    /// Waits left that sleep at once.
    skip: u32,
    /// Spins in a row that found no request.
    misses: u32,
    chooser: Chooser,
    /// When the previous wait began.
    last: Option<Instant>,
    side: Side,
}

/// How a wait began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Sleeping is the mode (measured faster), or spinning backed off.
    Slept,
    /// A request (or the end of the stream) arrived while spinning.
    Request,
    /// The window passed without one.
    Idle,
}

impl Spin {
    /// `None` when `window` is zero (spinning off).
    pub fn new(fd: Arc<OwnedFd>, window: Duration, side: Side) -> Option<Self> {
        Self::build(Some(fd), window, side)
    }

    /// A spin whose caller says what counts as arrived (`wait_until`);
    /// `None` when `window` is zero.
    #[must_use]
    pub fn probed(window: Duration, side: Side) -> Option<Self> {
        Self::build(None, window, side)
    }

    fn build(fd: Option<Arc<OwnedFd>>, window: Duration, side: Side) -> Option<Self> {
        (!window.is_zero()).then_some(Self {
            fd,
            window,
            skip: 0,
            misses: 0,
            chooser: Chooser::default(),
            last: None,
            side,
        })
    }

    /// A spin over its own dup of `sock`; `None`, and no dup, when
    /// `window` is zero (spinning off).
    ///
    /// # Errors
    /// If the socket cannot be duplicated.
    pub fn for_socket(
        sock: &impl AsFd,
        window: Duration,
        side: Side,
    ) -> std::io::Result<Option<Self>> {
        if window.is_zero() {
            return Ok(None);
        }
        let fd = sock.as_fd().try_clone_to_owned()?;
        Ok(Self::new(Arc::new(fd), window, side))
    }

    /// Its side's metrics: spins by outcome, and microseconds spent.
    #[must_use]
    pub fn metric_names(side: Side) -> (&'static str, &'static str) {
        match side {
            Side::Export => (
                "herd_export_spins_total",
                "herd_export_spin_microseconds_total",
            ),
            Side::Iscsi => (
                "herd_iscsi_spins_total",
                "herd_iscsi_spin_microseconds_total",
            ),
            Side::Target => (
                "herd_iscsi_target_spins_total",
                "herd_iscsi_target_spin_microseconds_total",
            ),
        }
    }

    /// Spins until the socket has bytes or the window passes, if this
    /// connection spins; call when the connection's read buffer is empty,
    /// before waiting on the socket, with the messages handled since the
    /// last wait (requests read; on the initiator, commands completed).
    /// Only a connection at queue depth 1 (one request a cycle) is spun
    /// for: a deeper queue has work in flight while it waits, and a spin
    /// would take CPU from the client (64K QD8 measured 0.75–0.96×). A
    /// `probed` spin has no socket to peek at: it waits with `wait_until`.
    pub async fn wait(&mut self, requests: u32) -> Outcome {
        // The fd stays open: `self` holds its Arc throughout.
        let fd = self.fd.as_deref().map(AsRawFd::as_raw_fd);
        self.wait_until(requests, || fd.is_some_and(readable)).await
    }

    /// As `wait`, with `arrived` saying whether the message is there
    /// (checked between yields; it must not block).
    pub async fn wait_until(
        &mut self,
        requests: u32,
        mut arrived: impl FnMut() -> bool,
    ) -> Outcome {
        let start = Instant::now();
        if requests != 1 {
            self.last = None;
            return Outcome::Slept;
        }
        if let Some(last) = self.last.replace(start) {
            self.chooser.record(start.duration_since(last));
        }
        if !self.chooser.spinning() {
            return Outcome::Slept;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return Outcome::Slept;
        }
        let outcome = loop {
            // Lets the writer send the reply the client is waiting for.
            tokio::task::yield_now().await;
            if arrived() {
                break Outcome::Request;
            }
            if start.elapsed() >= self.window {
                break Outcome::Idle;
            }
            // A client on this CPU (woken by the reply) runs now rather
            // than when the scheduler preempts the spin.
            std::thread::yield_now();
        };
        self.settle(outcome);
        m::spin(self.side, outcome == Outcome::Request, start.elapsed());
        outcome
    }

    /// The backoff after a spin.
    fn settle(&mut self, outcome: Outcome) {
        if outcome == Outcome::Request {
            self.misses = 0;
        } else {
            self.misses = (self.misses + 1).min(MAX_BACKOFF);
            self.skip = (1 << self.misses) - 1;
        }
    }
}

/// Bytes (or end of stream, or an error the reader should see) waiting.
fn readable(fd: RawFd) -> bool {
    let mut b = [0u8; 1];
    !matches!(
        recv(fd, &mut b, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT),
        Err(Errno::EAGAIN | Errno::EINTR)
    )
}

/// Spin or sleep, by measurement: a pure state machine over cycle times.
#[derive(Debug)]
struct Chooser {
    /// The mode in use between trials.
    spin: bool,
    /// In a trial of the other mode.
    trial: bool,
    /// Cycles of this phase so far (the first, which straddles the switch,
    /// is not summed).
    n: u32,
    sum: Duration,
    /// Mean cycle of the last phase in use.
    usual: Duration,
}

impl Default for Chooser {
    fn default() -> Self {
        Self {
            spin: true,
            trial: false,
            n: 0,
            sum: Duration::ZERO,
            usual: Duration::ZERO,
        }
    }
}

impl Chooser {
    fn spinning(&self) -> bool {
        self.spin != self.trial
    }

    fn record(&mut self, cycle: Duration) {
        self.n += 1;
        if self.n > 1 {
            self.sum += cycle.min(CYCLE_CAP);
        }
        let len = if self.trial { TRIAL } else { RUN };
        if self.n < len {
            return;
        }
        let mean = self.sum / (len - 1);
        if self.trial {
            let (spin, sleep) = if self.spin {
                (self.usual, mean)
            } else {
                (mean, self.usual)
            };
            let keep_spinning = spin.as_secs_f64() < sleep.as_secs_f64() * SPIN_MARGIN;
            if keep_spinning != self.spin {
                tracing::debug!(
                    spin_us = spin.as_micros(),
                    sleep_us = sleep.as_micros(),
                    spinning = keep_spinning,
                    "connection's wait mode changed"
                );
            }
            self.spin = keep_spinning;
        } else {
            self.usual = mean;
        }
        self.trial = !self.trial;
        self.n = 0;
        self.sum = Duration::ZERO;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    fn pair() -> (std::os::unix::net::UnixStream, Spin) {
        pair_with(Duration::from_millis(2))
    }

    fn pair_with(window: Duration) -> (std::os::unix::net::UnixStream, Spin) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = Arc::new(b.as_fd().try_clone_to_owned().unwrap());
        // The spin only peeks: b stays open (dropped with the test) so
        // a's writes are not EPIPE.
        std::mem::forget(b);
        (a, Spin::new(fd, window, Side::Export).unwrap())
    }

    #[test]
    fn zero_window_is_off() {
        let (a, _) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = Arc::new(a.as_fd().try_clone_to_owned().unwrap());
        assert!(Spin::new(fd, Duration::ZERO, Side::Export).is_none());
    }

    #[tokio::test]
    async fn a_waiting_request_ends_the_spin_and_is_left_unread() {
        let (mut a, mut s) = pair();
        a.write_all(b"x").unwrap();
        assert_eq!(s.wait(1).await, Outcome::Request);
        assert_eq!(s.wait(1).await, Outcome::Request, "peek consumed the byte");
    }

    #[tokio::test]
    async fn idle_spins_back_off_and_a_request_resets_them() {
        let (mut a, mut s) = pair();
        assert_eq!(s.wait(1).await, Outcome::Idle);
        // Skipped waits between one idle spin and the next.
        let mut runs = Vec::new();
        for _ in 0..3 {
            let mut n = 0;
            loop {
                match s.wait(1).await {
                    Outcome::Slept => n += 1,
                    o => {
                        assert_eq!(o, Outcome::Idle);
                        break;
                    }
                }
            }
            runs.push(n);
        }
        assert_eq!(runs, [1, 3, 7]);
        a.write_all(b"x").unwrap();
        let mut skipped = 0;
        while s.wait(1).await == Outcome::Slept {
            skipped += 1;
        }
        assert_eq!(skipped, 15, "the backoff holds until its skips are used");
        assert_eq!(s.wait(1).await, Outcome::Request, "a request resets it");
    }

    #[test]
    fn backoff_is_capped() {
        let (_a, mut s) = pair();
        for _ in 0..20 {
            s.settle(Outcome::Idle);
        }
        assert_eq!(s.skip, (1 << MAX_BACKOFF) - 1);
    }

    fn feed(c: &mut Chooser, n: u32, us: u64) {
        for _ in 0..n {
            c.record(Duration::from_micros(us));
        }
    }

    #[test]
    fn the_faster_mode_is_kept_and_a_tie_goes_to_sleeping() {
        let mut c = Chooser::default();
        assert!(c.spinning(), "a connection starts spinning");
        // Client on another vCPU: spinning saves a wake-up per request.
        feed(&mut c, RUN, 30);
        assert!(!c.spinning(), "then tries sleeping");
        feed(&mut c, TRIAL, 90);
        assert!(c.spinning(), "and keeps spinning, 3x faster");
        // The client moved to this vCPU: spinning now costs.
        feed(&mut c, RUN, 40);
        feed(&mut c, TRIAL, 30);
        assert!(!c.spinning(), "sleeping measured faster");
        feed(&mut c, RUN, 30);
        assert!(c.spinning(), "spinning is tried again");
        feed(&mut c, TRIAL, 29);
        assert!(!c.spinning(), "3 % faster is a tie: sleeping keeps it");
        feed(&mut c, RUN, 30);
        feed(&mut c, TRIAL, 20);
        assert!(c.spinning(), "a third faster wins it back");
    }

    #[test]
    fn a_pause_counts_as_a_capped_cycle() {
        let mut c = Chooser::default();
        // One 10 s pause among 30 µs cycles while spinning, then sleeping
        // at 200 µs: uncapped, the pause would make spinning look slower.
        c.record(Duration::from_micros(30));
        c.record(Duration::from_secs(10));
        feed(&mut c, RUN - 2, 30);
        feed(&mut c, TRIAL, 200);
        assert!(c.spinning());
    }

    #[tokio::test]
    async fn a_deeper_queue_is_not_spun_for() {
        let (mut a, mut s) = pair();
        a.write_all(b"x").unwrap();
        assert_eq!(s.wait(4).await, Outcome::Slept);
        assert_eq!(s.wait(0).await, Outcome::Slept);
        assert_eq!(s.wait(1).await, Outcome::Request);
    }

    #[tokio::test]
    async fn a_closed_peer_ends_the_spin() {
        let (a, mut s) = pair();
        drop(a);
        assert_eq!(s.wait(1).await, Outcome::Request);
    }
}
