//! Inspecting a safetensors file: its header, read as `pgt send` would read it.

use std::io::Read;
use std::path::Path;

use pgt_core::tree::Leaf;
use pgt_host::safetensors_io;
use pgt_host::state_dict::{Entry, Storage};
use serde_json::{json, Value as Json};

use super::leaves::leaf_json;
use super::Report;

/// A safetensors file: its header (via [`safetensors_io::load`], so exactly what `pgt send` would send).
pub(super) fn inspect_safetensors(path: &Path, file_bytes: u64) -> Report {
    let mut report = Report::new(path, "safetensors", file_bytes);
    let mut head = [0u8; 8];
    if std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
    {
        report.set("header_len", json!(u64::from_le_bytes(head)));
    }
    let sd = match safetensors_io::load(path) {
        Ok(sd) => sd,
        Err(e) => {
            report.other_error(e.into());
            return report;
        }
    };
    report.set("step", json!(sd.step));
    let entries = sd.entries();
    let mut tensors = 0u64;
    let mut total = 0u64;
    let leaves: Vec<Json> = entries
        .iter()
        .map(|(kp, entry)| {
            let path = kp.to_string();
            let mut j = match entry {
                Entry::Tensor(t) => leaf_json(&path, &Leaf::Tensor(t.layout.clone())),
                other => leaf_json(&path, &other.to_leaf()),
            };
            for t in entry.tensors() {
                tensors += 1;
                total += t.layout.nbytes;
                if let (Storage::Shared(_, range), Json::Object(m)) = (&t.storage, &mut j) {
                    m.insert("file_range".into(), json!([range.start, range.end]));
                    m.insert(
                        "summary".into(),
                        json!(format!("file bytes {}..{}", range.start, range.end)),
                    );
                }
            }
            j
        })
        .collect();
    report.set("tensor_count", json!(tensors));
    report.set("leaf_count", json!(leaves.len()));
    report.set("total_bytes", json!(total));
    report.set("leaves", Json::Array(leaves));
    report
}
