//! Prometheus metrics: names in one place, and the HTTP exporter.
//!
//! Every metric herd exports is recorded through a function here, so the
//! names a dashboard depends on are greppable in one file.

use std::net::SocketAddr;

use metrics::{counter, gauge};
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
}

/// Serves `http://addr/metrics` in the Prometheus text format.
///
/// # Errors
/// A bad address or a failure to bind / install the recorder.
pub fn install(addr: &str) -> Result<(), MetricsError> {
    let sock: SocketAddr = addr
        .parse()
        .map_err(|_| MetricsError::Addr(addr.to_owned()))?;
    PrometheusBuilder::new()
        .with_http_listener(sock)
        .install()
        .map_err(|source| MetricsError::Install {
            addr: addr.to_owned(),
            source,
        })?;
    describe();
    Ok(())
}

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
    describe_counter!("herd_served_requests_total", "NBD requests answered");
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
    describe_gauge!("herd_cache_chunks_total", "chunks in the image");
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
}

pub fn served(bytes: u64) {
    counter!("herd_served_bytes_total").increment(bytes);
}
pub fn served_zero_copy(bytes: u64) {
    counter!("herd_served_zero_copy_bytes_total").increment(bytes);
}
pub fn request() {
    counter!("herd_served_requests_total").increment(1);
}
pub fn upstream_read(bytes: u64) {
    counter!("herd_upstream_read_bytes_total").increment(bytes);
}
pub fn chunk_hit() {
    counter!("herd_chunk_hits_total").increment(1);
}
pub fn chunk_miss() {
    counter!("herd_chunk_misses_total").increment(1);
}
pub fn singleflight_join() {
    counter!("herd_singleflight_joins_total").increment(1);
}
pub fn connection() {
    counter!("herd_nbd_connections_total").increment(1);
}
#[allow(clippy::cast_precision_loss)] // gauges are f64; chunk counts fit easily
pub fn cache_chunks_present(n: u64) {
    gauge!("herd_cache_chunks_present").set(n as f64);
}
#[allow(clippy::cast_precision_loss)]
pub fn cache_chunks_total(n: u64) {
    gauge!("herd_cache_chunks_total").set(n as f64);
}
#[allow(clippy::cast_precision_loss)]
pub fn image_size(n: u64) {
    gauge!("herd_image_size_bytes").set(n as f64);
}

#[allow(clippy::cast_precision_loss)]
pub fn prefetch_progress(done: u64, total: u64) {
    gauge!("herd_prefetch_chunks_done").set(done as f64);
    gauge!("herd_prefetch_chunks_total").set(total as f64);
}
pub fn prefetch_bytes(bytes: u64) {
    counter!("herd_prefetch_bytes_total").increment(bytes);
}
#[allow(clippy::cast_precision_loss)]
pub fn profile_extents(n: usize) {
    gauge!("herd_profile_extents").set(n as f64);
}

static ISCSI_MAX: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One SCSI command issued, with `in_flight` now outstanding.
#[allow(clippy::cast_precision_loss)]
pub fn iscsi_command(in_flight: usize) {
    counter!("herd_iscsi_commands_total").increment(1);
    let prev = ISCSI_MAX.fetch_max(in_flight, std::sync::atomic::Ordering::Relaxed);
    if in_flight > prev {
        gauge!("herd_iscsi_in_flight_max").set(in_flight as f64);
    }
}
