//! The fuzz harnesses of pgt-core, shared by the cargo-fuzz targets (`fuzz_targets/*.rs`) and by
//! `core/tests/regressions.rs`, which replays every file of `fuzz/regressions/` and `fuzz/seeds/` through
//! the same functions in `cargo test`.
//!
//! Each harness must never panic on any input, except through the invariant checks (`assert!`) below,
//! which are bugs in pgt-core when they fire.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use pgt_core::codec;
use pgt_core::digest::digest;
use pgt_core::drive;
use pgt_core::dtype::DType;
use pgt_core::header::{self, Header, Limits, FLAG_DIGESTS, PREFIX_LEN, VERSION};
use pgt_core::layout::TensorLayout;
use pgt_core::manifest::Manifest;
use pgt_core::memory::{MemoryHost, MemorySender};
use pgt_core::plan::{self, MessageKind, Plan};
use pgt_core::receiver::{InPlace, KeptManifest, Receiver, ReceiverOptions, RecvOp, RecvPoll};
use pgt_core::schema::{Metadata, PlanParams};
use pgt_core::sender::Sender;
use pgt_core::tree::{Key, Leaf, Node, Value};
use pgt_core::Error;

/// Plans larger than this are not built by the harnesses (the limit is the host's choice; building a
/// 16M-message plan is slow, not a bug).
pub const MAX_MESSAGES: u64 = 1 << 12;

/// Limits used by the harnesses: the defaults, with `max_messages` lowered so plans stay small.
pub fn fuzz_limits(tight: bool) -> Limits {
    let mut l = Limits {
        max_messages: MAX_MESSAGES,
        ..Limits::default()
    };
    if tight {
        // Small enough that fuzzed inputs reach each limit.
        l.max_metadata_bytes = 2048;
        l.max_leaves = 8;
        l.max_depth = 4;
        l.max_ndim = 3;
        l.max_total_bytes = 1 << 16;
        l.max_messages = 16;
    }
    l
}

/// The transfer id of the harnesses' headers.
pub const TRANSFER_ID: u64 = 0x0123_4567_89ab_cdef;

/// A header of transfer [`TRANSFER_ID`] that announces the postcard metadata `bytes` correctly.
pub fn header_for(bytes: &[u8], flags: u16) -> [u8; Header::SIZE] {
    Header {
        version: VERSION,
        flags,
        metadata_len: bytes.len() as u64,
        metadata_digest: digest(bytes),
        transfer_id: TRANSFER_ID,
    }
    .to_bytes()
}

/// The metadata message of transfer [`TRANSFER_ID`] for the postcard metadata `bytes`.
pub fn message_for(bytes: &[u8]) -> Vec<u8> {
    [&header::prefix(TRANSFER_ID)[..], bytes].concat()
}

/// A cursor over the fuzz input; reads past the end yield zeros.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { data }
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }
    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }
    pub fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | u16::from(self.u8()) << 8
    }
    pub fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        let src = self.bytes(8);
        b[..src.len()].copy_from_slice(src);
        u64::from_le_bytes(b)
    }
}

// ---------------------------------------------------------------- decode

/// Input: `mode`, 32 header bytes, then the metadata message's bytes.
/// `mode` bit 0: replace the header by one that matches the metadata, and take the bytes as the
/// postcard metadata behind the header's prefix (so mutations reach the codec and validation, not only
/// the prefix and digest checks); bit 1: digests flag in that header; bit 2: tight limits; bit 3: a
/// receiver given the manifest kept from a transfer of [`kept_sample`] agrees with a new receiver.
pub fn decode(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let raw_header = input.bytes(Header::SIZE);
    let rest = input.rest();
    let limits = fuzz_limits(mode & 4 != 0);
    let fixed;
    let (header_bytes, message) = if mode & 1 != 0 {
        fixed = header_for(rest, if mode & 2 != 0 { FLAG_DIGESTS } else { 0 });
        (&fixed[..], message_for(rest))
    } else {
        (raw_header, rest.to_vec())
    };
    let meta = message.get(PREFIX_LEN as usize..).unwrap_or_default();
    if mode & 8 != 0 {
        kept_receiver_agrees(header_bytes, &message, &limits);
    }

    // The raw codec, without limits or header.
    let raw = codec::decode_metadata(meta);
    // It (a scan of the bytes, then a decode of what passed) fails exactly where and as postcard's
    // own decoder of the schema does, and decodes the same value.
    let reference = match postcard::take_from_bytes::<pgt_core::schema::Metadata>(meta) {
        Ok((m, [])) => Ok(m),
        Ok((_, rest)) => Err(Error::TrailingBytes {
            count: rest.len() as u64,
        }),
        Err(postcard::Error::DeserializeUnexpectedEnd) => Err(Error::TruncatedMetadata),
        Err(_) => Err(Error::MalformedMetadata),
    };
    // One rule differs: lengths follow the u32 varint rules on every host (PROTOCOL.md §5), while
    // postcard reads them as a `usize`, u64 rules on this 64-bit host. Where a length is longer
    // than 5 bytes (or is 5 bytes over 2^32 − 1) the scan says MalformedMetadata and postcard reads
    // on: possible only in an input with a varint of 5 bytes or more (4 continuation bytes in a
    // row), and never for an encoding postcard itself produces.
    if raw == Err(Error::MalformedMetadata) && reference != raw {
        assert!(
            meta.windows(4).any(|w| w.iter().all(|b| b & 0x80 != 0)),
            "MalformedMetadata without a long varint; postcard says {reference:?}"
        );
        if let Ok(m) = &reference {
            assert_ne!(
                postcard::to_allocvec(m).expect("decoded metadata encodes"),
                meta,
                "a canonical encoding refused"
            );
        }
    } else {
        // Compared by their encodings: a float value may be a NaN, which `==` never equals.
        assert_eq!(encoded(&raw), encoded(&reference));
    }
    if let Ok(m) = &raw {
        // Postcard round trip: what decodes re-encodes to something that decodes to the same value.
        let again = postcard::to_allocvec(m).expect("decoded metadata encodes");
        let m2 = codec::decode_metadata(&again).expect("re-encoded metadata decodes");
        assert_eq!(postcard::to_allocvec(&m2).unwrap(), again);
    }

    let header = match Header::parse(header_bytes, &limits) {
        Ok(h) => h,
        Err(e) => {
            assert!(
                mode & 1 == 0 || matches!(e, Error::MetadataTooLarge { .. }),
                "{e}"
            );
            check_error(&e);
            return;
        }
    };
    assert!(header.metadata_len <= limits.max_metadata_bytes);
    match codec::decode(&header, &message, &limits) {
        Ok(manifest) => {
            // The checked decode agrees with the raw one.
            let raw = raw.expect("decode succeeded where decode_metadata failed");
            assert_eq!(
                postcard::to_allocvec(&raw).unwrap(),
                postcard::to_allocvec(manifest.metadata()).unwrap()
            );
            check_manifest(&manifest, &limits);
        }
        Err(e) => {
            check_error(&e);
            let framing = matches!(
                e,
                Error::TransferMismatch { .. }
                    | Error::MetadataLength { .. }
                    | Error::MetadataDigest
            );
            if mode & 1 != 0 {
                assert!(!framing, "a matching header was refused: {e}");
            }
            // Every codec error of decode is also one of decode_metadata, except the limits decode
            // applies while scanning, before decoding: the leaf count, the dims lists, the decoded size.
            if let Err(raw) = raw {
                if !framing {
                    assert!(
                        raw == e
                            || matches!(
                                e,
                                Error::TooManyLeaves { .. }
                                    | Error::TooManyDims { .. }
                                    | Error::DecodedTooLarge { .. }
                            ),
                        "{raw} vs {e}"
                    );
                }
            }
        }
    }
}

/// The metadata of the transfer whose kept manifest [`decode`] gives a receiver (mode bit 3): two
/// float32 tensors and a value, from rank 0 to ranks 1 and 2, at step 7, with digests.
pub fn kept_sample() -> Metadata {
    let key = |k: &str| Key::Str(k.into());
    Metadata {
        step: Some(7),
        source: 0,
        destinations: vec![1, 2],
        plan: PlanParams::default(),
        tree: vec![
            Node::Dict(vec![key("w"), key("b"), key("epoch")]),
            Node::Leaf,
            Node::Leaf,
            Node::Leaf,
        ],
        leaves: vec![
            Leaf::Tensor(TensorLayout::contiguous(DType::Float32, &[2, 3])),
            Leaf::Tensor(TensorLayout::contiguous(DType::Float32, &[3])),
            Leaf::Value(Value::Int(3)),
        ],
    }
}

/// Rank 1's receiver options under `limits`, for a transfer from rank 0.
fn rank_1(limits: &Limits) -> ReceiverOptions {
    ReceiverOptions {
        rank: 1,
        source: 0,
        expected_step: None,
        limits: *limits,
    }
}

/// What a keeping receiver of rank 1 keeps from a whole transfer of [`kept_sample`] in memory.
fn kept(limits: &Limits) -> KeptManifest {
    let storages = vec![vec![1u8; 24], vec![2u8; 12]];
    let mut sender = Sender::new(kept_sample(), true, limits, TRANSFER_ID ^ 1).expect("valid");
    let mut sent = MemorySender::new(&storages);
    drive::send(&mut sender, &mut sent).expect("a send in memory");
    let sent = sent.sent;
    let mut host = MemoryHost::new(|op: &RecvOp| -> Result<Vec<u8>, Error> {
        let found = sent.iter().find(|(s, _)| s.to == 1 && s.tag == op.tag);
        Ok(found.expect("every message was sent").1.clone())
    });
    let receiver = Receiver::keeping(rank_1(limits), None);
    let (_, kept) = drive::receive_keeping(receiver, &mut host).expect("a complete transfer");
    kept.expect("a keeping receiver keeps")
}

/// A receiver given [`kept`] and a new one take `header` and `message` alike: the same manifest, or
/// the same error.
fn kept_receiver_agrees(header: &[u8], message: &[u8], limits: &Limits) {
    let outcome = |mut r: Receiver| -> Result<(Vec<u8>, bool), Error> {
        r.handle_header(header)?;
        r.handle_metadata(message)?;
        let m = r.manifest().expect("the metadata was handled");
        // By its encoding: a float value may be a NaN, which `==` never equals.
        let metadata = postcard::to_allocvec(m.metadata()).expect("validated metadata encodes");
        Ok((metadata, m.digests()))
    };
    let new = outcome(Receiver::new(rank_1(limits)));
    let kept = outcome(Receiver::keeping(rank_1(limits), Some(kept(limits))));
    assert_eq!(kept, new);
}

/// A decode's result, with the metadata as its postcard encoding (equal for equal values, NaNs
/// included).
fn encoded(result: &Result<Metadata, Error>) -> Result<Vec<u8>, Error> {
    match result {
        Ok(m) => Ok(postcard::to_allocvec(m).expect("decoded metadata encodes")),
        Err(e) => Err(e.clone()),
    }
}

/// Errors print as one non-empty line.
pub fn check_error(e: &Error) {
    let s = e.to_string();
    assert!(!s.is_empty() && !s.contains('\n'), "{s:?}");
}

/// What must hold of every validated manifest.
pub fn check_manifest(manifest: &Manifest, limits: &Limits) {
    let meta = manifest.metadata();
    // It re-validates, and re-encodes to bytes that decode to the same manifest.
    let again = Manifest::new(meta.clone(), manifest.digests(), limits).expect("re-validates");
    let (header, bytes) = codec::encode(&again, TRANSFER_ID).expect("encodes");
    assert_eq!(header.transfer_id, TRANSFER_ID);
    assert_eq!(bytes.len() as u64, header.metadata_message_len());
    let decoded = codec::decode(&header, &bytes, limits).expect("re-encoded metadata decodes");
    assert_eq!(
        postcard::to_allocvec(decoded.metadata()).unwrap(),
        postcard::to_allocvec(meta).unwrap()
    );
    assert_eq!(decoded.paths(), manifest.paths());
    assert_eq!(decoded.storages(), manifest.storages());

    // Tables: one path per leaf, storages in leaf order, total bytes.
    assert_eq!(manifest.paths().len(), meta.leaves.len());
    assert!(meta.leaves.len() as u64 <= limits.max_leaves);
    let mut next = 0;
    for (i, leaf) in meta.leaves.iter().enumerate() {
        let range = manifest.leaf_storages(i);
        assert_eq!(range.start, next);
        assert_eq!(range.len(), leaf.storages().count());
        for (s, layout) in range.clone().zip(leaf.storages()) {
            let st = manifest.storages()[s];
            assert_eq!(st.leaf as usize, i);
            assert_eq!(st.nbytes, layout.nbytes);
            assert_eq!(st.dtype, layout.dtype);
            // A validated layout's view lies inside its storage.
            let r = layout
                .byte_range()
                .expect("validated layout has a byte range");
            assert!(r.start <= r.end && r.end <= layout.nbytes);
        }
        next = range.end;
    }
    assert_eq!(next, manifest.storages().len());
    let total: u64 = manifest.storages().iter().map(|s| s.nbytes).sum();
    assert_eq!(total, manifest.total_bytes());
    assert!(total <= limits.max_total_bytes);

    // The plan: counted size within the limit, and built only when small.
    let count = plan::count_data_messages(
        manifest.storages().iter().map(|s| s.nbytes),
        manifest.metadata().plan,
    );
    assert!(count <= limits.max_messages);
    if count <= MAX_MESSAGES {
        let plan = manifest.plan(header.metadata_len);
        assert_eq!(plan.messages()[1].len, bytes.len() as u64);
        check_plan(manifest, &plan, count);
    }
}

/// Plan invariants: header, metadata, data messages covering every storage's bytes once and in order,
/// trailer when digests are on; consecutive tags.
pub fn check_plan(manifest: &Manifest, plan: &Plan, count: u64) {
    let msgs = plan.messages();
    assert_eq!(msgs[0].kind, MessageKind::Header);
    assert_eq!(msgs[1].kind, MessageKind::Metadata);
    assert_eq!(plan.data_messages().len() as u64, count);
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(m.tag, plan::TAG_HEADER + i as u64);
    }
    let params = manifest.metadata().plan;
    let mut covered = vec![0u64; manifest.storages().len()];
    let mut last = None;
    for m in &msgs[plan.data_messages()] {
        assert_eq!(m.kind, MessageKind::Data);
        let segs = plan.segments(m);
        assert!(!segs.is_empty());
        // The prefix, then the segments' bytes.
        assert_eq!(PREFIX_LEN + segs.iter().map(|s| s.len).sum::<u64>(), m.len);
        assert!(m.len <= PREFIX_LEN + params.chunk_size.max(params.bucket_size));
        for s in segs {
            assert!(s.len > 0);
            assert_eq!(covered[s.storage as usize], s.offset, "in order, no gap");
            covered[s.storage as usize] += s.len;
            let nbytes = manifest.storages()[s.storage as usize].nbytes;
            assert_eq!(s.completes, covered[s.storage as usize] == nbytes);
            assert!(last <= Some(s.storage));
            last = Some(s.storage);
        }
    }
    for (c, s) in covered.iter().zip(manifest.storages()) {
        assert_eq!(*c, s.nbytes);
    }
    let trailer = msgs.last().filter(|m| m.kind == MessageKind::Trailer);
    assert_eq!(trailer.is_some(), manifest.digests());
    if let Some(t) = trailer {
        // The prefix, the metadata digest, a digest per storage.
        assert_eq!(t.len, 16 + 8 * manifest.storages().len() as u64);
    }
}

// ---------------------------------------------------------------- receiver

/// The digest the harness pretends storage `s` has (no tensor bytes exist here).
pub fn fake_digest(s: u32) -> u64 {
    0x9E37_79B9_7F4A_7C15u64.wrapping_mul(u64::from(s) + 1)
}

/// What the harness has told the receiver, to check its verdict at `finish`.
#[derive(Default)]
struct Log {
    header_ok: bool,
    metadata_ok: bool,
    /// Data messages acknowledged with `Ok`.
    data_ok: BTreeSet<u32>,
    /// Forwards acknowledged with `Ok`.
    forwarded_ok: BTreeSet<u32>,
    /// Storage digests accepted, by storage.
    digests_ok: BTreeMap<u32, u64>,
    /// The trailer accepted.
    trailer_ok: Option<Vec<u8>>,
    /// Messages polled for receive / forward and not yet completed by the harness.
    pending_recv: Vec<(u32, MessageKind)>,
    pending_fwd: Vec<u32>,
    /// In-place targets gathered for the next `finish_bindings`.
    in_place: Vec<InPlace>,
    /// `leftover` was called: the transfer has ended, without a result.
    leftover: bool,
}

/// Input: `mode`, a u16 metadata length `n`, 32 header bytes, `n` metadata message bytes, then a
/// program of receiver calls (see `step`). `mode` bits 0-1: this receiver's rank (1, 2, 3 or 0 — the
/// sample transfers come from 0 to [1, 2]); bit 2: expect step 7; bit 3: expect source 5 instead of 0;
/// bit 4: replace the header by one that matches the metadata, and take the `n` bytes as the postcard
/// metadata behind its prefix; bit 5: its digests flag; bit 6: tight limits. Returns whether `finish`
/// yielded a result.
pub fn receiver(data: &[u8]) -> bool {
    let mut input = Input::new(data);
    let mode = input.u8();
    let n = input.u16() as usize;
    let raw_header = input.bytes(Header::SIZE).to_vec();
    let meta = input.bytes(n).to_vec();
    let (header, meta) = if mode & 16 != 0 {
        let flags = if mode & 32 != 0 { FLAG_DIGESTS } else { 0 };
        (header_for(&meta, flags).to_vec(), message_for(&meta))
    } else {
        (raw_header, meta)
    };
    let options = ReceiverOptions {
        rank: [1, 2, 3, 0][usize::from(mode & 3)],
        source: if mode & 8 != 0 { 5 } else { 0 },
        expected_step: (mode & 4 != 0).then_some(7),
        limits: fuzz_limits(mode & 64 != 0),
    };
    let rank = options.rank;
    let mut r = Receiver::new(options);
    let mut log = Log::default();
    let mut steps = 0;
    while !input.is_empty() && steps < 10_000 {
        steps += 1;
        if !step(&mut r, &mut input, &header, &meta, &mut log) {
            break;
        }
    }
    check_finish(r, &log, rank)
}

/// The honest trailer: the transfer's prefix and the header's metadata digest, then the fake digest
/// of every non-empty storage and the empty digest for the others.
fn honest_trailer(r: &Receiver, header: &[u8]) -> Vec<u8> {
    let (Some(m), Some(announced)) = (r.manifest(), header.get(16..32)) else {
        return Vec::new();
    };
    // The header's metadata digest and transfer id, little-endian, in the trailer's order.
    let mut t = announced[8..16].to_vec();
    t.extend_from_slice(&announced[..8]);
    t.extend(m.storages().iter().enumerate().flat_map(|(i, s)| {
        let d = if s.nbytes == 0 {
            digest(&[])
        } else {
            fake_digest(i as u32)
        };
        d.to_le_bytes()
    }));
    t
}

fn record<T>(res: Result<T, Error>) -> Option<T> {
    match res {
        Ok(v) => Some(v),
        Err(e) => {
            check_error(&e);
            None
        }
    }
}

/// The storages data message `m` completes, in segment order (empty for other messages).
fn completed_storages(r: &Receiver, m: u32) -> Vec<u32> {
    r.plan()
        .and_then(|plan| {
            let msg = plan.messages().get(m as usize)?;
            Some(
                plan.segments(msg)
                    .iter()
                    .filter(|s| s.completes)
                    .map(|s| s.storage)
                    .collect(),
            )
        })
        .unwrap_or_default()
}

/// Reports `digests` for data message `m`; logs them when accepted.
fn report_digests(r: &mut Receiver, m: u32, digests: &[u64], log: &mut Log) {
    let storages = completed_storages(r, m);
    if record(r.handle_digests(m, digests)).is_some() {
        assert_eq!(storages.len(), digests.len());
        for (s, &d) in storages.into_iter().zip(digests) {
            assert!(
                log.digests_ok.insert(s, d).is_none(),
                "digest {s} accepted twice"
            );
        }
    }
}

/// Completes a received data message honestly: reports the digests of the storages that end in it
/// (when hashing), then the message. Returns whether the receiver accepted the message.
fn complete_data(r: &mut Receiver, m: u32, log: &mut Log) -> bool {
    if r.manifest().is_some_and(|m| m.digests()) {
        let digests: Vec<u64> = completed_storages(r, m)
            .into_iter()
            .map(fake_digest)
            .collect();
        report_digests(r, m, &digests, log);
    }
    let ok = record(r.handle_data(m)).is_some();
    if ok {
        assert!(log.data_ok.insert(m), "data message {m} accepted twice");
    }
    ok
}

fn complete_trailer(r: &mut Receiver, bytes: Vec<u8>, log: &mut Log) -> bool {
    let ok = record(r.handle_trailer(&bytes)).is_some();
    if ok {
        assert!(log.trailer_ok.is_none(), "trailer accepted twice");
        log.trailer_ok = Some(bytes);
    }
    ok
}

/// Polls once and acts as an honest host would on what comes back. Returns whether that made progress
/// (false on Wait, Done, or a refused call).
fn drive(r: &mut Receiver, header: &[u8], meta: &[u8], log: &mut Log) -> bool {
    enum Act {
        Header,
        Metadata,
        Data(u32),
        Trailer,
        Forward(u32),
        Bindings,
        Nothing,
    }
    let act = match r.poll() {
        RecvPoll::Recv(op) => {
            assert_eq!(
                op.hash,
                op.kind == MessageKind::Data && r.manifest().is_some_and(|m| m.digests())
            );
            match op.kind {
                MessageKind::Header => Act::Header,
                MessageKind::Metadata => Act::Metadata,
                MessageKind::Data => Act::Data(op.message),
                MessageKind::Trailer => Act::Trailer,
            }
        }
        RecvPoll::Forward(f) => Act::Forward(f.message),
        RecvPoll::NeedBindings => Act::Bindings,
        RecvPoll::Wait | RecvPoll::Done => Act::Nothing,
    };
    match act {
        Act::Header => {
            let ok = record(r.handle_header(header)).is_some();
            log.header_ok |= ok;
            ok
        }
        Act::Metadata => {
            let ok = record(r.handle_metadata(meta)).is_some();
            log.metadata_ok |= ok;
            ok
        }
        Act::Data(m) => complete_data(r, m, log),
        Act::Trailer => {
            let t = honest_trailer(r, header);
            complete_trailer(r, t, log)
        }
        Act::Forward(m) => {
            let ok = record(r.handle_forwarded(m)).is_some();
            if ok {
                assert!(log.forwarded_ok.insert(m), "forward {m} accepted twice");
            }
            ok
        }
        Act::Bindings => {
            let in_place = std::mem::take(&mut log.in_place);
            record(r.finish_bindings(&in_place)).is_some()
        }
        Act::Nothing => false,
    }
}

/// One call of the program. Returns false to stop (after `finish`-like ops).
fn step(
    r: &mut Receiver,
    input: &mut Input<'_>,
    header: &[u8],
    meta: &[u8],
    log: &mut Log,
) -> bool {
    match input.u8() % 15 {
        0 => {
            drive(r, header, meta, log);
        }
        1 => {
            // Poll only; remember what was handed out, to complete later (out of order).
            match r.poll() {
                RecvPoll::Recv(op) => log.pending_recv.push((op.message, op.kind)),
                RecvPoll::Forward(f) => log.pending_fwd.push(f.message),
                _ => {}
            }
        }
        2 => {
            // Arbitrary header bytes, or the input's.
            let n = usize::from(input.u8());
            let bytes = if n == 0 {
                header.to_vec()
            } else {
                input.bytes(n - 1).to_vec()
            };
            log.header_ok |= record(r.handle_header(&bytes)).is_some();
        }
        3 => {
            log.metadata_ok |= record(r.handle_metadata(meta)).is_some();
        }
        4 => {
            let storage = input.u16();
            let id = u64::from(input.u8());
            let dtype = DType::ALL[usize::from(input.u8()) % DType::ALL.len()];
            let how = input.u8();
            let nbytes = match (
                how % 4,
                r.manifest()
                    .and_then(|m| m.storages().get(usize::from(storage))),
            ) {
                // The exact size for this dtype (cast when it differs), or off by some bytes.
                (0 | 1, Some(s)) => {
                    let exact = s.nbytes / s.dtype.element_size() * dtype.element_size();
                    exact.wrapping_add(u64::from(how >> 2)) // how >> 2 == 0 half the time
                }
                _ => input.u64(),
            };
            log.in_place.push(InPlace {
                storage: storage.into(),
                id,
                dtype,
                nbytes,
            });
        }
        5 => {
            let in_place = std::mem::take(&mut log.in_place);
            record(r.finish_bindings(&in_place));
        }
        6 => {
            let m = u32::from(input.u16());
            complete_data(r, m, log);
        }
        7 => {
            let n = usize::from(input.u8());
            let bytes = if n == 0 {
                honest_trailer(r, header)
            } else {
                input.bytes(n - 1).to_vec()
            };
            complete_trailer(r, bytes, log);
        }
        8 => {
            // Digests for a message: honest, corrupted, or an arbitrary count of arbitrary values.
            let m = u32::from(input.u16());
            let how = input.u8();
            let mut digests: Vec<u64> = completed_storages(r, m)
                .into_iter()
                .map(fake_digest)
                .collect();
            match how % 4 {
                0 => {}
                1 => {
                    if let Some(d) = digests.first_mut() {
                        *d ^= input.u64() | 1;
                    }
                }
                _ => {
                    digests = (0..usize::from(how >> 2) % 8)
                        .map(|_| input.u64())
                        .collect();
                }
            }
            report_digests(r, m, &digests, log);
        }
        9 => {
            let m = u32::from(input.u16());
            if record(r.handle_forwarded(m)).is_some() {
                assert!(log.forwarded_ok.insert(m), "forward {m} accepted twice");
            }
        }
        10 => {
            // Complete one pending polled operation, chosen by the input.
            let pick = usize::from(input.u8());
            if !log.pending_recv.is_empty() && (pick & 1 == 0 || log.pending_fwd.is_empty()) {
                let (m, kind) = log.pending_recv.remove(pick / 2 % log.pending_recv.len());
                match kind {
                    MessageKind::Header => {
                        log.header_ok |= record(r.handle_header(header)).is_some()
                    }
                    MessageKind::Metadata => {
                        log.metadata_ok |= record(r.handle_metadata(meta)).is_some()
                    }
                    MessageKind::Data => {
                        complete_data(r, m, log);
                    }
                    MessageKind::Trailer => {
                        let t = honest_trailer(r, header);
                        complete_trailer(r, t, log);
                    }
                }
            } else if !log.pending_fwd.is_empty() {
                let m = log.pending_fwd.remove(pick / 2 % log.pending_fwd.len());
                if record(r.handle_forwarded(m)).is_some() {
                    assert!(log.forwarded_ok.insert(m), "forward {m} accepted twice");
                }
            }
        }
        11 => {
            // Drive honestly until nothing is left to do (bounded: plans are at most MAX_MESSAGES).
            for _ in 0..4 * MAX_MESSAGES + 16 {
                if !drive(r, header, meta, log) {
                    break;
                }
            }
        }
        12 => {
            // Read-only accessors in any state.
            let _ = r.manifest();
            let _ = r.plan();
            let _ = r.bindings();
            let _ = r.incoming();
            let _ = r.paths();
            let _ = r.payload(u32::from(input.u16()));
            let _ = r.digest_mismatch();
        }
        14 => {
            // The transfer ends here: what is left of the plan, in order, each with the prefix.
            let mut last = 1;
            let id = r.incoming().ok().map(|i| i.transfer_id);
            while let Some(op) = r.leftover() {
                assert!(op.message > last, "leftover {} after {last}", op.message);
                assert!(op.prefix.is_some() && !op.hash);
                if let Some(id) = id {
                    assert_eq!(op.prefix, Some(id));
                }
                last = op.message;
            }
            log.leftover = true;
        }
        _ => return false,
    }
    true
}

/// `finish` yields a result only for a complete, verified transfer. Returns whether it did.
fn check_finish(r: Receiver, log: &Log, rank: u32) -> bool {
    let state = r.manifest().cloned().zip(r.plan().cloned());
    let mismatch = r.digest_mismatch().cloned();
    let result = r.finish();
    let Ok(received) = result else {
        if let Err(e) = &result {
            check_error(e);
        }
        return false;
    };
    assert!(!log.leftover, "a result after leftover");
    let (manifest, plan) = state.expect("a result implies a manifest and a plan");
    assert!(mismatch.is_none(), "a result despite {mismatch:?}");
    assert!(log.header_ok && log.metadata_ok);
    // Every data message was acknowledged.
    for m in plan.data_messages() {
        assert!(
            log.data_ok.contains(&(m as u32)),
            "data message {m} never received"
        );
    }
    // Digests: the trailer was received and every storage's reported digest matches it.
    if manifest.digests() {
        let trailer = log
            .trailer_ok
            .as_ref()
            .expect("a result without the trailer");
        for (i, s) in manifest.storages().iter().enumerate() {
            let at = 16 + 8 * i;
            let sent = u64::from_le_bytes(trailer[at..at + 8].try_into().unwrap());
            if s.nbytes == 0 {
                assert_eq!(sent, digest(&[]), "empty storage {i} with a wrong digest");
            } else {
                assert_eq!(log.digests_ok.get(&(i as u32)), Some(&sent), "storage {i}");
            }
        }
    }
    // Chain fan-out: every message after the metadata was forwarded, unless this rank is last.
    let meta = manifest.metadata();
    let pos = meta.destinations.iter().position(|&d| d == rank);
    let pos = pos.expect("a result implies this rank is a destination");
    if meta.plan.fanout == pgt_core::schema::FanOut::Chain && pos + 1 < meta.destinations.len() {
        for m in 2..plan.messages().len() as u32 {
            assert!(log.forwarded_ok.contains(&m), "message {m} never forwarded");
        }
    } else {
        assert!(log.forwarded_ok.is_empty(), "forwards where none are due");
    }
    assert_eq!(received.leaves.len(), meta.leaves.len());
    assert_eq!(received.bindings.len(), manifest.storages().len());
    for (b, s) in received.bindings.iter().zip(manifest.storages()) {
        match b.cast_from {
            None => assert_eq!(b.dtype, s.dtype),
            Some(from) => {
                assert_eq!(from, s.dtype);
                assert!(from.is_castable_float() && b.dtype.is_castable_float());
            }
        }
        assert_eq!(
            b.nbytes,
            s.nbytes / s.dtype.element_size() * b.dtype.element_size()
        );
    }
    true
}
