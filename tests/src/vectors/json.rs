//! Deterministic JSON output for `index.json`: object keys sorted, two-space indent, arrays of scalars on
//! one line. Independent of serde_json's `preserve_order` feature, which another crate of the workspace
//! may switch on (feature unification would otherwise change the committed bytes).

use serde_json::Value as Json;

pub use pgt_wasm::json::{hex64, int, uint, uints, MAX_SAFE};

/// The document, ending with a newline.
pub fn to_string(v: &Json) -> String {
    let mut out = String::new();
    write(v, 0, &mut out);
    out.push('\n');
    out
}

fn scalar(v: &Json) -> String {
    // serde_json prints scalars (and escapes strings) identically with or without preserve_order.
    serde_json::to_string(v).expect("a JSON scalar always serializes")
}

fn is_scalar(v: &Json) -> bool {
    !matches!(v, Json::Array(_) | Json::Object(_))
}

fn write(v: &Json, indent: usize, out: &mut String) {
    let pad = |n: usize| "  ".repeat(n);
    match v {
        Json::Array(items) if items.is_empty() => out.push_str("[]"),
        Json::Array(items) if items.iter().all(is_scalar) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&scalar(item));
            }
            out.push(']');
        }
        Json::Array(items) => {
            out.push_str("[\n");
            for (i, item) in items.iter().enumerate() {
                out.push_str(&pad(indent + 1));
                write(item, indent + 1, out);
                if i + 1 < items.len() {
                    out.push(',');
                }
                out.push('\n');
            }
            out.push_str(&pad(indent));
            out.push(']');
        }
        Json::Object(map) if map.is_empty() => out.push_str("{}"),
        Json::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push_str("{\n");
            for (i, k) in keys.iter().enumerate() {
                out.push_str(&pad(indent + 1));
                out.push_str(&scalar(&Json::from(k.as_str())));
                out.push_str(": ");
                write(&map[k.as_str()], indent + 1, out);
                if i + 1 < keys.len() {
                    out.push(',');
                }
                out.push('\n');
            }
            out.push_str(&pad(indent));
            out.push('}');
        }
        _ => out.push_str(&scalar(v)),
    }
}
