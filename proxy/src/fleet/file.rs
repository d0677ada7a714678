//! The static fleet file: the members, the root and the fanout, in TOML.
//! Slots follow the order of `[[node]]` tables.
//!
//! ```toml
//! fanout = 4            # children per node (default 4)
//! export = "herd"       # the export every node serves (default "herd")
//!
//! [root]
//! name = "root"
//! addr = "198.18.0.1:10809"
//! metrics = "198.18.0.1:9100"   # optional: for `herd fleet status`
//!
//! [[node]]
//! name = "h1"
//! addr = "198.18.0.2:10809"
//! metrics = "198.18.0.2:9100"
//! # parent = "h7"      # optional: overrides the computed parent
//! ```

use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::tree::{Node, Tree, TreeError};
use super::{FleetError, Member, View, DEFAULT_FANOUT};
use crate::config::DEFAULT_EXPORT;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    fanout: Option<u32>,
    export: Option<String>,
    root: Option<Spanned<RawMember>>,
    #[serde(default)]
    node: Vec<Spanned<RawMember>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMember {
    name: Spanned<String>,
    addr: String,
    metrics: Option<String>,
    parent: Option<Spanned<String>>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Parses fleet-file text (`path` only names it in errors).
///
/// # Errors
/// `File`, naming the path and line: bad TOML, no root, a duplicate
/// member, an address that is not HOST:PORT, an unknown parent, a cycle.
pub fn parse(path: &Path, text: &str) -> Result<View, FleetError> {
    let err = |line: usize, message: String| FleetError::File {
        path: path.to_owned(),
        line,
        message,
    };
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let line = e.span().map_or(1, |s| line_of(text, s.start));
        err(line, e.message().to_owned())
    })?;
    let root = raw
        .root
        .ok_or_else(|| err(1, "no [root] table: a fleet needs its root".into()))?;
    let fanout = raw.fanout.unwrap_or(DEFAULT_FANOUT);
    if fanout == 0 {
        return Err(err(1, "fanout must be at least 1".into()));
    }
    let export = raw.export.unwrap_or_else(|| DEFAULT_EXPORT.to_owned());
    let check_addr = |m: &RawMember| -> Result<(), FleetError> {
        super::check_addr(&m.addr)
            .map_err(|message| err(line_of(text, m.name.span().start), message))
    };
    check_addr(root.get_ref())?;
    let mut members = Vec::with_capacity(raw.node.len());
    let mut nodes = Vec::with_capacity(raw.node.len());
    let mut line_by_name = std::collections::HashMap::new();
    for (i, n) in raw.node.iter().enumerate() {
        let m = n.get_ref();
        let line = line_of(text, m.name.span().start);
        check_addr(m)?;
        let name = m.name.get_ref().clone();
        if name == root.get_ref().name.get_ref().as_str() || line_by_name.contains_key(&name) {
            return Err(err(line, format!("member `{name}` appears twice")));
        }
        line_by_name.insert(name.clone(), line);
        let slot = u32::try_from(i + 1).unwrap_or(u32::MAX);
        nodes.push(Node {
            name: name.clone(),
            slot,
            parent: m.parent.as_ref().map(|p| p.get_ref().clone()),
        });
        members.push(Member {
            name,
            addr: m.addr.clone(),
            metrics: m.metrics.clone(),
            slot,
        });
    }
    let root_name = root.get_ref().name.get_ref().clone();
    let tree = Tree::compute(&root_name, &nodes, fanout).map_err(|e| {
        let line = match &e {
            TreeError::Duplicate(n) | TreeError::UnknownParent { name: n, .. } => {
                line_by_name.get(n).copied()
            }
            TreeError::SlotTaken { b, .. } => line_by_name.get(b).copied(),
            TreeError::Cycle(path) => path.first().and_then(|n| line_by_name.get(n).copied()),
            TreeError::Fanout => None,
        };
        err(line.unwrap_or(1), e.to_string())
    })?;
    let root = root.into_inner();
    Ok(View {
        root: Member {
            name: root_name,
            addr: root.addr,
            metrics: root.metrics,
            slot: super::tree::ROOT_SLOT,
        },
        members,
        fanout,
        export,
        tree,
    })
}

/// Reads and parses a fleet file.
///
/// # Errors
/// `Read`, or as [`parse`].
pub fn load(path: &Path) -> Result<View, FleetError> {
    let text = std::fs::read_to_string(path).map_err(|source| FleetError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"fanout = 2

[root]
name = "root"
addr = "10.0.0.1:10809"

[[node]]
name = "a"
addr = "10.0.0.2:10809"

[[node]]
name = "b"
addr = "10.0.0.3:10809"
metrics = "10.0.0.3:9100"

[[node]]
name = "c"
addr = "10.0.0.4:10809"
"#;

    fn p(text: &str) -> Result<View, String> {
        parse(Path::new("fleet.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn a_fleet_file_gives_the_tree() {
        let v = p(GOOD).expect("parses");
        assert_eq!(v.fanout, 2);
        assert_eq!(v.tree.parent_of("c"), Some("a"));
        let urls: Vec<String> = v.upstreams("c").iter().map(ToString::to_string).collect();
        assert_eq!(
            urls,
            vec!["nbd://10.0.0.2:10809/herd", "nbd://10.0.0.1:10809/herd"]
        );
        assert_eq!(v.members[1].metrics.as_deref(), Some("10.0.0.3:9100"));
    }

    #[test]
    fn errors_name_the_line() {
        let dup = GOOD.replace("name = \"c\"", "name = \"a\"");
        assert_eq!(
            p(&dup).expect_err("dup"),
            "fleet file fleet.toml, line 17: member `a` appears twice"
        );
        let cyc = GOOD
            .replace(
                "addr = \"10.0.0.2:10809\"",
                "addr = \"10.0.0.2:10809\"\nparent = \"b\"",
            )
            .replace("metrics = \"10.0.0.3:9100\"", "parent = \"a\"");
        let e = p(&cyc).expect_err("cycle");
        assert!(
            e.starts_with("fleet file fleet.toml, line 8: parents form a cycle"),
            "{e}"
        );
        let e = p(&GOOD.replace("[root]\nname = \"root\"\naddr = \"10.0.0.1:10809\"\n", ""))
            .expect_err("no root");
        assert!(e.contains("line 1: no [root] table"), "{e}");
        let e = p(&GOOD.replace("10.0.0.3:10809", "10.0.0.3")).expect_err("addr");
        assert!(e.contains("line 12:") && e.contains("HOST:PORT"), "{e}");
        let e = p(&GOOD.replace("fanout = 2", "fanout = \"x\"")).expect_err("type");
        assert!(e.contains("line 1:"), "{e}");
    }
}
