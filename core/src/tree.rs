//! The state-dict tree: a pytree-like structure of dicts (str/int keys), lists and tuples whose leaves are
//! tensors, DTensors, ShardedTensors or plain values.
//!
//! On the wire the structure is a flat pre-order list of [`Node`]s, so decoding never recurses and depth is
//! checked with an explicit stack. Leaves travel separately, in the same depth-first order; key paths are
//! derived from the structure, never sent twice.

use alloc::collections::BTreeSet;
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
    /// An integer key.
    Int(i64),
}

impl From<&str> for Key {
    fn from(s: &str) -> Key {
        Key::Str(s.into())
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
    /// An integer.
    Int(i64),
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

/// The path from the root to a leaf, e.g. `model.layers.0.weight`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KeyPath(pub Vec<PathElem>);

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("<root>");
        }
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            match e {
                PathElem::Key(Key::Str(s)) => f.write_str(s)?,
                PathElem::Key(Key::Int(n)) => write!(f, "{n}")?,
                PathElem::Index(n) => write!(f, "{n}")?,
            }
        }
        Ok(())
    }
}

/// Checks the flat structure (well formed, depth ≤ `max_depth`, no duplicate dict keys, nothing after the
/// root) and returns the key path of every leaf, in leaf order. Iterative: hostile depth cannot overflow
/// the stack.
///
/// The paths are not bounded in size here (a long key above many leaves is repeated in each of their
/// paths); [`crate::manifest::Manifest::new`] bounds them, see [`Error::KeyPathsTooLarge`].
pub fn key_paths(nodes: &[Node], max_depth: u32) -> Result<Vec<KeyPath>> {
    key_paths_within(nodes, max_depth, u64::MAX)
}

fn key_text(elem: &PathElem) -> u64 {
    match elem {
        PathElem::Key(Key::Str(s)) => s.len() as u64,
        _ => 0,
    }
}

/// [`key_paths`], refusing with [`Error::KeyPathsTooLarge`] before the string keys of all paths together
/// exceed `max_key_text` bytes (checked before each path is materialized, so that memory is never spent).
pub(crate) fn key_paths_within(
    nodes: &[Node],
    max_depth: u32,
    max_key_text: u64,
) -> Result<Vec<KeyPath>> {
    // An open container: children left to visit, its dict keys (if a dict), the next child's index.
    struct Frame<'a> {
        remaining: u64,
        keys: Option<&'a [Key]>,
        next: u64,
    }
    let mut paths = Vec::new();
    // Invariant: `path.len() == stack.len()`; `path[i]` names the child being visited in `stack[i]`.
    let mut path: Vec<PathElem> = Vec::new();
    // Bytes of string keys in `path`, and in all paths so far.
    let mut path_text = 0u64;
    let mut total_text = 0u64;
    let mut stack: Vec<Frame<'_>> = Vec::new();
    let mut iter = nodes.iter();
    let mut node = iter.next().ok_or(Error::TruncatedTree)?;
    loop {
        let container = match node {
            Node::Leaf => {
                total_text = total_text.saturating_add(path_text);
                if total_text > max_key_text {
                    return Err(Error::KeyPathsTooLarge { max: max_key_text });
                }
                paths.push(KeyPath(path.clone()));
                None
            }
            Node::Dict(keys) => {
                let mut seen = BTreeSet::new();
                if !keys.iter().all(|k| seen.insert(k)) {
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
            path.push(PathElem::Index(0));
        }
        // Advance to the next child slot, closing finished containers.
        while stack.last().is_some_and(|f| f.remaining == 0) {
            stack.pop();
            if let Some(elem) = path.pop() {
                path_text -= key_text(&elem);
            }
        }
        let Some(top) = stack.last_mut() else { break };
        let elem = match top.keys {
            Some(keys) => PathElem::Key(keys[top.next as usize].clone()),
            None => PathElem::Index(top.next),
        };
        top.remaining -= 1;
        top.next += 1;
        if let Some(slot) = path.last_mut() {
            path_text = path_text - key_text(slot) + key_text(&elem);
            *slot = elem;
        }
        node = iter.next().ok_or(Error::TruncatedTree)?;
    }
    if iter.next().is_some() {
        return Err(Error::TrailingTreeNodes);
    }
    Ok(paths)
}
