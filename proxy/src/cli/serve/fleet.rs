//! Fleet membership for `herd serve`: joining (a fleet file or etcd), the
//! node's status record, and following membership to new parents.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use herd::config::{ImageConfig, ServeConfig};
use herd::fleet::etcd::{Membership, Registration};
use herd::fleet::{Member, Source};
use herd::upstream::failover::FailoverUpstream;
use herd::upstream::UpstreamUrl;
use tokio::sync::watch;

/// Where children reach this node: `--advertise`, else the first TCP listener.
fn advertise(cfg: &ServeConfig) -> Result<String> {
    if let Some(a) = &cfg.advertise {
        return Ok(a.clone());
    }
    let tcp = cfg.listen.iter().find_map(|l| match l {
        herd::net::ListenAddr::Tcp(a) => Some(a.clone()),
        herd::net::ListenAddr::Unix(_) => None,
    });
    match tcp {
        Some(a) if !a.starts_with("0.0.0.0:") && !a.starts_with("[::]:") => Ok(a),
        Some(a) => {
            anyhow::bail!("listening on {a}: give --advertise HOST:PORT, the address children use")
        }
        None => anyhow::bail!("a fleet node needs a TCP --listen (or --advertise)"),
    }
}

/// The fleet's parents first, then the given ones, without repeats.
fn combine(fleet: Vec<UpstreamUrl>, given: &[UpstreamUrl]) -> Vec<UpstreamUrl> {
    let mut out = fleet;
    for g in given {
        if !out.contains(g) {
            out.push(g.clone());
        }
    }
    out
}

/// The default image's versions, once open: the node joins its fleet
/// before it has them, and its status record reports them from then on.
pub(super) type CacheSlot = Arc<std::sync::OnceLock<Arc<super::versions::Versions>>>;

/// What the status record in etcd says about this node.
fn status_of(slot: &CacheSlot) -> serde_json::Value {
    let Some((cache, parents)) = slot.get().and_then(|v| {
        let latest = v.exports.latest(&v.image.name)?;
        Some((Arc::clone(&latest.cache), v.parents()))
    }) else {
        return serde_json::json!({ "serving": false });
    };
    serde_json::json!({
        "serving": true,
        "present": cache.chunks_present(),
        "total": cache.chunks_total(),
        "zero": cache.chunks_zero(),
        "active": parents.as_ref().and_then(|p| p.active()).map(|u| u.to_string()),
    })
}

/// The parents of `image`: the fleet's first (which name the export the
/// fleet gives, or each image's own name when they are `[[image]]`
/// tables), then the image's given upstreams, without repeats; each
/// pinned to version `pin` (`NAME@IDENTITY`) when given.
pub(super) fn parents_of(
    fleet: &[UpstreamUrl],
    image: &ImageConfig,
    named: bool,
    pin: Option<&str>,
) -> Vec<UpstreamUrl> {
    let ups = fleet
        .iter()
        .filter_map(|u| {
            if named {
                u.with_export(&image.name)
            } else {
                Some(u.clone())
            }
        })
        .collect();
    combine(ups, &image.upstreams)
        .into_iter()
        .map(|u| u.pinned(pin))
        .collect()
}

/// Joins the fleet, if any: the fleet's parents to start from (empty at a
/// root, or without a fleet) and, for etcd, the membership to follow.
pub(super) async fn join_fleet(
    cfg: &ServeConfig,
    is_root: bool,
    slot: &CacheSlot,
) -> Result<(Vec<UpstreamUrl>, Option<watch::Receiver<Membership>>)> {
    // Every image can fall back on its given upstreams.
    let fallback = cfg.images.iter().all(|i| !i.upstreams.is_empty());
    match &cfg.fleet {
        None => Ok((Vec::new(), None)),
        Some(Source::File(path)) => {
            let view = herd::fleet::file::load(path)?;
            if is_root {
                anyhow::ensure!(
                    view.root.name == cfg.node,
                    "this node serves the image itself, but fleet file {} names `{}` as the root, not `{}` (give --node)",
                    path.display(),
                    view.root.name,
                    cfg.node
                );
                return Ok((Vec::new(), None));
            }
            let ups = view.upstreams(&cfg.node);
            anyhow::ensure!(
                !ups.is_empty(),
                "node `{}` is not a member of fleet file {} (give --node NAME)",
                cfg.node,
                path.display()
            );
            tracing::info!(node = %cfg.node, parent = ?view.tree.parent_of(&cfg.node), depth = view.tree.depth(&cfg.node), "fleet file read");
            Ok((ups, None))
        }
        Some(source @ Source::Etcd { endpoints, prefix }) => {
            let reg = Registration {
                endpoints: endpoints.clone(),
                prefix: prefix.clone(),
                member: Member {
                    name: cfg.node.clone(),
                    addr: advertise(cfg)?,
                    metrics: cfg.metrics.clone(),
                    slot: 0,
                },
                root: is_root.then(|| (cfg.fanout, cfg.images[0].name.clone())),
                ttl: cfg.lease_ttl,
            };
            let status_slot = Arc::clone(slot);
            let mut rx = herd::fleet::etcd::join(reg, Arc::new(move || status_of(&status_slot)));
            if is_root {
                return Ok((Vec::new(), Some(rx)));
            }
            let node = cfg.node.clone();
            let view = {
                let joined = tokio::time::timeout(
                    JOIN_WAIT,
                    rx.wait_for(|m| {
                        m.view
                            .as_ref()
                            .is_some_and(|v| !v.upstreams(&node).is_empty())
                    }),
                )
                .await;
                match joined {
                    Ok(Ok(m)) => m.view.clone(),
                    _ => None,
                }
            };
            match view {
                Some(v) => {
                    tracing::info!(node = %cfg.node, parent = ?v.tree.parent_of(&cfg.node), members = v.members.len(), "joined the fleet");
                    Ok((v.upstreams(&cfg.node), Some(rx)))
                }
                None => {
                    let why = rx
                        .borrow()
                        .error
                        .clone()
                        .unwrap_or_else(|| format!("no answer in {JOIN_WAIT:?}"));
                    anyhow::ensure!(
                        fallback,
                        "fleet {source}: {why}; give --upstream to serve without it"
                    );
                    tracing::warn!(fleet = %source, error = %why, "fleet unreachable; serving from the given upstreams and joining when it answers");
                    Ok((Vec::new(), Some(rx)))
                }
            }
        }
    }
}

/// How long a node waits for etcd at startup before it falls back to the
/// given upstreams.
const JOIN_WAIT: Duration = Duration::from_secs(5);

/// Follows membership: every new view gives this node a new parent list.
pub(super) async fn follow_fleet(
    mut rx: watch::Receiver<Membership>,
    parents: Arc<FailoverUpstream>,
    node: String,
    image: ImageConfig,
    named: bool,
    pin: Option<String>,
) {
    while rx.changed().await.is_ok() {
        let view = rx.borrow_and_update().view.clone();
        if let Some(v) = view {
            let list = parents_of(&v.upstreams(&node), &image, named, pin.as_deref());
            if !list.is_empty() && list != parents.parents() {
                parents.set_parents(list);
            }
        }
    }
}
