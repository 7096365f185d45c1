//! Builders shared by pgt-core's integration tests: valid metadata of every leaf kind, encoding into a
//! header + metadata pair (with a correct digest), and an honest in-memory driver of a sender and its
//! receivers.
#![allow(dead_code)]

use pgt_core::codec;
use pgt_core::digest::digest;
use pgt_core::drive::{self, Event, ReceiveHost, SendHost};
use pgt_core::dtensor::{DTensorSpec, DeviceMesh, Placement, ReduceOp};
use pgt_core::dtype::DType;
use pgt_core::header::{self, Header, Limits, FLAG_DIGESTS, VERSION};
use pgt_core::layout::TensorLayout;
use pgt_core::manifest::Manifest;
use pgt_core::plan::Segment;
use pgt_core::plan::{MessageKind, Plan};
use pgt_core::receiver::{
    Binding, ForwardOp, Incoming, KeptManifest, Received, Receiver, ReceiverOptions, RecvOp,
    RecvPoll,
};
use pgt_core::schema::Metadata;
use pgt_core::schema::{FanOut, PlanParams};
use pgt_core::sender::{KeptMetadata, Payload, SendOp, SendPoll, Sender};
use pgt_core::sharded::{LocalShard, ShardMetadata, ShardedTensorMetadata};
use pgt_core::tree::{Key, Leaf, Node, Value};
use pgt_core::Error;

/// Source rank of the sample transfers.
pub const SOURCE: u32 = 0;
/// Destination ranks of the sample transfers.
pub const DESTS: [u32; 2] = [1, 2];
/// The transfer id of the sample transfers (the golden vectors' too).
pub const TRANSFER_ID: u64 = 0x0123_4567_89ab_cdef;

pub fn key(s: &str) -> Key {
    Key::Str(s.into())
}

/// Metadata with `tree` and `leaves`, source 0, destinations 1 and 2, step 7, default plan.
/// The postcard prefix of a metadata up to (excluding) the tree: step None, source 0, destinations
/// [1], default plan.
pub fn prefix() -> Vec<u8> {
    postcard::to_allocvec(&(None::<u64>, 0u32, vec![1u32], PlanParams::default())).unwrap()
}

/// A value leaf under `depth` nested one-element lists.
pub fn nested_lists(depth: usize) -> Metadata {
    let mut tree = vec![Node::List(1); depth];
    tree.push(Node::Leaf);
    metadata(tree, vec![Leaf::Value(Value::None)])
}

pub fn metadata(tree: Vec<Node>, leaves: Vec<Leaf>) -> Metadata {
    Metadata {
        step: Some(7),
        source: SOURCE,
        destinations: DESTS.to_vec(),
        plan: PlanParams::default(),
        tree,
        leaves,
    }
}

/// A DTensor leaf: a [2, 4] float32 local shard of an [4, 4] global tensor on a 2-rank mesh.
pub fn dtensor_leaf() -> Leaf {
    Leaf::DTensor {
        local: TensorLayout::contiguous(DType::Float32, &[2, 4]),
        spec: DTensorSpec {
            mesh: DeviceMesh {
                shape: vec![2],
                ranks: vec![0, 1],
                dim_names: Some(vec!["dp".into()]),
                device_type: "cuda".into(),
            },
            placements: vec![Placement::Shard(0)],
            global_shape: vec![4, 4],
            global_stride: vec![4, 1],
            dtype: DType::Float32,
        },
    }
}

/// A 2-dim DTensor leaf whose mesh is 2×1 with a Partial placement (for mesh-count tests).
pub fn dtensor_leaf_2d() -> Leaf {
    Leaf::DTensor {
        local: TensorLayout::contiguous(DType::BFloat16, &[4, 4]),
        spec: DTensorSpec {
            mesh: DeviceMesh {
                shape: vec![2, 1],
                ranks: vec![0, 1],
                dim_names: None,
                device_type: "cpu".into(),
            },
            placements: vec![Placement::Replicate, Placement::Partial(ReduceOp::Sum)],
            global_shape: vec![4, 4],
            global_stride: vec![4, 1],
            dtype: DType::BFloat16,
        },
    }
}

pub fn shard_meta(offsets: &[u64], sizes: &[u64], placement: &str) -> ShardMetadata {
    ShardMetadata {
        offsets: offsets.to_vec(),
        sizes: sizes.to_vec(),
        placement: placement.into(),
    }
}

/// A ShardedTensor leaf: global [4, 2] int64 in two row shards; the sender holds the second.
pub fn sharded_leaf() -> Leaf {
    let shards = vec![
        shard_meta(&[0, 0], &[2, 2], "rank:0/cpu"),
        shard_meta(&[2, 0], &[2, 2], "rank:3/cuda:1"),
    ];
    Leaf::Sharded {
        local_shards: vec![LocalShard {
            layout: TensorLayout::contiguous(DType::Int64, &[2, 2]),
            meta: shards[1].clone(),
        }],
        global: ShardedTensorMetadata {
            shards,
            global_size: vec![4, 2],
            dtype: DType::Int64,
        },
    }
}

/// A small valid state dict with every leaf kind:
/// `{model: {layers: [{weight: f32[3,4], bias: bf16[4]}], emb: DTensor, table: Sharded},
///   step: 7, lr: 0.5, name: "run", extra: (None, true, b"\x01"), 3: f16 transposed view}`.
pub fn sample_tree() -> (Vec<Node>, Vec<Leaf>) {
    let transposed = TensorLayout {
        dtype: DType::Float16,
        shape: vec![4, 3],
        stride: vec![1, 4],
        storage_offset: 0,
        nbytes: 24,
    };
    let tree = vec![
        Node::Dict(vec![
            key("model"),
            key("step"),
            key("lr"),
            key("name"),
            key("extra"),
            Key::Int(3),
        ]),
        Node::Dict(vec![key("layers"), key("emb"), key("table")]),
        Node::List(1),
        Node::Dict(vec![key("weight"), key("bias")]),
        Node::Leaf,
        Node::Leaf,
        Node::Leaf,
        Node::Leaf,
        Node::Leaf,
        Node::Leaf,
        Node::Leaf,
        Node::Tuple(3),
        Node::Leaf,
        Node::Leaf,
        Node::Leaf,
        Node::Leaf,
    ];
    let leaves = vec![
        Leaf::Tensor(TensorLayout::contiguous(DType::Float32, &[3, 4])),
        Leaf::Tensor(TensorLayout::contiguous(DType::BFloat16, &[4])),
        dtensor_leaf(),
        sharded_leaf(),
        Leaf::Value(Value::Int(7)),
        Leaf::Value(Value::Float(0.5)),
        Leaf::Value(Value::Str("run".into())),
        Leaf::Value(Value::None),
        Leaf::Value(Value::Bool(true)),
        Leaf::Value(Value::Bytes(vec![1])),
        Leaf::Tensor(transposed),
    ];
    (tree, leaves)
}

/// The sample state dict as metadata.
pub fn sample() -> Metadata {
    let (tree, leaves) = sample_tree();
    metadata(tree, leaves)
}

/// `{name: leaf}` as metadata.
pub fn single(name: &str, leaf: Leaf) -> Metadata {
    metadata(vec![Node::Dict(vec![key(name)]), Node::Leaf], vec![leaf])
}

/// Encodes `meta` as the sender would, WITHOUT validating it: postcard bytes (without the metadata
/// message's prefix: [`message_for`]) plus a header with the right length and digest.
pub fn encode_raw(meta: &Metadata, digests: bool) -> (Vec<u8>, Vec<u8>) {
    let bytes = postcard::to_allocvec(meta).expect("postcard encodes");
    (header_for(&bytes, digests).to_vec(), bytes)
}

/// A correct header of transfer [`TRANSFER_ID`] for these postcard metadata bytes.
pub fn header_for(bytes: &[u8], digests: bool) -> [u8; Header::SIZE] {
    Header {
        version: VERSION,
        flags: if digests { FLAG_DIGESTS } else { 0 },
        metadata_len: bytes.len() as u64,
        metadata_digest: digest(bytes),
        transfer_id: TRANSFER_ID,
    }
    .to_bytes()
}

/// The metadata message of transfer [`TRANSFER_ID`] for these postcard metadata bytes.
pub fn message_for(bytes: &[u8]) -> Vec<u8> {
    [&header::prefix(TRANSFER_ID)[..], bytes].concat()
}

/// Parses the header and decodes the postcard metadata `bytes` (behind the prefix of
/// [`TRANSFER_ID`]), as a receiver does.
pub fn decode_bytes(header: &[u8], bytes: &[u8], limits: &Limits) -> Result<Manifest, Error> {
    let header = Header::parse(header, limits)?;
    codec::decode(&header, &message_for(bytes), limits)
}

/// The trailer of a transfer of `meta` (validated, encoded by a sender) whose storages have
/// `digests`: the prefix of [`TRANSFER_ID`], the metadata digest, the digests.
pub fn trailer_for(meta: &Metadata, digests: &[u64]) -> Vec<u8> {
    let bytes = postcard::to_allocvec(meta).expect("postcard encodes");
    let mut t = header::prefix(TRANSFER_ID).to_vec();
    t.extend_from_slice(&digest(&bytes).to_le_bytes());
    t.extend(digests.iter().flat_map(|d| d.to_le_bytes()));
    t
}

/// Encodes `meta` without validation, then parses and decodes it under `limits`.
pub fn round_trip(meta: &Metadata, limits: &Limits) -> Result<Manifest, Error> {
    let (header, bytes) = encode_raw(meta, false);
    decode_bytes(&header, &bytes, limits)
}

/// Default receiver options for rank `rank`.
pub fn options(rank: u32) -> ReceiverOptions {
    ReceiverOptions {
        rank,
        source: SOURCE,
        expected_step: None,
        limits: Limits::default(),
    }
}

/// A receiver for `rank` that has been given the header and metadata of `meta` (validated and encoded
/// by a [`Sender`]) and is waiting for bindings.
pub fn receiver_at_bindings(meta: Metadata, digests: bool, rank: u32) -> Receiver {
    let source = meta.source;
    let sender =
        Sender::new(meta, digests, &Limits::default(), TRANSFER_ID).expect("valid metadata");
    let mut r = Receiver::new(ReceiverOptions {
        source,
        ..options(rank)
    });
    r.handle_header(sender.header_bytes()).unwrap();
    r.handle_metadata(sender.metadata_bytes()).unwrap();
    assert_eq!(r.poll(), RecvPoll::NeedBindings);
    r
}

/// The digest the honest driver pretends storage `i`'s bytes have (no tensor bytes exist in these
/// tests: both sides report the same made-up value).
pub fn fake_digest(storage: u32) -> u64 {
    0x9E37_79B9_7F4A_7C15u64.wrapping_mul(u64::from(storage) + 1)
}

/// Drives a sender and one receiver per destination honestly, through [`pgt_core::drive`], to
/// completion: every send is delivered, digests are reported on both sides (made-up values: no tensor
/// bytes exist in these tests), forwards are performed in chain fan-out. Returns each receiver's result.
/// Panics if either side errors or stalls.
pub fn transfer(meta: Metadata, digests: bool) -> Vec<Received> {
    let mut sender =
        Sender::new(meta, digests, &Limits::default(), TRANSFER_ID).expect("valid metadata");
    let dests = sender.manifest().metadata().destinations.clone();
    let source = sender.manifest().metadata().source;
    let step = sender.manifest().metadata().step;
    let mut host = FakeHost::default();
    drive::send(&mut sender, &mut host).expect("honest send");
    assert!(sender.is_done());
    let mut out = Vec::new();
    for &rank in &dests {
        let r = Receiver::new(ReceiverOptions {
            rank,
            source,
            expected_step: step,
            limits: Limits::default(),
        });
        out.push(drive::receive(r, &mut host).expect("complete transfer"));
    }
    out
}

/// The header's and the metadata message's bytes as `sender` hands them out, its plan, and what it
/// keeps for the next send.
pub fn sent_metadata(mut sender: Sender) -> ((Vec<u8>, Vec<u8>, Plan), KeptMetadata) {
    let plan = sender.plan().clone();
    while let SendPoll::Send(op) = sender.poll() {
        if op.message > 1 {
            break;
        }
    }
    let bytes = |m| match sender.payload(m) {
        Ok(Payload::Bytes(b)) => b.to_vec(),
        other => panic!("message {m}: {other:?}"),
    };
    ((bytes(0), bytes(1), plan), sender.into_kept())
}

/// One transfer of `meta` to its first destination, received by [`Receiver::keeping`] given `kept`:
/// the result and what the receiver kept.
pub fn transfer_keeping(
    meta: Metadata,
    digests: bool,
    kept: Option<KeptManifest>,
) -> (Received, Option<KeptManifest>) {
    let mut sender =
        Sender::new(meta, digests, &Limits::default(), TRANSFER_ID).expect("valid metadata");
    let rank = sender.manifest().metadata().destinations[0];
    let source = sender.manifest().metadata().source;
    let mut host = FakeHost::default();
    drive::send(&mut sender, &mut host).expect("honest send");
    let r = Receiver::keeping(
        ReceiverOptions {
            rank,
            source,
            expected_step: None,
            limits: Limits::default(),
        },
        kept,
    );
    drive::receive_keeping(r, &mut host).expect("complete transfer")
}

/// A host that moves no tensor bytes: the header, metadata and trailer it sent are handed back to
/// receivers, and every completed storage "hashes" to [`fake_digest`] on both sides.
#[derive(Default)]
struct FakeHost {
    core_bytes: Vec<(MessageKind, Vec<u8>)>,
    events: std::collections::VecDeque<Event>,
}

impl FakeHost {
    fn completed(&mut self, message: u32, segments: &[Segment], hash: bool) {
        if hash {
            let digests = segments
                .iter()
                .filter(|s| s.completes)
                .map(|s| fake_digest(s.storage))
                .collect();
            self.events.push_back(Event::Digests(message, digests));
        }
    }
}

impl SendHost for FakeHost {
    type Error = Error;
    fn send(&mut self, op: &SendOp, payload: Payload<'_>) -> Result<(), Error> {
        match payload {
            Payload::Bytes(b) => {
                if !self.core_bytes.iter().any(|(k, _)| *k == op.kind) {
                    self.core_bytes.push((op.kind, b.to_vec()));
                }
            }
            Payload::Storages { segments, .. } => self.completed(op.message, segments, op.hash),
        }
        Ok(())
    }
    fn next_event(&mut self, _: bool) -> Result<Option<Event>, Error> {
        Ok(self.events.pop_front())
    }
    fn flush(&mut self) -> Result<(), Error> {
        Ok(())
    }
}

impl ReceiveHost for FakeHost {
    type Error = Error;
    fn recv_bytes(&mut self, op: &RecvOp) -> Result<Vec<u8>, Error> {
        let (_, b) = self
            .core_bytes
            .iter()
            .find(|(k, _)| *k == op.kind)
            .expect("sent");
        Ok(b.clone())
    }
    fn bound(&mut self, _: &Incoming, _: &[Binding]) -> Result<(), Error> {
        Ok(())
    }
    fn recv_data(&mut self, op: &RecvOp, segments: &[Segment]) -> Result<(), Error> {
        self.events.push_back(Event::Landed(op.message));
        self.completed(op.message, segments, op.hash);
        Ok(())
    }
    fn forward(&mut self, op: &ForwardOp, _: Payload<'_>) -> Result<(), Error> {
        self.events.push_back(Event::Forwarded(op.message));
        Ok(())
    }
    fn next_event(&mut self, _: bool) -> Result<Option<Event>, Error> {
        Ok(self.events.pop_front())
    }
}

/// Fan-out variants of a plan, for tests that cover both.
pub fn with_fanout(mut meta: Metadata, fanout: FanOut) -> Metadata {
    meta.plan.fanout = fanout;
    meta
}
