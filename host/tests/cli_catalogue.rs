//! The bad-input catalogue (PROTOCOL.md §12) on a live receiver: every input a hostile peer can send as
//! a byte stream, fed to a `pgt recv` process over TCP.
//!
//! The attacker is this test: it joins a real TCP job with [`TcpProcessGroup`] (it knows the job token:
//! an insider) as every rank but the receiver's, and sends *raw frames* it builds itself — header,
//! metadata message (with its transfer-id prefix), data, trailer, or anything else — not through
//! `Transport`, so it can send anything. The receiver is `pgt recv --out DIR/out.safetensors`. For every
//! input the test asserts the exit code (1: README, "Errors are one line on stderr and exit code 1"),
//! the one-line named error on stderr, the receiver's **peak resident memory** — at most 64 MiB plus
//! the bytes sent to it, frames and their headers (issue 10's bound) — that a receiver that gives up
//! waiting does so within its timeout + 1 s, and that `DIR` is empty afterwards (no file, no temporary
//! file). The cases run one after another, each receiver killed after [`HANG`]; the test prints one
//! line per case and the highest peak of each catalogue row (PROTOCOL.md quotes them).
//!
//! Inputs: every `malformed`, `receiver_reject`, `malformed_stream` and `host_reject_stream` golden
//! vector of `tests/vectors/index.json` (data-driven: a new vector is covered by this test as it is
//! added; a new kind of vector fails it until it is covered; a vector's own receiver options and limits
//! become `pgt recv` flags), every `stream` and `stale_stream` one as
//! a control that must be received and written byte-exact, and hand-built inputs for issue 10's content
//! classes: a stride-0 view writing terabytes (#2), storages announced and never sent (#3), metadata
//! amplification within the caps (#4), a flood of frames nobody asks for (#5), a value the safetensors
//! library refuses (#7), ranks outside the job (#9), and a sender that stalls.
//!
//! Peak memory is the receiver's own `VmHWM` (`/proc/<pid>/status`), read when it exits: the test
//! traces the child (`PTRACE_O_TRACEEXIT`), which stops it at its exit while its memory is still
//! mapped. Neither sampling `VmHWM` while it runs (it misses the end) nor `wait4`'s `ru_maxrss` (Linux
//! counts into it the high-water mark of the memory the process had before `execve`, i.e. this test's
//! own) is exact per child. Linux only (`/proc`, ptrace of one's own child, which Yama's default
//! `ptrace_scope` of 1 allows).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pgt_core::codec;
use pgt_core::digest::digest;
use pgt_core::dtype::DType;
use pgt_core::header::{prefix, Header, FLAG_DIGESTS, VERSION};
use pgt_core::layout::TensorLayout;
use pgt_core::scan::decoded_size_budget;
use pgt_core::schema::PlanParams;
use pgt_core::tree::{Leaf, Node, Value};
use pgt_host::pg::{PgError, ProcessGroup, TcpOptions, TcpProcessGroup, FRAME_HEADER_LEN};
use pgt_host::state_dict::{Entry, StateDict};
use pgt_host::transport::{Transport, TransportOptions};
use serde_json::Value as Json;

mod hostile;
use hostile::{broadcast, deep_nones, encode, f32s, files_in, free_port, row_sharded_spec, varint};

const PGT: &str = env!("CARGO_BIN_EXE_pgt");
const MIB: u64 = 1 << 20;
/// Issue 10: a receiver's peak memory under any hostile input stays within this plus the bytes sent.
const ALLOWANCE: u64 = 64 * MIB;
/// No receiver may run longer than this: a hang fails the case instead of stalling the suite.
const HANG: Duration = Duration::from_secs(30);
/// `pgt recv --timeout` (seconds): how long a receiver waits for a message that does not come.
const TIMEOUT_SECS: u64 = 1;

// ---- the inputs ----

/// One input: a job, the frames the attacker sends, what the receiver must do.
struct Case {
    name: String,
    /// Its row of the catalogue (PROTOCOL.md §12).
    row: &'static str,
    world: u32,
    /// The receiver's rank and the rank it receives from.
    rank: u32,
    src: u32,
    /// More `pgt recv` flags.
    flags: Vec<String>,
    /// `pgt recv --timeout`, seconds.
    timeout: u64,
    sends: Vec<Out>,
    expect: Expect,
}

/// What the attacker sends, in order.
enum Out {
    /// One frame from rank `from`.
    Frame { from: u32, tag: u64, bytes: Vec<u8> },
    /// `count` empty frames from rank `from`, with tags `first`, `first + 1`, …
    Empty { from: u32, first: u64, count: u64 },
}

enum Expect {
    /// Exit code 1 and one line on stderr, `pgt: error: ` then these pieces in this order (and nothing
    /// else when `exact`). `times_out`: the receiver gave up waiting, within its timeout + 1 s of the
    /// last frame sent.
    Refused {
        pieces: Vec<String>,
        exact: bool,
        times_out: bool,
    },
    /// Exit code 0 and `out.safetensors` written (nothing else in the directory), with these tensors
    /// (name, XXH3-64 of their bytes).
    Written { digests: Vec<(String, u64)> },
}

impl Expect {
    fn line(line: String) -> Expect {
        Expect::Refused {
            pieces: vec![line],
            exact: true,
            times_out: false,
        }
    }
    fn pieces(pieces: &[&str]) -> Expect {
        Expect::Refused {
            pieces: pieces.iter().map(|p| p.to_string()).collect(),
            exact: false,
            times_out: false,
        }
    }
    fn timeout(pieces: &[&str]) -> Expect {
        Expect::Refused {
            pieces: pieces.iter().map(|p| p.to_string()).collect(),
            exact: false,
            times_out: true,
        }
    }
}

impl Case {
    fn new(name: impl Into<String>, row: &'static str, sends: Vec<Out>, expect: Expect) -> Case {
        Case {
            name: name.into(),
            row,
            world: 2,
            rank: 1,
            src: 0,
            flags: Vec::new(),
            timeout: TIMEOUT_SECS,
            sends,
            expect,
        }
    }

    fn flags(mut self, flags: &[&str]) -> Case {
        self.flags.extend(flags.iter().map(|f| f.to_string()));
        self
    }
}

/// A header (digests on) and a metadata message announcing `metadata`, from rank 0.
fn header_and_metadata(metadata: &[u8], id: u64) -> Vec<Out> {
    let header = Header {
        version: VERSION,
        flags: FLAG_DIGESTS,
        metadata_len: metadata.len() as u64,
        metadata_digest: digest(metadata),
        transfer_id: id,
    };
    vec![
        frame(0, 1, header.to_bytes().to_vec()),
        frame(0, 2, [&prefix(id)[..], metadata].concat()),
    ]
}

fn frame(from: u32, tag: u64, bytes: Vec<u8>) -> Out {
    Out::Frame { from, tag, bytes }
}

// ---- golden vectors ----

fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/vectors")
}

/// The kinds of vector this test feeds to a receiver, and the kinds it does not (metadata that is
/// valid alone: its transfers are the `stream` vectors).
const FED: &[&str] = &[
    "malformed",
    "receiver_reject",
    "malformed_stream",
    "host_reject_stream",
    "stream",
    "stale_stream",
];
const NOT_FED: &[&str] = &["valid_metadata"];

fn vector_cases() -> Vec<Case> {
    let index: Json =
        serde_json::from_slice(&std::fs::read(vectors_dir().join("index.json")).unwrap()).unwrap();
    let default_limits: Json = index["default_limits"].clone();
    let mut cases = Vec::new();
    for v in index["vectors"].as_array().unwrap() {
        let kind = v["kind"].as_str().unwrap();
        let file = v["file"].as_str().unwrap();
        assert!(
            FED.contains(&kind) || NOT_FED.contains(&kind),
            "{file}: a new kind of vector, {kind:?}: feed it to the receiver here"
        );
        if NOT_FED.contains(&kind) {
            continue;
        }
        let bytes = std::fs::read(vectors_dir().join(file)).unwrap();
        let case = match kind {
            "malformed" | "receiver_reject" => header_vector(v, &bytes, &default_limits),
            _ => stream_vector(v, &bytes, &default_limits),
        };
        cases.push(case);
    }
    cases
}

/// The receiver options of a vector: its `receiver` (rank, source, expected step), else rank 1
/// receiving from rank 0; `--limits` flags for the limits it has other than the defaults.
fn receiver_of(v: &Json, default_limits: &Json) -> (u32, u32, Vec<String>) {
    let r = &v["receiver"];
    let rank = r["rank"].as_u64().unwrap_or(1) as u32;
    let src = r["source"].as_u64().unwrap_or(0) as u32;
    let mut flags = Vec::new();
    if let Some(step) = r["expected_step"].as_u64() {
        flags.extend(["--expect-step".into(), step.to_string()]);
    }
    if let Some(limits) = v["limits"].as_object() {
        for (name, value) in limits {
            if *value != default_limits[name] {
                // `max_leaves` → `--max-leaves`.
                flags.extend([format!("--{}", name.replace('_', "-")), value.to_string()]);
            }
        }
    }
    (rank, src, flags)
}

/// A header + metadata vector (`malformed`, `receiver_reject`): the header message and the metadata
/// message, from the source.
fn header_vector(v: &Json, bytes: &[u8], default_limits: &Json) -> Case {
    let file = v["file"].as_str().unwrap();
    let header_len = v["header_len"].as_u64().unwrap() as usize;
    let (rank, src, flags) = receiver_of(v, default_limits);
    let error = core_error(v);
    let expect = match error {
        // A metadata message of another transfer is stale: the host skips it, unused, and waits for
        // this transfer's (PROTOCOL.md §12, "Transfers cannot mix"), which never comes.
        pgt_core::Error::TransferMismatch { message: 1, .. } => {
            let e = PgError::Timeout {
                peer: src,
                tag: 2,
                after: Duration::from_secs(TIMEOUT_SECS),
            };
            Expect::Refused {
                pieces: vec![format!("receiving from rank {src}: {e}")],
                exact: true,
                times_out: true,
            }
        }
        _ => Expect::line(format!(
            "receiving from rank {src}: {}",
            as_received(&error, src, 1, 2)
        )),
    };
    let row = if v["kind"] == "receiver_reject" {
        "receiver_reject"
    } else {
        "malformed"
    };
    Case {
        world: rank.max(src) + 1,
        rank,
        src,
        flags,
        ..Case::new(
            file,
            row,
            vec![
                frame(src, 1, bytes[..header_len].to_vec()),
                frame(src, 2, bytes[header_len..].to_vec()),
            ],
            expect,
        )
    }
}

/// A stream vector: its records in order, each from the rank that sent it.
fn stream_vector(v: &Json, bytes: &[u8], default_limits: &Json) -> Case {
    let file = v["file"].as_str().unwrap();
    let kind = v["kind"].as_str().unwrap();
    let (rank, src, flags) = receiver_of(v, default_limits);
    let mut sends = Vec::new();
    let mut rest = bytes;
    let records = v["records"].as_array().map_or(&[][..], |r| &r[..]);
    let mut world = rank.max(src) + 1;
    let mut last_tag = 0;
    while !rest.is_empty() {
        let tag = u64::from_le_bytes(rest[..8].try_into().unwrap());
        let len = u64::from_le_bytes(rest[8..16].try_into().unwrap()) as usize;
        // Records from another rank than the source (a chain's upstream) say so in index.json.
        let from = records
            .get(sends.len())
            .and_then(|r| r["from"].as_u64())
            .map_or(src, |f| f as u32);
        world = world.max(from + 1);
        sends.push(frame(from, tag, rest[16..16 + len].to_vec()));
        last_tag = tag;
        rest = &rest[16 + len..];
    }
    let timeout = Duration::from_secs(TIMEOUT_SECS);
    let (row, expect) = match kind {
        "malformed_stream" => (
            "malformed_stream",
            Expect::line(format!(
                "receiving from rank {src}: {}",
                as_received(&core_error(v), src, last_tag, last_tag)
            )),
        ),
        "host_reject_stream" => {
            let h = &v["host_error"];
            let (from, tag) = (
                h["from"].as_u64().unwrap() as u32,
                h["tag"].as_u64().unwrap(),
            );
            match h["reason"].as_str().unwrap() {
                // The process group refuses it (PROTOCOL.md §12): the receive of a data message
                // names the message and its rank.
                "length" => {
                    let e = PgError::LengthMismatch {
                        peer: from,
                        tag,
                        expected: h["expected"].as_u64().unwrap(),
                        got: h["got"].as_u64().unwrap(),
                    };
                    (
                        "host_reject_stream",
                        Expect::pieces(&[
                            &format!("receiving from rank {src}: receiving message "),
                            &format!(" from rank {from}: {e}"),
                        ]),
                    )
                }
                "missing" => {
                    let e = PgError::Timeout {
                        peer: from,
                        tag,
                        after: timeout,
                    };
                    (
                        "host_reject_stream",
                        Expect::timeout(&[&format!("receiving from rank {src}: "), &e.to_string()]),
                    )
                }
                r => panic!("{file}: unknown host_error reason {r:?}"),
            }
        }
        "stream" | "stale_stream" => {
            // `pgt recv` refuses ranks outside the job (DTensor meshes, shard placements): the job
            // has every rank the result names, unless one is beyond any job this test forms.
            let named = named_ranks(&v["result"]["leaves"]);
            let within: Vec<u64> = named.iter().copied().filter(|&r| r < 16).collect();
            world = world.max(within.iter().map(|&r| r as u32 + 1).max().unwrap_or(0));
            match named.iter().find(|&&r| r >= u64::from(world)) {
                Some(r) => (
                    "stream",
                    Expect::pieces(&[&format!(
                        "refusing the checkpoint: shard placed on rank {r}, outside the process group of {world} ranks"
                    )]),
                ),
                None => (
                    if kind == "stale_stream" { "stale_stream" } else { "stream" },
                    Expect::Written {
                        digests: written_digests(&v["result"]),
                    },
                ),
            }
        }
        k => panic!("{file}: {k}"),
    };
    Case {
        world,
        rank,
        src,
        flags,
        ..Case::new(file, row, sends, expect)
    }
}

/// Every rank a result's leaves name: DTensor mesh ranks, ShardedTensor placements.
fn named_ranks(leaves: &Json) -> Vec<u64> {
    let mut ranks = Vec::new();
    for leaf in leaves.as_array().unwrap() {
        if let Some(mesh) = leaf["spec"]["mesh"]["ranks"].as_array() {
            ranks.extend(mesh.iter().map(|r| r.as_u64().unwrap()));
        }
        let placements = leaf["global"]["shards"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(leaf["local_shards"].as_array().into_iter().flatten());
        for p in placements {
            let p = p["placement"]
                .as_str()
                .or(p["meta"]["placement"].as_str())
                .unwrap();
            let rank = p["rank:".len()..p.find('/').unwrap()]
                .parse::<u64>()
                .unwrap();
            ranks.push(rank);
        }
    }
    ranks
}

/// The tensors a `stream` vector's receiver writes, with the digests of their bytes: those of the
/// storages whose key path no other storage has (a tensor or DTensor over its whole storage is written
/// as the storage's bytes, under its key path's dotted name).
fn written_digests(result: &Json) -> Vec<(String, u64)> {
    let storages = result["storages"].as_array().unwrap();
    // The displayed path (`['layer']['weight']`, plain keys in the vectors) as the file's name.
    let path = |s: &Json| {
        let shown = s["path"].as_str().unwrap();
        let inner = shown.trim_start_matches('[').trim_end_matches(']');
        let elems: Vec<&str> = inner.split("][").map(|e| e.trim_matches('\'')).collect();
        elems.join(".")
    };
    storages
        .iter()
        .filter(|s| storages.iter().filter(|o| path(o) == path(s)).count() == 1)
        .map(|s| {
            let d = s["digest"].as_str().unwrap().trim_start_matches("0x");
            (path(s), u64::from_str_radix(d, 16).unwrap())
        })
        .collect()
}

/// The vector's `pgt_core::Error`, from its `error_debug` (checked against `error`).
fn core_error(v: &Json) -> pgt_core::Error {
    let e = parse_error(v["error_debug"].as_str().unwrap());
    assert_eq!(e.name(), v["error"].as_str().unwrap());
    e
}

/// What a receiver over a process group reports for `e`, the error of a message handed to pgt-core
/// whole: a header, metadata (tag 2) or trailer (tag `trailer_tag`) longer than expected never reaches
/// pgt-core — the process group caps those receives at the expected length (PROTOCOL.md §12, "Messages
/// that do not fit the plan") — and the rest is pgt-core's error.
fn as_received(e: &pgt_core::Error, from: u32, header_tag: u64, trailer_tag: u64) -> String {
    use pgt_core::Error::*;
    let too_large = |tag, max, got| {
        PgError::TooLarge {
            peer: from,
            tag,
            max,
            got,
        }
        .to_string()
    };
    match *e {
        HeaderLength { got } if got > Header::SIZE as u64 => {
            too_large(header_tag, Header::SIZE as u64, got)
        }
        MetadataLength { expected, got } if got > expected => too_large(2, expected, got),
        TrailerLength { expected, got } if got > expected => too_large(trailer_tag, expected, got),
        _ => e.to_string(),
    }
}

/// Parses the `Debug` form of a `pgt_core::Error` (index.json's `error_debug`, e.g.
/// `StepMismatch { expected: Some(10), got: Some(9) }`) into the error, through its serde form; the
/// error must print back as the same text.
fn parse_error(debug: &str) -> pgt_core::Error {
    let mut p = DebugParser {
        s: debug.as_bytes(),
        i: 0,
    };
    let json = p.value();
    assert_eq!(p.i, debug.len(), "{debug}: trailing text");
    let e: pgt_core::Error = serde_json::from_value(json.clone())
        .unwrap_or_else(|err| panic!("{debug} as {json}: {err}"));
    assert_eq!(format!("{e:?}"), debug);
    e
}

struct DebugParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl DebugParser<'_> {
    fn peek(&mut self) -> Option<u8> {
        while self.s.get(self.i) == Some(&b' ') {
            self.i += 1;
        }
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        let yes = self.peek() == Some(c);
        self.i += usize::from(yes);
        yes
    }

    fn word(&mut self) -> String {
        self.peek();
        let start = self.i;
        while self
            .s
            .get(self.i)
            .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'-')
        {
            self.i += 1;
        }
        String::from_utf8(self.s[start..self.i].to_vec()).unwrap()
    }

    /// A Rust `Debug` value as serde's JSON form: struct variants as `{"Name": {fields}}`, unit
    /// variants as `"Name"`, `Some(x)` as `x`, `None` as `null`.
    fn value(&mut self) -> Json {
        if self.eat(b'"') {
            let mut out = String::new();
            loop {
                let c = self.s[self.i];
                self.i += 1;
                match c {
                    b'"' => break,
                    b'\\' => {
                        let c = self.s[self.i];
                        self.i += 1;
                        out.push(match c {
                            b'n' => '\n',
                            b't' => '\t',
                            b'r' => '\r',
                            b'0' => '\0',
                            c => c as char,
                        });
                    }
                    _ => {
                        // UTF-8 passes through byte by byte.
                        let len = match c {
                            0..=0x7F => 1,
                            0xE0..=0xEF => 3,
                            0xF0..=0xFF => 4,
                            _ => 2,
                        };
                        out.push_str(
                            std::str::from_utf8(&self.s[self.i - 1..self.i - 1 + len]).unwrap(),
                        );
                        self.i += len - 1;
                    }
                }
            }
            return Json::String(out);
        }
        let word = self.word();
        if let Ok(n) = word.parse::<u64>() {
            return n.into();
        }
        if let Ok(n) = word.parse::<i64>() {
            return n.into();
        }
        if self.eat(b'{') {
            let mut fields = serde_json::Map::new();
            while !self.eat(b'}') {
                let name = self.word();
                assert!(self.eat(b':'), "':' expected at {}", self.i);
                fields.insert(name, self.value());
                self.eat(b',');
            }
            return serde_json::json!({ word: fields });
        }
        if self.eat(b'(') {
            let inner = self.value();
            assert!(self.eat(b')'), "')' expected at {}", self.i);
            return if word == "Some" {
                inner
            } else {
                serde_json::json!({ word: inner })
            };
        }
        match word.as_str() {
            "None" => Json::Null,
            "true" => true.into(),
            "false" => false.into(),
            _ => Json::String(word),
        }
    }
}

// ---- hand-built inputs ----

/// A process group that only records what is sent: the frames a `Transport` sender puts on the wire,
/// for the test to send raw (or cut short).
struct Recorder {
    frames: std::sync::Mutex<Vec<(u64, Vec<u8>)>>,
}

impl ProcessGroup for Recorder {
    fn rank(&self) -> u32 {
        0
    }
    fn size(&self) -> u32 {
        2
    }
    fn send(&self, _dst: u32, tag: u64, parts: &[&[u8]], _t: Duration) -> Result<(), PgError> {
        self.frames.lock().unwrap().push((tag, parts.concat()));
        Ok(())
    }
    fn recv_into(
        &self,
        src: u32,
        tag: u64,
        _: &mut [&mut [u8]],
        t: Duration,
    ) -> Result<(), PgError> {
        Err(PgError::Timeout {
            peer: src,
            tag,
            after: t,
        })
    }
    fn recv_vec(&self, src: u32, tag: u64, _: usize, t: Duration) -> Result<Vec<u8>, PgError> {
        Err(PgError::Timeout {
            peer: src,
            tag,
            after: t,
        })
    }
}

/// The frames of a transfer of `sd` from rank 0 to rank 1, digests on.
fn frames_of(sd: &StateDict<'_>) -> Vec<Out> {
    let recorder = Recorder {
        frames: Default::default(),
    };
    Transport::new(&recorder, TransportOptions::default())
        .send_checkpoint(&[1], sd)
        .expect("the sender sends it");
    let frames = recorder.frames.into_inner().unwrap();
    frames
        .into_iter()
        .map(|(tag, bytes)| frame(0, tag, bytes))
        .collect()
}

/// Metadata of one uint8 tensor `t` whose shape announces `dims` dims (and ends there: the count is
/// refused before the dims are read).
fn dims_announced(dims: u64) -> Vec<u8> {
    let mut metadata = encode(
        vec![
            Node::Dict(vec![pgt_core::tree::Key::Str("t".into())]),
            Node::Leaf,
        ],
        vec![Leaf::Tensor(TensorLayout::contiguous(DType::UInt8, &[1]))],
        PlanParams::default(),
    );
    // The leaf is the last 8 bytes: Tensor, dtype, shape [1] (01 01), stride [1] (01 01), offset,
    // nbytes. Its shape becomes `dims` dims, none of them sent.
    let tail = metadata.split_off(metadata.len() - 8);
    assert_eq!(tail, [1, 18, 1, 1, 1, 1, 0, 1]);
    metadata.extend(&tail[..2]);
    varint(dims, &mut metadata);
    metadata
}

/// `count` uint8 tensors of `each` bytes (a list of them), in a plan of chunks of `chunk` bytes.
fn storages(count: usize, each: u64, chunk: u64) -> Vec<u8> {
    let leaf = Leaf::Tensor(TensorLayout::contiguous(DType::UInt8, &[each]));
    let mut tree = vec![Node::List(count as u64)];
    tree.resize(count + 1, Node::Leaf);
    encode(
        tree,
        vec![leaf; count],
        PlanParams {
            chunk_size: chunk,
            ..PlanParams::default()
        },
    )
}

fn decoded_too_large(metadata: &[u8]) -> String {
    pgt_core::Error::DecodedTooLarge {
        max: decoded_size_budget(metadata.len() as u64),
    }
    .to_string()
}

fn hand_built_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    let id = 0x5eed_0000_0000_0001;

    // #2: 4 bytes of storage broadcast to [2^20, 2^20]: valid metadata, 4 TiB written out.
    let mut sd = StateDict::new();
    sd.insert("model.weight", Entry::Tensor(f32s(&[4, 4])))
        .unwrap();
    sd.insert("model.bias", Entry::Tensor(broadcast(&[1 << 20, 1 << 20])))
        .unwrap();
    let max = 4 + 64 * MIB; // the storage and safetensors_io's MAX_VIEW_EXPANSION
    let view = pgt_core::Error::ViewTooLarge {
        path: "model.bias".into(),
        bytes: 1 << 42,
        max,
    };
    cases.push(Case::new(
        "view_4_tib_from_4_bytes",
        "view",
        frames_of(&sd),
        Expect::line(view.to_string()),
    ));

    // #3: 50 bytes announcing 2 × 512 MiB, and no data: the receiver waits for data message 0.
    let half = Leaf::Tensor(TensorLayout::contiguous(DType::UInt8, &[512 << 20]));
    let two_halves = |chunk| {
        encode(
            vec![Node::List(2), Node::Leaf, Node::Leaf],
            vec![half.clone(), half.clone()],
            PlanParams {
                chunk_size: chunk,
                ..PlanParams::default()
            },
        )
    };
    let md = two_halves(PlanParams::default().chunk_size);
    cases.push(Case::new(
        "announced_2x512_mib_no_data",
        "announced",
        header_and_metadata(&md, id),
        Expect::timeout(&[
            "receiving from rank 0: receiving message 2 from rank 0: timed out after 1s on tag 3 with rank 0",
        ]),
    ));
    // The same in 1 GiB chunks (the largest) to a receiver whose budget it exceeds: refused before
    // anything is allocated, and the refusal drains what the plan says is coming.
    let md = two_halves(1 << 30);
    let size = codec::decoded_size(&md).unwrap();
    let over = pgt_host::Error::MemoryBudget {
        needed: (1 << 30) + size,
        budget: 1000 * MIB,
    };
    cases.push(
        Case::new(
            "announced_2x512_mib_over_budget",
            "announced",
            header_and_metadata(&md, id),
            Expect::line(format!("receiving from rank 0: {over}")),
        )
        .flags(&["--memory-budget", "1000MiB"]),
    );
    // Many storages within the budget (4096 × 2 MiB = 8 GiB), and no data.
    let md = storages(4096, 2 * MIB, PlanParams::default().chunk_size);
    cases.push(
        Case::new(
            "announced_4096x2_mib_no_data",
            "announced",
            header_and_metadata(&md, id),
            Expect::timeout(&[
            "receiving from rank 0: receiving message 2 from rank 0: timed out after 1s on tag 3 with rank 0",
        ]),
        )
        .flags(&["--memory-budget", "9GiB"]),
    );

    // #4: amplification within the caps.
    let md = deep_nones(1, 1_000_000); // 3 MB: 1M None values
    cases.push(Case::new(
        "1m_none_values_3_mb",
        "amplification",
        header_and_metadata(&md, id),
        Expect::line(format!("receiving from rank 0: {}", decoded_too_large(&md))),
    ));
    let md = deep_nones(64, 200_000); // 600 KB: 200,000 None values 64 lists deep
    cases.push(Case::new(
        "200k_none_values_64_deep_600_kb",
        "amplification",
        header_and_metadata(&md, id),
        Expect::line(format!("receiving from rank 0: {}", decoded_too_large(&md))),
    ));
    let md = deep_nones(1, 1 << 22); // 12 MB: 4M leaf nodes (max_leaves), each a None value
    cases.push(Case::new(
        "4m_leaf_nodes_12_mb",
        "amplification",
        header_and_metadata(&md, id),
        Expect::line(format!("receiving from rank 0: {}", decoded_too_large(&md))),
    ));
    let too_many_dims = pgt_core::Error::TooManyDims {
        ndim: 30_000_000,
        max: 64,
    };
    let md = dims_announced(30_000_000);
    cases.push(Case::new(
        "30m_dims_announced",
        "amplification",
        header_and_metadata(&md, id),
        Expect::line(format!("receiving from rank 0: {too_many_dims}")),
    ));

    // #5: 2M empty frames with distinct tags, before the header: set aside until the stash is full.
    cases.push(Case {
        // Sending them takes a few seconds in a debug build: the header's wait must outlast it.
        timeout: 60,
        ..Case::new(
            "2m_empty_frames_distinct_tags",
            "backlog",
            vec![Out::Empty {
                from: 0,
                first: 1000,
                count: 2_000_000,
            }],
            Expect::pieces(&[
                "receiving from rank 0: receiving tag 1 from rank 0: frame with tag ",
                " (0 bytes) does not fit the stash (",
                " of 67108864 bytes used)",
            ]),
        )
    });

    // #7: a 20 MB string of control characters: a 120 MB safetensors header.
    let mut sd = StateDict::new();
    sd.insert("w", Entry::Tensor(f32s(&[2]))).unwrap();
    sd.insert("note", Entry::Value(Value::Str("\u{1}".repeat(20_000_000))))
        .unwrap();
    cases.push(Case::new(
        "20_mb_string_value",
        "safetensors_header",
        frames_of(&sd),
        Expect::pieces(&[
            "out.safetensors: the safetensors header would be 12000",
            " bytes, more than the 100000000 the safetensors library loads",
        ]),
    ));

    // #9: a DTensor mesh naming rank 5 of a 2-rank job.
    let mut sd = StateDict::new();
    let spec = row_sharded_spec([0, 5]);
    sd.insert(
        "d",
        Entry::DTensor {
            local: f32s(&[2, 2]),
            spec,
        },
    )
    .unwrap();
    cases.push(Case::new(
        "dtensor_mesh_rank_outside_the_job",
        "ranks",
        frames_of(&sd),
        Expect::line(
            "['d']: refusing the checkpoint: device mesh names rank 5, outside the process group of 2 ranks"
                .into(),
        ),
    ));

    // A sender that stalls: header and metadata of a good transfer, then nothing.
    let mut sd = StateDict::new();
    sd.insert("w", Entry::Tensor(f32s(&[1024]))).unwrap();
    let mut sends = frames_of(&sd);
    sends.truncate(2);
    cases.push(Case::new(
        "header_and_metadata_then_silence",
        "stall",
        sends,
        Expect::timeout(&[
            "receiving from rank 0: receiving message 2 from rank 0: timed out after 1s on tag 3 with rank 0",
        ]),
    ));
    cases
}

// ---- the receiver ----

/// How a `pgt recv` ended.
#[derive(Debug)]
struct Ended {
    code: Option<i32>,
    signal: Option<i32>,
    stdout: String,
    stderr: String,
    /// Its peak resident memory, bytes (`VmHWM` at its exit), if it got that far.
    peak: Option<u64>,
    /// From the end of the attacker's sends until it exited.
    after_sends: Duration,
    /// Bytes sent to it (frames and their headers), up to the first send that failed because it had
    /// exited.
    sent_bytes: u64,
    /// What was left in the output directory.
    files: Vec<String>,
    /// The tensors of the file written, if any: name and XXH3-64 of its bytes.
    written: Vec<(String, u64)>,
}

/// `VmHWM` of process `pid`, bytes.
fn vm_hwm(pid: libc::pid_t) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line["VmHWM:".len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib << 10)
}

/// Starts `cmd` traced by this thread (which must then wait for it: [`wait_traced`]), stopped at its
/// exit so that its peak memory can be read.
fn spawn_traced(cmd: &mut Command) -> std::process::Child {
    // SAFETY: the closure runs in the forked child before `execve` and only makes the ptrace(2)
    // system call (async-signal-safe); the error it may return is built from errno without
    // allocating.
    unsafe {
        cmd.pre_exec(|| {
            let null = std::ptr::null_mut::<libc::c_void>();
            if libc::ptrace(libc::PTRACE_TRACEME, 0 as libc::pid_t, null, null) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    cmd.spawn().expect("start pgt recv")
}

/// `ptrace(request, pid, 0, data)`.
fn ptrace(request: libc::c_uint, pid: libc::pid_t, data: usize) {
    // SAFETY: PTRACE_SETOPTIONS and PTRACE_CONT take no pointer: `data` is an integer (options, a
    // signal number) and `addr` is ignored.
    let r = unsafe {
        libc::ptrace(
            request,
            pid,
            std::ptr::null_mut::<libc::c_void>(),
            data as *mut libc::c_void,
        )
    };
    assert_ne!(
        r,
        -1,
        "ptrace({request}): {}",
        std::io::Error::last_os_error()
    );
}

/// Waits for the traced `child` (killing it after [`HANG`]): its exit status and peak memory.
fn wait_traced(mut child: std::process::Child) -> (i32, Option<u64>, Instant) {
    let pid = child.id() as libc::pid_t;
    let start = Instant::now();
    let mut first = true;
    let mut peak = None;
    loop {
        let mut status = 0;
        // SAFETY: `pid` is this thread's child (and tracee), not yet reaped: std's `Child` is never
        // waited on; `status` is a live local.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == 0 {
            if start.elapsed() > HANG {
                let _ = child.kill();
            }
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        assert_eq!(r, pid, "waitpid: {}", std::io::Error::last_os_error());
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            return (status, peak, Instant::now());
        }
        assert!(libc::WIFSTOPPED(status), "{status:#x}");
        let signal = libc::WSTOPSIG(status);
        let mut pass = signal as usize;
        if first && signal == libc::SIGTRAP {
            // Stopped after `execve`: from now on, stop at its exit too (and die with this test).
            first = false;
            pass = 0;
            ptrace(
                libc::PTRACE_SETOPTIONS,
                pid,
                (libc::PTRACE_O_TRACEEXIT | libc::PTRACE_O_EXITKILL) as usize,
            );
        } else if status >> 8 == (libc::SIGTRAP | (libc::PTRACE_EVENT_EXIT << 8)) {
            // Exiting, its memory still mapped.
            peak = vm_hwm(pid);
            pass = 0;
        }
        ptrace(libc::PTRACE_CONT, pid, pass);
    }
}

/// Runs `pgt recv` for `case`, joins its job as every other rank, sends the case's frames.
fn run(case: &Case) -> Ended {
    let dir = std::env::temp_dir().join(format!(
        "pgt-catalogue-{}-{}",
        std::process::id(),
        case.name
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let token = format!("catalogue-{}", std::process::id());
    let mut cmd = Command::new(PGT);
    cmd.args(["recv", "--quiet", "--src", &case.src.to_string(), "--out"])
        .arg(dir.join("out.safetensors"))
        .args(["--timeout", &case.timeout.to_string()])
        .args(&case.flags)
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("RANK", case.rank.to_string())
        .env("WORLD_SIZE", case.world.to_string())
        .env("PGT_TOKEN", &token)
        .env("PGT_TIMEOUT_SECS", "30")
        .env_remove("PGT_LISTEN_HOST")
        .env_remove("PGT_PG")
        .env_remove("RUST_LOG")
        // A backtrace would be symbolized from the debug build's debug info: slow, and memory.
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // The child is traced by the thread that starts it, which waits for it.
    let (started, pid) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let mut child = spawn_traced(&mut cmd);
        started.send(()).unwrap();
        let read = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = r.read_to_string(&mut s);
                s
            })
        };
        let out = read(Box::new(child.stdout.take().unwrap()));
        let err = read(Box::new(child.stderr.take().unwrap()));
        let (status, peak, at) = wait_traced(child);
        (status, peak, at, out.join().unwrap(), err.join().unwrap())
    });
    pid.recv().unwrap();
    // Every other rank of the job: this process.
    let joins: Vec<_> = (0..case.world)
        .filter(|&r| r != case.rank)
        .map(|rank| {
            let token = token.clone().into_bytes();
            let world = case.world;
            std::thread::spawn(move || {
                TcpProcessGroup::connect(TcpOptions {
                    master_addr: "127.0.0.1".into(),
                    master_port: port,
                    rank,
                    world_size: world,
                    token,
                    timeout: Duration::from_secs(30),
                    listen_host: None,
                })
                .map(|g| (rank, g))
            })
        })
        .collect();
    let groups: Vec<(u32, TcpProcessGroup)> = joins
        .into_iter()
        .map(|j| j.join().unwrap().expect("the attacker joins the job"))
        .collect();
    let group = |rank: u32| &groups.iter().find(|(r, _)| *r == rank).unwrap().1;
    // Sends fail once the receiver has exited (it refused the input before reading all of it): the
    // bytes sent are those of the frames handed to the socket.
    let t = HANG;
    let to = case.rank;
    let frame_len = FRAME_HEADER_LEN as u64;
    let mut sent_bytes = 0;
    'sends: for s in &case.sends {
        match s {
            Out::Frame { from, tag, bytes } => {
                if group(*from).send(to, *tag, &[bytes], t).is_err() {
                    break 'sends;
                }
                sent_bytes += frame_len + bytes.len() as u64;
            }
            Out::Empty { from, first, count } => {
                for tag in *first..first + count {
                    if group(*from).send(to, tag, &[], t).is_err() {
                        break 'sends;
                    }
                    sent_bytes += frame_len;
                }
            }
        }
    }
    let sent = Instant::now();
    let (status, peak, exited, stdout, stderr) = waiter.join().unwrap();
    drop(groups);
    let files = files_in(&dir);
    let out = dir.join("out.safetensors");
    let written = match out.exists() {
        true => {
            let sd = pgt_host::safetensors_io::load(&out).expect("the written file loads");
            pgt_host::safetensors_io::tensor_names(&sd)
                .into_iter()
                .map(|(name, t)| (name, digest(&t.contiguous_bytes().unwrap())))
                .collect()
        }
        false => Vec::new(),
    };
    let _ = std::fs::remove_dir_all(&dir);
    Ended {
        code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
        stdout,
        stderr,
        peak,
        after_sends: exited.saturating_duration_since(sent),
        sent_bytes,
        files,
        written,
    }
}

/// What is wrong with how the receiver ended, if anything.
fn check(case: &Case, e: &Ended) -> Result<(), String> {
    let peak = e.peak.ok_or("no peak memory measured")?;
    let bound = ALLOWANCE + e.sent_bytes;
    if peak > bound {
        return Err(format!(
            "peak memory {:.1} MiB, over the bound of {:.1} MiB",
            peak as f64 / MIB as f64,
            bound as f64 / MIB as f64
        ));
    }
    match &case.expect {
        Expect::Refused {
            pieces,
            exact,
            times_out,
        } => {
            if e.code != Some(1) {
                return Err(format!(
                    "exit code {:?} (signal {:?}), not 1",
                    e.code, e.signal
                ));
            }
            if !e.stdout.is_empty() {
                return Err(format!("stdout: {:?}", e.stdout));
            }
            let Some(line) = e.stderr.strip_suffix('\n').filter(|l| !l.contains('\n')) else {
                return Err("not one line on stderr".into());
            };
            let Some(rest) = line.strip_prefix("pgt: error: ") else {
                return Err("no `pgt: error: `".into());
            };
            if *exact {
                if rest != pieces[0] {
                    return Err(format!("expected `{}`", pieces[0]));
                }
            } else {
                let mut at = 0;
                for p in pieces {
                    match rest[at..].find(p.as_str()) {
                        Some(i) => at += i + p.len(),
                        None => return Err(format!("expected `{p}` (after byte {at})")),
                    }
                }
            }
            let limit = Duration::from_secs(case.timeout + 1);
            if *times_out && e.after_sends > limit {
                return Err(format!(
                    "timed out {:.2?} after the last frame, more than {limit:?}",
                    e.after_sends
                ));
            }
            if !e.files.is_empty() {
                return Err(format!("left behind: {:?}", e.files));
            }
        }
        Expect::Written { digests } => {
            if e.code != Some(0) {
                return Err(format!(
                    "exit code {:?} (signal {:?}), not 0",
                    e.code, e.signal
                ));
            }
            if e.files != ["out.safetensors"] {
                return Err(format!("files: {:?}", e.files));
            }
            if digests.is_empty() {
                return Err("nothing to compare the file with".into());
            }
            for (name, want) in digests {
                match e.written.iter().find(|(n, _)| n == name) {
                    Some((_, got)) if got == want => {}
                    Some((_, got)) => {
                        return Err(format!("{name}: digest {got:#018x}, not {want:#018x}"))
                    }
                    None => return Err(format!("{name}: not in the file written")),
                }
            }
        }
    }
    Ok(())
}

#[test]
fn every_catalogue_input_on_a_live_receiver() {
    let t0 = Instant::now();
    let mut cases = vector_cases();
    cases.extend(hand_built_cases());
    let mut failures = Vec::new();
    let mut table = Vec::new();
    for case in &cases {
        let t = Instant::now();
        let ended = run(case);
        let result = check(case, &ended);
        let peak = ended.peak.map_or(f64::NAN, |p| p as f64 / MIB as f64);
        eprintln!(
            "{:<18} {:<44} {:>10} B sent  peak {:>6.1} MiB  {:>5.2} s  {}  {}",
            case.row,
            case.name,
            ended.sent_bytes,
            peak,
            t.elapsed().as_secs_f64(),
            if result.is_ok() { "ok" } else { "FAILED" },
            ended.stderr.trim_end()
        );
        table.push((case.row, peak, ended.sent_bytes));
        if let Err(why) = result {
            failures.push(format!("{}: {why}\n  {ended:?}", case.name));
        }
    }
    // One line per catalogue row: the inputs, the highest peak and the bytes sent with it.
    let mut rows: Vec<&str> = table.iter().map(|(row, ..)| *row).collect();
    rows.dedup();
    for row in rows {
        let of_row = table.iter().filter(|(r, ..)| *r == row);
        let n = of_row.clone().count();
        let (_, peak, sent) = of_row
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .expect("a row has inputs");
        eprintln!("row {row:<18} {n:>3} inputs, highest peak {peak:.1} MiB ({sent} bytes sent)");
    }
    eprintln!(
        "{} inputs in {:.1} s",
        cases.len(),
        t0.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of {} inputs:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
