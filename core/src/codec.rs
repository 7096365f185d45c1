//! The wire codec: the [`Header`] and the metadata message (the transfer id, then the postcard-encoded
//! [`Metadata`]), decoded under hard [`Limits`] and then validated into a [`Manifest`].

use alloc::vec::Vec;

use crate::digest::digest;
use crate::header::{prefix, prefix_of, Header, Limits, PREFIX_LEN, VERSION};
use crate::manifest::Manifest;
use crate::scan::{decoded_size_budget, scan, scan_minimal, ScanLimits};
use crate::schema::{Metadata, PlanParams};
use crate::tree::{Leaf, Node, Value};
use crate::{Error, Result};

/// Encodes validated metadata for transfer `transfer_id`: the header and the metadata message (the
/// transfer id, then the postcard metadata). Refuses metadata that receivers would refuse as
/// [`Error::DecodedTooLarge`] (a property of the encoded bytes, so checked on them).
pub fn encode(manifest: &Manifest, transfer_id: u64) -> Result<(Header, Vec<u8>)> {
    let message = postcard::to_extend(manifest.metadata(), prefix(transfer_id).to_vec())
        .map_err(|_| Error::Encode)?;
    let body = &message[PREFIX_LEN as usize..];
    decoded_size(body)?;
    Ok((header_of(manifest, body, transfer_id), message))
}

/// Validates metadata given as its postcard bytes (as a sandboxed core gets it from its host) and
/// encodes it: the manifest, header and message that [`Manifest::new`] and [`encode`] make of
/// [`decode_metadata`]`(bytes)`, with the same errors. Bytes that are postcard's own encoding of what
/// they decode to (every varint minimal, as any postcard encoder writes them) are copied into the
/// message instead of being encoded again.
pub fn encode_postcard(
    bytes: &[u8],
    digests: bool,
    limits: &Limits,
    transfer_id: u64,
) -> Result<(Manifest, Header, Vec<u8>)> {
    let (decoded, minimal) = scan_minimal(bytes, ScanLimits::NONE)?;
    let manifest = Manifest::new(decode_scanned(bytes)?, digests, limits)?;
    if !minimal {
        let (header, message) = encode(&manifest, transfer_id)?;
        return Ok((manifest, header, message));
    }
    let max = decoded_size_budget(bytes.len() as u64);
    if decoded > max {
        return Err(Error::DecodedTooLarge { max });
    }
    let mut message = Vec::with_capacity(PREFIX_LEN as usize + bytes.len());
    message.extend_from_slice(&prefix(transfer_id));
    message.extend_from_slice(bytes);
    let header = header_of(&manifest, bytes, transfer_id);
    Ok((manifest, header, message))
}

/// [`encode`]'s header and message for the same validated metadata at another `step`, for transfer
/// `transfer_id`, made from `message` (what [`encode`] or [`encode_postcard`] gave for `manifest`)
/// without encoding the rest again: the step is the metadata's first field (PROTOCOL.md §6), so only
/// the prefix and the step's bytes change. `manifest` is updated to the new step. Gives the same
/// bytes and the same errors as encoding the updated metadata.
pub fn encode_step(
    manifest: &mut Manifest,
    message: &mut Vec<u8>,
    step: Option<u64>,
    transfer_id: u64,
) -> Result<Header> {
    let rest = message
        .get(PREFIX_LEN as usize..)
        .and_then(split_step)
        .ok_or(Error::Encode)?
        .1;
    let head = message.len() - rest.len();
    let mut new = [0u8; PREFIX_LEN as usize + MAX_STEP_LEN];
    new[..PREFIX_LEN as usize].copy_from_slice(&prefix(transfer_id));
    let len = PREFIX_LEN as usize
        + postcard::to_slice(&step, &mut new[PREFIX_LEN as usize..])
            .map_err(|_| Error::Encode)?
            .len();
    message.splice(..head, new[..len].iter().copied());
    manifest.set_step(step);
    let body = &message[PREFIX_LEN as usize..];
    // The decoded-size budget follows the encoded length, which a step of another length changes.
    if len != head {
        decoded_size(body)?;
    }
    Ok(header_of(manifest, body, transfer_id))
}

/// Most bytes postcard takes for an `Option<u64>`: the tag and a 10-byte varint.
const MAX_STEP_LEN: usize = 11;

fn header_of(manifest: &Manifest, body: &[u8], transfer_id: u64) -> Header {
    Header {
        version: VERSION,
        flags: manifest.flags(),
        metadata_len: body.len() as u64,
        metadata_digest: digest(body),
        transfer_id,
    }
}

/// Decodes and validates the metadata message that `header` announced, checking in this order: its
/// prefix is the header's transfer id ([`Error::TransferMismatch`], message 1), its length
/// ([`Error::MetadataLength`]), the digest of the postcard bytes ([`Error::MetadataDigest`]), then
/// decoding and validation.
pub fn decode(header: &Header, message: &[u8], limits: &Limits) -> Result<Manifest> {
    let bytes = checked_body(header, message)?;
    Ok(decode_body(header, bytes, limits)?.0)
}

/// The postcard metadata of the metadata message `header` announced, once [`decode`]'s checks of its
/// prefix, length and digest passed.
pub(crate) fn checked_body<'m>(header: &Header, message: &'m [u8]) -> Result<&'m [u8]> {
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
    Ok(bytes)
}

/// [`decode`] of checked postcard metadata ([`checked_body`]): the manifest and the metadata's decoded
/// size (PROTOCOL.md §11).
pub(crate) fn decode_body(
    header: &Header,
    bytes: &[u8],
    limits: &Limits,
) -> Result<(Manifest, u64)> {
    // Every cap that must hold before decoding, in one pass that allocates nothing (see `scan`); only
    // bytes that pass are decoded.
    let decoded = scan(
        bytes,
        ScanLimits {
            max_leaves: limits.max_leaves,
            max_ndim: Some(limits.max_ndim),
            max_decoded: decoded_size_budget(bytes.len() as u64),
        },
    )?;
    let metadata = decode_scanned(bytes)?;
    Ok((
        Manifest::new(metadata, header.has_digests(), limits)?,
        decoded,
    ))
}

/// The step of postcard metadata `bytes` (its first field, PROTOCOL.md §6) and the bytes after it,
/// when the step's bytes are postcard's own encoding of it (no padded varint); else `None`.
pub(crate) fn split_step(bytes: &[u8]) -> Option<(Option<u64>, &[u8])> {
    let (step, rest) = postcard::take_from_bytes::<Option<u64>>(bytes).ok()?;
    let mut own = [0u8; MAX_STEP_LEN];
    let own = postcard::to_slice(&step, &mut own).ok()?;
    (bytes.get(..bytes.len() - rest.len()) == Some(&own[..])).then_some((step, rest))
}

/// The decoded size of a metadata message (PROTOCOL.md §11): what decoding it, validating it and
/// building its key paths takes in memory, by the cost model of [`crate::scan::cost`]. Fails as
/// decoding would (malformed or truncated input, trailing bytes), or with [`Error::DecodedTooLarge`]
/// when it exceeds [`decoded_size_budget`]`(bytes.len())`; no other limit applies.
pub fn decoded_size(bytes: &[u8]) -> Result<u64> {
    scan(
        bytes,
        ScanLimits {
            max_leaves: u64::MAX,
            max_ndim: None,
            max_decoded: decoded_size_budget(bytes.len() as u64),
        },
    )
}

/// Decodes the postcard metadata without validating it or applying any limit (for tools that show
/// malformed input); the whole input must be consumed.
pub fn decode_metadata(bytes: &[u8]) -> Result<Metadata> {
    scan(bytes, ScanLimits::NONE)?;
    decode_scanned(bytes)
}

/// Decodes bytes that passed [`scan`]. Their counts are real (each element is there), so the tree and
/// the leaves are allocated at their exact size, not grown by doubling.
fn decode_scanned(bytes: &[u8]) -> Result<Metadata> {
    // The fields of `Metadata` before `tree`: postcard encodes a struct as its fields in order, as a
    // tuple, and a sequence as its varint length, then its elements.
    type Head = (Option<u64>, u32, Vec<u32>, PlanParams);
    let ((step, source, destinations, plan), rest) =
        postcard::take_from_bytes::<Head>(bytes).map_err(Error::from_postcard)?;
    let (tree, rest) = take_vec(rest, |n: &mut Node| {
        if let Node::Dict(keys) = n {
            keys.shrink_to_fit();
        }
    })?;
    let (leaves, rest) = take_vec(rest, shrink_leaf)?;
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

/// A `Vec<T>` (varint count, then the elements), allocated once at its count (at most one element per
/// remaining byte); `shrink` gives back what serde's decoding of each element over-allocated.
fn take_vec<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    shrink: impl Fn(&mut T),
) -> Result<(Vec<T>, &[u8])> {
    let (count, mut rest) =
        postcard::take_from_bytes::<u64>(bytes).map_err(Error::from_postcard)?;
    let count = usize::try_from(count).map_err(|_| Error::MalformedMetadata)?;
    let mut out = Vec::with_capacity(count.min(rest.len()));
    for _ in 0..count {
        let (mut item, r) = postcard::take_from_bytes::<T>(rest).map_err(Error::from_postcard)?;
        shrink(&mut item);
        out.push(item);
        rest = r;
    }
    Ok((out, rest))
}

/// serde decodes a list longer than 1 MiB by growing it (doubling): the lists of a leaf that can be that
/// long give their spare capacity back, so that what stays decoded is what the decoded size charged.
/// (Dims lists are at most `max_ndim` long.)
fn shrink_leaf(leaf: &mut Leaf) {
    match leaf {
        Leaf::Value(Value::Bytes(b)) => b.shrink_to_fit(),
        Leaf::DTensor { spec, .. } => spec.mesh.ranks.shrink_to_fit(),
        Leaf::Sharded {
            local_shards,
            global,
        } => {
            local_shards.shrink_to_fit();
            global.shards.shrink_to_fit();
        }
        Leaf::Value(_) | Leaf::Tensor(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn values(ints: &[i128]) -> Metadata {
        Metadata {
            step: None,
            source: 0,
            destinations: vec![1],
            plan: PlanParams::default(),
            tree: core::iter::once(Node::List(ints.len() as u64))
                .chain(ints.iter().map(|_| Node::Leaf))
                .collect(),
            leaves: ints.iter().map(|&i| Leaf::Value(Value::Int(i))).collect(),
        }
    }

    #[test]
    fn i128_ints_round_trip_and_i64_ones_keep_their_bytes() {
        let ints = [
            0,
            -1,
            i128::from(i64::MIN),
            i128::from(i64::MAX),
            1 << 63,
            i128::from(u64::MAX),
            i128::MIN,
            i128::MAX,
        ];
        let manifest = Manifest::new(values(&ints), false, &Limits::default()).unwrap();
        let (header, message) = encode(&manifest, 7).unwrap();
        let decoded = decode(&header, &message, &Limits::default()).unwrap();
        assert_eq!(decoded.into_metadata(), values(&ints));
        // An int in i64's range is the same bytes as the i64 was (postcard's zigzag varint), so
        // metadata from before ints were i128 decodes as it did.
        for i in [0i64, -1, 42, i64::MIN, i64::MAX] {
            assert_eq!(
                postcard::to_allocvec(&i128::from(i)).unwrap(),
                postcard::to_allocvec(&i).unwrap(),
                "{i}"
            );
        }
    }
}
