//! A leaf in an inspect report. Its JSON is pgt-wasm's form of leaves — the one of
//! `tests/vectors/index.json` and of the JS build (`{"kind": "tensor", "layout": {…}}`, placements
//! `"Shard(0)"`) — plus its key path as `path` and, for a tensor of a safetensors file, its bytes in
//! the file as `file_range: [start, end]`. The text table row is made from that JSON, so the two
//! forms cannot disagree.

use std::ops::Range;

use pgt_core::tree::{Leaf, Value};
use pgt_host::safetensors_io;
use serde_json::{json, Value as Json};

/// The columns of the text table.
pub(super) const COLUMNS: [&str; 8] = [
    "PATH", "KIND", "DTYPE", "SHAPE", "STRIDE", "OFFSET", "NBYTES", "DETAILS",
];

/// A leaf's report entry.
pub(super) fn leaf_json(path: &str, leaf: &Leaf, file_range: Option<Range<usize>>) -> Json {
    let mut j = pgt_wasm::json::leaf_json(leaf);
    if let Json::Object(m) = &mut j {
        m.insert("path".into(), json!(path));
        if let Some(r) = file_range {
            m.insert("file_range".into(), json!([r.start, r.end]));
        }
    }
    j
}

/// A report entry as a row of [`COLUMNS`].
pub(super) fn leaf_row(entry: &Json) -> [String; 8] {
    let path = entry["path"].as_str().unwrap_or("?").to_string();
    let dash = || "-".to_string();
    let leaf = match pgt_wasm::json::leaf_from(entry) {
        Ok(leaf) => leaf,
        // Not expected: the entry was made by `leaf_json`.
        Err(e) => {
            let mut row = [(); 8].map(|()| dash());
            row[0] = path;
            row[7] = format!("unreadable leaf: {e}");
            return row;
        }
    };
    let kind = leaf.kind().to_string();
    match &leaf {
        Leaf::Value(v) => [
            path,
            kind,
            value_type(v).into(),
            dash(),
            dash(),
            dash(),
            dash(),
            value_text(v),
        ],
        Leaf::Tensor(l) | Leaf::DTensor { local: l, .. } => {
            let details = match (&leaf, entry["file_range"].as_array()) {
                (Leaf::DTensor { spec, .. }, _) => {
                    let placements: Vec<String> =
                        spec.placements.iter().map(|p| format!("{p:?}")).collect();
                    let names = spec
                        .mesh
                        .dim_names
                        .as_ref()
                        .map(|n| format!(" ({})", n.join(", ")))
                        .unwrap_or_default();
                    format!(
                        "global {:?} {} on {} mesh {:?}{names}: {}",
                        spec.global_shape,
                        spec.dtype,
                        spec.mesh.device_type,
                        spec.mesh.shape,
                        placements.join(", ")
                    )
                }
                (_, Some(range)) => format!(
                    "file bytes {}..{}",
                    range.first().unwrap_or(&Json::Null),
                    range.get(1).unwrap_or(&Json::Null)
                ),
                _ => String::new(),
            };
            [
                path,
                kind,
                l.dtype.torch_name().into(),
                list(&l.shape),
                list(&l.stride),
                l.storage_offset.to_string(),
                l.nbytes.to_string(),
                details,
            ]
        }
        Leaf::Sharded {
            local_shards,
            global,
        } => {
            let nbytes: u128 = local_shards
                .iter()
                .map(|s| u128::from(s.layout.nbytes))
                .sum();
            let locals: Vec<String> = local_shards
                .iter()
                .map(|s| {
                    format!(
                        "{:?}+{:?}@{}",
                        s.meta.offsets, s.meta.sizes, s.meta.placement
                    )
                })
                .collect();
            [
                path,
                kind,
                global.dtype.torch_name().into(),
                list(&global.global_size),
                dash(),
                dash(),
                nbytes.to_string(),
                format!(
                    "{} local of {} shards: {}",
                    local_shards.len(),
                    global.shards.len(),
                    locals.join(", ")
                ),
            ]
        }
    }
}

fn list(v: &[u64]) -> String {
    let items: Vec<String> = v.iter().map(u64::to_string).collect();
    format!("[{}]", items.join(", "))
}

fn value_type(v: &Value) -> &'static str {
    match v {
        Value::None => "none",
        Value::Bool(_) => "bool",
        Value::Int(_) => "int",
        Value::Float(_) => "float",
        Value::Str(_) => "str",
        Value::Bytes(_) => "bytes",
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

#[cfg(test)]
mod tests {
    use pgt_core::dtensor::{DTensorSpec, DeviceMesh, Placement};
    use pgt_core::dtype::DType;
    use pgt_core::layout::TensorLayout;

    use super::*;

    #[test]
    fn json_is_pgt_wasms_form_with_the_path() {
        let layout = TensorLayout::contiguous(DType::BFloat16, &[3, 2]);
        let j = leaf_json("a.w", &Leaf::Tensor(layout.clone()), Some(100..112));
        assert_eq!(j["path"], "a.w");
        assert_eq!(j["kind"], "tensor");
        assert_eq!(j["layout"]["storage_offset"], 0);
        assert_eq!(j["file_range"], json!([100, 112]));
        let mut shared = pgt_wasm::json::leaf_json(&Leaf::Tensor(layout));
        shared["path"] = json!("a.w");
        shared["file_range"] = json!([100, 112]);
        assert_eq!(j, shared);
        assert_eq!(
            leaf_row(&j),
            [
                "a.w",
                "tensor",
                "bfloat16",
                "[3, 2]",
                "[2, 1]",
                "0",
                "12",
                "file bytes 100..112"
            ]
        );
    }

    #[test]
    fn rows_of_values_and_dtensors() {
        let nan = Value::Float(f64::from_bits(0x7ff8_0000_0000_0001));
        let row = leaf_row(&leaf_json("x", &Leaf::Value(nan), None));
        assert_eq!(row[2], "float");
        assert_eq!(row[7], "nan (bits 0x7ff8000000000001)");
        let row = leaf_row(&leaf_json(
            "b",
            &Leaf::Value(Value::Bytes(vec![1, 250])),
            None,
        ));
        assert_eq!(row[7], "bytes 0x01fa");

        let spec = DTensorSpec {
            mesh: DeviceMesh {
                shape: vec![2],
                ranks: vec![0, 1],
                dim_names: Some(vec!["tp".into()]),
                device_type: "cpu".into(),
            },
            placements: vec![Placement::Shard(0)],
            global_shape: vec![4],
            global_stride: vec![1],
            dtype: DType::Float32,
        };
        let leaf = Leaf::DTensor {
            local: TensorLayout::contiguous(DType::Float32, &[2]),
            spec,
        };
        let j = leaf_json("d", &leaf, None);
        assert_eq!(j["spec"]["placements"], json!(["Shard(0)"]));
        assert_eq!(
            leaf_row(&j)[7],
            "global [4] float32 on cpu mesh [2] (tp): Shard(0)"
        );
    }
}
