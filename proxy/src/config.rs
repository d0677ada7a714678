//! `herd serve` settings: a TOML file (`--config`) and command-line flags
//! with the same names; flags win.
//!
//! ```toml
//! upstream = "nbd://10.0.0.1:10809/golden"   # or a path, file://, nbd+unix://
//! # upstream = ["nbd://10.0.0.1:10809/golden", "nbd://10.0.0.9:10809/golden"]
//! #   several parents: a read that fails or stalls on one goes to the next
//! fleet = "/etc/herd/fleet.toml"   # or "etcd://10.0.0.5:2379/herd": parents from membership
//! node = "host7"          # this node's name in the fleet (default: the host name)
//! advertise = "10.0.0.7:10809"  # where children reach this node (default: first TCP listen)
//! fanout = 4             # children per node, published by an etcd fleet's root
//! lease_ttl = 5           # seconds an etcd registration outlives its node
//! request_timeout = 30.0  # seconds a parent may leave one read unanswered
//! probe_interval = 0.25   # seconds between health probes of each parent
//! probe_timeout = 0.75    # an unanswered probe marks the parent down
//! rejoin_after = 5.0      # seconds a down parent must answer before it is used again
//! listen = ["0.0.0.0:10809", "unix:/run/herd.sock"]
//! cache_dir = "/var/cache/herd"
//! export_name = "golden"
//! chunk_size = "64KiB"
//! metrics = "127.0.0.1:9100"
//! connections = 4        # to the parent: NBD connections, or iSCSI sessions (one per core up to this)
//! direct_io = true
//! parent_timeout = 30   # seconds to wait for the parent at startup
//! read_ahead = "256KiB" # fetched ahead of a sequential reader that misses
//! iscsi_secret_file = "/etc/herd/chap.secret"   # for iscsi://USER@…
//! iscsi_initiator = "iqn.2026-11.dev.herd:host1"
//! iscsi_recovery = 30    # seconds reads wait for a lost target
//! iscsi_digests = false  # offer CRC32C header/data digests
//! net_io = "uring"       # or "epoll": what drives the sockets to the parent
//! cache_writes = "direct" # or "buffered": fetched runs written past the page cache or through it
//! hit_send = "auto"      # or "sendfile"/"copy": how large reads from the page cache leave
//! profile = "/etc/herd/boot.profile"  # root only: children learn it from the parent
//! manifest = "/srv/golden.img.herd-manifest"  # root only: made by `herd manifest build`
//! record_profile = "/var/lib/herd/seen.profile"  # record what clients read
//! prefetch = "profile"   # "none", "profile" (default) or "full" (profile, then all)
//! prefetch_concurrency = 2  # upstream reads prefetch keeps in flight
//! prefetch_rate = "50MiB"   # optional cap, bytes per second
//! retire_after = 60      # seconds an old version nobody reads is kept
//! ```
//!
//! Several images: one `[[image]]` table each, instead of the top-level
//! `upstream`, `export_name`, `manifest`, `profile` and `record_profile`.
//! Each is an export of its own; the first is the default ("" names it).
//!
//! ```toml
//! cache_dir = "/var/cache/herd"   # each image's cache: cache_dir/NAME unless given
//! [[image]]
//! name = "debian-12"
//! upstream = "/srv/debian-12.img"   # a root; a parent: nbd://10.0.0.1:10809/debian-12
//! profile = "/etc/herd/debian-12.profile"
//! [[image]]
//! name = "ubuntu-24"
//! upstream = "/srv/ubuntu-24.img"
//! cache_size = "20GiB"
//! ```
//! In a fleet an image may give no upstream: its parents are the fleet's,
//! serving it under its name.

use crate::io::ring_stream::NetIo;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::fleet::Source;
use crate::net::ListenAddr;
use crate::size::parse_size;
use crate::upstream::failover::FailoverSettings;
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
/// Seconds a superseded version nobody reads is kept (`retire_after`).
pub const DEFAULT_RETIRE_AFTER: f64 = 60.0;
/// `--spin-us` above this is refused: past a few hundred microseconds a
/// vCPU's wake-up is no longer what a spin saves.
pub const MAX_SPIN_US: u64 = 1000;

/// One upstream or an ordered list of them.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// `10.0.0.0/8`, `::1/128`, or a bare address (one host).
fn parse_net(s: &str) -> Result<ipnet::IpNet, String> {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map(|n| n.trunc())
        .map_err(|_| format!("`{s}` is not an address or ADDR/PREFIX network"))
}

/// Default lease time to live in etcd, seconds.
pub const DEFAULT_LEASE_TTL: u64 = 5;

/// The file as written: every key optional so flags can fill the gaps.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub upstream: Option<OneOrMany>,
    pub fleet: Option<String>,
    pub node: Option<String>,
    pub advertise: Option<String>,
    pub lease_ttl: Option<u64>,
    pub fanout: Option<u32>,
    pub request_timeout: Option<f64>,
    pub probe_interval: Option<f64>,
    pub probe_timeout: Option<f64>,
    pub rejoin_after: Option<f64>,
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
    /// `iscsi_socket` was its name when it drove only the iSCSI session.
    #[serde(alias = "iscsi_socket")]
    pub net_io: Option<String>,
    pub profile: Option<PathBuf>,
    pub manifest: Option<PathBuf>,
    pub record_profile: Option<PathBuf>,
    pub prefetch: Option<String>,
    pub prefetch_concurrency: Option<usize>,
    pub prefetch_rate: Option<String>,
    pub tls: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_allow: Option<Vec<String>>,
    pub allow: Option<Vec<String>>,
    pub max_connections: Option<usize>,
    pub max_connections_per_client: Option<usize>,
    pub connection_buffer: Option<String>,
    pub reply_buffer: Option<String>,
    pub fetch_buffer: Option<String>,
    pub cache_size: Option<String>,
    pub cache_writes: Option<String>,
    pub listen_iscsi: Option<Vec<String>>,
    pub iscsi_target_iqn: Option<String>,
    pub iscsi_target_chap: Option<PathBuf>,
    pub iscsi_target_mutual_chap: Option<PathBuf>,
    pub idle_timeout: Option<u64>,
    pub write_timeout: Option<u64>,
    pub spin_us: Option<u64>,
    pub hit_send: Option<String>,
    /// `[[image]]` tables: several images (file only).
    pub image: Option<Vec<ImageFile>>,
    pub retire_after: Option<f64>,
}

/// One `[[image]]` table as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageFile {
    pub name: String,
    pub upstream: Option<OneOrMany>,
    pub cache_dir: Option<PathBuf>,
    pub manifest: Option<PathBuf>,
    pub profile: Option<PathBuf>,
    pub record_profile: Option<PathBuf>,
    pub cache_size: Option<String>,
}

/// One image a node serves, as an export of its own.
#[derive(Debug, Clone)]
pub struct ImageConfig {
    /// Its export name (and its `image` label in metrics).
    pub name: String,
    /// A file or LUN (a root), or parents in failover order; empty in a
    /// fleet, whose parents serve it under `name`.
    pub upstreams: Vec<UpstreamUrl>,
    pub cache_dir: PathBuf,
    /// A root's manifest made ahead of time (`herd manifest build`).
    pub manifest: Option<PathBuf>,
    /// A boot profile to prefetch and pass down (root).
    pub profile: Option<PathBuf>,
    /// Where to record what clients read.
    pub record_profile: Option<PathBuf>,
    /// Bytes its cache may hold.
    pub cache_size: Option<u64>,
}

impl ImageConfig {
    /// The image itself (a file or a LUN) when this node is its root.
    #[must_use]
    pub fn anchor(&self) -> Option<&UpstreamUrl> {
        self.upstreams.first().filter(|u| !u.is_nbd())
    }
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The images served, each an export; the first is the default.
    pub images: Vec<ImageConfig>,
    /// How long a superseded version nobody reads is kept before it is
    /// retired (a client that reconnects within it still finds it).
    pub retire_after: std::time::Duration,
    /// They come from `[[image]]` tables: a fleet's parents serve each
    /// under its own name (else under the name the fleet gives).
    pub named_images: bool,
    /// Where membership comes from, if this node is in a fleet.
    pub fleet: Option<Source>,
    /// This node's name in the fleet.
    pub node: String,
    /// Where children reach this node (HOST:PORT).
    pub advertise: Option<String>,
    pub lease_ttl: std::time::Duration,
    /// Children per node (an etcd fleet's root publishes it).
    pub fanout: u32,
    pub failover: FailoverSettings,
    pub listen: Vec<ListenAddr>,
    pub chunk_size: u32,
    pub metrics: Option<String>,
    pub connections: usize,
    pub direct_io: bool,
    /// How long to keep retrying an unreachable parent at startup.
    pub parent_timeout: std::time::Duration,
    /// Bytes fetched ahead of a sequential reader that misses (0: off).
    pub read_ahead: u64,
    pub iscsi: IscsiSettings,
    pub prefetch: PrefetchSettings,
    /// `--tls*`: STARTTLS on the export and to NBD parents.
    pub tls: crate::tls::Settings,
    /// `--allow`: networks TCP clients may connect from (empty: any).
    pub allow: Vec<ipnet::IpNet>,
    /// What one client, and all together, may take from the export.
    pub limits: crate::export::nbd::limits::Limits,
    /// Fetched bytes that may wait in memory to be written to the cache
    /// disk; fetching waits beyond it.
    pub fetch_buffer: u64,
    /// How fetched runs reach the cache's data file.
    pub cache_writes: crate::cache::CacheWrites,
    /// `--spin-us`: how long an NBD connection that sends back to back is
    /// polled for its next request, and the iSCSI upstream session with
    /// one command in flight for its answer, before the task sleeps
    /// (zero: never).
    pub spin: std::time::Duration,
    /// How large resident hits leave (`--hit-send`).
    pub hit_send: crate::export::nbd::zerocopy::HitSend,
    /// What drives the sockets to the parent.
    pub net_io: NetIo,
    /// herd's own iSCSI target (`--listen-iscsi`).
    pub iscsi_target: IscsiTargetSettings,
}

/// herd's iSCSI target: where it listens, its name, who may log in.
#[derive(Debug, Clone, Default)]
pub struct IscsiTargetSettings {
    /// HOST:PORT to listen on (none: no target).
    pub listen: Vec<String>,
    /// The target name (default: derived from the host and export).
    pub iqn: Option<String>,
    /// `USER:SECRET` initiators must log in with (CHAP); none: no
    /// authentication.
    pub chap: Option<PathBuf>,
    /// `USER:SECRET` the target answers with when an initiator asks for
    /// mutual CHAP.
    pub mutual_chap: Option<PathBuf>,
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
            fleet: other.fleet.or(self.fleet),
            node: other.node.or(self.node),
            advertise: other.advertise.or(self.advertise),
            lease_ttl: other.lease_ttl.or(self.lease_ttl),
            fanout: other.fanout.or(self.fanout),
            request_timeout: other.request_timeout.or(self.request_timeout),
            probe_interval: other.probe_interval.or(self.probe_interval),
            probe_timeout: other.probe_timeout.or(self.probe_timeout),
            rejoin_after: other.rejoin_after.or(self.rejoin_after),
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
            net_io: other.net_io.or(self.net_io),
            profile: other.profile.or(self.profile),
            manifest: other.manifest.or(self.manifest),
            record_profile: other.record_profile.or(self.record_profile),
            prefetch: other.prefetch.or(self.prefetch),
            prefetch_concurrency: other.prefetch_concurrency.or(self.prefetch_concurrency),
            prefetch_rate: other.prefetch_rate.or(self.prefetch_rate),
            tls: other.tls.or(self.tls),
            tls_cert: other.tls_cert.or(self.tls_cert),
            tls_key: other.tls_key.or(self.tls_key),
            tls_ca: other.tls_ca.or(self.tls_ca),
            tls_allow: other.tls_allow.filter(|l| !l.is_empty()).or(self.tls_allow),
            allow: other.allow.filter(|l| !l.is_empty()).or(self.allow),
            max_connections: other.max_connections.or(self.max_connections),
            max_connections_per_client: other
                .max_connections_per_client
                .or(self.max_connections_per_client),
            connection_buffer: other.connection_buffer.or(self.connection_buffer),
            reply_buffer: other.reply_buffer.or(self.reply_buffer),
            fetch_buffer: other.fetch_buffer.or(self.fetch_buffer),
            cache_size: other.cache_size.or(self.cache_size),
            cache_writes: other.cache_writes.or(self.cache_writes),
            listen_iscsi: other
                .listen_iscsi
                .filter(|l| !l.is_empty())
                .or(self.listen_iscsi),
            iscsi_target_iqn: other.iscsi_target_iqn.or(self.iscsi_target_iqn),
            iscsi_target_chap: other.iscsi_target_chap.or(self.iscsi_target_chap),
            iscsi_target_mutual_chap: other
                .iscsi_target_mutual_chap
                .or(self.iscsi_target_mutual_chap),
            idle_timeout: other.idle_timeout.or(self.idle_timeout),
            write_timeout: other.write_timeout.or(self.write_timeout),
            spin_us: other.spin_us.or(self.spin_us),
            hit_send: other.hit_send.or(self.hit_send),
            image: other.image.or(self.image),
            retire_after: other.retire_after.or(self.retire_after),
        }
    }

    /// Checks and converts every setting.
    ///
    /// # Errors
    /// `Missing` or `Invalid`, naming the key.
    pub fn validate(self) -> Result<ServeConfig, ConfigError> {
        let inv = |key, message: String| ConfigError::Invalid { key, message };
        let fleet = self
            .fleet
            .as_deref()
            .map(str::parse::<Source>)
            .transpose()
            .map_err(|e| inv("fleet", e.to_string()))?;
        let parse_upstreams = |list: Option<OneOrMany>| -> Result<Vec<UpstreamUrl>, ConfigError> {
            let ups = list
                .map(OneOrMany::into_vec)
                .unwrap_or_default()
                .iter()
                .map(|u| {
                    u.parse::<UpstreamUrl>()
                        .map_err(|e| inv("upstream", e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            if ups.len() > 1 && !ups.iter().all(UpstreamUrl::is_nbd) {
                return Err(inv(
                    "upstream",
                    "several upstreams must all be NBD parents (a file or LUN is a root's only upstream)".into(),
                ));
            }
            Ok(ups)
        };
        if self.image.is_some() {
            for (key, given) in [
                ("upstream", self.upstream.is_some()),
                ("export_name", self.export_name.is_some()),
                ("manifest", self.manifest.is_some()),
                ("profile", self.profile.is_some()),
                ("record_profile", self.record_profile.is_some()),
            ] {
                if given {
                    return Err(inv(
                        key,
                        "is given in each [[image]] table when there are several images".into(),
                    ));
                }
            }
        }
        let upstreams = parse_upstreams(self.upstream)?;
        if upstreams.is_empty() && fleet.is_none() && self.image.is_none() {
            return Err(ConfigError::Missing("upstream"));
        }
        let secs =
            |key, v: Option<f64>, default: f64| -> Result<std::time::Duration, ConfigError> {
                let v = v.unwrap_or(default);
                if v.is_finite() && (0.01..=3600.0).contains(&v) {
                    Ok(std::time::Duration::from_secs_f64(v))
                } else {
                    Err(inv(key, format!("{v} seconds is outside 0.01..=3600")))
                }
            };
        let parent_timeout =
            std::time::Duration::from_secs(self.parent_timeout.unwrap_or(DEFAULT_PARENT_TIMEOUT));
        let d = FailoverSettings::default();
        let connections_for_failover = self.connections.unwrap_or(DEFAULT_CONNECTIONS);
        let failover = FailoverSettings {
            connections: connections_for_failover,
            request_timeout: secs(
                "request_timeout",
                self.request_timeout,
                d.request_timeout.as_secs_f64(),
            )?,
            probe_interval: secs(
                "probe_interval",
                self.probe_interval,
                d.probe_interval.as_secs_f64(),
            )?,
            probe_timeout: secs(
                "probe_timeout",
                self.probe_timeout,
                d.probe_timeout.as_secs_f64(),
            )?,
            rejoin_after: secs(
                "rejoin_after",
                self.rejoin_after,
                d.rejoin_after.as_secs_f64(),
            )?,
            give_up: parent_timeout,
        };
        if let Some(a) = &self.advertise {
            crate::fleet::check_addr(a).map_err(|m| inv("advertise", m))?;
        }
        let lease_ttl = self.lease_ttl.unwrap_or(DEFAULT_LEASE_TTL);
        if !(1..=600).contains(&lease_ttl) {
            return Err(inv("lease_ttl", format!("{lease_ttl} is outside 1..=600")));
        }
        let node = match self.node {
            Some(n) if !n.is_empty() => n,
            Some(_) => return Err(inv("node", "is empty".into())),
            None => host_name(),
        };
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
        let tls = crate::tls::Settings {
            mode: match self.tls.as_deref() {
                None | Some("off") => crate::tls::Mode::Off,
                Some("on") => crate::tls::Mode::On,
                Some("require") => crate::tls::Mode::Require,
                Some(other) => {
                    return Err(inv(
                        "tls",
                        format!("`{other}` is not one of off, on, require"),
                    ))
                }
            },
            cert: self.tls_cert,
            key: self.tls_key,
            ca: self.tls_ca,
            allow: self.tls_allow.unwrap_or_default(),
        };
        let allow = self
            .allow
            .unwrap_or_default()
            .iter()
            .map(|a| parse_net(a).map_err(|m| inv("allow", m)))
            .collect::<Result<Vec<_>, _>>()?;
        let size = |key, v: Option<String>, default: u64| -> Result<u64, ConfigError> {
            match v {
                None => Ok(default),
                Some(s) => match parse_size(&s) {
                    Ok(n) if n >= 64 << 10 => Ok(n),
                    Ok(_) => Err(inv(key, format!("{s} is below 64KiB"))),
                    Err(e) => Err(inv(key, e.to_string())),
                },
            }
        };
        let count = |key, v: Option<usize>, default: usize| match v {
            Some(0) => Err(inv(key, "must be at least 1".into())),
            v => Ok(v.unwrap_or(default)),
        };
        use crate::export::nbd::limits as lim;
        let limits = lim::Limits {
            max_connections: count(
                "max_connections",
                self.max_connections,
                lim::DEFAULT_MAX_CONNECTIONS,
            )?,
            max_per_client: count(
                "max_connections_per_client",
                self.max_connections_per_client,
                lim::DEFAULT_MAX_PER_CLIENT,
            )?,
            connection_buffer: size(
                "connection_buffer",
                self.connection_buffer,
                lim::DEFAULT_CONNECTION_BUFFER,
            )?,
            server_buffer: size(
                "reply_buffer",
                self.reply_buffer,
                lim::DEFAULT_SERVER_BUFFER,
            )?,
            idle_timeout: match self.idle_timeout {
                None | Some(0) => None,
                Some(s) => Some(std::time::Duration::from_secs(s)),
            },
            write_stall: match self.write_timeout {
                None => lim::DEFAULT_WRITE_STALL,
                Some(0) => return Err(inv("write_timeout", "must be at least 1".into())),
                Some(s) => std::time::Duration::from_secs(s),
            },
        };
        if limits.connection_buffer > limits.server_buffer / 2 {
            return Err(inv(
                "connection_buffer",
                format!(
                    "{} bytes is more than half of reply_buffer ({}): one client that stops reading would starve the others",
                    limits.connection_buffer, limits.server_buffer
                ),
            ));
        }
        let fetch_buffer = size(
            "fetch_buffer",
            self.fetch_buffer,
            crate::cache::DEFAULT_FETCH_BUFFER,
        )?;
        let cap = |s: Option<String>| -> Result<Option<u64>, ConfigError> {
            let Some(s) = s else { return Ok(None) };
            let bytes = parse_size(&s).map_err(|e| inv("cache_size", e.to_string()))?;
            // Runs waiting for the disk (up to the fetch buffer) are
            // counted against the cap: half of it stays for the cache.
            let least = (2 * fetch_buffer).max(16 * u64::from(chunk_size));
            if bytes < least {
                return Err(inv(
                    "cache_size",
                    format!(
                        "{bytes} bytes is less than {least}: twice fetch_buffer ({fetch_buffer}) and at least 16 chunks"
                    ),
                ));
            }
            Ok(Some(bytes))
        };
        let cache_size = cap(self.cache_size)?;
        let named_images = self.image.is_some();
        let images = match self.image {
            None => vec![ImageConfig {
                name: self
                    .export_name
                    .unwrap_or_else(|| DEFAULT_EXPORT.to_owned()),
                upstreams,
                cache_dir,
                manifest: self.manifest,
                profile: self.profile,
                record_profile: self.record_profile,
                cache_size,
            }],
            Some(tables) => {
                if tables.is_empty() {
                    return Err(ConfigError::Missing("image"));
                }
                let mut images: Vec<ImageConfig> = Vec::with_capacity(tables.len());
                for t in tables {
                    if !crate::export::nbd::valid_image_name(&t.name) {
                        return Err(inv(
                            "image",
                            format!("name `{}` is not letters, digits, '.', '_' and '-', or is reserved", t.name),
                        ));
                    }
                    if images.iter().any(|i| i.name == t.name) {
                        return Err(inv("image", format!("two images are named `{}`", t.name)));
                    }
                    let ups = parse_upstreams(t.upstream)?;
                    if ups.is_empty() && fleet.is_none() {
                        return Err(inv(
                            "image",
                            format!(
                                "image `{}` has no upstream (and there is no fleet to serve it)",
                                t.name
                            ),
                        ));
                    }
                    images.push(ImageConfig {
                        cache_dir: t.cache_dir.unwrap_or_else(|| cache_dir.join(&t.name)),
                        name: t.name,
                        upstreams: ups,
                        manifest: t.manifest,
                        profile: t.profile,
                        record_profile: t.record_profile,
                        cache_size: match t.cache_size {
                            Some(s) => cap(Some(s))?,
                            None => cache_size,
                        },
                    });
                }
                if fleet.is_some() {
                    let roots = images.iter().filter(|i| i.anchor().is_some()).count();
                    if roots != 0 && roots != images.len() {
                        return Err(inv(
                            "image",
                            "in a fleet a node is the root of every image or of none".into(),
                        ));
                    }
                }
                let dirs = images.iter().map(|i| &i.cache_dir);
                for (n, d) in dirs.clone().enumerate() {
                    if dirs.clone().take(n).any(|o| o == d) {
                        return Err(inv(
                            "image",
                            format!("two images use cache directory {}", d.display()),
                        ));
                    }
                }
                images
            }
        };
        let spin = match self.spin_us {
            None => crate::io::spin::DEFAULT_WINDOW,
            Some(us) if us > MAX_SPIN_US => {
                return Err(inv(
                    "spin_us",
                    format!(
                        "{us} is more than {MAX_SPIN_US}: a spin that long costs a CPU for little"
                    ),
                ))
            }
            Some(us) => std::time::Duration::from_micros(us),
        };
        let net_io = match self.net_io.as_deref() {
            None => NetIo::default(),
            Some(s) => s.parse().map_err(|e| inv("net_io", e))?,
        };
        let cache_writes = match self.cache_writes.as_deref() {
            None => crate::cache::CacheWrites::default(),
            Some(s) => s.parse().map_err(|e| inv("cache_writes", e))?,
        };
        let hit_send = match self.hit_send.as_deref() {
            None => crate::export::nbd::zerocopy::HitSend::default(),
            Some(s) => s.parse().map_err(|e| inv("hit_send", e))?,
        };
        Ok(ServeConfig {
            net_io,
            cache_writes,
            hit_send,
            tls,
            allow,
            limits,
            fetch_buffer,
            spin,
            iscsi_target: IscsiTargetSettings {
                listen: self.listen_iscsi.unwrap_or_default(),
                iqn: self.iscsi_target_iqn,
                chap: self.iscsi_target_chap,
                mutual_chap: self.iscsi_target_mutual_chap,
            },
            images,
            named_images,
            retire_after: {
                let v = self.retire_after.unwrap_or(DEFAULT_RETIRE_AFTER);
                if v.is_finite() && (0.0..=86_400.0).contains(&v) {
                    std::time::Duration::from_secs_f64(v)
                } else {
                    return Err(inv(
                        "retire_after",
                        format!("{v} seconds is outside 0..=86400"),
                    ));
                }
            },
            prefetch,
            fleet,
            node,
            advertise: self.advertise,
            lease_ttl: std::time::Duration::from_secs(lease_ttl),
            fanout: match self.fanout.unwrap_or(crate::fleet::DEFAULT_FANOUT) {
                0 => return Err(inv("fanout", "must be at least 1".into())),
                n => n,
            },
            failover,
            listen,
            chunk_size,
            metrics: self.metrics,
            connections,
            direct_io: self.direct_io.unwrap_or(true),
            parent_timeout,
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
            },
        })
    }
}

/// This host's name, the default node name in a fleet.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "herd".to_owned())
}

impl ServeConfig {
    /// The first given upstream: the image itself at a root, else the
    /// first parent.
    #[must_use]
    pub fn first_upstream(&self) -> Option<&UpstreamUrl> {
        self.images.first().and_then(|i| i.upstreams.first())
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
        assert_eq!(c.images[0].name, DEFAULT_EXPORT);
        assert_eq!(c.connections, DEFAULT_CONNECTIONS);
    }

    #[test]
    fn tls_and_allow_settings() {
        let base = MINIMAL;
        let c = FileConfig::parse(&format!(
            "{base}tls = \"require\"\ntls_cert = \"/s.pem\"\ntls_allow = [\"alice\"]\nallow = [\"10.1.2.3/8\", \"::1\", \"192.168.0.7\"]\n"
        ))
        .expect("parse")
        .validate()
        .expect("valid");
        assert_eq!(c.tls.mode, crate::tls::Mode::Require);
        assert_eq!(c.tls.cert.as_deref(), Some(std::path::Path::new("/s.pem")));
        assert_eq!(c.tls.allow, ["alice"]);
        let nets: Vec<String> = c.allow.iter().map(ToString::to_string).collect();
        assert_eq!(nets, ["10.0.0.0/8", "::1/128", "192.168.0.7/32"]);
        let c = FileConfig::parse(base)
            .expect("parse")
            .validate()
            .expect("valid");
        assert_eq!(c.tls.mode, crate::tls::Mode::Off);
        assert!(c.allow.is_empty());
        for (bad, key) in [
            ("tls = \"maybe\"", "tls"),
            ("allow = [\"10.0.0.0/33\"]", "allow"),
            ("allow = [\"host\"]", "allow"),
        ] {
            let e = FileConfig::parse(&format!("{base}{bad}\n"))
                .expect("parse")
                .validate()
                .expect_err(bad);
            assert!(e.to_string().contains(key), "{e}");
        }
    }

    #[test]
    fn errors_name_line_and_key() {
        let e = FileConfig::parse("upstream = \"a\"\nlisten = 5\n").expect_err("bad type");
        assert!(e.contains("line 2"), "{e}");
        let e = FileConfig::parse("upstreem = \"a\"\n").expect_err("unknown key");
        assert!(e.contains("upstreem"), "{e}");
        let e = FileConfig {
            upstream: Some(OneOrMany::One("x".into())),
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
    fn several_upstreams_and_failover_settings() {
        let c = FileConfig::parse(
            "upstream = [\"nbd://a:1/x\", \"nbd://b:2/x\"]\nlisten = [\"127.0.0.1:2\"]\ncache_dir = \"/c\"\nprobe_timeout = 0.25\n",
        )
        .expect("parse")
        .validate()
        .expect("valid");
        assert_eq!(c.images[0].upstreams.len(), 2);
        assert_eq!(
            c.failover.probe_timeout,
            std::time::Duration::from_millis(250)
        );
        let e = FileConfig::parse(
            "upstream = [\"/img\", \"nbd://b:2/x\"]\nlisten = [\"127.0.0.1:2\"]\ncache_dir = \"/c\"\n",
        )
        .expect("parse")
        .validate()
        .expect_err("file among parents");
        assert!(e.to_string().contains("must all be NBD"), "{e}");
        let e = FileConfig::parse(
            "fleet = \"etcd://h:1/\"\nlisten = [\"127.0.0.1:2\"]\ncache_dir = \"/c\"\n",
        )
        .expect("parse")
        .validate()
        .expect_err("empty prefix");
        assert!(e.to_string().contains("fleet"), "{e}");
    }

    /// The least a config file needs to validate.
    const MINIMAL: &str = "upstream = \"/a\"\nlisten = [\"127.0.0.1:2\"]\ncache_dir = \"/c\"\n";

    /// `MINIMAL` plus `extra`, parsed and validated.
    fn minimal_with(extra: &str) -> Result<ServeConfig, ConfigError> {
        FileConfig::parse(&format!("{MINIMAL}{extra}"))
            .expect("parse")
            .validate()
    }

    #[test]
    fn spin_defaults_on_and_a_long_one_is_refused() {
        let spin = |extra: &str| minimal_with(extra).map(|c| c.spin);
        assert_eq!(spin("").ok(), Some(crate::io::spin::DEFAULT_WINDOW));
        assert_eq!(spin("spin_us = 0\n").ok(), Some(std::time::Duration::ZERO));
        let e = spin("spin_us = 5000\n").expect_err("too long");
        assert!(e.to_string().contains("spin_us"), "{e}");
    }

    #[test]
    fn net_io_defaults_to_uring_and_a_typo_is_refused() {
        let io = |extra: &str| minimal_with(extra).map(|c| c.net_io);
        assert_eq!(io("").ok(), Some(NetIo::Uring));
        assert_eq!(io("net_io = \"epoll\"\n").ok(), Some(NetIo::Epoll));
        assert_eq!(io("net_io = \"uring\"\n").ok(), Some(NetIo::Uring));
        // An older config's key still works.
        assert_eq!(io("iscsi_socket = \"epoll\"\n").ok(), Some(NetIo::Epoll));
        let e = io("net_io = \"iouring\"\n").expect_err("typo");
        assert!(e.to_string().contains("net_io"), "{e}");
    }

    #[test]
    fn cache_writes_default_to_direct_and_a_typo_is_refused() {
        use crate::cache::CacheWrites;
        let w = |extra: &str| minimal_with(extra).map(|c| c.cache_writes);
        assert_eq!(w("").ok(), Some(CacheWrites::Direct));
        assert_eq!(
            w("cache_writes = \"buffered\"\n").ok(),
            Some(CacheWrites::Buffered)
        );
        assert_eq!(
            w("cache_writes = \"direct\"\n").ok(),
            Some(CacheWrites::Direct)
        );
        let e = w("cache_writes = \"o_direct\"\n").expect_err("typo");
        assert!(e.to_string().contains("cache_writes"), "{e}");
    }

    #[test]
    fn hit_send_defaults_to_auto_and_a_typo_is_refused() {
        use crate::export::nbd::zerocopy::HitSend;
        let w = |extra: &str| minimal_with(extra).map(|c| c.hit_send);
        assert_eq!(w("").ok(), Some(HitSend::Auto));
        for (text, want) in [
            ("auto", HitSend::Auto),
            ("sendfile", HitSend::Sendfile),
            ("copy", HitSend::Copy),
        ] {
            assert_eq!(w(&format!("hit_send = \"{text}\"\n")).ok(), Some(want));
        }
        let e = w("hit_send = \"splice\"\n").expect_err("typo");
        assert!(e.to_string().contains("hit_send"), "{e}");
    }

    #[test]
    fn flags_override_file() {
        let file = FileConfig {
            upstream: Some(OneOrMany::One("/a".into())),
            export_name: Some("file".into()),
            ..FileConfig::default()
        };
        let flags = FileConfig {
            export_name: Some("flag".into()),
            ..FileConfig::default()
        };
        let m = file.merge(flags);
        assert_eq!(m.export_name.as_deref(), Some("flag"));
        assert_eq!(m.upstream, Some(OneOrMany::One("/a".into())));
    }

    #[test]
    fn image_tables_make_one_export_each() {
        let text = "listen = [\"127.0.0.1:2\"]\ncache_dir = \"/c\"\ncache_size = \"64MiB\"\n\
            [[image]]\nname = \"deb\"\nupstream = \"/d.img\"\nprofile = \"/d.profile\"\n\
            [[image]]\nname = \"ubu\"\nupstream = [\"nbd://10.0.0.1/ubu\", \"nbd://10.0.0.2/ubu\"]\n\
            cache_dir = \"/u\"\ncache_size = \"32MiB\"\n";
        let c = FileConfig::parse(text)
            .expect("parse")
            .validate()
            .expect("valid");
        assert!(c.named_images);
        let names: Vec<&str> = c.images.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["deb", "ubu"]);
        assert_eq!(c.images[0].cache_dir, PathBuf::from("/c/deb"));
        assert_eq!(c.images[1].cache_dir, PathBuf::from("/u"));
        assert!(c.images[0].anchor().is_some());
        assert!(c.images[1].anchor().is_none());
        assert_eq!(c.images[1].upstreams.len(), 2);
        assert_eq!(c.images[0].cache_size, Some(64 << 20));
        assert_eq!(c.images[1].cache_size, Some(32 << 20));
        assert_eq!(c.images[0].profile, Some(PathBuf::from("/d.profile")));
        // One image without tables keeps today's keys.
        let one = minimal_with("export_name = \"golden\"\n").expect("valid");
        assert!(!one.named_images);
        assert_eq!(one.images.len(), 1);
        assert_eq!(one.images[0].name, "golden");
        assert_eq!(one.images[0].cache_dir, PathBuf::from("/c"));
    }

    #[test]
    fn bad_image_tables_are_refused_by_key() {
        let base = "listen = [\"127.0.0.1:2\"]\ncache_dir = \"/c\"\n";
        let err = |extra: &str| {
            FileConfig::parse(&format!("{base}{extra}"))
                .expect("parse")
                .validate()
                .expect_err("refused")
                .to_string()
        };
        let e = err("[[image]]\nname = \"a\"\nupstream = \"/a\"\n[[image]]\nname = \"a\"\nupstream = \"/b\"\n");
        assert!(e.contains("two images are named `a`"), "{e}");
        let e = err("[[image]]\nname = \"herd-manifest\"\nupstream = \"/a\"\n");
        assert!(e.contains("herd-manifest"), "{e}");
        let e = err("[[image]]\nname = \"a/b\"\nupstream = \"/a\"\n");
        assert!(e.contains("a/b"), "{e}");
        let e = err("[[image]]\nname = \"a\"\n");
        assert!(e.contains("image `a` has no upstream"), "{e}");
        let e = err("upstream = \"/x\"\n[[image]]\nname = \"a\"\nupstream = \"/a\"\n");
        assert!(e.contains("upstream") && e.contains("[[image]]"), "{e}");
        let e = err("[[image]]\nname = \"a\"\nupstream = \"/a\"\ncache_dir = \"/d\"\n[[image]]\nname = \"b\"\nupstream = \"/b\"\ncache_dir = \"/d\"\n");
        assert!(e.contains("cache directory /d"), "{e}");
        let e = FileConfig::parse(&format!("{base}[[image]]\nname = \"a\"\nport = 3\n"))
            .expect_err("unknown key");
        assert!(e.contains("port"), "{e}");
    }
}
