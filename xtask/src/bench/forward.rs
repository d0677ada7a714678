//! A TCP forwarder that only moves bytes: the relay that does nothing.
//!
//! The dataplane bench puts it between fio and a warm herd root, where a
//! relay would sit. It parses nothing and caches nothing, and moves each
//! byte with `splice(2)` through a pipe, so no copy passes through user
//! space: what it reaches is what the same two loopback crossings allow a
//! middle process that does no work (a reference for the relay rows, not a
//! bound: a relay that fetches ahead can beat it).

use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};

use anyhow::{Context, Result};
use nix::fcntl::{fcntl, splice, FcntlArg, SpliceFFlags};

/// Bytes one `splice` moves at most, and the pipe's size.
const PIECE: usize = 1 << 20;

/// Accepts on 127.0.0.1:`listen` and forwards each connection to
/// 127.0.0.1:`to`, until killed.
pub fn run(listen: u16, to: u16) -> Result<()> {
    let l = TcpListener::bind(("127.0.0.1", listen)).with_context(|| format!("bind {listen}"))?;
    for c in l.incoming() {
        let down = c.context("accept")?;
        let up = TcpStream::connect(("127.0.0.1", to)).with_context(|| format!("connect {to}"))?;
        for s in [&down, &up] {
            s.set_nodelay(true)?;
        }
        let (down2, up2) = (down.try_clone()?, up.try_clone()?);
        std::thread::spawn(move || pump(&down, &up));
        std::thread::spawn(move || pump(&up2, &down2));
    }
    Ok(())
}

/// Moves bytes from `from` to `to` until `from` ends or either fails, then
/// passes the end on.
fn pump(from: &TcpStream, to: &TcpStream) {
    if let Err(e) = pump_until_end(from, to) {
        eprintln!("forward: {e:#}");
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

fn pump_until_end(from: &TcpStream, to: &TcpStream) -> Result<()> {
    let (r, w): (OwnedFd, OwnedFd) = nix::unistd::pipe().context("pipe")?;
    // A 1 MiB pipe lets one splice carry a whole 1 MiB reply; an
    // unprivileged limit may refuse it, and the default 64 KiB still works.
    let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(PIECE as nix::libc::c_int));
    loop {
        let n = splice(
            from.as_fd(),
            None,
            &w,
            None,
            PIECE,
            SpliceFFlags::SPLICE_F_MOVE,
        )
        .context("splice from the socket")?;
        if n == 0 {
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            left -= splice(
                &r,
                None,
                to.as_fd(),
                None,
                left,
                SpliceFFlags::SPLICE_F_MOVE,
            )
            .context("splice to the socket")?;
        }
    }
}
