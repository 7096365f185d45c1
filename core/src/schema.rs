//! The metadata message's schema: everything a sender announces before the tensor bytes, postcard-encoded
//! in field order (PROTOCOL.md §6). Validation turns it into a [`crate::manifest::Manifest`].

use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use crate::tree::{Leaf, Node};
use crate::{Error, Result};

/// Chunk sizes are multiples of this, so chunks split storages on element boundaries for every dtype.
pub const CHUNK_ALIGN: u64 = 64;
/// Largest chunk: below MPI's 2 GiB count limit with room to spare.
pub const MAX_CHUNK_SIZE: u64 = 1 << 30;

/// Everything the receiver learns before the tensor bytes: postcard-encoded in this field order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// Training step of the checkpoint, for consistency checks.
    pub step: Option<u64>,
    /// Rank that sends the checkpoint.
    pub source: u32,
    /// Receiving ranks; in chain fan-out also the relay order.
    pub destinations: Vec<u32>,
    /// Bucketing, chunking and fan-out parameters: both sides derive the same plan from them.
    pub plan: PlanParams,
    /// The tree structure, flat in pre-order.
    pub tree: Vec<Node>,
    /// The leaves, in depth-first order.
    pub leaves: Vec<Leaf>,
}

/// How the sender reaches several receivers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FanOut {
    /// The sender sends every message to every destination (as torch's PGTransport).
    Direct,
    /// The sender sends each data message once, to the first destination; each receiver forwards it to
    /// the next destination as it arrives. Header and metadata still go directly to every destination.
    Chain,
}

/// Plan parameters; travel in the metadata so both sides derive the same plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PlanParams {
    /// Fan-out mode.
    pub fanout: FanOut,
    /// Storages of at most this many bytes are coalesced into buckets of at most this size.
    pub bucket_size: u64,
    /// Larger storages are split into chunks of this many bytes.
    pub chunk_size: u64,
}

impl Default for PlanParams {
    fn default() -> PlanParams {
        PlanParams {
            fanout: FanOut::Chain,
            bucket_size: 1 << 20,
            chunk_size: 4 << 20,
        }
    }
}

impl PlanParams {
    /// Checks `CHUNK_ALIGN ≤ chunk_size ≤ MAX_CHUNK_SIZE`, `chunk_size % CHUNK_ALIGN == 0` and
    /// `bucket_size ≤ chunk_size`.
    pub fn validate(&self) -> Result<()> {
        if self.chunk_size < CHUNK_ALIGN
            || self.chunk_size > MAX_CHUNK_SIZE
            || self.chunk_size % CHUNK_ALIGN != 0
        {
            return Err(Error::BadChunkSize {
                chunk_size: self.chunk_size,
            });
        }
        if self.bucket_size > self.chunk_size {
            return Err(Error::BadBucketSize {
                bucket_size: self.bucket_size,
                chunk_size: self.chunk_size,
            });
        }
        Ok(())
    }
}
