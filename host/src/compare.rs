//! Equality of state dicts, and the first difference between two.
//!
//! `==` on [`StateDict`], [`Tree`], [`Entry`] and [`Tensor`] compares what a user means: the same tree
//! (keys, their order, container kinds), the same values (floats by their bits, so a NaN equals the
//! same NaN and `0.0 != -0.0`), tensors equal as views (dtype, shape and the viewed elements compared
//! bytewise through the strides, whatever the strides, offset or storage size), equal DTensor and
//! ShardedTensor specs, and the same step. [`StateDict::bitwise_eq`] also wants identical layouts
//! and storage bytes. [`StateDict::difference`] (and [`assert_state_dict_eq!`](crate::assert_state_dict_eq))
//! says where two dicts first differ: the key path and, for tensors, the element and both values.

use std::fmt;

use pgt_core::dtype::DType;
use pgt_core::layout::TensorLayout;
use pgt_core::tree::{Key, KeyPath, PathElem, Value};

use crate::state_dict::{Entry, StateDict, Tensor, Tree};

/// How strictly tensors are compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strictness {
    /// As views: dtype, shape and the viewed elements (what `==` does).
    Views,
    /// Identical layouts (shape, stride, offset, storage size) and storage bytes.
    Bitwise,
}

/// Where two state dicts first differ (depth-first), and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Difference {
    /// The key path of the differing node or leaf (empty: the root, or the step).
    pub path: KeyPath,
    /// What differs, left value first.
    pub what: String,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.what)
    }
}

impl std::error::Error for Difference {}

impl StateDict<'_> {
    /// The first difference from `other` as `==` sees it, `None` when equal.
    pub fn difference(&self, other: &StateDict<'_>) -> Option<Difference> {
        self.difference_with(other, Strictness::Views)
    }

    /// The first difference from `other` at the given strictness, `None` when equal.
    pub fn difference_with(
        &self,
        other: &StateDict<'_>,
        strictness: Strictness,
    ) -> Option<Difference> {
        if self.step != other.step {
            return Some(Difference {
                path: KeyPath::default(),
                what: format!("step {:?} vs {:?}", self.step, other.step),
            });
        }
        tree_difference(&self.root, &other.root, strictness)
    }

    /// Equal with identical layouts and storage bytes ([`Strictness::Bitwise`]): what was received
    /// is the very same storage, not just the same values.
    pub fn bitwise_eq(&self, other: &StateDict<'_>) -> bool {
        self.difference_with(other, Strictness::Bitwise).is_none()
    }
}

/// Asserts that two state dicts are equal (`==`); on failure, panics naming the first differing key
/// path and, for a tensor, the first differing element with both values.
///
/// ```
/// use pgt_host::prelude::*;
/// let a: StateDict = [("net1.weight", Tensor::from_values(&[2], &[1.0f32, 2.0]).unwrap())]
///     .into_iter()
///     .collect();
/// let b = a.clone();
/// pgt_host::assert_state_dict_eq!(a, b);
/// ```
#[macro_export]
macro_rules! assert_state_dict_eq {
    ($left:expr, $right:expr $(,)?) => {
        if let Some(d) = $crate::state_dict::StateDict::difference(&$left, &$right) {
            panic!("state dicts differ at {d}");
        }
    };
    ($left:expr, $right:expr, $($arg:tt)+) => {
        if let Some(d) = $crate::state_dict::StateDict::difference(&$left, &$right) {
            panic!("state dicts differ at {d}: {}", format_args!($($arg)+));
        }
    };
}

impl PartialEq<StateDict<'_>> for StateDict<'_> {
    fn eq(&self, other: &StateDict<'_>) -> bool {
        self.difference(other).is_none()
    }
}

impl PartialEq<Tree<'_>> for Tree<'_> {
    fn eq(&self, other: &Tree<'_>) -> bool {
        tree_difference(self, other, Strictness::Views).is_none()
    }
}

impl PartialEq<Entry<'_>> for Entry<'_> {
    fn eq(&self, other: &Entry<'_>) -> bool {
        entry_difference(self, other, Strictness::Views).is_none()
    }
}

impl PartialEq<Tensor<'_>> for Tensor<'_> {
    fn eq(&self, other: &Tensor<'_>) -> bool {
        tensor_difference(self, other, Strictness::Views).is_none()
    }
}

impl Tensor<'_> {
    /// How this tensor differs from `other` at the given strictness (without the key path).
    pub fn difference_with(&self, other: &Tensor<'_>, strictness: Strictness) -> Option<String> {
        tensor_difference(self, other, strictness)
    }
}

fn kind(t: &Tree<'_>) -> &'static str {
    match t {
        Tree::Dict(_) => "a dict",
        Tree::List(_) => "a list",
        Tree::Tuple(_) => "a tuple",
        Tree::Leaf(e) => entry_kind(e),
    }
}

fn entry_kind(e: &Entry<'_>) -> &'static str {
    match e {
        Entry::Value(_) => "a value",
        Entry::Tensor(_) => "a tensor",
        Entry::DTensor { .. } => "a DTensor",
        Entry::Sharded { .. } => "a ShardedTensor",
    }
}

fn key_repr(k: &Key) -> String {
    KeyPath(vec![PathElem::Key(k.clone())]).to_string()
}

/// The first difference of two dicts' keys (names, then order).
fn keys_difference(left: &[Key], right: &[Key]) -> Option<String> {
    if left == right {
        return None;
    }
    if let Some(k) = left.iter().find(|k| !right.contains(k)) {
        return Some(format!("key {} only on the left", key_repr(k)));
    }
    if let Some(k) = right.iter().find(|k| !left.contains(k)) {
        return Some(format!("key {} only on the right", key_repr(k)));
    }
    let i = left.iter().zip(right).position(|(a, b)| a != b)?;
    Some(format!(
        "keys in another order: {} vs {} at position {i}",
        key_repr(&left[i]),
        key_repr(&right[i])
    ))
}

/// Depth-first, iterative: arbitrarily deep user trees cannot overflow the stack.
fn tree_difference(a: &Tree<'_>, b: &Tree<'_>, strictness: Strictness) -> Option<Difference> {
    let mut path: Vec<PathElem> = Vec::new();
    // (length of the parent's path, this node's path element, left, right)
    let mut stack = vec![(0usize, None, a, b)];
    while let Some((depth, elem, x, y)) = stack.pop() {
        path.truncate(depth);
        path.extend(elem);
        let differ = |what: String| {
            Some(Difference {
                path: KeyPath(path.clone()),
                what,
            })
        };
        let here = path.len();
        match (x, y) {
            (Tree::Dict(xs), Tree::Dict(ys)) => {
                let (xk, yk): (Vec<Key>, Vec<Key>) = (
                    xs.iter().map(|(k, _)| k.clone()).collect(),
                    ys.iter().map(|(k, _)| k.clone()).collect(),
                );
                if let Some(what) = keys_difference(&xk, &yk) {
                    return differ(what);
                }
                for ((k, cx), (_, cy)) in xs.iter().zip(ys).rev() {
                    stack.push((here, Some(PathElem::Key(k.clone())), cx, cy));
                }
            }
            (Tree::List(xs), Tree::List(ys)) | (Tree::Tuple(xs), Tree::Tuple(ys)) => {
                if xs.len() != ys.len() {
                    return differ(format!(
                        "{} of {} elements vs {}",
                        kind(x),
                        xs.len(),
                        ys.len()
                    ));
                }
                for (i, (cx, cy)) in xs.iter().zip(ys).enumerate().rev() {
                    stack.push((here, Some(PathElem::Index(i as u64)), cx, cy));
                }
            }
            (Tree::Leaf(e), Tree::Leaf(f)) => {
                if let Some(what) = entry_difference(e, f, strictness) {
                    return differ(what);
                }
            }
            _ => return differ(format!("{} vs {}", kind(x), kind(y))),
        }
    }
    None
}

/// Values compared with floats by their bits.
fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Float(x), Value::Float(y)) => x.to_bits() == y.to_bits(),
        _ => a == b,
    }
}

fn entry_difference(a: &Entry<'_>, b: &Entry<'_>, strictness: Strictness) -> Option<String> {
    match (a, b) {
        (Entry::Value(x), Entry::Value(y)) => {
            (!same_value(x, y)).then(|| format!("value {x:?} vs {y:?}"))
        }
        (Entry::Tensor(x), Entry::Tensor(y)) => tensor_difference(x, y, strictness),
        (Entry::DTensor { local: x, spec: s }, Entry::DTensor { local: y, spec: t }) => {
            if s != t {
                return Some(format!("DTensor spec {s:?} vs {t:?}"));
            }
            tensor_difference(x, y, strictness).map(|d| format!("local tensor: {d}"))
        }
        (
            Entry::Sharded {
                local_shards: xs,
                global: g,
            },
            Entry::Sharded {
                local_shards: ys,
                global: h,
            },
        ) => {
            if xs.len() != ys.len() {
                return Some(format!("{} local shards vs {}", xs.len(), ys.len()));
            }
            for (i, ((x, m), (y, n))) in xs.iter().zip(ys).enumerate() {
                if m != n {
                    return Some(format!("local shard {i}: metadata {m:?} vs {n:?}"));
                }
                if let Some(d) = tensor_difference(x, y, strictness) {
                    return Some(format!("local shard {i}: {d}"));
                }
            }
            (g != h).then(|| format!("global metadata {g:?} vs {h:?}"))
        }
        _ => Some(format!("{} vs {}", entry_kind(a), entry_kind(b))),
    }
}

fn tensor_difference(a: &Tensor<'_>, b: &Tensor<'_>, strictness: Strictness) -> Option<String> {
    let (la, lb) = (&a.layout, &b.layout);
    if la.dtype != lb.dtype {
        return Some(format!("dtype {} vs {}", la.dtype, lb.dtype));
    }
    if la.shape != lb.shape {
        return Some(format!("shape {:?} vs {:?}", la.shape, lb.shape));
    }
    if strictness == Strictness::Bitwise {
        if la != lb {
            return Some(format!(
                "layout (stride {:?}, offset {}, {} bytes) vs (stride {:?}, offset {}, {} bytes)",
                la.stride, la.storage_offset, la.nbytes, lb.stride, lb.storage_offset, lb.nbytes
            ));
        }
        let (x, y) = (a.storage.bytes(), b.storage.bytes());
        if x.len() != y.len() {
            return Some(format!("storage of {} bytes vs {}", x.len(), y.len()));
        }
        let i = x.iter().zip(y).position(|(p, q)| p != q)?;
        return Some(format!("storage byte {i}: {:#04x} vs {:#04x}", x[i], y[i]));
    }
    let (Some(ea), Some(eb)) = (
        ElementOffsets::new(la, a.storage.bytes().len()),
        ElementOffsets::new(lb, b.storage.bytes().len()),
    ) else {
        return Some("a layout that does not fit its storage".into());
    };
    let es = la.dtype.element_size() as usize;
    let (sa, sb) = (a.storage.bytes(), b.storage.bytes());
    for (i, (oa, ob)) in ea.zip(eb).enumerate() {
        let (x, y) = (&sa[oa..oa + es], &sb[ob..ob + es]);
        if x != y {
            let index = unravel(i as u64, &la.shape);
            let (l, r) = (element_repr(la.dtype, x), element_repr(la.dtype, y));
            let (l, r) = if l == r {
                (format!("{l} ({})", hex(x)), format!("{r} ({})", hex(y)))
            } else {
                (l, r)
            };
            return Some(format!("element {index:?}: {l} vs {r}"));
        }
    }
    None
}

/// A flat row-major element number as a multi-dimensional index.
fn unravel(mut i: u64, shape: &[u64]) -> Vec<u64> {
    let mut index = vec![0; shape.len()];
    for (d, &n) in shape.iter().enumerate().rev() {
        if n > 0 {
            index[d] = i % n;
            i /= n;
        }
    }
    index
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::from("0x");
    // Little-endian: the most significant byte first.
    for b in bytes.iter().rev() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// One element, little-endian, as a readable value.
pub(crate) fn element_repr(dtype: DType, b: &[u8]) -> String {
    let arr = |n: usize| -> [u8; 8] {
        let mut a = [0u8; 8];
        a[..n].copy_from_slice(&b[..n]);
        a
    };
    match dtype {
        DType::Float64 => format!("{:?}", f64::from_le_bytes(arr(8))),
        DType::Float32 => format!("{:?}", f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        DType::Float16 => format!("{:?}", half::f16::from_le_bytes([b[0], b[1]])),
        DType::BFloat16 => format!("{:?}", half::bf16::from_le_bytes([b[0], b[1]])),
        DType::Complex128 => format!(
            "({:?}, {:?})",
            f64::from_le_bytes(arr(8)),
            f64::from_le_bytes(b[8..16].try_into().unwrap_or_default())
        ),
        DType::Complex64 => format!(
            "({:?}, {:?})",
            f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            f32::from_le_bytes([b[4], b[5], b[6], b[7]])
        ),
        DType::Complex32 => format!(
            "({:?}, {:?})",
            half::f16::from_le_bytes([b[0], b[1]]),
            half::f16::from_le_bytes([b[2], b[3]])
        ),
        DType::Int64 => i64::from_le_bytes(arr(8)).to_string(),
        DType::Int32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]).to_string(),
        DType::Int16 => i16::from_le_bytes([b[0], b[1]]).to_string(),
        DType::Int8 => (b[0] as i8).to_string(),
        DType::UInt64 => u64::from_le_bytes(arr(8)).to_string(),
        DType::UInt32 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]).to_string(),
        DType::UInt16 => u16::from_le_bytes([b[0], b[1]]).to_string(),
        DType::UInt8 => b[0].to_string(),
        DType::Bool => match b[0] {
            0 => "false".into(),
            1 => "true".into(),
            x => format!("bool byte {x:#04x}"),
        },
        DType::Float8E4M3Fn | DType::Float8E5M2 | DType::Float8E4M3Fnuz | DType::Float8E5M2Fnuz => {
            format!("{dtype} {}", hex(b))
        }
    }
}

/// The byte offset of every element of a view, in row-major order (an odometer over the index).
struct ElementOffsets<'l> {
    layout: &'l TensorLayout,
    index: Vec<u64>,
    remaining: u64,
}

impl<'l> ElementOffsets<'l> {
    /// `None` when the layout's elements are not all inside `storage_len` bytes.
    fn new(layout: &'l TensorLayout, storage_len: usize) -> Option<Self> {
        if layout.stride.len() != layout.shape.len() {
            return None;
        }
        let range = layout.byte_range().ok()?;
        let remaining = layout.numel()?;
        if remaining > 0 && range.end > storage_len as u64 {
            return None;
        }
        Some(ElementOffsets {
            layout,
            index: vec![0; layout.shape.len()],
            remaining,
        })
    }
}

impl Iterator for ElementOffsets<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let l = self.layout;
        // Inside the storage (checked by `new`), so no overflow.
        let elem = l.storage_offset
            + self
                .index
                .iter()
                .zip(&l.stride)
                .map(|(i, s)| i * s)
                .sum::<u64>();
        for d in (0..self.index.len()).rev() {
            self.index[d] += 1;
            if self.index[d] < l.shape[d] {
                break;
            }
            self.index[d] = 0;
        }
        Some((elem * l.dtype.element_size()) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Buffer;
    use crate::state_dict::Storage;

    fn f32s(values: &[f32]) -> Tensor<'static> {
        Tensor::from_values(&[values.len() as u64], values).unwrap()
    }

    fn dict(pairs: Vec<(&str, Entry<'static>)>) -> StateDict<'static> {
        pairs.into_iter().collect()
    }

    #[test]
    fn equal_dicts_are_equal_and_the_first_difference_is_named() {
        let a = dict(vec![
            ("net1.weight", f32s(&[1.0, 2.0, 3.0]).into()),
            ("lr", Value::Float(0.5).into()),
        ]);
        let mut b = a.clone();
        assert_eq!(a, b);
        assert!(a.bitwise_eq(&b));
        b.insert("net1.weight", f32s(&[1.0, 2.5, 3.0])).unwrap();
        assert_ne!(a, b);
        let d = a.difference(&b).unwrap();
        assert_eq!(d.path, KeyPath(vec![PathElem::Key("net1.weight".into())]));
        assert_eq!(d.what, "element [1]: 2.0 vs 2.5");
        // The macro's message names the same.
        let msg = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            crate::assert_state_dict_eq!(a, b)
        }))
        .unwrap_err()
        .downcast::<String>()
        .unwrap();
        assert_eq!(*msg, format!("state dicts differ at {d}"));
    }

    #[test]
    fn floats_compare_by_bits() {
        let nan = f64::from_bits(0x7ff8_0000_0000_0001);
        let a = dict(vec![("x", Value::Float(nan).into())]);
        assert_eq!(a, a.clone(), "the same NaN is equal");
        let other_nan = dict(vec![("x", Value::Float(f64::NAN).into())]);
        assert_ne!(a, other_nan);
        let zero = dict(vec![("x", Value::Float(0.0).into())]);
        let neg_zero = dict(vec![("x", Value::Float(-0.0).into())]);
        assert_ne!(zero, neg_zero);
        // Tensor elements too, with the bits shown when the values print alike.
        let t = |v: f32| dict(vec![("t", f32s(&[v]).into())]);
        assert_eq!(t(f32::NAN), t(f32::NAN));
        let d = t(f32::NAN).difference(&t(-f32::NAN)).unwrap();
        assert_eq!(d.what, "element [0]: NaN (0x7fc00000) vs NaN (0xffc00000)");
    }

    #[test]
    fn tensors_compare_as_views_whatever_the_strides() {
        // [[0, 1, 2], [3, 4, 5]] transposed, over a larger storage with an offset...
        let storage: Vec<f32> = vec![9.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 9.0];
        let view = Tensor::new(
            TensorLayout {
                dtype: DType::Float32,
                shape: vec![3, 2],
                stride: vec![1, 3],
                storage_offset: 1,
                nbytes: 32,
            },
            Storage::Owned(Buffer::from_slice(bytemuck::cast_slice(&storage))),
        )
        .unwrap();
        // ...equals the contiguous [[0, 3], [1, 4], [2, 5]].
        let dense = Tensor::from_values(&[3, 2], &[0.0f32, 3.0, 1.0, 4.0, 2.0, 5.0]).unwrap();
        assert_eq!(view, dense);
        let (a, b) = (
            dict(vec![("t", view.into())]),
            dict(vec![("t", dense.into())]),
        );
        assert_eq!(a, b);
        assert!(!a.bitwise_eq(&b));
        assert!(a
            .difference_with(&b, Strictness::Bitwise)
            .unwrap()
            .what
            .starts_with("layout (stride [1, 3], offset 1, 32 bytes)"));
        let other = Tensor::from_values(&[3, 2], &[0.0f32, 3.0, 1.0, 4.0, 2.0, 6.0]).unwrap();
        let d = a.difference(&dict(vec![("t", other.into())])).unwrap();
        assert_eq!(d.what, "element [2, 1]: 5.0 vs 6.0");
        // dtype and shape.
        let i = dict(vec![(
            "t",
            Tensor::from_values(&[6], &[0i32; 6]).unwrap().into(),
        )]);
        assert_eq!(a.difference(&i).unwrap().what, "dtype float32 vs int32");
        let s = dict(vec![("t", f32s(&[0.0; 6]).into())]);
        assert_eq!(a.difference(&s).unwrap().what, "shape [3, 2] vs [6]");
        // Bitwise: a storage byte.
        let (p, q) = (
            dict(vec![("t", f32s(&[1.0]).into())]),
            dict(vec![("t", f32s(&[1.0]).into())]),
        );
        assert!(p.bitwise_eq(&q));
        let r = dict(vec![("t", f32s(&[2.0]).into())]);
        assert_eq!(
            p.difference_with(&r, Strictness::Bitwise).unwrap().what,
            "storage byte 2: 0x80 vs 0x00"
        );
    }

    #[test]
    fn trees_compare_keys_order_kinds_and_lengths() {
        let mut a = StateDict::new();
        a.insert_path(&["model", "w"], f32s(&[1.0])).unwrap();
        a.insert("step", Value::Int(3)).unwrap();
        let mut b = StateDict::new();
        b.insert("step", Value::Int(3)).unwrap();
        b.insert_path(&["model", "w"], f32s(&[1.0])).unwrap();
        assert_eq!(
            a.difference(&b).unwrap().what,
            "keys in another order: ['model'] vs ['step'] at position 0"
        );
        let mut c = a.clone();
        c.insert_path(&["model", "b"], f32s(&[1.0])).unwrap();
        let d = a.difference(&c).unwrap();
        assert_eq!(d.path, KeyPath(vec![PathElem::Key("model".into())]));
        assert_eq!(d.what, "key ['b'] only on the right");
        let mut e = a.clone();
        e.insert("step", Value::Int(4)).unwrap();
        assert_eq!(a.difference(&e).unwrap().what, "value Int(3) vs Int(4)");
        let mut f = a.clone();
        f.root = Tree::Dict(vec![
            ("model".into(), Tree::List(vec![])),
            ("step".into(), Tree::Leaf(Value::Int(3).into())),
        ]);
        assert_eq!(a.difference(&f).unwrap().what, "a dict vs a list");
        let g = StateDict {
            root: Tree::List(vec![Tree::Leaf(Value::None.into())]),
            step: None,
        };
        let h = StateDict {
            root: Tree::List(vec![]),
            step: None,
        };
        assert_eq!(g.difference(&h).unwrap().what, "a list of 1 elements vs 0");
        let mut stepped = a.clone();
        stepped.step = Some(1);
        assert_eq!(a.difference(&stepped).unwrap().what, "step None vs Some(1)");
        assert_eq!(a, a.clone());
    }

    #[test]
    fn dtensors_and_sharded_tensors_compare_specs_and_local_tensors() {
        use crate::state_dict::init_device_mesh;
        use pgt_core::dtensor::Placement;
        use pgt_core::sharded::ShardMetadata;
        let dt = |placement: Placement, v: f32| {
            let mesh = init_device_mesh("cpu", &[2]).unwrap();
            let e = Entry::dtensor_from_local(f32s(&[v, 1.0]), mesh, vec![placement]).unwrap();
            dict(vec![("d", e)])
        };
        assert_eq!(dt(Placement::Shard(0), 0.0), dt(Placement::Shard(0), 0.0));
        let d = dt(Placement::Shard(0), 0.0)
            .difference(&dt(Placement::Replicate, 0.0))
            .unwrap();
        assert!(d.what.starts_with("DTensor spec "), "{}", d.what);
        let d = dt(Placement::Replicate, 0.0)
            .difference(&dt(Placement::Replicate, 3.0))
            .unwrap();
        assert_eq!(d.what, "local tensor: element [0]: 0.0 vs 3.0");
        let shard = |r: u64| ShardMetadata {
            offsets: vec![r * 2],
            sizes: vec![2],
            placement: format!("rank:{r}/cpu"),
        };
        let st = |v: f32, size: u64| {
            let e = Entry::sharded_from_local_shards(
                vec![(f32s(&[0.0, 1.0]), shard(0)), (f32s(&[v, 3.0]), shard(1))],
                &[size],
            )
            .unwrap();
            dict(vec![("s", e)])
        };
        assert_eq!(st(2.0, 4), st(2.0, 4));
        assert_eq!(
            st(2.0, 4).difference(&st(9.0, 4)).unwrap().what,
            "local shard 1: element [0]: 2.0 vs 9.0"
        );
        let mut moved = st(2.0, 4);
        if let Some(Entry::Sharded { local_shards, .. }) = moved.get_mut("s") {
            local_shards[1].1.placement = "rank:0/cpu".into();
        }
        assert!(st(2.0, 4)
            .difference(&moved)
            .unwrap()
            .what
            .starts_with("local shard 1: metadata "));
        let mut global = st(2.0, 4);
        if let Some(Entry::Sharded { global, .. }) = global.get_mut("s") {
            global.shards[0].placement = "rank:1/cpu".into();
        }
        assert!(st(2.0, 4)
            .difference(&global)
            .unwrap()
            .what
            .starts_with("global metadata "));
    }
}
