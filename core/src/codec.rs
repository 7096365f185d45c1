//! The wire codec: the [`Header`] and the postcard-encoded [`Metadata`] message, decoded under hard
//! [`Limits`] and then validated into a [`Manifest`].

use alloc::vec::Vec;

use crate::digest::digest;
use crate::header::{Header, Limits, VERSION};
use crate::manifest::Manifest;
use crate::schema::{Metadata, PlanParams};
use crate::tree::{Leaf, Node};
use crate::{Error, Result};

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
