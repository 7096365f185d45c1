//! State dicts for Rust users: a tree of dicts, lists and tuples whose leaves are plain values, tensors,
//! DTensors or ShardedTensors. A tensor is a [`TensorLayout`] plus its storage's bytes, which are owned
//! (an aligned [`Buffer`]), borrowed (`&[u8]`, e.g. from an mmap), borrowed writable (`&mut [u8]`: a
//! model's own memory, received into in place) or shared (`Arc`, e.g. a whole mapped file, with a
//! byte range).
//!
//! Shaped like PyTorch's: a key is what the user wrote, so `sd.insert("net1.weight", t)` makes the
//! one flat key `"net1.weight"` of a `model.state_dict()`, and nesting comes only from
//! [`StateDict::insert_path`] (or a [`Tree`] built by hand). [`StateDict::get`], `get_mut` and
//! `tensor` look up a root-level key, nested string keys (`&["optim", "lr"]`) or a [`KeyPath`]
//! ([`Locator`]). A dict also collects from `(key, entry)` pairs. `==` and the first difference
//! between two dicts are in [`crate::compare`].
//!
//! ```
//! use pgt_host::prelude::*;
//! let mut sd: StateDict = [("net1.weight", Tensor::from_values(&[2], &[1.0f32, 2.0])?)]
//!     .into_iter()
//!     .collect();
//! sd.insert_path(&["optim", "lr"], Value::Float(1e-3))?;
//! assert!(sd.tensor("net1.weight").is_some());
//! assert!(sd.tensor(&["net1", "weight"]).is_none()); // a dotted key is one key
//! # Ok::<(), pgt_host::Error>(())
//! ```

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use pgt_core::dtensor::{DTensorSpec, DeviceMesh, Placement};
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
    u64 => UInt64, u32 => UInt32, u16 => UInt16, u8 => UInt8,
    [f64; 2] => Complex128, [f32; 2] => Complex64, Complex32 => Complex32,
    Float8E4M3Fn => Float8E4M3Fn, Float8E5M2 => Float8E5M2,
    Float8E4M3Fnuz => Float8E4M3Fnuz, Float8E5M2Fnuz => Float8E5M2Fnuz);

/// A `complex32` element (torch's `chalf`): real and imaginary parts as float16. `complex64` and
/// `complex128` elements are `[f32; 2]` and `[f64; 2]`, `[re, im]`.
pub type Complex32 = [half::f16; 2];

macro_rules! float8 {
    ($($name:ident: $torch:literal),* $(,)?) => {$(
        #[doc = concat!("A `torch.", $torch, "` element, as its raw byte (pgt moves float8 bits, it never")]
        /// does arithmetic on them).
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
        #[repr(transparent)]
        pub struct $name(pub u8);
    )*};
}
float8!(Float8E4M3Fn: "float8_e4m3fn", Float8E5M2: "float8_e5m2",
    Float8E4M3Fnuz: "float8_e4m3fnuz", Float8E5M2Fnuz: "float8_e5m2fnuz");

/// The most dims a tensor built here may have (as the receivers' default limit).
const MAX_NDIM: u32 = 64;

/// A device mesh of `shape` over the ranks `0..product(shape)` in row-major order, as torch's
/// `init_device_mesh(device_type, shape)`.
pub fn init_device_mesh(device_type: &str, shape: &[u64]) -> Result<DeviceMesh> {
    let size = pgt_core::layout::checked_product(shape).ok_or(pgt_core::Error::LayoutOverflow)?;
    Ok(DeviceMesh {
        shape: shape.to_vec(),
        ranks: (0..size).collect(),
        dim_names: None,
        device_type: device_type.into(),
    })
}

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
        layout.validate(MAX_NDIM)?;
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

    /// A contiguous `bool` tensor owning a copy of `values`.
    pub fn from_bools(shape: &[u64], values: &[bool]) -> Result<Tensor<'static>> {
        let bytes: Vec<u8> = values.iter().map(|&b| u8::from(b)).collect();
        Tensor::from_bytes(DType::Bool, shape, &bytes)
    }

    /// The view's elements of a `bool` tensor in row-major order; a byte other than 0 or 1 is an
    /// error (torch never stores one).
    pub fn to_bools(&self) -> Result<Vec<bool>> {
        if self.layout.dtype != DType::Bool {
            return Err(Error::state_dict(
                "",
                format!("tensor is {}, not bool", self.layout.dtype),
            ));
        }
        self.contiguous_bytes()?
            .into_iter()
            .map(|b| match b {
                0 => Ok(false),
                1 => Ok(true),
                x => Err(Error::state_dict("", format!("bool byte {x:#04x}"))),
            })
            .collect()
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
    /// A DTensor from this rank's `local` tensor, as torch's `DTensor.from_local(local, mesh,
    /// placements, run_check=False)` with even sharding: the global shape multiplies the local size
    /// along each sharded dim by its mesh dim's size, and the global stride rescales the local one
    /// likewise (torch's `compute_global_tensor_info`); the dtype is the local tensor's. Checks what
    /// torch checks, and the spec's own rules ([`DTensorSpec::validate`]): one placement per mesh
    /// dim, shard dims inside the tensor, mesh ranks unique, sizes that do not overflow.
    pub fn dtensor_from_local(
        local: Tensor<'a>,
        mesh: DeviceMesh,
        placements: Vec<Placement>,
    ) -> Result<Entry<'a>> {
        if placements.len() != mesh.shape.len() {
            return Err(pgt_core::Error::PlacementCount {
                placements: placements.len() as u64,
                mesh_ndim: mesh.shape.len() as u64,
            }
            .into());
        }
        let mut shape = local.layout.shape.clone();
        let mut stride = local.layout.stride.clone();
        for (p, &mesh_size) in placements.iter().zip(&mesh.shape) {
            let Placement::Shard(dim) = *p else { continue };
            let dim = dim as usize;
            if dim >= shape.len() {
                return Err(pgt_core::Error::ShardDimOutOfRange {
                    dim: dim as u64,
                    ndim: shape.len() as u64,
                }
                .into());
            }
            shape[dim] = shape[dim]
                .checked_mul(mesh_size)
                .ok_or(pgt_core::Error::LayoutOverflow)?;
            let shard_stride = stride[dim];
            for (i, s) in stride.iter_mut().enumerate() {
                if i != dim && *s >= shard_stride {
                    *s = s
                        .checked_mul(mesh_size)
                        .ok_or(pgt_core::Error::LayoutOverflow)?;
                }
            }
        }
        let spec = DTensorSpec {
            mesh,
            placements,
            global_shape: shape,
            global_stride: stride,
            dtype: local.layout.dtype,
        };
        spec.validate(&local.layout, MAX_NDIM)?;
        Ok(Entry::DTensor { local, spec })
    }

    /// A ShardedTensor from this rank's shards when they are all the shards of the tensor (one
    /// process holds the whole ShardedTensor): [`Entry::sharded_from_local_shards_and_global`] with
    /// the local shards' metadata as the global shards.
    pub fn sharded_from_local_shards(
        local_shards: Vec<(Tensor<'a>, ShardMetadata)>,
        global_size: &[u64],
    ) -> Result<Entry<'a>> {
        let global_shards = local_shards.iter().map(|(_, m)| m.clone()).collect();
        Entry::sharded_from_local_shards_and_global(local_shards, global_shards, global_size)
    }

    /// A ShardedTensor from this rank's shards and the metadata of every shard on every rank (what
    /// torch's `init_from_local_shards` gathers from the group; here the caller says it), as
    /// torch's `ShardedTensor._init_from_local_shards_and_global_metadata`. The dtype is the local
    /// shards' (given once). Checks what torch checks: at least one local shard (to take the dtype
    /// from) and all of one dtype, each local tensor contiguous and of its metadata's size, every
    /// shard inside the global size with a `rank:N/device` placement, the global shards tiling the
    /// tensor, and each local shard among them ([`ShardedTensorMetadata::validate`]).
    pub fn sharded_from_local_shards_and_global(
        local_shards: Vec<(Tensor<'a>, ShardMetadata)>,
        global_shards: Vec<ShardMetadata>,
        global_size: &[u64],
    ) -> Result<Entry<'a>> {
        let Some((first, _)) = local_shards.first() else {
            return Err(Error::state_dict(
                "",
                "a ShardedTensor needs a local shard to take its dtype from",
            ));
        };
        let global = ShardedTensorMetadata {
            shards: global_shards,
            global_size: global_size.to_vec(),
            dtype: first.layout.dtype,
        };
        for (i, (t, _)) in local_shards.iter().enumerate() {
            if !t.layout.is_contiguous() {
                return Err(Error::state_dict(
                    "",
                    format!(
                        "local shard {i} is not contiguous (torch supports contiguous shards only)"
                    ),
                ));
            }
        }
        let described: Vec<LocalShard> = local_shards
            .iter()
            .map(|(t, meta)| LocalShard {
                layout: t.layout.clone(),
                meta: meta.clone(),
            })
            .collect();
        global.validate(&described, MAX_NDIM)?;
        Ok(Entry::Sharded {
            local_shards,
            global,
        })
    }

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

    /// Whether `leaf` describes this entry: what [`Entry::to_leaf`] would give, compared without
    /// building it.
    pub(crate) fn is_described_by(&self, leaf: &Leaf) -> bool {
        match (self, leaf) {
            (Entry::Value(v), Leaf::Value(w)) => v == w,
            (Entry::Tensor(t), Leaf::Tensor(l)) => t.layout == *l,
            (Entry::DTensor { local, spec }, Leaf::DTensor { local: l, spec: s }) => {
                local.layout == *l && spec == s
            }
            (
                Entry::Sharded {
                    local_shards,
                    global,
                },
                Leaf::Sharded {
                    local_shards: shards,
                    global: g,
                },
            ) => {
                global == g
                    && local_shards.len() == shards.len()
                    && local_shards
                        .iter()
                        .zip(shards)
                        .all(|((t, meta), s)| t.layout == s.layout && *meta == s.meta)
            }
            _ => false,
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

/// A container of [`StateDict::unflatten_from`] still missing children.
enum OpenContainer<'a> {
    /// The keys still waiting for their child, in order.
    Dict {
        keys: std::vec::IntoIter<Key>,
        items: Vec<(Key, Tree<'a>)>,
    },
    Sequence {
        tuple: bool,
        len: usize,
        items: Vec<Tree<'a>>,
    },
}

impl<'a> OpenContainer<'a> {
    /// Adds the next child: whether the container is now complete (`None`: it already was).
    fn push(&mut self, child: Tree<'a>) -> Option<bool> {
        match self {
            OpenContainer::Dict { keys, items } => {
                items.push((keys.next()?, child));
                Some(keys.len() == 0)
            }
            OpenContainer::Sequence { len, items, .. } => {
                if items.len() == *len {
                    return None;
                }
                items.push(child);
                Some(items.len() == *len)
            }
        }
    }

    fn into_tree(self) -> Tree<'a> {
        match self {
            OpenContainer::Dict { items, .. } => Tree::Dict(items),
            OpenContainer::Sequence {
                tuple: true, items, ..
            } => Tree::Tuple(items),
            OpenContainer::Sequence { items, .. } => Tree::List(items),
        }
    }
}

/// What [`StateDict::get`] looks up: a root-level key (`str`, `String`, [`Key`]), nested string
/// keys (`[&str; N]`, `[&str]`) or a whole [`KeyPath`] (`[PathElem]`).
pub trait Locator {
    /// The path from the root.
    fn steps(&self) -> Cow<'_, [PathElem]>;
}

impl Locator for str {
    fn steps(&self) -> Cow<'_, [PathElem]> {
        Cow::Owned(vec![PathElem::Key(Key::Str(self.into()))])
    }
}

impl<T: Locator + ?Sized> Locator for &T {
    fn steps(&self) -> Cow<'_, [PathElem]> {
        (**self).steps()
    }
}

impl Locator for String {
    fn steps(&self) -> Cow<'_, [PathElem]> {
        self.as_str().steps()
    }
}

impl Locator for Key {
    fn steps(&self) -> Cow<'_, [PathElem]> {
        Cow::Owned(vec![PathElem::Key(self.clone())])
    }
}

impl Locator for KeyPath {
    fn steps(&self) -> Cow<'_, [PathElem]> {
        Cow::Borrowed(&self.0)
    }
}

impl Locator for [PathElem] {
    fn steps(&self) -> Cow<'_, [PathElem]> {
        Cow::Borrowed(self)
    }
}

impl Locator for [&str] {
    fn steps(&self) -> Cow<'_, [PathElem]> {
        Cow::Owned(
            self.iter()
                .map(|s| PathElem::Key(Key::Str((*s).into())))
                .collect(),
        )
    }
}

impl<const N: usize> Locator for [&str; N] {
    fn steps(&self) -> Cow<'_, [PathElem]> {
        self.as_slice().steps()
    }
}

impl<'a> From<Tensor<'a>> for Entry<'a> {
    fn from(t: Tensor<'a>) -> Self {
        Entry::Tensor(t)
    }
}

impl From<Value> for Entry<'_> {
    fn from(v: Value) -> Self {
        Entry::Value(v)
    }
}

impl<'a> From<Entry<'a>> for Tree<'a> {
    fn from(e: Entry<'a>) -> Self {
        Tree::Leaf(e)
    }
}

impl<'a> From<Tensor<'a>> for Tree<'a> {
    fn from(t: Tensor<'a>) -> Self {
        Tree::Leaf(Entry::Tensor(t))
    }
}

impl From<Value> for Tree<'_> {
    fn from(v: Value) -> Self {
        Tree::Leaf(Entry::Value(v))
    }
}

/// A flat dict from `(key, entry)` pairs, in order (a later equal key replaces the earlier entry in
/// its place), like `dict(pairs)` in Python.
impl<'a, K: Into<Key>, E: Into<Entry<'a>>> FromIterator<(K, E)> for StateDict<'a> {
    fn from_iter<I: IntoIterator<Item = (K, E)>>(pairs: I) -> Self {
        let mut items: Vec<(Key, Tree<'a>)> = Vec::new();
        let mut index: std::collections::HashMap<Key, usize> = std::collections::HashMap::new();
        for (k, e) in pairs {
            let (key, tree) = (k.into(), Tree::Leaf(e.into()));
            match index.get(&key) {
                Some(&i) => items[i].1 = tree,
                None => {
                    index.insert(key.clone(), items.len());
                    items.push((key, tree));
                }
            }
        }
        StateDict {
            root: Tree::Dict(items),
            step: None,
        }
    }
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

    /// Inserts `entry` (an [`Entry`], [`Tensor`], [`Value`] or a whole [`Tree`]) under the
    /// root-level `key`, replacing what is already there. A string key
    /// is one key whatever it contains: `insert("net1.weight", …)` makes the flat key
    /// `"net1.weight"`, as in a PyTorch `model.state_dict()` ([`StateDict::insert_path`] nests).
    /// Errors if the root is not a dict.
    pub fn insert(&mut self, key: impl Into<Key>, entry: impl Into<Tree<'a>>) -> Result<()> {
        self.insert_path(&[PathElem::Key(key.into())][..], entry)
    }

    /// Inserts `entry` at `path`, creating the dicts its keys name on the way and replacing an
    /// entry already there. A list or tuple index must name an existing element.
    /// `path` is a [`KeyPath`] or nested string keys: `sd.insert_path(&["model", "weight"], t)`.
    pub fn insert_path<L: Locator + ?Sized>(
        &mut self,
        path: &L,
        entry: impl Into<Tree<'a>>,
    ) -> Result<()> {
        let steps = path.steps();
        let path = KeyPath(steps.to_vec());
        let mut node = &mut self.root;
        for (depth, elem) in path.0.iter().enumerate() {
            let last = depth + 1 == path.0.len();
            let at = || KeyPath(path.0[..depth].to_vec());
            node = match (node, elem) {
                (Tree::Dict(items), PathElem::Key(key)) => {
                    let pos = match items.iter().position(|(k, _)| k == key) {
                        Some(p) => p,
                        None => {
                            let child = if last {
                                Tree::Leaf(Entry::Value(Value::None))
                            } else {
                                Tree::Dict(Vec::new())
                            };
                            items.push((key.clone(), child));
                            items.len() - 1
                        }
                    };
                    &mut items[pos].1
                }
                (Tree::List(v) | Tree::Tuple(v), PathElem::Index(i)) => {
                    let len = v.len();
                    v.get_mut(*i as usize).ok_or_else(|| {
                        Error::state_dict(
                            path.to_string(),
                            format!("{} has {len} elements, no index {i}", at()),
                        )
                    })?
                }
                (node, _) => {
                    let kind = match node {
                        Tree::Dict(_) => "a dict (it takes keys, not indices)",
                        Tree::List(_) => "a list (it takes indices, not keys)",
                        Tree::Tuple(_) => "a tuple (it takes indices, not keys)",
                        Tree::Leaf(_) => "a leaf",
                    };
                    return Err(Error::state_dict(
                        path.to_string(),
                        format!("{} is {kind}", at()),
                    ));
                }
            };
        }
        *node = entry.into();
        Ok(())
    }

    /// The entry at `at`: a root-level key (`sd.get("net1.weight")`, a [`Key`]), a path of nested
    /// string keys (`sd.get(&["model", "weight"])`) or a [`KeyPath`].
    pub fn get<L: Locator + ?Sized>(&self, at: &L) -> Option<&Entry<'a>> {
        let mut node = &self.root;
        for elem in at.steps().iter() {
            node = match (node, elem) {
                (Tree::Dict(items), PathElem::Key(k)) => &items.iter().find(|(key, _)| key == k)?.1,
                (Tree::List(v) | Tree::Tuple(v), PathElem::Index(i)) => {
                    v.get(usize::try_from(*i).ok()?)?
                }
                _ => return None,
            };
        }
        match node {
            Tree::Leaf(e) => Some(e),
            _ => None,
        }
    }

    /// The entry at `at` (as [`StateDict::get`]), mutably.
    pub fn get_mut<L: Locator + ?Sized>(&mut self, at: &L) -> Option<&mut Entry<'a>> {
        let mut node = &mut self.root;
        for elem in at.steps().iter() {
            node = match (node, elem) {
                (Tree::Dict(items), PathElem::Key(k)) => {
                    &mut items.iter_mut().find(|(key, _)| key == k)?.1
                }
                (Tree::List(v) | Tree::Tuple(v), PathElem::Index(i)) => {
                    v.get_mut(usize::try_from(*i).ok()?)?
                }
                _ => return None,
            };
        }
        match node {
            Tree::Leaf(e) => Some(e),
            _ => None,
        }
    }

    /// The plain tensor at `at` (as [`StateDict::get`]), if that is a plain tensor.
    pub fn tensor<L: Locator + ?Sized>(&self, at: &L) -> Option<&Tensor<'a>> {
        match self.get(at)? {
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

    /// Whether this dict's tree is `nodes` (pre-order, as [`StateDict::flatten`] gives them): same
    /// containers, same keys in the same order, leaves in the same places. Then its leaf *i* is the
    /// leaf *i* of a tree flattened to `nodes`. Walks without building anything.
    pub(crate) fn has_shape(&self, nodes: &[Node]) -> bool {
        let mut nodes = nodes.iter();
        let mut stack = vec![&self.root];
        while let Some(t) = stack.pop() {
            let same = match (t, nodes.next()) {
                (Tree::Dict(items), Some(Node::Dict(keys))) => {
                    stack.extend(items.iter().rev().map(|(_, c)| c));
                    items.len() == keys.len()
                        && items.iter().zip(keys).all(|((k, _), key)| k == key)
                }
                (Tree::List(v), Some(Node::List(n))) | (Tree::Tuple(v), Some(Node::Tuple(n))) => {
                    stack.extend(v.iter().rev());
                    v.len() as u64 == *n
                }
                (Tree::Leaf(_), Some(Node::Leaf)) => true,
                _ => false,
            };
            if !same {
                return false;
            }
        }
        nodes.next().is_none()
    }

    /// Every leaf's key path, depth-first.
    pub(crate) fn key_paths(&self) -> Vec<KeyPath> {
        let (nodes, _) = self.flatten();
        pgt_core::tree::key_paths(&nodes, u32::MAX).unwrap_or_default()
    }

    /// Every leaf entry with its key path, depth-first.
    pub fn entries(&self) -> Vec<(KeyPath, &Entry<'a>)> {
        let (nodes, entries) = self.flatten();
        let paths = pgt_core::tree::key_paths(&nodes, u32::MAX).unwrap_or_default();
        paths.into_iter().zip(entries).collect()
    }

    /// Every leaf entry, depth-first.
    pub(crate) fn leaves(&self) -> Vec<&Entry<'a>> {
        let mut out = Vec::new();
        let mut stack = vec![&self.root];
        while let Some(t) = stack.pop() {
            match t {
                Tree::Dict(items) => stack.extend(items.iter().rev().map(|(_, c)| c)),
                Tree::List(v) | Tree::Tuple(v) => stack.extend(v.iter().rev()),
                Tree::Leaf(e) => out.push(e),
            }
        }
        out
    }

    /// Takes every leaf entry out (leaving `None` values), depth-first: the order of
    /// [`StateDict::leaves_mut`].
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

    /// Every leaf entry, mutably, depth-first.
    pub(crate) fn leaves_mut(&mut self) -> Vec<&mut Entry<'a>> {
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
        Self::unflatten_from(nodes.iter().cloned(), entries.into_iter().map(Ok), step)
    }

    /// [`StateDict::unflatten`] from owned nodes, whose keys move into the tree, and entries made
    /// as the walk reaches them. Each container is allocated once at its size and each entry moved
    /// once into it: a received tree of many leaves is not copied through intermediate lists.
    pub(crate) fn unflatten_from(
        mut nodes: impl ExactSizeIterator<Item = Node>,
        mut entries: impl Iterator<Item = Result<Entry<'a>>>,
        step: Option<u64>,
    ) -> Result<Self> {
        let malformed = || Error::state_dict("", "malformed tree");
        // Containers still missing children, innermost last.
        let mut open: Vec<OpenContainer<'a>> = Vec::new();
        let mut root = None;
        while let Some(node) = nodes.next() {
            if root.is_some() {
                return Err(malformed());
            }
            // Each child takes at least one node: a container that wants more than are left is
            // malformed (and its list is never allocated).
            let left = nodes.len();
            let tree = match node {
                Node::Leaf => Tree::Leaf(
                    entries
                        .next()
                        .ok_or_else(|| Error::state_dict("", "fewer entries than leaves"))??,
                ),
                Node::Dict(keys) if keys.is_empty() => Tree::Dict(Vec::new()),
                Node::Dict(keys) if keys.len() <= left => {
                    open.push(OpenContainer::Dict {
                        items: Vec::with_capacity(keys.len()),
                        keys: keys.into_iter(),
                    });
                    continue;
                }
                Node::List(0) => Tree::List(Vec::new()),
                Node::Tuple(0) => Tree::Tuple(Vec::new()),
                Node::List(n) | Node::Tuple(n) if n <= left as u64 => {
                    open.push(OpenContainer::Sequence {
                        tuple: matches!(node, Node::Tuple(_)),
                        len: n as usize,
                        items: Vec::with_capacity(n as usize),
                    });
                    continue;
                }
                Node::Dict(_) | Node::List(_) | Node::Tuple(_) => return Err(malformed()),
            };
            // The finished subtree goes into its container, which may be finished in turn.
            let mut finished = Some(tree);
            while let Some(tree) = finished.take() {
                match open.pop() {
                    None => root = Some(tree),
                    Some(mut parent) => match parent.push(tree).ok_or_else(malformed)? {
                        true => finished = Some(parent.into_tree()),
                        false => open.push(parent),
                    },
                }
            }
        }
        match root {
            Some(root) if open.is_empty() && entries.next().is_none() => {
                Ok(StateDict { root, step })
            }
            _ => Err(malformed()),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn protocol(e: Error) -> pgt_core::Error {
        match e {
            Error::Protocol(p) => p,
            e => panic!("not a protocol error: {e}"),
        }
    }

    #[test]
    fn has_shape_compares_containers_keys_and_leaves() {
        let mut sd = StateDict::new();
        sd.insert("a", Value::Int(1)).unwrap();
        sd.insert(
            "l",
            Tree::List(vec![
                Tree::Leaf(Entry::Value(Value::None)),
                Tree::Dict(vec![]),
            ]),
        )
        .unwrap();
        let (nodes, _) = sd.flatten();
        assert!(sd.has_shape(&nodes));
        let other = |f: &dyn Fn(&mut Vec<Node>)| {
            let mut n = nodes.clone();
            f(&mut n);
            n
        };
        let renamed = other(&|n| n[0] = Node::Dict(vec!["a".into(), "m".into()]));
        let reordered = other(&|n| n[0] = Node::Dict(vec!["l".into(), "a".into()]));
        let tuple = other(&|n| n[2] = Node::Tuple(2));
        let longer = other(&|n| n[2] = Node::List(3));
        let leaf_for_dict = other(&|n| n[4] = Node::Leaf);
        let extra = other(&|n| n.push(Node::Leaf));
        let shorter = other(&|n| {
            n.pop();
        });
        for (what, n) in [
            ("renamed", renamed),
            ("reordered", reordered),
            ("tuple", tuple),
            ("longer", longer),
            ("leaf_for_dict", leaf_for_dict),
            ("extra", extra),
            ("shorter", shorter),
        ] {
            assert!(!sd.has_shape(&n), "{what}");
        }
    }

    /// A dict of every container kind, empty ones included, with value leaves numbered in order.
    fn nested() -> StateDict<'static> {
        let leaf = |i: i128| Tree::Leaf(Entry::Value(Value::Int(i)));
        let mut sd = StateDict::new();
        sd.insert("a", Value::Int(0)).unwrap();
        sd.insert(
            "l",
            Tree::List(vec![
                leaf(1),
                Tree::Dict(vec![
                    ("x".into(), leaf(2)),
                    ("y".into(), Tree::Tuple(vec![])),
                ]),
                Tree::Tuple(vec![leaf(3), Tree::List(vec![]), leaf(4)]),
            ]),
        )
        .unwrap();
        sd.insert("e", Tree::Dict(vec![])).unwrap();
        sd.step = Some(9);
        sd
    }

    fn values(entries: &[&Entry<'_>]) -> Vec<i128> {
        entries
            .iter()
            .map(|e| match e {
                Entry::Value(Value::Int(i)) => *i,
                e => panic!("not a numbered leaf: {e:?}"),
            })
            .collect()
    }

    #[test]
    fn unflatten_rebuilds_what_flatten_took_apart() {
        let sd = nested();
        let (nodes, entries) = sd.flatten();
        let owned: Vec<Entry> = entries.iter().map(|e| (*e).clone()).collect();
        let rebuilt = StateDict::unflatten(&nodes, owned, sd.step).unwrap();
        let (again, again_entries) = rebuilt.flatten();
        assert_eq!(again, nodes);
        assert_eq!(values(&again_entries), [0, 1, 2, 3, 4]);
        assert_eq!(rebuilt.step, Some(9));
        // A lone leaf and a lone empty container are trees too.
        let lone = StateDict::unflatten(&[Node::Leaf], vec![Entry::Value(Value::Int(5))], None);
        assert!(matches!(lone.unwrap().root, Tree::Leaf(_)));
        let empty = StateDict::unflatten(&[Node::List(0)], vec![], None).unwrap();
        assert!(matches!(empty.root, Tree::List(v) if v.is_empty()));
    }

    #[test]
    fn unflatten_refuses_nodes_and_entries_that_do_not_fit() {
        let sd = nested();
        let (nodes, entries) = sd.flatten();
        let owned = || -> Vec<Entry> { entries.iter().map(|e| (*e).clone()).collect() };
        let refused = |nodes: &[Node], entries: Vec<Entry<'static>>| {
            StateDict::unflatten(nodes, entries, None)
                .err()
                .map(|e| e.to_string())
        };
        let fewer = owned()[..4].to_vec();
        assert_eq!(
            refused(&nodes, fewer).as_deref(),
            Some("fewer entries than leaves")
        );
        let mut more = owned();
        more.push(Entry::Value(Value::None));
        let mut trailing = nodes.clone();
        trailing.push(Node::Leaf);
        let mut truncated = nodes.clone();
        truncated.pop();
        // A list that claims more children than there are nodes left: refused before its list is
        // allocated (a capacity of u64::MAX would abort).
        let huge = [Node::List(u64::MAX), Node::Leaf];
        let huge_dict = [Node::Dict(vec!["a".into(), "b".into()]), Node::Leaf];
        for (what, n, e) in [
            ("more entries", &nodes[..], more),
            ("trailing node", &trailing[..], owned()),
            ("truncated", &truncated[..], owned()),
            ("huge list", &huge[..], vec![Entry::Value(Value::None)]),
            (
                "dict longer than the rest",
                &huge_dict[..],
                vec![Entry::Value(Value::None)],
            ),
            ("no nodes", &[][..], vec![]),
        ] {
            assert_eq!(refused(n, e).as_deref(), Some("malformed tree"), "{what}");
        }
    }

    /// The receive's path: entries made as the walk reaches them; a failing one fails the tree.
    #[test]
    fn unflatten_from_stops_at_the_first_failing_entry() {
        let (nodes, _) = nested().flatten();
        let mut made = 0;
        let entries = (0..5).map(|i| {
            made += 1;
            match i {
                2 => Err(Error::state_dict("l.1.x", "bad leaf")),
                i => Ok(Entry::Value(Value::Int(i))),
            }
        });
        let e = StateDict::unflatten_from(nodes.into_iter(), entries, None).unwrap_err();
        assert!(e.to_string().contains("bad leaf"), "{e}");
        assert_eq!(made, 3);
    }

    #[test]
    fn flat_keys_nested_paths_and_lookups() {
        let mut sd = StateDict::new();
        sd.insert("net1.weight", Value::Int(1)).unwrap();
        sd.insert_path(&["net1", "weight"], Value::Int(2)).unwrap();
        // Two different leaves: the flat key and the nested path.
        assert_eq!(sd.get("net1.weight"), Some(&Entry::Value(Value::Int(1))));
        assert_eq!(
            sd.get(&["net1", "weight"]),
            Some(&Entry::Value(Value::Int(2)))
        );
        let Tree::Dict(items) = &sd.root else {
            panic!()
        };
        assert_eq!(items.len(), 2);
        // A KeyPath with indices; inserting into a list needs the index to exist.
        sd.insert("layers", Tree::List(vec![Value::None.into()]))
            .unwrap();
        let at = KeyPath(vec![PathElem::Key("layers".into()), PathElem::Index(0)]);
        sd.insert_path(&at, Value::Int(7)).unwrap();
        assert_eq!(sd.get(&at), Some(&Entry::Value(Value::Int(7))));
        let past = KeyPath(vec![PathElem::Key("layers".into()), PathElem::Index(1)]);
        let err = sd.insert_path(&past, Value::None).unwrap_err().to_string();
        assert!(
            err.contains("['layers'] has 1 elements, no index 1"),
            "{err}"
        );
        let err = sd
            .insert_path(&["layers", "x"], Value::None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("['layers'] is a list (it takes indices, not keys)"),
            "{err}"
        );
        if let Some(Entry::Value(v)) = sd.get_mut("net1.weight") {
            *v = Value::Int(5);
        }
        assert_eq!(
            sd.get(&Key::Str("net1.weight".into())),
            Some(&Entry::Value(Value::Int(5)))
        );
        assert!(sd.tensor("net1.weight").is_none(), "a value, not a tensor");
        // A later pair with an equal key replaces the earlier one in its place.
        let d: StateDict = [
            ("a", Value::Int(1)),
            ("b", Value::Int(2)),
            ("a", Value::Int(3)),
        ]
        .into_iter()
        .collect();
        let Tree::Dict(items) = &d.root else { panic!() };
        assert_eq!(items.len(), 2);
        assert_eq!(d.get("a"), Some(&Entry::Value(Value::Int(3))));
    }

    #[test]
    fn typed_constructors_for_every_dtype() {
        let c64 = Tensor::from_values(&[2], &[[1.0f32, -1.0], [0.5, 2.0]]).unwrap();
        assert_eq!(c64.dtype(), DType::Complex64);
        assert_eq!(c64.to_vec::<[f32; 2]>().unwrap(), [[1.0, -1.0], [0.5, 2.0]]);
        let c128 = Tensor::from_values(&[1], &[[1.0f64, 2.0]]).unwrap();
        assert_eq!((c128.dtype(), c128.layout.nbytes), (DType::Complex128, 16));
        let c32: Complex32 = [half::f16::ONE, half::f16::NEG_ONE];
        assert_eq!(
            Tensor::from_values(&[1], &[c32]).unwrap().dtype(),
            DType::Complex32
        );
        let f8 = Tensor::from_values(&[2], &[Float8E4M3Fn(0x38), Float8E4M3Fn(0x7f)]).unwrap();
        assert_eq!(f8.dtype(), DType::Float8E4M3Fn);
        assert_eq!(f8.storage.bytes(), [0x38, 0x7f]);
        assert_eq!(f8.to_vec::<Float8E4M3Fn>().unwrap()[1], Float8E4M3Fn(0x7f));
        assert!(f8.to_vec::<Float8E5M2>().is_err(), "another float8 dtype");
        for (t, d) in [
            (
                Tensor::from_values(&[1], &[Float8E5M2(1)]).unwrap(),
                DType::Float8E5M2,
            ),
            (
                Tensor::from_values(&[1], &[Float8E4M3Fnuz(1)]).unwrap(),
                DType::Float8E4M3Fnuz,
            ),
            (
                Tensor::from_values(&[1], &[Float8E5M2Fnuz(1)]).unwrap(),
                DType::Float8E5M2Fnuz,
            ),
        ] {
            assert_eq!(t.dtype(), d);
        }
        let b = Tensor::from_bools(&[3], &[true, false, true]).unwrap();
        assert_eq!(
            (b.dtype(), b.storage.bytes()),
            (DType::Bool, &[1u8, 0, 1][..])
        );
        assert_eq!(b.to_bools().unwrap(), [true, false, true]);
        let bad = Tensor::from_bytes(DType::Bool, &[1], &[2]).unwrap();
        assert!(bad
            .to_bools()
            .unwrap_err()
            .to_string()
            .contains("bool byte 0x02"));
        assert!(c64.to_bools().is_err());
        // Values that do not fill the shape are an error, not a panic.
        assert!(Tensor::from_bools(&[4], &[true]).is_err());
    }

    fn mesh(shape: &[u64]) -> DeviceMesh {
        init_device_mesh("cpu", shape).unwrap()
    }

    #[test]
    fn dtensor_from_local_derives_global_shape_and_stride_as_torch() {
        let local = || Tensor::from_values(&[2, 3], &[0.0f32; 6]).unwrap();
        // Replicate: the global tensor is the local one.
        let Entry::DTensor { spec, .. } =
            Entry::dtensor_from_local(local(), mesh(&[4]), vec![Placement::Replicate]).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (spec.global_shape, spec.global_stride),
            (vec![2, 3], vec![3, 1])
        );
        assert_eq!(spec.dtype, DType::Float32);
        // Shard(0) over 4 ranks: [8, 3], stride [3, 1]; Shard(1): [2, 12], stride [12, 1].
        let g = |placements: Vec<Placement>, mesh_shape: &[u64]| match Entry::dtensor_from_local(
            local(),
            mesh(mesh_shape),
            placements,
        )
        .unwrap()
        {
            Entry::DTensor { spec, .. } => (spec.global_shape, spec.global_stride),
            _ => panic!(),
        };
        assert_eq!(g(vec![Placement::Shard(0)], &[4]), (vec![8, 3], vec![3, 1]));
        assert_eq!(
            g(vec![Placement::Shard(1)], &[4]),
            (vec![2, 12], vec![12, 1])
        );
        assert_eq!(
            g(vec![Placement::Shard(0), Placement::Shard(1)], &[2, 3]),
            (vec![4, 9], vec![9, 1])
        );
        // What torch refuses.
        let err = |placements, m: &[u64]| {
            protocol(Entry::dtensor_from_local(local(), mesh(m), placements).unwrap_err())
        };
        assert_eq!(
            err(vec![], &[4]),
            pgt_core::Error::PlacementCount {
                placements: 0,
                mesh_ndim: 1
            }
        );
        assert_eq!(
            err(vec![Placement::Shard(2)], &[4]),
            pgt_core::Error::ShardDimOutOfRange { dim: 2, ndim: 2 }
        );
        let mut dup = mesh(&[2]);
        dup.ranks = vec![1, 1];
        assert_eq!(
            protocol(
                Entry::dtensor_from_local(local(), dup, vec![Placement::Replicate]).unwrap_err()
            ),
            pgt_core::Error::DuplicateMeshRank { rank: 1 }
        );
    }

    #[test]
    fn sharded_from_local_shards_derives_and_checks_the_global_metadata() {
        let shard = |r: u64, rows: u64| ShardMetadata {
            offsets: vec![r * 2, 0],
            sizes: vec![rows, 3],
            placement: format!("rank:{r}/cpu"),
        };
        let t =
            |rows: u64| Tensor::from_values(&[rows, 3], &vec![1.0f32; rows as usize * 3]).unwrap();
        // One process, every shard.
        let Entry::Sharded { global, .. } = Entry::sharded_from_local_shards(
            vec![(t(2), shard(0, 2)), (t(2), shard(1, 2))],
            &[4, 3],
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!((global.dtype, global.shards.len()), (DType::Float32, 2));
        // One shard of four ranks', with the others' metadata.
        let all: Vec<ShardMetadata> = (0..4).map(|r| shard(r, 2)).collect();
        assert!(Entry::sharded_from_local_shards_and_global(
            vec![(t(2), shard(1, 2))],
            all.clone(),
            &[8, 3]
        )
        .is_ok());
        let err = |locals: Vec<(Tensor<'static>, ShardMetadata)>, size: &[u64]| {
            Entry::sharded_from_local_shards_and_global(locals, all.clone(), size).unwrap_err()
        };
        // A local tensor not of its metadata's size, shards not covering the global size, a shard
        // outside it, another dtype, no local shard, a non-contiguous shard.
        assert_eq!(
            protocol(err(vec![(t(1), shard(1, 2))], &[8, 3])),
            pgt_core::Error::LocalShapeMismatch
        );
        assert!(matches!(
            protocol(err(vec![(t(2), shard(1, 2))], &[10, 3])),
            pgt_core::Error::ShardsDoNotCover { .. }
        ));
        assert!(matches!(
            protocol(err(vec![(t(2), shard(1, 2))], &[6, 3])),
            pgt_core::Error::ShardOutOfBounds { .. }
        ));
        let ints = Tensor::from_values(&[2, 3], &[0i32; 6]).unwrap();
        assert!(matches!(
            protocol(
                Entry::sharded_from_local_shards(
                    vec![(t(2), shard(0, 2)), (ints, shard(1, 2))],
                    &[4, 3]
                )
                .unwrap_err()
            ),
            pgt_core::Error::DTypeMismatch { .. }
        ));
        assert!(err(vec![], &[8, 3])
            .to_string()
            .contains("needs a local shard"));
        let mut strided = t(2);
        strided.layout.stride = vec![1, 2];
        assert!(err(vec![(strided, shard(1, 2))], &[8, 3])
            .to_string()
            .contains("not contiguous"));
    }
}
