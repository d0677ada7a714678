//! Large READs served from resident cache: the header goes out `MSG_MORE`
//! and the data is `sendfile`d from the cache file's page cache, so the
//! bytes are copied once (into the client) instead of twice (file →
//! buffer → socket); or, while several clients on this host stream at
//! once, hits of [`COPY_MIN`] or more are copied into the socket by herd
//! (`hit_send`, DESIGN.md "How hits leave").
//!
//! Why the copy: a client on this host receives `sendfile`d bytes by
//! copying them out of the page-cache pages themselves, and with two such
//! streams at once that receive cost 2.5 times the CPU per byte it does
//! when herd copies (fio, two 1 MiB readers, 3500 MiB/s against 6000,
//! either client alone 5300–6300 against 4300). A client across a network
//! gets the pages from the NIC, which copies nothing on this host: always
//! `sendfile`.
//!
//! The sender owns a `dup` of the client socket, registered with the
//! runtime for writability only; the connection's writer task is the only
//! one that writes, so its ordinary writes and these never interleave.
//! Callers check residency first (`io::pagecache`): `sendfile` or a read
//! of a cold page would block the worker thread on the disk.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::io::IoBuf;

/// How large resident hits leave: `hit_send` in the configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HitSend {
    /// `sendfile`, but hits of [`COPY_MIN`] or more are copied while two
    /// or more connections from this host have large hits queued.
    #[default]
    Auto,
    /// Always `sendfile`.
    Sendfile,
    /// Always copied (a read from the page cache, then a send).
    Copy,
}

impl std::str::FromStr for HitSend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "sendfile" => Ok(Self::Sendfile),
            "copy" => Ok(Self::Copy),
            other => Err(format!("`{other}` is not auto, sendfile or copy")),
        }
    }
}

/// Connections from this host that have large hits queued, every export.
/// Signed: a connection's decrement may land before its increment.
static LOCAL_STREAMS: AtomicIsize = AtomicIsize::new(0);

/// A copied hit is read and sent in pieces of at most this much: one
/// buffer, not one as large as the request. Smaller pieces cost the
/// client: at 128 or 256 KiB fio's system time tripled (more, smaller
/// receives) for 2-7 % less throughput.
pub const COPY_PIECE: usize = 1 << 20;

/// Under `auto`, hits smaller than this are `sendfile`d even while
/// several local clients stream: two fio readers of 64 KiB (QD4 each) got
/// 3570–3740 MiB/s copied against 3721–3816 spliced, and a relay's leaf
/// fetching 64 KiB chunks from a root on its host lost a seventh; at 128
/// KiB the copy gave 1.04–1.06×, at 256 KiB 1.45×.
pub const COPY_MIN: usize = 128 << 10;

/// How a large hit left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sent {
    Spliced,
    Copied,
}

/// One connection's count of queued large hits; the reader takes a
/// [`Stream`] for each, the writer reads the host-wide count.
#[derive(Clone)]
pub struct Streams {
    queued: Arc<AtomicUsize>,
    /// The client is on this host (a Unix socket, loopback, or our own
    /// address): only such connections count host-wide and copy.
    local: bool,
}

impl Streams {
    /// Marks one large hit queued until the [`Stream`] drops.
    #[must_use]
    pub fn enter(&self) -> Stream {
        if self.queued.fetch_add(1, Ordering::AcqRel) == 0 && self.local {
            let n = LOCAL_STREAMS.fetch_add(1, Ordering::AcqRel) + 1;
            crate::metrics::local_streams(n.max(0).unsigned_abs());
        }
        Stream(self.clone())
    }
}

/// A queued large hit (see [`Streams::enter`]).
pub struct Stream(Streams);

impl Drop for Stream {
    fn drop(&mut self) {
        if self.0.queued.fetch_sub(1, Ordering::AcqRel) == 1 && self.0.local {
            let n = LOCAL_STREAMS.fetch_sub(1, Ordering::AcqRel) - 1;
            crate::metrics::local_streams(n.max(0).unsigned_abs());
        }
    }
}

/// Whether the peer of `fd` runs on this host.
fn peer_is_local(fd: BorrowedFd<'_>) -> bool {
    let sock = socket2::SockRef::from(&fd);
    let Ok(peer) = sock.peer_addr() else {
        return false;
    };
    if peer.is_unix() {
        return true;
    }
    let ip = |a: socket2::SockAddr| a.as_socket().map(|s| s.ip().to_canonical());
    let Some(peer_ip) = ip(peer) else {
        return false;
    };
    peer_ip.is_loopback() || sock.local_addr().ok().and_then(ip) == Some(peer_ip)
}

pub struct ZeroCopy {
    /// Shared with the connection's spin, which only peeks at it.
    sock: AsyncFd<Arc<OwnedFd>>,
    mode: HitSend,
    streams: Streams,
    /// The copy's buffer, kept from one copied hit to the next: the
    /// shared pool (8 MiB in all) is often full of other sizes, and a
    /// fresh 1 MiB each time cost page faults and zeroing, 1.5 cores for
    /// 2150 MiB/s against 1.1 for 5600.
    buf: Option<IoBuf>,
}

impl ZeroCopy {
    /// Registers `sock` (a dup of the connection's socket).
    ///
    /// # Errors
    /// The runtime could not register the descriptor.
    pub fn new(sock: Arc<OwnedFd>, mode: HitSend) -> io::Result<Self> {
        let streams = Streams {
            queued: Arc::new(AtomicUsize::new(0)),
            local: peer_is_local(sock.as_fd()),
        };
        // SAFETY: an OwnedFd is open and keeps its descriptor until its
        // last Arc drops, and the AsyncFd holds one.
        let sock = unsafe { AsyncFd::register_with_interest(sock, Interest::WRITABLE) }
            .map_err(io::Error::from)?;
        Ok(Self {
            sock,
            mode,
            streams,
            buf: None,
        })
    }

    /// The handle the connection's reader counts its large hits with.
    #[must_use]
    pub fn streams(&self) -> Streams {
        self.streams.clone()
    }

    /// Whether a large hit of `len` bytes is copied rather than
    /// `sendfile`d (see the module doc and [`COPY_MIN`]).
    #[must_use]
    pub fn copies(&self, len: usize) -> bool {
        match self.mode {
            HitSend::Sendfile => false,
            HitSend::Copy => true,
            HitSend::Auto => {
                len >= COPY_MIN && self.streams.local && LOCAL_STREAMS.load(Ordering::Acquire) >= 2
            }
        }
    }

    /// The buffer a copied hit of `len` bytes is read into, at least
    /// `len` or [`COPY_PIECE`] long, whichever is less: the one kept from
    /// the last copied hit if it is large enough, or a new one (a power of
    /// two, so hits of nearby sizes share it). Give it back with
    /// [`Self::keep_buf`].
    pub fn take_buf(&mut self, len: usize) -> IoBuf {
        let want = len.clamp(1, COPY_PIECE);
        match self.buf.take() {
            Some(b) if b.len() >= want => b,
            _ => IoBuf::scratch(want.next_power_of_two().min(COPY_PIECE)),
        }
    }

    /// Keeps the copy's buffer until the connection ends, whichever way
    /// the hits between leave: dropped at each `sendfile`d hit, or taken
    /// from the shared pool each time, it was faulted in and zeroed afresh
    /// for most copies (DESIGN.md, "How hits leave").
    pub fn keep_buf(&mut self, buf: IoBuf) {
        self.buf = Some(buf);
    }

    /// Sends `head` (`MSG_MORE`) then `len` bytes of `file` at `offset`
    /// by `sendfile` (the caller copies instead when [`Self::copies`]).
    ///
    /// # Errors
    /// Socket errors, or `UnexpectedEof` if the file is shorter than asked.
    pub async fn sendfile(
        &mut self,
        head: &[u8],
        file: &File,
        offset: u64,
        len: usize,
    ) -> io::Result<()> {
        let mut sent = 0;
        while sent < head.len() {
            let rest = &head[sent..];
            sent += self
                .write_with(|fd| {
                    // nix names no MSG_MORE; the bits are the kernel's.
                    let flags = nix::sys::socket::MsgFlags::from_bits_retain(
                        libc::MSG_MORE | libc::MSG_NOSIGNAL,
                    );
                    nix::sys::socket::send(fd.as_raw_fd(), rest, flags).map_err(io::Error::from)
                })
                .await?;
        }
        let mut off = i64::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let mut left = len;
        while left > 0 {
            let n = self
                .write_with(|fd| {
                    // No flags here, unlike send: a closed peer's SIGPIPE
                    // is ignored by the Rust runtime, and EPIPE comes back.
                    nix::sys::sendfile::sendfile(fd, file, Some(&mut off), left)
                        .map_err(io::Error::from)
                })
                .await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            left -= n;
        }
        Ok(())
    }

    /// Runs `op` when the socket is writable, retrying after `EAGAIN`.
    async fn write_with(
        &self,
        mut op: impl FnMut(BorrowedFd<'_>) -> io::Result<usize>,
    ) -> io::Result<usize> {
        loop {
            let mut ready = self.sock.writable().await?;
            match ready.try_io(|s| op(s.get_ref().as_fd())) {
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(r) => return r,
                Err(_would_block) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    /// The copy's buffer survives a `sendfile`d hit: dropped there, a
    /// relay's parent connections faulted in a fresh 1 MiB for most copies.
    #[tokio::test]
    async fn copy_buffer_is_kept_across_sendfile() {
        let (ours, mut theirs) = UnixStream::pair().expect("socket pair");
        ours.set_nonblocking(true).expect("non-blocking");
        let mut z = ZeroCopy::new(Arc::new(OwnedFd::from(ours)), HitSend::Auto).expect("register");

        let buf = z.take_buf(64 << 10);
        assert_eq!(buf.len(), 64 << 10, "sized to the hit, not to COPY_PIECE");
        let kept = buf.as_ptr();
        z.keep_buf(buf);

        let dir = std::env::var("CARGO_TARGET_TMPDIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|_| std::env::temp_dir());
        let path = dir.join(format!("herd-zerocopy-{}", std::process::id()));
        let mut f = File::create(&path).expect("create");
        f.write_all(&[7u8; 8192]).expect("write");
        let f = File::open(&path).expect("open");
        z.sendfile(b"head", &f, 4096, 4096).await.expect("sendfile");
        let _ = std::fs::remove_file(&path);
        let mut got = vec![0u8; 4 + 4096];
        theirs.read_exact(&mut got).expect("read");
        assert_eq!(&got[..4], b"head");
        assert!(got[4..].iter().all(|&b| b == 7));

        let buf = z.take_buf(4096);
        assert_eq!(buf.as_ptr(), kept, "the buffer kept across sendfile");
        z.keep_buf(buf);
        let buf = z.take_buf(4 * COPY_PIECE);
        assert_eq!(
            buf.len(),
            COPY_PIECE,
            "a larger hit gets a COPY_PIECE buffer"
        );
        assert_ne!(buf.as_ptr(), kept, "too small: replaced");
    }
}
