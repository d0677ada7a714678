//! Upstreams: where a proxy gets the bytes it does not have.
//!
//! ```text
//!            Upstream (size, read_at)
//!            ├── FileUpstream   local file or block device, io_uring (the root)
//!            ├── IscsiUpstream  iSCSI initiator to a LIO / tgt LUN (the root)
//!            ├── NbdUpstream    NBD client pool to a parent proxy / qemu-nbd / nbdkit
//!            └── FailoverUpstream  ordered NBD parents: a lost or stalled read
//!                                  goes to the next (`failover`, `health`)
//! ```
//!
//! The cache only ever asks for whole chunks, so an upstream sees few,
//! large, aligned reads.

pub mod failover;
pub mod file;
pub mod health;
pub mod iscsi;
pub mod nbd;
pub mod nbd_map;
pub mod seeded;
pub mod url;

use std::future::Future;
use std::pin::Pin;

use thiserror::Error;

use crate::io::IoBuf;

pub use self::url::UpstreamUrl;

/// Why an upstream read or open failed.
#[derive(Debug, Error)]
pub enum UpstreamError {
    #[error("cannot open {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("read of {len} bytes at offset {offset} failed")]
    Read {
        offset: u64,
        len: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("read of {len} bytes at offset {offset} is past the end of the {size}-byte image")]
    OutOfRange { offset: u64, len: usize, size: u64 },
    #[error("cannot reach parent {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} has no export named `{export}`")]
    NoSuchExport { addr: String, export: String },
    #[error("NBD handshake with {addr} failed: {reason}")]
    Handshake { addr: String, reason: String },
    #[error("parent answered errno {errno} for {len} bytes at offset {offset}")]
    Remote { offset: u64, len: usize, errno: u32 },
    #[error("connection to parent {addr} lost")]
    ConnectionLost { addr: String },
    #[error("iSCSI target {addr}")]
    Iscsi {
        addr: String,
        #[source]
        source: crate::iscsi::IscsiError,
    },
    #[error("{op} on {addr} failed")]
    Scsi {
        addr: String,
        op: &'static str,
        #[source]
        source: iscsi::CommandError,
    },
}

pub type UpstreamResult<T> = Result<T, UpstreamError>;

pub type ReadFuture<'a> = Pin<Box<dyn Future<Output = UpstreamResult<IoBuf>> + Send + 'a>>;

/// Byte ranges (offset, length) that may hold data; the rest of the image
/// reads as zeros. `None`: the source cannot tell.
pub type Extents = Option<Vec<(u64, u64)>>;
pub type ExtentsFuture<'a> = Pin<Box<dyn Future<Output = UpstreamResult<Extents>> + Send + 'a>>;

/// A read-only source of image bytes.
pub trait Upstream: Send + Sync {
    /// Image size in bytes.
    fn size(&self) -> u64;

    /// Reads exactly `len` bytes at `offset`; the range lies within `size()`.
    fn read_at(&self, offset: u64, len: usize) -> ReadFuture<'_>;

    /// Short human description for logs ("file:/srv/golden.img").
    fn describe(&self) -> String;

    /// What kind of source this is, for the digest-failure metric's label:
    /// `image` (the image itself: a file or LUN) or `parent` (a server).
    fn source_kind(&self) -> &'static str {
        "parent"
    }

    /// Where the image may hold data, if the source can say (a sparse
    /// file's `SEEK_DATA`, a server's block status). Asked once, by the
    /// manifest builder, which then reads only those ranges.
    fn extents(&self) -> ExtentsFuture<'_> {
        Box::pin(std::future::ready(Ok(None)))
    }
}
