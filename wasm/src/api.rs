//! The guest's operations that are more than one pgt-core call, shared by the raw ABI (module `abi`),
//! the JS build and native callers (tests compare native and sandboxed runs through these).

use alloc::string::ToString;
use alloc::vec::Vec;

use pgt_core::codec;
use pgt_core::header::{Header, Limits};
use pgt_core::manifest::Manifest;
use pgt_core::schema::Metadata;
use pgt_core::Result;

use crate::types::{Encoded, Summary};

/// Parses the header and decodes + validates the metadata under `limits`.
pub fn decode(header: &[u8], metadata: &[u8], limits: &Limits) -> Result<(Header, Manifest)> {
    let header = Header::parse(header, limits)?;
    let manifest = codec::decode(&header, metadata, limits)?;
    Ok((header, manifest))
}

/// The summary of a decoded transfer.
pub fn summary(header: &Header, manifest: &Manifest) -> Summary {
    let m = manifest.metadata();
    Summary {
        header: *header,
        step: m.step,
        source: m.source,
        destinations: m.destinations.clone(),
        plan: m.plan,
        digests: manifest.digests(),
        total_bytes: manifest.total_bytes(),
        tree: m.tree.clone(),
        leaves: m.leaves.clone(),
        paths: manifest.paths().iter().map(ToString::to_string).collect(),
        path_elems: manifest.paths().to_vec(),
        storages: manifest.storages().to_vec(),
    }
}

/// Validates `metadata` (as a sender does) and encodes it for transfer `transfer_id`: the header and
/// metadata messages.
pub fn encode(
    metadata: Metadata,
    digests: bool,
    limits: &Limits,
    transfer_id: u64,
) -> Result<Encoded> {
    let manifest = Manifest::new(metadata, digests, limits)?;
    let (header, metadata) = codec::encode(&manifest, transfer_id)?;
    Ok(Encoded {
        header: header.to_bytes().to_vec(),
        metadata,
    })
}

/// [`encode`] for metadata given as its postcard bytes (pgt-core's `codec::encode_postcard`: bytes
/// that are postcard's own encoding are kept instead of being encoded again).
pub fn encode_postcard(
    metadata: &[u8],
    digests: bool,
    limits: &Limits,
    transfer_id: u64,
) -> Result<Encoded> {
    let (_, header, metadata) = codec::encode_postcard(metadata, digests, limits, transfer_id)?;
    Ok(Encoded {
        header: header.to_bytes().to_vec(),
        metadata,
    })
}

/// Digests from their little-endian bytes (8 per digest), as hosts pass them.
pub fn digests_from_le(bytes: &[u8]) -> Option<Vec<u64>> {
    if bytes.len() % 8 != 0 {
        return None;
    }
    Some(
        bytes
            .chunks_exact(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w.copy_from_slice(c);
                u64::from_le_bytes(w)
            })
            .collect(),
    )
}
