//! Leaves as JSON.

use pgt_core::tree::{Leaf, Value};
use pgt_host::safetensors_io;
use serde_json::{json, Value as Json};

fn value_json(v: &Value) -> (Json, &'static str) {
    match v {
        Value::None => (Json::Null, "none"),
        Value::Bool(b) => (json!(b), "bool"),
        Value::Int(i) => (json!(i), "int"),
        Value::Float(f) if f.is_finite() => (json!(f), "float"),
        Value::Float(f) => (json!(value_text(&Value::Float(*f))), "float"),
        Value::Str(s) => (json!(s), "str"),
        // `0x` and the hex digits, as a safetensors metadata entry holds them.
        Value::Bytes(_) => (json!(safetensors_io::value_repr(v)), "bytes"),
    }
}

/// A value as text: strings quoted, floats exact (NaN with its bits).
fn value_text(v: &Value) -> String {
    match v {
        Value::None => "None".into(),
        Value::Bool(b) => if *b { "True" } else { "False" }.into(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) if f.is_nan() => format!("nan (bits 0x{:016x})", f.to_bits()),
        Value::Float(f) => format!("{f:?}"),
        Value::Str(s) => format!("{s:?}"),
        Value::Bytes(_) => format!("bytes {}", safetensors_io::value_repr(v)),
    }
}

fn layout_json(l: &pgt_core::layout::TensorLayout) -> serde_json::Map<String, Json> {
    let mut m = serde_json::Map::new();
    m.insert("dtype".into(), json!(l.dtype.torch_name()));
    m.insert("shape".into(), json!(l.shape));
    m.insert("stride".into(), json!(l.stride));
    m.insert("offset".into(), json!(l.storage_offset));
    m.insert("nbytes".into(), json!(l.nbytes));
    m
}

pub(super) fn leaf_json(path: &str, leaf: &Leaf) -> Json {
    let mut m = serde_json::Map::new();
    m.insert("path".into(), json!(path));
    m.insert("kind".into(), json!(leaf.kind()));
    match leaf {
        Leaf::Value(v) => {
            let (value, ty) = value_json(v);
            m.insert("value_type".into(), json!(ty));
            m.insert("value".into(), value);
            m.insert("text".into(), json!(value_text(v)));
        }
        Leaf::Tensor(l) => m.extend(layout_json(l)),
        Leaf::DTensor { local, spec } => {
            m.extend(layout_json(local));
            let placements: Vec<String> =
                spec.placements.iter().map(|p| format!("{p:?}")).collect();
            let names = spec
                .mesh
                .dim_names
                .as_ref()
                .map(|n| format!(" ({})", n.join(", ")))
                .unwrap_or_default();
            m.insert(
                "summary".into(),
                json!(format!(
                    "global {:?} {} on {} mesh {:?}{names}: {}",
                    spec.global_shape,
                    spec.dtype,
                    spec.mesh.device_type,
                    spec.mesh.shape,
                    placements.join(", ")
                )),
            );
            m.insert(
                "spec".into(),
                json!({
                    "global_shape": spec.global_shape,
                    "global_stride": spec.global_stride,
                    "dtype": spec.dtype.torch_name(),
                    "placements": placements,
                    "mesh": {
                        "shape": spec.mesh.shape,
                        "ranks": spec.mesh.ranks,
                        "dim_names": spec.mesh.dim_names,
                        "device_type": spec.mesh.device_type,
                    },
                }),
            );
        }
        Leaf::Sharded {
            local_shards,
            global,
        } => {
            m.insert("dtype".into(), json!(global.dtype.torch_name()));
            m.insert("shape".into(), json!(global.global_size));
            let nbytes: u128 = local_shards
                .iter()
                .map(|s| u128::from(s.layout.nbytes))
                .sum();
            m.insert("nbytes".into(), json!(u64::try_from(nbytes).ok()));
            let locals: Vec<String> = local_shards
                .iter()
                .map(|s| {
                    format!(
                        "{:?}+{:?}@{}",
                        s.meta.offsets, s.meta.sizes, s.meta.placement
                    )
                })
                .collect();
            m.insert(
                "summary".into(),
                json!(format!(
                    "{} local of {} shards: {}",
                    local_shards.len(),
                    global.shards.len(),
                    locals.join(", ")
                )),
            );
            m.insert(
                "local_shards".into(),
                Json::Array(
                    local_shards
                        .iter()
                        .map(|s| {
                            let mut j = layout_json(&s.layout);
                            j.insert("offsets".into(), json!(s.meta.offsets));
                            j.insert("sizes".into(), json!(s.meta.sizes));
                            j.insert("placement".into(), json!(s.meta.placement));
                            Json::Object(j)
                        })
                        .collect(),
                ),
            );
            m.insert(
                "global_shards".into(),
                Json::Array(
                    global
                        .shards
                        .iter()
                        .map(|s| json!({"offsets": s.offsets, "sizes": s.sizes, "placement": s.placement}))
                        .collect(),
                ),
            );
        }
    }
    Json::Object(m)
}
