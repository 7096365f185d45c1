//! The TCP process group's conformance transcripts in `tests/vectors/tcp/`: today's handshake,
//! registration and framing code record exactly the committed files. After an intended change to
//! the TCP group's wire format, update `TCP.md` and run `cargo run -p pgt-tests --bin gen-vectors`.

use std::path::PathBuf;

use pgt_tests::tcp_vectors::{self, SUBDIR};
use serde_json::Value as Json;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("vectors")
        .join(SUBDIR)
}

fn stale() -> &'static str {
    "regenerate with `cargo run -p pgt-tests --bin gen-vectors` if the change is intended (and say so in TCP.md)"
}

#[test]
fn committed_transcripts_are_what_the_group_records() {
    let files = tcp_vectors::files();
    for (name, bytes) in &files {
        let committed = std::fs::read(dir().join(name))
            .unwrap_or_else(|e| panic!("tests/vectors/{SUBDIR}/{name}: {e}; {}", stale()));
        if committed != *bytes {
            let (a, b) = (
                String::from_utf8_lossy(&committed),
                String::from_utf8_lossy(bytes),
            );
            let line = a
                .lines()
                .zip(b.lines())
                .position(|(x, y)| x != y)
                .map_or(String::from("length"), |i| format!("line {}", i + 1));
            panic!(
                "tests/vectors/{SUBDIR}/{name} differs from today's recording at {line}; {}",
                stale()
            );
        }
    }
    for entry in std::fs::read_dir(dir()).expect("the transcripts' directory") {
        let name = entry.expect("dir entry").file_name();
        let name = name.to_string_lossy();
        assert!(
            files.iter().any(|(f, _)| *f == name),
            "tests/vectors/{SUBDIR}/{name} is not generated any more; {}",
            stale()
        );
    }
}

/// The transcripts say what TCP.md says: checked here on the committed files, independently of the
/// recorder's own splitting.
#[test]
fn transcripts_have_the_specified_shape() {
    let hex = |s: &str| -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    };
    let mut verdicts = Vec::new();
    for (name, bytes) in tcp_vectors::files() {
        if !name.ends_with(".json") {
            continue;
        }
        let doc: Json = serde_json::from_slice(&bytes).expect("JSON");
        let messages = doc["messages"].as_array().expect("messages");
        if let Some(forged) = doc["client"]["forged_hello"].as_str() {
            // Not a hello: the server answers nothing.
            assert_eq!(messages.len(), 1, "{name}");
            assert_eq!(messages[0]["hex"], forged, "{name}");
            assert_eq!(doc["outcome"]["server"], "auth_failed", "{name}");
            continue;
        }
        let ch = hex(messages[0]["hex"].as_str().expect("hex"));
        assert_eq!(ch.len(), 52, "{name}");
        assert_eq!(&ch[..8], b"PGTAUTH1", "{name}");
        assert_eq!(
            ch[20..],
            hex(doc["client"]["nonce"].as_str().unwrap()),
            "{name}"
        );
        let sh = hex(messages[1]["hex"].as_str().expect("hex"));
        assert_eq!(sh.len(), 84, "{name}");
        assert_eq!(
            sh[20..52],
            hex(doc["server"]["nonce"].as_str().unwrap()),
            "{name}"
        );
        for m in messages {
            let joined: String = m["fields"]
                .as_array()
                .expect("fields")
                .iter()
                .map(|f| f[1].as_str().expect("field hex"))
                .collect();
            assert_eq!(
                joined,
                m["hex"].as_str().unwrap(),
                "{name}: fields cut the bytes"
            );
            if m["message"] == "Verdict" {
                verdicts.push(m["verdict"].as_u64().expect("verdict"));
            }
        }
    }
    verdicts.sort_unstable();
    // Every verdict code appears: 0 (twice: the exchange and the registration), 1, 2, 3, 4.
    assert_eq!(verdicts, [0, 0, 1, 2, 3, 4]);
}
