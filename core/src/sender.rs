//! The sans-IO sender: validates and encodes a state dict's metadata, then hands the host one send at a
//! time, in plan order. The host moves the bytes (and hashes storage bytes when asked); nothing here does
//! I/O.
//!
//! Driving it: call [`Sender::poll`] until it returns [`SendPoll::Done`]. Each [`SendPoll::Send`] must be
//! performed; sends to one destination must go out in the order they were polled (sends to different
//! destinations may run in parallel). When an op has `hash: true`, feed its segments' bytes, in order, to
//! one [`crate::digest::StorageHasher`] per storage, and when a storage's last byte is hashed (segment
//! `offset + len == nbytes`) report it with [`Sender::handle_storage_digest`]. [`SendPoll::WaitDigests`]
//! means the trailer is next but some digests are missing: finish the sends in flight, report, poll again.

use alloc::vec;
use alloc::vec::Vec;

use crate::codec::{encode, Header, Limits, Manifest, Metadata};
use crate::digest::digest;
use crate::plan::{FanOut, Message, MessageKind, Plan, Segment};
use crate::{Error, Result};

/// The bytes of one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payload<'a> {
    /// Bytes held by the state machine (header, metadata, trailer).
    Bytes(&'a [u8]),
    /// Storage byte ranges held by the host, concatenated in order.
    Storages(&'a [Segment]),
}

/// One send for the host to perform.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendOp<'a> {
    /// Destination rank.
    pub to: u32,
    /// Index of the message in the plan.
    pub message: usize,
    /// Tag of the message.
    pub tag: u64,
    /// Length of the message.
    pub len: u64,
    /// What to send.
    pub payload: Payload<'a>,
    /// Hash the storage bytes while sending (set once per data message when digests are on).
    pub hash: bool,
}

/// What the sender wants next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendPoll<'a> {
    /// Perform this send.
    Send(SendOp<'a>),
    /// The trailer is next and storage digests are missing: report them, then poll again.
    WaitDigests,
    /// Every message has been handed out.
    Done,
}

/// The sender state machine for one transfer.
#[derive(Debug)]
pub struct Sender {
    manifest: Manifest,
    header: [u8; Header::SIZE],
    metadata: Vec<u8>,
    plan: Plan,
    /// Next (message, destination index) pair to hand out.
    cursor: (usize, usize),
    digests: Vec<Option<u64>>,
    missing_digests: usize,
    trailer: Vec<u8>,
}

impl Sender {
    /// Validates `metadata` (the sender never sends what a receiver would reject under `limits`) and
    /// encodes it. `digests`: send a digest trailer.
    pub fn new(metadata: Metadata, digests: bool, limits: &Limits) -> Result<Sender> {
        let manifest = Manifest::new(metadata, digests, limits)?;
        let (header, metadata) = encode(&manifest)?;
        let plan = Plan::new(&manifest, header.metadata_len);
        let mut digest_slots = vec![None; manifest.storages().len()];
        let mut missing_digests = 0;
        if digests {
            for (slot, s) in digest_slots.iter_mut().zip(manifest.storages()) {
                if s.nbytes == 0 {
                    *slot = Some(digest(&[]));
                } else {
                    missing_digests += 1;
                }
            }
        }
        Ok(Sender {
            manifest,
            header: header.to_bytes(),
            metadata,
            plan,
            cursor: (0, 0),
            digests: digest_slots,
            missing_digests,
            trailer: Vec::new(),
        })
    }

    /// The validated metadata.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The plan both sides follow.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The encoded header message.
    pub fn header_bytes(&self) -> &[u8] {
        &self.header
    }

    /// The encoded metadata message.
    pub fn metadata_bytes(&self) -> &[u8] {
        &self.metadata
    }

    fn recipients(&self, message: &Message) -> usize {
        let dsts = self.manifest.metadata().destinations.len();
        match (self.manifest.metadata().plan.fanout, message.kind) {
            (_, MessageKind::Header | MessageKind::Metadata) | (FanOut::Direct, _) => dsts,
            (FanOut::Chain, _) => 1,
        }
    }

    /// The next send. See the module docs for the contract.
    pub fn poll(&mut self) -> SendPoll<'_> {
        let (m, d) = self.cursor;
        let Some(message) = self.plan.messages().get(m) else {
            return SendPoll::Done;
        };
        if message.kind == MessageKind::Trailer && self.trailer.is_empty() {
            if self.missing_digests > 0 {
                return SendPoll::WaitDigests;
            }
            self.trailer = self
                .digests
                .iter()
                .flat_map(|d| d.unwrap_or_default().to_le_bytes())
                .collect();
        }
        self.cursor = if d + 1 < self.recipients(message) {
            (m, d + 1)
        } else {
            (m + 1, 0)
        };
        let payload = match message.kind {
            MessageKind::Header => Payload::Bytes(&self.header),
            MessageKind::Metadata => Payload::Bytes(&self.metadata),
            MessageKind::Trailer => Payload::Bytes(&self.trailer),
            MessageKind::Data => Payload::Storages(self.plan.segments(message)),
        };
        SendPoll::Send(SendOp {
            to: self.manifest.metadata().destinations[d],
            message: m,
            tag: message.tag,
            len: message.len,
            payload,
            hash: self.manifest.digests() && message.kind == MessageKind::Data && d == 0,
        })
    }

    /// Reports the digest of storage `storage`'s bytes, hashed while sending.
    pub fn handle_storage_digest(&mut self, storage: u32, digest: u64) -> Result<()> {
        if !self.manifest.digests() {
            return Err(Error::ProtocolState("digests are off for this transfer"));
        }
        let slot = self
            .digests
            .get_mut(storage as usize)
            .ok_or(Error::ProtocolState("no such storage"))?;
        if slot.is_some() {
            return Err(Error::ProtocolState("storage digest reported twice"));
        }
        *slot = Some(digest);
        self.missing_digests -= 1;
        Ok(())
    }

    /// True once every message has been handed out.
    pub fn is_done(&self) -> bool {
        self.cursor.0 >= self.plan.messages().len()
    }
}
