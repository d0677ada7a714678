//! Zero-copy replies: a large READ served from the cache leaves with its
//! header sent `MSG_MORE` and its data `sendfile`d from the cache file's
//! page cache, so the bytes are copied once (into the client) instead of
//! twice (file → buffer → socket).
//!
//! The sender owns a `dup` of the client socket, registered with the
//! runtime for writability only; the connection's writer task is the only
//! one that writes, so its ordinary writes and these never interleave.
//! Callers check residency first (`io::pagecache`): `sendfile` on a cold
//! page would block the worker thread on the disk.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

pub struct ZeroCopy {
    /// Shared with the connection's spin, which only peeks at it.
    sock: AsyncFd<Arc<OwnedFd>>,
}

impl ZeroCopy {
    /// Registers `sock` (a dup of the connection's socket).
    ///
    /// # Errors
    /// The runtime could not register the descriptor.
    pub fn new(sock: Arc<OwnedFd>) -> io::Result<Self> {
        // SAFETY: an OwnedFd is open and keeps its descriptor until its
        // last Arc drops, and the AsyncFd holds one.
        let sock = unsafe { AsyncFd::register_with_interest(sock, Interest::WRITABLE) }
            .map_err(io::Error::from)?;
        Ok(Self { sock })
    }

    /// Sends `head` then `len` bytes of `file` at `offset`.
    ///
    /// # Errors
    /// Socket errors, or `UnexpectedEof` if the file is shorter than asked.
    pub async fn send(&self, head: &[u8], file: &File, offset: u64, len: usize) -> io::Result<()> {
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
