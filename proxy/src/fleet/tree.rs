//! The tree every node computes from the same member list: no process
//! assigns parents.
//!
//! Each member holds a **slot** (1, 2, 3 …; the root is slot 0). Slots form
//! a k-ary heap: slot *s* hangs under slot ⌊(s−1)/k⌋. A member's tree parent
//! is the nearest *occupied* slot above it, so a member that leaves hands
//! its children to its own parent and nobody else moves; a member that
//! joins claims the lowest free slot (in etcd, by a create-if-absent
//! transaction), filling the hole a leaver made. One change therefore
//! re-parents at most k members (the hole's children), where a tree in
//! join order would shift every member after the leaver. A member may also
//! name its parent explicitly (static fleet files); then the parent links
//! must not form a cycle.
//!
//! A node's upstream list is its tree parent, that parent's parent, then
//! the root: a dead relay sends its children one level up, not all the
//! way to the root.

use std::collections::{HashMap, HashSet};

use thiserror::Error;

/// Where the root sits in the heap.
pub const ROOT_SLOT: u32 = 0;
/// Ancestors a node lists before the root.
pub const ANCESTORS: usize = 2;

/// One member as the tree sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub slot: u32,
    /// An explicit parent (a member's name, or the root's), if configured.
    pub parent: Option<String>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TreeError {
    #[error("fanout must be at least 1")]
    Fanout,
    #[error("member `{0}` appears twice")]
    Duplicate(String),
    #[error("slot {slot} is held by both `{a}` and `{b}`")]
    SlotTaken { slot: u32, a: String, b: String },
    #[error("member `{name}` names parent `{parent}`, which is not in the fleet")]
    UnknownParent { name: String, parent: String },
    #[error("parents form a cycle: {}", .0.join(" → "))]
    Cycle(Vec<String>),
}

/// The computed tree: each member's parent (`None`: the root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    root: String,
    parent: HashMap<String, Option<String>>,
    order: Vec<String>,
}

fn heap_parent(slot: u32, fanout: u32) -> u32 {
    if slot == ROOT_SLOT {
        ROOT_SLOT
    } else {
        (slot - 1) / fanout
    }
}

impl Tree {
    /// Computes the tree of `nodes` under the root named `root`.
    ///
    /// # Errors
    /// A duplicate name or slot, an unknown explicit parent, or a cycle.
    pub fn compute(root: &str, nodes: &[Node], fanout: u32) -> Result<Self, TreeError> {
        if fanout == 0 {
            return Err(TreeError::Fanout);
        }
        let mut by_slot: HashMap<u32, &str> = HashMap::new();
        let mut names: HashSet<&str> = HashSet::new();
        for n in nodes {
            if n.name == root || !names.insert(&n.name) {
                return Err(TreeError::Duplicate(n.name.clone()));
            }
            if let Some(a) = by_slot.insert(n.slot, &n.name) {
                return Err(TreeError::SlotTaken {
                    slot: n.slot,
                    a: a.to_owned(),
                    b: n.name.clone(),
                });
            }
        }
        let mut parent = HashMap::new();
        for n in nodes {
            let p = match &n.parent {
                Some(p) if p == root => None,
                Some(p) if names.contains(p.as_str()) => Some(p.clone()),
                Some(p) => {
                    return Err(TreeError::UnknownParent {
                        name: n.name.clone(),
                        parent: p.clone(),
                    })
                }
                None => {
                    let mut s = heap_parent(n.slot, fanout);
                    loop {
                        if s == ROOT_SLOT || n.slot == ROOT_SLOT {
                            break None;
                        }
                        if let Some(name) = by_slot.get(&s) {
                            break Some((*name).to_owned());
                        }
                        s = heap_parent(s, fanout);
                    }
                }
            };
            parent.insert(n.name.clone(), p);
        }
        let mut order: Vec<&Node> = nodes.iter().collect();
        order.sort_by_key(|n| n.slot);
        let tree = Self {
            root: root.to_owned(),
            parent,
            order: order.into_iter().map(|n| n.name.clone()).collect(),
        };
        tree.check_acyclic()?;
        Ok(tree)
    }

    fn check_acyclic(&self) -> Result<(), TreeError> {
        for start in &self.order {
            let mut path = vec![start.clone()];
            let mut cur = start;
            while let Some(Some(p)) = self.parent.get(cur) {
                if path.contains(p) {
                    path.push(p.clone());
                    let from = path.iter().position(|x| x == p).unwrap_or(0);
                    return Err(TreeError::Cycle(path[from..].to_vec()));
                }
                path.push(p.clone());
                cur = p;
            }
        }
        Ok(())
    }

    /// The root's name.
    #[must_use]
    pub fn root(&self) -> &str {
        &self.root
    }

    /// Members in slot order.
    #[must_use]
    pub fn members(&self) -> &[String] {
        &self.order
    }

    /// A member's tree parent (the root's name for the first level);
    /// `None` for a name not in the tree.
    #[must_use]
    pub fn parent_of(&self, name: &str) -> Option<&str> {
        self.parent
            .get(name)
            .map(|p| p.as_deref().unwrap_or(&self.root))
    }

    /// Depth below the root (first level: 1).
    #[must_use]
    pub fn depth(&self, name: &str) -> usize {
        let mut d = 0;
        let mut cur = name;
        while let Some(Some(p)) = self.parent.get(cur) {
            d += 1;
            cur = p;
        }
        d + usize::from(self.parent.contains_key(name))
    }

    /// Where `name` reads from, in order: its parent, that parent's parent
    /// (up to [`ANCESTORS`] members), then the root.
    #[must_use]
    pub fn upstreams(&self, name: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = name;
        while let Some(Some(p)) = self.parent.get(cur) {
            if out.len() == ANCESTORS {
                break;
            }
            out.push(p.clone());
            cur = p;
        }
        out.push(self.root.clone());
        out
    }

    /// A member's children, in slot order.
    #[must_use]
    pub fn children(&self, name: &str) -> Vec<&str> {
        self.order
            .iter()
            .filter(|m| self.parent_of(m) == Some(name))
            .map(String::as_str)
            .collect()
    }
}

/// The lowest slot (≥ 1) no member holds: where a joiner goes.
#[must_use]
pub fn lowest_free_slot(taken: impl IntoIterator<Item = u32>) -> u32 {
    let taken: HashSet<u32> = taken.into_iter().collect();
    (1..).find(|s| !taken.contains(s)).unwrap_or(u32::MAX)
}

/// Members present in both trees whose parent differs.
#[must_use]
pub fn reparented(before: &Tree, after: &Tree) -> usize {
    before
        .order
        .iter()
        .filter(|m| {
            after
                .parent_of(m)
                .is_some_and(|p| Some(p) != before.parent_of(m))
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heap(n: u32) -> Vec<Node> {
        (1..=n)
            .map(|s| Node {
                name: format!("h{s}"),
                slot: s,
                parent: None,
            })
            .collect()
    }

    #[test]
    fn a_full_heap_is_a_k_ary_tree() {
        let t = Tree::compute("root", &heap(13), 3).expect("tree");
        assert_eq!(t.parent_of("h1"), Some("root"));
        assert_eq!(t.parent_of("h3"), Some("root"));
        assert_eq!(t.parent_of("h4"), Some("h1"));
        assert_eq!(t.parent_of("h13"), Some("h4"));
        assert_eq!(t.children("h1"), vec!["h4", "h5", "h6"]);
        assert_eq!(t.upstreams("h13"), vec!["h4", "h1", "root"]);
        assert_eq!(t.upstreams("h4"), vec!["h1", "root"]);
        assert_eq!(t.upstreams("h2"), vec!["root"]);
        assert_eq!(t.depth("h13"), 3);
    }

    #[test]
    fn a_hole_hands_its_children_to_its_parent() {
        let mut nodes = heap(13);
        nodes.retain(|n| n.name != "h4");
        let t = Tree::compute("root", &nodes, 3).expect("tree");
        assert_eq!(t.parent_of("h13"), Some("h1"));
        assert_eq!(t.upstreams("h13"), vec!["h1", "root"]);
    }

    /// The figure the closing note reports: one join or leave in a
    /// 100-member tree of fanout 4 moves at most 4 other members, where a
    /// tree laid out in join order moves most of the fleet.
    #[test]
    fn one_change_in_100_reparents_at_most_fanout_members() {
        let k = 4;
        let full = heap(100);
        let before = Tree::compute("root", &full, k).expect("tree");
        let mut worst_leave = 0;
        for gone in 1..=100 {
            let rest: Vec<Node> = full.iter().filter(|n| n.slot != gone).cloned().collect();
            let after = Tree::compute("root", &rest, k).expect("tree");
            let moved = reparented(&before, &after);
            worst_leave = worst_leave.max(moved);
            // The joiner that refills the hole takes the orphans back.
            let slot = lowest_free_slot(rest.iter().map(|n| n.slot));
            assert_eq!(slot, gone);
            let mut back = rest.clone();
            back.push(Node {
                name: "new".into(),
                slot,
                parent: None,
            });
            let rejoined = Tree::compute("root", &back, k).expect("tree");
            assert!(reparented(&after, &rejoined) <= k as usize);
        }
        assert_eq!(worst_leave, k as usize);
        // Appending a member moves nobody.
        let mut more = full.clone();
        more.push(Node {
            name: "h101".into(),
            slot: 101,
            parent: None,
        });
        let after = Tree::compute("root", &more, k).expect("tree");
        assert_eq!(reparented(&before, &after), 0);
        // Join order with no holes kept: removing h1 shifts everyone, and
        // 73 of the 99 who stay get a new parent.
        let shifted: Vec<Node> = full
            .iter()
            .filter(|n| n.slot != 1)
            .enumerate()
            .map(|(i, n)| Node {
                slot: u32::try_from(i).unwrap_or(0) + 1,
                ..n.clone()
            })
            .collect();
        let after = Tree::compute("root", &shifted, k).expect("tree");
        assert_eq!(reparented(&before, &after), 73);
    }

    #[test]
    fn bad_member_lists_are_refused_by_name() {
        let mut n = heap(3);
        n[2].name = "h1".into();
        assert_eq!(
            Tree::compute("root", &n, 2),
            Err(TreeError::Duplicate("h1".into()))
        );
        let mut n = heap(3);
        n[1].parent = Some("h3".into());
        n[2].parent = Some("h2".into());
        assert_eq!(
            Tree::compute("root", &n, 2),
            Err(TreeError::Cycle(vec![
                "h2".into(),
                "h3".into(),
                "h2".into()
            ]))
        );
        let mut n = heap(2);
        n[1].parent = Some("nope".into());
        assert!(matches!(
            Tree::compute("root", &n, 2),
            Err(TreeError::UnknownParent { .. })
        ));
        assert_eq!(Tree::compute("root", &heap(2), 0), Err(TreeError::Fanout));
    }

    #[test]
    fn lowest_free_slot_fills_holes_first() {
        assert_eq!(lowest_free_slot([]), 1);
        assert_eq!(lowest_free_slot([1, 2, 4]), 3);
        assert_eq!(lowest_free_slot([1, 2, 3]), 4);
    }
}
