//! The fixed-size header message and the [`Limits`] a receiver applies to untrusted bytes.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The first bytes of every transfer.
pub const MAGIC: [u8; 4] = *b"PGT\0";
/// The protocol version this crate speaks.
pub const VERSION: u16 = 1;
/// Header flag: a trailer of per-storage digests follows the data messages.
pub const FLAG_DIGESTS: u16 = 1;
const KNOWN_FLAGS: u16 = FLAG_DIGESTS;

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

/// The fixed-size header message: magic, version, flags, metadata length and digest (all little-endian).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
