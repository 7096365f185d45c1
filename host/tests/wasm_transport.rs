//! The Transport with its protocol core inside wasmtime ([`WasmEngine`]) over the in-process group:
//! whole transfers in both fan-out modes (also with native peers), in-place receive with a cast, and
//! the errors a sandboxed core reports (in-place size mismatch, digest mismatch) by variant name.
//!
//! Needs the module: `scripts/build-wasm.sh` before `cargo test`.
#![cfg(feature = "wasm")]

mod common;
use common::{in_place_size_mismatch, transfer_with_a_corrupted_byte};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use pgt_core::dtype::DType;
use pgt_core::schema::{FanOut, PlanParams};
use pgt_host::engine::{EngineFactory, NativeEngine};
use pgt_host::pg::{InProcessGroup, ProcessGroup};
use pgt_host::state_dict::{Entry, StateDict, Tensor};
use pgt_host::synthetic::{self, Shape};
use pgt_host::transport::{Transport, TransportOptions};
use pgt_host::wasm_engine::WasmEngine;

fn wasm() -> Arc<dyn EngineFactory> {
    static ENGINE: OnceLock<WasmEngine> = OnceLock::new();
    Arc::new(
        ENGINE
            .get_or_init(|| WasmEngine::new().unwrap_or_else(|e| panic!("{e:#}")))
            .clone(),
    )
}

fn options(
    engine: Arc<dyn EngineFactory>,
    fanout: FanOut,
    bucket: u64,
    chunk: u64,
) -> TransportOptions {
    TransportOptions {
        timeout: Duration::from_secs(20),
        plan: PlanParams {
            fanout,
            bucket_size: bucket,
            chunk_size: chunk,
        },
        engine,
        ..TransportOptions::default()
    }
}

/// Sends `shape` from rank 0 with options `sender` to every other rank `r` with options `receiver(r)`;
/// returns each receiver's result.
fn run(
    world: u32,
    shape: &Shape,
    sender: TransportOptions,
    receiver: impl Fn(u32) -> TransportOptions,
) -> Vec<pgt_host::Result<StateDict<'static>>> {
    let sd = synthetic::materialize(shape).unwrap();
    let mut groups = InProcessGroup::new(world).into_iter();
    let s = Transport::new(groups.next().unwrap(), sender);
    let dsts: Vec<u32> = (1..world).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = groups
            .map(|pg| {
                let rank = pg.rank();
                let t = Transport::new(pg, receiver(rank));
                scope.spawn(move || t.recv_checkpoint(0))
            })
            .collect();
        s.send_checkpoint(&dsts, &sd).unwrap();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The core error, exactly as with a native core.
fn core_error(e: &pgt_host::Error) -> &pgt_core::Error {
    match e {
        pgt_host::Error::Protocol(p) => p,
        other => panic!("not a pgt_core::Error: {other}"),
    }
}

#[test]
fn whole_transfers_with_the_core_in_wasm() {
    let shape = synthetic::mixed(128 << 10);
    for fanout in [FanOut::Direct, FanOut::Chain] {
        for (bucket, chunk) in [(0, 64), (4096, 8192)] {
            let results = run(3, &shape, options(wasm(), fanout, bucket, chunk), |_| {
                options(wasm(), fanout, bucket, chunk)
            });
            for r in results {
                let sd = r.unwrap_or_else(|e| panic!("{fanout:?} {bucket}/{chunk}: {e:#}"));
                assert_eq!(
                    synthetic::verify(&sd, &shape).unwrap(),
                    synthetic::total_bytes(&shape)
                );
            }
        }
    }
}

#[test]
fn sandboxed_and_native_peers_interoperate() {
    let shape = synthetic::mixed(64 << 10);
    // A chain 0 → 1 → 2 → 3 whose ranks alternate between the engines, and the reverse.
    for first_wasm in [true, false] {
        let engine = move |rank: u32| -> Arc<dyn EngineFactory> {
            if (rank % 2 == 0) == first_wasm {
                wasm()
            } else {
                Arc::new(NativeEngine)
            }
        };
        let results = run(
            4,
            &shape,
            options(engine(0), FanOut::Chain, 1024, 4096),
            |r| options(engine(r), FanOut::Chain, 1024, 4096),
        );
        for r in results {
            synthetic::verify(&r.unwrap(), &shape).unwrap();
        }
    }
}

#[test]
fn in_place_receive_and_cast_with_the_core_in_wasm() {
    let mut src = StateDict::new();
    src.insert(
        "model.w",
        Entry::Tensor(Tensor::from_values(&[2, 2], &[1.5f32, -2.0, 3.25, 4.0]).unwrap()),
    )
    .unwrap();
    let mut dst = StateDict::new();
    dst.insert(
        "model.w",
        Entry::Tensor(Tensor::from_bytes(DType::Float64, &[4], &[0u8; 32]).unwrap()),
    )
    .unwrap();
    let ptr = dst.tensor("model.w").unwrap().storage.bytes().as_ptr();
    let mut groups = InProcessGroup::new(2).into_iter();
    let a = Transport::new(
        groups.next().unwrap(),
        options(wasm(), FanOut::Direct, 64, 64),
    );
    let b = Transport::new(
        groups.next().unwrap(),
        options(wasm(), FanOut::Direct, 64, 64),
    );
    std::thread::scope(|s| {
        let h = s.spawn(|| b.recv_checkpoint_into(0, &mut dst));
        a.send_checkpoint(&[1], &src).unwrap();
        h.join().unwrap().unwrap();
    });
    let t = dst.tensor("model.w").unwrap();
    assert_eq!(t.dtype(), DType::Float64);
    assert_eq!(t.storage.bytes().as_ptr(), ptr, "received in place");
    assert_eq!(t.to_vec::<f64>().unwrap(), vec![1.5, -2.0, 3.25, 4.0]);
}

#[test]
fn in_place_size_mismatch_names_the_key_path() {
    let (err, _) = in_place_size_mismatch(options(wasm(), FanOut::Direct, 1024, 4096));
    assert_eq!(
        core_error(&err),
        &pgt_core::Error::InPlaceSizeMismatch {
            path: "['model.layers.0.weight']".into(),
            expected: 16,
            got: 12
        }
    );
}

#[test]
fn a_corrupted_byte_is_a_digest_mismatch_in_wasm_too() {
    let (shape, results) =
        transfer_with_a_corrupted_byte(options(wasm(), FanOut::Direct, 1024, 4096));
    synthetic::verify(results[0].as_ref().unwrap(), &shape).unwrap();
    match core_error(results[1].as_ref().unwrap_err()) {
        pgt_core::Error::DigestMismatch { path, .. } => assert_eq!(path, "['w01']"),
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
}
