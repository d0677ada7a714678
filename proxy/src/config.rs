//! `herd serve` settings: a TOML file (`--config`) and command-line flags
//! with the same names; flags win.
//!
//! ```toml
//! upstream = "nbd://10.0.0.1:10809/golden"   # or a path, file://, nbd+unix://
//! listen = ["0.0.0.0:10809", "unix:/run/herd.sock"]
//! cache_dir = "/var/cache/herd"
//! export_name = "golden"
//! chunk_size = "64KiB"
//! metrics = "127.0.0.1:9100"
//! connections = 4
//! direct_io = true
//! parent_timeout = 30   # seconds to wait for the parent at startup
//! read_ahead = "256KiB" # fetched ahead of a sequential reader that misses
//! iscsi_secret_file = "/etc/herd/chap.secret"   # for iscsi://USER@…
//! iscsi_initiator = "iqn.2026-11.dev.herd:host1"
//! iscsi_recovery = 30    # seconds reads wait for a lost target
//! iscsi_digests = false  # offer CRC32C header/data digests
//! iscsi_socket = "epoll" # or "uring": what drives the session socket
//! profile = "/etc/herd/boot.profile"  # root only: children learn it from the parent
//! manifest = "/srv/golden.img.herd-manifest"  # root only: made by `herd manifest build`
//! record_profile = "/var/lib/herd/seen.profile"  # record what clients read
//! prefetch = "profile"   # "none", "profile" (default) or "full" (profile, then all)
//! prefetch_concurrency = 2  # upstream reads prefetch keeps in flight
//! prefetch_rate = "50MiB"   # optional cap, bytes per second
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::net::ListenAddr;
use crate::size::parse_size;
use crate::upstream::UpstreamUrl;

/// 64 KiB: a Debian boot moves 1.25x the bytes it reads at 64 KiB, 2.0x at
/// 256 KiB and 3.1x at 1 MiB, with the same boot time (DESIGN.md).
pub const DEFAULT_CHUNK: u32 = 64 << 10;
pub const DEFAULT_EXPORT: &str = "herd";
pub const DEFAULT_CONNECTIONS: usize = 4;
/// Read-ahead for sequential misses: small, because every level of a tree
/// reads ahead and a boot should move only what it reads (DESIGN.md).
pub const DEFAULT_READ_AHEAD: u64 = 256 << 10;
/// Seconds to wait for a parent at startup: proxies of a tree start in any
/// order, so a child outlives a parent that comes up a little later.
pub const DEFAULT_PARENT_TIMEOUT: u64 = 30;

/// The file as written: every key optional so flags can fill the gaps.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub upstream: Option<String>,
    pub listen: Option<Vec<String>>,
    pub cache_dir: Option<PathBuf>,
    pub export_name: Option<String>,
    pub chunk_size: Option<String>,
    pub metrics: Option<String>,
    pub connections: Option<usize>,
    pub direct_io: Option<bool>,
    pub parent_timeout: Option<u64>,
    pub read_ahead: Option<String>,
    pub iscsi_secret_file: Option<PathBuf>,
    pub iscsi_initiator: Option<String>,
    pub iscsi_recovery: Option<u64>,
    pub iscsi_digests: Option<bool>,
    pub iscsi_socket: Option<String>,
    pub profile: Option<PathBuf>,
    pub manifest: Option<PathBuf>,
    pub record_profile: Option<PathBuf>,
    pub prefetch: Option<String>,
    pub prefetch_concurrency: Option<usize>,
    pub prefetch_rate: Option<String>,
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub upstream: UpstreamUrl,
    pub listen: Vec<ListenAddr>,
    pub cache_dir: PathBuf,
    pub export_name: String,
    pub chunk_size: u32,
    pub metrics: Option<String>,
    pub connections: usize,
    pub direct_io: bool,
    /// How long to keep retrying an unreachable parent at startup.
    pub parent_timeout: std::time::Duration,
    /// Bytes fetched ahead of a sequential reader that misses (0: off).
    pub read_ahead: u64,
    pub iscsi: IscsiSettings,
    /// Boot profile to prefetch and hand to children (root).
    pub profile: Option<PathBuf>,
    /// The image's manifest, made ahead of time (a root, or a node over a
    /// server that is not herd); children get theirs from the parent.
    pub manifest: Option<PathBuf>,
    /// Where the daemon-side recorder writes what clients read.
    pub record_profile: Option<PathBuf>,
    pub prefetch: PrefetchSettings,
}

/// What a proxy fetches ahead of demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefetchMode {
    None,
    /// The boot profile's chunks, in first-access order.
    Profile,
    /// The profile, then every other chunk.
    Full,
}

#[derive(Debug, Clone, Copy)]
pub struct PrefetchSettings {
    pub mode: PrefetchMode,
    /// Upstream reads prefetch keeps in flight (each up to 128 KiB): this
    /// bounds how long a demand read can wait behind prefetch on a slow link.
    pub concurrency: usize,
    /// Bytes per second, if capped.
    pub rate: Option<u64>,
}

pub const DEFAULT_PREFETCH_CONCURRENCY: usize = 2;

/// iSCSI initiator settings (used with an `iscsi://` upstream).
#[derive(Debug, Clone)]
pub struct IscsiSettings {
    pub secret_file: Option<PathBuf>,
    pub initiator: String,
    /// How long reads wait for a lost target to come back.
    pub recovery: std::time::Duration,
    /// Offer CRC32C header and data digests.
    pub digests: bool,
    /// Drive the session socket with io_uring instead of epoll.
    pub uring_socket: bool,
}

pub const DEFAULT_INITIATOR: &str = "iqn.2026-11.dev.herd:initiator";

impl IscsiSettings {
    /// The CHAP secret (see [`chap_secret`]).
    ///
    /// # Errors
    /// As [`chap_secret`].
    pub fn secret(&self) -> Result<Vec<u8>, ConfigError> {
        chap_secret(self.secret_file.as_deref())
    }
}

/// The CHAP secret: the first line of `file`, else `HERD_ISCSI_SECRET`.
///
/// # Errors
/// `Read` if the file cannot be read; `Missing` if neither is set.
pub fn chap_secret(file: Option<&Path>) -> Result<Vec<u8>, ConfigError> {
    if let Some(p) = file {
        let s = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
            path: p.to_owned(),
            source,
        })?;
        return Ok(s.lines().next().unwrap_or_default().as_bytes().to_vec());
    }
    std::env::var("HERD_ISCSI_SECRET")
        .map(String::into_bytes)
        .map_err(|_| ConfigError::Missing("iscsi_secret_file"))
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("missing setting `{0}` (give --{flag} or `{0} = …` in the config file)", flag = .0.replace('_', "-"))]
    Missing(&'static str),
    #[error("invalid `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

impl FileConfig {
    /// Reads and parses a TOML file; parse errors quote the line.
    ///
    /// # Errors
    /// `Read` or `Parse`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses TOML text.
    ///
    /// # Errors
    /// The parser's message, which names line, column and key.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }

    /// Overlays `other` (flags) on `self` (file).
    #[must_use]
    pub fn merge(self, other: Self) -> Self {
        Self {
            upstream: other.upstream.or(self.upstream),
            listen: other.listen.filter(|l| !l.is_empty()).or(self.listen),
            cache_dir: other.cache_dir.or(self.cache_dir),
            export_name: other.export_name.or(self.export_name),
            chunk_size: other.chunk_size.or(self.chunk_size),
            metrics: other.metrics.or(self.metrics),
            connections: other.connections.or(self.connections),
            direct_io: other.direct_io.or(self.direct_io),
            parent_timeout: other.parent_timeout.or(self.parent_timeout),
            read_ahead: other.read_ahead.or(self.read_ahead),
            iscsi_secret_file: other.iscsi_secret_file.or(self.iscsi_secret_file),
            iscsi_initiator: other.iscsi_initiator.or(self.iscsi_initiator),
            iscsi_recovery: other.iscsi_recovery.or(self.iscsi_recovery),
            iscsi_digests: other.iscsi_digests.or(self.iscsi_digests),
            iscsi_socket: other.iscsi_socket.or(self.iscsi_socket),
            profile: other.profile.or(self.profile),
            manifest: other.manifest.or(self.manifest),
            record_profile: other.record_profile.or(self.record_profile),
            prefetch: other.prefetch.or(self.prefetch),
            prefetch_concurrency: other.prefetch_concurrency.or(self.prefetch_concurrency),
            prefetch_rate: other.prefetch_rate.or(self.prefetch_rate),
        }
    }

    /// Checks and converts every setting.
    ///
    /// # Errors
    /// `Missing` or `Invalid`, naming the key.
    pub fn validate(self) -> Result<ServeConfig, ConfigError> {
        let inv = |key, message: String| ConfigError::Invalid { key, message };
        let upstream = self
            .upstream
            .ok_or(ConfigError::Missing("upstream"))?
            .parse::<UpstreamUrl>()
            .map_err(|e| inv("upstream", e.to_string()))?;
        let listen = self
            .listen
            .filter(|l| !l.is_empty())
            .ok_or(ConfigError::Missing("listen"))?
            .iter()
            .map(|s| {
                s.parse::<ListenAddr>()
                    .map_err(|e| inv("listen", e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let cache_dir = self.cache_dir.ok_or(ConfigError::Missing("cache_dir"))?;
        let chunk_size = match self.chunk_size {
            None => DEFAULT_CHUNK,
            Some(s) => {
                let n = parse_size(&s).map_err(|e| inv("chunk_size", e.to_string()))?;
                if !n.is_power_of_two() || !(4096..=32 << 20).contains(&n) {
                    return Err(inv(
                        "chunk_size",
                        format!("{s} must be a power of two from 4KiB to 32MiB"),
                    ));
                }
                u32::try_from(n).map_err(|e| inv("chunk_size", e.to_string()))?
            }
        };
        let connections = self.connections.unwrap_or(DEFAULT_CONNECTIONS);
        if !(1..=64).contains(&connections) {
            return Err(inv(
                "connections",
                format!("{connections} is outside 1..=64"),
            ));
        }
        if let Some(m) = &self.metrics {
            if m.parse::<std::net::SocketAddr>().is_err() {
                return Err(inv("metrics", format!("`{m}` is not ip:port")));
            }
        }
        let prefetch = PrefetchSettings {
            mode: match self.prefetch.as_deref() {
                None | Some("profile") => PrefetchMode::Profile,
                Some("full") => PrefetchMode::Full,
                Some("none") => PrefetchMode::None,
                Some(other) => {
                    return Err(inv(
                        "prefetch",
                        format!("`{other}` is not one of none, profile, full"),
                    ))
                }
            },
            concurrency: self
                .prefetch_concurrency
                .unwrap_or(DEFAULT_PREFETCH_CONCURRENCY),
            rate: match self.prefetch_rate {
                None => None,
                Some(s) => match parse_size(&s).map_err(|e| inv("prefetch_rate", e.to_string()))? {
                    0 => return Err(inv("prefetch_rate", "must be above 0".into())),
                    n => Some(n),
                },
            },
        };
        if !(1..=64).contains(&prefetch.concurrency) {
            return Err(inv(
                "prefetch_concurrency",
                format!("{} is outside 1..=64", prefetch.concurrency),
            ));
        }
        Ok(ServeConfig {
            profile: self.profile,
            manifest: self.manifest,
            record_profile: self.record_profile,
            prefetch,
            upstream,
            listen,
            cache_dir,
            export_name: self
                .export_name
                .unwrap_or_else(|| DEFAULT_EXPORT.to_owned()),
            chunk_size,
            metrics: self.metrics,
            connections,
            direct_io: self.direct_io.unwrap_or(true),
            parent_timeout: std::time::Duration::from_secs(
                self.parent_timeout.unwrap_or(DEFAULT_PARENT_TIMEOUT),
            ),
            read_ahead: match self.read_ahead {
                None => DEFAULT_READ_AHEAD,
                Some(s) => parse_size(&s)
                    .map_err(|e| inv("read_ahead", e.to_string()))?
                    .min(32 << 20),
            },
            iscsi: IscsiSettings {
                secret_file: self.iscsi_secret_file,
                initiator: self
                    .iscsi_initiator
                    .unwrap_or_else(|| DEFAULT_INITIATOR.to_owned()),
                recovery: std::time::Duration::from_secs(self.iscsi_recovery.unwrap_or(30)),
                digests: self.iscsi_digests.unwrap_or(false),
                uring_socket: match self.iscsi_socket.as_deref() {
                    None | Some("epoll") => false,
                    Some("uring") => true,
                    Some(other) => {
                        return Err(inv(
                            "iscsi_socket",
                            format!("`{other}` is neither epoll nor uring"),
                        ))
                    }
                },
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_file_parses() {
        let f = FileConfig::parse(
            "upstream = \"nbd://p:1/x\"\nlisten = [\"127.0.0.1:2\"]\ncache_dir = \"/c\"\nchunk_size = \"256KiB\"\n",
        )
        .expect("parse");
        let c = f.validate().expect("valid");
        assert_eq!(c.chunk_size, 256 << 10);
        assert_eq!(c.export_name, DEFAULT_EXPORT);
        assert_eq!(c.connections, DEFAULT_CONNECTIONS);
    }

    #[test]
    fn errors_name_line_and_key() {
        let e = FileConfig::parse("upstream = \"a\"\nlisten = 5\n").expect_err("bad type");
        assert!(e.contains("line 2"), "{e}");
        let e = FileConfig::parse("upstreem = \"a\"\n").expect_err("unknown key");
        assert!(e.contains("upstreem"), "{e}");
        let e = FileConfig {
            upstream: Some("x".into()),
            listen: Some(vec!["127.0.0.1:1".into()]),
            cache_dir: Some("/c".into()),
            chunk_size: Some("3000".into()),
            ..FileConfig::default()
        }
        .validate()
        .expect_err("bad chunk");
        assert!(e.to_string().contains("chunk_size"), "{e}");
        let e = FileConfig::default().validate().expect_err("missing");
        assert_eq!(
            e.to_string(),
            "missing setting `upstream` (give --upstream or `upstream = …` in the config file)"
        );
    }

    #[test]
    fn flags_override_file() {
        let file = FileConfig {
            upstream: Some("/a".into()),
            export_name: Some("file".into()),
            ..FileConfig::default()
        };
        let flags = FileConfig {
            export_name: Some("flag".into()),
            ..FileConfig::default()
        };
        let m = file.merge(flags);
        assert_eq!(m.export_name.as_deref(), Some("flag"));
        assert_eq!(m.upstream.as_deref(), Some("/a"));
    }
}
