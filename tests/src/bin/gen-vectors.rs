//! Writes the golden vectors to `tests/vectors/` and the TCP process group's conformance transcripts
//! to `tests/vectors/tcp/` (run from anywhere in the workspace): `cargo run -p pgt-tests --bin
//! gen-vectors`. Files that no longer belong to the set are removed.

use std::path::{Path, PathBuf};

/// Writes `files` into `dir`, first removing the files there that `ours` claims and `files` lacks.
fn write_set(
    dir: &Path,
    files: &[(String, Vec<u8>)],
    ours: impl Fn(&str) -> bool,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if path.is_file() && ours(name) && !files.iter().any(|(f, _)| f == name) {
            std::fs::remove_file(&path)?;
            println!("removed {name}");
        }
    }
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes)?;
    }
    println!("wrote {} files to {}", files.len(), dir.display());
    Ok(())
}

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vectors");
    write_set(&dir, &pgt_tests::vectors::files(), |name| {
        name.ends_with(".bin") || name == "index.json" || name == "README.md"
    })?;
    write_set(
        &dir.join(pgt_tests::tcp_vectors::SUBDIR),
        &pgt_tests::tcp_vectors::files(),
        |name| name.ends_with(".json") || name == "README.md",
    )
}
