//! The fixed-size header message, the transfer-id prefix of every later message, and the [`Limits`]
//! a receiver applies to untrusted bytes.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The first bytes of every transfer.
pub const MAGIC: [u8; 4] = *b"PGT\0";
/// The protocol version this crate speaks.
pub const VERSION: u16 = 2;
/// Header flag: a trailer of per-storage digests follows the data messages.
pub const FLAG_DIGESTS: u16 = 1;
const KNOWN_FLAGS: u16 = FLAG_DIGESTS;

/// Bytes of the prefix every message after the header starts with: the transfer id, u64
/// little-endian ([`prefix`]).
pub const PREFIX_LEN: u64 = 8;

/// The prefix of every message of transfer `transfer_id` after its header.
pub fn prefix(transfer_id: u64) -> [u8; PREFIX_LEN as usize] {
    transfer_id.to_le_bytes()
}

/// The transfer id a message starts with, if it has the bytes of a prefix.
pub fn prefix_of(message: &[u8]) -> Option<u64> {
    let mut id = [0u8; PREFIX_LEN as usize];
    id.copy_from_slice(message.get(..PREFIX_LEN as usize)?);
    Some(u64::from_le_bytes(id))
}

/// Whether `message` (or its first bytes) is a message of another transfer than `transfer_id`: it
/// has a prefix, and the prefix is another transfer's. Such a message is *stale* (left by an earlier
/// transfer that failed) or foreign, and is never used: a host skips it and receives the next message
/// with that tag (PROTOCOL.md §12). A message too short to have a prefix is judged as this transfer's
/// (and fails its length check).
pub fn is_stale(message: &[u8], transfer_id: u64) -> bool {
    prefix_of(message).is_some_and(|id| id != transfer_id)
}

/// Most stale messages a host skips while waiting for one message, before it fails the receive with
/// [`Error::TooManyStale`] (the per-operation timeout bounds the wait as well).
pub const MAX_STALE: u32 = 1024;

/// Longest message a host reads whole just to see whether it is stale, when it is not the length it
/// waits for: the largest data message the protocol allows (a chunk of 2^30 bytes and its prefix),
/// and a margin for the trailer's metadata digest. A longer message with the tag waited for fails the
/// receive with the process group's length error.
pub const MAX_STALE_LEN: u64 = (1 << 30) + 2 * PREFIX_LEN;

/// Hard caps applied while decoding untrusted bytes. Every cap bounds memory or work before it is spent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

/// The fixed-size header message: magic, version, flags, metadata length and digest, transfer id (all
/// little-endian).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Protocol version ([`VERSION`]).
    pub version: u16,
    /// Flags ([`FLAG_DIGESTS`]); unknown bits are an error.
    pub flags: u16,
    /// Length of the postcard metadata in bytes (the metadata message is its prefix and these bytes).
    pub metadata_len: u64,
    /// XXH3-64 of the postcard metadata (without the prefix).
    pub metadata_digest: u64,
    /// The transfer's identity, chosen by the sender: every later message of the transfer starts with
    /// it ([`prefix`]).
    pub transfer_id: u64,
}

impl Header {
    /// Encoded size in bytes.
    pub const SIZE: usize = 32;

    /// The header's bytes.
    pub fn to_bytes(&self) -> [u8; Header::SIZE] {
        let mut b = [0u8; Header::SIZE];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.metadata_len.to_le_bytes());
        b[16..24].copy_from_slice(&self.metadata_digest.to_le_bytes());
        b[24..32].copy_from_slice(&self.transfer_id.to_le_bytes());
        b
    }

    /// Parses and checks a header, in this order: magic, version (so that a peer of another version is
    /// named as such, whatever its header's length), exact size, flags, metadata length within
    /// `limits`. A message too short to hold magic and version is [`Error::HeaderLength`].
    pub fn parse(bytes: &[u8], limits: &Limits) -> Result<Header> {
        let length = || Error::HeaderLength {
            got: bytes.len() as u64,
        };
        if bytes.len() < 6 {
            return Err(length());
        }
        if bytes[0..4] != MAGIC {
            return Err(Error::BadMagic);
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != VERSION {
            return Err(Error::UnsupportedVersion { got: version });
        }
        let b: &[u8; Header::SIZE] = bytes.try_into().map_err(|_| length())?;
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
            transfer_id: u64_at(24),
        };
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

    /// Length of the metadata message: the prefix and the postcard metadata.
    pub fn metadata_message_len(&self) -> u64 {
        PREFIX_LEN.saturating_add(self.metadata_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            version: VERSION,
            flags: FLAG_DIGESTS,
            metadata_len: 24,
            metadata_digest: 0x746a_b653_59c4_afbd,
            transfer_id: 0x0123_4567_89ab_cdef,
        }
    }

    #[test]
    fn round_trip_and_layout() {
        let b = header().to_bytes();
        assert_eq!(
            &b[24..32],
            &[0xef, 0xcd, 0xab, 0x89, 0x67, 0x45, 0x23, 0x01]
        );
        assert_eq!(Header::parse(&b, &Limits::default()), Ok(header()));
    }

    #[test]
    fn a_version_1_header_is_named_by_its_version() {
        // A version-1 header is 24 bytes: magic, version 1, flags, metadata length and digest.
        let mut v1 = header().to_bytes()[..24].to_vec();
        v1[4..6].copy_from_slice(&1u16.to_le_bytes());
        let limits = Limits::default();
        assert_eq!(
            Header::parse(&v1, &limits),
            Err(Error::UnsupportedVersion { got: 1 })
        );
        // Too short for a version: a length error; a version-2 header of the wrong length too.
        assert_eq!(
            Header::parse(&v1[..5], &limits),
            Err(Error::HeaderLength { got: 5 })
        );
        assert_eq!(
            Header::parse(&header().to_bytes()[..31], &limits),
            Err(Error::HeaderLength { got: 31 })
        );
        let mut bad = v1.clone();
        bad[0] = b'X';
        assert_eq!(Header::parse(&bad, &limits), Err(Error::BadMagic));
    }

    #[test]
    fn stale_means_another_transfers_prefix() {
        let id = 0x0123_4567_89ab_cdef;
        let mut m = prefix(id).to_vec();
        m.extend_from_slice(b"payload");
        assert_eq!(prefix_of(&m), Some(id));
        assert!(!is_stale(&m, id));
        assert!(is_stale(&m, id ^ 1));
        // Too short for a prefix: judged as this transfer's (its length check fails it).
        assert!(!is_stale(&m[..7], id ^ 1));
        assert_eq!(prefix_of(&m[..7]), None);
    }
}
