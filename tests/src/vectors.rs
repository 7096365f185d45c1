//! Golden vectors of the pgt wire protocol (`tests/vectors/`): valid metadata messages, whole transfers as
//! message streams, and malformed inputs named after what is wrong, with a machine-readable
//! `index.json` that other hosts (wasm, Python) check themselves against.
//!
//! [`files`] builds every file in memory; `cargo run -p pgt-tests --bin gen-vectors` writes them, and
//! `tests/tests/vectors.rs` checks the committed files are exactly what [`files`] builds today and that
//! pgt-core decodes each one as its index entry says.

pub mod host;
pub mod json;
pub mod spec;

use pgt_core::codec;
use pgt_core::digest::digest;
use pgt_core::dtensor::{DTensorSpec, DeviceMesh, Placement, ReduceOp};
use pgt_core::dtype::DType;
use pgt_core::header::{self, Header, Limits};
use pgt_core::layout::TensorLayout;
use pgt_core::manifest::Manifest;
use pgt_core::plan::MessageKind;
use pgt_core::receiver::ReceiverOptions;
use pgt_core::schema::{FanOut, Metadata, PlanParams};
use pgt_core::sharded::{LocalShard, ShardMetadata, ShardedTensorMetadata};
use pgt_core::tree::{Key, Leaf, Node, Value};
use pgt_core::Error;
use serde_json::{json, Value as Json};

use self::host::Wire;
use self::json::{hex64, uint};
use self::spec::W;

/// Directory of the vectors, relative to the workspace root.
pub const DIR: &str = "tests/vectors";

/// The transfer id of every vector's transfer (LE bytes `ef cd ab 89 67 45 23 01`).
pub const TRANSFER_ID: u64 = 0x0123_4567_89ab_cdef;
/// The id of the other transfer whose messages some vectors hold (stale or foreign messages).
pub const OTHER_TRANSFER_ID: u64 = 0xfedc_ba98_7654_3210;

/// What a vector is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Header + metadata that decode and validate.
    ValidMetadata,
    /// Header + metadata that `Header::parse` + `codec::decode` reject with the named error.
    Malformed,
    /// Header + metadata that decode, but that a receiver with the listed options rejects.
    ReceiverReject,
    /// The messages one receiver gets in a whole transfer, which it receives completely.
    Stream,
    /// A whole transfer with messages of another transfer (stale) before some of its own, under the
    /// same tags: the receiver skips them by their prefix and receives the transfer completely.
    StaleStream,
    /// A stream that the receiver rejects with the named error.
    MalformedStream,
    /// A stream that the receiving host must refuse itself (a data message of the wrong length, a
    /// message that never comes), before pgt-core sees the offending message.
    HostRejectStream,
}

impl Kind {
    /// The name in `index.json`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::ValidMetadata => "valid_metadata",
            Kind::Malformed => "malformed",
            Kind::ReceiverReject => "receiver_reject",
            Kind::Stream => "stream",
            Kind::StaleStream => "stale_stream",
            Kind::MalformedStream => "malformed_stream",
            Kind::HostRejectStream => "host_reject_stream",
        }
    }
}

/// One vector: its file's bytes and its `index.json` entry.
#[derive(Clone, Debug)]
pub struct Vector {
    /// File name stem (`NAME.bin`).
    pub name: String,
    /// What it is.
    pub kind: Kind,
    /// One line on what it contains.
    pub description: String,
    /// The file's bytes.
    pub bytes: Vec<u8>,
    /// The index entry (including `file`, `kind` and `description`).
    pub entry: Json,
}

/// Reads `Limits` back from [`limits_json`]'s form.
pub fn limits_from_json(j: &Json) -> Option<Limits> {
    let n = |k: &str| j.get(k).and_then(json_u64);
    Some(Limits {
        max_metadata_bytes: n("max_metadata_bytes")?,
        max_leaves: n("max_leaves")?,
        max_depth: u32::try_from(n("max_depth")?).ok()?,
        max_ndim: u32::try_from(n("max_ndim")?).ok()?,
        max_total_bytes: n("max_total_bytes")?,
        max_messages: n("max_messages")?,
    })
}

/// A JSON integer as written by [`uint`]: a number or a decimal string.
pub fn json_u64(j: &Json) -> Option<u64> {
    j.as_u64().or_else(|| j.as_str()?.parse().ok())
}

// ---------------------------------------------------------------------------------------------------
// Summaries: what a valid vector decodes to, as JSON (pgt-wasm's JSON forms, which the JS build
// returns too).

pub use pgt_wasm::json::{leaf_json, limits_json};

/// A message kind's name in index.json.
fn kind_name(k: MessageKind) -> &'static str {
    pgt_wasm::json::kind_name(k)
}

/// Everything a valid header + metadata decodes to: the manifest, its key paths, storages and plan.
pub fn summary(header: &Header, manifest: &Manifest) -> Json {
    let mut j = pgt_wasm::json::summary_json(&pgt_wasm::api::summary(header, manifest));
    let m = j.as_object_mut().expect("a summary is an object");
    m.remove("tree");
    m.insert(
        "messages".into(),
        pgt_wasm::json::plan_json(&manifest.plan(header.metadata_len)),
    );
    j
}

// ---------------------------------------------------------------------------------------------------
// Building blocks.

fn s(k: &str) -> Key {
    Key::Str(k.into())
}

fn dict(keys: &[&str]) -> Node {
    Node::Dict(keys.iter().map(|k| s(k)).collect())
}

/// A dict of these keys whose children are all leaves.
fn flat(keys: &[&str]) -> Vec<Node> {
    std::iter::once(dict(keys))
        .chain(keys.iter().map(|_| Node::Leaf))
        .collect()
}

fn tensor(dtype: DType, shape: &[u64]) -> Leaf {
    Leaf::Tensor(TensorLayout::contiguous(dtype, shape))
}

fn view(dtype: DType, shape: &[u64], stride: &[u64], offset: u64, nbytes: u64) -> TensorLayout {
    TensorLayout {
        dtype,
        shape: shape.to_vec(),
        stride: stride.to_vec(),
        storage_offset: offset,
        nbytes,
    }
}

fn plan(fanout: FanOut, bucket_size: u64, chunk_size: u64) -> PlanParams {
    PlanParams {
        fanout,
        bucket_size,
        chunk_size,
    }
}

fn metadata(
    step: Option<u64>,
    source: u32,
    destinations: &[u32],
    plan: PlanParams,
    tree: Vec<Node>,
    leaves: Vec<Leaf>,
) -> Metadata {
    Metadata {
        step,
        source,
        destinations: destinations.to_vec(),
        plan,
        tree,
        leaves,
    }
}

/// The header of transfer [`TRANSFER_ID`] for the postcard metadata `meta` as a sender would write it
/// (length and digest of these bytes).
fn header_for(flags: u16, meta: &[u8]) -> Header {
    Header {
        version: header::VERSION,
        flags,
        metadata_len: meta.len() as u64,
        metadata_digest: digest(meta),
        transfer_id: TRANSFER_ID,
    }
}

/// The metadata message of transfer [`TRANSFER_ID`]: its prefix, then the postcard metadata `meta`.
fn message(meta: &[u8]) -> Vec<u8> {
    [&header::prefix(TRANSFER_ID)[..], meta].concat()
}

/// A header + metadata file: the header message, then the metadata message.
fn file(header: &[u8], metadata_message: &[u8]) -> Vec<u8> {
    [header, metadata_message].concat()
}

fn mesh_2d() -> DeviceMesh {
    DeviceMesh {
        shape: vec![2, 2],
        ranks: vec![0, 1, 2, 3],
        dim_names: Some(vec!["dp".into(), "tp".into()]),
        device_type: "cuda".into(),
    }
}

/// A valid DTensor leaf: float32 global [8, 6] sharded on both dims of a 2×2 mesh, local [4, 3].
fn dtensor_leaf() -> (TensorLayout, DTensorSpec) {
    let local = TensorLayout::contiguous(DType::Float32, &[4, 3]);
    let spec = DTensorSpec {
        mesh: mesh_2d(),
        placements: vec![Placement::Shard(0), Placement::Shard(1)],
        global_shape: vec![8, 6],
        global_stride: vec![6, 1],
        dtype: DType::Float32,
    };
    (local, spec)
}

fn shard_meta(offsets: &[u64], sizes: &[u64], placement: &str) -> ShardMetadata {
    ShardMetadata {
        offsets: offsets.to_vec(),
        sizes: sizes.to_vec(),
        placement: placement.into(),
    }
}

/// A valid ShardedTensor leaf: float32 [8, 4] in 4 row shards of [2, 4]; the sender (rank 0) holds the
/// shards at rows 0 and 4.
fn sharded_leaf() -> (Vec<LocalShard>, ShardedTensorMetadata) {
    let global = ShardedTensorMetadata {
        shards: vec![
            shard_meta(&[0, 0], &[2, 4], "rank:0/cuda:0"),
            shard_meta(&[2, 0], &[2, 4], "rank:1/cuda:1"),
            shard_meta(&[4, 0], &[2, 4], "rank:0/cuda:0"),
            shard_meta(&[6, 0], &[2, 4], "rank:1/cuda:1"),
        ],
        global_size: vec![8, 4],
        dtype: DType::Float32,
    };
    let local = vec![
        LocalShard {
            layout: TensorLayout::contiguous(DType::Float32, &[2, 4]),
            meta: global.shards[0].clone(),
        },
        LocalShard {
            layout: TensorLayout::contiguous(DType::Float32, &[2, 4]),
            meta: global.shards[2].clone(),
        },
    ];
    (local, global)
}

fn entry(name: &str, kind: Kind, description: &str) -> Json {
    json!({"file": format!("{name}.bin"), "kind": kind.name(), "description": description})
}

// ---------------------------------------------------------------------------------------------------
// Valid metadata.

/// The valid metadata vectors: (name, description, metadata, digests).
// One push per vector reads better than one huge `vec![]` with the shared leaves built in between.
#[allow(clippy::vec_init_then_push)]
pub fn valid_cases() -> Vec<(&'static str, &'static str, Metadata, bool)> {
    let mut out = Vec::new();
    out.push((
        "empty_dict",
        "An empty dict: no leaves, no storages, no data messages. Default plan (Chain, bucket 1 MiB, chunk 4 MiB), digests off.",
        metadata(None, 0, &[1], PlanParams::default(), vec![Node::Dict(vec![])], vec![]),
        false,
    ));
    out.push((
        "empty_dict_digests",
        "An empty dict with digests on: the trailer is a 0-byte message with tag 3.",
        metadata(
            Some(0),
            0,
            &[1],
            plan(FanOut::Direct, 64, 64),
            vec![Node::Dict(vec![])],
            vec![],
        ),
        true,
    ));
    out.push((
        "values",
        "Only values, every Value variant: None, Bool true/false, negative Int, i64::MIN and i64::MAX (10-byte zigzag varints), Float (-2.5 and a NaN with payload, bit-exact), Str (non-ASCII), Bytes (incl. empty). step = u64::MAX (10-byte varint), source 3 → [0], Direct, digests on (trailer of 0 bytes).",
        metadata(
            Some(u64::MAX),
            3,
            &[0],
            plan(FanOut::Direct, 1 << 20, 16 << 20),
            flat(&[
                "none", "yes", "no", "neg", "min", "max", "float", "nan", "text", "blob", "empty",
            ]),
            vec![
                Leaf::Value(Value::None),
                Leaf::Value(Value::Bool(true)),
                Leaf::Value(Value::Bool(false)),
                Leaf::Value(Value::Int(-42)),
                Leaf::Value(Value::Int(i64::MIN.into())),
                Leaf::Value(Value::Int(i64::MAX.into())),
                Leaf::Value(Value::Float(-2.5)),
                Leaf::Value(Value::Float(f64::from_bits(0x7FF8_0000_0000_0001))),
                Leaf::Value(Value::Str("héllo ✓".into())),
                Leaf::Value(Value::Bytes(vec![0x00, 0xFF, 0x80, 0x7F])),
                Leaf::Value(Value::Bytes(vec![])),
            ],
        ),
        true,
    ));
    out.push((
        "values_int128",
        "Ints beyond i64, as Python has them (Value::Int is an i128): 2^64 − 1 (the largest torch.initial_seed() returns; zigzag 2^65 − 2, a 10-byte varint ending 0x03, which an i64 decoder refuses), 2^63, −2^127 (i128::MIN: zigzag 2^128 − 1, 19 bytes ending 0x03), 2^127 − 1 (i128::MAX, 19 bytes) and i64::MIN (the same 10 bytes as an i64's). Chain to [1], digests off.",
        metadata(
            None,
            0,
            &[1],
            PlanParams::default(),
            flat(&["seed", "two_63", "min", "max", "i64_min"]),
            vec![
                Leaf::Value(Value::Int(i128::from(u64::MAX))),
                Leaf::Value(Value::Int(1 << 63)),
                Leaf::Value(Value::Int(i128::MIN)),
                Leaf::Value(Value::Int(i128::MAX)),
                Leaf::Value(Value::Int(i64::MIN.into())),
            ],
        ),
        false,
    ));
    out.push((
        "tensors",
        "Plain tensors: float32 [2,3] contiguous; bfloat16 [3,2] transposed view (stride [1,3]); int64 [2] offset view (offset 3 in a 6-element storage); float64 0-dim scalar; float16 zero-size [0,4] (0-byte storage); uint8, bool, float8_e4m3fn, complex64, int32. Direct to [1, 2], bucket 16, chunk 64 (so several buckets and chunks), digests on.",
        metadata(
            Some(100),
            0,
            &[1, 2],
            plan(FanOut::Direct, 16, 64),
            flat(&[
                "f32", "bf16_t", "i64_off", "f64_scalar", "f16_empty", "u8", "flags", "f8", "c64",
                "i32",
            ]),
            vec![
                tensor(DType::Float32, &[2, 3]),
                Leaf::Tensor(view(DType::BFloat16, &[3, 2], &[1, 3], 0, 12)),
                Leaf::Tensor(view(DType::Int64, &[2], &[1], 3, 48)),
                tensor(DType::Float64, &[]),
                tensor(DType::Float16, &[0, 4]),
                tensor(DType::UInt8, &[5]),
                tensor(DType::Bool, &[3]),
                tensor(DType::Float8E4M3Fn, &[4]),
                tensor(DType::Complex64, &[2]),
                tensor(DType::Int32, &[40]),
            ],
        ),
        true,
    ));
    let (local, spec) = dtensor_leaf();
    out.push((
        "dtensor",
        "DTensors on a 2-D mesh [2,2] with dim names [dp, tp]: [Shard(0), Shard(1)] float32; [Replicate, Partial(Avg)] bfloat16; a mesh without dim names with [Partial(Sum), Shard(0)] float16; a 1-D cpu mesh with [Partial(Max)] int32. Chain to [1, 2, 3], digests on.",
        metadata(
            Some(7),
            0,
            &[1, 2, 3],
            PlanParams::default(),
            vec![dict(&["w", "b", "c", "d"]), Node::Leaf, Node::Leaf, Node::Leaf, Node::Leaf],
            vec![
                Leaf::DTensor { local, spec },
                Leaf::DTensor {
                    local: TensorLayout::contiguous(DType::BFloat16, &[6]),
                    spec: DTensorSpec {
                        mesh: mesh_2d(),
                        placements: vec![Placement::Replicate, Placement::Partial(ReduceOp::Avg)],
                        global_shape: vec![6],
                        global_stride: vec![1],
                        dtype: DType::BFloat16,
                    },
                },
                Leaf::DTensor {
                    local: TensorLayout::contiguous(DType::Float16, &[2, 4]),
                    spec: DTensorSpec {
                        mesh: DeviceMesh { dim_names: None, ..mesh_2d() },
                        placements: vec![Placement::Partial(ReduceOp::Sum), Placement::Shard(0)],
                        global_shape: vec![4, 4],
                        global_stride: vec![4, 1],
                        dtype: DType::Float16,
                    },
                },
                Leaf::DTensor {
                    local: TensorLayout::contiguous(DType::Int32, &[3]),
                    spec: DTensorSpec {
                        mesh: DeviceMesh {
                            shape: vec![4],
                            ranks: vec![4, 5, 6, 7],
                            dim_names: Some(vec!["x".into()]),
                            device_type: "cpu".into(),
                        },
                        placements: vec![Placement::Partial(ReduceOp::Max)],
                        global_shape: vec![3],
                        global_stride: vec![1],
                        dtype: DType::Int32,
                    },
                },
            ],
        ),
        true,
    ));
    let (local_shards, global) = sharded_leaf();
    out.push((
        "sharded",
        "A ShardedTensor float32 [8,4] in 4 row shards of [2,4]; the sender holds 2 (rows 0 and 4) → 2 storages of 32 bytes. Plus an int value. Chain to [1], digests off.",
        metadata(
            None,
            0,
            &[1],
            PlanParams::default(),
            vec![dict(&["emb", "version"]), Node::Leaf, Node::Leaf],
            vec![Leaf::Sharded { local_shards, global }, Leaf::Value(Value::Int(2))],
        ),
        false,
    ));
    out.push((
        "nested",
        "Nesting: int keys (3, -1, 0) next to str keys (incl. \"0\", displayed ['0'] where the int key 0 is [0], and a non-ASCII key), lists, tuples, an empty list and an empty tuple. Direct to [2, 1], digests off.",
        metadata(
            None,
            0,
            &[2, 1],
            plan(FanOut::Direct, 1024, 4096),
            vec![
                Node::Dict(vec![
                    s("model"),
                    Key::Int(3),
                    Key::Int(-1),
                    s("größe"),
                    s("0"),
                    Key::Int(0),
                    s("empty_list"),
                    s("empty_tuple"),
                ]),
                dict(&["layers"]),
                Node::List(2),
                dict(&["w", "b"]),
                Node::Leaf,
                Node::Leaf,
                dict(&["w", "b"]),
                Node::Leaf,
                Node::Leaf,
                Node::Tuple(2),
                Node::Leaf,
                Node::Leaf,
                Node::List(1),
                Node::Tuple(2),
                Node::Leaf,
                Node::Leaf,
                Node::Leaf,
                Node::Leaf,
                Node::Leaf,
                Node::List(0),
                Node::Tuple(0),
            ],
            vec![
                tensor(DType::Float32, &[2, 2]),
                tensor(DType::Float32, &[2]),
                tensor(DType::Float32, &[2, 2]),
                tensor(DType::Float32, &[2]),
                Leaf::Value(Value::Int(1)),
                Leaf::Value(Value::Str("x".into())),
                tensor(DType::Int64, &[3]),
                Leaf::Value(Value::None),
                tensor(DType::UInt8, &[7]),
                Leaf::Value(Value::Bool(true)),
                Leaf::Value(Value::Bool(false)),
            ],
        ),
        false,
    ));
    out.push((
        "root_leaf",
        "The root itself is a leaf (a float32 [4] tensor): one leaf whose key path is empty (displayed \"<root>\"). Chain to [1], digests on.",
        metadata(Some(1), 0, &[1], PlanParams::default(), vec![Node::Leaf], vec![tensor(DType::Float32, &[4])]),
        true,
    ));
    out
}

fn valid_vector(
    name: &str,
    description: &str,
    metadata: Metadata,
    digests: bool,
) -> Result<Vector, Error> {
    let manifest = Manifest::new(metadata, digests, &Limits::default())?;
    let (header, meta) = codec::encode(&manifest, TRANSFER_ID)?;
    let mut e = entry(name, Kind::ValidMetadata, description);
    e["header_len"] = Json::from(Header::SIZE);
    e["manifest"] = summary(&header, &manifest);
    Ok(Vector {
        name: name.into(),
        kind: Kind::ValidMetadata,
        description: description.into(),
        bytes: file(&header.to_bytes(), &meta),
        entry: e,
    })
}

// ---------------------------------------------------------------------------------------------------
// Malformed metadata.

/// A small valid metadata: `{"w": float32 [2, 2]}` from 0 to [1], default plan.
fn base() -> Metadata {
    metadata(
        None,
        0,
        &[1],
        PlanParams::default(),
        vec![dict(&["w"]), Node::Leaf],
        vec![tensor(DType::Float32, &[2, 2])],
    )
}

/// One tensor leaf named "t" with this layout.
fn one_tensor(layout: TensorLayout) -> Metadata {
    metadata(
        None,
        0,
        &[1],
        PlanParams::default(),
        vec![dict(&["t"]), Node::Leaf],
        vec![Leaf::Tensor(layout)],
    )
}

fn one_leaf(leaf: Leaf) -> Metadata {
    metadata(
        None,
        0,
        &[1],
        PlanParams::default(),
        vec![dict(&["x"]), Node::Leaf],
        vec![leaf],
    )
}

fn with_dtensor(f: impl FnOnce(&mut TensorLayout, &mut DTensorSpec)) -> Metadata {
    let (mut local, mut spec) = dtensor_leaf();
    f(&mut local, &mut spec);
    one_leaf(Leaf::DTensor { local, spec })
}

fn with_sharded(f: impl FnOnce(&mut Vec<LocalShard>, &mut ShardedTensorMetadata)) -> Metadata {
    let (mut local_shards, mut global) = sharded_leaf();
    f(&mut local_shards, &mut global);
    one_leaf(Leaf::Sharded {
        local_shards,
        global,
    })
}

/// Metadata bytes of `base()` up to (not including) the plan, and from the plan's end.
fn base_split() -> (Vec<u8>, Vec<u8>) {
    let m = base();
    let mut w = W::new();
    w.byte(0).varint(0).u64s(&[1]);
    let head = w.buf;
    let mut w = W::new();
    w.varint(m.tree.len() as u64);
    for n in &m.tree {
        spec::node(&mut w, n);
    }
    w.varint(m.leaves.len() as u64);
    for l in &m.leaves {
        spec::leaf(&mut w, l);
    }
    (head, w.buf)
}

/// A malformed case: the header (default: consistent with the metadata), the metadata message (default:
/// the prefix of [`TRANSFER_ID`] and the postcard bytes), non-default limits.
struct Bad {
    name: &'static str,
    description: &'static str,
    header: Vec<u8>,
    meta: Vec<u8>,
    limits: Option<Limits>,
}

/// The malformed case of the postcard metadata `meta` behind a matching header and prefix.
fn bad(name: &'static str, description: &'static str, meta: Vec<u8>) -> Bad {
    Bad {
        name,
        description,
        header: header_for(0, &meta).to_bytes().to_vec(),
        meta: message(&meta),
        limits: None,
    }
}

fn bad_meta(name: &'static str, description: &'static str, m: &Metadata) -> Bad {
    bad(name, description, spec::metadata(m))
}

/// The malformed cases, in index order.
// One push per vector, as for the valid cases.
#[allow(clippy::vec_init_then_push)]
fn bad_cases() -> Vec<Bad> {
    let base_postcard = spec::metadata(&base());
    let base_header = header_for(0, &base_postcard);
    let base_bytes = message(&base_postcard);
    let patched = |f: &dyn Fn(&mut [u8; Header::SIZE])| {
        let mut h = base_header.to_bytes();
        f(&mut h);
        h.to_vec()
    };
    let (head, tail) = base_split();
    let mut v = Vec::new();

    // ---- header ----
    v.push(Bad {
        name: "header_short",
        description: "The header message is 31 bytes (the base header without its last byte); header_len is 31 and there is no metadata.",
        header: base_header.to_bytes()[..31].to_vec(),
        meta: vec![],
        limits: None,
    });
    v.push(Bad {
        name: "header_long",
        description: "The header message is 33 bytes (the base header plus a zero byte); header_len is 33, then the base metadata message.",
        header: [&base_header.to_bytes()[..], &[0]].concat(),
        meta: base_bytes.clone(),
        limits: None,
    });
    v.push(Bad {
        name: "bad_magic",
        description:
            "Magic \"PGX\\0\" instead of \"PGT\\0\"; the rest is the base header and metadata.",
        header: patched(&|h| h[2] = b'X'),
        meta: base_bytes.clone(),
        limits: None,
    });
    v.push(Bad {
        name: "unsupported_version",
        description: "Version 3 (this protocol is version 2).",
        header: patched(&|h| h[4..6].copy_from_slice(&3u16.to_le_bytes())),
        meta: base_bytes.clone(),
        limits: None,
    });
    {
        // What a version-1 sender sends: a 24-byte header (no transfer id) and the bare postcard
        // metadata (no prefix).
        let mut v1 = base_header.to_bytes()[..24].to_vec();
        v1[4..6].copy_from_slice(&1u16.to_le_bytes());
        v.push(Bad {
            name: "version_1_header",
            description: "A version-1 transfer's header and metadata: the 24-byte version-1 header (magic, version 1, flags, metadata_len, metadata_digest; no transfer id) and the bare postcard base metadata (no prefix); header_len is 24. Refused by its version, not its length.",
            header: v1,
            meta: base_postcard.clone(),
            limits: None,
        });
    }
    v.push(Bad {
        name: "unknown_flags",
        description: "Flags 0x8001: bit 0 (digests) is known, bit 15 is not.",
        header: patched(&|h| h[6..8].copy_from_slice(&0x8001u16.to_le_bytes())),
        meta: base_bytes.clone(),
        limits: None,
    });
    v.push(Bad {
        name: "metadata_too_large",
        description: "The header announces 268435457 metadata bytes (256 MiB + 1, over the default max_metadata_bytes); rejected from the header alone, the file holds only the header.",
        header: patched(&|h| h[8..16].copy_from_slice(&((256u64 << 20) + 1).to_le_bytes())),
        meta: vec![],
        limits: None,
    });
    v.push(Bad {
        name: "metadata_length",
        description: "The header announces one byte more metadata than follows (the metadata message is the 8-byte prefix and the postcard bytes, so MetadataLength counts the prefix too).",
        header: patched(&|h| {
            h[8..16].copy_from_slice(&(base_postcard.len() as u64 + 1).to_le_bytes())
        }),
        meta: base_bytes.clone(),
        limits: None,
    });
    v.push(Bad {
        name: "metadata_digest_mismatch",
        description: "The header's metadata digest has its lowest bit flipped.",
        header: patched(&|h| h[16] ^= 1),
        meta: base_bytes.clone(),
        limits: None,
    });
    v.push(Bad {
        name: "metadata_of_another_transfer",
        description: "The base header (transfer 0x0123456789abcdef), then the base metadata message of another transfer (its prefix is 0xfedcba9876543210, bytes 10 32 54 76 98 ba dc fe): a stale or foreign message, refused by its prefix before its length or digest is looked at. A host skips such a message instead of handing it over (PROTOCOL.md §12).",
        header: base_header.to_bytes().to_vec(),
        meta: [&header::prefix(OTHER_TRANSFER_ID)[..], &base_postcard].concat(),
        limits: None,
    });

    // ---- postcard ----
    v.push(bad(
        "truncated_metadata",
        "The base metadata without its last byte (the header matches the shortened bytes): the value ends early.",
        base_postcard[..base_postcard.len() - 1].to_vec(),
    ));
    v.push(bad(
        "trailing_bytes",
        "The base metadata followed by one extra 0x00 byte (the header covers it).",
        [&base_postcard[..], &[0]].concat(),
    ));
    v.push(bad(
        "bad_enum_tag",
        "FanOut variant index 2 (only 0 = Direct and 1 = Chain exist).",
        [
            &head[..],
            &[2],
            &W::new().varint(1 << 20).varint(16 << 20).buf,
            &tail,
        ]
        .concat(),
    ));
    {
        let mut w = W::new();
        w.raw(&head);
        spec::plan(&mut w, &PlanParams::default());
        w.varint(2);
        spec::node(&mut w, &dict(&["w"]));
        spec::node(&mut w, &Node::Leaf);
        w.varint(1).varint(1).varint(20); // Leaf::Tensor, DType index 20
        v.push(bad(
            "bad_dtype",
            "DType variant index 20 (0..=19 exist).",
            w.buf,
        ));
    }
    v.push(bad(
        "bad_option",
        "The step Option's tag byte is 2 (only 0 = None and 1 = Some exist).",
        [&[2u8][..], &base_postcard[1..]].concat(),
    ));
    {
        let mut w = W::new();
        w.raw(&head);
        spec::plan(&mut w, &PlanParams::default());
        w.varint(2);
        spec::node(&mut w, &dict(&["flag"]));
        spec::node(&mut w, &Node::Leaf);
        w.varint(1).varint(0).varint(1).byte(2); // 1 leaf: Leaf::Value(Value::Bool(<2>))
        v.push(bad("bad_bool", "A Value::Bool whose byte is 2.", w.buf));
    }
    {
        let mut w = W::new();
        w.raw(&head);
        spec::plan(&mut w, &PlanParams::default());
        w.varint(2);
        spec::node(&mut w, &dict(&["seed"]));
        spec::node(&mut w, &Node::Leaf);
        // 1 leaf: Leaf::Value(Value::Int(<19-byte varint whose last byte, 0x04, is past 128 bits>)).
        w.varint(1).varint(0).varint(2).raw(&[0xFF; 18]).byte(0x04);
        v.push(bad(
            "bad_int_varint",
            "A Value::Int (an i128) as a 19-byte varint FF ×18 then 04: 5 × 2^126 − 1, past 128 bits (the 19th byte holds bits 126 and 127 only, so at most 03).",
            w.buf,
        ));
    }
    {
        let mut w = W::new();
        w.raw(&head);
        spec::plan(&mut w, &PlanParams::default());
        w.varint(2)
            .varint(0)
            .varint(1)
            .varint(0)
            .varint(2)
            .raw(&[0xC3, 0x28]); // Dict([Str(<bad>)])
        spec::node(&mut w, &Node::Leaf);
        w.varint(1);
        spec::leaf(&mut w, &tensor(DType::Float32, &[2, 2]));
        v.push(bad(
            "bad_utf8",
            "A dict key whose 2 bytes C3 28 are not UTF-8.",
            w.buf,
        ));
    }
    v.push(bad(
        "bad_varint",
        "The source rank (a u32) as the 5-byte varint 80 80 80 80 10, which overflows 32 bits.",
        [
            &[0u8][..],
            &[0x80, 0x80, 0x80, 0x80, 0x10],
            &head[2..],
            &{
                let mut w = W::new();
                spec::plan(&mut w, &PlanParams::default());
                w.buf
            },
            &tail,
        ]
        .concat(),
    ));

    // ---- limits ----
    let mut few_leaves = bad_meta(
        "too_many_leaves",
        "Three value leaves under limits with max_leaves = 2 (the entry's \"limits\"; the default limit of 4 Mi leaves would need an 8 MiB file).",
        &metadata(
            None,
            0,
            &[1],
            PlanParams::default(),
            vec![Node::List(3), Node::Leaf, Node::Leaf, Node::Leaf],
            vec![Leaf::Value(Value::None), Leaf::Value(Value::None), Leaf::Value(Value::None)],
        ),
    );
    few_leaves.limits = Some(Limits {
        max_leaves: 2,
        ..Limits::default()
    });
    v.push(few_leaves);
    {
        let mut w = W::new();
        w.raw(&head);
        spec::plan(&mut w, &PlanParams::default());
        w.varint(2);
        spec::node(&mut w, &dict(&["w"]));
        spec::node(&mut w, &Node::Leaf);
        w.varint((4 << 20) + 1); // the leaf count, and no leaves at all
        v.push(bad(
            "too_many_leaves_announced",
            "The leaf list announces 4194305 leaves (default max_leaves is 4 Mi) and ends there: the count is refused as soon as it is read, before any leaf is decoded (so not TruncatedMetadata).",
            w.buf,
        ));
    }
    let long_key = "k".repeat(100);
    let mut key_text = bad_meta(
        "key_paths_too_large",
        "A 100-byte key above a list of 41 value leaves: the leaves' paths hold 4100 bytes of key text, over 4 × max_metadata_bytes = 4096 under the entry's limits (max_metadata_bytes = 1024).",
        &metadata(
            None,
            0,
            &[1],
            PlanParams::default(),
            [Node::Dict(vec![s(&long_key)]), Node::List(41)]
                .into_iter()
                .chain(std::iter::repeat_n(Node::Leaf, 41))
                .collect(),
            vec![Leaf::Value(Value::None); 41],
        ),
    );
    key_text.limits = Some(Limits {
        max_metadata_bytes: 1024,
        ..Limits::default()
    });
    v.push(key_text);
    v.push(bad_meta(
        "tree_too_deep",
        "65 nested single-element lists around one leaf; the default max_depth is 64 containers.",
        &metadata(
            None,
            0,
            &[1],
            PlanParams::default(),
            std::iter::repeat_n(Node::List(1), 65)
                .chain([Node::Leaf])
                .collect(),
            vec![Leaf::Value(Value::None)],
        ),
    ));
    v.push(bad_meta(
        "too_many_dims",
        "A uint8 tensor with 65 dims of size 1 (default max_ndim is 64).",
        &one_tensor(view(DType::UInt8, &[1; 65], &[1; 65], 0, 1)),
    ));
    {
        let mut w = W::new();
        w.raw(&head);
        spec::plan(&mut w, &PlanParams::default());
        w.varint(2);
        spec::node(&mut w, &dict(&["t"]));
        spec::node(&mut w, &Node::Leaf);
        w.varint(1)
            .varint(1)
            .varint(spec::dtype_index(DType::UInt8));
        w.varint(1 << 60); // the shape's length, and nothing after it
        v.push(bad(
            "too_many_dims_announced",
            "A tensor whose shape announces 2^60 dims (default max_ndim is 64) and ends there: a dims list's length is refused as soon as it is read, before any dim is decoded (so not TruncatedMetadata).",
            w.buf,
        ));
    }
    v.push(bad_meta(
        "too_many_dims_stride",
        "A uint8 tensor of shape [1, 1] whose stride has 65 entries, in metadata with no destinations: refused from the stride's length while decoding (TooManyDims), before validation, which would find NoDestinations first (and StrideRankMismatch for the tensor).",
        &Metadata {
            destinations: vec![],
            ..one_tensor(view(DType::UInt8, &[1, 1], &[1; 65], 0, 1))
        },
    ));
    v.push(bad_meta(
        "decoded_too_large",
        "A 4096-byte key above a list of 4200 None leaves: 16,720 bytes of metadata whose decoded size (PROTOCOL.md §11) is 18,702,572 bytes, as the key is in each leaf's key path: over 64 × 16,720 + 16 MiB = 17,847,296, which the scan passes at the 911th leaf, before anything is decoded. Every other limit holds.",
        &metadata(
            None,
            0,
            &[1],
            PlanParams::default(),
            [Node::Dict(vec![s(&"k".repeat(4096))]), Node::List(4200)]
                .into_iter()
                .chain(std::iter::repeat_n(Node::Leaf, 4200))
                .collect(),
            vec![Leaf::Value(Value::None); 4200],
        ),
    ));
    v.push(bad_meta(
        "total_bytes_too_large",
        "A uint8 tensor of 2^44 + 1 bytes (default max_total_bytes is 2^44).",
        &one_tensor(TensorLayout::contiguous(DType::UInt8, &[(1 << 44) + 1])),
    ));
    v.push(bad_meta(
        "too_many_messages",
        "A uint8 tensor of 64 × 2^24 + 1 bytes with chunk_size 64: 2^24 + 1 data messages (default max_messages is 2^20).",
        &Metadata {
            plan: plan(FanOut::Chain, 64, 64),
            ..one_tensor(TensorLayout::contiguous(DType::UInt8, &[(64 << 24) + 1]))
        },
    ));

    // ---- tree ----
    v.push(bad_meta(
        "empty_tree",
        "No tree nodes at all (and no leaves).",
        &metadata(None, 0, &[1], PlanParams::default(), vec![], vec![]),
    ));
    v.push(bad_meta(
        "truncated_tree",
        "A dict of 2 keys followed by only one child node.",
        &metadata(
            None,
            0,
            &[1],
            PlanParams::default(),
            vec![dict(&["a", "b"]), Node::Leaf],
            vec![Leaf::Value(Value::None)],
        ),
    ));
    v.push(bad_meta(
        "trailing_tree_nodes",
        "A root leaf followed by a second node.",
        &metadata(
            None,
            0,
            &[1],
            PlanParams::default(),
            vec![Node::Leaf, Node::Leaf],
            vec![Leaf::Value(Value::None)],
        ),
    ));
    v.push(bad_meta(
        "duplicate_key",
        "A dict with the key \"a\" twice.",
        &metadata(
            None,
            0,
            &[1],
            PlanParams::default(),
            vec![dict(&["a", "a"]), Node::Leaf, Node::Leaf],
            vec![Leaf::Value(Value::None), Leaf::Value(Value::None)],
        ),
    ));
    v.push(bad_meta(
        "leaf_count_mismatch",
        "The tree has 1 leaf, the leaf list 2.",
        &metadata(
            None,
            0,
            &[1],
            PlanParams::default(),
            vec![dict(&["a"]), Node::Leaf],
            vec![Leaf::Value(Value::None), Leaf::Value(Value::None)],
        ),
    ));

    // ---- layouts ----
    v.push(bad_meta(
        "stride_rank_mismatch",
        "A float32 tensor with shape [2, 2] and stride [2].",
        &one_tensor(view(DType::Float32, &[2, 2], &[2], 0, 16)),
    ));
    v.push(bad_meta(
        "storage_not_whole_elements",
        "A float32 tensor [1] whose storage is 6 bytes.",
        &one_tensor(view(DType::Float32, &[1], &[1], 0, 6)),
    ));
    v.push(bad_meta(
        "view_out_of_bounds",
        "A float32 [2, 2] view at offset 1 of a 16-byte storage: it needs 20 bytes.",
        &one_tensor(view(DType::Float32, &[2, 2], &[2, 1], 1, 16)),
    ));
    v.push(bad_meta(
        "layout_overflow",
        "A float32 tensor of shape [2^32, 2^32]: its element count overflows 64 bits.",
        &one_tensor(view(
            DType::Float32,
            &[1 << 32, 1 << 32],
            &[1 << 32, 1],
            0,
            4,
        )),
    ));
    v.push(bad_meta(
        "layout_span_overflow",
        "A uint8 tensor [2] with stride 2^64 − 1: the byte range overflows (the element count does not).",
        &one_tensor(view(DType::UInt8, &[2], &[u64::MAX], 0, 2)),
    ));

    // ---- DTensor ----
    v.push(bad_meta(
        "mesh_rank_count",
        "A DTensor whose 2×2 mesh lists 3 ranks.",
        &with_dtensor(|_, s| s.mesh.ranks = vec![0, 1, 2]),
    ));
    v.push(bad_meta(
        "mesh_size_overflow",
        "A DTensor whose mesh shape [2^32, 2^32] overflows 64 bits.",
        &with_dtensor(|_, s| s.mesh.shape = vec![1 << 32, 1 << 32]),
    ));
    v.push(bad_meta(
        "mesh_zero_dim",
        "A DTensor whose mesh shape is [2^32, 2^32, 0] (its 4 ranks, 2 dim names and 2 placements kept): the mesh size is the true product, 0, not an overflow, so the rank count is checked and is wrong (MeshRankCount, before the dim names and placements).",
        &with_dtensor(|_, s| s.mesh.shape = vec![1 << 32, 1 << 32, 0]),
    ));
    v.push(bad_meta(
        "mesh_dim_names",
        "A DTensor whose 2-dim mesh has 1 dim name.",
        &with_dtensor(|_, s| s.mesh.dim_names = Some(vec!["dp".into()])),
    ));
    v.push(bad_meta(
        "placement_count",
        "A DTensor with 1 placement on a 2-dim mesh.",
        &with_dtensor(|_, s| s.placements = vec![Placement::Replicate]),
    ));
    v.push(bad_meta(
        "shard_dim_out_of_range",
        "A DTensor placement Shard(2) on a 2-dim global tensor.",
        &with_dtensor(|_, s| s.placements = vec![Placement::Shard(2), Placement::Replicate]),
    ));
    v.push(bad_meta(
        "dtensor_stride_rank_mismatch",
        "A DTensor whose global_stride has 1 entry for a 2-dim global shape.",
        &with_dtensor(|_, s| s.global_stride = vec![1]),
    ));
    v.push(bad_meta(
        "local_shape_mismatch",
        "A DTensor whose local tensor has 1 dim, the global 2.",
        &with_dtensor(|l, _| *l = TensorLayout::contiguous(DType::Float32, &[12])),
    ));
    v.push(bad_meta(
        "dtensor_local_larger",
        "A DTensor whose local tensor [9, 3] is larger than the global [8, 6] in dim 0.",
        &with_dtensor(|l, _| *l = TensorLayout::contiguous(DType::Float32, &[9, 3])),
    ));
    v.push(bad_meta(
        "dtype_mismatch",
        "A DTensor whose local tensor is float32 and spec bfloat16.",
        &with_dtensor(|_, s| s.dtype = DType::BFloat16),
    ));
    v.push(bad_meta(
        "dtensor_local_size",
        "A DTensor sharded [Shard(0), Shard(1)] on a 2×2 mesh whose local tensor [8, 3] is the whole global [8, 6] along dim 0: Shard(0) on a mesh dim of 2 leaves 4 rows.",
        &with_dtensor(|l, _| *l = TensorLayout::contiguous(DType::Float32, &[8, 3])),
    ));
    v.push(bad_meta(
        "dtensor_local_size_unsharded_dim",
        "A DTensor [Shard(0), Replicate] with local [4, 3] of global [8, 6]: no placement shards dim 1, so it must hold all 6.",
        &with_dtensor(|_, s| s.placements = vec![Placement::Shard(0), Placement::Replicate]),
    ));
    v.push(bad_meta(
        "duplicate_mesh_rank",
        "A DTensor whose 2×2 mesh lists ranks [0, 1, 2, 1].",
        &with_dtensor(|_, s| s.mesh.ranks = vec![0, 1, 2, 1]),
    ));

    // ---- ShardedTensor ----
    v.push(bad_meta(
        "shard_rank_mismatch",
        "A ShardedTensor whose global shard 1 has 1 offset for a 2-dim global size.",
        &with_sharded(|_, g| g.shards[1].offsets = vec![2]),
    ));
    v.push(bad_meta(
        "shard_out_of_bounds",
        "A ShardedTensor whose global shard 3 spans rows 6..10 of 8.",
        &with_sharded(|_, g| g.shards[3].sizes = vec![4, 4]),
    ));
    v.push(bad_meta(
        "shard_offset_overflow",
        "A ShardedTensor whose global shard 3 has offset 2^64 − 1 in dim 0 (offset + size overflows).",
        &with_sharded(|_, g| g.shards[3].offsets = vec![u64::MAX, 0]),
    ));
    v.push(bad_meta(
        "bad_placement",
        "A ShardedTensor shard placed at \"cuda:1\" (not \"rank:N/device\").",
        &with_sharded(|_, g| g.shards[1].placement = "cuda:1".into()),
    ));
    for (name, placement, description) in [
        (
            "bad_placement_uppercase",
            "RANK:1/cuda:1",
            "A ShardedTensor shard placed at \"RANK:1/cuda:1\": the prefix \"rank:\" is lowercase and case-sensitive.",
        ),
        (
            "bad_placement_empty_rank",
            "rank:/cuda:1",
            "A ShardedTensor shard placed at \"rank:/cuda:1\": the rank has at least one digit (JavaScript's Number(\"\") would be 0).",
        ),
        (
            "bad_placement_sign",
            "rank:+1/cuda:1",
            "A ShardedTensor shard placed at \"rank:+1/cuda:1\": the rank is ASCII digits only, no sign (Rust's and Python's integer parsers take \"+1\").",
        ),
        (
            "bad_placement_space",
            "rank: 1/cuda:1",
            "A ShardedTensor shard placed at \"rank: 1/cuda:1\": no spaces (Python's int() takes \" 1\").",
        ),
        (
            "bad_placement_underscore",
            "rank:1_0/cuda:1",
            "A ShardedTensor shard placed at \"rank:1_0/cuda:1\": ASCII digits only (Python's int() takes \"1_0\" as 10).",
        ),
        (
            "bad_placement_unicode_digit",
            "rank:\u{661}/cuda:1",
            "A ShardedTensor shard placed at \"rank:\u{661}/cuda:1\" (U+0661 ARABIC-INDIC DIGIT ONE, bytes D9 A1): ASCII digits only (Python's int() and str.isdigit() take it).",
        ),
        (
            "bad_placement_rank_overflow",
            "rank:18446744073709551616/cuda:1",
            "A ShardedTensor shard placed at \"rank:18446744073709551616/cuda:1\": the rank is a u64 and 2^64 overflows it.",
        ),
        (
            "bad_placement_empty_device",
            "rank:1/",
            "A ShardedTensor shard placed at \"rank:1/\": the device after the first '/' is not empty.",
        ),
    ] {
        v.push(bad_meta(
            name,
            description,
            &with_sharded(|_, g| g.shards[1].placement = placement.into()),
        ));
    }
    v.push(bad_meta(
        "sharded_order_layouts_first",
        "A ShardedTensor whose local shard 1 has stride [1] for shape [2, 4] and whose global shard 0 is placed at \"cuda:0\": every local shard's layout is checked before the global shards, so StrideRankMismatch, not BadPlacement.",
        &with_sharded(|l, g| {
            l[1].layout.stride = vec![1];
            g.shards[0].placement = "cuda:0".into();
        }),
    ));
    v.push(bad_meta(
        "sharded_order_shard_dims",
        "A ShardedTensor whose global shard 1 has offsets [7, 2^64 − 1], sizes [2, 4] and placement \"RANK:1/cuda:1\": a shard's dims are checked in order, each for overflow then bounds, and the placement last, so dim 0's end 9 > 8 gives ShardOutOfBounds, not LayoutOverflow (dim 1) or BadPlacement.",
        &with_sharded(|_, g| {
            g.shards[1].offsets = vec![7, u64::MAX];
            g.shards[1].placement = "RANK:1/cuda:1".into();
        }),
    ));
    v.push(bad_meta(
        "sharded_order_global_before_local",
        "A ShardedTensor whose local shard 0 holds a [2, 2] tensor for sizes [2, 4] and whose global shard 3 is placed at \"cuda:1\": every global shard is checked before any local shard's metadata, so BadPlacement, not LocalShapeMismatch.",
        &with_sharded(|l, g| {
            l[0].layout = TensorLayout::contiguous(DType::Float32, &[2, 2]);
            g.shards[3].placement = "cuda:1".into();
        }),
    ));
    v.push(bad_meta(
        "sharded_order_local_checks",
        "A float32 ShardedTensor whose local shard 0 is a float16 [2, 4] tensor at offsets [1, 0] (no global shard is there) and whose local shard 1 holds a [2, 2] tensor for sizes [2, 4]: all of a local shard's checks (metadata, shape, dtype, membership) run before the next shard's, so local shard 0's DTypeMismatch, not ShardNotInGlobal or local shard 1's LocalShapeMismatch.",
        &with_sharded(|l, _| {
            l[0].layout = TensorLayout::contiguous(DType::Float16, &[2, 4]);
            l[0].meta.offsets = vec![1, 0];
            l[1].layout = TensorLayout::contiguous(DType::Float32, &[2, 2]);
        }),
    ));
    v.push(bad_meta(
        "shard_not_in_global",
        "A local shard at offsets [1, 0] that the global shard list does not have.",
        &with_sharded(|l, g| {
            l[1].meta.offsets = vec![1, 0];
            let _ = g;
        }),
    ));
    v.push(bad_meta(
        "sharded_local_shape_mismatch",
        "A local shard whose tensor is [2, 2] while its metadata says [2, 4].",
        &with_sharded(|l, _| l[0].layout = TensorLayout::contiguous(DType::Float32, &[2, 2])),
    ));
    v.push(bad_meta(
        "sharded_dtype_mismatch",
        "A local shard of dtype float16 in a float32 ShardedTensor.",
        &with_sharded(|l, _| l[1].layout = TensorLayout::contiguous(DType::Float16, &[2, 4])),
    ));
    v.push(bad_meta(
        "shards_overlap",
        "A ShardedTensor [8, 4] whose global shard 1 starts at row 1 instead of 2: row 1 is in two shards and row 3 in none (the shards' volumes still add up to 32).",
        &with_sharded(|_, g| g.shards[1].offsets = vec![1, 0]),
    ));
    v.push(bad_meta(
        "shards_overlap_volume",
        "A ShardedTensor [8, 4] whose global shard 3 spans rows 5..8: the shards hold 36 elements of 32.",
        &with_sharded(|_, g| {
            g.shards[3].offsets = vec![5, 0];
            g.shards[3].sizes = vec![3, 4];
        }),
    ));
    v.push(bad_meta(
        "shards_do_not_cover",
        "A ShardedTensor [8, 4] without its global shard at rows 2..4: the shards hold 24 elements of 32.",
        &with_sharded(|_, g| {
            g.shards.remove(1);
        }),
    ));
    v.push(bad_meta(
        "sharding_too_complex",
        "A ShardedTensor [2, 130] tiled like bricks: row 0 in 65 shards of [1, 2], row 1 in shards of [1, 1], 64 × [1, 2], [1, 1]. Split along both dims into more than 64 shards that lie on no grid.",
        &with_sharded(|_, g| {
            g.global_size = vec![2, 130];
            g.shards = (0..65)
                .map(|i| shard_meta(&[0, 2 * i], &[1, 2], "rank:0/cuda:0"))
                .chain([shard_meta(&[1, 0], &[1, 1], "rank:1/cuda:1")])
                .chain((0..64).map(|i| shard_meta(&[1, 1 + 2 * i], &[1, 2], "rank:1/cuda:1")))
                .chain([shard_meta(&[1, 129], &[1, 1], "rank:1/cuda:1")])
                .collect();
        }),
    ));
    v.push(bad_meta(
        "sharded_volume_overflow",
        "A ShardedTensor whose global size [2^32, 2^32] has more than 2^64 − 1 elements (its shards fit inside it).",
        &with_sharded(|_, g| g.global_size = vec![1 << 32, 1 << 32]),
    ));

    // ---- plan and ranks ----
    v.push(bad_meta(
        "bad_chunk_size",
        "chunk_size 100 (not a multiple of 64).",
        &Metadata {
            plan: plan(FanOut::Chain, 64, 100),
            ..base()
        },
    ));
    v.push(bad_meta(
        "chunk_size_too_large",
        "chunk_size 2^30 + 64 (over the 2^30 maximum).",
        &Metadata {
            plan: plan(FanOut::Chain, 64, (1 << 30) + 64),
            ..base()
        },
    ));
    v.push(bad_meta(
        "bad_bucket_size",
        "bucket_size 2048 over chunk_size 1024.",
        &Metadata {
            plan: plan(FanOut::Direct, 2048, 1024),
            ..base()
        },
    ));
    v.push(bad_meta(
        "no_destinations",
        "An empty destination list.",
        &Metadata {
            destinations: vec![],
            ..base()
        },
    ));
    v.push(bad_meta(
        "duplicate_destination",
        "Destinations [1, 2, 1].",
        &Metadata {
            destinations: vec![1, 2, 1],
            ..base()
        },
    ));
    v.push(bad_meta(
        "source_is_destination",
        "Source 1 with destinations [2, 1].",
        &Metadata {
            source: 1,
            destinations: vec![2, 1],
            ..base()
        },
    ));
    v
}

/// Valid vectors at a limit's edge (accepted with default limits).
fn valid_limit_cases() -> Vec<(&'static str, &'static str, Metadata, bool)> {
    vec![
        (
            "tree_at_max_depth",
            "64 nested single-element lists around one value leaf: exactly the default max_depth, accepted (compare tree_too_deep).",
            metadata(
                None,
                0,
                &[1],
                PlanParams::default(),
                std::iter::repeat_n(Node::List(1), 64)
                    .chain([Node::Leaf])
                    .collect(),
                vec![Leaf::Value(Value::None)],
            ),
            false,
        ),
        (
            "chunk_limits",
            "chunk_size 2^30 (the maximum) and bucket_size 0 (nothing is bucketed): a 100-byte tensor goes alone in one chunk.",
            Metadata {
                plan: plan(FanOut::Chain, 0, 1 << 30),
                ..one_tensor(TensorLayout::contiguous(DType::UInt8, &[100]))
            },
            false,
        ),
        (
            "zero_size_huge_dims",
            "A float32 tensor of shape [2^32, 2^32, 0], stride [2^32, 1, 1], in a 0-byte storage: multiplying the dims in order overflows before the 0 is reached, but the element count is the true product, 0, so the layout is valid (not LayoutOverflow; compare layout_overflow).",
            one_tensor(view(DType::Float32, &[1 << 32, 1 << 32, 0], &[1 << 32, 1, 1], 0, 0)),
            false,
        ),
    ]
}

fn malformed_vector(b: Bad) -> Vector {
    let limits = b.limits.unwrap_or_default();
    let err = Header::parse(&b.header, &limits)
        .and_then(|h| codec::decode(&h, &b.meta, &limits))
        .err()
        .unwrap_or_else(|| panic!("malformed vector {} decodes", b.name));
    let mut e = entry(b.name, Kind::Malformed, b.description);
    e["header_len"] = Json::from(b.header.len());
    e["error"] = Json::from(err.name());
    e["error_debug"] = Json::from(format!("{err:?}"));
    if let Some(l) = b.limits {
        e["limits"] = limits_json(&l);
    }
    Vector {
        name: b.name.into(),
        kind: Kind::Malformed,
        description: b.description.into(),
        bytes: file(&b.header, &b.meta),
        entry: e,
    }
}

fn options_json(o: &ReceiverOptions) -> Json {
    json!({"rank": o.rank, "source": o.source, "expected_step": o.expected_step.map(uint)})
}

/// Receiver options as in `options_json` (default limits).
pub fn options_from_json(j: &Json) -> Option<ReceiverOptions> {
    Some(ReceiverOptions {
        rank: u32::try_from(j.get("rank")?.as_u64()?).ok()?,
        source: u32::try_from(j.get("source")?.as_u64()?).ok()?,
        expected_step: match j.get("expected_step")? {
            Json::Null => None,
            v => Some(json_u64(v)?),
        },
        limits: Limits::default(),
    })
}

fn receiver_reject_cases() -> Vec<(&'static str, &'static str, Metadata, ReceiverOptions)> {
    let opts = |rank, source, expected_step| ReceiverOptions {
        rank,
        source,
        expected_step,
        limits: Limits::default(),
    };
    let stepped = Metadata {
        step: Some(9),
        ..base()
    };
    vec![
        (
            "not_a_destination",
            "The base metadata (0 → [1]) received by rank 5.",
            base(),
            opts(5, 0, None),
        ),
        (
            "unexpected_source",
            "The base metadata (source 0) received by rank 1 expecting source 7 (the header and metadata come from rank 7's channel but name source 0).",
            base(),
            opts(1, 7, None),
        ),
        (
            "step_mismatch",
            "Metadata of step 9 received by a receiver expecting step 10.",
            stepped.clone(),
            opts(1, 0, Some(10)),
        ),
        (
            "receiver_checks_source_first",
            "Metadata of step 9 from source 0 to [1], received by rank 5 expecting source 7 and step 10: source, step and destination are all wrong, and the source is checked first (UnexpectedSource).",
            stepped.clone(),
            opts(5, 7, Some(10)),
        ),
        (
            "receiver_checks_step_before_rank",
            "Metadata of step 9 from source 0 to [1], received by rank 5 expecting source 0 and step 10: step and destination are wrong, and the step is checked before the destination (StepMismatch).",
            stepped,
            opts(5, 0, Some(10)),
        ),
    ]
}

fn receiver_reject_vector(
    name: &str,
    description: &str,
    m: Metadata,
    options: ReceiverOptions,
) -> Vector {
    let postcard = spec::metadata(&m);
    let header = header_for(0, &postcard).to_bytes();
    let meta = message(&postcard);
    let mut rx = pgt_core::receiver::Receiver::new(options);
    let err = rx
        .handle_header(&header)
        .and_then(|()| rx.handle_metadata(&meta))
        .expect_err("receiver rejects");
    let manifest = codec::decode(
        &Header::parse(&header, &Limits::default()).expect("header parses"),
        &meta,
        &Limits::default(),
    )
    .expect("receiver_reject metadata is valid");
    let mut e = entry(name, Kind::ReceiverReject, description);
    e["header_len"] = Json::from(Header::SIZE);
    e["manifest"] = summary(&header_for(0, &postcard), &manifest);
    e["receiver"] = options_json(&options);
    e["error"] = Json::from(err.name());
    e["error_debug"] = Json::from(format!("{err:?}"));
    Vector {
        name: name.into(),
        kind: Kind::ReceiverReject,
        description: description.into(),
        bytes: file(&header, &meta),
        entry: e,
    }
}

// ---------------------------------------------------------------------------------------------------
// Streams.

/// A stream case: name, description, metadata, digests, the receiving rank whose stream is recorded.
pub struct StreamCase {
    /// File stem.
    pub name: &'static str,
    /// What it shows.
    pub description: &'static str,
    /// The transfer.
    pub metadata: Metadata,
    /// Digest trailer on.
    pub digests: bool,
    /// The rank whose incoming messages the file holds.
    pub rank: u32,
}

impl StreamCase {
    /// The options of the receiver whose messages the file holds (default limits).
    pub fn receiver_options(&self) -> ReceiverOptions {
        ReceiverOptions {
            rank: self.rank,
            source: self.metadata.source,
            expected_step: None,
            limits: Limits::default(),
        }
    }
}

impl std::fmt::Debug for StreamCase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamCase")
            .field("name", &self.name)
            .finish()
    }
}

/// The stream cases.
pub fn stream_cases() -> Vec<StreamCase> {
    let (local_shards, global) = sharded_leaf();
    let dt_local = TensorLayout::contiguous(DType::Float32, &[4, 3]);
    vec![
        StreamCase {
            name: "stream_small",
            description: "2 tensors, Direct 0 → [1], no digests, bucket 32, chunk 64: \"bias\" float32 [4] (16 B) goes in a bucket, \"weight\" float32 [5, 8] (160 B) in 3 chunks of 64, 64, 32 bytes.",
            metadata: metadata(
                Some(3),
                0,
                &[1],
                plan(FanOut::Direct, 32, 64),
                vec![dict(&["weight", "bias", "lr"]), Node::Leaf, Node::Leaf, Node::Leaf],
                vec![
                    tensor(DType::Float32, &[5, 8]),
                    tensor(DType::Float32, &[4]),
                    Leaf::Value(Value::Float(0.5)),
                ],
            ),
            digests: false,
            rank: 1,
        },
        StreamCase {
            name: "stream_direct_digests",
            description: "Direct 0 → [1, 2] (rank 1's stream), digests on, bucket 48, chunk 64: weight float32 [5,8] = 160 B in 3 chunks; bias float32 [8] (32 B) + scale bfloat16 [4] (8 B) share a bucket; mask bool [16] (16 B) would overflow it and starts the next; empty float32 [0] (0 B) sends nothing but has a trailer entry (XXH3 of nothing).",
            metadata: metadata(
                Some(42),
                0,
                &[1, 2],
                plan(FanOut::Direct, 48, 64),
                vec![
                    dict(&["layer", "scale", "mask", "empty", "step"]),
                    dict(&["weight", "bias"]),
                    Node::Leaf,
                    Node::Leaf,
                    Node::Leaf,
                    Node::Leaf,
                    Node::Leaf,
                    Node::Leaf,
                ],
                vec![
                    tensor(DType::Float32, &[5, 8]),
                    tensor(DType::Float32, &[8]),
                    tensor(DType::BFloat16, &[4]),
                    tensor(DType::Bool, &[16]),
                    tensor(DType::Float32, &[0]),
                    Leaf::Value(Value::Int(42)),
                ],
            ),
            digests: true,
            rank: 1,
        },
        StreamCase {
            name: "stream_chain",
            description: "Chain 0 → [1, 2], the stream of rank 2 (the chain's end): header and metadata from rank 0, data and trailer forwarded by rank 1. Digests on, bucket 64, chunk 64: a ShardedTensor's 2 local shards (32 B each) fill one bucket, a DTensor's local float32 [4,3] (48 B) the next, a float16 [40] (80 B) goes in chunks of 64 and 16. Rank 2 places its local shards at rank:2/cpu; the global metadata stays as sent.",
            metadata: metadata(
                None,
                0,
                &[1, 2],
                plan(FanOut::Chain, 64, 64),
                vec![dict(&["emb", "w", "head"]), Node::Leaf, Node::Leaf, Node::Leaf],
                vec![
                    Leaf::Sharded { local_shards, global },
                    Leaf::DTensor {
                        local: dt_local,
                        spec: dtensor_leaf().1,
                    },
                    tensor(DType::Float16, &[40]),
                ],
            ),
            digests: true,
            rank: 2,
        },
        StreamCase {
            name: "stream_sharded_placements",
            description: "What a receiver rewrites in a ShardedTensor, Direct 0 → [2] (rank 2's stream), digests on, default plan. float32 [6, 4]; global shards [0,0]+[2,4] at \"rank:000/cuda:0\", [0,0]+[0,4] at \"rank:18446744073709551615/cuda:3\" (a zero-size shard at the same offsets as the first), [2,0]+[2,4] at \"rank:1/node-a/cuda:1\", [4,0]+[2,4] at \"rank:0/cpu\"; the sender holds 3 local shards (32 B each): [0,0]+[2,4] at \"rank:0/cuda:0\", [2,0]+[2,4] at \"rank:01/node-a/cuda:1\", [4,0]+[2,4] at \"rank:0/cuda:0\". Leading zeros and a '/' in the device are valid. As torch's PGTransport, rank 2 keeps the global metadata as sent (every placement unchanged) and places each local shard at \"rank:2/cpu\" (the receiver's rank and the device type the bytes landed on), whatever the sender's device.",
            metadata: metadata(
                None,
                0,
                &[2],
                plan(FanOut::Direct, 1 << 20, 4 << 20),
                vec![dict(&["table"]), Node::Leaf],
                vec![placements_leaf()],
            ),
            digests: true,
            rank: 2,
        },
    ]
}

/// The ShardedTensor of `stream_sharded_placements`.
fn placements_leaf() -> Leaf {
    let global = ShardedTensorMetadata {
        shards: vec![
            shard_meta(&[0, 0], &[2, 4], "rank:000/cuda:0"),
            shard_meta(&[0, 0], &[0, 4], "rank:18446744073709551615/cuda:3"),
            shard_meta(&[2, 0], &[2, 4], "rank:1/node-a/cuda:1"),
            shard_meta(&[4, 0], &[2, 4], "rank:0/cpu"),
        ],
        global_size: vec![6, 4],
        dtype: DType::Float32,
    };
    let local = |offsets: &[u64], placement: &str| LocalShard {
        layout: TensorLayout::contiguous(DType::Float32, &[2, 4]),
        meta: shard_meta(offsets, &[2, 4], placement),
    };
    Leaf::Sharded {
        local_shards: vec![
            local(&[0, 0], "rank:0/cuda:0"),
            local(&[2, 0], "rank:01/node-a/cuda:1"),
            local(&[4, 0], "rank:0/cuda:0"),
        ],
        global,
    }
}

fn pattern_text() -> &'static str {
    "byte i of storage s (storage order, wire bytes) = (17*s + i) mod 256"
}

/// Builds a stream case's vector and the wire messages of its recorded rank.
fn stream_vector(c: &StreamCase) -> (Vector, Vec<Wire>) {
    let manifest = Manifest::new(c.metadata.clone(), c.digests, &Limits::default())
        .expect("stream metadata is valid");
    let storages = host::pattern_storages(&manifest);
    let runs = host::simulate(&c.metadata, c.digests, &storages).expect("simulated transfer");
    let (_, outcome) = runs
        .into_iter()
        .find(|(r, _)| *r == c.rank)
        .expect("recorded rank is a destination");
    assert_eq!(
        outcome.storages, storages,
        "received bytes equal the pattern"
    );
    let (header, _) = codec::encode(&manifest, TRANSFER_ID).expect("encodes");
    let plan = manifest.plan(header.metadata_len);
    let records: Vec<Json> = outcome
        .consumed
        .iter()
        .zip(plan.messages())
        .map(|(w, m)| {
            assert_eq!(w.tag, m.tag);
            json!({"tag": uint(w.tag), "kind": kind_name(m.kind), "len": w.bytes.len(), "from": w.from})
        })
        .collect();
    let received = &outcome.received;
    let result = json!({
        "leaves": received.leaves.iter().map(leaf_json).collect::<Vec<_>>(),
        "storages": manifest
            .storages()
            .iter()
            .enumerate()
            .map(|(i, s)| json!({
                "index": i,
                "path": manifest.paths()[s.leaf as usize].to_string(),
                "nbytes": uint(s.nbytes),
                "digest": hex64(digest(&storages[i])),
            }))
            .collect::<Vec<_>>(),
    });
    let options = c.receiver_options();
    let mut e = entry(c.name, Kind::Stream, c.description);
    e["receiver"] = options_json(&options);
    e["manifest"] = summary(&header, &manifest);
    e["records"] = Json::Array(records);
    e["pattern"] = Json::from(pattern_text());
    e["result"] = result;
    let vector = Vector {
        name: c.name.into(),
        kind: Kind::Stream,
        description: c.description.into(),
        bytes: host::encode_stream(&outcome.consumed),
        entry: e,
    };
    (vector, outcome.consumed)
}

fn malformed_stream_vector(
    name: &str,
    description: &str,
    wires: &[Wire],
    receiver: ReceiverOptions,
) -> Vector {
    let records: Vec<(u64, Vec<u8>)> = wires.iter().map(|w| (w.tag, w.bytes.clone())).collect();
    let err = run_stream(receiver, &records).expect_err("malformed stream is rejected");
    let mut e = entry(name, Kind::MalformedStream, description);
    e["receiver"] = options_json(&receiver);
    e["pattern"] = Json::from(pattern_text());
    let (name_, debug) = match &err {
        host::HostError::Core(err) => (err.name(), format!("{err:?}")),
        other => panic!("malformed stream {name} fails in the host: {other:?}"),
    };
    e["error"] = Json::from(name_);
    e["error_debug"] = Json::from(debug);
    Vector {
        name: name.into(),
        kind: Kind::MalformedStream,
        description: description.into(),
        bytes: host::encode_stream(wires),
        entry: e,
    }
}

fn host_reject_stream_vector(
    name: &str,
    description: &str,
    wires: &[Wire],
    receiver: ReceiverOptions,
) -> Vector {
    let records: Vec<(u64, Vec<u8>)> = wires.iter().map(|w| (w.tag, w.bytes.clone())).collect();
    let err = run_stream(receiver, &records).expect_err("the host refuses the stream");
    let host_error = host_error_json(&err)
        .unwrap_or_else(|| panic!("stream {name} fails with {err:?}, not a host refusal"));
    let mut e = entry(name, Kind::HostRejectStream, description);
    e["receiver"] = options_json(&receiver);
    e["pattern"] = Json::from(pattern_text());
    e["host_error"] = host_error;
    Vector {
        name: name.into(),
        kind: Kind::HostRejectStream,
        description: description.into(),
        bytes: host::encode_stream(wires),
        entry: e,
    }
}

/// A host's refusal as in a `host_reject_stream` entry's `host_error`; `None` for other errors.
pub fn host_error_json(e: &host::HostError) -> Option<Json> {
    match *e {
        host::HostError::Length {
            from,
            tag,
            expected,
            got,
        } => Some(json!({
            "reason": "length",
            "from": from,
            "tag": uint(tag),
            "expected": uint(expected),
            "got": uint(got),
        })),
        host::HostError::Missing { from, tag } => {
            Some(json!({"reason": "missing", "from": from, "tag": uint(tag)}))
        }
        _ => None,
    }
}

/// Feeds stream records, in order, to a receiver: each receive takes the next record. A record with
/// another tag than the one asked for is not that message, which then never comes
/// ([`host::HostError::Missing`]), as for a host that matches messages on their tag.
pub fn run_stream(
    options: ReceiverOptions,
    records: &[(u64, Vec<u8>)],
) -> Result<host::Outcome, host::HostError> {
    let mut it = records.iter();
    let r = host::run_receiver(options, |_, tag| {
        let (t, bytes) = it.next()?;
        (*t == tag).then(|| bytes.clone())
    });
    let outcome = r?;
    if it.next().is_some() {
        return Err(host::HostError::Host("records left over".into()));
    }
    Ok(outcome)
}

// ---------------------------------------------------------------------------------------------------
// All of it.

/// Every vector, in index order.
pub fn vectors() -> Vec<Vector> {
    let mut out = Vec::new();
    for (name, description, m, digests) in valid_cases().into_iter().chain(valid_limit_cases()) {
        out.push(
            valid_vector(name, description, m, digests)
                .unwrap_or_else(|e| panic!("valid vector {name}: {e}")),
        );
    }
    let mut direct_digests = None;
    for c in stream_cases() {
        let (v, wires) = stream_vector(&c);
        if c.name == "stream_direct_digests" {
            direct_digests = Some((wires, c.receiver_options(), v.entry["result"].clone()));
        }
        out.push(v);
    }
    let (direct_digests, receiver, result) = direct_digests.expect("stream_direct_digests exists");
    out.push(stale_stream_vector(&direct_digests, receiver, &result));
    let mut flipped = direct_digests.clone();
    // Data message 1 (tag 4): its 8-byte prefix, then bytes 64..128 of storage 0.
    flipped[3].bytes[18] ^= 0x01;
    out.push(malformed_stream_vector(
        "stream_digest_mismatch",
        "stream_direct_digests with one bit flipped in data message tag 4 (storage 0 \"layer.weight\", byte 74): the trailer's digest of storage 0 does not match.",
        &flipped,
        receiver,
    ));
    let mut short = direct_digests.clone();
    let last = short.len() - 1;
    short[last].bytes.truncate(48);
    out.push(malformed_stream_vector(
        "stream_trailer_length",
        "stream_direct_digests with the trailer cut to 48 bytes (prefix, metadata digest and 5 storage digests need 56).",
        &short,
        receiver,
    ));
    let mut long_trailer = direct_digests.clone();
    long_trailer[last].bytes.extend_from_slice(&[0; 8]);
    out.push(malformed_stream_vector(
        "stream_trailer_long",
        "stream_direct_digests with 8 zero bytes after the trailer (64 bytes; it must be 56): a longer trailer is TrailerLength too, for a host that hands the core what arrived (pgt-host's process group refuses it before: PROTOCOL.md §12).",
        &long_trailer,
        receiver,
    ));
    let mut other_metadata = direct_digests.clone();
    other_metadata[last].bytes[8] ^= 0x01;
    out.push(malformed_stream_vector(
        "stream_trailer_metadata_digest",
        "stream_direct_digests with one bit flipped in the trailer's copy of the metadata digest (bytes 8..16, after the prefix): the trailer does not belong to this transfer's metadata.",
        &other_metadata,
        receiver,
    ));
    let mut several = direct_digests.clone();
    several[6].bytes[8] ^= 0x01; // data message 4 (tag 7): storage 3 "mask", byte 0
    several[last].bytes[16 + 8] ^= 0x01; // the trailer's digest of storage 1 "layer.bias"
    several[last].bytes[16 + 32] ^= 0x01; // the trailer's digest of storage 4 "empty" (0 bytes)
    out.push(malformed_stream_vector(
        "stream_digest_mismatch_several",
        "stream_direct_digests with storages 1, 3 and 4 mismatching: one bit flipped in data message tag 7 (storage 3 \"mask\", byte 0) and in the trailer's digests of storage 1 \"layer.bias\" and storage 4 \"empty\" (0 bytes). The error names the lowest mismatching storage, 1.",
        &several,
        receiver,
    ));
    let mut data_short = direct_digests.clone();
    data_short[3].bytes.truncate(71);
    out.push(host_reject_stream_vector(
        "stream_data_short",
        "stream_direct_digests with data message tag 4 cut to 71 bytes (the plan says 72: the prefix and 64 storage bytes). The host must refuse it: pgt-core hands out the expected length and only learns that a data message landed.",
        &data_short,
        receiver,
    ));
    let mut data_long = direct_digests.clone();
    data_long[5].bytes.push(0);
    out.push(host_reject_stream_vector(
        "stream_data_long",
        "stream_direct_digests with a zero byte after data message tag 6 (49 bytes; the plan says 48): the host must refuse it.",
        &data_long,
        receiver,
    ));
    let mut wrong_tag = direct_digests.clone();
    wrong_tag[3].tag = 9;
    out.push(host_reject_stream_vector(
        "stream_wrong_tag",
        "stream_direct_digests with data message tag 4 sent with tag 9 (this transfer's tags are 1 to 8): it is not the message the receiver waits for, and tag 4 never comes.",
        &wrong_tag,
        receiver,
    ));
    let mut no_trailer = direct_digests.clone();
    no_trailer.pop();
    out.push(host_reject_stream_vector(
        "stream_missing_trailer",
        "stream_direct_digests without its trailer: the header's flag bit 0 announces one (tag 8), so the receiver waits for it.",
        &no_trailer,
        receiver,
    ));
    for b in bad_cases() {
        out.push(malformed_vector(b));
    }
    for (name, description, m, options) in receiver_reject_cases() {
        out.push(receiver_reject_vector(name, description, m, options));
    }
    out
}

/// `stream_direct_digests` (rank 1's `wires`) with four messages of another transfer (prefix
/// [`OTHER_TRANSFER_ID`]) each just before this transfer's message with the same tag: a metadata
/// message and a data message of other lengths, a data message and a trailer of the same lengths.
fn stale_stream_vector(wires: &[Wire], receiver: ReceiverOptions, result: &Json) -> Vector {
    let other = header::prefix(OTHER_TRANSFER_ID);
    let restamp = |w: &Wire, body: Vec<u8>| Wire {
        bytes: [&other[..], &body].concat(),
        ..w.clone()
    };
    let flipped = |w: &Wire| w.bytes[8..].iter().map(|b| b ^ 0xFF).collect::<Vec<u8>>();
    // Another metadata message (stream_small's), 16 bytes of another data message, and this
    // transfer's data message 1 and trailer with every byte after the prefix flipped.
    let small = stream_cases().remove(0).metadata;
    let stale = [
        (1, restamp(&wires[1], spec::metadata(&small))),
        (2, restamp(&wires[2], vec![0xEE; 16])),
        (3, restamp(&wires[3], flipped(&wires[3]))),
        (
            wires.len() - 1,
            restamp(&wires[wires.len() - 1], flipped(&wires[wires.len() - 1])),
        ),
    ];
    let mut records: Vec<(Wire, bool)> = Vec::new();
    for (i, w) in wires.iter().enumerate() {
        if let Some((_, s)) = stale.iter().find(|(at, _)| *at == i) {
            records.push((s.clone(), true));
        }
        records.push((w.clone(), false));
    }
    let recs: Vec<(u64, Vec<u8>)> = records
        .iter()
        .map(|(w, _)| (w.tag, w.bytes.clone()))
        .collect();
    let outcome = run_stream(receiver, &recs).expect("a stale stream is received");
    assert_eq!(
        outcome.skipped,
        stale.len(),
        "every stale record is skipped"
    );
    let name = "stream_stale_skipped";
    let len = |i: usize| stale[i].1.bytes.len();
    let description = format!(
        "stream_direct_digests (rank 1) with a message of another transfer (prefix 0xfedcba9876543210, bytes 10 32 54 76 98 ba dc fe) just before four of its own, under the same tag: before the metadata, another transfer's metadata message (stream_small's, {} bytes; this one's is {}); before data message tag 3, {} bytes (this one's is {}); before tag 4 and before the trailer, messages of the same lengths as this transfer's (their bytes after the prefix flipped). A receiver skips each by its prefix and receives stream_direct_digests' result.",
        len(0),
        wires[1].bytes.len(),
        len(1),
        wires[2].bytes.len()
    );
    let mut e = entry(name, Kind::StaleStream, &description);
    e["receiver"] = options_json(&receiver);
    e["records"] = Json::Array(
        records
            .iter()
            .map(|(w, stale)| json!({"tag": uint(w.tag), "len": w.bytes.len(), "from": w.from, "stale": stale}))
            .collect(),
    );
    e["pattern"] = Json::from(pattern_text());
    e["result"] = result.clone();
    Vector {
        name: name.into(),
        kind: Kind::StaleStream,
        description,
        bytes: host::encode_stream(&records.into_iter().map(|(w, _)| w).collect::<Vec<_>>()),
        entry: e,
    }
}

/// `index.json` for `vectors`.
pub fn index(vectors: &[Vector]) -> String {
    let doc = json!({
        "format": 1,
        "protocol_version": header::VERSION,
        "default_limits": limits_json(&Limits::default()),
        "generator": "cargo run -p pgt-tests --bin gen-vectors",
        "vectors": vectors.iter().map(|v| v.entry.clone()).collect::<Vec<_>>(),
    });
    json::to_string(&doc)
}

/// `README.md` for `vectors`.
pub fn readme(vectors: &[Vector]) -> String {
    let mut out = String::from(README_HEAD);
    for kind in [
        Kind::ValidMetadata,
        Kind::Stream,
        Kind::StaleStream,
        Kind::MalformedStream,
        Kind::HostRejectStream,
        Kind::Malformed,
        Kind::ReceiverReject,
    ] {
        out.push_str(&format!("\n### {}\n\n", kind.name()));
        let with_error = !matches!(kind, Kind::ValidMetadata | Kind::Stream | Kind::StaleStream);
        if with_error {
            out.push_str("| file | error | contents |\n|---|---|---|\n");
        } else {
            out.push_str("| file | contents |\n|---|---|\n");
        }
        for v in vectors.iter().filter(|v| v.kind == kind) {
            let desc = v.description.replace('|', "\\|");
            if with_error {
                let err = match v.entry.get("host_error") {
                    // Fixed key order: serde_json's own order depends on its features.
                    Some(h) => ["reason", "from", "tag", "expected", "got"]
                        .iter()
                        .filter_map(|k| Some(format!("{k}: {}", h.get(*k)?)))
                        .collect::<Vec<_>>()
                        .join(", "),
                    None => v.entry["error_debug"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                };
                out.push_str(&format!("| `{}.bin` | `{}` | {} |\n", v.name, err, desc));
            } else {
                out.push_str(&format!("| `{}.bin` | {} |\n", v.name, desc));
            }
        }
    }
    out
}

/// Every file of `tests/vectors/`: `(file name, bytes)`.
pub fn files() -> Vec<(String, Vec<u8>)> {
    let vectors = vectors();
    let mut out: Vec<(String, Vec<u8>)> = vectors
        .iter()
        .map(|v| (format!("{}.bin", v.name), v.bytes.clone()))
        .collect();
    out.push(("index.json".into(), index(&vectors).into_bytes()));
    out.push(("README.md".into(), readme(&vectors).into_bytes()));
    out
}

const README_HEAD: &str = r#"# pgt golden vectors

Generated — do not edit by hand. Regenerate with

    cargo run -p pgt-tests --bin gen-vectors

(from the workspace root; it rewrites every file here). `cargo test -p pgt-tests --test vectors` fails
when the files differ from what today's encoder produces, and checks that pgt-core decodes each vector
as `index.json` says. The wire format is specified in `PROTOCOL.md` at the repository root.

## Files

- `index.json` — machine-readable list of every vector (see below).
- `NAME.bin` — one vector each, in one of two layouts:
  - **header + metadata** (kinds `valid_metadata`, `malformed`, `receiver_reject`): the header message
    (`header_len` bytes, 32 except in `header_short`, `header_long` and `version_1_header`) immediately
    followed by the metadata message (the rest of the file: the 8-byte prefix — the transfer id
    `0x0123456789abcdef`, bytes `ef cd ab 89 67 45 23 01` — then the postcard metadata). A decoder parses
    `file[:header_len]` as the header and `file[header_len:]` as the metadata message.
  - **stream** (kinds `stream`, `stale_stream`, `malformed_stream`, `host_reject_stream`): the messages
    one receiver gets, in the order it receives them, each as `tag: u64 LE | len: u64 LE | len bytes`,
    back to back. The first two records are the header (tag 1) and metadata (tag 2) messages (in a
    `stale_stream`, the first record of this transfer with those tags). Every message after the header
    starts with the transfer id.

## index.json

Top level: `format` (1), `protocol_version` (2), `default_limits`, `generator`, and `vectors`, a list of
entries. Object keys are sorted. Integers above 2^53 − 1 are written as decimal strings so that
JavaScript readers stay exact; 64-bit digests are `0x`-prefixed 16-digit hex strings; dtypes are torch
names (`"float32"`).

Every entry has `file`, `kind`, `description`. Then by kind:

- `valid_metadata`: `header_len`, `manifest` — what the vector decodes to: `header` (version, flags,
  metadata_len, metadata_digest, transfer_id), `step`, `source`, `destinations`, `plan` (fanout, bucket_size,
  chunk_size), `digests`, `leaf_count`, `storage_count`, `total_bytes`, `paths` (each leaf's key path as
  displayed, PROTOCOL.md §7: torch's `keystr` form, `['model']['layers'][0]`, `<root>` for the empty
  path),
  `path_elems` (the same paths, structured: `{"key": str}`, `{"int_key": n}` or `{"index": n}`),
  `leaves` (every leaf in full), `storages` (leaf, shard, nbytes, dtype, in wire order) and `messages`
  (the plan: kind, tag, len and the storage segments of every message — `storage`, `offset`, `len`
  and `completes`, true when the segment ends its storage: where a hashing host finishes that
  storage's digest).
- `malformed`: `header_len`, `error` (the `pgt_core::Error` variant name, e.g. `"TreeTooDeep"`) and
  `error_debug` (its Debug form, e.g. `"TreeTooDeep { max: 64 }"`). Decode with `Header::parse` then
  `codec::decode` under `default_limits`, or under the entry's `limits` when it has one.
- `receiver_reject`: like `malformed`, plus `receiver` (`rank`, `source`, `expected_step`) and
  `manifest` (as for `valid_metadata`): the vector decodes and validates, but a receiver with those
  options rejects it in `handle_metadata`.
- `stream`: `receiver` (options of the receiving rank), `manifest` (as above), `records` (tag, kind,
  len, from — the rank that sent it — of every record), `pattern` (the storage contents: byte `i` of
  storage `s` is `(17·s + i) mod 256`), and `result`: the received `leaves` (as the receiver reports
  them: each ShardedTensor local shard placed at `rank:R/cpu`, R the receiving rank, the global metadata
  as sent) and every storage's `path`, `nbytes` and XXH3-64 `digest`. A receiver fed the records in order must end with every storage equal to the
  pattern.
- `stale_stream`: `receiver`, `records` (tag, len, from, and `stale`: true for a message of another
  transfer, whose first 8 bytes are another id), `pattern` and `result` (as for `stream`). A receiver fed
  the records in order must skip every stale one by its prefix — whatever its length — and end as the
  `stream` would: every storage equal to the pattern, every record consumed (PROTOCOL.md §12).
- `malformed_stream`: `receiver`, `pattern`, `error`, `error_debug`: feeding the records in order makes
  the receiver fail with that error.
- `host_reject_stream`: `receiver`, `pattern`, `host_error`: feeding the records in order, the host
  itself must fail the transfer, which pgt-core alone cannot (PROTOCOL.md §12, "Messages that do not
  fit the plan"). `host_error` is `{"reason": "length", "from", "tag", "expected", "got"}` for a data message of
  another length than the plan's, or `{"reason": "missing", "from", "tag"}` for a message the receiver
  waits for that never comes (the records run out, or the next one has another tag: a record with
  another tag is not that message).

## Vectors
"#;
