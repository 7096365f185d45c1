//! The wire codec: the [`Header`] and the metadata message (the transfer id, then the postcard-encoded
//! [`Metadata`]), decoded under hard [`Limits`] and then validated into a [`Manifest`].

use alloc::vec::Vec;

use crate::digest::digest;
use crate::header::{prefix, prefix_of, Header, Limits, PREFIX_LEN, VERSION};
use crate::manifest::Manifest;
use crate::schema::{Metadata, PlanParams};
use crate::tree::{Leaf, Node};
use crate::{Error, Result};

/// Encodes validated metadata for transfer `transfer_id`: the header and the metadata message (the
/// transfer id, then the postcard metadata).
pub fn encode(manifest: &Manifest, transfer_id: u64) -> Result<(Header, Vec<u8>)> {
    let message = postcard::to_extend(manifest.metadata(), prefix(transfer_id).to_vec())
        .map_err(|_| Error::Encode)?;
    let body = &message[PREFIX_LEN as usize..];
    let header = Header {
        version: VERSION,
        flags: manifest.flags(),
        metadata_len: body.len() as u64,
        metadata_digest: digest(body),
        transfer_id,
    };
    Ok((header, message))
}

/// Decodes and validates the metadata message that `header` announced, checking in this order: its
/// prefix is the header's transfer id ([`Error::TransferMismatch`], message 1), its length
/// ([`Error::MetadataLength`]), the digest of the postcard bytes ([`Error::MetadataDigest`]), then
/// decoding and validation.
pub fn decode(header: &Header, message: &[u8], limits: &Limits) -> Result<Manifest> {
    if let Some(got) = prefix_of(message).filter(|&id| id != header.transfer_id) {
        return Err(Error::TransferMismatch {
            message: 1,
            expected: header.transfer_id,
            got,
        });
    }
    if message.len() as u64 != header.metadata_message_len() {
        return Err(Error::MetadataLength {
            expected: header.metadata_message_len(),
            got: message.len() as u64,
        });
    }
    let bytes = &message[PREFIX_LEN as usize..];
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
