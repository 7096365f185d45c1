//! State dicts for Rust users: a tree of dicts, lists and tuples whose leaves are plain values, tensors,
//! DTensors or ShardedTensors. A tensor is a [`TensorLayout`] plus its storage's bytes, which are owned
//! (an aligned [`Buffer`]), borrowed (`&[u8]`, e.g. from an mmap), borrowed writable (`&mut [u8]`: a
//! model's own memory, received into in place) or shared (`Arc`, e.g. a whole mapped file, with a
//! byte range).

use std::ops::Range;
use std::sync::Arc;

use pgt_core::dtensor::DTensorSpec;
use pgt_core::dtype::DType;
use pgt_core::layout::{TensorLayout, MAX_VIEW_EXPANSION};
use pgt_core::sharded::{LocalShard, ShardMetadata, ShardedTensorMetadata};
use pgt_core::tree::{Key, KeyPath, Leaf, Node, PathElem, Value};

use crate::memory::Buffer;
use crate::{Error, Result};

/// Bytes shared between owners, e.g. a memory-mapped file.
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// Where a tensor's storage bytes live.
pub enum Storage<'a> {
    /// An owned, aligned, writable buffer (what receivers produce).
    Owned(Buffer),
    /// Borrowed bytes (read-only: an in-place receive refuses them).
    Borrowed(&'a [u8]),
    /// Borrowed writable bytes, e.g. a model's parameters or a writable mmap: an in-place receive
    /// writes straight into them, and the received tensor keeps borrowing them (as torch's received
    /// tensors share the storage of the `state_dict` they were received into).
    BorrowedMut(&'a mut [u8]),
    /// A range of shared bytes.
    Shared(SharedBytes, Range<usize>),
}

impl std::fmt::Debug for Storage<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            Storage::Owned(_) => "Owned",
            Storage::Borrowed(_) => "Borrowed",
            Storage::BorrowedMut(_) => "BorrowedMut",
            Storage::Shared(..) => "Shared",
        };
        write!(f, "Storage::{kind}({} bytes)", self.bytes().len())
    }
}

impl Clone for Storage<'_> {
    /// Owned buffers are copied; borrowed and shared bytes are not. Writable borrowed bytes cannot be
    /// borrowed twice: they are copied into an owned buffer.
    fn clone(&self) -> Self {
        match self {
            Storage::Owned(b) => Storage::Owned(Buffer::from_slice(b)),
            Storage::BorrowedMut(b) => Storage::Owned(Buffer::from_slice(b)),
            Storage::Borrowed(b) => Storage::Borrowed(b),
            Storage::Shared(d, r) => Storage::Shared(d.clone(), r.clone()),
        }
    }
}

impl Storage<'_> {
    /// The storage bytes.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Storage::Owned(b) => b,
            Storage::Borrowed(b) => b,
            Storage::BorrowedMut(b) => b,
            Storage::Shared(data, range) => &data.as_ref().as_ref()[range.clone()],
        }
    }

    /// The storage bytes, writable: `None` for read-only ones (borrowed or shared).
    pub fn bytes_mut(&mut self) -> Option<&mut [u8]> {
        match self {
            Storage::Owned(b) => Some(b),
            Storage::BorrowedMut(b) => Some(b),
            Storage::Borrowed(_) | Storage::Shared(..) => None,
        }
    }

    /// A `'static` storage: owned and shared storages as they are, borrowed bytes copied.
    pub fn into_static(self) -> Storage<'static> {
        match self {
            Storage::Owned(b) => Storage::Owned(b),
            Storage::Borrowed(b) => Storage::Owned(Buffer::from_slice(b)),
            Storage::BorrowedMut(b) => Storage::Owned(Buffer::from_slice(b)),
            Storage::Shared(d, r) => Storage::Shared(d, r),
        }
    }
}

/// Element types with a fixed dtype, for typed views.
pub trait Element: bytemuck::Pod {
    /// The dtype of this element type.
    const DTYPE: DType;
}

macro_rules! element {
    ($($t:ty => $d:ident),* $(,)?) => {
        $(impl Element for $t { const DTYPE: DType = DType::$d; })*
    };
}
element!(f64 => Float64, f32 => Float32, half::f16 => Float16, half::bf16 => BFloat16,
    i64 => Int64, i32 => Int32, i16 => Int16, i8 => Int8,
    u64 => UInt64, u32 => UInt32, u16 => UInt16, u8 => UInt8);

/// A tensor: layout plus storage.
#[derive(Clone, Debug)]
pub struct Tensor<'a> {
    /// Shape, stride, offset, dtype and storage size.
    pub layout: TensorLayout,
    /// The storage bytes (`layout.nbytes` of them).
    pub storage: Storage<'a>,
}

impl<'a> Tensor<'a> {
    /// A tensor over `storage`, checked: the layout is valid ([`Error::Protocol`] names the rule it
    /// breaks) and the storage has `layout.nbytes` bytes ([`Error::StateDict`]).
    pub fn new(layout: TensorLayout, storage: Storage<'a>) -> Result<Tensor<'a>> {
        layout.validate(64)?;
        if storage.bytes().len() as u64 != layout.nbytes {
            return Err(Error::state_dict(
                "",
                format!(
                    "storage has {} bytes, layout needs {}",
                    storage.bytes().len(),
                    layout.nbytes
                ),
            ));
        }
        Ok(Tensor { layout, storage })
    }

    /// A contiguous tensor owning a copy of `values`.
    pub fn from_values<T: Element>(shape: &[u64], values: &[T]) -> Result<Tensor<'static>> {
        let layout = TensorLayout::contiguous(T::DTYPE, shape);
        let bytes = bytemuck::cast_slice(values);
        Tensor::new(layout, Storage::Owned(Buffer::from_slice(bytes)))
    }

    /// A contiguous tensor over bytes it owns.
    pub fn from_bytes(dtype: DType, shape: &[u64], bytes: &[u8]) -> Result<Tensor<'static>> {
        Tensor::new(
            TensorLayout::contiguous(dtype, shape),
            Storage::Owned(Buffer::from_slice(bytes)),
        )
    }

    /// The dtype.
    pub fn dtype(&self) -> DType {
        self.layout.dtype
    }

    /// The shape.
    pub fn shape(&self) -> &[u64] {
        &self.layout.shape
    }

    /// The whole storage as elements of `T` (which must be the tensor's dtype). Errors if the storage is
    /// not aligned for `T` (owned buffers always are).
    pub fn storage_as<T: Element>(&self) -> Result<&[T]> {
        self.check_dtype::<T>()?;
        bytemuck::try_cast_slice(self.storage.bytes()).map_err(|e| {
            Error::state_dict(
                "",
                format!("storage cannot be viewed as {}: {e:?}", T::DTYPE),
            )
        })
    }

    fn check_dtype<T: Element>(&self) -> Result<()> {
        if T::DTYPE == self.layout.dtype {
            Ok(())
        } else {
            Err(Error::state_dict(
                "",
                format!("tensor is {}, not {}", self.layout.dtype, T::DTYPE),
            ))
        }
    }

    /// The view's elements in row-major order (gathered through the strides, as torch's
    /// `contiguous()`), as raw bytes. A stride-0 or self-overlapping view may take up to
    /// [`MAX_VIEW_EXPANSION`] bytes more than its storage; a larger one is
    /// [`pgt_core::Error::ViewTooLarge`] (as is memory that cannot be allocated), never an abort.
    pub fn contiguous_bytes(&self) -> Result<Vec<u8>> {
        let storage = self.storage.bytes();
        let max = (storage.len() as u64).saturating_add(MAX_VIEW_EXPANSION);
        Ok(self.layout.gather(storage, max)?)
    }

    /// The view's elements in row-major order as `T` (the tensor's dtype).
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        self.check_dtype::<T>()?;
        Ok(bytemuck::pod_collect_to_vec(&self.contiguous_bytes()?))
    }

    /// This tensor with `'static` storage (borrowed bytes are copied).
    pub fn into_static(self) -> Tensor<'static> {
        Tensor {
            layout: self.layout,
            storage: self.storage.into_static(),
        }
    }
}

/// A leaf of a state dict.
#[derive(Clone, Debug)]
pub enum Entry<'a> {
    /// A plain value.
    Value(Value),
    /// A tensor.
    Tensor(Tensor<'a>),
    /// A DTensor: local tensor plus spec.
    DTensor {
        /// The local tensor.
        local: Tensor<'a>,
        /// Mesh, placements and global metadata.
        spec: DTensorSpec,
    },
    /// A ShardedTensor: local shards with their metadata, plus the global metadata.
    Sharded {
        /// Local shards.
        local_shards: Vec<(Tensor<'a>, ShardMetadata)>,
        /// All shards, global size and dtype.
        global: ShardedTensorMetadata,
    },
}

impl<'a> Entry<'a> {
    /// The tensors whose storages travel, in wire order.
    pub fn tensors(&self) -> Vec<&Tensor<'a>> {
        match self {
            Entry::Value(_) => vec![],
            Entry::Tensor(t) | Entry::DTensor { local: t, .. } => vec![t],
            Entry::Sharded { local_shards, .. } => local_shards.iter().map(|(t, _)| t).collect(),
        }
    }

    fn tensors_mut<'e>(&'e mut self) -> Vec<&'e mut Tensor<'a>> {
        match self {
            Entry::Value(_) => vec![],
            Entry::Tensor(t) | Entry::DTensor { local: t, .. } => vec![t],
            Entry::Sharded { local_shards, .. } => {
                local_shards.iter_mut().map(|(t, _)| t).collect()
            }
        }
    }

    /// The metadata leaf describing this entry.
    pub fn to_leaf(&self) -> Leaf {
        match self {
            Entry::Value(v) => Leaf::Value(v.clone()),
            Entry::Tensor(t) => Leaf::Tensor(t.layout.clone()),
            Entry::DTensor { local, spec } => Leaf::DTensor {
                local: local.layout.clone(),
                spec: spec.clone(),
            },
            Entry::Sharded {
                local_shards,
                global,
            } => Leaf::Sharded {
                local_shards: local_shards
                    .iter()
                    .map(|(t, meta)| LocalShard {
                        layout: t.layout.clone(),
                        meta: meta.clone(),
                    })
                    .collect(),
                global: global.clone(),
            },
        }
    }

    /// An entry from a received leaf and its storages (in wire order).
    pub fn from_leaf(leaf: Leaf, storages: &mut impl Iterator<Item = Storage<'a>>) -> Result<Self> {
        let mut next = |layout: TensorLayout| -> Result<Tensor<'a>> {
            let storage = storages
                .next()
                .ok_or_else(|| Error::state_dict("", "missing storage for a leaf"))?;
            Tensor::new(layout, storage)
        };
        Ok(match leaf {
            Leaf::Value(v) => Entry::Value(v),
            Leaf::Tensor(l) => Entry::Tensor(next(l)?),
            Leaf::DTensor { local, spec } => Entry::DTensor {
                local: next(local)?,
                spec,
            },
            Leaf::Sharded {
                local_shards,
                global,
            } => Entry::Sharded {
                local_shards: local_shards
                    .into_iter()
                    .map(|s| Ok((next(s.layout)?, s.meta)))
                    .collect::<Result<_>>()?,
                global,
            },
        })
    }

    /// This entry with `'static` storages.
    pub fn into_static(self) -> Entry<'static> {
        match self {
            Entry::Value(v) => Entry::Value(v),
            Entry::Tensor(t) => Entry::Tensor(t.into_static()),
            Entry::DTensor { local, spec } => Entry::DTensor {
                local: local.into_static(),
                spec,
            },
            Entry::Sharded {
                local_shards,
                global,
            } => Entry::Sharded {
                local_shards: local_shards
                    .into_iter()
                    .map(|(t, m)| (t.into_static(), m))
                    .collect(),
                global,
            },
        }
    }
}

/// A node of a state-dict tree.
// Leaves are most nodes of a state dict: boxing them would cost an allocation per leaf for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Tree<'a> {
    /// An ordered dict.
    Dict(Vec<(Key, Tree<'a>)>),
    /// A list.
    List(Vec<Tree<'a>>),
    /// A tuple.
    Tuple(Vec<Tree<'a>>),
    /// A leaf.
    Leaf(Entry<'a>),
}

/// A state dict: a tree plus the training step it was taken at.
#[derive(Clone, Debug)]
pub struct StateDict<'a> {
    /// The tree (usually a dict at the root).
    pub root: Tree<'a>,
    /// Training step, checked by receivers that expect one.
    pub step: Option<u64>,
}

impl Default for StateDict<'_> {
    fn default() -> Self {
        StateDict {
            root: Tree::Dict(Vec::new()),
            step: None,
        }
    }
}

impl<'a> StateDict<'a> {
    /// An empty dict.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts `entry` at a dotted path of string keys (`"model.layers.0.weight"`), creating dicts on
    /// the way; replaces an existing entry.
    pub fn insert(&mut self, path: &str, entry: Entry<'a>) -> Result<()> {
        let mut node = &mut self.root;
        let parts: Vec<&str> = path.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let Tree::Dict(items) = node else {
                return Err(Error::state_dict(
                    path,
                    format!("{} is not a dict", parts[..i].join(".")),
                ));
            };
            let key = Key::Str((*part).into());
            let pos = match items.iter().position(|(k, _)| *k == key) {
                Some(p) => p,
                None => {
                    let child = if i + 1 == parts.len() {
                        Tree::Leaf(Entry::Value(Value::None))
                    } else {
                        Tree::Dict(Vec::new())
                    };
                    items.push((key, child));
                    items.len() - 1
                }
            };
            node = &mut items[pos].1;
        }
        *node = Tree::Leaf(entry);
        Ok(())
    }

    /// The entry at a key path, if any.
    pub fn get(&self, path: &KeyPath) -> Option<&Entry<'a>> {
        let mut node = &self.root;
        for elem in &path.0 {
            node = match (node, elem) {
                (Tree::Dict(items), PathElem::Key(k)) => &items.iter().find(|(key, _)| key == k)?.1,
                (Tree::List(v) | Tree::Tuple(v), PathElem::Index(i)) => v.get(*i as usize)?,
                _ => return None,
            };
        }
        match node {
            Tree::Leaf(e) => Some(e),
            _ => None,
        }
    }

    /// The entry at a dotted path of string keys.
    pub fn get_str(&self, path: &str) -> Option<&Entry<'a>> {
        let kp = KeyPath(
            path.split('.')
                .map(|s| PathElem::Key(Key::Str(s.into())))
                .collect(),
        );
        self.get(&kp)
    }

    /// The tensor at a dotted path of string keys.
    pub fn tensor(&self, path: &str) -> Option<&Tensor<'a>> {
        match self.get_str(path)? {
            Entry::Tensor(t) => Some(t),
            _ => None,
        }
    }

    /// Flattens into the wire structure: pre-order nodes, leaves in depth-first order, and each leaf's
    /// entry. Iterative, so arbitrarily deep user trees cannot overflow the stack here.
    pub fn flatten(&self) -> (Vec<Node>, Vec<&Entry<'a>>) {
        let mut nodes = Vec::new();
        let mut entries = Vec::new();
        let mut stack = vec![&self.root];
        while let Some(t) = stack.pop() {
            match t {
                Tree::Dict(items) => {
                    nodes.push(Node::Dict(items.iter().map(|(k, _)| k.clone()).collect()));
                    stack.extend(items.iter().rev().map(|(_, c)| c));
                }
                Tree::List(v) | Tree::Tuple(v) => {
                    nodes.push(match t {
                        Tree::List(_) => Node::List(v.len() as u64),
                        _ => Node::Tuple(v.len() as u64),
                    });
                    stack.extend(v.iter().rev());
                }
                Tree::Leaf(e) => {
                    nodes.push(Node::Leaf);
                    entries.push(e);
                }
            }
        }
        (nodes, entries)
    }

    /// Every leaf entry with its key path, depth-first.
    pub fn entries(&self) -> Vec<(KeyPath, &Entry<'a>)> {
        let (nodes, entries) = self.flatten();
        let paths = pgt_core::tree::key_paths(&nodes, u32::MAX).unwrap_or_default();
        paths.into_iter().zip(entries).collect()
    }

    /// Every leaf entry, mutably, with its key path, depth-first.
    pub(crate) fn entries_mut(&mut self) -> Vec<(KeyPath, &mut Entry<'a>)> {
        let (nodes, _) = self.flatten();
        let paths = pgt_core::tree::key_paths(&nodes, u32::MAX).unwrap_or_default();
        paths.into_iter().zip(self.leaves_mut()).collect()
    }

    /// Takes every leaf entry out (leaving `None` values), depth-first: the order of
    /// [`StateDict::entries_mut`].
    pub(crate) fn take_entries(&mut self) -> Vec<Entry<'a>> {
        self.leaves_mut()
            .into_iter()
            .map(|e| std::mem::replace(e, Entry::Value(Value::None)))
            .collect()
    }

    /// The owned buffers of every storage, consuming the dict: hand them to
    /// [`crate::memory::BufferPool::recycle`] so the next receive reuses touched memory.
    pub fn into_buffers(mut self) -> Vec<Buffer> {
        let mut out = Vec::new();
        for mut entry in self.take_entries() {
            for t in entry.tensors_mut() {
                if let Storage::Owned(b) = std::mem::replace(&mut t.storage, Storage::Borrowed(&[]))
                {
                    out.push(b);
                }
            }
        }
        out
    }

    fn leaves_mut(&mut self) -> Vec<&mut Entry<'a>> {
        let mut out = Vec::new();
        let mut stack = vec![&mut self.root];
        while let Some(t) = stack.pop() {
            match t {
                Tree::Dict(items) => stack.extend(items.iter_mut().rev().map(|(_, c)| c)),
                Tree::List(v) | Tree::Tuple(v) => stack.extend(v.iter_mut().rev()),
                Tree::Leaf(e) => out.push(e),
            }
        }
        out
    }

    /// Rebuilds a tree from pre-order nodes and leaf entries (depth-first order).
    pub fn unflatten(nodes: &[Node], entries: Vec<Entry<'a>>, step: Option<u64>) -> Result<Self> {
        let malformed = || Error::state_dict("", "malformed tree");
        // Build bottom-up: walk nodes in reverse pre-order, keeping finished subtrees on a stack.
        let mut entries = entries;
        let mut done: Vec<Tree<'a>> = Vec::new();
        for node in nodes.iter().rev() {
            let tree = match node {
                Node::Leaf => Tree::Leaf(
                    entries
                        .pop()
                        .ok_or_else(|| Error::state_dict("", "fewer entries than leaves"))?,
                ),
                Node::Dict(keys) => {
                    if done.len() < keys.len() {
                        return Err(malformed());
                    }
                    let children = done.split_off(done.len() - keys.len());
                    Tree::Dict(
                        keys.iter()
                            .cloned()
                            .zip(children.into_iter().rev())
                            .collect(),
                    )
                }
                Node::List(n) | Node::Tuple(n) => {
                    let n = *n as usize;
                    if done.len() < n {
                        return Err(malformed());
                    }
                    let children: Vec<_> =
                        done.split_off(done.len() - n).into_iter().rev().collect();
                    match node {
                        Node::List(_) => Tree::List(children),
                        _ => Tree::Tuple(children),
                    }
                }
            };
            done.push(tree);
        }
        if done.len() != 1 || !entries.is_empty() {
            return Err(malformed());
        }
        let root = done.pop().ok_or_else(malformed)?;
        Ok(StateDict { root, step })
    }

    /// This state dict with `'static` storages (borrowed bytes are copied).
    pub fn into_static(self) -> StateDict<'static> {
        fn conv(t: Tree<'_>) -> Tree<'static> {
            match t {
                Tree::Dict(items) => {
                    Tree::Dict(items.into_iter().map(|(k, c)| (k, conv(c))).collect())
                }
                Tree::List(v) => Tree::List(v.into_iter().map(conv).collect()),
                Tree::Tuple(v) => Tree::Tuple(v.into_iter().map(conv).collect()),
                Tree::Leaf(e) => Tree::Leaf(e.into_static()),
            }
        }
        StateDict {
            root: conv(self.root),
            step: self.step,
        }
    }

    pub(crate) fn entry_tensors_mut<'e>(entry: &'e mut Entry<'a>) -> Vec<&'e mut Tensor<'a>> {
        entry.tensors_mut()
    }
}
