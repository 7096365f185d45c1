//! A pass over the metadata's postcard bytes that decodes nothing: it follows the schema exactly as
//! postcard does (same varint, length, UTF-8, enum and option rules, so the same bytes fail the same
//! way at the same place), allocates only a stack of the tree's open containers, and applies the
//! caps that must hold *before* anything is decoded (PROTOCOL.md §5 and §11):
//!
//! - the leaf count against `max_leaves` ([`Error::TooManyLeaves`]), as soon as it is read;
//! - every dims list (shape, stride, mesh shape, placements, dim names, global shape and stride,
//!   shard offsets and sizes, global size) against `max_ndim` ([`Error::TooManyDims`]), as soon as
//!   its length is read;
//! - the **decoded size**: what the decoded metadata, the tables validation derives from it and the
//!   leaves' key paths take in memory, by the cost model below, against a budget proportional to
//!   the metadata's length ([`Error::DecodedTooLarge`]), checked after each value.
//!
//! [`crate::codec::decode`] scans first and decodes only bytes that passed; the sender's
//! [`crate::codec::encode`] scans what it encoded, so a sender never sends what receivers refuse.

use alloc::vec::Vec;

use crate::{Error, Result};

/// The decoded size may be at most this many times the metadata's length …
pub const DECODED_SIZE_RATIO: u64 = 64;
/// … plus this many bytes.
pub const DECODED_SIZE_SLACK: u64 = 16 << 20;

/// The decoded-size budget of a metadata message of `len` bytes:
/// `DECODED_SIZE_RATIO × len + DECODED_SIZE_SLACK` (saturating).
pub const fn decoded_size_budget(len: u64) -> u64 {
    len.saturating_mul(DECODED_SIZE_RATIO)
        .saturating_add(DECODED_SIZE_SLACK)
}

/// Bytes charged for each decoded item: the in-memory size of pgt-core's types on a 64-bit host
/// (a test checks them against `size_of`). Constants, not `size_of`, so that every host — wasm32
/// included — accepts exactly the same metadata.
pub mod cost {
    /// A tree node (`Node`).
    pub const NODE: u64 = 24;
    /// A dict key (`Key`), plus the bytes of a string key.
    pub const KEY: u64 = 24;
    /// A leaf (`Leaf`), plus its entry in the manifest's leaf → storages table (4).
    pub const LEAF: u64 = 256 + 4;
    /// A storage (`StorageRef`, in the manifest's storage list).
    pub const STORAGE: u64 = 24;
    /// A destination rank (`u32`).
    pub const DESTINATION: u64 = 4;
    /// An element of a `Vec<u64>` (dims, strides, mesh ranks, offsets, sizes).
    pub const U64: u64 = 8;
    /// A placement (`Placement`).
    pub const PLACEMENT: u64 = 8;
    /// A string in a list (a mesh dim name, `String`), plus its bytes.
    pub const STRING: u64 = 24;
    /// A local shard (`LocalShard`).
    pub const LOCAL_SHARD: u64 = 144;
    /// An entry of a ShardedTensor's global shard list (`ShardMetadata`).
    pub const SHARD: u64 = 72;
    /// A leaf's key path (`KeyPath`), built on demand …
    pub const KEY_PATH: u64 = 24;
    /// … plus per element (`PathElem`), plus the bytes of each string key in it.
    pub const PATH_ELEM: u64 = 24;
}

/// Caps of one scan.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ScanLimits {
    pub max_leaves: u64,
    /// `None`: dims lists of any length.
    pub max_ndim: Option<u32>,
    /// Largest decoded size accepted ([`decoded_size_budget`]; `u64::MAX`: no cap).
    pub max_decoded: u64,
}

impl ScanLimits {
    /// No cap: the scan only checks that the bytes decode (and measures them).
    pub const NONE: ScanLimits = ScanLimits {
        max_leaves: u64::MAX,
        max_ndim: None,
        max_decoded: u64::MAX,
    };
}

/// Scans `bytes` as a `Metadata` message under `limits`; returns its decoded size.
pub(crate) fn scan(bytes: &[u8], limits: ScanLimits) -> Result<u64> {
    scan_minimal(bytes, limits).map(|(size, _)| size)
}

/// [`scan`], also saying whether every varint in `bytes` is minimal. postcard decodes a varint with
/// padding (`0x80 0x00` for 0) and encodes none, so bytes that decode are exactly postcard's encoding
/// of what they decode to when, and only when, every varint is minimal.
pub(crate) fn scan_minimal(bytes: &[u8], limits: ScanLimits) -> Result<(u64, bool)> {
    let mut s = Scanner {
        bytes,
        pos: 0,
        size: 0,
        limits,
        padded: false,
    };
    s.metadata()?;
    if s.pos < bytes.len() {
        return Err(Error::TrailingBytes {
            count: (bytes.len() - s.pos) as u64,
        });
    }
    Ok((s.size, !s.padded))
}

struct Scanner<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Decoded size so far.
    size: u64,
    limits: ScanLimits,
    /// Whether a varint so far ended in a padding byte (`0x00` after another byte).
    padded: bool,
}

/// An open container of the tree, as the key-path walk of PROTOCOL.md §7 keeps it.
struct Frame {
    /// Children not yet started.
    remaining: u64,
    /// Index of the next child.
    next: u64,
    /// For a dict: where its keys' text lengths start in the key table.
    keys: Option<usize>,
}

impl Scanner<'_> {
    // ---- postcard's primitives, with postcard's errors ----

    fn byte(&mut self) -> Result<u8> {
        let b = *self.bytes.get(self.pos).ok_or(Error::TruncatedMetadata)?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, n: u64) -> Result<&[u8]> {
        let rest = self.bytes.len() - self.pos;
        if n > rest as u64 {
            return Err(Error::TruncatedMetadata);
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }

    /// A varint of at most `max_len` bytes whose last byte is at most `last_max` (postcard's
    /// `try_take_varint_*`).
    fn varint(&mut self, max_len: u32, last_max: u8) -> Result<u64> {
        let mut out = 0u64;
        for i in 0..max_len {
            let b = self.byte()?;
            out |= u64::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                if i == max_len - 1 && b > last_max {
                    return Err(Error::MalformedMetadata);
                }
                self.padded |= i > 0 && b == 0;
                return Ok(out);
            }
        }
        Err(Error::MalformedMetadata)
    }

    fn u64(&mut self) -> Result<u64> {
        self.varint(10, 0x01)
    }

    /// An i128 (or u128) varint, skipped: at most 19 bytes, the last holding the top 2 bits
    /// (postcard's `try_take_varint_u128`). Not accumulated: its value is not needed, and does not fit
    /// a `u64`.
    fn i128(&mut self) -> Result<()> {
        const MAX_LEN: u32 = 19;
        for i in 0..MAX_LEN {
            let b = self.byte()?;
            if b & 0x80 == 0 {
                if i == MAX_LEN - 1 && b > 0x03 {
                    return Err(Error::MalformedMetadata);
                }
                self.padded |= i > 0 && b == 0;
                return Ok(());
            }
        }
        Err(Error::MalformedMetadata)
    }

    fn u32(&mut self) -> Result<u64> {
        self.varint(5, 0x0F)
    }

    /// A sequence or string length: a `u32` varint on every host. postcard reads it as a `usize` (u64
    /// rules on 64-bit hosts, u32 on wasm32); the scan applies the narrower rules everywhere, so that
    /// a 64-bit host refuses as `MalformedMetadata` the 6-to-10-byte lengths a wasm32 host refuses,
    /// instead of reading on until `TruncatedMetadata`. An encoder's lengths are minimal varints below
    /// 2^32, so no valid metadata changes.
    fn len(&mut self) -> Result<u64> {
        self.u32()
    }

    /// A length read as a `u64` on every host and refused when over `max` (`over` names the error);
    /// otherwise read again as a length, so that a varint too long for a `u32` is still refused, and
    /// a varint that is no `u64` fails as a length does (a 6-byte run of continuation bytes cut off
    /// by the end is `MalformedMetadata`, as without the limit, not `TruncatedMetadata`).
    fn len_at_most(&mut self, max: u64, over: impl FnOnce(u64) -> Error) -> Result<u64> {
        let start = self.pos;
        if let Ok(n) = self.u64() {
            if n > max {
                return Err(over(n));
            }
        }
        self.pos = start;
        self.len()
    }

    /// The length of a dims list (at most `max_ndim` entries).
    fn ndim(&mut self) -> Result<u64> {
        match self.limits.max_ndim {
            Some(max) => self.len_at_most(u64::from(max), |ndim| Error::TooManyDims { ndim, max }),
            None => self.len(),
        }
    }

    /// A dims list (`Vec<u64>` of at most `max_ndim` entries).
    fn dims(&mut self) -> Result<()> {
        let n = self.ndim()?;
        self.u64s(n)
    }

    /// `n` u64 varints.
    fn u64s(&mut self, n: u64) -> Result<()> {
        for _ in 0..n {
            self.u64()?;
            self.charge(cost::U64)?;
        }
        Ok(())
    }

    /// A `Vec<u64>` of any length.
    fn vec_u64(&mut self) -> Result<()> {
        let n = self.len()?;
        self.u64s(n)
    }

    fn bool(&mut self) -> Result<()> {
        match self.byte()? {
            0 | 1 => Ok(()),
            _ => Err(Error::MalformedMetadata),
        }
    }

    /// An `Option` tag: whether a value follows.
    fn some(&mut self) -> Result<bool> {
        match self.byte()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(Error::MalformedMetadata),
        }
    }

    /// An enum's variant index, of `count` variants.
    fn variant(&mut self, count: u64) -> Result<u64> {
        let v = self.u32()?;
        if v >= count {
            return Err(Error::MalformedMetadata);
        }
        Ok(v)
    }

    /// A string; returns its length in bytes (charged by the caller, where it is kept).
    fn string(&mut self) -> Result<u64> {
        let n = self.len()?;
        let bytes = self.take(n)?;
        core::str::from_utf8(bytes).map_err(|_| Error::MalformedMetadata)?;
        Ok(n)
    }

    fn charge(&mut self, bytes: u64) -> Result<()> {
        self.size = self.size.saturating_add(bytes);
        if self.size > self.limits.max_decoded {
            return Err(Error::DecodedTooLarge {
                max: self.limits.max_decoded,
            });
        }
        Ok(())
    }

    // ---- the schema (PROTOCOL.md §6), field by field in declaration order ----

    fn metadata(&mut self) -> Result<()> {
        // step: Option<u64>
        if self.some()? {
            self.u64()?;
        }
        // source: u32
        self.u32()?;
        // destinations: Vec<u32>
        for _ in 0..self.len()? {
            self.u32()?;
            self.charge(cost::DESTINATION)?;
        }
        // plan: PlanParams { fanout: FanOut (2 variants), bucket_size: u64, chunk_size: u64 }
        self.variant(2)?;
        self.u64()?;
        self.u64()?;
        self.tree()?;
        // leaves: Vec<Leaf>, the count checked first (as a u64 on every host).
        let max = self.limits.max_leaves;
        let n = self.len_at_most(max, |count| Error::TooManyLeaves { count, max })?;
        for _ in 0..n {
            self.leaf()?;
            self.charge(cost::LEAF)?;
        }
        Ok(())
    }

    /// `tree: Vec<Node>`, walked as PROTOCOL.md §7 walks it to charge each `Leaf` node's key path
    /// (structural errors are validation's: here a malformed structure just ends the walk's paths).
    fn tree(&mut self) -> Result<()> {
        let n = self.len()?;
        let mut stack: Vec<Frame> = Vec::new();
        // Text lengths of the keys of the open dicts.
        let mut keys: Vec<u64> = Vec::new();
        // Elements and string-key bytes of the path of the node being read.
        let mut text = 0u64;
        for _ in 0..n {
            let container = match self.variant(4)? {
                // Dict(Vec<Key>)
                0 => {
                    let start = keys.len();
                    let count = self.len()?;
                    for _ in 0..count {
                        let len = match self.variant(2)? {
                            0 => self.string()?,
                            _ => {
                                self.u64()?;
                                0
                            }
                        };
                        self.charge(cost::KEY + len)?;
                        keys.push(len);
                    }
                    Some((count, Some(start)))
                }
                // List(u64), Tuple(u64)
                1 | 2 => Some((self.u64()?, None)),
                // Leaf
                _ => {
                    let depth = stack.len() as u64;
                    self.charge(
                        cost::KEY_PATH
                            .saturating_add(cost::PATH_ELEM.saturating_mul(depth))
                            .saturating_add(text),
                    )?;
                    None
                }
            };
            self.charge(cost::NODE)?;
            if let Some((remaining, dict)) = container {
                stack.push(Frame {
                    remaining,
                    next: 0,
                    keys: dict,
                });
            }
            // Close finished containers, then step to the next child slot (its key joins the path).
            while stack.last().is_some_and(|f| f.remaining == 0) {
                if let Some(f) = stack.pop() {
                    if let Some(start) = f.keys {
                        // The closed dict's last key left the path with it.
                        if f.next > 0 {
                            text -= keys[start + f.next as usize - 1];
                        }
                        keys.truncate(start);
                    }
                }
            }
            if let Some(top) = stack.last_mut() {
                if let Some(start) = top.keys {
                    if top.next > 0 {
                        text -= keys[start + top.next as usize - 1];
                    }
                    text += keys[start + top.next as usize];
                }
                top.remaining -= 1;
                top.next += 1;
            }
        }
        Ok(())
    }

    fn leaf(&mut self) -> Result<()> {
        match self.variant(4)? {
            // Value(Value)
            0 => match self.variant(6)? {
                0 => {}
                1 => self.bool()?,
                // Int(i128): a zigzag varint of up to 19 bytes.
                2 => self.i128()?,
                3 => {
                    self.take(8)?;
                }
                // Str(String), Bytes(Vec<u8>): one byte per byte.
                4 => {
                    let n = self.string()?;
                    self.charge(n)?;
                }
                _ => {
                    let n = self.len()?;
                    self.take(n)?;
                    self.charge(n)?;
                }
            },
            // Tensor(TensorLayout)
            1 => self.storage()?,
            // DTensor { local: TensorLayout, spec: DTensorSpec }
            2 => {
                self.storage()?;
                self.dtensor_spec()?;
            }
            // Sharded { local_shards: Vec<LocalShard>, global: ShardedTensorMetadata }
            _ => {
                for _ in 0..self.len()? {
                    self.storage()?;
                    self.shard_metadata()?;
                    self.charge(cost::LOCAL_SHARD)?;
                }
                for _ in 0..self.len()? {
                    self.shard_metadata()?;
                    self.charge(cost::SHARD)?;
                }
                self.dims()?;
                self.dtype()?;
            }
        }
        Ok(())
    }

    fn dtype(&mut self) -> Result<()> {
        self.variant(20).map(drop)
    }

    /// A `TensorLayout` whose storage travels: its layout and its entry in the storage list.
    fn storage(&mut self) -> Result<()> {
        self.dtype()?;
        self.dims()?; // shape
        self.dims()?; // stride
        self.u64()?; // storage_offset
        self.u64()?; // nbytes
        self.charge(cost::STORAGE)
    }

    fn dtensor_spec(&mut self) -> Result<()> {
        // mesh: DeviceMesh { shape, ranks, dim_names: Option<Vec<String>>, device_type }
        self.dims()?;
        self.vec_u64()?;
        if self.some()? {
            for _ in 0..self.ndim()? {
                let len = self.string()?;
                self.charge(cost::STRING + len)?;
            }
        }
        let len = self.string()?;
        self.charge(len)?;
        // placements: Vec<Placement> (Shard(u32), Replicate, Partial(ReduceOp: 5 variants))
        for _ in 0..self.ndim()? {
            match self.variant(3)? {
                0 => {
                    self.u32()?;
                }
                1 => {}
                _ => {
                    self.variant(5)?;
                }
            }
            self.charge(cost::PLACEMENT)?;
        }
        self.dims()?; // global_shape
        self.dims()?; // global_stride
        self.dtype()
    }

    /// A `ShardMetadata { offsets, sizes, placement }` (its own size is charged by the caller).
    fn shard_metadata(&mut self) -> Result<()> {
        self.dims()?;
        self.dims()?;
        let len = self.string()?;
        self.charge(len)
    }
}

#[cfg(all(test, target_pointer_width = "64"))]
mod tests {
    use super::cost;
    use crate::dtensor::Placement;
    use crate::manifest::StorageRef;
    use crate::sharded::{LocalShard, ShardMetadata};
    use crate::tree::{Key, KeyPath, Leaf, Node, PathElem};
    use alloc::string::String;
    use core::mem::size_of;

    #[test]
    fn costs_are_the_sizes_of_the_types() {
        let size = |n: usize| n as u64;
        assert_eq!(cost::NODE, size(size_of::<Node>()));
        assert_eq!(cost::KEY, size(size_of::<Key>()));
        assert_eq!(cost::LEAF, size(size_of::<Leaf>() + size_of::<u32>()));
        assert_eq!(cost::STORAGE, size(size_of::<StorageRef>()));
        assert_eq!(cost::DESTINATION, size(size_of::<u32>()));
        assert_eq!(cost::U64, size(size_of::<u64>()));
        assert_eq!(cost::PLACEMENT, size(size_of::<Placement>()));
        assert_eq!(cost::STRING, size(size_of::<String>()));
        assert_eq!(cost::LOCAL_SHARD, size(size_of::<LocalShard>()));
        assert_eq!(cost::SHARD, size(size_of::<ShardMetadata>()));
        assert_eq!(cost::KEY_PATH, size(size_of::<KeyPath>()));
        assert_eq!(cost::PATH_ELEM, size(size_of::<PathElem>()));
    }
}
