//! The transfer plan: from a validated [`Manifest`], the exact ordered list of wire messages that both
//! sides compute identically — tags, lengths and the storage byte ranges each message carries.
//!
//! Rules (PROTOCOL.md §Plan): storages travel in wire order; zero-byte storages carry no bytes; a
//! storage of at most `bucket_size` bytes joins the open bucket (which is sent first if the storage would
//! overflow it); a larger storage closes the open bucket and is sent alone in chunks of `chunk_size`
//! bytes (the last one shorter).

use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use crate::codec::{Header, Manifest};
use crate::{Error, Result};

/// Tag of the header message.
pub const TAG_HEADER: u64 = 1;
/// Tag of the metadata message.
pub const TAG_METADATA: u64 = 2;
/// Tag of data message `k` is `TAG_DATA_BASE + k`; the trailer takes the next tag after the last one.
pub const TAG_DATA_BASE: u64 = 3;

/// Chunk sizes are multiples of this, so chunks split storages on element boundaries for every dtype.
pub const CHUNK_ALIGN: u64 = 64;
/// Largest chunk: below MPI's 2 GiB count limit with room to spare.
pub const MAX_CHUNK_SIZE: u64 = 1 << 30;

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

/// A byte range of one storage carried by a message. A message's payload is its segments' bytes
/// concatenated in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Segment {
    /// Index into [`Manifest::storages`].
    pub storage: u32,
    /// Offset within the storage's wire bytes.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// What a message carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// The fixed-size header.
    Header,
    /// The postcard metadata.
    Metadata,
    /// Storage bytes (a bucket or a chunk).
    Data,
    /// Per-storage digests: 8 bytes little-endian each, in storage order.
    Trailer,
}

/// One wire message.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Message {
    /// What it carries.
    pub kind: MessageKind,
    /// Its tag.
    pub tag: u64,
    /// Its length in bytes.
    pub len: u64,
    segments: core::ops::Range<u32>,
}

/// The ordered wire messages of one transfer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    messages: Vec<Message>,
    segments: Vec<Segment>,
}

impl Plan {
    /// The plan of `manifest`, whose metadata message is `metadata_len` bytes.
    pub fn new(manifest: &Manifest, metadata_len: u64) -> Plan {
        let mut messages = Vec::new();
        let mut segments = Vec::new();
        messages.push(Message {
            kind: MessageKind::Header,
            tag: TAG_HEADER,
            len: Header::SIZE as u64,
            segments: 0..0,
        });
        messages.push(Message {
            kind: MessageKind::Metadata,
            tag: TAG_METADATA,
            len: metadata_len,
            segments: 0..0,
        });
        let chunk_size = manifest.metadata().plan.chunk_size;
        let mut start = 0u32;
        let mut len = 0u64;
        let mut end_message = |segments: &[Segment], len: &mut u64| {
            let end = segments.len() as u32;
            let k = messages.len() as u64 - 2;
            messages.push(Message {
                kind: MessageKind::Data,
                tag: TAG_DATA_BASE + k,
                len: core::mem::take(len),
                segments: start..end,
            });
            start = end;
        };
        walk(manifest, |event| match event {
            Walk::Segment(s) => {
                len += s.len;
                segments.push(s);
            }
            Walk::EndMessage => end_message(&segments, &mut len),
            Walk::Chunked { storage, nbytes } => {
                let mut offset = 0;
                while offset < nbytes {
                    let chunk = chunk_size.min(nbytes - offset);
                    segments.push(Segment {
                        storage,
                        offset,
                        len: chunk,
                    });
                    // `walk` ends the open bucket before a chunked storage.
                    debug_assert_eq!(len, 0);
                    len = chunk;
                    end_message(&segments, &mut len);
                    offset += chunk;
                }
            }
        });
        if manifest.digests() {
            let k = messages.len() as u64 - 2;
            messages.push(Message {
                kind: MessageKind::Trailer,
                tag: TAG_DATA_BASE + k,
                len: 8 * manifest.storages().len() as u64,
                segments: 0..0,
            });
        }
        Plan { messages, segments }
    }

    /// Every message, in wire order: header, metadata, data…, then the trailer if digests are on.
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// The storage byte ranges message `m` carries (empty unless it is a data message).
    pub fn segments(&self, m: &Message) -> &[Segment] {
        &self.segments[m.segments.start as usize..m.segments.end as usize]
    }

    /// Index range of the data messages in [`Plan::messages`].
    pub fn data_messages(&self) -> core::ops::Range<usize> {
        let trailer = self
            .messages
            .last()
            .is_some_and(|m| m.kind == MessageKind::Trailer);
        2..self.messages.len() - usize::from(trailer)
    }

    /// Total bytes of all messages.
    pub fn wire_bytes(&self) -> u64 {
        self.messages.iter().map(|m| m.len).sum()
    }
}

/// How many data messages the plan of `manifest` has, computed without allocating, in time linear in the
/// number of storages (a chunked storage is counted, not walked chunk by chunk).
pub fn count_data_messages(manifest: &Manifest) -> u64 {
    let chunk_size = manifest.metadata().plan.chunk_size;
    let mut count = 0u64;
    walk(manifest, |event| match event {
        Walk::Segment(_) => {}
        Walk::EndMessage => count = count.saturating_add(1),
        Walk::Chunked { nbytes, .. } => count = count.saturating_add(nbytes.div_ceil(chunk_size)),
    });
    count
}

enum Walk {
    /// A storage joins the open bucket.
    Segment(Segment),
    /// The open bucket is complete.
    EndMessage,
    /// A storage larger than a bucket travels alone, in `ceil(nbytes / chunk_size)` chunk messages.
    Chunked { storage: u32, nbytes: u64 },
}

// The one place that decides which storages share a bucket and which travel alone in chunks.
fn walk(manifest: &Manifest, mut emit: impl FnMut(Walk)) {
    let params = manifest.metadata().plan;
    let mut bucket_len = 0u64;
    let mut bucket_open = false;
    for (i, s) in manifest.storages().iter().enumerate() {
        let storage = i as u32;
        let nbytes = s.nbytes;
        if nbytes == 0 {
            continue;
        }
        if nbytes <= params.bucket_size {
            if bucket_open && bucket_len + nbytes > params.bucket_size {
                emit(Walk::EndMessage);
                bucket_len = 0;
            }
            bucket_open = true;
            bucket_len += nbytes;
            emit(Walk::Segment(Segment {
                storage,
                offset: 0,
                len: nbytes,
            }));
            continue;
        }
        if bucket_open {
            emit(Walk::EndMessage);
            bucket_open = false;
            bucket_len = 0;
        }
        emit(Walk::Chunked { storage, nbytes });
    }
    if bucket_open {
        emit(Walk::EndMessage);
    }
}
