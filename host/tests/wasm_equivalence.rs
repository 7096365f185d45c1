//! pgt-core natively and inside wasmtime ([`WasmEngine`]) decide identically: every golden vector of
//! `tests/vectors/` decodes to the same summary and plan (or the same error, also the one index.json
//! names); senders emit the same operations and wire bytes; receivers go through the same operations and
//! end with the same result or error (in-place size mismatch naming the key path, digest mismatch…).
//!
//! Both engines run through pgt-core's one driver ([`drive::receive`], [`drive::send`]) with its
//! in-memory hosts ([`MemoryHost`], [`MemorySender`]); a [`Recording`] engine logs what each engine
//! decides on the way (every poll result, what the metadata announced, the tree or key paths, bindings).
//!
//! Needs the module: `scripts/build-wasm.sh --raw-only` before `cargo test`.
#![cfg(feature = "wasm")]

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::OnceLock;

use pgt_core::digest::digest;
use pgt_core::drive::{self, Event, SendHost};
use pgt_core::dtype::DType;
use pgt_core::engine::{ReceiveEngine, SendEngine};
use pgt_core::header::Limits;
use pgt_core::layout::TensorLayout;
use pgt_core::manifest::Manifest;
use pgt_core::memory::{MemoryHost, MemorySender};
use pgt_core::plan::{MessageKind, Plan};
use pgt_core::receiver::{
    Binding, Dest, ForwardOp, InPlace, InPlaceWritten, Incoming, Received, ReceiverOptions, RecvOp,
    RecvPoll,
};
use pgt_core::schema::{FanOut, Metadata, PlanParams};
use pgt_core::sender::{DestinationOutcome, Payload, SendOp, SendPoll};
use pgt_core::tree::{Key, KeyPath, Leaf, Node, Value};
use pgt_core::{Call, Error};
use pgt_host::engine::{EngineError, EngineFactory, NativeEngine};
use pgt_host::wasm_engine::WasmEngine;
use pgt_wasm::types::ErrorInfo;
use serde_json::Value as Json;

/// The transfer id of the senders here: both halves non-zero, so that it crosses the raw ABI's two
/// 32-bit arguments visibly.
const TRANSFER_ID: u64 = 0xfedc_ba98_7654_3210;

fn wasm() -> &'static WasmEngine {
    static ENGINE: OnceLock<WasmEngine> = OnceLock::new();
    ENGINE.get_or_init(|| WasmEngine::new().unwrap_or_else(|e| panic!("{e}")))
}

/// A protocol error as both engines report it: pgt-core's own error, with its name and Display text.
fn info(e: &EngineError) -> ErrorInfo {
    let core = e
        .protocol()
        .unwrap_or_else(|| panic!("not a protocol error: {e}"));
    ErrorInfo::from_core(core.clone())
}

/// Why a run failed: the engine (protocol, sandbox, module), or the test's host refusing a message.
#[derive(Debug)]
enum Failure {
    Engine(EngineError),
    Host(String),
}

impl From<EngineError> for Failure {
    fn from(e: EngineError) -> Failure {
        Failure::Engine(e)
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::Engine(EngineError::Protocol(e))
    }
}

impl Failure {
    /// Comparable: a protocol error as [`info`]; anything else by a name of its own and its text.
    fn info(&self) -> ErrorInfo {
        match self {
            Failure::Engine(e) if e.protocol().is_some() => info(e),
            Failure::Engine(e @ EngineError::Module(_)) => ErrorInfo::abi("Module", &e.to_string()),
            Failure::Engine(e @ EngineError::Sandbox(_)) => {
                ErrorInfo::abi("Sandbox", &e.to_string())
            }
            Failure::Engine(e) => ErrorInfo::abi("Engine", &e.to_string()),
            Failure::Host(message) => ErrorInfo::abi("Host", message),
        }
    }
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

/// The same error from both engines (name, Display text, the pgt-core error itself), and the one the
/// entry names: `error` is its name, `error_debug` its Debug form.
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
    let core = native
        .error
        .as_ref()
        .unwrap_or_else(|| panic!("{name}: {what}: not a protocol error: {native:?}"));
    assert_eq!(
        format!("{core:?}"),
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
                    let (native, wasm) = both(name, opts, &records, &[]);
                    let (Err(n), Err(w)) = (&native.result, &wasm.result) else {
                        panic!("{name}: the receivers accepted it")
                    };
                    check_error(name, "receiver", n, w, entry);
                }
            }
            // A stale stream holds messages of another transfer, which both skip by their prefix.
            "stream" | "stale_stream" | "malformed_stream" => {
                let records = decode_stream(&bytes);
                let opts = receiver_options(entry, limits);
                let (native, wasm) = both(name, opts, &records, &[]);
                match (&native.result, &wasm.result) {
                    (Ok(_), Ok(_)) => {
                        assert_ne!(
                            kind, "malformed_stream",
                            "{name}: accepted a malformed stream"
                        );
                        let expected = entry["result"]["storages"].as_array().unwrap();
                        assert_eq!(native.storages.len(), expected.len(), "{name}");
                        for (s, (bytes, e)) in native.storages.iter().zip(expected).enumerate() {
                            let pattern: Vec<u8> = (0..bytes.len())
                                .map(|i| ((17 * s + i) % 256) as u8)
                                .collect();
                            assert_eq!(bytes, &pattern, "{name}: storage {s}");
                            assert_eq!(bytes.len() as u64, json_u64(&e["nbytes"]), "{name}: {s}");
                            assert_eq!(
                                format!("0x{:016x}", digest(bytes)),
                                e["digest"].as_str().unwrap(),
                                "{name}: storage {s}"
                            );
                        }
                    }
                    (Err(n), Err(w)) => check_error(name, "stream", n, w, entry),
                    (n, w) => panic!("{name}: native {n:?}, wasm {w:?}"),
                }
            }
            "host_reject_stream" => {
                // The host refuses a message before the core sees it: both engines asked for the same
                // messages up to there, and the refusal is the one the entry names.
                let records = decode_stream(&bytes);
                let opts = receiver_options(entry, limits);
                let (native, wasm) = both(name, opts, &records, &[]);
                let h = &entry["host_error"];
                let lengths = (h["reason"] == "length")
                    .then(|| (json_u64(&h["expected"]), json_u64(&h["got"])));
                let want = host_refusal(
                    h["reason"].as_str().unwrap(),
                    json_u64(&h["from"]) as u32,
                    json_u64(&h["tag"]),
                    lengths,
                );
                for (engine, result) in [("native", &native.result), ("wasm", &wasm.result)] {
                    match result {
                        Err(e) => assert_eq!(
                            (e.name.as_str(), e.message.as_str()),
                            ("Host", want.as_str()),
                            "{name}: {engine}"
                        ),
                        Ok(r) => panic!("{name}: {engine} accepted it: {r:?}"),
                    }
                }
            }
            other => panic!("{name}: unknown kind {other}"),
        }
    }
    eprintln!("checked vectors by kind: {counts:?}");
}

fn decode_both(name: &str, kind: &str, entry: &Json, h: &[u8], m: &[u8], limits: &Limits) {
    let native = pgt_wasm::api::decode(h, m, limits)
        .map(|(h, man)| (pgt_wasm::api::summary(&h, &man), man.plan(h.metadata_len)))
        .map_err(ErrorInfo::from_core);
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
            assert_eq!(wp.messages().len(), messages.len(), "{name}: message count");
            for (w, j) in wp.messages().iter().zip(messages) {
                assert_eq!(w.tag, json_u64(&j["tag"]), "{name}");
                assert_eq!(w.len, json_u64(&j["len"]), "{name}");
                assert_eq!(
                    wp.segments(w).len(),
                    j["segments"].as_array().unwrap().len(),
                    "{name}"
                );
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

/// An engine that logs, as Debug text, what the engine it wraps decides: every poll result, what the
/// metadata announced, the tree or key paths and the bindings. Every call is delegated as it is.
struct Recording<'a, E> {
    engine: E,
    log: &'a mut Vec<String>,
}

impl<'a, E> Recording<'a, E> {
    fn new(engine: E, log: &'a mut Vec<String>) -> Self {
        Recording { engine, log }
    }

    fn record<T: std::fmt::Debug>(&mut self, v: T) -> T {
        self.log.push(format!("{v:?}"));
        v
    }
}

impl<E: ReceiveEngine> ReceiveEngine for Recording<'_, E> {
    type Error = E::Error;

    fn poll(&mut self) -> Result<RecvPoll, E::Error> {
        let p = self.engine.poll()?;
        Ok(self.record(p))
    }

    fn handle_header(&mut self, bytes: &[u8]) -> Result<(), E::Error> {
        self.engine.handle_header(bytes)
    }

    fn handle_metadata(&mut self, bytes: &[u8]) -> Result<Incoming, E::Error> {
        let incoming = self.engine.handle_metadata(bytes)?;
        Ok(self.record(incoming))
    }

    fn tree(&mut self) -> Result<Vec<Node>, E::Error> {
        let nodes = self.engine.tree()?;
        Ok(self.record(nodes))
    }

    fn paths(&mut self) -> Result<Vec<KeyPath>, E::Error> {
        let paths = self.engine.paths()?;
        Ok(self.record(paths))
    }

    fn finish_bindings(&mut self, in_place: &[InPlace]) -> Result<Vec<Binding>, E::Error> {
        let bindings = self.engine.finish_bindings(in_place)?;
        Ok(self.record(bindings))
    }

    fn handle_data(&mut self, message: u32) -> Result<(), E::Error> {
        self.engine.handle_data(message)
    }

    fn handle_digests(&mut self, message: u32, digests: &[u64]) -> Result<(), E::Error> {
        self.engine.handle_digests(message, digests)
    }

    fn handle_trailer(&mut self, bytes: &[u8]) -> Result<(), E::Error> {
        self.engine.handle_trailer(bytes)
    }

    fn handle_forwarded(&mut self, message: u32) -> Result<(), E::Error> {
        self.engine.handle_forwarded(message)
    }

    fn in_place_written(&mut self, not_in_target: &[u32]) -> Result<InPlaceWritten, E::Error> {
        let written = self.engine.in_place_written(not_in_target)?;
        self.log.push(format!("InPlaceWritten({written:?})"));
        Ok(written)
    }

    fn leftover(&mut self) -> Result<Option<RecvOp>, E::Error> {
        let op = self.engine.leftover()?;
        self.log.push(format!("Leftover({op:?})"));
        Ok(op)
    }

    fn finish(self) -> Result<Received, E::Error> {
        self.engine.finish()
    }
}

impl<E: SendEngine> SendEngine for Recording<'_, E> {
    type Error = E::Error;

    fn plan(&self) -> &Plan {
        self.engine.plan()
    }

    fn poll(&mut self) -> Result<SendPoll, E::Error> {
        let p = self.engine.poll()?;
        Ok(self.record(p))
    }

    fn message_bytes(&mut self, message: u32) -> Result<Cow<'_, [u8]>, E::Error> {
        self.engine.message_bytes(message)
    }

    fn handle_digests(&mut self, message: u32, digests: &[u64]) -> Result<(), E::Error> {
        self.engine.handle_digests(message, digests)
    }

    fn destination_outcome(&mut self, failed: &[u32]) -> Result<DestinationOutcome, E::Error> {
        self.engine.destination_outcome(failed)
    }
}

/// How the test's host words its refusal of a stream: the fields of a `host_reject_stream` entry's
/// `host_error` (`lengths`: expected, got).
fn host_refusal(reason: &str, from: u32, tag: u64, lengths: Option<(u64, u64)>) -> String {
    let mut s = format!("{reason}: tag {tag} from rank {from}");
    if let Some((expected, got)) = lengths {
        s += &format!(", {got} bytes, expected {expected}");
    }
    s
}

/// What a receiver did with a sequence of messages.
#[derive(Debug)]
struct Outcome {
    /// What the engine decided, as Debug text ([`Recording`]).
    ops: Vec<String>,
    /// Every storage's destination bytes.
    storages: Vec<Vec<u8>>,
    /// Every forward: the op and its bytes.
    forwards: Vec<(ForwardOp, Vec<u8>)>,
    /// Records the receiver never asked for.
    left_over: usize,
    /// The result, or the error.
    result: Result<Received, ErrorInfo>,
}

impl Outcome {
    /// The result, comparable bit-exactly (floats as their bits).
    fn result_bytes(&self) -> Result<Vec<u8>, &ErrorInfo> {
        self.result.as_ref().map(bytes_of)
    }
}

/// Runs a receiver of `factory` through the driver over `records` `(tag, bytes)`: each receive takes
/// the next record, in order. A record of another tag is not the message asked for, which then never
/// comes ("missing"); a data record must be as long as the plan says ("length"), unless it is another
/// transfer's (the in-memory host skips it); header, metadata and trailer records go to the core as
/// they are (it checks their lengths). `in_place` are the buffers
/// offered for in-place binding ([`MemoryHost::in_place`]).
fn receive(
    factory: &dyn EngineFactory,
    options: ReceiverOptions,
    records: &[(u64, Vec<u8>)],
    in_place: &[(InPlace, Vec<u8>)],
) -> Outcome {
    let mut ops = Vec::new();
    let mut next = records.iter();
    let source = |op: &RecvOp| -> Result<Vec<u8>, Failure> {
        let refuse =
            |reason, lengths| Failure::Host(host_refusal(reason, op.from, op.tag, lengths));
        match next.next() {
            Some((tag, _)) if *tag != op.tag => Err(refuse("missing", None)),
            None => Err(refuse("missing", None)),
            Some((_, bytes))
                if op.kind == MessageKind::Data
                    && !op.is_stale(bytes)
                    && bytes.len() as u64 != op.len =>
            {
                Err(refuse("length", Some((op.len, bytes.len() as u64))))
            }
            Some((_, bytes)) => Ok(bytes.clone()),
        }
    };
    let mut host = MemoryHost::new(source)
        .in_place(in_place.to_vec())
        .keep_paths();
    let result = factory
        .receiver(options)
        .map_err(Failure::from)
        .and_then(|engine| drive::receive(Recording::new(engine, &mut ops), &mut host));
    let forwards = std::mem::take(&mut host.forwards);
    let storages = host.into_storages();
    Outcome {
        ops,
        storages,
        forwards,
        left_over: next.len(),
        result: result.map_err(|e| e.info()),
    }
}

/// Runs a receiver of each engine over `records` and checks that they did the same: the same
/// operations, bytes, forwards and result or error. A sequential run never waits, and a successful
/// one consumes every record.
fn both(
    what: &str,
    options: ReceiverOptions,
    records: &[(u64, Vec<u8>)],
    in_place: &[(InPlace, Vec<u8>)],
) -> (Outcome, Outcome) {
    let native = receive(&NativeEngine, options, records, in_place);
    let wasm = receive(wasm(), options, records, in_place);
    assert_eq!(native.ops, wasm.ops, "{what}: operations");
    assert_eq!(native.storages, wasm.storages, "{what}: storage bytes");
    assert_eq!(native.forwards, wasm.forwards, "{what}: forwards");
    assert_eq!(
        native.result_bytes(),
        wasm.result_bytes(),
        "{what}: results"
    );
    assert!(
        !native.ops.iter().any(|o| o == "Wait"),
        "{what}: a sequential receiver never waits: {:?}",
        native.ops
    );
    if native.result.is_ok() {
        assert_eq!(native.left_over, 0, "{what}: records left over");
    }
    (native, wasm)
}

/// [`MemorySender`] for an engine whose errors are [`EngineError`]s (its own are pgt-core's).
struct Sending<'a>(MemorySender<'a>);

impl SendHost for Sending<'_> {
    type Error = EngineError;

    fn send(&mut self, op: &SendOp, payload: Payload<'_>) -> Result<(), EngineError> {
        Ok(self.0.send(op, payload)?)
    }

    fn next_event(&mut self, wait: bool) -> Result<Option<Event>, EngineError> {
        Ok(self.0.next_event(wait)?)
    }

    fn flush(&mut self) -> Result<(), EngineError> {
        Ok(self.0.flush()?)
    }
}

/// What a sender did.
#[derive(Debug)]
struct Sent {
    /// Every poll result, as Debug text ([`Recording`]).
    ops: Vec<String>,
    /// The plan it followed.
    plan: Plan,
    /// Every message it sent, in order: the op and the wire bytes.
    wire: Vec<(SendOp, Vec<u8>)>,
}

/// Runs a sender of `factory` through the driver over pattern-filled storages (byte `i` of storage
/// `s` is `(17·s + i) mod 256`).
fn send_all(
    factory: &dyn EngineFactory,
    metadata: &Metadata,
    digests: bool,
) -> Result<Sent, ErrorInfo> {
    let limits = Limits::default();
    let engine = factory
        .sender(metadata.clone(), digests, &limits, TRANSFER_ID)
        .map_err(|e| info(&e))?;
    let storages: Vec<Vec<u8>> = Manifest::new(metadata.clone(), digests, &limits)
        .expect("the engine accepted the metadata")
        .storages()
        .iter()
        .enumerate()
        .map(|(s, r)| {
            (0..r.nbytes)
                .map(|i| ((17 * s as u64 + i) % 256) as u8)
                .collect()
        })
        .collect();
    let mut ops = Vec::new();
    let mut host = Sending(MemorySender::new(&storages));
    let plan = {
        let mut recording = Recording::new(engine, &mut ops);
        drive::send(&mut recording, &mut host).map_err(|e| info(&e))?;
        recording.engine.plan().clone()
    };
    assert!(
        !ops.iter().any(|o| o == "WaitDigests"),
        "every digest was reported at once: {ops:?}"
    );
    for (op, bytes) in &host.0.sent {
        assert_eq!(bytes.len() as u64, op.len, "{op:?}");
    }
    Ok(Sent {
        ops,
        plan,
        wire: host.0.sent,
    })
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
    let limits = Limits::default();
    for (name, metadata) in state_dicts() {
        for digests in [false, true] {
            let (native, sandboxed) = (
                send_all(&NativeEngine, &metadata, digests),
                send_all(wasm(), &metadata, digests),
            );
            let (Ok(n), Ok(w)) = (&native, &sandboxed) else {
                panic!(
                    "{name}: native {:?}, wasm {:?}",
                    native.err(),
                    sandboxed.err()
                )
            };
            assert!(n.ops.len() > 3, "{name}");
            assert_eq!(n.ops, w.ops, "{name} digests={digests}: operations");
            assert_eq!(n.plan, w.plan, "{name} digests={digests}: plans");
            assert_eq!(n.wire, w.wire, "{name} digests={digests}: wire bytes");
            // pgt_encode's header and metadata are the ones the senders sent.
            let encoded =
                pgt_wasm::api::encode(metadata.clone(), digests, &limits, TRANSFER_ID).unwrap();
            let wasm_encoded = wasm()
                .encode(&metadata, digests, &limits, TRANSFER_ID)
                .unwrap();
            assert_eq!(encoded, wasm_encoded, "{name} digests={digests}: encode");
            for (op, bytes) in &n.wire {
                match op.kind {
                    MessageKind::Header => assert_eq!(&encoded.header, bytes, "{name}: header"),
                    MessageKind::Metadata => {
                        assert_eq!(&encoded.metadata, bytes, "{name}: metadata")
                    }
                    _ => {}
                }
            }
        }
    }
}

#[test]
fn destination_outcomes_are_the_cores_in_both_engines() {
    let limits = Limits::default();
    for fanout in [FanOut::Chain, FanOut::Direct] {
        let mut metadata = pgt_core::reference::reference_metadata(
            0,
            vec![4, 2, 7, 9],
            PlanParams {
                fanout,
                ..PlanParams::default()
            },
        );
        metadata.leaves.truncate(1);
        metadata.tree = vec![Node::List(1), Node::Leaf];
        let mut native = NativeEngine
            .sender(metadata.clone(), true, &limits, TRANSFER_ID)
            .unwrap();
        let mut sandboxed = wasm()
            .sender(metadata.clone(), true, &limits, TRANSFER_ID)
            .unwrap();
        for failed in [&[][..], &[2], &[9, 2], &[4], &[9], &[4, 2, 7, 9], &[5]] {
            let expected = pgt_core::sender::destination_outcome(fanout, &[4, 2, 7, 9], failed);
            assert_eq!(native.destination_outcome(failed).unwrap(), expected);
            assert_eq!(
                sandboxed.destination_outcome(failed).unwrap(),
                expected,
                "{fanout:?} failed {failed:?}"
            );
        }
    }
    // A chain cut at 2 leaves 4 live and cuts off 7 and 9 (the policy itself: pgt-core's tests).
    let o = pgt_core::sender::destination_outcome(FanOut::Chain, &[4, 2, 7, 9], &[2]);
    assert_eq!((o.live, o.cut_off), (vec![4], vec![7, 9]));
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
    let sent = send_all(&NativeEngine, metadata, digests).unwrap();
    let first = metadata.destinations[0];
    let chain = metadata.plan.fanout == FanOut::Chain;
    sent.wire
        .into_iter()
        .filter(|(op, _)| op.to == rank || (chain && op.tag > 2 && op.to == first))
        .map(|(op, bytes)| (op.tag, bytes))
        .collect()
}

fn options(metadata: &Metadata, rank: u32) -> ReceiverOptions {
    ReceiverOptions {
        rank,
        source: metadata.source,
        expected_step: metadata.step,
        limits: Limits::default(),
    }
}

#[test]
fn receivers_agree_on_every_rank_and_mode() {
    for (name, metadata) in state_dicts() {
        for digests in [false, true] {
            for &rank in &metadata.destinations {
                let what = format!("{name} digests={digests} rank {rank}");
                let records = records_for(&metadata, digests, rank);
                let (native, _) = both(&what, options(&metadata, rank), &records, &[]);
                if let Err(e) = &native.result {
                    panic!("{what}: {e:?}");
                }
            }
        }
    }
}

/// The storages of `metadata` (as a sender validates it).
fn storages_of(metadata: &Metadata, digests: bool) -> Vec<pgt_core::manifest::StorageRef> {
    Manifest::new(metadata.clone(), digests, &Limits::default())
        .unwrap()
        .storages()
        .to_vec()
}

#[test]
fn in_place_binding_and_cast_agree() {
    let (_, metadata) = state_dicts().remove(1);
    let records = records_for(&metadata, true, 1);
    // Every float32 tensor in place, received into float64 (a cast: twice the bytes).
    let cast: Vec<(InPlace, Vec<u8>)> = storages_of(&metadata, true)
        .iter()
        .enumerate()
        .filter(|(_, s)| s.dtype == DType::Float32)
        .map(|(i, s)| {
            let target = InPlace {
                storage: i as u32,
                id: i as u64,
                dtype: DType::Float64,
                nbytes: s.nbytes * 2,
            };
            (target, vec![0xa5; target.nbytes as usize])
        })
        .collect();
    assert!(!cast.is_empty());
    let (native, _) = both("cast", options(&metadata, 1), &records, &cast);
    let result = native.result.unwrap();
    let b = &result.bindings[0];
    assert_eq!(
        (b.dest, b.dtype, b.cast_from),
        (Dest::InPlace(0), DType::Float64, Some(DType::Float32)),
        "{result:?}"
    );
    // The cast landed: storage 0 holds float64 values of the float32 pattern.
    let wire: Vec<u8> = (0..cast[0].0.nbytes / 2).map(|i| (i % 256) as u8).collect();
    let expected: Vec<u8> = wire
        .chunks_exact(4)
        .flat_map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes())
        .collect();
    assert!(
        native.storages[0] == expected,
        "storage 0 was not cast from the pattern"
    );
}

#[test]
fn in_place_size_mismatch_names_the_key_path() {
    let (_, metadata) = state_dicts().remove(0);
    let records = records_for(&metadata, false, 1);
    let bias = 1; // model.b: bfloat16 [129]
    let s = &storages_of(&metadata, false)[bias];
    let target = InPlace {
        storage: bias as u32,
        id: bias as u64,
        dtype: s.dtype,
        nbytes: s.nbytes + 2,
    };
    let wrong = [(target, vec![0; target.nbytes as usize])];
    let (native, _) = both("size mismatch", options(&metadata, 1), &records, &wrong);
    let e = native.result.unwrap_err();
    assert_eq!(e.name, "InPlaceSizeMismatch");
    assert!(e.message.starts_with("['model']['b']:"), "{}", e.message);
    assert_eq!(
        format!("{:?}", e.error.unwrap()),
        "InPlaceSizeMismatch { path: \"['model']['b']\", expected: 258, got: 260 }"
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
        // A storage byte, after the 8-byte prefix.
        data.1[8 + 5] ^= 0x10;
        let (native, _) = both(&format!("{fanout:?}"), options(&metadata, 1), &records, &[]);
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
            assert_eq!(native.forwards.len(), forwards);
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
    let unexpected = |call| Some(Error::UnexpectedCall { call });
    for factory in [&NativeEngine as &dyn EngineFactory, wasm()] {
        let mut r = factory.receiver(opts).unwrap();
        // Metadata before the header, data before anything.
        let e = r.handle_metadata(&records[1].1).unwrap_err();
        assert_eq!(
            e.protocol(),
            unexpected(Call::Metadata).as_ref(),
            "{factory:?}"
        );
        let e = r.handle_data(2).unwrap_err();
        assert_eq!(e.protocol(), unexpected(Call::Data).as_ref(), "{factory:?}");
        r.handle_header(&records[0].1).unwrap();
        let e = r.handle_header(&records[0].1).unwrap_err();
        assert_eq!(
            e.protocol(),
            unexpected(Call::Header).as_ref(),
            "{factory:?}"
        );
        let e = r.finish().unwrap_err();
        assert_eq!(e.protocol(), Some(&Error::Incomplete), "{factory:?}");
    }
}
