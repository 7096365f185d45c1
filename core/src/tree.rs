//! The state-dict tree: a pytree-like structure of dicts (str/int keys), lists and tuples whose leaves are
//! tensors, DTensors, ShardedTensors or plain values.
//!
//! On the wire the structure is a flat pre-order list of [`Node`]s, so decoding never recurses and depth is
//! checked with an explicit stack. Leaves travel separately, in the same depth-first order; key paths are
//! derived from the structure, never sent twice.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use serde::{Deserialize, Serialize};

use crate::dtensor::DTensorSpec;
use crate::layout::TensorLayout;
use crate::sharded::{LocalShard, ShardedTensorMetadata};
use crate::{Error, Result};

/// A dict key: torch state dicts use strings, and sometimes ints.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Key {
    /// A string key.
    Str(String),
    /// An integer key (i64: wider ints are values only, [`Value::Int`]).
    Int(i64),
}

impl From<&str> for Key {
    fn from(s: &str) -> Key {
        Key::Str(s.into())
    }
}

impl From<String> for Key {
    fn from(s: String) -> Key {
        Key::Str(s)
    }
}

impl From<&String> for Key {
    fn from(s: &String) -> Key {
        Key::Str(s.clone())
    }
}

impl From<i64> for Key {
    fn from(i: i64) -> Key {
        Key::Int(i)
    }
}

/// One node of the tree structure, in pre-order: a container is followed by its children's subtrees.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Node {
    /// An ordered dict; one child per key, in this order.
    Dict(Vec<Key>),
    /// A list of this many children.
    List(u64),
    /// A tuple of this many children.
    Tuple(u64),
    /// A leaf: the next entry of the leaf list.
    Leaf,
}

/// A non-tensor leaf value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Value {
    /// Python's `None`.
    None,
    /// A bool.
    Bool(bool),
    /// An integer: any of i128 (−2^127 … 2^127 − 1), so Python ints up to 2^64 − 1 (what
    /// `torch.initial_seed()` returns) travel exactly. On the wire a zigzag varint of up to 19 bytes;
    /// one in the i64 range is the same bytes as an i64 would be.
    Int(i128),
    /// A float (compared bit-for-bit by the codec: NaN payloads survive).
    Float(f64),
    /// A string.
    Str(String),
    /// Raw bytes.
    Bytes(Vec<u8>),
}

/// A leaf of the tree.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Leaf {
    /// A plain value, sent inside the metadata.
    Value(Value),
    /// A plain tensor; its storage travels on the wire.
    Tensor(TensorLayout),
    /// A DTensor: the local tensor's layout (its storage travels) and the spec.
    DTensor {
        /// Layout of the local tensor.
        local: TensorLayout,
        /// Mesh, placements and global metadata.
        spec: DTensorSpec,
    },
    /// A ShardedTensor: the sender's local shards (each storage travels) and the global metadata.
    Sharded {
        /// The shards held by the sending rank.
        local_shards: Vec<LocalShard>,
        /// All shards, global size and dtype.
        global: ShardedTensorMetadata,
    },
}

impl Leaf {
    /// The layouts of the storages this leaf sends, in wire order.
    pub fn storages(&self) -> impl Iterator<Item = &TensorLayout> {
        let (one, shards): (Option<&TensorLayout>, &[LocalShard]) = match self {
            Leaf::Value(_) => (None, &[]),
            Leaf::Tensor(l) | Leaf::DTensor { local: l, .. } => (Some(l), &[]),
            Leaf::Sharded { local_shards, .. } => (None, local_shards),
        };
        one.into_iter().chain(shards.iter().map(|s| &s.layout))
    }

    /// A short name of the leaf kind, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Leaf::Value(_) => "value",
            Leaf::Tensor(_) => "tensor",
            Leaf::DTensor { .. } => "dtensor",
            Leaf::Sharded { .. } => "sharded_tensor",
        }
    }
}

/// One step of a key path.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PathElem {
    /// A dict key.
    Key(Key),
    /// A list or tuple index.
    Index(u64),
}

/// The path from the root to a leaf.
///
/// Displayed as torch's pytree `keystr` prints one, unambiguous whatever the keys hold: each element
/// in brackets, string keys quoted as Python's `repr` quotes them (`['net1.weight']`,
/// `["it's"]`, control characters escaped), int keys and list/tuple indices as numbers
/// (`['layers'][0]['bias']`, `[3]`); the empty path (the root) as `<root>`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KeyPath(pub Vec<PathElem>);

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("<root>");
        }
        for e in &self.0 {
            match e {
                PathElem::Key(Key::Str(s)) => {
                    f.write_str("[")?;
                    write_python_repr(f, s)?;
                    f.write_str("]")?;
                }
                PathElem::Key(Key::Int(n)) => write!(f, "[{n}]")?,
                PathElem::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// A string as Python's `repr` writes it: single quotes unless it holds a `'` and no `"`; `\\`,
/// the quote, `\n`, `\r`, `\t` escaped, other control characters as `\xNN`/`\uNNNN`.
fn write_python_repr(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    write!(f, "{quote}")?;
    for c in s.chars() {
        match c {
            '\\' => f.write_str("\\\\")?,
            '\n' => f.write_str("\\n")?,
            '\r' => f.write_str("\\r")?,
            '\t' => f.write_str("\\t")?,
            c if c == quote => write!(f, "\\{c}")?,
            c if c.is_control() && (c as u32) < 0x100 => write!(f, "\\x{:02x}", c as u32)?,
            c if c.is_control() => write!(f, "\\u{:04x}", c as u32)?,
            c => write!(f, "{c}")?,
        }
    }
    write!(f, "{quote}")
}

/// Checks the flat structure (well formed, depth ≤ `max_depth`, no duplicate dict keys, nothing after the
/// root) and returns the key path of every leaf, in leaf order. Iterative: hostile depth cannot overflow
/// the stack.
///
/// The paths are not bounded in size here (a long key above many leaves is repeated in each of their
/// paths); [`crate::manifest::Manifest::new`] bounds them, see [`Error::KeyPathsTooLarge`], and a
/// receiver bounds them with the decoded size ([`Error::DecodedTooLarge`]) before decoding.
pub fn key_paths(nodes: &[Node], max_depth: u32) -> Result<Vec<KeyPath>> {
    key_paths_for(nodes, max_depth, 0)
}

/// [`key_paths`] into a list allocated for `leaves` paths.
pub(crate) fn key_paths_for(nodes: &[Node], max_depth: u32, leaves: usize) -> Result<Vec<KeyPath>> {
    let mut paths = Vec::with_capacity(leaves);
    walk(nodes, max_depth, u64::MAX, |path| {
        let mut elems = Vec::with_capacity(path.len());
        elems.extend(path);
        paths.push(KeyPath(elems));
    })?;
    Ok(paths)
}

/// Whether `keys` holds one key twice: one pass when they are in order, else a sort of references
/// (faster than a set's inserts for a dict of thousands of keys, and one allocation).
fn has_duplicate(keys: &[Key]) -> bool {
    if keys.windows(2).all(|w| w[0] < w[1]) {
        return false;
    }
    let mut sorted: Vec<&Key> = keys.iter().collect();
    sorted.sort_unstable();
    sorted.windows(2).any(|w| w[0] == w[1])
}

/// Checks the structure as [`key_paths`] does, refusing with [`Error::KeyPathsTooLarge`] once the string
/// keys of all leaves' paths together exceed `max_key_text` bytes, without building any path; returns
/// the number of leaves.
pub(crate) fn check_structure(nodes: &[Node], max_depth: u32, max_key_text: u64) -> Result<u64> {
    let mut leaves = 0u64;
    walk(nodes, max_depth, max_key_text, |_| leaves += 1)?;
    Ok(leaves)
}

fn key_text(key: &Key) -> u64 {
    match key {
        Key::Str(s) => s.len() as u64,
        Key::Int(_) => 0,
    }
}

/// An open container: children left to visit, its dict keys (if a dict), the index of the child being
/// visited (its path element).
struct Frame<'a> {
    remaining: u64,
    keys: Option<&'a [Key]>,
    next: u64,
}

impl Frame<'_> {
    /// The key of the child being visited, for a dict that has started one.
    fn current_key(&self) -> Option<&Key> {
        let i = usize::try_from(self.next.checked_sub(1)?).ok()?;
        self.keys?.get(i)
    }
}

/// The walk of PROTOCOL.md §7: checks the structure and calls `leaf` with each leaf's path (the path
/// element of every open container), in leaf order. The paths' string keys are summed as the walk goes
/// (checked at each leaf against `max_key_text`).
fn walk<'a>(
    nodes: &'a [Node],
    max_depth: u32,
    max_key_text: u64,
    mut leaf: impl FnMut(&mut dyn ExactSizeIterator<Item = PathElem>),
) -> Result<()> {
    let mut stack: Vec<Frame<'a>> = Vec::new();
    // Bytes of string keys in the current path, and in all leaves' paths so far.
    let mut path_text = 0u64;
    let mut total_text = 0u64;
    let mut iter = nodes.iter();
    let mut node = iter.next().ok_or(Error::TruncatedTree)?;
    loop {
        let container = match node {
            Node::Leaf => {
                total_text = total_text.saturating_add(path_text);
                if total_text > max_key_text {
                    return Err(Error::KeyPathsTooLarge { max: max_key_text });
                }
                leaf(&mut stack.iter().map(|f| match f.current_key() {
                    Some(k) => PathElem::Key(k.clone()),
                    None => PathElem::Index(f.next.saturating_sub(1)),
                }));
                None
            }
            Node::Dict(keys) => {
                if has_duplicate(keys) {
                    return Err(Error::DuplicateKey);
                }
                Some((keys.len() as u64, Some(keys.as_slice())))
            }
            Node::List(n) | Node::Tuple(n) => Some((*n, None)),
        };
        if let Some((remaining, keys)) = container {
            if stack.len() >= max_depth as usize {
                return Err(Error::TreeTooDeep { max: max_depth });
            }
            stack.push(Frame {
                remaining,
                keys,
                next: 0,
            });
        }
        // Advance to the next child slot, closing finished containers.
        while stack.last().is_some_and(|f| f.remaining == 0) {
            if let Some(f) = stack.pop() {
                path_text -= f.current_key().map_or(0, key_text);
            }
        }
        let Some(top) = stack.last_mut() else { break };
        path_text -= top.current_key().map_or(0, key_text);
        top.remaining -= 1;
        top.next += 1;
        path_text += top.current_key().map_or(0, key_text);
        node = iter.next().ok_or(Error::TruncatedTree)?;
    }
    if iter.next().is_some() {
        return Err(Error::TrailingTreeNodes);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    #[test]
    fn duplicates_are_found_in_order_and_out_of_order() {
        let keys = |ks: &[&str]| ks.iter().map(|&k| Key::from(k)).collect::<Vec<_>>();
        assert!(!has_duplicate(&[]));
        assert!(!has_duplicate(&keys(&["a"])));
        assert!(!has_duplicate(&keys(&["a", "b", "c"])));
        assert!(!has_duplicate(&keys(&["c", "a", "b"])));
        assert!(has_duplicate(&keys(&["a", "a"])));
        assert!(has_duplicate(&keys(&["a", "b", "b"])));
        assert!(has_duplicate(&keys(&["b", "c", "a", "b"])));
        // "1" and 1 are different keys.
        assert!(!has_duplicate(&[Key::Int(1), Key::from("1")]));
        assert!(has_duplicate(&[Key::Int(2), Key::Int(1), Key::Int(2)]));
    }

    #[test]
    fn key_paths_display_as_torch_keystr() {
        let key = |s: &str| PathElem::Key(Key::Str(s.into()));
        let show = |elems: Vec<PathElem>| KeyPath(elems).to_string();
        assert_eq!(show(vec![]), "<root>");
        assert_eq!(show(vec![key("net1.weight")]), "['net1.weight']");
        assert_eq!(
            show(vec![key("layers"), PathElem::Index(0), key("bias")]),
            "['layers'][0]['bias']"
        );
        assert_eq!(show(vec![PathElem::Key(Key::Int(-3))]), "[-3]");
        // A string key "0" and the int key 0 no longer look alike.
        assert_eq!(show(vec![key("0")]), "['0']");
        assert_eq!(show(vec![key("it's")]), "[\"it's\"]");
        assert_eq!(show(vec![key("a'b\"c")]), "['a\\'b\"c']");
        assert_eq!(
            show(vec![key("tab\there\\\n\u{1}größe")]),
            "['tab\\there\\\\\\n\\x01größe']"
        );
        assert_eq!(show(vec![key("\u{85}")]), "['\\x85']");
    }
}
