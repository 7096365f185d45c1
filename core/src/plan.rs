//! The transfer plan: from a validated [`Manifest`](crate::manifest::Manifest), the exact ordered
//! list of wire messages that both sides compute identically — tags, lengths and the storage byte
//! ranges each message carries.
//!
//! Every message after the header starts with the transfer id ([`crate::header::PREFIX_LEN`] bytes), so
//! its length is the prefix plus its contents; a data message's segments say where its bytes after the
//! prefix go.
//!
//! Rules (PROTOCOL.md §Plan): storages travel in wire order; zero-byte storages carry no bytes; a
//! storage of at most `bucket_size` bytes joins the open bucket (which is sent first if the storage would
//! overflow it); a larger storage closes the open bucket and is sent alone in chunks of `chunk_size`
//! bytes (the last one shorter).

use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use crate::header::{Header, PREFIX_LEN};
use crate::schema::PlanParams;

/// Tag of the header message.
pub const TAG_HEADER: u64 = 1;
/// Tag of the metadata message.
pub const TAG_METADATA: u64 = 2;
/// Tag of data message `k` is `TAG_DATA_BASE + k`; the trailer takes the next tag after the last one.
pub const TAG_DATA_BASE: u64 = 3;

/// A byte range of one storage carried by a message. A data message is the transfer id's prefix, then
/// its segments' bytes concatenated in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Segment {
    /// Index into the storages ([`crate::manifest::Manifest::storages`]).
    pub storage: u32,
    /// Offset within the storage's wire bytes.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// This segment ends its storage: a host that hashes finishes the storage's digest here and
    /// reports it with the message's other completed digests, in segment order.
    pub completes: bool,
}

/// What a message carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MessageKind {
    /// The fixed-size header.
    Header,
    /// The postcard metadata.
    Metadata,
    /// Storage bytes (a bucket or a chunk).
    Data,
    /// The metadata digest, then per-storage digests: 8 bytes little-endian each, in storage order.
    Trailer,
}

/// One wire message.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Message {
    /// What it carries.
    pub kind: MessageKind,
    /// Its tag.
    pub tag: u64,
    /// Its length in bytes on the wire (after the header: the 8-byte prefix included).
    pub len: u64,
    segments: core::ops::Range<u32>,
}

/// The ordered wire messages of one transfer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    messages: Vec<Message>,
    segments: Vec<Segment>,
}

impl Plan {
    /// The plan for storages of `sizes` bytes (in wire order) under `params`, with a trailer if
    /// `digests`, whose postcard metadata is `metadata_len` bytes (the header's).
    pub fn new(sizes: &[u64], params: PlanParams, digests: bool, metadata_len: u64) -> Plan {
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
            len: PREFIX_LEN.saturating_add(metadata_len),
            segments: 0..0,
        });
        let chunk_size = params.chunk_size;
        let mut start = 0u32;
        let mut len = 0u64;
        let mut end_message = |segments: &[Segment], len: &mut u64| {
            let end = segments.len() as u32;
            let k = messages.len() as u64 - 2;
            messages.push(Message {
                kind: MessageKind::Data,
                tag: TAG_DATA_BASE + k,
                len: PREFIX_LEN + core::mem::take(len),
                segments: start..end,
            });
            start = end;
        };
        walk(sizes.iter().copied(), params, |event| match event {
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
                        completes: offset + chunk == nbytes,
                    });
                    // `walk` ends the open bucket before a chunked storage.
                    debug_assert_eq!(len, 0);
                    len = chunk;
                    end_message(&segments, &mut len);
                    offset += chunk;
                }
            }
        });
        if digests {
            let k = messages.len() as u64 - 2;
            messages.push(Message {
                kind: MessageKind::Trailer,
                tag: TAG_DATA_BASE + k,
                len: PREFIX_LEN + 8 + 8 * sizes.len() as u64,
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

    /// Total bytes of all messages (prefixes included).
    pub fn wire_bytes(&self) -> u64 {
        self.messages.iter().map(|m| m.len).sum()
    }
}

/// How many data messages the plan for storages of `sizes` bytes has, computed without allocating, in
/// time linear in the number of storages (a chunked storage is counted, not walked chunk by chunk).
pub fn count_data_messages(sizes: impl IntoIterator<Item = u64>, params: PlanParams) -> u64 {
    let chunk_size = params.chunk_size;
    let mut count = 0u64;
    walk(sizes, params, |event| match event {
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
fn walk(sizes: impl IntoIterator<Item = u64>, params: PlanParams, mut emit: impl FnMut(Walk)) {
    let mut bucket_len = 0u64;
    let mut bucket_open = false;
    for (i, nbytes) in sizes.into_iter().enumerate() {
        let storage = i as u32;
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
                completes: true,
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
