//! The results and arguments of the raw ABI, as serde types shared by the guest (which postcard-encodes
//! them into result blocks) and every host that links this crate (which decodes them). pgt-core's own
//! serde types ([`Metadata`], [`Leaf`], [`Node`], [`DType`], [`PlanParams`]) are used as they are; the
//! core types without serde derives have a mirror here, with conversions both ways.
//!
//! The postcard encoding of each type is its field order, as documented in `wasm/ABI.md`.

use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use pgt_core::codec::{Header, Limits, StorageRef};
use pgt_core::dtype::DType;
use pgt_core::plan::{MessageKind, PlanParams, Segment};
use pgt_core::receiver::{Binding, Dest, ReceiverOptions};
use pgt_core::tree::{KeyPath, Leaf, Node};

pub use crate::error::ErrorW;

/// Version of the raw ABI (`pgt_abi_version`); bumped on any incompatible change of an export or type.
pub const ABI_VERSION: u32 = 1;

/// Status word of a result block.
pub mod status {
    /// Success: the payload is the function's result.
    pub const OK: u32 = 0;
    /// A protocol error from pgt-core (bad bytes, invalid metadata, wrong order…): the payload is an
    /// [`super::ErrorInfo`] naming the `pgt_core::Error` variant.
    pub const ERROR: u32 = 1;
    /// The call itself was wrong (unknown handle, argument that does not decode): the payload is an
    /// [`super::ErrorInfo`] with one of the names in [`super::abi_error`].
    pub const ABI_ERROR: u32 = 2;
}

/// Names of [`status::ABI_ERROR`] errors.
pub mod abi_error {
    /// No live sender or receiver has this handle.
    pub const BAD_HANDLE: &str = "BadHandle";
    /// An argument is not valid postcard of its type (or a flag is not 0/1).
    pub const BAD_ARGUMENT: &str = "BadArgument";
}

/// An error, as hosts see it: the variant name (`"BadMagic"`, `"InPlaceSizeMismatch"`…), the Display text
/// and the Debug form (`"TreeTooDeep { max: 64 }"`); for Rust hosts also the error itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// The `pgt_core::Error` variant name, or an ABI error name.
    pub name: String,
    /// The error's Display text.
    pub message: String,
    /// The error's Debug form (variant and fields).
    pub debug: String,
    /// The `pgt_core::Error` itself (protocol errors of a variant [`ErrorW`] knows). Its encoding follows
    /// pgt-core's enum of the same source: hosts built from other sources ignore it (and may stop
    /// reading the payload after `debug`).
    pub detail: Option<ErrorW>,
}

impl ErrorInfo {
    /// Describes a pgt-core error.
    pub fn from_core(e: &pgt_core::Error) -> ErrorInfo {
        // `Error::name()` from the Debug form this formats anyway: calling it instead made the raw
        // module 6 KB larger (211,172 -> 217,287 bytes, measured).
        let debug = alloc::format!("{e:?}");
        ErrorInfo {
            name: debug
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect(),
            message: alloc::format!("{e}"),
            debug,
            detail: ErrorW::from_core(e),
        }
    }

    /// An ABI misuse error.
    pub fn abi(name: &str, message: &str) -> ErrorInfo {
        ErrorInfo {
            name: name.into(),
            message: message.into(),
            debug: name.into(),
            detail: None,
        }
    }
}

impl core::fmt::Display for ErrorInfo {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(&self.message)
    }
}

impl core::error::Error for ErrorInfo {}

/// [`Limits`], field for field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct LimitsW {
    pub max_metadata_bytes: u64,
    pub max_leaves: u64,
    pub max_depth: u32,
    pub max_ndim: u32,
    pub max_total_bytes: u64,
    pub max_messages: u64,
}

impl From<Limits> for LimitsW {
    fn from(l: Limits) -> LimitsW {
        LimitsW {
            max_metadata_bytes: l.max_metadata_bytes,
            max_leaves: l.max_leaves,
            max_depth: l.max_depth,
            max_ndim: l.max_ndim,
            max_total_bytes: l.max_total_bytes,
            max_messages: l.max_messages,
        }
    }
}

impl From<LimitsW> for Limits {
    fn from(l: LimitsW) -> Limits {
        Limits {
            max_metadata_bytes: l.max_metadata_bytes,
            max_leaves: l.max_leaves,
            max_depth: l.max_depth,
            max_ndim: l.max_ndim,
            max_total_bytes: l.max_total_bytes,
            max_messages: l.max_messages,
        }
    }
}

/// [`Header`], field for field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct HeaderW {
    pub version: u16,
    pub flags: u16,
    pub metadata_len: u64,
    pub metadata_digest: u64,
}

impl From<Header> for HeaderW {
    fn from(h: Header) -> HeaderW {
        HeaderW {
            version: h.version,
            flags: h.flags,
            metadata_len: h.metadata_len,
            metadata_digest: h.metadata_digest,
        }
    }
}

/// [`StorageRef`], field for field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct StorageW {
    pub leaf: u32,
    pub shard: u32,
    pub nbytes: u64,
    pub dtype: DType,
}

impl From<StorageRef> for StorageW {
    fn from(s: StorageRef) -> StorageW {
        StorageW {
            leaf: s.leaf,
            shard: s.shard,
            nbytes: s.nbytes,
            dtype: s.dtype,
        }
    }
}

impl From<StorageW> for StorageRef {
    fn from(s: StorageW) -> StorageRef {
        StorageRef {
            leaf: s.leaf,
            shard: s.shard,
            nbytes: s.nbytes,
            dtype: s.dtype,
        }
    }
}

/// [`Segment`], field for field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct SegmentW {
    pub storage: u32,
    pub offset: u64,
    pub len: u64,
}

impl From<Segment> for SegmentW {
    fn from(s: Segment) -> SegmentW {
        SegmentW {
            storage: s.storage,
            offset: s.offset,
            len: s.len,
        }
    }
}

impl From<SegmentW> for Segment {
    fn from(s: SegmentW) -> Segment {
        Segment {
            storage: s.storage,
            offset: s.offset,
            len: s.len,
        }
    }
}

/// Converts segments to their mirrors.
pub fn segments_to_w(s: &[Segment]) -> Vec<SegmentW> {
    s.iter().copied().map(SegmentW::from).collect()
}

/// Converts mirrored segments back.
pub fn segments_from_w(s: Vec<SegmentW>) -> Vec<Segment> {
    s.into_iter().map(Segment::from).collect()
}

/// [`MessageKind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum MessageKindW {
    Header,
    Metadata,
    Data,
    Trailer,
}

impl From<MessageKind> for MessageKindW {
    fn from(k: MessageKind) -> MessageKindW {
        match k {
            MessageKind::Header => MessageKindW::Header,
            MessageKind::Metadata => MessageKindW::Metadata,
            MessageKind::Data => MessageKindW::Data,
            MessageKind::Trailer => MessageKindW::Trailer,
        }
    }
}

impl From<MessageKindW> for MessageKind {
    fn from(k: MessageKindW) -> MessageKind {
        match k {
            MessageKindW::Header => MessageKind::Header,
            MessageKindW::Metadata => MessageKind::Metadata,
            MessageKindW::Data => MessageKind::Data,
            MessageKindW::Trailer => MessageKind::Trailer,
        }
    }
}

/// One wire message of the plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageW {
    /// What it carries.
    pub kind: MessageKindW,
    /// Its tag.
    pub tag: u64,
    /// Its length in bytes.
    pub len: u64,
    /// The storage byte ranges it carries (data messages only).
    pub segments: Vec<SegmentW>,
}

/// The plan: every wire message in order (`pgt_plan`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanW {
    /// Header, metadata, data…, then the trailer when digests are on.
    pub messages: Vec<MessageW>,
}

/// What a header + metadata decode to (`pgt_decode`): everything a host needs to build the receiving
/// state dict.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The parsed header.
    pub header: HeaderW,
    /// Training step of the checkpoint.
    pub step: Option<u64>,
    /// Sending rank.
    pub source: u32,
    /// Receiving ranks.
    pub destinations: Vec<u32>,
    /// Fan-out, bucket and chunk size.
    pub plan: PlanParams,
    /// Whether a digest trailer follows the data.
    pub digests: bool,
    /// Sum of all storage bytes.
    pub total_bytes: u64,
    /// The tree structure, pre-order.
    pub tree: Vec<Node>,
    /// Every leaf, in leaf order.
    pub leaves: Vec<Leaf>,
    /// Each leaf's key path as displayed (`model.layers.0.weight`, `<root>`).
    pub paths: Vec<String>,
    /// Each leaf's key path, structured.
    pub path_elems: Vec<KeyPath>,
    /// Every storage that travels, in wire order.
    pub storages: Vec<StorageW>,
}

/// A header and metadata message (`pgt_encode`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encoded {
    /// The 24-byte header message.
    pub header: Vec<u8>,
    /// The metadata message.
    pub metadata: Vec<u8>,
}

/// What a message carries when sent or forwarded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PayloadW {
    /// Bytes from the state machine (header, metadata, trailer).
    Bytes(Vec<u8>),
    /// Storage byte ranges held by the host, concatenated in order.
    Storages(Vec<SegmentW>),
}

/// A new sender (`pgt_sender_new`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SenderCreated {
    /// Its handle.
    pub handle: u32,
    /// The storages of the transfer, in wire order.
    pub storages: Vec<StorageW>,
}

/// One send for the host to perform.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct SendStepW {
    pub to: u32,
    /// Index of the message in the plan.
    pub message: u64,
    pub tag: u64,
    pub len: u64,
    pub payload: PayloadW,
    /// Hash the storage bytes while sending.
    pub hash: bool,
}

/// What the sender wants next (`pgt_sender_poll`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SendNextW {
    /// Perform this send.
    Send(SendStepW),
    /// Report missing storage digests, then poll again.
    WaitDigests,
    /// All sends handed out.
    Done,
}

/// [`ReceiverOptions`] (`pgt_receiver_new`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct ReceiverOptionsW {
    pub rank: u32,
    pub source: u32,
    pub expected_step: Option<u64>,
    pub limits: LimitsW,
}

impl From<ReceiverOptions> for ReceiverOptionsW {
    fn from(o: ReceiverOptions) -> ReceiverOptionsW {
        ReceiverOptionsW {
            rank: o.rank,
            source: o.source,
            expected_step: o.expected_step,
            limits: o.limits.into(),
        }
    }
}

impl From<ReceiverOptionsW> for ReceiverOptions {
    fn from(o: ReceiverOptionsW) -> ReceiverOptions {
        ReceiverOptions {
            rank: o.rank,
            source: o.source,
            expected_step: o.expected_step,
            limits: o.limits.into(),
        }
    }
}

/// One receive for the host to perform.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct RecvStepW {
    pub from: u32,
    /// Index of the message in the plan (0 = header, 1 = metadata).
    pub message: u64,
    pub kind: MessageKindW,
    pub tag: u64,
    pub len: u64,
    /// Storage ranges for data messages; empty otherwise (the bytes go back to the guest).
    pub segments: Vec<SegmentW>,
    /// Hash the storage bytes as they land.
    pub hash: bool,
}

/// One forward for the host to perform (chain fan-out).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct ForwardStepW {
    pub to: u32,
    pub message: u64,
    pub tag: u64,
    pub len: u64,
    pub payload: PayloadW,
}

/// What the receiver wants next (`pgt_receiver_poll`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecvNextW {
    /// Receive this message.
    Recv(RecvStepW),
    /// Bind destinations, then finish bindings.
    NeedBindings,
    /// Forward this message.
    Forward(ForwardStepW),
    /// Complete something in flight, then poll again.
    Wait,
    /// Everything handled: finish.
    Done,
}

/// What the receiver learned from the metadata (`pgt_receiver_metadata`), as the guest sends it: the
/// paths borrowed from the receiver, not copied. A host decodes it as [`IncomingW`].
#[derive(Debug, Serialize)]
pub struct IncomingRef<'a> {
    /// Step of the checkpoint.
    pub step: Option<u64>,
    /// Key path of every leaf.
    pub paths: &'a [KeyPath],
    /// Every storage, in wire order.
    pub storages: Vec<StorageW>,
    /// Total storage bytes.
    pub total_bytes: u64,
}

/// [`IncomingRef`], owned: what a host decodes.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct IncomingW {
    /// Step of the checkpoint.
    pub step: Option<u64>,
    /// Key path of every leaf.
    pub paths: Vec<KeyPath>,
    /// Every storage, in wire order.
    pub storages: Vec<StorageW>,
    /// Total storage bytes.
    pub total_bytes: u64,
}

/// [`Dest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DestW {
    /// A buffer the host allocates.
    Fresh,
    /// The host's existing buffer with this id.
    InPlace(u64),
}

/// [`Binding`], field for field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct BindingW {
    pub dest: DestW,
    pub dtype: DType,
    pub nbytes: u64,
    pub cast_from: Option<DType>,
}

impl From<Binding> for BindingW {
    fn from(b: Binding) -> BindingW {
        BindingW {
            dest: match b.dest {
                Dest::Fresh => DestW::Fresh,
                Dest::InPlace(id) => DestW::InPlace(id),
            },
            dtype: b.dtype,
            nbytes: b.nbytes,
            cast_from: b.cast_from,
        }
    }
}

impl From<BindingW> for Binding {
    fn from(b: BindingW) -> Binding {
        Binding {
            dest: match b.dest {
                DestW::Fresh => Dest::Fresh,
                DestW::InPlace(id) => Dest::InPlace(id),
            },
            dtype: b.dtype,
            nbytes: b.nbytes,
            cast_from: b.cast_from,
        }
    }
}

/// The verified result of a transfer (`pgt_receiver_finish`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReceivedW {
    /// Step of the checkpoint.
    pub step: Option<u64>,
    /// Tree structure, pre-order.
    pub tree: Vec<Node>,
    /// Leaves as bound (dtype after cast, placements rewritten).
    pub leaves: Vec<Leaf>,
    /// Destination of every storage.
    pub bindings: Vec<BindingW>,
}
