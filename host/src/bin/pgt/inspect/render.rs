//! The text form of an inspect report: a block of fields, then a table of leaves.

use std::fmt::Write as _;

use pgt_core::plan::TAG_METADATA;
use serde_json::{json, Value as Json};

use super::leaves::{leaf_row, COLUMNS};
use crate::common::human;

fn list(j: &Json) -> String {
    match j.as_array() {
        Some(a) => format!(
            "[{}]",
            a.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => "-".into(),
    }
}

fn opt(j: &Json) -> String {
    match j {
        Json::Null => "-".into(),
        Json::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The report as aligned text: a block of fields, then one line per leaf.
pub(super) fn render(r: &serde_json::Map<String, Json>) -> String {
    let get = |k: &str| r.get(k).cloned().unwrap_or(Json::Null);
    let mut fields: Vec<(&str, String)> = Vec::new();
    fields.push((
        "file",
        format!("{} ({} bytes)", opt(&get("file")), opt(&get("file_bytes"))),
    ));
    let format = opt(&get("format"));
    fields.push((
        "format",
        match format.as_str() {
            "metadata" => "pgt header + metadata message".into(),
            "stream" => "pgt message stream (tag | len | bytes records)".into(),
            _ => format.clone(),
        },
    ));
    if let Some(recs) = r.get("records").and_then(Json::as_array) {
        let data = recs
            .iter()
            .filter(|x| x["tag"].as_u64() > Some(TAG_METADATA))
            .count();
        // A stale record (another transfer's) is marked with a `*`.
        let lens: Vec<String> = recs
            .iter()
            .map(|x| {
                let stale = if x["stale"] == json!(true) { "*" } else { "" };
                format!("{}:{}{stale}", opt(&x["tag"]), opt(&x["len"]))
            })
            .collect();
        fields.push((
            "records",
            format!(
                "{} ({} after the metadata) tag:len {}",
                recs.len(),
                data,
                lens.join(" ")
            ),
        ));
    }
    if let Some(h) = r.get("header") {
        let flags = h["flags"]
            .as_u64()
            .map(|f| {
                let digests = if f & u64::from(pgt_core::header::FLAG_DIGESTS) != 0 {
                    " (digests)"
                } else {
                    ""
                };
                format!("0x{f:04x}{digests}")
            })
            .unwrap_or("-".into());
        fields.push((
            "header",
            format!(
                "{} bytes: magic \"{}\"{}, version {}, flags {}, metadata_len {}, metadata_digest {}, transfer_id {}",
                opt(&h["len"]),
                opt(&h["magic"]),
                if h["magic_ok"] == json!(true) { "" } else { " (bad)" },
                opt(&h["version"]),
                flags,
                opt(&h["metadata_len"]),
                opt(&h["metadata_digest"]),
                opt(&h["transfer_id"]),
            ),
        ));
    }
    if let Some(n) = r.get("header_len").and_then(Json::as_u64) {
        fields.push((
            "header",
            format!(
                "{n} bytes of JSON; tensor data from byte {}",
                n.saturating_add(8)
            ),
        ));
    }
    if let Some(m) = r.get("metadata_bytes") {
        fields.push(("metadata", format!("{} bytes", opt(m))));
    }
    if r.contains_key("step") {
        let step = match get("step") {
            Json::Null => "none".into(),
            s => s.to_string(),
        };
        fields.push(("step", step));
    }
    if let Some(s) = r.get("source") {
        fields.push(("source", opt(s)));
    }
    if let Some(d) = r.get("destinations") {
        fields.push(("destinations", list(d)));
    }
    if let Some(p) = r.get("plan") {
        let size = |j: &Json| match j.as_u64() {
            Some(n) => format!("{n} ({})", human(n)),
            None => "-".into(),
        };
        fields.push((
            "plan",
            format!(
                "fanout {}, bucket_size {}, chunk_size {}",
                opt(&p["fanout"]),
                size(&p["bucket_size"]),
                size(&p["chunk_size"])
            ),
        ));
    }
    if let Some(m) = r.get("messages") {
        fields.push(("messages", opt(m)));
    }
    if let Some(n) = r.get("leaf_count") {
        let storages = r
            .get("storage_count")
            .or(r.get("tensor_count"))
            .map(opt)
            .unwrap_or("-".into());
        fields.push(("leaves", format!("{} ({storages} storages)", opt(n))));
    }
    if let Some(t) = r.get("total_bytes") {
        let human_total = t
            .as_u64()
            .map(|n| format!(" ({})", human(n)))
            .unwrap_or_default();
        fields.push(("total bytes", format!("{}{human_total}", opt(t))));
    }
    if r.get("validated") == Some(&json!(false)) {
        fields.push((
            "validated",
            "no: the metadata decodes but does not validate".into(),
        ));
    }
    if let Some(rx) = r.get("receiver") {
        let received = match r.get("received") {
            Some(Json::Bool(true)) => {
                let n = r
                    .get("received_storages")
                    .and_then(Json::as_array)
                    .map_or(0, Vec::len);
                format!(": received completely, {n} storages verified")
            }
            Some(Json::Bool(false)) => ": failed".into(),
            _ => String::new(),
        };
        fields.push((
            "receiver",
            format!(
                "rank {}, source {}, expected step {}{received}",
                opt(&rx["rank"]),
                opt(&rx["source"]),
                opt(&rx["expected_step"])
            ),
        ));
    }
    let valid = get("valid") == json!(true);
    if let Some(e) = r.get("error") {
        let text = match e["name"].as_str() {
            Some(_) => format!("{}: {}", opt(&e["debug"]), opt(&e["message"])),
            None => opt(&e["message"]),
        };
        fields.push(("error", text));
    } else {
        fields.push(("valid", if valid { "yes".into() } else { "no".into() }));
    }
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in &fields {
        let _ = writeln!(out, "{k:<width$}  {v}");
    }

    let Some(leaves) = r.get("leaves").and_then(Json::as_array) else {
        return out;
    };
    if leaves.is_empty() {
        return out;
    }
    let mut rows: Vec<[String; 8]> = vec![COLUMNS.map(String::from)];
    rows.extend(leaves.iter().map(leaf_row));
    let mut widths = [0usize; 8];
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    out.push('\n');
    for row in &rows {
        let mut line = String::new();
        for (i, (c, w)) in row.iter().zip(widths).enumerate() {
            if i == 7 {
                line.push_str(c);
            } else if (5..=6).contains(&i) {
                let _ = write!(line, "{c:>w$}  ");
            } else {
                let _ = write!(line, "{c:<w$}  ");
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}
