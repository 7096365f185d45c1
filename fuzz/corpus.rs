//! The fuzz corpus kept in the repository, as the replay tests of pgt-core and pgt-host read it
//! (each includes this file with `#[path]`; both crates sit one level below the workspace root).

use std::fs;
use std::path::{Path, PathBuf};

/// `fuzz/`, from the including crate's manifest directory.
pub fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Every `.bin` file under `fuzz/<kind>/<target>/` (`kind`: `regressions` or `seeds`), sorted by
/// name, with its bytes; none when the directory is missing.
pub fn inputs(kind: &str, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = fuzz_dir().join(kind).join(target);
    let mut files: Vec<PathBuf> = match fs::read_dir(&dir) {
        Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    };
    files.retain(|p| p.extension().is_some_and(|e| e == "bin"));
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let data = fs::read(&p).unwrap();
            (p, data)
        })
        .collect()
}
