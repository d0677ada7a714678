//! Fleet membership and parent choice, without a master.
//!
//! ```text
//!  --fleet FILE ────────────▶ file::load ───┐
//!  --fleet etcd://…/PREFIX ─▶ etcd::join ───┼─▶ View (root, members with slots)
//!    (register under a lease,  watch)       │      └─ tree::Tree: the same tree on
//!                                           ▼         every node, from the same list
//!                         FailoverUpstream::set_parents(view.upstreams(me))
//! ```
//!
//! Every node computes the tree itself from the member list (`tree`), so
//! no process assigns parents and none is a single point of failure. When
//! etcd is unreachable a node keeps the parents it has and re-registers
//! once it is back.

#[cfg(feature = "etcd")]
pub mod etcd;
pub mod file;
pub mod status;
pub mod tree;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::upstream::UpstreamUrl;

pub use tree::Tree;

/// Children per node when the fleet does not say.
pub const DEFAULT_FANOUT: u32 = 4;

/// Where the member list comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A static TOML file (`file`).
    File(PathBuf),
    /// etcd endpoints (`host:port`) and the key prefix of this fleet.
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
    },
}

impl std::str::FromStr for Source {
    type Err = FleetError;

    fn from_str(s: &str) -> Result<Self, FleetError> {
        let Some(rest) = s.strip_prefix("etcd://") else {
            return Ok(Self::File(PathBuf::from(s)));
        };
        let bad = |why: &str| FleetError::Source {
            source_text: s.to_owned(),
            message: why.to_owned(),
        };
        let (hosts, prefix) = rest
            .split_once('/')
            .ok_or_else(|| bad("give etcd://HOST:PORT[,HOST:PORT]/PREFIX"))?;
        let endpoints: Vec<String> = hosts.split(',').map(str::to_owned).collect();
        for e in &endpoints {
            check_addr(e).map_err(|m| bad(&m))?;
        }
        let prefix = prefix.trim_matches('/');
        if prefix.is_empty() {
            return Err(bad("the key prefix is empty"));
        }
        Ok(Self::Etcd {
            endpoints,
            prefix: format!("/{prefix}/"),
        })
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p) => write!(f, "{}", p.display()),
            Self::Etcd { endpoints, prefix } => {
                write!(
                    f,
                    "etcd://{}{}",
                    endpoints.join(","),
                    prefix.trim_end_matches('/')
                )
            }
        }
    }
}

/// A node of the fleet as the member list records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    /// Where it serves NBD, HOST:PORT.
    pub addr: String,
    /// Its Prometheus endpoint, HOST:PORT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
    /// Its place in the tree (`tree`); 0 for the root.
    pub slot: u32,
}

/// One consistent picture of the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    pub root: Member,
    pub members: Vec<Member>,
    pub fanout: u32,
    pub export: String,
    pub tree: Tree,
}

impl View {
    /// Builds the view of `members` under `root`.
    ///
    /// # Errors
    /// `Tree` when the list is inconsistent (two members on one slot).
    pub fn new(
        root: Member,
        members: Vec<Member>,
        fanout: u32,
        export: String,
    ) -> Result<Self, FleetError> {
        let nodes: Vec<tree::Node> = members
            .iter()
            .map(|m| tree::Node {
                name: m.name.clone(),
                slot: m.slot,
                parent: None,
            })
            .collect();
        let tree = Tree::compute(&root.name, &nodes, fanout)?;
        Ok(Self {
            root,
            members,
            fanout,
            export,
            tree,
        })
    }

    /// The member (or the root) called `name`.
    #[must_use]
    pub fn member(&self, name: &str) -> Option<&Member> {
        if self.root.name == name {
            return Some(&self.root);
        }
        self.members.iter().find(|m| m.name == name)
    }

    fn url(&self, m: &Member) -> UpstreamUrl {
        let (host, port) = m.addr.rsplit_once(':').unwrap_or((&m.addr, "10809"));
        UpstreamUrl::NbdTcp {
            host: host.trim_matches(|c| c == '[' || c == ']').to_owned(),
            port: port.parse().unwrap_or(crate::upstream::url::NBD_PORT),
            export: self.export.clone(),
            // Whether the link uses TLS is the member's --tls setting.
            tls: false,
        }
    }

    /// Where member `name` reads from, in order (parent, grandparent, root);
    /// empty for the root or a name not in the fleet.
    #[must_use]
    pub fn upstreams(&self, name: &str) -> Vec<UpstreamUrl> {
        if name == self.root.name || self.tree.parent_of(name).is_none() {
            return Vec::new();
        }
        self.tree
            .upstreams(name)
            .iter()
            .filter_map(|n| self.member(n))
            .map(|m| self.url(m))
            .collect()
    }
}

/// Checks `HOST:PORT`.
///
/// # Errors
/// A message naming the text.
pub fn check_addr(addr: &str) -> Result<(), String> {
    match addr.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0) => Ok(()),
        _ => Err(format!("`{addr}` is not HOST:PORT")),
    }
}

#[derive(Debug, Error)]
pub enum FleetError {
    #[error("fleet source `{source_text}`: {message}")]
    Source {
        source_text: String,
        message: String,
    },
    #[error("cannot read fleet file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("fleet file {path}, line {line}: {message}")]
    File {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error(transparent)]
    Tree(#[from] tree::TreeError),
    #[error("node `{name}` is not in the fleet {source_text}")]
    NotMember { name: String, source_text: String },
    #[error("etcd at {endpoints} {what}")]
    Etcd { endpoints: String, what: String },
    #[error("etcd at {endpoints} has no root registered under {prefix}root yet")]
    NoRoot { endpoints: String, prefix: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse() {
        assert_eq!(
            "etcd://127.0.0.1:2379,10.0.0.2:2379/herd/prod"
                .parse::<Source>()
                .expect("etcd"),
            Source::Etcd {
                endpoints: vec!["127.0.0.1:2379".into(), "10.0.0.2:2379".into()],
                prefix: "/herd/prod/".into()
            }
        );
        assert_eq!(
            "fleet.toml".parse::<Source>().expect("file"),
            Source::File("fleet.toml".into())
        );
        for bad in ["etcd://127.0.0.1:2379", "etcd://h/x", "etcd://h:1/"] {
            assert!(bad.parse::<Source>().is_err(), "{bad}");
        }
    }
}
