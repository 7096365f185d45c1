//! An encoder of the metadata message written from `PROTOCOL.md` alone, without postcard or serde: the
//! golden-vector test checks that it reproduces pgt-core's encoding of every valid vector byte for
//! byte, which keeps the document honest. It also builds the malformed vectors, which core refuses to
//! encode.

use pgt_core::dtensor::{DTensorSpec, DeviceMesh, Placement, ReduceOp};
use pgt_core::dtype::DType;
use pgt_core::layout::TensorLayout;
use pgt_core::schema::{FanOut, Metadata, PlanParams};
use pgt_core::sharded::{LocalShard, ShardMetadata, ShardedTensorMetadata};
use pgt_core::tree::{Key, Leaf, Node, Value};

/// A byte writer with the primitive encodings of PROTOCOL.md §Encoding.
#[derive(Clone, Debug, Default)]
pub struct W {
    /// The bytes written so far.
    pub buf: Vec<u8>,
}

impl W {
    /// An empty writer.
    pub fn new() -> W {
        W::default()
    }

    /// One raw byte.
    pub fn byte(&mut self, b: u8) -> &mut W {
        self.buf.push(b);
        self
    }

    /// Raw bytes.
    pub fn raw(&mut self, b: &[u8]) -> &mut W {
        self.buf.extend_from_slice(b);
        self
    }

    /// Unsigned LEB128 varint: 7 bits a byte, least significant group first, high bit = more follows.
    pub fn varint(&mut self, v: u64) -> &mut W {
        self.varint128(u128::from(v))
    }

    /// The same varint of a 128-bit value (at most 19 bytes).
    pub fn varint128(&mut self, mut v: u128) -> &mut W {
        loop {
            let low = (v & 0x7F) as u8;
            v >>= 7;
            if v == 0 {
                self.buf.push(low);
                return self;
            }
            self.buf.push(low | 0x80);
        }
    }

    /// Zigzag-mapped signed varint: 0, -1, 1, -2, … → 0, 1, 2, 3, ….
    pub fn zigzag(&mut self, v: i64) -> &mut W {
        self.zigzag128(i128::from(v))
    }

    /// The same zigzag varint of an i128 (an i64's is the same bytes).
    pub fn zigzag128(&mut self, v: i128) -> &mut W {
        self.varint128(((v << 1) ^ (v >> 127)) as u128)
    }

    /// A bool: one byte, 0 or 1.
    pub fn bool(&mut self, b: bool) -> &mut W {
        self.byte(u8::from(b))
    }

    /// An f64: its IEEE-754 bits, 8 bytes little-endian.
    pub fn f64(&mut self, f: f64) -> &mut W {
        self.raw(&f.to_bits().to_le_bytes())
    }

    /// A string: varint byte length, then the UTF-8 bytes.
    pub fn str(&mut self, s: &str) -> &mut W {
        self.varint(s.len() as u64).raw(s.as_bytes())
    }

    /// A sequence of u64 (or u32): varint count, then each as a varint.
    pub fn u64s(&mut self, v: &[u64]) -> &mut W {
        self.varint(v.len() as u64);
        for &x in v {
            self.varint(x);
        }
        self
    }
}

/// Wire index of a dtype (PROTOCOL.md §DType).
pub fn dtype_index(d: DType) -> u64 {
    match d {
        DType::Float64 => 0,
        DType::Float32 => 1,
        DType::Float16 => 2,
        DType::BFloat16 => 3,
        DType::Float8E4M3Fn => 4,
        DType::Float8E5M2 => 5,
        DType::Float8E4M3Fnuz => 6,
        DType::Float8E5M2Fnuz => 7,
        DType::Complex128 => 8,
        DType::Complex64 => 9,
        DType::Complex32 => 10,
        DType::Int64 => 11,
        DType::Int32 => 12,
        DType::Int16 => 13,
        DType::Int8 => 14,
        DType::UInt64 => 15,
        DType::UInt32 => 16,
        DType::UInt16 => 17,
        DType::UInt8 => 18,
        DType::Bool => 19,
        // `DType` is exhaustive today; a new dtype must get its index here and in PROTOCOL.md.
    }
}

/// Encodes the whole metadata message.
pub fn metadata(m: &Metadata) -> Vec<u8> {
    let mut w = W::new();
    match m.step {
        None => w.byte(0),
        Some(s) => w.byte(1).varint(s),
    };
    w.varint(u64::from(m.source));
    let dests: Vec<u64> = m.destinations.iter().map(|&d| u64::from(d)).collect();
    w.u64s(&dests);
    plan(&mut w, &m.plan);
    w.varint(m.tree.len() as u64);
    for n in &m.tree {
        node(&mut w, n);
    }
    w.varint(m.leaves.len() as u64);
    for l in &m.leaves {
        leaf(&mut w, l);
    }
    w.buf
}

/// PlanParams { fanout, bucket_size, chunk_size }.
pub fn plan(w: &mut W, p: &PlanParams) {
    w.varint(match p.fanout {
        FanOut::Direct => 0,
        FanOut::Chain => 1,
    });
    w.varint(p.bucket_size).varint(p.chunk_size);
}

/// Node: `Dict(Vec<Key>)` = 0, List(u64) = 1, Tuple(u64) = 2, Leaf = 3.
pub fn node(w: &mut W, n: &Node) {
    match n {
        Node::Dict(keys) => {
            w.varint(0).varint(keys.len() as u64);
            for k in keys {
                key(w, k);
            }
        }
        Node::List(n) => {
            w.varint(1).varint(*n);
        }
        Node::Tuple(n) => {
            w.varint(2).varint(*n);
        }
        Node::Leaf => {
            w.varint(3);
        }
    }
}

/// Key: Str(String) = 0, Int(i64) = 1.
pub fn key(w: &mut W, k: &Key) {
    match k {
        Key::Str(s) => w.varint(0).str(s),
        Key::Int(i) => w.varint(1).zigzag(*i),
    };
}

/// Value: None = 0, Bool = 1, Int = 2, Float = 3, Str = 4, Bytes = 5.
pub fn value(w: &mut W, v: &Value) {
    match v {
        Value::None => w.varint(0),
        Value::Bool(b) => w.varint(1).bool(*b),
        Value::Int(i) => w.varint(2).zigzag128(*i),
        Value::Float(f) => w.varint(3).f64(*f),
        Value::Str(s) => w.varint(4).str(s),
        Value::Bytes(b) => w.varint(5).varint(b.len() as u64).raw(b),
    };
}

/// Leaf: Value = 0, Tensor = 1, DTensor { local, spec } = 2, Sharded { local_shards, global } = 3.
pub fn leaf(w: &mut W, l: &Leaf) {
    match l {
        Leaf::Value(v) => {
            w.varint(0);
            value(w, v);
        }
        Leaf::Tensor(t) => {
            w.varint(1);
            layout(w, t);
        }
        Leaf::DTensor { local, spec } => {
            w.varint(2);
            layout(w, local);
            dtensor_spec(w, spec);
        }
        Leaf::Sharded {
            local_shards,
            global,
        } => {
            w.varint(3).varint(local_shards.len() as u64);
            for s in local_shards {
                local_shard(w, s);
            }
            sharded_metadata(w, global);
        }
    }
}

/// TensorLayout { dtype, shape, stride, storage_offset, nbytes }.
pub fn layout(w: &mut W, t: &TensorLayout) {
    w.varint(dtype_index(t.dtype))
        .u64s(&t.shape)
        .u64s(&t.stride)
        .varint(t.storage_offset)
        .varint(t.nbytes);
}

/// DTensorSpec { mesh, placements, global_shape, global_stride, dtype }.
pub fn dtensor_spec(w: &mut W, s: &DTensorSpec) {
    mesh(w, &s.mesh);
    w.varint(s.placements.len() as u64);
    for p in &s.placements {
        placement(w, p);
    }
    w.u64s(&s.global_shape)
        .u64s(&s.global_stride)
        .varint(dtype_index(s.dtype));
}

/// `DeviceMesh { shape, ranks, dim_names: Option<Vec<String>>, device_type }`.
pub fn mesh(w: &mut W, m: &DeviceMesh) {
    w.u64s(&m.shape).u64s(&m.ranks);
    match &m.dim_names {
        None => {
            w.byte(0);
        }
        Some(names) => {
            w.byte(1).varint(names.len() as u64);
            for n in names {
                w.str(n);
            }
        }
    }
    w.str(&m.device_type);
}

/// Placement: Shard(u32) = 0, Replicate = 1, Partial(ReduceOp) = 2.
pub fn placement(w: &mut W, p: &Placement) {
    match p {
        Placement::Shard(d) => w.varint(0).varint(u64::from(*d)),
        Placement::Replicate => w.varint(1),
        Placement::Partial(op) => w.varint(2).varint(reduce_op_index(*op)),
    };
}

/// ReduceOp: Sum = 0, Avg = 1, Product = 2, Min = 3, Max = 4.
pub fn reduce_op_index(op: ReduceOp) -> u64 {
    match op {
        ReduceOp::Sum => 0,
        ReduceOp::Avg => 1,
        ReduceOp::Product => 2,
        ReduceOp::Min => 3,
        ReduceOp::Max => 4,
    }
}

/// ShardMetadata { offsets, sizes, placement }.
pub fn shard_metadata(w: &mut W, s: &ShardMetadata) {
    w.u64s(&s.offsets).u64s(&s.sizes).str(&s.placement);
}

/// LocalShard { layout, meta }.
pub fn local_shard(w: &mut W, s: &LocalShard) {
    layout(w, &s.layout);
    shard_metadata(w, &s.meta);
}

/// ShardedTensorMetadata { shards, global_size, dtype }.
pub fn sharded_metadata(w: &mut W, g: &ShardedTensorMetadata) {
    w.varint(g.shards.len() as u64);
    for s in &g.shards {
        shard_metadata(w, s);
    }
    w.u64s(&g.global_size).varint(dtype_index(g.dtype));
}
