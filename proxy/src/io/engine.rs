//! The file I/O engine: positional reads, writes and fdatasync on one
//! io_uring driven by a dedicated thread.
//!
//! ```text
//!  tokio tasks ──Op──▶ channel ──eventfd wake──▶ ring thread ──SQE──▶ kernel
//!       ▲                                             │
//!       └────────────── oneshot (result, buffer) ◀────┘ CQE
//! ```
//!
//! Submitting takes ownership of the buffer and hands it back with the
//! result, so a buffer is never touched by user code while the kernel owns
//! it. Short reads and writes are resubmitted for the remainder; a read that
//! hits end of file returns the bytes it got. When io_uring cannot be set up
//! (old kernel, seccomp, `io_uring_disabled`), the same thread serves the
//! same ops with pread/pwrite, and the choice is logged once.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use tokio::sync::oneshot;

use super::buf::IoBuf;

/// user_data of the eventfd read that wakes the ring thread.
const WAKE: u64 = u64::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Fdatasync,
}

/// What an op reads into or writes from: a buffer it owns, or (writes
/// only) one shared with others who only read it.
enum OpBuf {
    Owned(IoBuf),
    Shared(Arc<IoBuf>),
}

impl OpBuf {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Owned(b) => b,
            Self::Shared(b) => b,
        }
    }

    /// Reads and receives are only ever submitted with owned buffers.
    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Self::Owned(b) => b,
            Self::Shared(_) => &mut [],
        }
    }
}

struct Op {
    kind: Kind,
    file: Arc<File>,
    offset: u64,
    buf: OpBuf,
    done: usize,
    reply: oneshot::Sender<io::Result<IoBuf>>,
}

impl Op {
    fn finish(self, res: io::Result<()>) {
        let out = res.map(|()| match self.buf {
            OpBuf::Owned(mut b) => {
                if self.kind == Kind::Read {
                    b.truncate(self.done);
                }
                b
            }
            OpBuf::Shared(_) => IoBuf::zeroed(0),
        });
        // The waiter may have gone away (client disconnected); nothing to do.
        let _ = self.reply.send(out);
    }
}

/// Which backend serves the ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    IoUring,
    Sync,
}

/// Handle to the engine thread. Cheap to clone; the thread exits when the
/// last handle is dropped and nothing is in flight.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    tx: Option<mpsc::Sender<Op>>,
    wake: Arc<OwnedFd>,
    backend: Backend,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Drop the sender first so the thread sees the channel disconnected
        // when the wake-up arrives.
        self.tx.take();
        signal(&self.wake);
    }
}

fn signal(fd: &OwnedFd) {
    // An eventfd add; it cannot block short of 2^64 - 1 pending wakes.
    let _ = nix::unistd::write(fd, &1u64.to_ne_bytes());
}

impl Engine {
    /// Starts the engine with an io_uring of `entries` slots, or the sync
    /// fallback if io_uring is unavailable or `force_sync` is set.
    ///
    /// # Errors
    /// Fails only if the eventfd or the thread cannot be created.
    pub fn start(entries: u32, force_sync: bool) -> io::Result<Self> {
        let efd = nix::sys::eventfd::EventFd::from_flags(nix::sys::eventfd::EfdFlags::EFD_CLOEXEC)
            .map_err(io::Error::from)?;
        let wake = Arc::new(OwnedFd::from(efd));
        let (tx, rx) = mpsc::channel();
        let ring = if force_sync {
            None
        } else {
            match IoUring::new(entries.max(8)) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring unavailable, using pread/pwrite");
                    None
                }
            }
        };
        let backend = if ring.is_some() {
            Backend::IoUring
        } else {
            Backend::Sync
        };
        let thread_wake = Arc::clone(&wake);
        std::thread::Builder::new()
            .name("herd-io".into())
            .spawn(move || match ring {
                Some(ring) => uring_loop(ring, &thread_wake, &rx),
                None => sync_loop(&rx),
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                tx: Some(tx),
                wake,
                backend,
            }),
        })
    }

    #[must_use]
    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    async fn submit(
        &self,
        kind: Kind,
        file: &Arc<File>,
        offset: u64,
        buf: OpBuf,
    ) -> io::Result<IoBuf> {
        let (reply, rx) = oneshot::channel();
        let op = Op {
            kind,
            file: Arc::clone(file),
            offset,
            buf,
            done: 0,
            reply,
        };
        let gone = || io::Error::other("io engine stopped");
        self.inner
            .tx
            .as_ref()
            .ok_or_else(gone)?
            .send(op)
            .map_err(|_| gone())?;
        signal(&self.inner.wake);
        rx.await.map_err(|_| gone())?
    }

    /// Reads `buf.len()` bytes at `offset`; the returned buffer is shorter
    /// only at end of file.
    ///
    /// # Errors
    /// The OS error of the failed read.
    pub async fn read_at(&self, file: &Arc<File>, offset: u64, buf: IoBuf) -> io::Result<IoBuf> {
        self.submit(Kind::Read, file, offset, OpBuf::Owned(buf))
            .await
    }

    /// Writes all of `buf` at `offset`.
    ///
    /// # Errors
    /// The OS error of the failed write.
    pub async fn write_at(&self, file: &Arc<File>, offset: u64, buf: IoBuf) -> io::Result<IoBuf> {
        self.submit(Kind::Write, file, offset, OpBuf::Owned(buf))
            .await
    }

    /// Writes all of `buf`, which others may be reading meanwhile, at
    /// `offset` (no copy to hand the engine a buffer of its own).
    ///
    /// # Errors
    /// The OS error of the failed write.
    pub async fn write_shared(
        &self,
        file: &Arc<File>,
        offset: u64,
        buf: Arc<IoBuf>,
    ) -> io::Result<()> {
        self.submit(Kind::Write, file, offset, OpBuf::Shared(buf))
            .await
            .map(drop)
    }

    /// Makes written data durable.
    ///
    /// # Errors
    /// The OS error of the failed fdatasync.
    pub async fn fdatasync(&self, file: &Arc<File>) -> io::Result<()> {
        self.submit(Kind::Fdatasync, file, 0, OpBuf::Owned(IoBuf::zeroed(0)))
            .await
            .map(drop)
    }
}

/// Advances an op after `n` more bytes moved; returns it if more remain.
fn progress(mut op: Op, n: usize) -> Option<Op> {
    if op.kind == Kind::Fdatasync {
        op.finish(Ok(()));
        return None;
    }
    if n == 0 {
        if op.kind == Kind::Read {
            op.finish(Ok(())); // end of file
        } else {
            op.finish(Err(io::ErrorKind::WriteZero.into()));
        }
        return None;
    }
    op.done += n;
    if op.done >= op.buf.bytes().len() {
        op.finish(Ok(()));
        None
    } else {
        Some(op)
    }
}

fn sync_loop(rx: &mpsc::Receiver<Op>) {
    while let Ok(mut op) = rx.recv() {
        loop {
            let off = op.offset + op.done as u64;
            let res = match op.kind {
                Kind::Read => {
                    let done = op.done;
                    op.file.read_at(&mut op.buf.bytes_mut()[done..], off)
                }
                Kind::Write => op.file.write_at(&op.buf.bytes()[op.done..], off),
                Kind::Fdatasync => op.file.sync_data().map(|()| 0),
            };
            match res {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    op.finish(Err(e));
                    break;
                }
                Ok(n) => match progress(op, n) {
                    Some(more) => op = more,
                    None => break,
                },
            }
        }
    }
}

fn sqe_for(op: &mut Op, key: u64) -> io_uring::squeue::Entry {
    let fd = types::Fd(op.file.as_raw_fd());
    let off = op.offset + op.done as u64;
    let remaining = u32::try_from(op.buf.bytes().len() - op.done).unwrap_or(u32::MAX);
    let entry = match op.kind {
        // SAFETY (for both pointer ops): the pointer stays valid until the
        // CQE arrives, because the op (owning the buffer) sits in the slab.
        Kind::Read => {
            let done = op.done;
            opcode::Read::new(fd, op.buf.bytes_mut()[done..].as_mut_ptr(), remaining)
                .offset(off)
                .build()
        }
        Kind::Write => opcode::Write::new(fd, op.buf.bytes()[op.done..].as_ptr(), remaining)
            .offset(off)
            .build(),
        Kind::Fdatasync => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
    };
    entry.user_data(key)
}

fn uring_loop(mut ring: IoUring, wake: &OwnedFd, rx: &mpsc::Receiver<Op>) {
    let cap = ring.params().sq_entries() as usize;
    let mut slab: Vec<Option<Op>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut in_flight = 0usize;
    let mut backlog: VecDeque<Op> = VecDeque::new();
    let mut wake_buf = [0u8; 8];
    let mut wake_armed = false;
    let mut disconnected = false;
    let mut completions: Vec<(u64, i32)> = Vec::new();

    loop {
        if !wake_armed && !disconnected {
            let e = opcode::Read::new(types::Fd(wake.as_raw_fd()), wake_buf.as_mut_ptr(), 8)
                .build()
                .user_data(WAKE);
            // SAFETY: wake_buf lives as long as this function, past the CQE.
            if unsafe { ring.submission().push(&e) }.is_ok() {
                wake_armed = true;
            }
        }
        // Keep one slot for the wake read.
        while in_flight + 1 < cap {
            let Some(mut op) = backlog.pop_front() else {
                break;
            };
            let key = free.pop().unwrap_or_else(|| {
                slab.push(None);
                slab.len() - 1
            });
            let e = sqe_for(&mut op, key as u64);
            slab[key] = Some(op);
            // SAFETY: the buffer and fd are kept alive by the op in the slab.
            if unsafe { ring.submission().push(&e) }.is_err() {
                if let Some(op) = slab[key].take() {
                    backlog.push_front(op);
                }
                free.push(key);
                break;
            }
            in_flight += 1;
        }
        if disconnected && in_flight == 0 && backlog.is_empty() {
            return;
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => {
                tracing::error!(error = %e, "io_uring submit failed; failing queued ops");
                for op in backlog.drain(..) {
                    op.finish(Err(io::Error::other("io_uring submit failed")));
                }
            }
        }
        completions.clear();
        completions.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        for &(key, res) in &completions {
            if key == WAKE {
                wake_armed = false;
                loop {
                    match rx.try_recv() {
                        Ok(op) => backlog.push_back(op),
                        Err(mpsc::TryRecvError::Empty) => break,
                        Err(mpsc::TryRecvError::Disconnected) => {
                            disconnected = true;
                            break;
                        }
                    }
                }
                continue;
            }
            let Some(op) = usize::try_from(key)
                .ok()
                .and_then(|k| slab.get_mut(k))
                .and_then(Option::take)
            else {
                continue;
            };
            in_flight -= 1;
            free.push(usize::try_from(key).unwrap_or(0));
            if res < 0 {
                if -res == libc::EINTR || -res == libc::EAGAIN {
                    backlog.push_back(op);
                } else {
                    op.finish(Err(io::Error::from_raw_os_error(-res)));
                }
                continue;
            }
            if let Some(more) = progress(op, usize::try_from(res).unwrap_or(0)) {
                backlog.push_back(more);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    async fn exercise(engine: &Engine) {
        let dir = std::env::temp_dir().join(format!(
            "herd-engine-{}-{:?}",
            std::process::id(),
            engine.backend()
        ));
        let _ = std::fs::remove_file(&dir);
        let mut f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&dir)
            .expect("create temp file");
        f.write_all(&[1u8; 10000]).expect("fill");
        let f = Arc::new(f);
        let w = engine
            .write_at(&f, 100, IoBuf::from_slice(&[9u8; 50]))
            .await
            .expect("write");
        assert_eq!(w.len(), 50);
        engine.fdatasync(&f).await.expect("sync");
        let r = engine
            .read_at(&f, 90, IoBuf::zeroed(70))
            .await
            .expect("read");
        assert_eq!(&r[..10], &[1u8; 10]);
        assert_eq!(&r[10..60], &[9u8; 50]);
        assert_eq!(&r[60..], &[1u8; 10]);
        // A read across end of file is short, not an error.
        let tail = engine
            .read_at(&f, 9990, IoBuf::zeroed(100))
            .await
            .expect("tail");
        assert_eq!(tail.len(), 10);
        // Many concurrent ops all complete with the right data.
        let mut tasks = Vec::new();
        for i in 0..200u64 {
            let e = engine.clone();
            let f = Arc::clone(&f);
            tasks.push(tokio::spawn(async move {
                let r = e
                    .read_at(&f, i * 10, IoBuf::zeroed(10))
                    .await
                    .expect("read");
                (i, r[0])
            }));
        }
        for t in tasks {
            let (i, b) = t.await.expect("join");
            let expect = if (10..15).contains(&i) { 9 } else { 1 };
            assert_eq!(b, expect, "block {i}");
        }
        let _ = std::fs::remove_file(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uring_engine_reads_and_writes() {
        let e = Engine::start(64, false).expect("engine");
        if std::env::var_os("HERD_STRICT").is_some() {
            assert_eq!(e.backend(), Backend::IoUring, "io_uring is required in CI");
        }
        exercise(&e).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sync_engine_reads_and_writes() {
        let e = Engine::start(64, true).expect("engine");
        assert_eq!(e.backend(), Backend::Sync);
        exercise(&e).await;
    }
}
