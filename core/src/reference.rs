//! The reference state dict that benchmarks on every host share: 10 × 10 × 100 nested dicts of 10,000
//! tensors of 1–64 KiB (float32, bfloat16, int64), plus 220 non-tensor leaves — 10,220 leaves.
//!
//! Deterministic: the same call gives the same metadata everywhere, so native and wasm figures compare.

use alloc::format;
use alloc::vec::Vec;

use crate::dtype::DType;
use crate::layout::TensorLayout;
use crate::schema::Metadata;
use crate::schema::PlanParams;
use crate::tree::{Key, Leaf, Node, Value};

/// Tensors in the reference dict.
pub const TENSORS: usize = 10_000;
/// Non-tensor leaves in the reference dict.
pub const VALUES: usize = 220;

/// The reference dict's metadata, from `source` to `destinations`.
pub fn reference_metadata(source: u32, destinations: Vec<u32>, plan: PlanParams) -> Metadata {
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        // xorshift64*: a fixed, portable sequence.
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut tree = Vec::new();
    let mut leaves = Vec::with_capacity(TENSORS + VALUES);
    let key = |s: alloc::string::String| Key::Str(s);
    tree.push(Node::Dict(alloc::vec![
        key("model".into()),
        key("meta".into())
    ]));
    tree.push(Node::Dict(
        (0..10).map(|i| key(format!("layer{i}"))).collect(),
    ));
    for _ in 0..10 {
        tree.push(Node::Dict(
            (0..10).map(|j| key(format!("block{j}"))).collect(),
        ));
        for _ in 0..10 {
            tree.push(Node::Dict((0..100).map(|k| key(format!("p{k}"))).collect()));
            for _ in 0..100 {
                tree.push(Node::Leaf);
                let dtype = [DType::Float32, DType::BFloat16, DType::Int64][(next() % 3) as usize];
                let bytes = 1024 + next() % (63 * 1024 + 1);
                let numel = (bytes / dtype.element_size()).max(1);
                // Half the tensors are 2-D with a row width of 64 elements where it divides.
                let shape = if numel % 64 == 0 && next() % 2 == 0 {
                    alloc::vec![numel / 64, 64]
                } else {
                    alloc::vec![numel]
                };
                leaves.push(Leaf::Tensor(TensorLayout::contiguous(dtype, &shape)));
            }
        }
    }
    tree.push(Node::Dict(
        (0..VALUES).map(|v| key(format!("v{v}"))).collect(),
    ));
    for v in 0..VALUES {
        tree.push(Node::Leaf);
        leaves.push(Leaf::Value(match v % 3 {
            0 => Value::Int(i128::from(next() as i64 >> 20)),
            1 => Value::Float((next() % 1_000_000) as f64 / 7.0),
            _ => Value::Str(format!("setting-{}", next() % 10_000)),
        }));
    }
    Metadata {
        step: Some(1000),
        source,
        destinations,
        plan,
        tree,
        leaves,
    }
}
