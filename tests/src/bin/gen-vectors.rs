//! Writes the golden vectors to `tests/vectors/` (run from anywhere in the workspace):
//! `cargo run -p pgt-tests --bin gen-vectors`. Files that no longer belong to the set are removed.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vectors");
    std::fs::create_dir_all(&dir)?;
    let files = pgt_tests::vectors::files();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let ours = name.ends_with(".bin") || name == "index.json" || name == "README.md";
        if ours && !files.iter().any(|(f, _)| f == name) {
            std::fs::remove_file(&path)?;
            println!("removed {name}");
        }
    }
    for (name, bytes) in &files {
        std::fs::write(dir.join(name), bytes)?;
    }
    println!("wrote {} files to {}", files.len(), dir.display());
    Ok(())
}
