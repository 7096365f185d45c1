//! The sandbox itself: the module imports nothing and exports the documented ABI; a guest that runs out
//! of fuel or memory fails its call with a clean error naming fuel or memory, is not used again, and the
//! engine goes on serving normal transfers.
//!
//! Needs the module: `scripts/build-wasm.sh` before `cargo test`.
#![cfg(feature = "wasm")]

use std::sync::OnceLock;
use std::time::Instant;

use pgt_core::codec::encode;
use pgt_core::engine::ReceiveEngine;
use pgt_core::header::Limits;
use pgt_core::manifest::Manifest;
use pgt_core::receiver::{ReceiverOptions, RecvPoll};
use pgt_core::schema::Metadata;
use pgt_core::schema::{FanOut, PlanParams};
use pgt_host::engine::{EngineError, EngineFactory};
use pgt_host::wasm_engine::{SandboxError, WasmEngine, WasmLimits};

/// The module, compiled once for every test here (each test derives the caps it needs).
fn engine() -> WasmEngine {
    static ENGINE: OnceLock<WasmEngine> = OnceLock::new();
    ENGINE
        .get_or_init(|| WasmEngine::new().unwrap_or_else(|e| panic!("{e:#}")))
        .clone()
}

fn reference(tensors: usize) -> Metadata {
    let mut m = pgt_core::reference::reference_metadata(0, vec![1], PlanParams::default());
    if tensors < m.leaves.len() {
        m.leaves.truncate(tensors);
        m.tree = std::iter::once(pgt_core::tree::Node::List(tensors as u64))
            .chain((0..tensors).map(|_| pgt_core::tree::Node::Leaf))
            .collect();
    }
    m
}

fn encoded(m: &Metadata) -> (Vec<u8>, Vec<u8>) {
    let manifest = Manifest::new(m.clone(), true, &Limits::default()).unwrap();
    let (h, bytes) = encode(&manifest, 7).unwrap();
    (h.to_bytes().to_vec(), bytes)
}

fn sandbox_error(e: &EngineError) -> &SandboxError {
    match e {
        EngineError::Sandbox(s) => s,
        other => panic!("not a sandbox error: {other}"),
    }
}

/// A whole small transfer through a receiver of `engine`: header, metadata, bindings (and nothing else:
/// the metadata has no storages).
fn small_transfer_works(engine: &WasmEngine) {
    let m = Metadata {
        step: Some(1),
        source: 0,
        destinations: vec![1],
        plan: PlanParams {
            fanout: FanOut::Direct,
            ..PlanParams::default()
        },
        tree: vec![pgt_core::tree::Node::Leaf],
        leaves: vec![pgt_core::tree::Leaf::Value(pgt_core::tree::Value::Int(5))],
    };
    let (h, meta) = encoded(&m);
    let summary = engine.decode(&h, &meta, &Limits::default()).unwrap();
    assert_eq!(summary.paths, vec!["<root>"]);
    let mut r = engine
        .receiver(ReceiverOptions {
            rank: 1,
            source: 0,
            expected_step: Some(1),
            limits: Limits::default(),
        })
        .unwrap();
    assert!(matches!(r.poll().unwrap(), RecvPoll::Recv(_)));
    r.handle_header(&h).unwrap();
    r.handle_metadata(&meta).unwrap();
    assert_eq!(r.poll().unwrap(), RecvPoll::NeedBindings);
    r.finish_bindings(&[]).unwrap();
    // Digests are on: the trailer (no storages: the prefix and the metadata digest) is the one
    // message left.
    let RecvPoll::Recv(step) = r.poll().unwrap() else {
        panic!("expected the trailer")
    };
    let header = pgt_core::header::Header::parse(&h, &Limits::default()).unwrap();
    let trailer = [
        pgt_core::header::prefix(header.transfer_id),
        header.metadata_digest.to_le_bytes(),
    ]
    .concat();
    assert_eq!(trailer.len() as u64, step.len);
    r.handle_trailer(&trailer).unwrap();
    assert_eq!(r.poll().unwrap(), RecvPoll::Done);
    let tree = r.finish().unwrap();
    assert_eq!(tree.step, Some(1));
}

#[test]
fn module_imports_nothing_and_exports_the_abi() {
    let engine = engine();
    let module = engine.module();
    let imports: Vec<String> = module
        .imports()
        .map(|i| format!("{}::{}", i.module(), i.name()))
        .collect();
    assert!(imports.is_empty(), "the module imports {imports:?}");
    // The raw bytes too: no import section (id 2) at all, so no `env` import of any kind.
    let bytes = pgt_host::wasm_engine::embedded_module().expect("the module is embedded");
    let sections = sections(bytes);
    assert!(
        !sections.contains(&2),
        "import section present: {sections:?}"
    );
    let exports: Vec<&str> = module.exports().map(|e| e.name()).collect();
    for name in [
        "memory",
        "pgt_alloc",
        "pgt_free",
        "pgt_abi_version",
        "pgt_protocol_version",
        "pgt_default_limits",
        "pgt_decode",
        "pgt_plan",
        "pgt_encode",
        "pgt_sender_new",
        "pgt_sender_poll",
        "pgt_sender_bytes",
        "pgt_sender_digests",
        "pgt_sender_destination_outcome",
        "pgt_sender_drop",
        "pgt_receiver_new",
        "pgt_receiver_poll",
        "pgt_receiver_header",
        "pgt_receiver_metadata",
        "pgt_receiver_tree",
        "pgt_receiver_paths",
        "pgt_receiver_bind",
        "pgt_receiver_data",
        "pgt_receiver_digests",
        "pgt_receiver_trailer",
        "pgt_receiver_forwarded",
        "pgt_receiver_in_place_written",
        "pgt_receiver_leftover",
        "pgt_receiver_finish",
        "pgt_receiver_drop",
    ] {
        assert!(
            exports.contains(&name),
            "missing export {name}: {exports:?}"
        );
    }
    eprintln!(
        "raw module: {} bytes, {} exports",
        bytes.len(),
        exports.len()
    );
}

/// Section ids of a wasm binary, in order.
fn sections(b: &[u8]) -> Vec<u8> {
    assert_eq!(&b[0..8], b"\0asm\x01\0\0\0", "wasm magic and version 1");
    let mut ids = Vec::new();
    let mut i = 8;
    while i < b.len() {
        let id = b[i];
        i += 1;
        let (mut size, mut shift) = (0usize, 0);
        loop {
            let byte = b[i];
            i += 1;
            size |= ((byte & 0x7f) as usize) << shift;
            shift += 7;
            if byte < 0x80 {
                break;
            }
        }
        ids.push(id);
        i += size;
    }
    ids
}

#[test]
fn out_of_fuel_is_a_clean_error_and_the_engine_goes_on() {
    // Enough fuel for small calls, not for decoding 10,000 leaves.
    let engine = engine().with_other_limits(WasmLimits {
        fuel_per_call: 2_000_000,
        ..WasmLimits::default()
    });
    let (h, meta) = encoded(&reference(10_000));
    let e = engine.decode(&h, &meta, &Limits::default()).unwrap_err();
    assert_eq!(
        sandbox_error(&e),
        &SandboxError::OutOfFuel { limit: 2_000_000 }
    );
    assert!(e.to_string().contains("fuel"), "{e}");

    // A receiver whose guest runs dry is poisoned…
    let mut r = engine
        .receiver(ReceiverOptions {
            rank: 1,
            source: 0,
            expected_step: None,
            limits: Limits::default(),
        })
        .unwrap();
    r.handle_header(&h).unwrap();
    let e = r.handle_metadata(&meta).unwrap_err();
    assert!(matches!(sandbox_error(&e), SandboxError::OutOfFuel { .. }));
    let e = r.poll().unwrap_err();
    assert_eq!(sandbox_error(&e), &SandboxError::Poisoned);

    // …and the same engine serves the next transfer.
    small_transfer_works(&engine);
    // Tiny fuel fails even instantiation-time calls cleanly.
    let starved = engine.with_other_limits(WasmLimits {
        fuel_per_call: 10,
        ..WasmLimits::default()
    });
    let e = starved.decode(&h, &meta, &Limits::default()).unwrap_err();
    assert!(
        matches!(sandbox_error(&e), SandboxError::OutOfFuel { .. }),
        "{e:#}"
    );
    small_transfer_works(&engine);
}

#[test]
fn out_of_memory_is_a_clean_error_and_the_engine_goes_on() {
    // 4 MiB of linear memory: the module's own 1.1 MiB plus room for small metadata, not for the
    // reference dict's (10,220 leaves).
    let engine = engine().with_other_limits(WasmLimits {
        max_memory_bytes: 4 << 20,
        ..WasmLimits::default()
    });
    let (h, meta) = encoded(&reference(usize::MAX));
    let e = engine.decode(&h, &meta, &Limits::default()).unwrap_err();
    assert_eq!(
        sandbox_error(&e),
        &SandboxError::OutOfMemory { limit: 4 << 20 }
    );
    assert!(e.to_string().contains("memory"), "{e}");

    let e = engine
        .sender(reference(usize::MAX), true, &Limits::default(), 7)
        .expect_err("a sender for the reference dict does not fit in 4 MiB");
    assert!(
        matches!(sandbox_error(&e), SandboxError::OutOfMemory { .. }),
        "{e:#}"
    );

    small_transfer_works(&engine);

    // A cap below the module's initial memory fails at instantiation, also cleanly.
    let tiny = engine.with_other_limits(WasmLimits {
        max_memory_bytes: 64 << 10,
        ..WasmLimits::default()
    });
    let e = tiny.decode(&h, &meta, &Limits::default()).unwrap_err();
    assert!(
        matches!(sandbox_error(&e), SandboxError::OutOfMemory { .. }),
        "{e:#}"
    );
    small_transfer_works(&engine);
}

#[test]
fn protocol_errors_are_the_core_errors() {
    let engine = engine();
    let (mut h, meta) = encoded(&reference(10));
    h[2] = b'X';
    let e = engine.decode(&h, &meta, &Limits::default()).unwrap_err();
    assert_eq!(e.protocol(), Some(&pgt_core::Error::BadMagic));
    assert_eq!(e.to_string(), pgt_core::Error::BadMagic.to_string());
    // Errors of a call in the wrong state too.
    let mut r = engine
        .receiver(ReceiverOptions {
            rank: 1,
            source: 0,
            expected_step: None,
            limits: Limits::default(),
        })
        .unwrap();
    let native = pgt_core::receiver::Receiver::new(ReceiverOptions {
        rank: 1,
        source: 0,
        expected_step: None,
        limits: Limits::default(),
    })
    .finish_bindings(&[])
    .map(|_| ())
    .unwrap_err();
    let e = r.finish_bindings(&[]).unwrap_err();
    assert_eq!(e.protocol(), Some(&native));
    // From every export: an empty header from pgt_plan.
    let e = engine.plan(&[], &[], &Limits::default()).unwrap_err();
    assert_eq!(
        e.protocol(),
        Some(&pgt_core::Error::HeaderLength { got: 0 })
    );
}

/// Not a benchmark, a record: decoding the reference dict's metadata natively and in wasmtime.
#[test]
fn decode_timing_native_vs_wasm() {
    let engine = engine();
    let (h, meta) = encoded(&reference(usize::MAX));
    let limits = Limits::default();
    let runs = 5;
    let t = Instant::now();
    for _ in 0..runs {
        let (hd, m) = pgt_wasm::api::decode(&h, &meta, &limits).unwrap();
        std::hint::black_box(pgt_wasm::api::summary(&hd, &m));
    }
    let native = t.elapsed() / runs;
    let t = Instant::now();
    for _ in 0..runs {
        std::hint::black_box(engine.decode(&h, &meta, &limits).unwrap());
    }
    let wasm = t.elapsed() / runs;
    let t = Instant::now();
    for _ in 0..runs {
        let mut r = engine
            .receiver(ReceiverOptions {
                rank: 1,
                source: 0,
                expected_step: None,
                limits,
            })
            .unwrap();
        r.handle_header(&h).unwrap();
        std::hint::black_box(r.handle_metadata(&meta).unwrap());
    }
    let wasm_receiver = t.elapsed() / runs;
    let t = Instant::now();
    for _ in 0..runs {
        let mut r = pgt_host::engine::NativeEngine
            .receiver(ReceiverOptions {
                rank: 1,
                source: 0,
                expected_step: None,
                limits,
            })
            .unwrap();
        r.handle_header(&h).unwrap();
        std::hint::black_box(r.handle_metadata(&meta).unwrap());
    }
    let native_receiver = t.elapsed() / runs;
    eprintln!(
        "reference dict ({} leaves, {} metadata bytes): decode + summary native {native:?}, \
         wasm {wasm:?} (fresh instance each); receiver header + metadata native {native_receiver:?}, \
         wasm {wasm_receiver:?}",
        reference(usize::MAX).leaves.len(),
        meta.len()
    );
}

/// Every core error crosses the sandbox as itself: one of each kind, from a native receiver and from
/// the guest, compare equal (no mirror type to keep in sync).
#[test]
fn errors_cross_the_boundary_as_themselves() {
    let engine = engine();
    let options = ReceiverOptions {
        rank: 9,
        source: 0,
        expected_step: Some(3),
        limits: Limits::default(),
    };
    let (h, meta) = encoded(&reference(10));
    let mut native = pgt_host::engine::NativeEngine.receiver(options).unwrap();
    let mut wasm = engine.receiver(options).unwrap();
    for r in [&mut native, &mut wasm] {
        r.handle_header(&h).unwrap();
    }
    // Step mismatch (it is checked before the rank): a variant with fields.
    let n = native.handle_metadata(&meta).unwrap_err();
    let w = wasm.handle_metadata(&meta).unwrap_err();
    assert_eq!(n.protocol(), w.protocol());
    assert_eq!(
        w.protocol().map(pgt_core::Error::name),
        Some("StepMismatch")
    );
    // A call in the wrong state, and a message that was never polled.
    assert_eq!(
        native.handle_data(7).unwrap_err().protocol(),
        wasm.handle_data(7).unwrap_err().protocol()
    );
    assert_eq!(
        native.handle_digests(2, &[1, 2]).unwrap_err().protocol(),
        wasm.handle_digests(2, &[1, 2]).unwrap_err().protocol()
    );
}
