//! What one client may take from a server: connections (in all, and from
//! one address), bytes of replies held in memory (per connection, and in
//! all), and time (idle, and stuck writing).
//!
//! Replies that are `sendfile`d hold no memory; the others (copied hits,
//! misses, side exports, TLS) hold their bytes from the moment the request
//! is taken until the reply is written. A connection whose client stops
//! reading fills its own budget, then its reader stops taking requests:
//! it stalls itself, and holds at most its budget of the shared one.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Defaults (DESIGN.md, "Bounded resources").
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
pub const DEFAULT_MAX_PER_CLIENT: usize = 64;
/// A quarter of the shared budget: clients that stop reading hold up to
/// this each until `--write-timeout`, and it takes four to starve the rest.
pub const DEFAULT_CONNECTION_BUFFER: u64 = 2 << 20;
pub const DEFAULT_SERVER_BUFFER: u64 = 8 << 20;
pub const DEFAULT_WRITE_STALL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    /// Connections from one IP address (Unix-socket clients are not
    /// counted per address).
    pub max_per_client: usize,
    /// Reply bytes one connection may hold in memory.
    pub connection_buffer: u64,
    /// Reply bytes all connections together may hold.
    pub server_buffer: u64,
    /// A connection that sends no request for this long is closed
    /// (`None`: never; a booted VM may not read its disk for hours).
    pub idle_timeout: Option<Duration>,
    /// A reply that cannot be written for this long ends its connection:
    /// its client has stopped reading.
    pub write_stall: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_per_client: DEFAULT_MAX_PER_CLIENT,
            connection_buffer: DEFAULT_CONNECTION_BUFFER,
            server_buffer: DEFAULT_SERVER_BUFFER,
            idle_timeout: None,
            write_stall: DEFAULT_WRITE_STALL,
        }
    }
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// The server's connection counts and its shared reply budget.
pub struct Gate {
    pub limits: Limits,
    counts: Mutex<Counts>,
    shared: Arc<Semaphore>,
    held: Arc<Held>,
}

/// Reply bytes held right now, and the most ever held at once.
struct Held {
    now: AtomicU64,
    peak: AtomicU64,
    /// Their gauges, resolved once: a `gauge!` is a registry lookup, and
    /// these move twice per reply.
    gauges: crate::metrics::HeldGauges,
}

impl Held {
    fn new() -> Self {
        Self {
            now: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            gauges: crate::metrics::reply_buffer_gauges(),
        }
    }

    fn add(&self, n: u64) {
        let now = self.now.fetch_add(n, Ordering::AcqRel) + n;
        let peak = self.peak.fetch_max(now, Ordering::AcqRel).max(now);
        self.gauges.set(now, peak);
    }

    fn sub(&self, n: u64) {
        let now = self.now.fetch_sub(n, Ordering::AcqRel) - n;
        self.gauges.set(now, self.peak.load(Ordering::Acquire));
    }
}

/// One admitted connection; counted until dropped.
pub struct Slot {
    gate: Arc<Gate>,
    ip: Option<IpAddr>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self
            .gate
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        c.total = c.total.saturating_sub(1);
        crate::metrics::connections_open(c.total);
        if let Some(ip) = self.ip {
            if let Some(n) = c.per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    c.per_ip.remove(&ip);
                }
            }
        }
    }
}

fn permits(bytes: u64) -> usize {
    usize::try_from(bytes)
        .unwrap_or(usize::MAX)
        .min(Semaphore::MAX_PERMITS)
}

impl Gate {
    #[must_use]
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            counts: Mutex::default(),
            shared: Arc::new(Semaphore::new(permits(limits.server_buffer))),
            held: Arc::new(Held::new()),
        })
    }

    /// Counts a new connection from `ip`, or says why it is refused.
    ///
    /// # Errors
    /// The refusal, worded for the client and the log.
    pub fn admit(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<Slot, String> {
        let mut c = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if c.total >= self.limits.max_connections {
            return Err(format!(
                "server full: {} connections (--max-connections)",
                self.limits.max_connections
            ));
        }
        if let Some(ip) = ip {
            let n = c.per_ip.entry(ip).or_insert(0);
            if *n >= self.limits.max_per_client {
                return Err(format!(
                    "too many connections from {ip}: {} (--max-connections-per-client)",
                    self.limits.max_per_client
                ));
            }
            *n += 1;
        }
        c.total += 1;
        crate::metrics::connections_open(c.total);
        Ok(Slot {
            gate: Arc::clone(self),
            ip,
        })
    }

    /// How long a reply may wait for its client to read (`--write-timeout`).
    #[must_use]
    pub fn write_stall(&self) -> Duration {
        self.limits.write_stall
    }

    /// A new connection's reply budget.
    #[must_use]
    pub fn budget(self: &Arc<Self>) -> Budget {
        Budget {
            own: Arc::new(Semaphore::new(permits(self.limits.connection_buffer))),
            gate: Arc::clone(self),
        }
    }
}

/// One connection's reply budget, drawn on the server's too.
pub struct Budget {
    own: Arc<Semaphore>,
    gate: Arc<Gate>,
}

/// Bytes a reply holds until written; given back on drop.
pub struct Hold {
    _own: OwnedSemaphorePermit,
    _shared: OwnedSemaphorePermit,
    bytes: u64,
    held: Arc<Held>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.held.sub(self.bytes);
    }
}

impl Budget {
    /// Waits until `bytes` may be held: a request larger than a budget
    /// takes all of it (so it always fits, and a large reply is alone in
    /// the server's memory, never beside a full budget of others).
    /// `None` once the server is shutting its budgets (never, in practice).
    pub async fn hold(&self, bytes: u64) -> Option<Hold> {
        let limits = &self.gate.limits;
        let n = |cap: u64| u32::try_from(bytes.clamp(1, cap.max(1))).unwrap_or(u32::MAX);
        let own = Arc::clone(&self.own)
            .acquire_many_owned(n(limits.connection_buffer))
            .await
            .ok()?;
        let shared = Arc::clone(&self.gate.shared)
            .acquire_many_owned(n(limits.server_buffer))
            .await
            .ok()?;
        // The gauges count the real bytes, not the capped permits.
        self.gate.held.add(bytes);
        Some(Hold {
            _own: own,
            _shared: shared,
            bytes,
            held: Arc::clone(&self.gate.held),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_are_counted_per_address_and_in_all() {
        let gate = Gate::new(Limits {
            max_connections: 3,
            max_per_client: 2,
            ..Limits::default()
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = gate.admit(Some(a)).unwrap();
        let _s2 = gate.admit(Some(a)).unwrap();
        let e = gate.admit(Some(a)).err().unwrap();
        assert!(e.contains("too many connections from 10.0.0.1"), "{e}");
        let _s3 = gate.admit(Some(b)).unwrap();
        let e = gate.admit(None).err().unwrap();
        assert!(e.contains("server full"), "{e}");
        drop(s1);
        let _s4 = gate.admit(Some(a)).unwrap();
    }

    /// Whether holding `n` on `b` is still waiting after 50 ms.
    async fn waits(b: &Budget, n: u64) -> bool {
        tokio::time::timeout(Duration::from_millis(50), b.hold(n))
            .await
            .is_err()
    }

    #[tokio::test]
    async fn a_connection_holds_at_most_its_budget() {
        let gate = Gate::new(Limits {
            connection_buffer: 100,
            server_buffer: 150,
            ..Limits::default()
        });
        let (one, two) = (gate.budget(), gate.budget());
        let h0 = one.hold(60).await.unwrap();
        assert!(
            waits(&one, 41).await,
            "the connection's budget is down to 40"
        );
        let h1 = two.hold(50).await.unwrap();
        assert!(waits(&two, 51).await, "the server's is down to 40");
        drop(h0);
        // A request larger than both budgets takes all of each: it waits
        // until every other reply is written, then it fits, alone.
        let big = tokio::spawn({
            let one = gate.budget();
            async move { one.hold(1000).await.map(drop) }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!big.is_finished(), "50 of the server's budget is held");
        drop(h1);
        big.await.unwrap().unwrap();
        let h2 = one.hold(1000).await.unwrap();
        assert_eq!(gate.held.now.load(Ordering::Acquire), 1000);
        assert!(waits(&one, 1).await, "the connection's budget is spent");
        assert!(waits(&two, 1).await, "and all of the server's");
        drop(h2);
        let h3 = one.hold(60).await.unwrap();
        assert_eq!(gate.held.now.load(Ordering::Acquire), 60);
        drop(h3);
        assert_eq!(gate.held.now.load(Ordering::Acquire), 0);
        assert_eq!(gate.held.peak.load(Ordering::Acquire), 1000);
    }
}
