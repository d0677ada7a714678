//! `herd fleet status`: the tree as the fleet source describes it, with
//! each node's own numbers read from its metrics endpoint.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use serde::Serialize;

use super::View;
use crate::metrics::{self, Sample};

/// One node's line.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub name: String,
    pub addr: String,
    pub slot: u32,
    pub depth: usize,
    /// Its tree parent (`None` for the root).
    pub parent: Option<String>,
    /// The parent it reads from now, by its metrics (`herd_upstream_active`).
    pub active_parent: Option<String>,
    /// `serving`, `starting` (no manifest yet), `unreachable` (metrics did
    /// not answer) or `unknown` (no metrics endpoint given).
    pub health: String,
    pub chunks_present: Option<u64>,
    pub chunks_total: Option<u64>,
    /// Chunks of zeros: never stored, so not counted against the fill.
    pub chunks_zero: Option<u64>,
    pub served_bytes: Option<u64>,
    pub failovers: Option<u64>,
}

fn scrape(addr: &str) -> Option<String> {
    let sock = addr.to_socket_addrs().ok()?.next()?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let (head, body) = body.split_once("\r\n\r\n")?;
    (head.split_whitespace().nth(1) == Some("200")).then(|| body.to_owned())
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // counters are whole numbers
fn get(s: &[Sample<'_>], name: &str) -> Option<u64> {
    metrics::sum(s, name).map(|v| v as u64)
}

/// The parent a node's metrics call active, mapped back to a member name.
fn active(view: &View, s: &[Sample<'_>]) -> Option<String> {
    let url = s
        .iter()
        .find(|x| x.name == "herd_upstream_active" && x.value == 1.0)?
        .label("parent")?;
    let hostport = url.strip_prefix("nbd://")?.split('/').next()?;
    std::iter::once(&view.root)
        .chain(&view.members)
        .find(|m| m.addr == hostport)
        .map(|m| m.name.clone())
        .or_else(|| Some(url.to_owned()))
}

/// Every node's status, the root first, then members in slot order.
#[must_use]
pub fn gather(view: &View) -> Vec<NodeStatus> {
    std::iter::once(&view.root)
        .chain(&view.members)
        .map(|m| {
            let is_root = m.name == view.root.name;
            let text = m.metrics.as_deref().and_then(scrape);
            let s = text.as_deref().map(metrics::samples).unwrap_or_default();
            let health = match (&m.metrics, &text) {
                (None, _) => "unknown",
                (Some(_), None) => "unreachable",
                (Some(_), Some(_)) if get(&s, "herd_serving") == Some(1) => "serving",
                (Some(_), Some(_)) => "starting",
            };
            NodeStatus {
                name: m.name.clone(),
                addr: m.addr.clone(),
                slot: m.slot,
                depth: if is_root { 0 } else { view.tree.depth(&m.name) },
                parent: (!is_root)
                    .then(|| view.tree.parent_of(&m.name).map(str::to_owned))
                    .flatten(),
                active_parent: if is_root { None } else { active(view, &s) },
                health: health.to_owned(),
                chunks_present: get(&s, "herd_cache_chunks_present"),
                chunks_total: get(&s, "herd_cache_chunks_total"),
                chunks_zero: get(&s, "herd_cache_chunks_zero"),
                served_bytes: get(&s, "herd_served_bytes_total"),
                failovers: get(&s, "herd_upstream_failovers_total"),
            }
        })
        .collect()
}

/// The tree as indented text, one node per line.
#[must_use]
#[allow(clippy::cast_precision_loss)]
pub fn render(view: &View, nodes: &[NodeStatus]) -> String {
    let mut out = String::new();
    let line = |n: &NodeStatus| {
        // Of the chunks that hold data: a node never stores chunks of zeros.
        let fill = match (n.chunks_present, n.chunks_total) {
            (Some(p), Some(t)) if t > n.chunks_zero.unwrap_or(0) => {
                let data = t - n.chunks_zero.unwrap_or(0);
                format!("{:.1}%", p.min(data) as f64 * 100.0 / data as f64)
            }
            (Some(_), Some(t)) if t > 0 => "100.0%".into(),
            _ => "-".into(),
        };
        let via = match (&n.parent, &n.active_parent) {
            (Some(p), Some(a)) if p != a => format!("  reads from {a} (failed over)"),
            (Some(_), None) if n.health == "serving" => "  no parent up".into(),
            _ => String::new(),
        };
        format!(
            "{} ({})  {}  fill {}  served {}  failovers {}{}",
            n.name,
            n.addr,
            n.health,
            fill,
            n.served_bytes
                .map_or_else(|| "-".into(), crate::size::human),
            n.failovers.map_or_else(|| "-".into(), |f| f.to_string()),
            via
        )
    };
    fn walk(
        view: &View,
        nodes: &[NodeStatus],
        name: &str,
        prefix: &str,
        out: &mut String,
        line: &dyn Fn(&NodeStatus) -> String,
    ) {
        let kids: Vec<&str> = if name == view.root.name {
            view.tree
                .members()
                .iter()
                .filter(|m| view.tree.parent_of(m) == Some(name))
                .map(String::as_str)
                .collect()
        } else {
            view.tree.children(name)
        };
        for (i, k) in kids.iter().enumerate() {
            let last = i + 1 == kids.len();
            if let Some(n) = nodes.iter().find(|n| n.name == *k) {
                out.push_str(&format!(
                    "{prefix}{}{}\n",
                    if last { "└── " } else { "├── " },
                    line(n)
                ));
            }
            let deeper = format!("{prefix}{}", if last { "    " } else { "│   " });
            walk(view, nodes, k, &deeper, out, line);
        }
    }
    if let Some(r) = nodes.iter().find(|n| n.name == view.root.name) {
        out.push_str(&line(r));
        out.push('\n');
    }
    walk(view, nodes, &view.root.name, "", &mut out, &line);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_read_with_labels() {
        let s = metrics::samples(
            "# TYPE x counter\nherd_served_bytes_total 1024\nherd_upstream_active{parent=\"nbd://10.0.0.2:10809/herd\"} 1\nherd_upstream_active{parent=\"nbd://10.0.0.1:10809/herd\"} 0\n",
        );
        assert_eq!(get(&s, "herd_served_bytes_total"), Some(1024));
        assert_eq!(get(&s, "missing"), None);
        let view = super::super::file::parse(
            std::path::Path::new("f"),
            "[root]\nname=\"r\"\naddr=\"10.0.0.1:10809\"\n[[node]]\nname=\"a\"\naddr=\"10.0.0.2:10809\"\n[[node]]\nname=\"b\"\naddr=\"10.0.0.3:10809\"\nparent=\"a\"\n",
        )
        .expect("fleet");
        assert_eq!(active(&view, &s).as_deref(), Some("a"));
        let nodes = gather(&view);
        let text = render(&view, &nodes);
        assert_eq!(
            text,
            "r (10.0.0.1:10809)  unknown  fill -  served -  failovers -\n\
             └── a (10.0.0.2:10809)  unknown  fill -  served -  failovers -\n    \
             └── b (10.0.0.3:10809)  unknown  fill -  served -  failovers -\n"
        );
        // Fill counts the chunks that hold data: 2 of 8, 4 being zeros.
        let mut full = nodes;
        full[0].health = "serving".into();
        (
            full[0].chunks_present,
            full[0].chunks_total,
            full[0].chunks_zero,
        ) = (Some(2), Some(8), Some(4));
        full[0].served_bytes = Some(2048);
        full[0].failovers = Some(0);
        assert!(
            render(&view, &full).starts_with(
                "r (10.0.0.1:10809)  serving  fill 50.0%  served 2.0 KiB  failovers 0\n"
            ),
            "{}",
            render(&view, &full)
        );
    }
}
