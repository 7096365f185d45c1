//! Metadata decode + validation of the reference dict (10,220 leaves): pgt-core natively vs pgt-core
//! inside wasmtime, as a receiver does it (header + metadata, results handed back to the host).
//!
//! `cargo run --release -p pgt-host --example decode_bench` prints one JSON line; times are medians of
//! 31 runs, each on a fresh receiver whose creation (and, for wasm, instantiation) is timed apart.

use std::time::Instant;

use pgt_core::codec::encode;
use pgt_core::engine::ReceiveEngine;
use pgt_core::header::Limits;
use pgt_core::manifest::Manifest;
use pgt_core::receiver::ReceiverOptions;
use pgt_core::schema::PlanParams;
use pgt_host::engine::{EngineFactory, NativeEngine};
use pgt_host::wasm_engine::WasmEngine;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// (instantiate ms, decode ms) medians for one engine.
fn measure(
    engine: &dyn EngineFactory,
    header: &[u8],
    metadata: &[u8],
) -> anyhow::Result<(f64, f64)> {
    let options = ReceiverOptions {
        rank: 1,
        source: 0,
        expected_step: None,
        limits: Limits::default(),
    };
    let (mut create, mut decode) = (Vec::new(), Vec::new());
    for _ in 0..31 {
        let t = Instant::now();
        let mut r = engine.receiver(options)?;
        create.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        r.handle_header(header)?;
        let incoming = r.handle_metadata(metadata)?;
        // Key paths too, as an in-place receiver asks for them.
        let paths = r.paths()?;
        decode.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!((paths.len(), incoming.storages.len()), (10_220, 10_000));
    }
    Ok((median(create), median(decode)))
}

fn main() -> anyhow::Result<()> {
    let metadata = pgt_core::reference::reference_metadata(0, vec![1], PlanParams::default());
    let manifest = Manifest::new(metadata, true, &Limits::default())?;
    let (header, bytes) = encode(&manifest, 1)?;
    let header = header.to_bytes();
    // An optional module path (e.g. a build with other optimisation settings) instead of the embedded one.
    let wasm = match std::env::args().nth(1) {
        Some(path) => WasmEngine::from_file(path.as_ref(), Default::default())?,
        None => WasmEngine::new()?,
    };
    let (native_create, native_ms) = measure(&NativeEngine, &header, &bytes)?;
    let (wasm_create, wasm_ms) = measure(&wasm, &header, &bytes)?;
    println!(
        "{{\"leaves\":10220,\"meta_bytes\":{},\"native_decode_ms\":{native_ms:.3},\"wasm_decode_ms\":{wasm_ms:.3},\"ratio\":{:.2},\"native_create_ms\":{native_create:.4},\"wasm_instantiate_ms\":{wasm_create:.3}}}",
        bytes.len(),
        wasm_ms / native_ms
    );
    Ok(())
}
