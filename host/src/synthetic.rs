//! Deterministic generated state dicts for the demo, the benchmarks and tests, and their verification.
//!
//! Feature `testing` (the `cli` feature turns it on): fixtures, **not part of the stable API** — they
//! change with the benchmarks and tests that use them.
//!
//! Every storage is filled with a pattern seeded by its key path and shard index, so a receiver in
//! another process checks every byte without a copy of the original: it regenerates the pattern
//! word by word as it compares.

use pgt_core::dtensor::{DTensorSpec, DeviceMesh, Placement, ReduceOp};
use pgt_core::dtype::DType;
use pgt_core::layout::TensorLayout;
use pgt_core::schema::Metadata;
use pgt_core::schema::PlanParams;
use pgt_core::sharded::{LocalShard, ShardMetadata, ShardedTensorMetadata};
use pgt_core::tree::{Key, KeyPath, Leaf, Node, Value};

use crate::memory::Buffer;
use crate::state_dict::{Entry, StateDict, Storage};
use crate::{Error, Result};

/// A state dict described by its structure and leaves, before any bytes exist.
#[derive(Clone, Debug, PartialEq)]
pub struct Shape {
    /// Pre-order tree nodes.
    pub nodes: Vec<Node>,
    /// Leaves in depth-first order.
    pub leaves: Vec<Leaf>,
    /// Training step.
    pub step: Option<u64>,
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The pattern seed of a storage: its leaf's key path and its shard index.
pub fn seed(path: &KeyPath, shard: usize) -> u64 {
    pgt_core::digest::digest(crate::safetensors_io::dotted_name(path).as_bytes())
        ^ (shard as u64).wrapping_mul(0x1000_0001)
}

/// Word `i` of the pattern (little-endian bytes).
#[inline]
fn word(seed: u64, i: u64) -> u64 {
    splitmix(seed ^ i.wrapping_mul(0xD6E8_FEB8_6659_FD93))
}

/// Fills `out` with the pattern of `seed`.
pub fn fill(seed: u64, out: &mut [u8]) {
    let mut chunks = out.chunks_exact_mut(8);
    let mut i = 0;
    for c in &mut chunks {
        c.copy_from_slice(&word(seed, i).to_le_bytes());
        i += 1;
    }
    let tail = chunks.into_remainder();
    let w = word(seed, i).to_le_bytes();
    tail.copy_from_slice(&w[..tail.len()]);
}

/// True when `bytes` are exactly the pattern of `seed`.
pub fn check(seed: u64, bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(8);
    let mut i = 0;
    for c in &mut chunks {
        if c != word(seed, i).to_le_bytes() {
            return false;
        }
        i += 1;
    }
    let tail = chunks.remainder();
    tail == &word(seed, i).to_le_bytes()[..tail.len()]
}

fn key(s: &str) -> Key {
    Key::Str(s.into())
}

/// Fills the shape's storages with their patterns (fresh, aligned buffers).
pub fn materialize(shape: &Shape) -> Result<StateDict<'static>> {
    build(shape, |path, shard, buf| fill(seed(path, shard), buf))
}

/// The shape with every storage allocated and touched but not holding the pattern (0x5A bytes): a
/// receiver's pre-allocated in-place destination.
pub fn materialize_blank(shape: &Shape) -> Result<StateDict<'static>> {
    build(shape, |_, _, buf| buf.fill(0x5A))
}

/// The shape's state dict, each storage a fresh buffer written by `write(path, shard, bytes)`.
fn build(
    shape: &Shape,
    mut write: impl FnMut(&KeyPath, usize, &mut [u8]),
) -> Result<StateDict<'static>> {
    let paths = pgt_core::tree::key_paths(&shape.nodes, u32::MAX)?;
    let mut entries = Vec::with_capacity(shape.leaves.len());
    for (path, leaf) in paths.iter().zip(&shape.leaves) {
        let mut storages = leaf
            .storages()
            .enumerate()
            .map(|(shard, layout)| {
                let mut buf = Buffer::zeroed(layout.nbytes as usize);
                write(path, shard, &mut buf);
                Storage::Owned(buf)
            })
            .collect::<Vec<_>>()
            .into_iter();
        entries.push(Entry::from_leaf(leaf.clone(), &mut storages)?);
    }
    StateDict::unflatten(&shape.nodes, entries, shape.step)
}

/// Checks a received state dict against the shape it was generated from: same structure, same leaves
/// (ShardedTensor placements may name the receiver), every storage byte. Returns the bytes checked.
pub fn verify(received: &StateDict<'_>, shape: &Shape) -> Result<u64> {
    let (nodes, entries) = received.flatten();
    let differs = |what: &str| Err(Error::state_dict("", format!("{what} differs")));
    if nodes != shape.nodes {
        return differs("tree structure");
    }
    if received.step != shape.step {
        return differs("step");
    }
    if entries.len() != shape.leaves.len() {
        return differs("leaf count");
    }
    let paths = pgt_core::tree::key_paths(&nodes, u32::MAX)?;
    let mut checked = 0;
    for ((path, entry), expected) in paths.iter().zip(&entries).zip(&shape.leaves) {
        let got = entry.to_leaf();
        let same = match (&got, expected) {
            (
                Leaf::Sharded {
                    local_shards: a,
                    global: ga,
                },
                Leaf::Sharded {
                    local_shards: b,
                    global: gb,
                },
            ) => {
                a.len() == b.len()
                    && a.iter()
                        .zip(b)
                        .all(|(x, y)| x.layout == y.layout && x.meta.offsets == y.meta.offsets)
                    && ga.global_size == gb.global_size
                    && ga.shards.len() == gb.shards.len()
            }
            (Leaf::Value(Value::Float(a)), Leaf::Value(Value::Float(b))) => {
                a.to_bits() == b.to_bits()
            }
            _ => got == *expected,
        };
        if !same {
            let reason = format!("leaf differs: got {got:?}");
            return Err(Error::state_dict(path.to_string(), reason));
        }
        for (shard, t) in entry.tensors().iter().enumerate() {
            let bytes = t.storage.bytes();
            if !check(seed(path, shard), bytes) {
                let reason = format!("storage {shard} bytes differ");
                return Err(Error::state_dict(path.to_string(), reason));
            }
            checked += bytes.len() as u64;
        }
    }
    Ok(checked)
}

/// `count` float32 tensors totalling about `total_bytes` (the `large` benchmark).
pub fn large(total_bytes: u64, count: usize) -> Shape {
    let per = (total_bytes / count as u64 / 4).max(1);
    let keys: Vec<Key> = (0..count).map(|i| key(&format!("w{i:02}"))).collect();
    let mut nodes = vec![Node::Dict(keys)];
    let mut leaves = Vec::new();
    for _ in 0..count {
        nodes.push(Node::Leaf);
        leaves.push(Leaf::Tensor(TensorLayout::contiguous(
            DType::Float32,
            &[per],
        )));
    }
    Shape {
        nodes,
        leaves,
        step: Some(1),
    }
}

/// The 10,220-leaf reference dict of pgt-core (the `small` benchmark).
pub fn reference() -> Shape {
    let m: Metadata = pgt_core::reference::reference_metadata(0, vec![1], PlanParams::default());
    Shape {
        nodes: m.tree,
        leaves: m.leaves,
        step: m.step,
    }
}

/// A state dict of about `total_bytes` mixing every leaf kind: plain tensors of several dtypes (the bulk),
/// a transposed (strided) view, an offset view, a 0-dim scalar, a zero-size tensor, DTensors, a
/// ShardedTensor with two local shards, and plain values.
pub fn mixed(total_bytes: u64) -> Shape {
    let bulk = total_bytes.saturating_sub(64 << 10).max(4096);
    // The bulk: 24 tensors cycling through dtypes, sizes varying ±50%.
    let dtypes = [
        DType::Float32,
        DType::BFloat16,
        DType::Float16,
        DType::Int64,
        DType::UInt8,
        DType::Float64,
    ];
    let n = 24u64;
    let mut layer_keys = Vec::new();
    let mut layer_leaves = Vec::new();
    let mut allotted = 0u64;
    for i in 0..n {
        let dtype = dtypes[i as usize % dtypes.len()];
        let share = if i + 1 == n {
            bulk - allotted
        } else {
            bulk / n / 2 + (splitmix(i) % (bulk / n).max(1))
        }
        .min(bulk - allotted);
        allotted += share;
        let numel = (share / dtype.element_size()).max(1);
        let shape = if numel % 256 == 0 {
            vec![numel / 256, 256]
        } else {
            vec![numel]
        };
        layer_keys.push(key(&format!("t{i:02}_{dtype}")));
        layer_leaves.push(Leaf::Tensor(TensorLayout::contiguous(dtype, &shape)));
    }
    let shard = |off: u64, rank: u64| ShardMetadata {
        offsets: vec![off, 0],
        sizes: vec![16, 64],
        placement: format!("rank:{rank}/cpu"),
    };
    let mesh = DeviceMesh {
        shape: vec![2, 2],
        ranks: vec![0, 1, 2, 3],
        dim_names: Some(vec!["dp".into(), "tp".into()]),
        device_type: "cpu".into(),
    };
    let views = vec![
        (
            "transposed",
            Leaf::Tensor(TensorLayout {
                dtype: DType::Float32,
                shape: vec![64, 32],
                stride: vec![1, 64],
                storage_offset: 0,
                nbytes: 64 * 32 * 4,
            }),
        ),
        (
            "offset",
            Leaf::Tensor(TensorLayout {
                dtype: DType::Int32,
                shape: vec![100],
                stride: vec![3],
                storage_offset: 17,
                nbytes: 4 * 400,
            }),
        ),
        (
            "scalar",
            Leaf::Tensor(TensorLayout::contiguous(DType::Float64, &[])),
        ),
        (
            "empty",
            Leaf::Tensor(TensorLayout::contiguous(DType::BFloat16, &[0, 8])),
        ),
        (
            "dtensor_row",
            Leaf::DTensor {
                local: TensorLayout::contiguous(DType::BFloat16, &[32, 64]),
                spec: DTensorSpec {
                    mesh: mesh.clone(),
                    placements: vec![Placement::Shard(0), Placement::Replicate],
                    global_shape: vec![64, 64],
                    global_stride: vec![64, 1],
                    dtype: DType::BFloat16,
                },
            },
        ),
        (
            "dtensor_partial",
            Leaf::DTensor {
                local: TensorLayout::contiguous(DType::Float32, &[64]),
                spec: DTensorSpec {
                    mesh,
                    placements: vec![Placement::Replicate, Placement::Partial(ReduceOp::Sum)],
                    global_shape: vec![64],
                    global_stride: vec![1],
                    dtype: DType::Float32,
                },
            },
        ),
        (
            "sharded",
            Leaf::Sharded {
                local_shards: vec![
                    LocalShard {
                        layout: TensorLayout::contiguous(DType::Float32, &[16, 64]),
                        meta: shard(0, 0),
                    },
                    LocalShard {
                        layout: TensorLayout::contiguous(DType::Float32, &[16, 64]),
                        meta: shard(32, 0),
                    },
                ],
                global: ShardedTensorMetadata {
                    shards: vec![shard(0, 0), shard(16, 1), shard(32, 0), shard(48, 1)],
                    global_size: vec![64, 64],
                    dtype: DType::Float32,
                },
            },
        ),
    ];
    let values = vec![
        ("step", Leaf::Value(Value::Int(1234))),
        ("lr", Leaf::Value(Value::Float(3e-4))),
        ("optimizer", Leaf::Value(Value::Str("adamw".into()))),
        ("frozen", Leaf::Value(Value::Bool(false))),
        ("note", Leaf::Value(Value::None)),
        ("rng", Leaf::Value(Value::Bytes(vec![1, 2, 3, 4, 250]))),
    ];
    let mut nodes = vec![Node::Dict(vec![
        key("model"),
        key("views"),
        key("meta"),
        key("history"),
    ])];
    let mut leaves = Vec::new();
    nodes.push(Node::Dict(layer_keys));
    for l in layer_leaves {
        nodes.push(Node::Leaf);
        leaves.push(l);
    }
    nodes.push(Node::Dict(views.iter().map(|(k, _)| key(k)).collect()));
    for (_, l) in views {
        nodes.push(Node::Leaf);
        leaves.push(l);
    }
    nodes.push(Node::Dict(values.iter().map(|(k, _)| key(k)).collect()));
    for (_, l) in values {
        nodes.push(Node::Leaf);
        leaves.push(l);
    }
    // history: a list of (int-keyed dict, tuple) pairs.
    nodes.push(Node::List(2));
    for i in 0..2i64 {
        nodes.push(Node::Dict(vec![Key::Int(i), Key::Int(i + 10)]));
        nodes.push(Node::Leaf);
        leaves.push(Leaf::Value(Value::Int(i.into())));
        nodes.push(Node::Tuple(2));
        nodes.push(Node::Leaf);
        leaves.push(Leaf::Value(Value::Float(i as f64 / 2.0)));
        nodes.push(Node::Leaf);
        leaves.push(Leaf::Tensor(TensorLayout::contiguous(DType::Int8, &[3])));
    }
    Shape {
        nodes,
        leaves,
        step: Some(7),
    }
}

/// Total storage bytes of a shape.
pub fn total_bytes(shape: &Shape) -> u64 {
    shape
        .leaves
        .iter()
        .flat_map(|l| l.storages())
        .map(|l| l.nbytes)
        .sum()
}

/// Number of storages of a shape.
pub fn storage_count(shape: &Shape) -> u64 {
    shape
        .leaves
        .iter()
        .map(|l| l.storages().count() as u64)
        .sum()
}

/// Checks the shape is a valid state dict (for generators' own tests).
pub fn validate(shape: &Shape) -> Result<()> {
    let metadata = Metadata {
        step: shape.step,
        source: 0,
        destinations: vec![1],
        plan: PlanParams::default(),
        tree: shape.nodes.clone(),
        leaves: shape.leaves.clone(),
    };
    pgt_core::manifest::Manifest::new(metadata, true, &Default::default())?;
    Ok(())
}
