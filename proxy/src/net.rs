//! Sockets: one boxed stream type over TCP and Unix sockets, the listener
//! for `--listen host:port | unix:PATH`, and a free loopback port for the
//! tests and benches that start daemons.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};

/// A byte stream the NBD code can drive, whatever the transport.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// What it is underneath: a plain TCP stream can move to a ring.
    fn as_any(&self) -> &dyn std::any::Any;
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send>;
}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
        self
    }
}

pub type BoxStream = Box<dyn Stream>;

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(String),
    Unix(PathBuf),
}

#[derive(Debug, Error)]
pub enum NetError {
    #[error("listen address `{0}` is neither host:port nor unix:PATH")]
    BadAddr(String),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

impl std::str::FromStr for ListenAddr {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Self, NetError> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(NetError::BadAddr(s.to_owned()));
            }
            return Ok(Self::Unix(PathBuf::from(p)));
        }
        match s.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {
                Ok(Self::Tcp(s.to_owned()))
            }
            _ => Err(NetError::BadAddr(s.to_owned())),
        }
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => f.write_str(a),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds; a stale Unix socket file from a previous run is replaced.
    ///
    /// # Errors
    /// `Bind` with the OS error.
    pub async fn bind(addr: &ListenAddr) -> Result<Self, NetError> {
        let bind_err = |source| NetError::Bind {
            addr: addr.to_string(),
            source,
        };
        match addr {
            ListenAddr::Tcp(a) => Ok(Self::Tcp(TcpListener::bind(a).await.map_err(bind_err)?)),
            ListenAddr::Unix(p) => {
                if std::fs::symlink_metadata(p)
                    .map(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                    .unwrap_or(false)
                {
                    let _ = std::fs::remove_file(p);
                }
                Ok(Self::Unix(
                    UnixListener::bind(p).map_err(bind_err)?,
                    p.clone(),
                ))
            }
        }
    }

    /// The bound address (with the real port when 0 was asked).
    #[must_use]
    pub fn local_addr(&self) -> String {
        match self {
            Self::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "?".into(), |a| a.to_string()),
            Self::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }

    /// Accepts one connection.
    ///
    /// # Errors
    /// The OS error of accept.
    pub async fn accept(&self) -> std::io::Result<Accepted> {
        match self {
            Self::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                s.set_nodelay(true)?;
                let dup = s.as_fd().try_clone_to_owned().ok();
                Ok(Accepted {
                    socket: Socket::Tcp(s.into_std()?),
                    peer: peer.to_string(),
                    ip: Some(peer.ip().to_canonical()),
                    dup,
                })
            }
            Self::Unix(l, p) => {
                let (s, _) = l.accept().await?;
                let dup = s.as_fd().try_clone_to_owned().ok();
                Ok(Accepted {
                    socket: Socket::Unix(s.into_std()?),
                    peer: format!("unix:{}", p.display()),
                    ip: None,
                    dup,
                })
            }
        }
    }
}

/// An accepted socket, not yet in any runtime's reactor: it is registered
/// by `into_stream` on the thread that will serve it (`cores`).
pub enum Socket {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl Socket {
    /// The socket as a stream of the current runtime.
    ///
    /// # Errors
    /// When the reactor cannot take it.
    pub fn into_stream(self) -> std::io::Result<BoxStream> {
        Ok(match self {
            Self::Tcp(s) => Box::new(tokio::net::TcpStream::from_std(s)?),
            Self::Unix(s) => Box::new(tokio::net::UnixStream::from_std(s)?),
        })
    }
}

/// An accepted connection.
pub struct Accepted {
    pub socket: Socket,
    /// For logs: `ip:port` or `unix:PATH`.
    pub peer: String,
    /// The client's address (IPv4-mapped IPv6 as IPv4); `None` on a Unix
    /// socket.
    pub ip: Option<std::net::IpAddr>,
    /// A `dup` of the socket for zero-copy sends (`None` if dup failed: the
    /// connection then simply copies).
    pub dup: Option<OwnedFd>,
}

/// A loopback TCP port that nothing listens on, for a daemon about to be
/// started (tests, benches). Taken below the kernel's ephemeral range
/// (32768–60999 by default): a port handed out by `bind(:0)` can be taken
/// by any outgoing connection before the daemon binds it, which made
/// parallel tests flake with "Address already in use". Another picker can
/// still race for the same port, so callers retry a daemon that lost.
///
/// # Errors
/// No port free in the range, and `bind(:0)` failing too.
pub fn unused_port() -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = u64::from(std::process::id()).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
    for _ in 0..256 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut x = seed ^ n.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x ^= x >> 31;
        let port = 20_000 + u16::try_from(x % 12_000).unwrap_or(0);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listen_addresses() {
        assert_eq!(
            "127.0.0.1:10809".parse::<ListenAddr>().ok(),
            Some(ListenAddr::Tcp("127.0.0.1:10809".into()))
        );
        assert_eq!(
            "[::1]:1".parse::<ListenAddr>().ok(),
            Some(ListenAddr::Tcp("[::1]:1".into()))
        );
        assert_eq!(
            "unix:/run/h.sock".parse::<ListenAddr>().ok(),
            Some(ListenAddr::Unix("/run/h.sock".into()))
        );
        assert!("nohost".parse::<ListenAddr>().is_err());
        assert!("h:notaport".parse::<ListenAddr>().is_err());
        assert!("unix:".parse::<ListenAddr>().is_err());
    }
}
