//! Embeds pgt's wasm module (made by `scripts/build-wasm.sh`) for `WasmEngine` (feature "wasm").
//!
//! Looks for the module at `$PGT_WASM_MODULE`, else at `<target dir>/pgt-wasm/pgt_wasm.wasm` where
//! build-wasm.sh puts it. When it is missing the build still succeeds: an empty module is embedded and
//! `WasmEngine::new()` says which command builds it. Never builds the module itself (a nested cargo
//! build for another target from a build script is slow and fragile).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

const BUILD_COMMAND: &str = "scripts/build-wasm.sh";

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=PGT_WASM_MODULE");
    println!("cargo::rerun-if-env-changed=CARGO_TARGET_DIR");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dest = out.join("pgt_wasm.wasm");
    let embed = env::var_os("CARGO_FEATURE_WASM").is_some();

    let candidates = candidates(&out);
    let found = candidates.iter().find(|p| p.is_file());
    match (embed, found) {
        (true, Some(module)) => {
            println!("cargo::rerun-if-changed={}", module.display());
            warn_if_stale(module);
            fs::copy(module, &dest).expect("copy the wasm module into OUT_DIR");
            println!(
                "cargo::rustc-env=PGT_WASM_MODULE_SOURCE={}",
                module.display()
            );
        }
        _ => {
            // Watch where the module will appear: the file if $PGT_WASM_MODULE names one, else the
            // (small) directory build-wasm.sh writes to, created here so that cargo can watch it.
            for c in &candidates {
                match c.parent() {
                    Some(dir) if env::var_os("PGT_WASM_MODULE").is_none() => {
                        let _ = fs::create_dir_all(dir);
                        println!("cargo::rerun-if-changed={}", dir.display());
                    }
                    _ => println!("cargo::rerun-if-changed={}", c.display()),
                }
            }
            fs::write(&dest, b"").expect("write the empty placeholder module");
            let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
            println!(
                "cargo::rustc-env=PGT_WASM_MODULE_SOURCE=looked at {}",
                looked.join(", ")
            );
        }
    }
}

/// Warns when the guest's sources (pgt-core, pgt-wasm) changed after the module was built: the embedded
/// module would then not be the core this crate links natively.
fn warn_if_stale(module: &Path) {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let Some(workspace) = manifest_dir.parent() else {
        return;
    };
    let built = match fs::metadata(module).and_then(|m| m.modified()) {
        Ok(t) => t,
        Err(_) => return,
    };
    for dir in ["core/src", "wasm/src"] {
        let dir = workspace.join(dir);
        println!("cargo::rerun-if-changed={}", dir.display());
        let newer = fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.metadata().ok()?.modified().ok())
            .any(|t| t > built);
        if newer {
            println!(
                "cargo::warning=the embedded wasm module is older than {}: run {BUILD_COMMAND}",
                dir.display()
            );
        }
    }
}

/// Where the module may be, in order of preference.
fn candidates(out: &Path) -> Vec<PathBuf> {
    if let Some(p) = env::var_os("PGT_WASM_MODULE") {
        return vec![PathBuf::from(p)];
    }
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let workspace = manifest_dir.parent().unwrap_or(&manifest_dir).to_path_buf();
    let target = match env::var_os("CARGO_TARGET_DIR") {
        Some(t) => workspace.join(t),
        // OUT_DIR is <target>/[<triple>/]<profile>/build/<pkg>-<hash>/out; cargo tags <target> with
        // CACHEDIR.TAG.
        None => out
            .ancestors()
            .find(|a| a.join("CACHEDIR.TAG").is_file())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| workspace.join("target")),
    };
    vec![target.join("pgt-wasm").join("pgt_wasm.wasm")]
}
