//! The wasm raw-ABI harness: see [`wasm`].

use std::sync::OnceLock;

use pgt_core::codec;
use pgt_core::digest::digest;
use pgt_core::engine::ReceiveEngine;
use pgt_core::header::{self, Header, Limits, FLAG_DIGESTS, VERSION};
use pgt_core::receiver::{ReceiverOptions, RecvPoll};
use pgt_core::schema::{FanOut, Metadata, PlanParams};
use pgt_core::tree::{Leaf, Node, Value};

use crate::engine::{EngineError, EngineFactory};
use crate::wasm_engine::{SandboxError, WasmEngine, WasmLimits};

/// The transfer id of the wasm harness's fixed-up headers.
const TRANSFER_ID: u64 = 0x0123_4567_89ab_cdef;

/// Compiles the module now (it takes seconds in an instrumented build): the target calls this at
/// start-up, so that the first input is not charged for it and reported as a timeout.
pub fn wasm_init() {
    engine();
}

/// The module, compiled once per process with generous caps (each input derives its own).
fn engine() -> &'static WasmEngine {
    static ENGINE: OnceLock<WasmEngine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        WasmEngine::with_limits(WasmLimits {
            fuel_per_call: 500_000_000,
            max_memory_bytes: 64 << 20,
            max_table_elements: 10_000,
        })
        .unwrap_or_else(|e| panic!("the wasm module: {e}"))
    })
}

/// The caps of one input: generous, or tight in fuel, memory or both (the module starts at about
/// 1.1 MiB of linear memory).
fn caps(selector: u8) -> WasmLimits {
    let generous = engine().limits();
    let tight_fuel = 20_000 + u64::from(selector >> 2) * 50_000;
    let tight_memory = (1 << 20) + usize::from(selector >> 2) * (128 << 10);
    match selector % 4 {
        0 => generous,
        1 => WasmLimits {
            fuel_per_call: tight_fuel,
            ..generous
        },
        2 => WasmLimits {
            max_memory_bytes: tight_memory,
            ..generous
        },
        _ => WasmLimits {
            fuel_per_call: tight_fuel,
            max_memory_bytes: tight_memory,
            ..generous
        },
    }
}

fn fuzz_limits(tight: bool) -> Limits {
    let mut l = Limits {
        max_messages: 1 << 12,
        ..Limits::default()
    };
    if tight {
        l.max_metadata_bytes = 2048;
        l.max_leaves = 8;
        l.max_depth = 4;
        l.max_total_bytes = 1 << 16;
        l.max_messages = 16;
    }
    l
}

/// A failure of the sandbox, not the protocol: allowed only when the caps are tight.
fn sandboxed(e: &EngineError, caps: WasmLimits) {
    let generous = engine().limits();
    match e {
        EngineError::Sandbox(SandboxError::OutOfFuel { limit }) => {
            assert!(*limit < generous.fuel_per_call, "out of generous fuel: {e}")
        }
        EngineError::Sandbox(SandboxError::OutOfMemory { limit }) => {
            assert!(
                *limit < generous.max_memory_bytes,
                "out of generous memory: {e}"
            )
        }
        other => panic!("the guest failed otherwise than by a protocol error ({caps:?}): {other}"),
    }
}

/// Input: `mode`, 24 header bytes, the metadata message. `mode` bit 0: the harness replaces the
/// header by one that matches the rest, taken as postcard metadata behind the prefix (bit 1: with
/// the digests flag); bit 2: tight protocol limits; bits 3–7: the guest's caps ([`caps`]).
///
/// The module's one-off decode (a fresh guest) agrees with the native core: the same summary, or
/// the very same error, unless it ran out of its tight fuel or memory. A receiver guest fed the
/// same header and metadata, then bindings and a poll, fails only with a protocol error or out of
/// its caps. Then the engine still runs an honest transfer to its verified end. Returns whether the
/// guest decoded the input.
pub fn wasm(data: &[u8]) -> bool {
    let mode = data.first().copied().unwrap_or(0);
    let rest = data.get(1..).unwrap_or_default();
    let (raw_header, rest) = rest.split_at(rest.len().min(Header::SIZE));
    let limits = fuzz_limits(mode & 4 != 0);
    let (header_bytes, message) = if mode & 1 != 0 {
        let flags = if mode & 2 != 0 { FLAG_DIGESTS } else { 0 };
        let h = Header {
            version: VERSION,
            flags,
            metadata_len: rest.len() as u64,
            metadata_digest: digest(rest),
            transfer_id: TRANSFER_ID,
        };
        (
            h.to_bytes().to_vec(),
            [&header::prefix(TRANSFER_ID)[..], rest].concat(),
        )
    } else {
        (raw_header.to_vec(), rest.to_vec())
    };
    let caps = caps(mode >> 3);
    let guest = engine().with_other_limits(caps);

    let native = Header::parse(&header_bytes, &limits)
        .and_then(|h| codec::decode(&h, &message, &limits).map(|m| (h, m)));
    let decoded = guest.decode(&header_bytes, &message, &limits);
    let accepted = decoded.is_ok();
    match (decoded, &native) {
        (Ok(summary), Ok((h, m))) => {
            assert_eq!(&summary.header, h);
            assert_eq!(summary.source, m.metadata().source);
            assert_eq!(summary.step, m.metadata().step);
            assert_eq!(summary.destinations, m.metadata().destinations);
            assert_eq!(summary.digests, m.digests());
            assert_eq!(summary.total_bytes, m.total_bytes());
            let paths: Vec<String> = m.paths().iter().map(ToString::to_string).collect();
            assert_eq!(summary.paths, paths);
        }
        (Ok(_), Err(e)) => panic!("the guest decoded what the native core refuses: {e}"),
        (Err(EngineError::Protocol(e)), Err(n)) => assert_eq!(&e, n, "errors differ"),
        (Err(EngineError::Protocol(e)), Ok(_)) => {
            panic!("the guest refuses what the native core decodes: {e}")
        }
        (Err(e), _) => sandboxed(&e, caps),
    }

    if let Err(e) = receive(&guest, &header_bytes, &message, &limits) {
        match e {
            EngineError::Protocol(_) => {}
            EngineError::Sandbox(SandboxError::Poisoned) => {}
            e => sandboxed(&e, caps),
        }
    }

    honest_transfer(engine());
    accepted
}

/// A receiver guest fed `header` and `message`, its bindings (none in place), a poll and its
/// leftover operation.
fn receive(
    guest: &WasmEngine,
    header: &[u8],
    message: &[u8],
    limits: &Limits,
) -> Result<(), EngineError> {
    let mut r = guest.receiver(ReceiverOptions {
        rank: 1,
        source: 0,
        expected_step: None,
        limits: *limits,
    })?;
    r.poll()?;
    r.handle_header(header)?;
    r.handle_metadata(message)?;
    if r.poll()? == RecvPoll::NeedBindings {
        r.finish_bindings(&[])?;
        r.poll()?;
    }
    r.leftover()?;
    Ok(())
}

/// A whole transfer of one plain value through a fresh receiver of `engine`, to a verified result.
fn honest_transfer(engine: &WasmEngine) {
    static ENCODED: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    let (h, meta) = ENCODED.get_or_init(|| {
        let m = Metadata {
            step: Some(1),
            source: 0,
            destinations: vec![1],
            plan: PlanParams {
                fanout: FanOut::Direct,
                ..PlanParams::default()
            },
            tree: vec![Node::Leaf],
            leaves: vec![Leaf::Value(Value::Int(5))],
        };
        let manifest = pgt_core::manifest::Manifest::new(m, true, &Limits::default())
            .expect("a valid manifest");
        let (h, bytes) = codec::encode(&manifest, 7).expect("encodes");
        (h.to_bytes().to_vec(), bytes)
    });
    let mut r = engine
        .receiver(ReceiverOptions {
            rank: 1,
            source: 0,
            expected_step: Some(1),
            limits: Limits::default(),
        })
        .expect("an honest receiver after a hostile one");
    assert!(matches!(r.poll().expect("poll"), RecvPoll::Recv(_)));
    r.handle_header(h).expect("honest header");
    r.handle_metadata(meta).expect("honest metadata");
    assert_eq!(r.poll().expect("poll"), RecvPoll::NeedBindings);
    r.finish_bindings(&[]).expect("bindings");
    let RecvPoll::Recv(step) = r.poll().expect("poll") else {
        panic!("expected the trailer")
    };
    let parsed = Header::parse(h, &Limits::default()).expect("honest header parses");
    let trailer = [
        header::prefix(parsed.transfer_id),
        parsed.metadata_digest.to_le_bytes(),
    ]
    .concat();
    assert_eq!(trailer.len() as u64, step.len);
    r.handle_trailer(&trailer).expect("honest trailer");
    assert_eq!(r.poll().expect("poll"), RecvPoll::Done);
    let received = r.finish().expect("an honest transfer completes");
    assert_eq!(received.step, Some(1));
}
