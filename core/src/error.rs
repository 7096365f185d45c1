//! The one error type of pgt-core.

use alloc::string::String;
use core::fmt;
use serde::{Deserialize, Serialize};
use strum::{IntoStaticStr, VariantNames};

use crate::dtype::DType;

/// The state-machine call an [`Error::UnexpectedCall`] names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Call {
    /// `handle_header`.
    Header,
    /// `handle_metadata`.
    Metadata,
    /// `finish_bindings`.
    Bindings,
    /// `handle_data`.
    Data,
    /// `handle_digests`.
    Digests,
    /// `handle_trailer`.
    Trailer,
    /// `handle_forwarded`, or asking for a forward's bytes.
    Forwarded,
    /// Asking for what the metadata announced (before it was received).
    Incoming,
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Call::Header => "the header",
            Call::Metadata => "the metadata",
            Call::Bindings => "binding",
            Call::Data => "a data message",
            Call::Digests => "a digest report",
            Call::Trailer => "the trailer",
            Call::Forwarded => "a forward",
            Call::Incoming => "asking for the announced storages",
        })
    }
}

/// Everything that can go wrong in pgt-core: malformed or hostile bytes, invalid layouts and specs,
/// protocol-order violations and in-place binding mismatches. Each variant names what was wrong.
///
/// It derives serde so that it crosses the wasm boundary as itself; [`Error::name`] is the variant's
/// name, which hosts, tools and the golden vectors use to name an error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, IntoStaticStr, VariantNames)]
#[non_exhaustive]
pub enum Error {
    // ---- header and codec ----
    /// The header message is not exactly [`crate::header::Header::SIZE`] bytes.
    HeaderLength {
        /// Bytes received.
        got: u64,
    },
    /// The header does not start with `PGT\0`.
    BadMagic,
    /// The header announces a protocol version this crate does not speak.
    UnsupportedVersion {
        /// Version received.
        got: u16,
    },
    /// The header sets flag bits this version does not define.
    UnknownFlags {
        /// Flags received.
        flags: u16,
    },
    /// The header announces more metadata than [`crate::header::Limits::max_metadata_bytes`].
    MetadataTooLarge {
        /// Announced length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The metadata message length differs from the header's.
    MetadataLength {
        /// Length of the metadata message the header announced: the prefix and `metadata_len`.
        expected: u64,
        /// Length received.
        got: u64,
    },
    /// The metadata bytes do not match the header's digest.
    MetadataDigest,
    /// The metadata ended before a complete value was decoded.
    TruncatedMetadata,
    /// The metadata is not valid postcard for the schema (bad varint, enum tag, UTF-8, bool…).
    MalformedMetadata,
    /// Bytes left over after the metadata value.
    TrailingBytes {
        /// How many.
        count: u64,
    },
    /// Encoding failed (only on allocation-free serializer errors; should not happen).
    Encode,
    // ---- limits ----
    /// More leaves than [`crate::header::Limits::max_leaves`].
    TooManyLeaves {
        /// Leaves in the metadata.
        count: u64,
        /// The limit.
        max: u64,
    },
    /// Nesting deeper than [`crate::header::Limits::max_depth`].
    TreeTooDeep {
        /// The limit.
        max: u32,
    },
    /// The metadata would take more memory decoded, with its tables and key paths, than
    /// [`crate::scan::DECODED_SIZE_RATIO`] × its length + [`crate::scan::DECODED_SIZE_SLACK`]
    /// (checked while scanning it, before anything is decoded; PROTOCOL.md §11).
    DecodedTooLarge {
        /// The budget, in bytes.
        max: u64,
    },
    /// A tensor, global shape or mesh with more dims than [`crate::header::Limits::max_ndim`] (a dims
    /// list longer than that is refused from its announced length, before it is decoded).
    TooManyDims {
        /// Dims found.
        ndim: u64,
        /// The limit.
        max: u32,
    },
    /// Storage bytes add up to more than [`crate::header::Limits::max_total_bytes`].
    TotalBytesTooLarge {
        /// The limit.
        max: u64,
    },
    /// The plan would have more messages than [`crate::header::Limits::max_messages`].
    TooManyMessages {
        /// Data messages the plan needs.
        count: u64,
        /// The limit.
        max: u64,
    },
    // ---- tree ----
    /// The structure announces more children than nodes follow.
    TruncatedTree,
    /// Nodes follow the end of the root.
    TrailingTreeNodes,
    /// A dict has the same key twice.
    DuplicateKey,
    /// The leaves' key paths would hold more key text than the limit (4 × [`crate::header::Limits::max_metadata_bytes`]):
    /// a long key above many leaves is repeated in every leaf's path.
    KeyPathsTooLarge {
        /// The limit, in bytes of string keys summed over all key paths.
        max: u64,
    },
    /// The structure has a different number of leaves than the leaf list.
    LeafCountMismatch {
        /// Leaves in the structure.
        tree: u64,
        /// Entries in the leaf list.
        leaves: u64,
    },
    // ---- layouts and specs ----
    /// Shape and stride have different lengths.
    StrideRankMismatch {
        /// Dims of the shape.
        shape: u64,
        /// Entries of the stride.
        stride: u64,
    },
    /// `nbytes` is not a whole number of elements.
    StorageNotWholeElements {
        /// The storage size.
        nbytes: u64,
        /// The element size.
        element_size: u64,
    },
    /// The strided view reads past the end of its storage.
    ViewOutOfBounds {
        /// Bytes the view needs.
        needed: u64,
        /// Bytes the storage has.
        nbytes: u64,
    },
    /// Shape, stride or offset arithmetic overflows 64 bits.
    LayoutOverflow,
    /// The mesh's rank list is not `product(mesh shape)` long.
    MeshRankCount {
        /// Ranks listed.
        ranks: u64,
        /// Product of the mesh shape.
        mesh_size: u64,
    },
    /// The mesh has a different number of dim names than dims.
    MeshDimNames {
        /// Names given.
        names: u64,
        /// Mesh dims.
        mesh_ndim: u64,
    },
    /// A DTensor has a different number of placements than mesh dims.
    PlacementCount {
        /// Placements given.
        placements: u64,
        /// Mesh dims.
        mesh_ndim: u64,
    },
    /// A `Shard(dim)` placement names a dim the tensor does not have.
    ShardDimOutOfRange {
        /// The dim.
        dim: u64,
        /// The tensor's dims.
        ndim: u64,
    },
    /// A local tensor's shape does not fit its spec (DTensor rank/size, or a shard's sizes).
    LocalShapeMismatch,
    /// A local tensor's dtype differs from its spec's.
    DTypeMismatch {
        /// The local tensor's dtype.
        local: DType,
        /// The spec's dtype.
        global: DType,
    },
    /// Shard offsets/sizes have a different number of dims than the global size.
    ShardRankMismatch,
    /// A shard reaches past the global size.
    ShardOutOfBounds {
        /// End of the shard in some dim.
        end: u64,
        /// The global size in that dim.
        global: u64,
    },
    /// A shard placement is not of the form `rank:N/device`.
    BadPlacement,
    /// A local shard is not listed in the global metadata.
    ShardNotInGlobal,
    /// Transfer parameters: chunk size not a multiple of 64 in `64..=2^30`.
    BadChunkSize {
        /// The chunk size.
        chunk_size: u64,
    },
    /// Transfer parameters: bucket size larger than the chunk size.
    BadBucketSize {
        /// The bucket size.
        bucket_size: u64,
        /// The chunk size.
        chunk_size: u64,
    },
    /// No destination ranks.
    NoDestinations,
    /// A rank is listed twice as a destination.
    DuplicateDestination {
        /// The rank.
        rank: u32,
    },
    /// The source rank is also listed as a destination.
    SourceIsDestination {
        /// The rank.
        rank: u32,
    },
    // ---- casting ----
    /// Dtype conversion between these types is not supported (only float64/32/16 and bfloat16).
    UnsupportedCast {
        /// Source dtype.
        from: DType,
        /// Destination dtype.
        to: DType,
    },
    /// Conversion buffers do not hold the same number of whole elements.
    CastLength {
        /// Source bytes.
        src_bytes: u64,
        /// Destination bytes.
        dst_bytes: u64,
    },
    // ---- state machines ----
    /// This rank is not among the transfer's destinations.
    NotADestination {
        /// This rank.
        rank: u32,
    },
    /// The transfer comes from another rank than expected.
    UnexpectedSource {
        /// Expected source.
        expected: u32,
        /// Source in the metadata.
        got: u32,
    },
    /// The checkpoint's step differs from the one the receiver expects.
    StepMismatch {
        /// Expected step.
        expected: Option<u64>,
        /// Step in the metadata.
        got: Option<u64>,
    },
    /// A state machine was called in a state that does not expect the call (a host bug, or a host
    /// misled by its peer): e.g. metadata before the header, or data before the bindings.
    UnexpectedCall {
        /// What was called.
        call: Call,
    },
    /// A storage index the transfer does not have.
    NoSuchStorage {
        /// The index.
        storage: u64,
    },
    /// A message index that is not an outstanding receive of that kind (never polled, already
    /// handled, or of another kind).
    MessageNotOutstanding {
        /// The plan index.
        message: u64,
    },
    /// Digests were reported for a transfer that carries none.
    DigestsOff,
    /// A data message's digests were reported twice, or for a message that is not hashed.
    DigestsNotExpected {
        /// The plan index.
        message: u64,
    },
    /// A data message's digest report has another number of digests than the storages it completes.
    DigestCount {
        /// The plan index.
        message: u64,
        /// Storages the message completes.
        expected: u64,
        /// Digests reported.
        got: u64,
    },
    /// A forward was reported that was never polled.
    ForwardNotIssued {
        /// The plan index.
        message: u64,
    },
    /// A forward was reported twice.
    ForwardReportedTwice {
        /// The plan index.
        message: u64,
    },
    /// A data message's bytes are not as long as its segments (an in-memory host was handed a message
    /// of the wrong length; a process group refuses such a message itself).
    DataLength {
        /// The plan index.
        message: u64,
        /// The segments' total length.
        expected: u64,
        /// Bytes handed over.
        got: u64,
    },
    /// An in-place destination has a different storage size than the incoming tensor.
    InPlaceSizeMismatch {
        /// Key path of the leaf.
        path: String,
        /// Bytes the destination must have.
        expected: u64,
        /// Bytes the destination has.
        got: u64,
    },
    /// An in-place destination has a dtype that the incoming tensor cannot be cast to.
    InPlaceDTypeMismatch {
        /// Key path of the leaf.
        path: String,
        /// Incoming dtype.
        incoming: DType,
        /// Destination dtype.
        destination: DType,
    },
    /// The trailer message has the wrong length.
    TrailerLength {
        /// Bytes expected.
        expected: u64,
        /// Bytes received.
        got: u64,
    },
    /// A storage's bytes do not match the sender's digest: corrupted in flight.
    DigestMismatch {
        /// Key path of the leaf.
        path: String,
        /// Index of the storage.
        storage: u32,
    },
    /// The transfer was asked for its result before it completed.
    Incomplete,
    // ---- added by hostile branch ----
    /// A DTensor's local size along a tensor dim is not one torch's sharding gives any mesh coordinate:
    /// along a dim no placement shards it must equal the global size; along a dim `Shard(dim)` splits
    /// (torch's chunking, `ceil(size / mesh_dim_size)` per coordinate), one of the chunk sizes.
    DTensorLocalSize {
        /// The tensor dim.
        dim: u64,
        /// The local size along it.
        local: u64,
        /// The global size along it.
        global: u64,
    },
    /// A DTensor's device mesh lists a rank twice.
    DuplicateMeshRank {
        /// The rank.
        rank: u64,
    },
    /// A DTensor's device mesh names a rank outside the receiver's process group (checked by hosts
    /// that know the group's size: [`crate::dtensor::DeviceMesh::check_world_size`]).
    MeshRankOutOfRange {
        /// The rank.
        rank: u64,
        /// Ranks in the process group.
        world_size: u64,
    },
    /// Two shards of a ShardedTensor share elements (their volumes add up to more than the global
    /// tensor's, or they add up to it and two of them intersect).
    ShardsOverlap,
    /// The shards of a ShardedTensor do not cover the global tensor: their volumes add up to less.
    ShardsDoNotCover {
        /// Elements the shards hold, summed.
        covered: u64,
        /// Elements of the global tensor.
        volume: u64,
    },
    /// A ShardedTensor's shards vary along two or more dims, are more than
    /// [`crate::sharded::MAX_PAIRWISE_SHARDS`] and lie on no grid: too costly to check for overlap.
    ShardingTooComplex {
        /// Shards of non-zero volume.
        shards: u64,
    },
    /// A ShardedTensor shard placement names a rank outside the receiver's process group (checked by
    /// hosts that know the group's size: [`crate::sharded::ShardedTensorMetadata::check_world_size`]).
    PlacementRankOutOfRange {
        /// The rank.
        rank: u64,
        /// Ranks in the process group.
        world_size: u64,
    },
    /// Writing a view out contiguously would materialise more bytes than allowed: a stride-0 or
    /// self-overlapping view repeats storage elements ([`crate::layout::MAX_VIEW_EXPANSION`]). `max` 0:
    /// the memory could not be allocated.
    ViewTooLarge {
        /// Key path of the tensor (empty when not known).
        path: String,
        /// Bytes the view's elements take.
        bytes: u64,
        /// The most that may be materialised (0: the allocation failed).
        max: u64,
    },
    // ---- added by isolation branch (protocol version 2) ----
    /// A metadata or trailer message handed to the receiver starts with another transfer's id: it is a
    /// stale or foreign message, never used (a host skips such messages, PROTOCOL.md §12; this is what
    /// a host that hands one over gets).
    TransferMismatch {
        /// The message's index in the plan.
        message: u64,
        /// This transfer's id (the header's).
        expected: u64,
        /// The id the message starts with.
        got: u64,
    },
    /// The trailer's copy of the metadata digest is not the header's: the trailer belongs to another
    /// transfer's metadata.
    TrailerMetadataDigest,
    /// A host skipped [`crate::header::MAX_STALE`] stale messages while waiting for one message of the
    /// transfer, and gave up.
    TooManyStale {
        /// The message waited for (its index in the plan).
        message: u64,
        /// Stale messages skipped.
        skipped: u64,
    },
}

impl Error {
    /// The variant's name (`"TreeTooDeep"` for `TreeTooDeep { max: 64 }`): how hosts, tools and the
    /// golden vectors name an error.
    pub fn name(&self) -> &'static str {
        self.into()
    }

    /// Every variant's name, in declaration order.
    pub const NAMES: &'static [&'static str] = <Error as VariantNames>::VARIANTS;

    pub(crate) fn from_postcard(e: postcard::Error) -> Error {
        match e {
            postcard::Error::DeserializeUnexpectedEnd => Error::TruncatedMetadata,
            _ => Error::MalformedMetadata,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Error::*;
        match self {
            HeaderLength { got } => write!(
                f,
                "header must be {} bytes, got {got}",
                crate::header::Header::SIZE
            ),
            BadMagic => f.write_str("not a pgt transfer (bad magic)"),
            UnsupportedVersion { got } => write!(f, "unsupported protocol version {got}"),
            UnknownFlags { flags } => write!(f, "unknown header flags {flags:#06x}"),
            MetadataTooLarge { len, max } => {
                write!(f, "metadata of {len} bytes exceeds the limit of {max}")
            }
            MetadataLength { expected, got } => write!(
                f,
                "metadata message is {got} bytes, header announced {expected} (with the transfer id)"
            ),
            MetadataDigest => f.write_str("metadata does not match the header's digest"),
            TruncatedMetadata => f.write_str("metadata ends early"),
            MalformedMetadata => f.write_str("metadata is malformed"),
            TrailingBytes { count } => write!(f, "{count} bytes after the metadata"),
            Encode => f.write_str("metadata could not be encoded"),
            TooManyLeaves { count, max } => {
                write!(f, "{count} leaves exceed the limit of {max}")
            }
            TreeTooDeep { max } => write!(f, "tree nesting exceeds the limit of {max}"),
            DecodedTooLarge { max } => write!(
                f,
                "metadata would take more than {max} bytes of memory decoded ({} × its length + {} MiB)",
                crate::scan::DECODED_SIZE_RATIO,
                crate::scan::DECODED_SIZE_SLACK >> 20
            ),
            TooManyDims { ndim, max } => write!(f, "{ndim} dims exceed the limit of {max}"),
            TotalBytesTooLarge { max } => {
                write!(f, "tensor bytes exceed the limit of {max}")
            }
            TooManyMessages { count, max } => {
                write!(f, "plan needs {count} messages, limit is {max}")
            }
            TruncatedTree => f.write_str("tree structure ends early"),
            TrailingTreeNodes => f.write_str("tree structure has nodes after the root"),
            DuplicateKey => f.write_str("a dict has a duplicate key"),
            KeyPathsTooLarge { max } => {
                write!(f, "key paths exceed the limit of {max} bytes of key text")
            }
            LeafCountMismatch { tree, leaves } => {
                write!(f, "tree has {tree} leaves but {leaves} were sent")
            }
            StrideRankMismatch { shape, stride } => {
                write!(f, "shape has {shape} dims but stride has {stride}")
            }
            StorageNotWholeElements {
                nbytes,
                element_size,
            } => write!(
                f,
                "storage of {nbytes} bytes is not whole elements of {element_size} bytes"
            ),
            ViewOutOfBounds { needed, nbytes } => {
                write!(f, "view needs {needed} bytes but the storage has {nbytes}")
            }
            LayoutOverflow => f.write_str("layout arithmetic overflows"),
            MeshRankCount { ranks, mesh_size } => {
                write!(
                    f,
                    "device mesh lists {ranks} ranks, its shape holds {mesh_size}"
                )
            }
            MeshDimNames { names, mesh_ndim } => {
                write!(f, "device mesh has {names} dim names for {mesh_ndim} dims")
            }
            PlacementCount {
                placements,
                mesh_ndim,
            } => write!(
                f,
                "dtensor has {placements} placements for a {mesh_ndim}-dim mesh"
            ),
            ShardDimOutOfRange { dim, ndim } => {
                write!(f, "Shard({dim}) on a tensor with {ndim} dims")
            }
            LocalShapeMismatch => f.write_str("local tensor shape does not match its spec"),
            DTypeMismatch { local, global } => {
                write!(f, "local dtype {local} differs from the spec's {global}")
            }
            ShardRankMismatch => f.write_str("shard offsets/sizes do not match the global rank"),
            ShardOutOfBounds { end, global } => {
                write!(f, "shard ends at {end}, past the global size {global}")
            }
            BadPlacement => f.write_str("shard placement is not \"rank:N/device\""),
            ShardNotInGlobal => f.write_str("local shard is not in the global metadata"),
            BadChunkSize { chunk_size } => write!(
                f,
                "chunk size {chunk_size} must be a multiple of 64 between 64 and 2^30"
            ),
            BadBucketSize {
                bucket_size,
                chunk_size,
            } => write!(
                f,
                "bucket size {bucket_size} exceeds the chunk size {chunk_size}"
            ),
            NoDestinations => f.write_str("no destination ranks"),
            DuplicateDestination { rank } => write!(f, "destination rank {rank} listed twice"),
            SourceIsDestination { rank } => {
                write!(f, "rank {rank} is both the source and a destination")
            }
            UnsupportedCast { from, to } => write!(f, "cannot cast {from} to {to}"),
            CastLength {
                src_bytes,
                dst_bytes,
            } => write!(
                f,
                "cast of {src_bytes} bytes into {dst_bytes} bytes: element counts differ"
            ),
            NotADestination { rank } => write!(f, "rank {rank} is not a destination"),
            UnexpectedSource { expected, got } => {
                write!(
                    f,
                    "expected a transfer from rank {expected}, got rank {got}"
                )
            }
            StepMismatch { expected, got } => {
                write!(f, "expected step {expected:?}, checkpoint is step {got:?}")
            }
            UnexpectedCall { call } => write!(f, "{call} was not expected in this state"),
            NoSuchStorage { storage } => write!(f, "the transfer has no storage {storage}"),
            MessageNotOutstanding { message } => {
                write!(f, "message {message} is not an outstanding receive")
            }
            DigestsOff => f.write_str("digests reported for a transfer without digests"),
            DigestsNotExpected { message } => {
                write!(f, "digests of message {message} were not expected")
            }
            DigestCount {
                message,
                expected,
                got,
            } => write!(
                f,
                "message {message} completes {expected} storages, {got} digests reported"
            ),
            ForwardNotIssued { message } => {
                write!(f, "forward of message {message} was not issued")
            }
            ForwardReportedTwice { message } => {
                write!(f, "forward of message {message} reported twice")
            }
            DataLength {
                message,
                expected,
                got,
            } => write!(
                f,
                "data message {message} is {got} bytes, expected {expected}"
            ),
            InPlaceSizeMismatch {
                path,
                expected,
                got,
            } => write!(
                f,
                "{path}: in-place destination has {got} bytes, incoming tensor needs {expected}"
            ),
            InPlaceDTypeMismatch {
                path,
                incoming,
                destination,
            } => write!(
                f,
                "{path}: cannot receive {incoming} into an in-place {destination} tensor"
            ),
            TrailerLength { expected, got } => {
                write!(f, "digest trailer is {got} bytes, expected {expected}")
            }
            DigestMismatch { path, storage } => {
                write!(
                    f,
                    "{path}: storage {storage} does not match the sender's digest"
                )
            }
            Incomplete => f.write_str("transfer is not complete"),
            // ---- added by hostile branch ----
            DTensorLocalSize { dim, local, global } => write!(
                f,
                "DTensor local size {local} along dim {dim} is no shard of the global size {global} under its placements"
            ),
            DuplicateMeshRank { rank } => write!(f, "device mesh lists rank {rank} twice"),
            MeshRankOutOfRange { rank, world_size } => write!(
                f,
                "device mesh names rank {rank}, outside the process group of {world_size} ranks"
            ),
            ShardsOverlap => f.write_str("ShardedTensor shards overlap"),
            ShardsDoNotCover { covered, volume } => write!(
                f,
                "ShardedTensor shards hold {covered} of the global tensor's {volume} elements"
            ),
            ShardingTooComplex { shards } => write!(
                f,
                "ShardedTensor of {shards} shards split along several dims is not a grid: too costly to check for overlap"
            ),
            PlacementRankOutOfRange { rank, world_size } => write!(
                f,
                "shard placed on rank {rank}, outside the process group of {world_size} ranks"
            ),
            ViewTooLarge { path, bytes, max } => {
                if !path.is_empty() {
                    write!(f, "{path}: ")?;
                }
                if *max == 0 {
                    write!(f, "writing the view out takes {bytes} bytes, which could not be allocated")
                } else {
                    write!(
                        f,
                        "writing the view out takes {bytes} bytes, more than the {max} allowed (a stride-0 or overlapping view repeats its storage)"
                    )
                }
            }
            TransferMismatch {
                message,
                expected,
                got,
            } => write!(
                f,
                "message {message} belongs to transfer {got:#018x}, not to this one ({expected:#018x}): a stale or foreign message"
            ),
            TrailerMetadataDigest => f.write_str(
                "the trailer's metadata digest is not the header's: the trailer belongs to another transfer",
            ),
            TooManyStale { message, skipped } => write!(
                f,
                "skipped {skipped} stale messages of other transfers waiting for message {message}"
            ),
        }
    }
}

impl core::error::Error for Error {}
