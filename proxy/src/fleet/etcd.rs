//! Membership in etcd: each node registers under a lease and watches the
//! member list; the tree follows from the list (`tree`).
//!
//! ```text
//!  PREFIX/root             {"member":…,"fanout":4,"export":"herd"}  root's lease
//!  PREFIX/slots/<n>        "<name>"        claimed by create-if-absent  member's lease
//!  PREFIX/members/<name>   {"name","addr","metrics","slot"}         member's lease
//!  PREFIX/status/<name>    {"present","total","active",…}          member's lease,
//!                                           rewritten every TTL/2, not watched
//! ```
//!
//! A node takes the lowest free slot (its previous one if still free), so
//! a leaver's hole is refilled by the next joiner. Keys live under the
//! node's lease: a node that dies vanishes after the TTL and its children
//! re-parent. When etcd is unreachable the session ends, the last view
//! stays (nodes keep serving with the parents they have) and the node
//! registers again, with a new lease, once etcd answers.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{FleetError, Member, View};

/// What the root publishes besides itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootRecord {
    pub member: Member,
    pub fanout: u32,
    pub export: String,
}

/// How this node joins.
#[derive(Debug, Clone)]
pub struct Registration {
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// This node (its slot is claimed, not given).
    pub member: Member,
    /// `Some` for the root: the fanout and export it publishes.
    pub root: Option<(u32, String)>,
    /// Lease time to live.
    pub ttl: Duration,
}

/// The latest membership as this node knows it.
#[derive(Debug, Clone, Default)]
pub struct Membership {
    pub view: Option<View>,
    /// The last etcd error, while the session is down.
    pub error: Option<String>,
}

/// Produces this node's status record (cache fill, health…).
pub type StatusFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

fn connect_options() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(3))
}

fn etcd_err(endpoints: &[String], what: &str, e: etcd_client::Error) -> FleetError {
    FleetError::Etcd {
        endpoints: endpoints.join(","),
        what: format!("{what}: {e}"),
    }
}

/// Connects to etcd (the connection is lazy: the first call tells).
///
/// # Errors
/// `Etcd` naming the endpoints.
pub async fn connect(endpoints: &[String]) -> Result<Client, FleetError> {
    Client::connect(endpoints, Some(connect_options()))
        .await
        .map_err(|e| etcd_err(endpoints, "is unreachable", e))
}

/// Reads the fleet as it stands (no registration): the view and each
/// member's status record.
///
/// # Errors
/// `Etcd` when unreachable, `NoRoot` before a root registered, `Tree`.
pub async fn read_view(
    client: &mut Client,
    endpoints: &[String],
    prefix: &str,
) -> Result<(View, Vec<(String, serde_json::Value)>), FleetError> {
    let resp = client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| etcd_err(endpoints, "is unreachable", e))?;
    let mut root: Option<RootRecord> = None;
    let mut members = Vec::new();
    let mut status = Vec::new();
    let mut owners = std::collections::HashMap::new();
    for kv in resp.kvs() {
        let Ok(key) = kv.key_str() else { continue };
        let Some(rel) = key.strip_prefix(prefix) else {
            continue;
        };
        if rel == "root" {
            root = serde_json::from_slice(kv.value()).ok();
        } else if rel.starts_with("members/") {
            if let Ok(m) = serde_json::from_slice::<Member>(kv.value()) {
                members.push(m);
            }
        } else if let Some(n) = rel.strip_prefix("slots/") {
            if let Ok(n) = n.parse::<u32>() {
                owners.insert(n, String::from_utf8_lossy(kv.value()).into_owned());
            }
        } else if let Some(name) = rel.strip_prefix("status/") {
            if let Ok(v) = serde_json::from_slice(kv.value()) {
                status.push((name.to_owned(), v));
            }
        }
    }
    let root = root.ok_or_else(|| FleetError::NoRoot {
        endpoints: endpoints.join(","),
        prefix: prefix.to_owned(),
    })?;
    // A member whose slot key names someone else (its old lease lapsed and
    // a joiner took the slot) is left out until it registers again.
    members.retain(|m: &Member| owners.get(&m.slot).is_none_or(|o| *o == m.name));
    members.sort_by_key(|m| m.slot);
    let view = View::new(root.member, members, root.fanout, root.export)?;
    Ok((view, status))
}

/// Starts this node's membership: registers, watches, and re-registers
/// after etcd comes back. Returns at once; the receiver gets the first
/// view (or an error) as soon as there is one.
#[must_use]
pub fn join(reg: Registration, status: StatusFn) -> watch::Receiver<Membership> {
    let (tx, rx) = watch::channel(Membership::default());
    tokio::spawn(async move {
        let mut slot = None;
        let mut wait = Duration::from_millis(200);
        loop {
            match session(&reg, &status, &tx, &mut slot).await {
                Ok(()) => wait = Duration::from_millis(200),
                Err(e) => {
                    let msg = crate::error_chain(&e);
                    if tx.borrow().error.as_deref() != Some(msg.as_str()) {
                        tracing::warn!(error = %msg, "fleet membership lost; keeping the current parents and retrying");
                    }
                    tx.send_modify(|m| m.error = Some(msg));
                }
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(2));
        }
    });
    rx
}

/// Claims the lowest free slot (the previous one first) with a
/// create-if-absent transaction; retries when another joiner wins.
async fn claim_slot(
    client: &mut Client,
    reg: &Registration,
    lease: i64,
    previous: Option<u32>,
) -> Result<u32, FleetError> {
    let slots = format!("{}slots/", reg.prefix);
    for _ in 0..64 {
        let resp = client
            .get(slots.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| etcd_err(&reg.endpoints, "refused a read", e))?;
        let mut taken = Vec::new();
        for kv in resp.kvs() {
            let n = kv
                .key_str()
                .ok()
                .and_then(|k| k.strip_prefix(slots.as_str()))
                .and_then(|s| s.parse::<u32>().ok());
            if let Some(n) = n {
                if kv.value() == reg.member.name.as_bytes() {
                    // Ours from an earlier lease (a quick restart): move it
                    // to this lease before the old one expires and frees it.
                    client
                        .put(
                            kv.key(),
                            reg.member.name.as_bytes(),
                            Some(PutOptions::new().with_lease(lease)),
                        )
                        .await
                        .map_err(|e| etcd_err(&reg.endpoints, "refused a write", e))?;
                    return Ok(n);
                }
                taken.push(n);
            }
        }
        let slot = previous
            .filter(|p| !taken.contains(p))
            .unwrap_or_else(|| super::tree::lowest_free_slot(taken.iter().copied()));
        let key = format!("{slots}{slot}");
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.as_str(),
                reg.member.name.as_bytes(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let won = client
            .txn(txn)
            .await
            .map_err(|e| etcd_err(&reg.endpoints, "refused a transaction", e))?
            .succeeded();
        if won {
            return Ok(slot);
        }
    }
    Err(FleetError::Etcd {
        endpoints: reg.endpoints.join(","),
        what: "kept losing slot claims (64 tries)".into(),
    })
}

async fn session(
    reg: &Registration,
    status: &StatusFn,
    tx: &watch::Sender<Membership>,
    slot: &mut Option<u32>,
) -> Result<(), FleetError> {
    let eps = &reg.endpoints;
    let mut client = connect(eps).await?;
    let ttl = i64::try_from(reg.ttl.as_secs().max(1)).unwrap_or(5);
    let lease = client
        .lease_grant(ttl, None)
        .await
        .map_err(|e| etcd_err(eps, "is unreachable", e))?
        .id();
    let (mut keeper, mut acks) = client
        .lease_keep_alive(lease)
        .await
        .map_err(|e| etcd_err(eps, "refused a lease keep-alive", e))?;
    let put_opts = || Some(PutOptions::new().with_lease(lease));
    let mut me = reg.member.clone();
    if let Some((fanout, export)) = &reg.root {
        me.slot = super::tree::ROOT_SLOT;
        let rec = RootRecord {
            member: me.clone(),
            fanout: *fanout,
            export: export.clone(),
        };
        let v = serde_json::to_vec(&rec).unwrap_or_default();
        client
            .put(format!("{}root", reg.prefix), v, put_opts())
            .await
            .map_err(|e| etcd_err(eps, "refused a write", e))?;
    } else {
        me.slot = claim_slot(&mut client, reg, lease, *slot).await?;
        *slot = Some(me.slot);
        let v = serde_json::to_vec(&me).unwrap_or_default();
        client
            .put(format!("{}members/{}", reg.prefix, me.name), v, put_opts())
            .await
            .map_err(|e| etcd_err(eps, "refused a write", e))?;
    }
    tracing::info!(name = %me.name, slot = me.slot, lease, ttl, "registered in the fleet");
    let mut watch = client
        .watch(reg.prefix.as_str(), Some(WatchOptions::new().with_prefix()))
        .await
        .map_err(|e| etcd_err(eps, "refused a watch", e))?;
    let mut refresh = true;
    let mut keep = tokio::time::interval(reg.ttl / 3);
    let mut report = tokio::time::interval((reg.ttl / 2).max(Duration::from_millis(500)));
    let status_key = format!("{}status/{}", reg.prefix, me.name);
    loop {
        if refresh {
            refresh = false;
            match read_view(&mut client, eps, &reg.prefix).await {
                Ok((view, _)) => {
                    let changed = tx.borrow().view.as_ref() != Some(&view);
                    if changed || tx.borrow().error.is_some() {
                        tx.send_modify(|m| {
                            m.view = Some(view);
                            m.error = None;
                        });
                    }
                }
                Err(e @ FleetError::NoRoot { .. }) => {
                    tx.send_modify(|m| m.error = Some(e.to_string()));
                }
                Err(e) => return Err(e),
            }
        }
        tokio::select! {
            _ = keep.tick() => {
                keeper.keep_alive().await.map_err(|e| etcd_err(eps, "stopped answering keep-alives", e))?;
            }
            ack = acks.message() => {
                match ack.map_err(|e| etcd_err(eps, "stopped answering keep-alives", e))? {
                    Some(a) if a.ttl() > 0 => {}
                    _ => return Err(FleetError::Etcd {
                        endpoints: eps.join(","),
                        what: format!("let lease {lease} expire"),
                    }),
                }
            }
            msg = watch.message() => {
                let Some(resp) = msg.map_err(|e| etcd_err(eps, "ended the watch", e))? else {
                    return Err(FleetError::Etcd { endpoints: eps.join(","), what: "ended the watch".into() });
                };
                // Status records change often and do not move the tree.
                refresh = resp.events().iter().any(|ev| {
                    let key = ev.kv().and_then(|kv| kv.key_str().ok()).unwrap_or("");
                    let rel = key.strip_prefix(reg.prefix.as_str()).unwrap_or("");
                    (rel == "root" || rel.starts_with("members/"))
                        && matches!(ev.event_type(), EventType::Put | EventType::Delete)
                });
                if resp.canceled() {
                    return Err(FleetError::Etcd { endpoints: eps.join(","), what: "cancelled the watch".into() });
                }
            }
            _ = report.tick() => {
                let v = serde_json::to_vec(&status()).unwrap_or_default();
                client
                    .put(status_key.as_str(), v, put_opts())
                    .await
                    .map_err(|e| etcd_err(eps, "refused a write", e))?;
            }
        }
    }
}
