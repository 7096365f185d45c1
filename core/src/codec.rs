//! The wire codec: a fixed-size [`Header`], then the postcard-encoded [`Metadata`]; decoding under hard
//! [`Limits`], then validation into a [`Manifest`] (a separate type: unvalidated metadata is never used).

use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use crate::digest::digest;
use crate::plan::PlanParams;
use crate::tree::{key_paths_within, KeyPath, Leaf, Node};
use crate::{Error, Result};

/// The first bytes of every transfer.
pub const MAGIC: [u8; 4] = *b"PGT\0";
/// The protocol version this crate speaks.
pub const VERSION: u16 = 1;
/// Header flag: a trailer of per-storage digests follows the data messages.
pub const FLAG_DIGESTS: u16 = 1;
const KNOWN_FLAGS: u16 = FLAG_DIGESTS;

/// Hard caps applied while decoding untrusted bytes. Every cap bounds memory or work before it is spent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest metadata message accepted, in bytes (checked from the header, before allocating). Also
    /// bounds the leaves' key paths to 4× this many bytes of key text ([`Error::KeyPathsTooLarge`]).
    pub max_metadata_bytes: u64,
    /// Most leaves (tensor and value) in one state dict (checked from the announced count, before the
    /// leaves are decoded).
    pub max_leaves: u64,
    /// Deepest nesting of dicts, lists and tuples.
    pub max_depth: u32,
    /// Most dimensions of any tensor, global shape or device mesh.
    pub max_ndim: u32,
    /// Largest total of storage bytes in one transfer.
    pub max_total_bytes: u64,
    /// Most wire messages a plan may have (bounds the plan's memory).
    pub max_messages: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_metadata_bytes: 64 << 20,
            max_leaves: 4 << 20,
            max_depth: 64,
            max_ndim: 64,
            max_total_bytes: 1 << 44,
            max_messages: 1 << 20,
        }
    }
}

/// The fixed-size header message: magic, version, flags, metadata length and digest (all little-endian).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Protocol version ([`VERSION`]).
    pub version: u16,
    /// Flags ([`FLAG_DIGESTS`]); unknown bits are an error.
    pub flags: u16,
    /// Length of the metadata message in bytes.
    pub metadata_len: u64,
    /// XXH3-64 of the metadata message.
    pub metadata_digest: u64,
}

impl Header {
    /// Encoded size in bytes.
    pub const SIZE: usize = 24;

    /// The header's bytes.
    pub fn to_bytes(&self) -> [u8; Header::SIZE] {
        let mut b = [0u8; Header::SIZE];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.metadata_len.to_le_bytes());
        b[16..24].copy_from_slice(&self.metadata_digest.to_le_bytes());
        b
    }

    /// Parses and checks a header: exact size, magic, version, flags, metadata length within `limits`.
    pub fn parse(bytes: &[u8], limits: &Limits) -> Result<Header> {
        let b: &[u8; Header::SIZE] = bytes.try_into().map_err(|_| Error::HeaderLength {
            got: bytes.len() as u64,
        })?;
        if b[0..4] != MAGIC {
            return Err(Error::BadMagic);
        }
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        let header = Header {
            version: u16_at(4),
            flags: u16_at(6),
            metadata_len: u64_at(8),
            metadata_digest: u64_at(16),
        };
        if header.version != VERSION {
            return Err(Error::UnsupportedVersion {
                got: header.version,
            });
        }
        if header.flags & !KNOWN_FLAGS != 0 {
            return Err(Error::UnknownFlags {
                flags: header.flags,
            });
        }
        if header.metadata_len > limits.max_metadata_bytes {
            return Err(Error::MetadataTooLarge {
                len: header.metadata_len,
                max: limits.max_metadata_bytes,
            });
        }
        Ok(header)
    }

    /// True when a digest trailer follows the data.
    pub fn has_digests(&self) -> bool {
        self.flags & FLAG_DIGESTS != 0
    }
}

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

/// Where one storage (one wire byte stream) comes from: leaf `leaf`, local shard `shard` (0 for plain
/// tensors and DTensors).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StorageRef {
    /// Index of the leaf in [`Metadata::leaves`].
    pub leaf: u32,
    /// Index of the local shard for a ShardedTensor, else 0.
    pub shard: u32,
    /// Bytes of the storage.
    pub nbytes: u64,
    /// Element type of the storage.
    pub dtype: crate::dtype::DType,
}

/// Validated metadata plus the tables derived from it: key paths and the storage list.
#[derive(Clone, Debug, PartialEq)]
pub struct Manifest {
    metadata: Metadata,
    digests: bool,
    paths: Vec<KeyPath>,
    storages: Vec<StorageRef>,
    leaf_storages: Vec<u32>,
    total_bytes: u64,
}

impl Manifest {
    /// Validates `metadata` under `limits`. `digests`: whether the transfer carries a digest trailer.
    pub fn new(metadata: Metadata, digests: bool, limits: &Limits) -> Result<Manifest> {
        if metadata.leaves.len() as u64 > limits.max_leaves {
            return Err(Error::TooManyLeaves {
                count: metadata.leaves.len() as u64,
                max: limits.max_leaves,
            });
        }
        if metadata.destinations.is_empty() {
            return Err(Error::NoDestinations);
        }
        let mut seen = alloc::collections::BTreeSet::new();
        for &d in &metadata.destinations {
            if d == metadata.source {
                return Err(Error::SourceIsDestination { rank: d });
            }
            if !seen.insert(d) {
                return Err(Error::DuplicateDestination { rank: d });
            }
        }
        metadata.plan.validate()?;
        let paths = key_paths_within(
            &metadata.tree,
            limits.max_depth,
            limits.max_metadata_bytes.saturating_mul(4),
        )?;
        if paths.len() != metadata.leaves.len() {
            return Err(Error::LeafCountMismatch {
                tree: paths.len() as u64,
                leaves: metadata.leaves.len() as u64,
            });
        }
        let mut storages = Vec::new();
        let mut leaf_storages = Vec::with_capacity(metadata.leaves.len() + 1);
        let mut total_bytes = 0u64;
        for (i, leaf) in metadata.leaves.iter().enumerate() {
            validate_leaf(leaf, limits.max_ndim)?;
            leaf_storages.push(storages.len() as u32);
            for (shard, layout) in leaf.storages().enumerate() {
                total_bytes = total_bytes
                    .checked_add(layout.nbytes)
                    .filter(|&t| t <= limits.max_total_bytes)
                    .ok_or(Error::TotalBytesTooLarge {
                        max: limits.max_total_bytes,
                    })?;
                storages.push(StorageRef {
                    leaf: i as u32,
                    shard: shard as u32,
                    nbytes: layout.nbytes,
                    dtype: layout.dtype,
                });
            }
        }
        leaf_storages.push(storages.len() as u32);
        let manifest = Manifest {
            metadata,
            digests,
            paths,
            storages,
            leaf_storages,
            total_bytes,
        };
        // The plan's size is checked here so that a manifest always has a plan within the limits.
        let messages = crate::plan::count_data_messages(&manifest);
        if messages > limits.max_messages {
            return Err(Error::TooManyMessages {
                count: messages,
                max: limits.max_messages,
            });
        }
        Ok(manifest)
    }

    /// The validated metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Takes the metadata back.
    pub fn into_metadata(self) -> Metadata {
        self.metadata
    }

    /// Whether a digest trailer follows the data.
    pub fn digests(&self) -> bool {
        self.digests
    }

    /// The key path of every leaf, in leaf order.
    pub fn paths(&self) -> &[KeyPath] {
        &self.paths
    }

    /// Every storage that travels, in wire order.
    pub fn storages(&self) -> &[StorageRef] {
        &self.storages
    }

    /// The storages of leaf `leaf`, as a range of indices into [`Manifest::storages`].
    pub fn leaf_storages(&self, leaf: usize) -> core::ops::Range<usize> {
        match (
            self.leaf_storages.get(leaf),
            self.leaf_storages.get(leaf + 1),
        ) {
            (Some(&a), Some(&b)) => a as usize..b as usize,
            _ => 0..0,
        }
    }

    /// Sum of all storage bytes.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// The header flags this transfer uses.
    pub fn flags(&self) -> u16 {
        if self.digests {
            FLAG_DIGESTS
        } else {
            0
        }
    }
}

fn validate_leaf(leaf: &Leaf, max_ndim: u32) -> Result<()> {
    match leaf {
        Leaf::Value(_) => Ok(()),
        Leaf::Tensor(layout) => layout.validate(max_ndim),
        Leaf::DTensor { local, spec } => {
            local.validate(max_ndim)?;
            spec.validate(local, max_ndim)
        }
        Leaf::Sharded {
            local_shards,
            global,
        } => {
            for shard in local_shards {
                shard.layout.validate(max_ndim)?;
            }
            global.validate(local_shards, max_ndim)
        }
    }
}

/// Encodes validated metadata: the header and the metadata message.
pub fn encode(manifest: &Manifest) -> Result<(Header, Vec<u8>)> {
    let bytes = postcard::to_allocvec(manifest.metadata()).map_err(|_| Error::Encode)?;
    let header = Header {
        version: VERSION,
        flags: manifest.flags(),
        metadata_len: bytes.len() as u64,
        metadata_digest: digest(&bytes),
    };
    Ok((header, bytes))
}

/// Decodes and validates the metadata message that `header` announced.
pub fn decode(header: &Header, bytes: &[u8], limits: &Limits) -> Result<Manifest> {
    if bytes.len() as u64 != header.metadata_len {
        return Err(Error::MetadataLength {
            expected: header.metadata_len,
            got: bytes.len() as u64,
        });
    }
    if digest(bytes) != header.metadata_digest {
        return Err(Error::MetadataDigest);
    }
    let metadata = decode_metadata_within(bytes, limits.max_leaves)?;
    Manifest::new(metadata, header.has_digests(), limits)
}

/// [`decode_metadata`], refusing more than `max_leaves` leaves from their announced count, before they are
/// decoded: a leaf of 2 wire bytes takes hundreds of bytes decoded.
fn decode_metadata_within(bytes: &[u8], max_leaves: u64) -> Result<Metadata> {
    // The fields of `Metadata` before `leaves`: postcard encodes a struct as its fields in order, as a
    // tuple, and a sequence as its varint length, then its elements.
    type Head = (Option<u64>, u32, Vec<u32>, PlanParams, Vec<Node>);
    let ((step, source, destinations, plan, tree), rest) =
        postcard::take_from_bytes::<Head>(bytes).map_err(Error::from_postcard)?;
    let (count, _) = postcard::take_from_bytes::<u64>(rest).map_err(Error::from_postcard)?;
    if count > max_leaves {
        return Err(Error::TooManyLeaves {
            count,
            max: max_leaves,
        });
    }
    let (leaves, rest) =
        postcard::take_from_bytes::<Vec<Leaf>>(rest).map_err(Error::from_postcard)?;
    if !rest.is_empty() {
        return Err(Error::TrailingBytes {
            count: rest.len() as u64,
        });
    }
    Ok(Metadata {
        step,
        source,
        destinations,
        plan,
        tree,
        leaves,
    })
}

/// Decodes the postcard metadata without validating it (for tools that show malformed input); the whole
/// input must be consumed.
pub fn decode_metadata(bytes: &[u8]) -> Result<Metadata> {
    decode_metadata_within(bytes, u64::MAX)
}
