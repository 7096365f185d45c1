//! Inspecting a safetensors file: its header, read as `pgt send` would read it.

use std::io::Read;
use std::path::Path;

use pgt_host::safetensors_io;
use pgt_host::state_dict::{Entry, Storage, Tensor};
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
            for t in entry.tensors() {
                tensors += 1;
                total += t.layout.nbytes;
            }
            // A loaded file's tensors are plain tensors, each a range of the mapped file.
            let file_range = match entry {
                Entry::Tensor(Tensor {
                    storage: Storage::Shared(_, range),
                    ..
                }) => Some(range.clone()),
                _ => None,
            };
            leaf_json(&kp.to_string(), &entry.to_leaf(), file_range)
        })
        .collect();
    report.set("tensor_count", json!(tensors));
    report.set("leaf_count", json!(leaves.len()));
    report.set("total_bytes", json!(total));
    report.set("leaves", Json::Array(leaves));
    report
}
