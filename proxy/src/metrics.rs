//! Prometheus metrics: names in one place, and the HTTP exporter.
//!
//! Every metric herd exports is recorded through a function here, so the
//! names a dashboard depends on are greppable in one file.

use std::net::SocketAddr;

use metrics::{counter, gauge, Counter, Gauge};
use metrics_exporter_prometheus::PrometheusBuilder;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("metrics address `{0}` is not host:port")]
    Addr(String),
    #[error("cannot start the metrics endpoint on {addr}")]
    Install {
        addr: String,
        #[source]
        source: metrics_exporter_prometheus::BuildError,
    },
    #[error("a metrics recorder is already installed")]
    Recorder,
}

/// Serves `http://addr/metrics` in the Prometheus text format. Every
/// metric is registered (at 0) before the first scrape is answered, so a
/// reader can tell a real 0 from a metric that does not exist.
///
/// # Errors
/// A bad address, a failure to bind, or a recorder already installed.
/// Must run inside a tokio runtime.
pub fn install(addr: &str) -> Result<(), MetricsError> {
    let sock: SocketAddr = addr
        .parse()
        .map_err(|_| MetricsError::Addr(addr.to_owned()))?;
    // The listener is bound here; connections wait in its backlog until
    // the exporter runs, after the metrics exist.
    let (recorder, exporter) = PrometheusBuilder::new()
        .with_http_listener(sock)
        .build()
        .map_err(|source| MetricsError::Install {
            addr: addr.to_owned(),
            source,
        })?;
    metrics::set_global_recorder(recorder).map_err(|_| MetricsError::Recorder)?;
    describe();
    register_at_zero();
    tokio::spawn(exporter);
    Ok(())
}

/// Every unlabelled metric at 0, and the digest-failure counter for each
/// source: present from the start.
fn register_at_zero() {
    for name in [
        "herd_served_side_bytes_total",
        "herd_served_requests_total",
        "herd_nbd_connections_total",
        "herd_manifest_build_bytes_total",
        "herd_upstream_failovers_total",
        "herd_upstream_down_total",
        "herd_upstream_deadline_expiries_total",
        "herd_iscsi_ping_failures_total",
        "herd_iscsi_shared_logins_total",
        "herd_iscsi_commands_total",
        "herd_iscsi_digest_errors_total",
        "herd_iscsi_target_commands_total",
        "herd_iscsi_target_digest_errors_total",
        "herd_iscsi_target_rejects_total",
    ] {
        counter!(name).increment(0);
    }
    for name in [
        "herd_serving",
        "herd_iscsi_in_flight_max",
        "herd_reply_buffer_bytes",
        "herd_reply_buffer_bytes_peak",
        "herd_cache_unpersisted_bytes",
        "herd_cache_unpersisted_bytes_peak",
        "herd_nbd_connections_open",
        "herd_nbd_local_streams",
    ] {
        gauge!(name).set(0.0);
    }
    for result in ["ok", "failed"] {
        counter!("herd_iscsi_target_logins_total", "result" => result).increment(0);
    }
    for reason in REFUSAL_REASONS {
        counter!("herd_nbd_connections_refused_total", "reason" => *reason).increment(0);
    }
    for side in crate::io::spin::Side::ALL {
        let (spins, micros) = crate::io::spin::Spin::metric_names(side);
        for outcome in ["request", "idle"] {
            counter!(spins, "outcome" => outcome).increment(0);
        }
        counter!(micros).increment(0);
    }
    for (side, result) in [
        ("export", "ok"),
        ("export", "failed"),
        ("upstream", "ok"),
        ("upstream", "failed"),
    ] {
        counter!("herd_tls_handshakes_total", "side" => side, "result" => result).increment(0);
    }
}

/// Why a connection was closed before negotiation ended.
pub const REFUSAL_REASONS: &[&str] = &["allow", "tls", "limit"];

fn describe() {
    use metrics::{describe_counter, describe_gauge, Unit};
    describe_counter!(
        "herd_served_bytes_total",
        Unit::Bytes,
        "bytes sent to NBD clients in READ replies"
    );
    describe_counter!(
        "herd_served_zero_copy_bytes_total",
        Unit::Bytes,
        "of those, bytes sendfile'd from the cache's page cache without a copy"
    );
    describe_counter!(
        "herd_served_hit_copy_bytes_total",
        Unit::Bytes,
        "of those, large resident hits copied into the socket instead, while several clients on this host streamed (hit_send)"
    );
    describe_counter!(
        "herd_served_side_bytes_total",
        Unit::Bytes,
        "bytes of the side exports (herd-manifest, herd-profile) sent to NBD clients"
    );
    describe_counter!("herd_served_requests_total", "NBD requests answered");
    describe_counter!(
        "herd_export_spins_total",
        "waits for a connection's next request that spun first, by how they ended (request: it came within --spin-us; idle: it did not)"
    );
    describe_counter!(
        "herd_export_spin_microseconds_total",
        Unit::Microseconds,
        "time connection tasks spent spinning for a next request (CPU kept awake)"
    );
    describe_counter!(
        "herd_iscsi_spins_total",
        "waits of an iSCSI session for its target's answer to the one command in flight that spun first, by how they ended (request: it came within --spin-us; idle: it did not)"
    );
    describe_counter!(
        "herd_iscsi_spin_microseconds_total",
        Unit::Microseconds,
        "time iSCSI sessions spent spinning for their target's answer (CPU kept awake)"
    );
    describe_counter!(
        "herd_iscsi_target_spins_total",
        "waits of an iSCSI target connection for its initiator's next command that spun first, by how they ended (request: it came within --spin-us; idle: it did not)"
    );
    describe_counter!(
        "herd_iscsi_target_spin_microseconds_total",
        Unit::Microseconds,
        "time iSCSI target connections spent spinning for a next command (CPU kept awake)"
    );
    describe_counter!(
        "herd_upstream_read_bytes_total",
        Unit::Bytes,
        "bytes fetched from the upstream"
    );
    describe_counter!("herd_chunk_hits_total", "chunk lookups found in the cache");
    describe_counter!(
        "herd_chunk_misses_total",
        "chunk lookups that started an upstream fetch"
    );
    describe_counter!(
        "herd_singleflight_joins_total",
        "chunk lookups that joined a fetch already in flight"
    );
    describe_counter!("herd_nbd_connections_total", "NBD connections accepted");
    describe_gauge!("herd_cache_chunks_present", "chunks held in the cache");
    describe_gauge!(
        "herd_cache_capacity_chunks",
        "chunks the cache may hold (--cache-size; the image's chunks without it)"
    );
    describe_counter!(
        "herd_cache_evicted_chunks_total",
        "chunks evicted to keep the cache within --cache-size"
    );
    describe_gauge!(
        "herd_cache_disk_full",
        "1 while the cache disk is full (chunks are served but not cached)"
    );
    describe_counter!(
        "herd_cache_uncached_bytes_total",
        "fetched bytes served but not cached (disk full, or no room under the cap)"
    );
    describe_counter!(
        "herd_cache_written_bytes_total",
        "bytes written to the cache's data file, by mode: direct (O_DIRECT, past the page cache) or buffered"
    );
    describe_gauge!("herd_cache_chunks_total", "chunks in the image");
    describe_gauge!(
        "herd_cache_chunks_zero",
        "chunks that are all zeros by the manifest: never fetched nor stored"
    );
    describe_gauge!(
        "herd_prefetch_chunks_total",
        "chunks the current prefetch plan covers"
    );
    describe_gauge!(
        "herd_prefetch_chunks_done",
        "chunks of the prefetch plan present in the cache"
    );
    describe_counter!(
        "herd_prefetch_bytes_total",
        Unit::Bytes,
        "bytes fetched from the upstream by prefetch"
    );
    describe_gauge!(
        "herd_profile_extents",
        "extents in the boot profile this proxy prefetches and serves"
    );
    describe_gauge!(
        "herd_image_size_bytes",
        Unit::Bytes,
        "size of the served image"
    );
    describe_counter!(
        "herd_chunk_digest_failures_total",
        "chunks whose bytes did not match the manifest, by source (parent, image, cache)"
    );
    describe_counter!(
        "herd_manifest_build_bytes_total",
        Unit::Bytes,
        "image bytes hashed while building the manifest"
    );
    describe_gauge!(
        "herd_image_identity_info",
        "1, labelled with the image and the identity (BLAKE3 of the manifest) it serves"
    );
    describe_counter!(
        "herd_version_seeded_bytes_total",
        Unit::Bytes,
        "bytes a newer version of the image read from this version's cache instead of its parent"
    );
    describe_counter!(
        "herd_cache_shared_bytes_total",
        Unit::Bytes,
        "bytes the image read from another image's cache (same content, stored once) instead of fetching and storing them"
    );
    describe_gauge!(
        "herd_image_versions",
        "versions of the image served now (the latest, and older ones clients still read)"
    );
    describe_gauge!(
        "herd_image_clients",
        "NBD connections reading the image now (side exports not counted)"
    );
    describe_gauge!(
        "herd_serving",
        "1 once the node listens for NBD clients (it has the image's manifest)"
    );
    describe_gauge!(
        "herd_parent_identity_mismatch",
        "1 while the parent serves another image than this node"
    );
    describe_counter!(
        "herd_upstream_failovers_total",
        "reads re-issued to another parent after one failed or stalled"
    );
    describe_counter!(
        "herd_upstream_down_total",
        "times a parent was found down (lost, unreachable, probe unanswered)"
    );
    describe_counter!(
        "herd_upstream_deadline_expiries_total",
        "reads a parent left unanswered past the request timeout"
    );
    describe_gauge!(
        "herd_upstream_active",
        "1 for the parent reads go to now, 0 for the other parents, by parent"
    );
    describe_counter!(
        "herd_iscsi_commands_total",
        "SCSI commands sent to the iSCSI target"
    );
    describe_gauge!(
        "herd_iscsi_in_flight_max",
        "most SCSI commands outstanding at once on the iSCSI session"
    );
    describe_counter!(
        "herd_iscsi_ping_failures_total",
        "NOP-Out pings the iSCSI target left unanswered (the session is then dropped)"
    );
    describe_counter!(
        "herd_iscsi_shared_logins_total",
        "iSCSI logins refused while another session was live, whose core then read through that session"
    );
    describe_counter!(
        "herd_recv_lowat_sets_total",
        "times a link's receive low-water mark (SO_RCVLOWAT) was moved: raised to wake its reader only once a large payload is whole, or lowered again"
    );
    describe_counter!(
        "herd_iscsi_digest_errors_total",
        "iSCSI PDUs whose CRC32C header or data digest did not match (the connection is dropped and its commands reissued)"
    );
    describe_counter!(
        "herd_nbd_connections_refused_total",
        "NBD connections closed before transmission: reason allow (not in --allow), tls (handshake failed, or TLS required and not started) or limit (--max-connections, --max-connections-per-client)"
    );
    describe_gauge!(
        "herd_reply_buffer_bytes",
        Unit::Bytes,
        "reply bytes NBD connections hold in memory (sendfile'd replies hold none)"
    );
    describe_gauge!(
        "herd_reply_buffer_bytes_peak",
        Unit::Bytes,
        "the most reply bytes NBD connections held at once"
    );
    describe_gauge!("herd_nbd_connections_open", "NBD connections open now");
    describe_gauge!(
        "herd_nbd_local_streams",
        "NBD connections from this host with large page-cache hits queued now (two or more: hits are copied, hit_send = auto)"
    );
    describe_gauge!(
        "herd_core_connections",
        "client connections (NBD and iSCSI) live on each connection thread"
    );
    describe_gauge!(
        "herd_cache_unpersisted_bytes",
        Unit::Bytes,
        "fetched bytes held in memory until the cache disk has them (bounded by --fetch-buffer)"
    );
    describe_gauge!(
        "herd_cache_unpersisted_bytes_peak",
        Unit::Bytes,
        "the most fetched bytes ever held waiting for the cache disk"
    );
    describe_counter!(
        "herd_tls_handshakes_total",
        "TLS handshakes after NBD_OPT_STARTTLS, by side (export: with a child; upstream: with a parent) and result"
    );
}

/// The sources a chunk's bytes can come from.
pub const DIGEST_SOURCES: [&str; 3] = ["parent", "image", "cache"];

pub fn manifest_built(bytes: u64) {
    counter!("herd_manifest_build_bytes_total").increment(bytes);
}
/// Every listener is bound: the node serves NBD (its metrics answer
/// earlier, while it gets or builds the manifest).
pub fn serving() {
    gauge!("herd_serving").set(1.0);
}

pub fn iscsi_ping_failure() {
    counter!("herd_iscsi_ping_failures_total").increment(1);
}
/// A core's login was refused and it reads through another session.
pub fn iscsi_shared_login() {
    counter!("herd_iscsi_shared_logins_total").increment(1);
}
/// A PDU from the target failed its CRC32C header or data digest.
pub fn iscsi_digest_error() {
    counter!("herd_iscsi_digest_errors_total").increment(1);
}
pub fn upstream_failover() {
    counter!("herd_upstream_failovers_total").increment(1);
}
pub fn upstream_down() {
    counter!("herd_upstream_down_total").increment(1);
}
pub fn upstream_deadline() {
    counter!("herd_upstream_deadline_expiries_total").increment(1);
}
/// Whether reads go to `parent` now.
pub fn upstream_active(parent: &str, active: bool) {
    gauge!("herd_upstream_active", "parent" => parent.to_owned()).set(if active {
        1.0
    } else {
        0.0
    });
}
pub fn served_side(bytes: u64) {
    counter!("herd_served_side_bytes_total").increment(bytes);
}
pub fn spin(side: crate::io::spin::Side, request: bool, spent: std::time::Duration) {
    let outcome = if request { "request" } else { "idle" };
    let (spins, micros) = crate::io::spin::Spin::metric_names(side);
    counter!(spins, "outcome" => outcome).increment(1);
    counter!(micros).increment(u64::try_from(spent.as_micros()).unwrap_or(u64::MAX));
}
pub fn request() {
    counter!("herd_served_requests_total").increment(1);
}
pub fn connection() {
    counter!("herd_nbd_connections_total").increment(1);
}
#[allow(clippy::cast_precision_loss)]
pub fn connections_open(n: usize) {
    gauge!("herd_nbd_connections_open").set(n as f64);
}
#[allow(clippy::cast_precision_loss)]
pub fn local_streams(n: usize) {
    gauge!("herd_nbd_local_streams").set(n as f64);
}
/// A connection closed before negotiation: `reason` is one of
/// `REFUSAL_REASONS`.
pub fn connection_refused(reason: &'static str) {
    counter!("herd_nbd_connections_refused_total", "reason" => reason).increment(1);
}
/// Fetched bytes waiting in memory for the cache disk now, and the most at
/// once.
#[allow(clippy::cast_precision_loss)]
pub fn fetch_buffer_bytes(now: u64, peak: u64) {
    gauge!("herd_cache_unpersisted_bytes").set(now as f64);
    gauge!("herd_cache_unpersisted_bytes_peak").set(peak as f64);
}
/// Reply bytes NBD connections hold in memory now, and the most at once:
/// the gauges, for the reply budget to keep (see [`reply_buffer_gauges`]).
pub struct HeldGauges {
    now: Gauge,
    peak: Gauge,
}

impl HeldGauges {
    #[allow(clippy::cast_precision_loss)]
    pub fn set(&self, now: u64, peak: u64) {
        self.now.set(now as f64);
        self.peak.set(peak as f64);
    }
}

/// `herd_reply_buffer_bytes` and its peak.
#[must_use]
pub fn reply_buffer_gauges() -> HeldGauges {
    HeldGauges {
        now: gauge!("herd_reply_buffer_bytes"),
        peak: gauge!("herd_reply_buffer_bytes_peak"),
    }
}
/// A TLS handshake ended: `side` is `export` or `upstream`.
pub fn tls_handshake(side: &'static str, ok: bool) {
    let result = if ok { "ok" } else { "failed" };
    counter!("herd_tls_handshakes_total", "side" => side, "result" => result).increment(1);
}
/// An iSCSI login to herd's target ended.
pub fn iscsi_target_login(ok: bool) {
    let result = if ok { "ok" } else { "failed" };
    counter!("herd_iscsi_target_logins_total", "result" => result).increment(1);
}
pub fn iscsi_target_command() {
    counter!("herd_iscsi_target_commands_total").increment(1);
}
pub fn iscsi_target_digest_error() {
    counter!("herd_iscsi_target_digest_errors_total").increment(1);
}
pub fn iscsi_target_reject() {
    counter!("herd_iscsi_target_rejects_total").increment(1);
}

static ISCSI_MAX: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The counter of SCSI commands issued, for a session to keep.
pub fn iscsi_commands() -> Counter {
    counter!("herd_iscsi_commands_total")
}

/// One SCSI command issued (`commands` from [`iscsi_commands`]), with
/// `in_flight` now outstanding.
#[allow(clippy::cast_precision_loss)]
pub fn iscsi_command(commands: &Counter, in_flight: usize) {
    commands.increment(1);
    let prev = ISCSI_MAX.fetch_max(in_flight, std::sync::atomic::Ordering::Relaxed);
    if in_flight > prev {
        gauge!("herd_iscsi_in_flight_max").set(in_flight as f64);
    }
}

/// The series of one image a node serves, labelled `image`: its cache,
/// its fetches, its prefetch and what its clients were sent. Handles are
/// resolved once, so the hot path pays no label lookup. Made after
/// `install` (before it, handles record nothing).
pub struct ImageMetrics {
    hits: Counter,
    misses: Counter,
    joins: Counter,
    upstream_read: Counter,
    served: Counter,
    served_zero_copy: Counter,
    served_hit_copy: Counter,
    present: Gauge,
    total: Gauge,
    zero: Gauge,
    capacity: Gauge,
    evicted: Counter,
    uncached: Counter,
    /// Bytes written to the data file: [direct, buffered].
    written: [Counter; 2],
    disk_full: Gauge,
    digest: [Counter; 3],
    prefetch_done: Gauge,
    prefetch_total: Gauge,
    prefetch_bytes: Counter,
    profile_extents: Gauge,
    size: Gauge,
    parent_mismatch: Gauge,
    seeded: Counter,
    shared: Counter,
    versions: Gauge,
    clients: Gauge,
}

#[allow(clippy::cast_precision_loss)] // gauges are f64; counts fit easily
impl ImageMetrics {
    /// Every series of image `image`, registered at 0.
    #[must_use]
    pub fn new(image: &str) -> Self {
        let c = |name: &'static str| {
            let c = counter!(name, "image" => image.to_owned());
            c.increment(0);
            c
        };
        let g = |name: &'static str| {
            let g = gauge!(name, "image" => image.to_owned());
            g.set(0.0);
            g
        };
        let digest = DIGEST_SOURCES.map(|source| {
            let c = counter!("herd_chunk_digest_failures_total", "image" => image.to_owned(), "source" => source);
            c.increment(0);
            c
        });
        let written = ["direct", "buffered"].map(|mode| {
            let c = counter!("herd_cache_written_bytes_total", "image" => image.to_owned(), "mode" => mode);
            c.increment(0);
            c
        });
        Self {
            hits: c("herd_chunk_hits_total"),
            misses: c("herd_chunk_misses_total"),
            joins: c("herd_singleflight_joins_total"),
            upstream_read: c("herd_upstream_read_bytes_total"),
            served: c("herd_served_bytes_total"),
            served_zero_copy: c("herd_served_zero_copy_bytes_total"),
            served_hit_copy: c("herd_served_hit_copy_bytes_total"),
            present: g("herd_cache_chunks_present"),
            total: g("herd_cache_chunks_total"),
            zero: g("herd_cache_chunks_zero"),
            capacity: g("herd_cache_capacity_chunks"),
            evicted: c("herd_cache_evicted_chunks_total"),
            uncached: c("herd_cache_uncached_bytes_total"),
            written,
            disk_full: g("herd_cache_disk_full"),
            digest,
            prefetch_done: g("herd_prefetch_chunks_done"),
            prefetch_total: g("herd_prefetch_chunks_total"),
            prefetch_bytes: c("herd_prefetch_bytes_total"),
            profile_extents: g("herd_profile_extents"),
            size: g("herd_image_size_bytes"),
            parent_mismatch: g("herd_parent_identity_mismatch"),
            seeded: c("herd_version_seeded_bytes_total"),
            shared: c("herd_cache_shared_bytes_total"),
            versions: g("herd_image_versions"),
            clients: {
                // Shared by the image's versions: counted up and down, never
                // reset, so it is their sum.
                let g = gauge!("herd_image_clients", "image" => image.to_owned());
                g.increment(0.0);
                g
            },
        }
    }

    /// The image's identity, as an info series.
    pub fn identity(image: &str, identity: &str) {
        gauge!("herd_image_identity_info", "image" => image.to_owned(), "identity" => identity.to_owned()).set(1.0);
    }
    /// A chunk from `source` (one of `DIGEST_SOURCES`) failed its digest.
    pub fn digest_failure(&self, source: &'static str) {
        if let Some(i) = DIGEST_SOURCES.iter().position(|s| *s == source) {
            self.digest[i].increment(1);
        }
    }
    pub fn served(&self, bytes: u64) {
        self.served.increment(bytes);
    }
    pub fn served_zero_copy(&self, bytes: u64) {
        self.served_zero_copy.increment(bytes);
    }
    pub fn served_hit_copy(&self, bytes: u64) {
        self.served_hit_copy.increment(bytes);
    }
    pub fn upstream_read(&self, bytes: u64) {
        self.upstream_read.increment(bytes);
    }
    pub fn chunk_hit(&self) {
        self.hits.increment(1);
    }
    pub fn chunk_miss(&self) {
        self.misses.increment(1);
    }
    pub fn singleflight_join(&self) {
        self.joins.increment(1);
    }
    pub fn chunks_present(&self, n: u64) {
        self.present.set(n as f64);
    }
    pub fn chunks_zero(&self, n: u64) {
        self.zero.set(n as f64);
    }
    pub fn chunks_total(&self, n: u64) {
        self.total.set(n as f64);
    }
    pub fn capacity_chunks(&self, n: u64) {
        self.capacity.set(n as f64);
    }
    pub fn evicted(&self, n: u64) {
        self.evicted.increment(n);
    }
    pub fn disk_full(&self, full: bool) {
        self.disk_full.set(if full { 1.0 } else { 0.0 });
    }
    pub fn uncached_bytes(&self, n: u64) {
        self.uncached.increment(n);
    }
    pub fn written_bytes(&self, direct: bool, n: u64) {
        self.written[usize::from(!direct)].increment(n);
    }
    pub fn image_size(&self, n: u64) {
        self.size.set(n as f64);
    }
    pub fn prefetch_progress(&self, done: u64, total: u64) {
        self.prefetch_done.set(done as f64);
        self.prefetch_total.set(total as f64);
    }
    pub fn prefetch_bytes(&self, bytes: u64) {
        self.prefetch_bytes.increment(bytes);
    }
    /// Bytes a new version took from this (older) version's cache
    /// instead of fetching them.
    pub fn version_seeded(&self, bytes: u64) {
        self.seeded.increment(bytes);
    }
    /// Bytes this image read from another image's cache.
    pub fn shared_read(&self, bytes: u64) {
        self.shared.increment(bytes);
    }
    /// A connection started (`true`) or stopped reading the image.
    pub fn client(&self, connected: bool) {
        if connected {
            self.clients.increment(1.0);
        } else {
            self.clients.decrement(1.0);
        }
    }
    /// Versions of the image served now.
    pub fn versions(&self, n: usize) {
        self.versions.set(n as f64);
    }
    /// 1 while the parent serves another identity of this image.
    pub fn parent_identity_mismatch(&self, yes: bool) {
        self.parent_mismatch.set(if yes { 1.0 } else { 0.0 });
    }
    pub fn profile_extents(&self, n: usize) {
        self.profile_extents.set(n as f64);
    }
}

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample<'a> {
    pub name: &'a str,
    /// Each `label="value"`.
    pub labels: &'a str,
    pub value: f64,
}

impl Sample<'_> {
    /// The value of label `key`, if the sample has it.
    #[must_use]
    pub fn label(&self, key: &str) -> Option<&str> {
        split_labels(self.labels).into_iter().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k == key).then(|| v.trim_matches('"'))
        })
    }
}

/// Every sample of a Prometheus text exposition (comments skipped).
#[must_use]
pub fn samples(text: &str) -> Vec<Sample<'_>> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value = value.trim().parse::<f64>().ok()?;
            let (name, labels) = series
                .split_once('{')
                .map_or((series, ""), |(n, rest)| (n, rest.trim_end_matches('}')));
            Some(Sample {
                name,
                labels,
                value,
            })
        })
        .collect()
}

/// The value of `query` among `samples`: `name` or `name{label="value",…}`,
/// summed over every series of that name whose labels include the given
/// ones (so `herd_chunk_hits_total` is the node's total over its images).
/// `None` if no series matches.
#[must_use]
pub fn sum(samples: &[Sample<'_>], query: &str) -> Option<f64> {
    let (name, want) = query
        .split_once('{')
        .map_or((query, ""), |(n, rest)| (n, rest.trim_end_matches('}')));
    let want = split_labels(want);
    samples
        .iter()
        .filter(|s| s.name == name && want.iter().all(|w| split_labels(s.labels).contains(w)))
        .map(|s| s.value)
        .reduce(|a, b| a + b)
}

/// `sum` over a whole exposition: tests, benchmarks and `herd fleet
/// status` read metrics through these functions.
#[must_use]
pub fn sample(text: &str, query: &str) -> Option<f64> {
    sum(&samples(text), query)
}

/// `a="x",b="y"` → [`a="x"`, `b="y"`]; label values holding commas are
/// not split correctly, and herd writes none.
fn split_labels(labels: &str) -> Vec<&str> {
    labels.split(',').filter(|l| !l.is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::{sample, samples};

    #[test]
    fn samples_sum_over_series_with_the_asked_labels() {
        let text = "# TYPE x counter\nx{image=\"a\",source=\"parent\"} 2\nx{image=\"b\",source=\"parent\"} 3\nx{image=\"b\",source=\"cache\"} 5\ny 7\n";
        assert_eq!(sample(text, "x"), Some(10.0));
        assert_eq!(sample(text, "x{source=\"parent\"}"), Some(5.0));
        assert_eq!(sample(text, "x{image=\"b\",source=\"cache\"}"), Some(5.0));
        assert_eq!(sample(text, "x{image=\"c\"}"), None);
        assert_eq!(sample(text, "y"), Some(7.0));
        assert_eq!(sample(text, "z"), None);
        let s = samples(text);
        assert_eq!(s[0].label("source"), Some("parent"));
        assert_eq!(s[3].label("image"), None);
    }
}
