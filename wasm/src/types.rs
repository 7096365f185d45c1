//! The raw ABI's own result types: the few that are not pgt-core's. Everything else crosses the boundary
//! as pgt-core's own serde types (`Limits`, `Plan`, `SendPoll`, `RecvPoll`, `Incoming`, `InPlace`,
//! `Binding`, `Received`, `Error`, …), postcard-encoded, as documented in `wasm/ABI.md`.

use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use pgt_core::header::Header;
use pgt_core::manifest::StorageRef;
use pgt_core::plan::Plan;
use pgt_core::schema::PlanParams;
use pgt_core::tree::{KeyPath, Leaf, Node};

/// Version of the raw ABI (`pgt_abi_version`); bumped on any incompatible change of an export or type.
pub const ABI_VERSION: u32 = 3;

/// Status word of a result block.
pub mod status {
    /// Success: the payload is the function's result.
    pub const OK: u32 = 0;
    /// A protocol error from pgt-core (bad bytes, invalid metadata, wrong order…): the payload is an
    /// [`super::ErrorInfo`] whose `error` is the `pgt_core::Error`.
    pub const ERROR: u32 = 1;
    /// The call itself was wrong (unknown handle, argument that does not decode): the payload is an
    /// [`super::ErrorInfo`] with one of the names in [`super::abi_error`] and no `error`.
    pub const ABI_ERROR: u32 = 2;
}

/// Names of [`status::ABI_ERROR`] errors.
pub mod abi_error {
    /// No live sender or receiver has this handle.
    pub const BAD_HANDLE: &str = "BadHandle";
    /// An argument is not valid postcard of its type (or a flag is not 0/1).
    pub const BAD_ARGUMENT: &str = "BadArgument";
}

/// An error, as hosts see it: its name and Display text first (what a host in any language reads),
/// then the `pgt_core::Error` itself for hosts that decode pgt-core's types.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// The `pgt_core::Error` variant name (`"BadMagic"`, …), or an ABI error name.
    pub name: String,
    /// The error's Display text.
    pub message: String,
    /// The protocol error itself (`None` for ABI errors).
    pub error: Option<pgt_core::Error>,
}

impl ErrorInfo {
    /// Describes a pgt-core error.
    pub fn from_core(e: pgt_core::Error) -> ErrorInfo {
        ErrorInfo {
            name: e.name().into(),
            message: alloc::format!("{e}"),
            error: Some(e),
        }
    }

    /// An ABI misuse error.
    pub fn abi(name: &str, message: &str) -> ErrorInfo {
        ErrorInfo {
            name: name.into(),
            message: message.into(),
            error: None,
        }
    }
}

impl core::fmt::Display for ErrorInfo {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(&self.message)
    }
}

impl core::error::Error for ErrorInfo {}

/// What a header + metadata decode to (`pgt_decode`): everything a tool needs to show or rebuild the
/// state dict.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The parsed header.
    pub header: Header,
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
    pub storages: Vec<StorageRef>,
}

/// A header and metadata message (`pgt_encode`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encoded {
    /// The 32-byte header message.
    pub header: Vec<u8>,
    /// The metadata message (the transfer id, then the postcard metadata).
    pub metadata: Vec<u8>,
}

/// A new sender (`pgt_sender_new`): its handle and the plan it follows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SenderCreated {
    /// Its handle.
    pub handle: u32,
    /// The plan: which storage ranges each data message carries.
    pub plan: Plan,
}
