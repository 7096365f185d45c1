//! pgt-core natively and inside wasmtime ([`WasmEngine`]) decide identically: every golden vector of
//! `tests/vectors/` decodes to the same summary and plan (or the same error, also the one index.json
//! names); senders emit the same operations and wire bytes; receivers go through the same operations and
//! end with the same result or error (in-place size mismatch naming the key path, digest mismatch…).
//!
//! Needs the module: `scripts/build-wasm.sh` before `cargo test`.
#![cfg(feature = "wasm")]

use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};
use pgt_core::header::Limits;
use pgt_core::schema::Metadata;
use pgt_core::digest::StorageHasher;
use pgt_core::dtype::DType;
use pgt_core::layout::TensorLayout;
use pgt_core::schema::{FanOut, PlanParams};
use pgt_core::plan::MessageKind;
use pgt_core::receiver::ReceiverOptions;
use pgt_core::tree::{Key, Leaf, Node, Value};
use pgt_host::engine::{
    EngineFactory, IncomingManifest, NativeEngine, OwnedPayload, ReceiverEngine, RecvNext, SendNext,
};
use pgt_host::wasm_engine::WasmEngine;
use pgt_wasm::types::ErrorInfo;
use serde_json::Value as Json;

fn wasm() -> &'static WasmEngine {
    static ENGINE: OnceLock<WasmEngine> = OnceLock::new();
    ENGINE.get_or_init(|| WasmEngine::new().unwrap_or_else(|e| panic!("{e:#}")))
}

/// The error as the guest reports it: from pgt-core natively, from the result block in wasm.
fn info(e: &anyhow::Error) -> ErrorInfo {
    try_info(e).unwrap_or_else(|| panic!("not a protocol error: {e:#}"))
}

fn try_info(e: &anyhow::Error) -> Option<ErrorInfo> {
    if let Some(core) = e.downcast_ref::<pgt_core::Error>() {
        return Some(ErrorInfo::from_core(core));
    }
    e.downcast_ref::<ErrorInfo>().cloned()
}

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/vectors")
}

fn index() -> Json {
    let text = std::fs::read_to_string(vectors_dir().join("index.json")).expect("index.json");
    serde_json::from_str(&text).expect("index.json parses")
}

fn json_u64(j: &Json) -> u64 {
    j.as_u64()
        .or_else(|| j.as_str()?.parse().ok())
        .unwrap_or_else(|| panic!("not an integer: {j}"))
}

fn limits_of(entry: &Json) -> Limits {
    let Some(l) = entry.get("limits") else {
        return Limits::default();
    };
    let n = |k: &str| json_u64(&l[k]);
    Limits {
        max_metadata_bytes: n("max_metadata_bytes"),
        max_leaves: n("max_leaves"),
        max_depth: n("max_depth") as u32,
        max_ndim: n("max_ndim") as u32,
        max_total_bytes: n("max_total_bytes"),
        max_messages: n("max_messages"),
    }
}

fn receiver_options(entry: &Json, limits: Limits) -> ReceiverOptions {
    let r = &entry["receiver"];
    ReceiverOptions {
        rank: json_u64(&r["rank"]) as u32,
        source: json_u64(&r["source"]) as u32,
        expected_step: r
            .get("expected_step")
            .filter(|s| !s.is_null())
            .map(json_u64),
        limits,
    }
}

/// Postcard bytes: a bit-exact comparison (NaN payloads included) of serde values.
fn bytes_of<T: serde::Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).unwrap()
}

fn check_error(name: &str, what: &str, native: &ErrorInfo, wasm: &ErrorInfo, entry: &Json) {
    assert_eq!(
        native, wasm,
        "{name}: {what}: native and wasm errors differ"
    );
    assert_eq!(
        native.name,
        entry["error"].as_str().unwrap(),
        "{name}: {what}"
    );
    assert_eq!(
        native.debug,
        entry["error_debug"].as_str().unwrap(),
        "{name}: {what}"
    );
}

#[test]
fn every_vector_decodes_identically() {
    let index = index();
    let vectors = index["vectors"].as_array().unwrap();
    assert!(
        vectors.len() > 50,
        "index.json lists {} vectors",
        vectors.len()
    );
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for entry in vectors {
        let name = entry["file"].as_str().unwrap();
        let kind = entry["kind"].as_str().unwrap();
        *counts.entry(kind.to_string()).or_default() += 1;
        let bytes = std::fs::read(vectors_dir().join(name)).unwrap();
        let limits = limits_of(entry);
        match kind {
            "valid_metadata" | "malformed" | "receiver_reject" => {
                let hl = json_u64(&entry["header_len"]) as usize;
                let (h, m) = bytes.split_at(hl);
                decode_both(name, kind, entry, h, m, &limits);
                if kind == "receiver_reject" {
                    let opts = receiver_options(entry, limits);
                    let records = vec![(1, h.to_vec()), (2, m.to_vec())];
                    let native = drive(NativeEngine.receiver(opts).unwrap(), &records, None);
                    let wasm = drive(wasm().receiver(opts).unwrap(), &records, None);
                    assert_eq!(native.ops, wasm.ops, "{name}: operations");
                    let (Err(n), Err(w)) = (&native.result, &wasm.result) else {
                        panic!("{name}: the receivers accepted it")
                    };
                    check_error(name, "receiver", n, w, entry);
                }
            }
            "stream" | "malformed_stream" => {
                let records = decode_stream(&bytes);
                let opts = receiver_options(entry, limits);
                let native = drive(NativeEngine.receiver(opts).unwrap(), &records, None);
                let wasm = drive(wasm().receiver(opts).unwrap(), &records, None);
                assert_eq!(native.ops, wasm.ops, "{name}: operations");
                assert_eq!(native.storages, wasm.storages, "{name}: storage bytes");
                match (&native.result, &wasm.result) {
                    (Ok(n), Ok(w)) => {
                        assert_eq!(kind, "stream", "{name}: accepted a malformed stream");
                        assert_eq!(n, w, "{name}: results");
                        let expected = entry["result"]["storages"].as_array().unwrap();
                        assert_eq!(native.storages.len(), expected.len());
                        for (s, bytes) in native.storages.iter().enumerate() {
                            let pattern: Vec<u8> = (0..bytes.len())
                                .map(|i| ((17 * s + i) % 256) as u8)
                                .collect();
                            assert_eq!(bytes, &pattern, "{name}: storage {s}");
                        }
                    }
                    (Err(n), Err(w)) => check_error(name, "stream", n, w, entry),
                    (n, w) => panic!("{name}: native {n:?}, wasm {w:?}"),
                }
            }
            other => panic!("{name}: unknown kind {other}"),
        }
    }
    eprintln!("checked vectors by kind: {counts:?}");
}

fn decode_both(name: &str, kind: &str, entry: &Json, h: &[u8], m: &[u8], limits: &Limits) {
    let native = pgt_wasm::api::decode(h, m, limits)
        .map(|(h, man)| {
            (
                pgt_wasm::api::summary(&h, &man),
                pgt_wasm::api::plan(&man, h.metadata_len),
            )
        })
        .map_err(|e| ErrorInfo::from_core(&e));
    let wasm_summary = wasm().decode(h, m, limits);
    let wasm_plan = wasm().plan(h, m, limits);
    match (native, wasm_summary, wasm_plan) {
        (Ok((ns, np)), Ok(ws), Ok(wp)) => {
            assert_ne!(kind, "malformed", "{name}: a malformed vector decoded");
            assert_eq!(bytes_of(&ns), bytes_of(&ws), "{name}: summaries differ");
            assert_eq!(np, wp, "{name}: plans differ");
            // And both agree with what the vector says it is.
            let man = &entry["manifest"];
            let paths: Vec<&str> = man["paths"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_str().unwrap())
                .collect();
            assert_eq!(ws.paths, paths, "{name}: paths");
            assert_eq!(
                ws.leaves.len() as u64,
                json_u64(&man["leaf_count"]),
                "{name}"
            );
            assert_eq!(
                ws.storages.len() as u64,
                json_u64(&man["storage_count"]),
                "{name}"
            );
            assert_eq!(ws.total_bytes, json_u64(&man["total_bytes"]), "{name}");
            assert_eq!(ws.digests, man["digests"].as_bool().unwrap(), "{name}");
            let messages = man["messages"].as_array().unwrap();
            assert_eq!(wp.messages.len(), messages.len(), "{name}: message count");
            for (w, j) in wp.messages.iter().zip(messages) {
                assert_eq!(w.tag, json_u64(&j["tag"]), "{name}");
                assert_eq!(w.len, json_u64(&j["len"]), "{name}");
                assert_eq!(w.segments.len(), j["segments"].as_array().unwrap().len());
            }
        }
        (Err(n), Err(ws), Err(wp)) => {
            let (ws, wp) = (info(&ws), info(&wp));
            assert_eq!(ws, wp, "{name}: decode and plan errors differ");
            if kind == "malformed" {
                check_error(name, "decode", &n, &ws, entry);
            } else {
                panic!("{name}: {kind} vector failed to decode: {n:?}");
            }
        }
        (n, ws, wp) => panic!(
            "{name}: native {:?}, wasm decode {:?}, wasm plan {:?}",
            n.map(|_| ()),
            ws.map(|_| ()),
            wp.map(|_| ())
        ),
    }
}

fn decode_stream(mut bytes: &[u8]) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let tag = u64::from_le_bytes(bytes[0..8].try_into().unwrap());
        let len = u64::from_le_bytes(bytes[8..16].try_into().unwrap()) as usize;
        out.push((tag, bytes[16..16 + len].to_vec()));
        bytes = &bytes[16 + len..];
    }
    out
}

/// How a test binds storages in place: `(storage, dtype, nbytes)` for each, by the manifest.
type Binder = dyn Fn(&IncomingManifest) -> Vec<(usize, DType, u64)>;

/// What a receiver did with a sequence of messages.
#[derive(Debug)]
struct Outcome {
    /// Every operation it asked for and every binding it reported, as Debug text.
    ops: Vec<String>,
    /// The storages' bytes as received (wire bytes).
    storages: Vec<Vec<u8>>,
    /// The result, as Debug text (bit-exact for floats), or the error.
    result: Result<String, ErrorInfo>,
}

/// Drives a receiver over `records` (tag, bytes), in order, sequentially: each receive completes before
/// the next poll; data are hashed as they land and every finished storage's digest reported at once.
fn drive(
    mut engine: Box<dyn ReceiverEngine>,
    records: &[(u64, Vec<u8>)],
    binder: Option<&Binder>,
) -> Outcome {
    let mut ops = Vec::new();
    let mut storages: Vec<Vec<u8>> = Vec::new();
    let r = (|| -> Result<String> {
        let mut next_record = records.iter();
        let mut hashers: Vec<StorageHasher> = Vec::new();
        loop {
            let next = engine.poll()?;
            ops.push(format!("{next:?}"));
            match next {
                RecvNext::Recv(step) => {
                    let (tag, bytes) = next_record.next().ok_or_else(|| anyhow!("stream ended"))?;
                    // Header, metadata and trailer go to the core as they are (it checks their
                    // lengths); data must fit the plan before the host places them.
                    let data = step.kind == MessageKind::Data;
                    if *tag != step.tag || (data && bytes.len() as u64 != step.len) {
                        bail!("record tag {tag} len {} for {step:?}", bytes.len());
                    }
                    match step.kind {
                        MessageKind::Header => engine.handle_header(bytes)?,
                        MessageKind::Metadata => {
                            let m = engine.handle_metadata(bytes)?;
                            ops.push(format!("{m:?}"));
                            storages = m
                                .storages
                                .iter()
                                .map(|s| vec![0; s.nbytes as usize])
                                .collect();
                            hashers = vec![StorageHasher::new(); storages.len()];
                            if let Some(binder) = binder {
                                for (s, dtype, nbytes) in binder(&m) {
                                    engine.bind_in_place(s, s as u64, dtype, nbytes)?;
                                }
                            }
                        }
                        MessageKind::Data => {
                            let mut at = 0usize;
                            let mut done = Vec::new();
                            for seg in &step.segments {
                                let (s, off, len) =
                                    (seg.storage as usize, seg.offset as usize, seg.len as usize);
                                let part = &bytes[at..at + len];
                                storages[s][off..off + len].copy_from_slice(part);
                                if step.hash {
                                    hashers[s].update(part);
                                    if off + len == storages[s].len() {
                                        done.push((seg.storage, hashers[s].finish()));
                                    }
                                }
                                at += len;
                            }
                            for (s, d) in done {
                                engine.handle_storage_digest(s, d)?;
                            }
                            engine.handle_data(step.message)?;
                        }
                        MessageKind::Trailer => engine.handle_trailer(bytes)?,
                    }
                }
                RecvNext::NeedBindings => {
                    let b = engine.finish_bindings()?;
                    ops.push(format!("{b:?}"));
                }
                RecvNext::Forward(step) => engine.handle_forwarded(step.message)?,
                RecvNext::Wait => bail!("a sequential receiver never waits"),
                RecvNext::Done => break,
            }
        }
        Ok(format!("{:?}", engine.finish()?))
    })();
    Outcome {
        ops,
        storages,
        result: r
            .map_err(|e| try_info(&e).unwrap_or_else(|| ErrorInfo::abi("Host", &format!("{e:#}")))),
    }
}

/// One message on the wire: `(to, tag, bytes)`.
type Wire = (u32, u64, Vec<u8>);

/// Drives a sender to completion over pattern-filled storages: every operation, and the wire messages
/// `(to, tag, bytes)`.
fn send_all(
    factory: &dyn EngineFactory,
    metadata: &Metadata,
    digests: bool,
) -> Result<(Vec<SendNext>, Vec<Wire>), ErrorInfo> {
    (|| -> Result<_> {
        let mut engine = factory.sender(metadata.clone(), digests, &Limits::default())?;
        let storages: Vec<Vec<u8>> = engine
            .storages()
            .iter()
            .enumerate()
            .map(|(s, r)| {
                (0..r.nbytes)
                    .map(|i| ((17 * s as u64 + i) % 256) as u8)
                    .collect()
            })
            .collect();
        let mut hashers = vec![StorageHasher::new(); storages.len()];
        let (mut ops, mut wire) = (Vec::new(), Vec::new());
        loop {
            let next = engine.poll()?;
            ops.push(next.clone());
            let step = match next {
                SendNext::Send(step) => step,
                SendNext::WaitDigests => bail!("all digests were reported"),
                SendNext::Done => break,
            };
            let mut done = Vec::new();
            let bytes = match &step.payload {
                OwnedPayload::Bytes(b) => b.clone(),
                OwnedPayload::Storages(segs) => {
                    let mut out = Vec::new();
                    for seg in segs {
                        let s = seg.storage as usize;
                        let part =
                            &storages[s][seg.offset as usize..(seg.offset + seg.len) as usize];
                        if step.hash {
                            hashers[s].update(part);
                            if seg.offset + seg.len == storages[s].len() as u64 {
                                done.push((seg.storage, hashers[s].finish()));
                            }
                        }
                        out.extend_from_slice(part);
                    }
                    out
                }
            };
            assert_eq!(bytes.len() as u64, step.len);
            wire.push((step.to, step.tag, bytes));
            for (s, d) in done {
                engine.handle_storage_digest(s, d)?;
            }
        }
        Ok((ops, wire))
    })()
    .map_err(|e| info(&e))
}

fn tensor(dtype: DType, shape: &[u64]) -> Leaf {
    Leaf::Tensor(TensorLayout::contiguous(dtype, shape))
}

/// A few state dicts: nested, every fan-out, buckets and chunks, empty storages, values.
fn state_dicts() -> Vec<(String, Metadata)> {
    let mut out = Vec::new();
    let dict = |keys: &[&str]| Node::Dict(keys.iter().map(|k| Key::Str((*k).into())).collect());
    for fanout in [FanOut::Direct, FanOut::Chain] {
        for (bucket, chunk) in [(0, 64), (256, 1024), (1 << 20, 1 << 20)] {
            out.push((
                format!("model {fanout:?} {bucket}/{chunk}"),
                Metadata {
                    step: Some(42),
                    source: 0,
                    destinations: vec![1, 2, 3],
                    plan: PlanParams {
                        fanout,
                        bucket_size: bucket,
                        chunk_size: chunk,
                    },
                    tree: vec![
                        dict(&["model", "opt", "step"]),
                        dict(&["w", "b", "empty"]),
                        Node::Leaf,
                        Node::Leaf,
                        Node::Leaf,
                        Node::List(2),
                        Node::Leaf,
                        Node::Leaf,
                        Node::Leaf,
                    ],
                    leaves: vec![
                        tensor(DType::Float32, &[37, 11]),
                        tensor(DType::BFloat16, &[129]),
                        tensor(DType::Float16, &[0, 3]),
                        tensor(DType::Int64, &[300]),
                        Leaf::Value(Value::Float(f64::from_bits(0x7ff8_0000_0000_beef))),
                        Leaf::Value(Value::Int(7)),
                    ],
                },
            ));
        }
    }
    let mut reference = pgt_core::reference::reference_metadata(
        0,
        vec![1],
        PlanParams {
            fanout: FanOut::Chain,
            bucket_size: 64 << 10,
            chunk_size: 64 << 10,
        },
    );
    // The reference tree's first 300 tensors (bytes enough for a test), as a flat dict.
    let n = 300;
    reference.leaves.truncate(n);
    reference.tree = std::iter::once(Node::Dict((0..n).map(|i| Key::Int(i as i64)).collect()))
        .chain((0..n).map(|_| Node::Leaf))
        .collect();
    out.push(("reference[..300]".into(), reference));
    out
}

#[test]
fn senders_emit_identical_operations_and_bytes() {
    for (name, metadata) in state_dicts() {
        for digests in [false, true] {
            let native = send_all(&NativeEngine, &metadata, digests);
            let wasm = send_all(wasm(), &metadata, digests);
            let (Ok((nops, nwire)), Ok((wops, wwire))) = (&native, &wasm) else {
                panic!("{name}: native {:?}, wasm {:?}", native.err(), wasm.err())
            };
            assert!(nops.len() > 3, "{name}");
            assert_eq!(nops, wops, "{name} digests={digests}: operations");
            assert_eq!(nwire, wwire, "{name} digests={digests}: wire bytes");
        }
    }
}

#[test]
fn invalid_sender_metadata_fails_identically() {
    let (_, mut m) = state_dicts().remove(0);
    m.destinations = vec![1, 0];
    let n = send_all(&NativeEngine, &m, true).unwrap_err();
    let w = send_all(wasm(), &m, true).unwrap_err();
    assert_eq!(n, w);
    assert_eq!(n.name, "SourceIsDestination");
}

/// The records a receiver at `rank` gets from a transfer of `metadata`: header and metadata from the
/// source, data and trailer from the source (direct) or from the previous rank (chain) — the payload
/// bytes are the same either way.
fn records_for(metadata: &Metadata, digests: bool, rank: u32) -> Vec<(u64, Vec<u8>)> {
    let (_, wire) = send_all(&NativeEngine, metadata, digests).unwrap();
    let first = metadata.destinations[0];
    let chain = metadata.plan.fanout == FanOut::Chain;
    wire.into_iter()
        .filter(|(to, tag, _)| *to == rank || (chain && *tag > 2 && *to == first))
        .map(|(_, tag, bytes)| (tag, bytes))
        .collect()
}

fn both(
    metadata: &Metadata,
    digests: bool,
    rank: u32,
    records: &[(u64, Vec<u8>)],
    binder: Option<&Binder>,
) -> (Outcome, Outcome) {
    let opts = ReceiverOptions {
        rank,
        source: metadata.source,
        expected_step: metadata.step,
        limits: Limits::default(),
    };
    let native = drive(NativeEngine.receiver(opts).unwrap(), records, binder);
    let wasm = drive(wasm().receiver(opts).unwrap(), records, binder);
    assert_eq!(
        native.ops, wasm.ops,
        "digests={digests} rank {rank}: operations"
    );
    assert_eq!(native.storages, wasm.storages);
    assert_eq!(native.result, wasm.result);
    (native, wasm)
}

#[test]
fn receivers_agree_on_every_rank_and_mode() {
    for (name, metadata) in state_dicts() {
        for digests in [false, true] {
            for &rank in &metadata.destinations {
                let records = records_for(&metadata, digests, rank);
                let (native, _) = both(&metadata, digests, rank, &records, None);
                if let Err(e) = &native.result {
                    panic!("{name} digests={digests} rank {rank}: {e:?}");
                }
            }
        }
    }
}

#[test]
fn in_place_binding_and_cast_agree() {
    let (_, metadata) = state_dicts().remove(1);
    let records = records_for(&metadata, true, 1);
    // Every float tensor in place, float32 received into float64 (a cast: twice the bytes).
    let cast: &Binder = &|m: &IncomingManifest| {
        m.storages
            .iter()
            .enumerate()
            .filter(|(_, s)| s.dtype == DType::Float32)
            .map(|(i, s)| (i, DType::Float64, s.nbytes * 2))
            .collect()
    };
    let (native, _) = both(&metadata, true, 1, &records, Some(cast));
    let result = native.result.unwrap();
    assert!(result.contains("InPlace(0)") && result.contains("cast_from: Some(Float32)"));
}

#[test]
fn in_place_size_mismatch_names_the_key_path() {
    let (_, metadata) = state_dicts().remove(0);
    let records = records_for(&metadata, false, 1);
    let wrong: &Binder = &|m: &IncomingManifest| {
        let bias = 1; // model.b: bfloat16 [129]
        vec![(bias, m.storages[bias].dtype, m.storages[bias].nbytes + 2)]
    };
    let (native, _) = both(&metadata, false, 1, &records, Some(wrong));
    let e = native.result.unwrap_err();
    assert_eq!(e.name, "InPlaceSizeMismatch");
    assert!(e.message.starts_with("model.b:"), "{}", e.message);
    assert_eq!(
        e.debug,
        "InPlaceSizeMismatch { path: \"model.b\", expected: 258, got: 260 }"
    );
}

#[test]
fn digest_mismatch_is_found_by_both() {
    for fanout in [FanOut::Direct, FanOut::Chain] {
        let (_, mut metadata) = state_dicts().remove(1);
        metadata.plan.fanout = fanout;
        let mut records = records_for(&metadata, true, 1);
        // Flip one bit in the second data message.
        let data = records
            .iter_mut()
            .filter(|(tag, _)| *tag > 2)
            .nth(1)
            .unwrap();
        data.1[5] ^= 0x10;
        let (native, _) = both(&metadata, true, 1, &records, None);
        let e = native.result.unwrap_err();
        assert_eq!(e.name, "DigestMismatch", "{fanout:?}: {e:?}");
        // In chain mode the receiver still forwarded everything before failing.
        if fanout == FanOut::Chain {
            let forwards = native
                .ops
                .iter()
                .filter(|o| o.starts_with("Forward"))
                .count();
            assert_eq!(forwards, records.len() - 2, "{:?}", native.ops);
        }
    }
}

#[test]
fn protocol_order_errors_agree() {
    let (_, metadata) = state_dicts().remove(0);
    let opts = ReceiverOptions {
        rank: 1,
        source: 0,
        expected_step: None,
        limits: Limits::default(),
    };
    let records = records_for(&metadata, false, 1);
    for factory in [&NativeEngine as &dyn EngineFactory, wasm()] {
        let mut r = factory.receiver(opts).unwrap();
        // Metadata before the header, data before anything.
        assert_eq!(
            info(&r.handle_metadata(&records[1].1).unwrap_err()).name,
            "ProtocolState"
        );
        assert_eq!(info(&r.handle_data(2).unwrap_err()).name, "ProtocolState");
        r.handle_header(&records[0].1).unwrap();
        assert_eq!(
            info(&r.handle_header(&records[0].1).unwrap_err()).name,
            "ProtocolState"
        );
        assert_eq!(info(&r.finish().unwrap_err()).name, "Incomplete");
    }
}
