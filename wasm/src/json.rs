//! JSON forms of pgt values (feature "json"; the JS build returns them, pgt-tests writes the golden
//! vectors' summaries with them): the conventions of
//! `tests/vectors/index.json` (see `tests/vectors/README.md`), so a JS summary compares field for field
//! with a vector's `manifest`:
//! - integers above 2^53 − 1 are decimal strings (JavaScript numbers stay exact);
//! - 64-bit digests and float bits are `0x` + 16 hex digits; byte strings are hex;
//! - dtypes are torch names (`"float32"`), fan-out is `"Chain"` / `"Direct"`, placements `"Shard(0)"`,
//!   `"Replicate"`, `"Partial(Sum)"`.
//!
//! Beyond index.json's manifest, a summary has `tree`: the structure in pre-order, each node `"leaf"`,
//! `{"list": n}`, `{"tuple": n}` or `{"dict": [key…]}` with a key a string or `{"int": n}`. With it a
//! summary is also valid input of [`metadata_from_json`], so `encode(decodeMetadata(h, m))` round-trips.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use pgt_core::dtensor::{DTensorSpec, DeviceMesh, Placement, ReduceOp};
use pgt_core::dtype::DType;
use pgt_core::header::Limits;
use pgt_core::layout::TensorLayout;
use pgt_core::schema::Metadata;
use pgt_core::schema::{FanOut, PlanParams};
use pgt_core::sharded::{LocalShard, ShardMetadata, ShardedTensorMetadata};
use pgt_core::tree::{Key, KeyPath, Leaf, Node, PathElem, Value};
use serde_json::{json, Map, Value as Json};

use pgt_core::header::Header;
use pgt_core::manifest::StorageRef;
use pgt_core::plan::{MessageKind, Plan, Segment};
use pgt_core::receiver::{Binding, Dest};

use crate::types::Summary;

/// Largest integer a JSON reader using IEEE doubles holds exactly.
pub const MAX_SAFE: u64 = (1 << 53) - 1;

/// An unsigned integer: a number up to 2^53 − 1, else a decimal string.
pub fn uint(v: u64) -> Json {
    if v <= MAX_SAFE {
        Json::from(v)
    } else {
        Json::from(v.to_string())
    }
}

/// A signed integer (an i64 key or an i128 value): a number within ±(2^53 − 1), else a decimal
/// string.
pub fn int(v: impl Into<i128>) -> Json {
    let v: i128 = v.into();
    match i64::try_from(v) {
        Ok(small) if v.unsigned_abs() <= u128::from(MAX_SAFE) => Json::from(small),
        _ => Json::from(v.to_string()),
    }
}

/// A list of unsigned integers.
pub fn uints(v: &[u64]) -> Json {
    Json::Array(v.iter().map(|&x| uint(x)).collect())
}

/// A 64-bit value as `0x` and 16 lowercase hex digits.
pub fn hex64(v: u64) -> Json {
    Json::from(format!("0x{v:016x}"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn dtype_json(d: DType) -> Json {
    Json::from(d.torch_name())
}

fn layout_json(l: &TensorLayout) -> Json {
    json!({
        "dtype": dtype_json(l.dtype),
        "shape": uints(&l.shape),
        "stride": uints(&l.stride),
        "storage_offset": uint(l.storage_offset),
        "nbytes": uint(l.nbytes),
    })
}

fn placement_json(p: &Placement) -> Json {
    Json::from(match p {
        Placement::Shard(d) => format!("Shard({d})"),
        Placement::Replicate => "Replicate".into(),
        Placement::Partial(op) => format!("Partial({op:?})"),
    })
}

fn shard_meta_json(s: &ShardMetadata) -> Json {
    json!({
        "offsets": uints(&s.offsets),
        "sizes": uints(&s.sizes),
        "placement": s.placement,
    })
}

fn value_json(v: &Value) -> Json {
    match v {
        Value::None => json!({"type": "none"}),
        Value::Bool(b) => json!({"type": "bool", "value": b}),
        Value::Int(i) => json!({"type": "int", "value": int(*i)}),
        Value::Float(f) => {
            let mut j = json!({"type": "float", "bits": hex64(f.to_bits())});
            if f.is_finite() {
                j["value"] = Json::from(*f);
            }
            j
        }
        Value::Str(s) => json!({"type": "str", "value": s}),
        Value::Bytes(b) => json!({"type": "bytes", "hex": hex(b)}),
    }
}

/// A leaf, as in index.json.
pub fn leaf_json(l: &Leaf) -> Json {
    match l {
        Leaf::Value(v) => json!({"kind": "value", "value": value_json(v)}),
        Leaf::Tensor(t) => json!({"kind": "tensor", "layout": layout_json(t)}),
        Leaf::DTensor { local, spec } => json!({
            "kind": "dtensor",
            "local": layout_json(local),
            "spec": {
                "mesh": {
                    "shape": uints(&spec.mesh.shape),
                    "ranks": uints(&spec.mesh.ranks),
                    "dim_names": spec.mesh.dim_names,
                    "device_type": spec.mesh.device_type,
                },
                "placements": spec.placements.iter().map(placement_json).collect::<Vec<_>>(),
                "global_shape": uints(&spec.global_shape),
                "global_stride": uints(&spec.global_stride),
                "dtype": dtype_json(spec.dtype),
            },
        }),
        Leaf::Sharded {
            local_shards,
            global,
        } => json!({
            "kind": "sharded_tensor",
            "local_shards": local_shards
                .iter()
                .map(|s| json!({"layout": layout_json(&s.layout), "meta": shard_meta_json(&s.meta)}))
                .collect::<Vec<_>>(),
            "global": {
                "shards": global.shards.iter().map(shard_meta_json).collect::<Vec<_>>(),
                "global_size": uints(&global.global_size),
                "dtype": dtype_json(global.dtype),
            },
        }),
    }
}

fn key_json(k: &Key) -> Json {
    match k {
        Key::Str(s) => Json::from(s.as_str()),
        Key::Int(i) => json!({ "int": int(*i) }),
    }
}

/// A tree node (see the module docs).
pub fn node_json(n: &Node) -> Json {
    match n {
        Node::Leaf => Json::from("leaf"),
        Node::List(n) => json!({ "list": uint(*n) }),
        Node::Tuple(n) => json!({ "tuple": uint(*n) }),
        Node::Dict(keys) => json!({ "dict": keys.iter().map(key_json).collect::<Vec<_>>() }),
    }
}

fn path_elems_json(p: &KeyPath) -> Json {
    Json::Array(
        p.0.iter()
            .map(|e| match e {
                PathElem::Key(Key::Str(s)) => json!({ "key": s }),
                PathElem::Key(Key::Int(i)) => json!({ "int_key": int(*i) }),
                PathElem::Index(i) => json!({ "index": uint(*i) }),
            })
            .collect(),
    )
}

/// A message kind's name: `header`, `metadata`, `data`, `trailer`.
pub fn kind_name(k: MessageKind) -> &'static str {
    match k {
        MessageKind::Header => "header",
        MessageKind::Metadata => "metadata",
        MessageKind::Data => "data",
        MessageKind::Trailer => "trailer",
    }
}

/// Segments: `[{storage, offset, len, completes}]`.
pub fn segments_json(s: &[Segment]) -> Json {
    Json::Array(
        s.iter()
            .map(|s| {
                json!({"storage": s.storage, "offset": uint(s.offset), "len": uint(s.len),
                       "completes": s.completes})
            })
            .collect(),
    )
}

fn plan_params_json(p: &PlanParams) -> Json {
    json!({
        "fanout": format!("{:?}", p.fanout),
        "bucket_size": uint(p.bucket_size),
        "chunk_size": uint(p.chunk_size),
    })
}

/// Storages: `[{leaf, shard, nbytes, dtype}]`.
pub fn storages_json(s: &[StorageRef]) -> Json {
    Json::Array(
        s.iter()
            .map(|s| json!({"leaf": s.leaf, "shard": s.shard, "nbytes": uint(s.nbytes), "dtype": dtype_json(s.dtype)}))
            .collect(),
    )
}

/// Key paths as displayed, and structured.
pub fn paths_json(paths: &[KeyPath]) -> Json {
    Json::Array(paths.iter().map(path_elems_json).collect())
}

/// The header's fields.
pub fn header_json(h: &Header) -> Json {
    json!({
        "version": h.version,
        "flags": h.flags,
        "metadata_len": uint(h.metadata_len),
        "metadata_digest": hex64(h.metadata_digest),
        "transfer_id": hex64(h.transfer_id),
    })
}

/// A summary: index.json's `manifest` without `messages`, plus `tree`.
pub fn summary_json(s: &Summary) -> Json {
    json!({
        "header": header_json(&s.header),
        "step": s.step.map(uint),
        "source": s.source,
        "destinations": s.destinations,
        "plan": plan_params_json(&s.plan),
        "digests": s.digests,
        "leaf_count": s.leaves.len(),
        "storage_count": s.storages.len(),
        "total_bytes": uint(s.total_bytes),
        "paths": s.paths,
        "path_elems": paths_json(&s.path_elems),
        "leaves": s.leaves.iter().map(leaf_json).collect::<Vec<_>>(),
        "storages": storages_json(&s.storages),
        "tree": s.tree.iter().map(node_json).collect::<Vec<_>>(),
    })
}

/// The plan: index.json's `messages`.
pub fn plan_json(p: &Plan) -> Json {
    Json::Array(
        p.messages()
            .iter()
            .map(|m| {
                json!({
                    "kind": kind_name(m.kind),
                    "tag": uint(m.tag),
                    "len": uint(m.len),
                    "segments": segments_json(p.segments(m)),
                })
            })
            .collect(),
    )
}

/// Limits: every field.
pub fn limits_json(l: &Limits) -> Json {
    json!({
        "max_metadata_bytes": uint(l.max_metadata_bytes),
        "max_leaves": uint(l.max_leaves),
        "max_depth": l.max_depth,
        "max_ndim": l.max_ndim,
        "max_total_bytes": uint(l.max_total_bytes),
        "max_messages": uint(l.max_messages),
    })
}

/// A binding: `{dest: "fresh" | {in_place: id}, dtype, nbytes, cast_from}`.
pub fn binding_json(b: &Binding) -> Json {
    json!({
        "dest": match b.dest {
            Dest::Fresh => Json::from("fresh"),
            Dest::InPlace(id) => json!({ "in_place": uint(id) }),
        },
        "dtype": dtype_json(b.dtype),
        "nbytes": uint(b.nbytes),
        "cast_from": b.cast_from.map(dtype_json),
    })
}

// ---- parsing ----

type R<T> = Result<T, String>;

fn field<'a>(j: &'a Json, k: &str) -> R<&'a Json> {
    j.get(k).ok_or_else(|| format!("missing field \"{k}\""))
}

/// A u64 from a number or a decimal string.
pub fn as_u64(j: &Json, what: &str) -> R<u64> {
    j.as_u64()
        .or_else(|| j.as_str()?.parse().ok())
        .ok_or_else(|| format!("{what}: expected an unsigned integer (number or decimal string)"))
}

fn as_i64(j: &Json, what: &str) -> R<i64> {
    j.as_i64()
        .or_else(|| j.as_str()?.parse().ok())
        .ok_or_else(|| format!("{what}: expected an integer (number or decimal string)"))
}

/// An int value: a JSON integer, or a decimal string within i128 (−2^127 … 2^127 − 1).
fn as_i128(j: &Json, what: &str) -> R<i128> {
    j.as_i64()
        .map(i128::from)
        .or_else(|| j.as_u64().map(i128::from))
        .or_else(|| j.as_str()?.parse().ok())
        .ok_or_else(|| {
            format!(
                "{what}: expected an integer from -2^127 to 2^127 - 1 (number or decimal string)"
            )
        })
}

fn as_u32(j: &Json, what: &str) -> R<u32> {
    u32::try_from(as_u64(j, what)?).map_err(|_| format!("{what}: larger than 2^32 - 1"))
}

fn u64_field(j: &Json, k: &str) -> R<u64> {
    as_u64(field(j, k)?, k)
}

fn u64s(j: &Json, what: &str) -> R<Vec<u64>> {
    j.as_array()
        .ok_or_else(|| format!("{what}: expected an array"))?
        .iter()
        .map(|x| as_u64(x, what))
        .collect()
}

fn str_field<'a>(j: &'a Json, k: &str) -> R<&'a str> {
    field(j, k)?
        .as_str()
        .ok_or_else(|| format!("{k}: expected a string"))
}

fn array<'a>(j: &'a Json, what: &str) -> R<&'a Vec<Json>> {
    j.as_array()
        .ok_or_else(|| format!("{what}: expected an array"))
}

/// A dtype from its torch name.
pub fn dtype_from(j: &Json) -> R<DType> {
    let name = j.as_str().ok_or("dtype: expected a torch dtype name")?;
    DType::ALL
        .iter()
        .copied()
        .find(|d| d.torch_name() == name)
        .ok_or_else(|| format!("unknown dtype \"{name}\""))
}

fn layout_from(j: &Json) -> R<TensorLayout> {
    Ok(TensorLayout {
        dtype: dtype_from(field(j, "dtype")?)?,
        shape: u64s(field(j, "shape")?, "shape")?,
        stride: u64s(field(j, "stride")?, "stride")?,
        storage_offset: u64_field(j, "storage_offset")?,
        nbytes: u64_field(j, "nbytes")?,
    })
}

fn placement_from(j: &Json) -> R<Placement> {
    let s = j.as_str().ok_or("placement: expected a string")?;
    let inner = |prefix: &str| s.strip_prefix(prefix)?.strip_suffix(')');
    if s == "Replicate" {
        return Ok(Placement::Replicate);
    }
    if let Some(d) = inner("Shard(") {
        return d
            .parse()
            .map(Placement::Shard)
            .map_err(|_| format!("bad placement \"{s}\""));
    }
    let op = match inner("Partial(") {
        Some("Sum") => ReduceOp::Sum,
        Some("Avg") => ReduceOp::Avg,
        Some("Product") => ReduceOp::Product,
        Some("Min") => ReduceOp::Min,
        Some("Max") => ReduceOp::Max,
        _ => return Err(format!("bad placement \"{s}\"")),
    };
    Ok(Placement::Partial(op))
}

fn shard_meta_from(j: &Json) -> R<ShardMetadata> {
    Ok(ShardMetadata {
        offsets: u64s(field(j, "offsets")?, "offsets")?,
        sizes: u64s(field(j, "sizes")?, "sizes")?,
        placement: str_field(j, "placement")?.into(),
    })
}

fn unhex(s: &str) -> R<Vec<u8>> {
    if s.len() % 2 != 0 || !s.is_ascii() {
        return Err(format!("bad hex \"{s}\""));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|_| format!("bad hex \"{s}\"")))
        .collect()
}

fn value_from(j: &Json) -> R<Value> {
    Ok(match str_field(j, "type")? {
        "none" => Value::None,
        "bool" => Value::Bool(
            field(j, "value")?
                .as_bool()
                .ok_or("bool: expected true/false")?,
        ),
        "int" => Value::Int(as_i128(field(j, "value")?, "int")?),
        "float" => match j.get("bits") {
            Some(bits) => {
                let s = bits.as_str().ok_or("float bits: expected \"0x…\"")?;
                let h = s.strip_prefix("0x").ok_or("float bits: expected \"0x…\"")?;
                let b = u64::from_str_radix(h, 16).map_err(|_| "float bits: bad hex")?;
                Value::Float(f64::from_bits(b))
            }
            None => Value::Float(
                field(j, "value")?
                    .as_f64()
                    .ok_or("float: expected a number")?,
            ),
        },
        "str" => Value::Str(str_field(j, "value")?.into()),
        "bytes" => Value::Bytes(unhex(str_field(j, "hex")?)?),
        other => return Err(format!("unknown value type \"{other}\"")),
    })
}

/// A leaf from its index.json form.
pub fn leaf_from(j: &Json) -> R<Leaf> {
    Ok(match str_field(j, "kind")? {
        "value" => Leaf::Value(value_from(field(j, "value")?)?),
        "tensor" => Leaf::Tensor(layout_from(field(j, "layout")?)?),
        "dtensor" => {
            let spec = field(j, "spec")?;
            let mesh = field(spec, "mesh")?;
            let dim_names = match mesh.get("dim_names") {
                None | Some(Json::Null) => None,
                Some(names) => Some(
                    array(names, "dim_names")?
                        .iter()
                        .map(|n| n.as_str().map(String::from).ok_or("dim_names: strings"))
                        .collect::<Result<Vec<_>, _>>()?,
                ),
            };
            Leaf::DTensor {
                local: layout_from(field(j, "local")?)?,
                spec: DTensorSpec {
                    mesh: DeviceMesh {
                        shape: u64s(field(mesh, "shape")?, "mesh shape")?,
                        ranks: u64s(field(mesh, "ranks")?, "mesh ranks")?,
                        dim_names,
                        device_type: str_field(mesh, "device_type")?.into(),
                    },
                    placements: array(field(spec, "placements")?, "placements")?
                        .iter()
                        .map(placement_from)
                        .collect::<R<_>>()?,
                    global_shape: u64s(field(spec, "global_shape")?, "global_shape")?,
                    global_stride: u64s(field(spec, "global_stride")?, "global_stride")?,
                    dtype: dtype_from(field(spec, "dtype")?)?,
                },
            }
        }
        "sharded_tensor" => {
            let global = field(j, "global")?;
            Leaf::Sharded {
                local_shards: array(field(j, "local_shards")?, "local_shards")?
                    .iter()
                    .map(|s| {
                        Ok(LocalShard {
                            layout: layout_from(field(s, "layout")?)?,
                            meta: shard_meta_from(field(s, "meta")?)?,
                        })
                    })
                    .collect::<R<_>>()?,
                global: ShardedTensorMetadata {
                    shards: array(field(global, "shards")?, "shards")?
                        .iter()
                        .map(shard_meta_from)
                        .collect::<R<_>>()?,
                    global_size: u64s(field(global, "global_size")?, "global_size")?,
                    dtype: dtype_from(field(global, "dtype")?)?,
                },
            }
        }
        other => return Err(format!("unknown leaf kind \"{other}\"")),
    })
}

fn key_from(j: &Json) -> R<Key> {
    match j {
        Json::String(s) => Ok(Key::Str(s.clone())),
        _ => Ok(Key::Int(as_i64(field(j, "int")?, "int key")?)),
    }
}

/// A tree node (see the module docs).
pub fn node_from(j: &Json) -> R<Node> {
    if j.as_str() == Some("leaf") {
        return Ok(Node::Leaf);
    }
    let obj: &Map<String, Json> = j
        .as_object()
        .ok_or("tree node: expected \"leaf\" or an object")?;
    if let Some(n) = obj.get("list") {
        return Ok(Node::List(as_u64(n, "list")?));
    }
    if let Some(n) = obj.get("tuple") {
        return Ok(Node::Tuple(as_u64(n, "tuple")?));
    }
    if let Some(keys) = obj.get("dict") {
        return Ok(Node::Dict(
            array(keys, "dict")?
                .iter()
                .map(key_from)
                .collect::<R<_>>()?,
        ));
    }
    Err("tree node: expected \"leaf\", {list}, {tuple} or {dict}".into())
}

fn plan_params_from(j: &Json) -> R<PlanParams> {
    Ok(PlanParams {
        fanout: match str_field(j, "fanout")? {
            "Chain" => FanOut::Chain,
            "Direct" => FanOut::Direct,
            other => return Err(format!("unknown fanout \"{other}\"")),
        },
        bucket_size: u64_field(j, "bucket_size")?,
        chunk_size: u64_field(j, "chunk_size")?,
    })
}

/// Metadata from `{step, source, destinations, plan, tree, leaves}` (a summary works: extra fields are
/// ignored). Not validated here: encoding validates.
pub fn metadata_from_json(j: &Json) -> R<Metadata> {
    Ok(Metadata {
        step: match j.get("step") {
            None | Some(Json::Null) => None,
            Some(s) => Some(as_u64(s, "step")?),
        },
        source: as_u32(field(j, "source")?, "source")?,
        destinations: array(field(j, "destinations")?, "destinations")?
            .iter()
            .map(|d| as_u32(d, "destination"))
            .collect::<R<_>>()?,
        plan: plan_params_from(field(j, "plan")?)?,
        tree: array(field(j, "tree")?, "tree")?
            .iter()
            .map(node_from)
            .collect::<R<_>>()?,
        leaves: array(field(j, "leaves")?, "leaves")?
            .iter()
            .map(leaf_from)
            .collect::<R<_>>()?,
    })
}

/// An in-place target: `{storage, id, dtype, nbytes}`.
pub fn in_place_from(j: &Json) -> R<pgt_core::receiver::InPlace> {
    let storage = as_u64(field(j, "storage")?, "storage")?;
    Ok(pgt_core::receiver::InPlace {
        storage: u32::try_from(storage).map_err(|_| "storage: too large".to_string())?,
        id: as_u64(field(j, "id")?, "id")?,
        dtype: dtype_from(field(j, "dtype")?)?,
        nbytes: as_u64(field(j, "nbytes")?, "nbytes")?,
    })
}

/// Limits from their JSON form; missing fields keep their defaults.
pub fn limits_from_json(j: &Json) -> R<Limits> {
    let mut l = Limits::default();
    let get = |k: &str| j.get(k).map(|v| as_u64(v, k)).transpose();
    if let Some(v) = get("max_metadata_bytes")? {
        l.max_metadata_bytes = v;
    }
    if let Some(v) = get("max_leaves")? {
        l.max_leaves = v;
    }
    if let Some(v) = get("max_depth")? {
        l.max_depth = u32::try_from(v).map_err(|_| "max_depth too large")?;
    }
    if let Some(v) = get("max_ndim")? {
        l.max_ndim = u32::try_from(v).map_err(|_| "max_ndim too large")?;
    }
    if let Some(v) = get("max_total_bytes")? {
        l.max_total_bytes = v;
    }
    if let Some(v) = get("max_messages")? {
        l.max_messages = v;
    }
    Ok(l)
}
