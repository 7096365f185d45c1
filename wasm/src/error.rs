//! [`ErrorW`]: `pgt_core::Error`, variant for variant, as a serde type, so that a Rust host gets back
//! the very `pgt_core::Error` the guest's core returned (see `ErrorInfo::detail`).
//!
//! The list below must name every variant of `pgt_core::Error` (a host test compares it with
//! `core/src/error.rs`); a variant missing here still reaches hosts as an [`crate::types::ErrorInfo`]
//! with its name, message and Debug form, just without `detail`.

use alloc::string::String;
use serde::{Deserialize, Serialize};

use pgt_core::dtype::DType;
use pgt_core::Error;

macro_rules! mirror {
    ($( $name:ident $({ $($field:ident : $ty:ty),* $(,)? })? ),* $(,)?) => {
        /// `pgt_core::Error`, variant for variant (`ProtocolState` carries its text as a `String`).
        #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
        #[allow(missing_docs)]
        pub enum ErrorW {
            $( $name $({ $($field: $ty),* })?, )*
            ProtocolState(String),
        }

        impl ErrorW {
            /// Every variant name, in order (`ProtocolState` last).
            pub const NAMES: &'static [&'static str] = &[$(stringify!($name),)* "ProtocolState"];

            /// The mirror of `e`, or `None` for a variant this list does not have yet.
            pub fn from_core(e: &Error) -> Option<ErrorW> {
                #[allow(unreachable_patterns)]
                Some(match e {
                    $( Error::$name $({ $($field),* })? => ErrorW::$name $({ $($field: $field.clone()),* })?, )*
                    Error::ProtocolState(what) => ErrorW::ProtocolState((*what).into()),
                    _ => return None,
                })
            }

            /// The core error back; `intern` turns a `ProtocolState` text into the `&'static str` the
            /// variant holds.
            pub fn into_core(self, intern: impl FnOnce(String) -> &'static str) -> Error {
                match self {
                    $( ErrorW::$name $({ $($field),* })? => Error::$name $({ $($field),* })?, )*
                    ErrorW::ProtocolState(what) => Error::ProtocolState(intern(what)),
                }
            }
        }
    };
}

mirror! {
    HeaderLength { got: u64 },
    BadMagic,
    UnsupportedVersion { got: u16 },
    UnknownFlags { flags: u16 },
    MetadataTooLarge { len: u64, max: u64 },
    MetadataLength { expected: u64, got: u64 },
    MetadataDigest,
    TruncatedMetadata,
    MalformedMetadata,
    TrailingBytes { count: u64 },
    Encode,
    TooManyLeaves { count: u64, max: u64 },
    TreeTooDeep { max: u32 },
    TooManyDims { ndim: u64, max: u32 },
    TotalBytesTooLarge { max: u64 },
    TooManyMessages { count: u64, max: u64 },
    TruncatedTree,
    TrailingTreeNodes,
    DuplicateKey,
    KeyPathsTooLarge { max: u64 },
    LeafCountMismatch { tree: u64, leaves: u64 },
    StrideRankMismatch { shape: u64, stride: u64 },
    StorageNotWholeElements { nbytes: u64, element_size: u64 },
    ViewOutOfBounds { needed: u64, nbytes: u64 },
    LayoutOverflow,
    MeshRankCount { ranks: u64, mesh_size: u64 },
    MeshDimNames { names: u64, mesh_ndim: u64 },
    PlacementCount { placements: u64, mesh_ndim: u64 },
    ShardDimOutOfRange { dim: u64, ndim: u64 },
    LocalShapeMismatch,
    DTypeMismatch { local: DType, global: DType },
    ShardRankMismatch,
    ShardOutOfBounds { end: u64, global: u64 },
    BadPlacement,
    ShardNotInGlobal,
    BadChunkSize { chunk_size: u64 },
    BadBucketSize { bucket_size: u64, chunk_size: u64 },
    NoDestinations,
    DuplicateDestination { rank: u32 },
    SourceIsDestination { rank: u32 },
    UnsupportedCast { from: DType, to: DType },
    CastLength { src_bytes: u64, dst_bytes: u64 },
    NotADestination { rank: u32 },
    UnexpectedSource { expected: u32, got: u32 },
    StepMismatch { expected: Option<u64>, got: Option<u64> },
    InPlaceSizeMismatch { path: String, expected: u64, got: u64 },
    InPlaceDTypeMismatch { path: String, incoming: DType, destination: DType },
    TrailerLength { expected: u64, got: u64 },
    DigestMismatch { path: String, storage: u32 },
    Incomplete,
    // ---- added by hostile branch ----
    DTensorLocalSize { dim: u64, local: u64, global: u64 },
    DuplicateMeshRank { rank: u64 },
    MeshRankOutOfRange { rank: u64, world_size: u64 },
    ShardsOverlap,
    ShardsDoNotCover { covered: u64, volume: u64 },
    ShardingTooComplex { shards: u64 },
    PlacementRankOutOfRange { rank: u64, world_size: u64 },
    ViewTooLarge { path: String, bytes: u64, max: u64 },
}
