//! The sans-IO sender: validates and encodes a state dict's metadata, then hands the host one send at a
//! time, in plan order. The host moves the bytes (and hashes storage bytes when asked); nothing here does
//! I/O.
//!
//! Driving it (or let [`crate::drive::send`] do it): call [`Sender::poll`] until it returns
//! [`SendPoll::Done`]. Each [`SendPoll::Send`] must be performed, with the bytes
//! [`Sender::payload`] names; sends to one destination must go out in the order they were polled (sends to
//! different destinations may run in parallel). When an op has `hash: true`, feed each segment's bytes to
//! one [`crate::digest::StorageHasher`] per storage, finish the hash at every segment whose `completes`
//! is set, and report the message's finished digests, in segment order, with
//! [`Sender::handle_digests`]. [`SendPoll::WaitDigests`] means the trailer is next but some digests are
//! missing: finish the sends in flight, report, poll again.
//!
//! Every message after the header starts with the transfer id the host chose ([`Sender::new`]): the
//! header, metadata and trailer bytes the sender hands out include it; a data message's payload names
//! it ([`Payload::Storages`]) for the host to send before the segments' bytes.

use alloc::vec;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use crate::codec::{encode, encode_postcard, encode_step};
use crate::digest::digest;
use crate::header::{prefix, Header, Limits, PREFIX_LEN};
use crate::manifest::Manifest;
use crate::plan::{MessageKind, Plan, Segment};
use crate::schema::{FanOut, Metadata, PlanParams};
use crate::tree::{Leaf, Node};
use crate::{Error, Result};

/// The bytes of one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payload<'a> {
    /// The whole message, held by the state machine (header; metadata and trailer with their prefix).
    Bytes(&'a [u8]),
    /// A data message: `prefix` (the transfer id), then the storage byte ranges held by the host,
    /// concatenated in order.
    Storages {
        /// The message's first 8 bytes.
        prefix: [u8; PREFIX_LEN as usize],
        /// The storage byte ranges that follow.
        segments: &'a [Segment],
    },
}

/// One send for the host to perform; its bytes are [`Sender::payload`]`(message)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SendOp {
    /// Destination rank.
    pub to: u32,
    /// Index of the message in the plan.
    pub message: u32,
    /// What the message carries.
    pub kind: MessageKind,
    /// Tag of the message.
    pub tag: u64,
    /// Length of the message (the prefix included).
    pub len: u64,
    /// Hash the storage bytes while sending (set once per data message when digests are on).
    pub hash: bool,
    /// The transfer id the message starts with (8 bytes little-endian; `None` for the header): the
    /// first bytes of a metadata or trailer message's bytes, sent before a data message's segments.
    pub prefix: Option<u64>,
}

/// What the sender wants next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SendPoll {
    /// Perform this send.
    Send(SendOp),
    /// The trailer is next and storage digests are missing: report them, then poll again.
    WaitDigests,
    /// Every message has been handed out.
    Done,
}

/// The sender state machine for one transfer.
#[derive(Debug)]
pub struct Sender {
    manifest: Manifest,
    transfer_id: u64,
    header: [u8; Header::SIZE],
    metadata: Vec<u8>,
    plan: Plan,
    /// Next (message, destination index) pair to hand out.
    cursor: (usize, usize),
    digests: Vec<Option<u64>>,
    missing_digests: usize,
    /// The trailer: prefix and metadata digest, then the storage digests once all are known.
    trailer: Vec<u8>,
    trailer_done: bool,
    /// The limits the metadata was validated under.
    limits: Limits,
}

/// A sender's validated and encoded metadata, kept after its transfer ([`Sender::into_kept`]) so that
/// the same state dict can be sent again at another step ([`Sender::again`]) without validating and
/// encoding it again: what a trainer pushing its weights every step sends.
#[derive(Debug)]
pub struct KeptMetadata {
    manifest: Manifest,
    /// The metadata message as last sent: the prefix, then the postcard metadata.
    message: Vec<u8>,
    limits: Limits,
}

impl KeptMetadata {
    /// The metadata it holds (at the step last sent).
    pub fn metadata(&self) -> &Metadata {
        self.manifest.metadata()
    }

    /// Whether it was sent with a digest trailer.
    pub fn digests(&self) -> bool {
        self.manifest.digests()
    }

    /// Takes the metadata back, at `step`.
    pub fn into_metadata_at(self, step: Option<u64>) -> Metadata {
        let mut metadata = self.manifest.into_metadata();
        metadata.step = step;
        metadata
    }

    /// Whether it is, but for its step, the metadata of a send from `source` to `destinations`
    /// under `plan` and `digests` of a state dict whose tree is `tree` and whose leaves
    /// `leaves_match` accepts (a host compares its own tensors with them, without building leaves):
    /// when it is, [`Sender::again`] sends that dict. Every field of [`Metadata`] but the step counts.
    pub fn describes(
        &self,
        (source, destinations): (u32, &[u32]),
        plan: PlanParams,
        digests: bool,
        tree: &[Node],
        leaves_match: impl FnOnce(&[Leaf]) -> bool,
    ) -> bool {
        // Destructured, so that a field added to `Metadata` must be considered here.
        let Metadata {
            step: _,
            source: kept_source,
            destinations: kept_destinations,
            plan: kept_plan,
            tree: kept_tree,
            leaves,
        } = self.metadata();
        *kept_source == source
            && kept_destinations == destinations
            && *kept_plan == plan
            && self.digests() == digests
            && kept_tree == tree
            && leaves_match(leaves)
    }
}

impl Sender {
    /// Validates `metadata` (the sender never sends what a receiver would reject under `limits`) and
    /// encodes it. `digests`: send a digest trailer. `transfer_id`: this transfer's identity, which
    /// every message after the header starts with; the host picks it, at random (so that no two
    /// transfers between a pair of ranks share one: PROTOCOL.md §2), and the core does no I/O.
    pub fn new(
        metadata: Metadata,
        digests: bool,
        limits: &Limits,
        transfer_id: u64,
    ) -> Result<Sender> {
        let manifest = Manifest::new(metadata, digests, limits)?;
        let encoded = encode(&manifest, transfer_id)?;
        Ok(Sender::encoded(manifest, encoded, transfer_id, limits))
    }

    /// [`Sender::new`] for the kept metadata at `step`, with the same bytes on the wire and the same
    /// errors. Under the limits it was validated under, only the step's bytes are encoded again;
    /// under others it is validated and encoded whole.
    pub fn again(
        kept: KeptMetadata,
        step: Option<u64>,
        limits: &Limits,
        transfer_id: u64,
    ) -> Result<Sender> {
        if kept.limits != *limits {
            let digests = kept.digests();
            return Sender::new(kept.into_metadata_at(step), digests, limits, transfer_id);
        }
        let KeptMetadata {
            mut manifest,
            mut message,
            ..
        } = kept;
        let header = encode_step(&mut manifest, &mut message, step, transfer_id)?;
        Ok(Sender::encoded(
            manifest,
            (header, message),
            transfer_id,
            limits,
        ))
    }

    /// What [`Sender::again`] needs to send this metadata again (at any point of the transfer).
    pub fn into_kept(self) -> KeptMetadata {
        KeptMetadata {
            manifest: self.manifest,
            message: self.metadata,
            limits: self.limits,
        }
    }

    /// [`Sender::new`] for metadata given as its postcard bytes (how a sandboxed core gets it from its
    /// host): the same errors, and the same bytes on the wire ([`encode_postcard`]: bytes that are
    /// postcard's own encoding are sent as they are instead of being encoded again).
    pub fn from_postcard(
        metadata: &[u8],
        digests: bool,
        limits: &Limits,
        transfer_id: u64,
    ) -> Result<Sender> {
        let (manifest, header, message) = encode_postcard(metadata, digests, limits, transfer_id)?;
        Ok(Sender::encoded(
            manifest,
            (header, message),
            transfer_id,
            limits,
        ))
    }

    fn encoded(
        manifest: Manifest,
        (header, metadata): (Header, Vec<u8>),
        transfer_id: u64,
        limits: &Limits,
    ) -> Sender {
        let plan = manifest.plan(header.metadata_len);
        let (digests, missing_digests) = digest_slots(&manifest);
        // The trailer starts with the prefix and the metadata digest; the storage digests follow.
        let mut trailer = prefix(transfer_id).to_vec();
        trailer.extend_from_slice(&header.metadata_digest.to_le_bytes());
        Sender {
            manifest,
            transfer_id,
            header: header.to_bytes(),
            metadata,
            plan,
            cursor: (0, 0),
            digests,
            missing_digests,
            trailer,
            trailer_done: false,
            limits: *limits,
        }
    }

    /// This transfer's id.
    pub fn transfer_id(&self) -> u64 {
        self.transfer_id
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

    /// The encoded metadata message (the prefix, then the postcard metadata).
    pub fn metadata_bytes(&self) -> &[u8] {
        &self.metadata
    }

    fn recipients(&self, kind: MessageKind) -> usize {
        let dsts = self.manifest.metadata().destinations.len();
        match (self.manifest.metadata().plan.fanout, kind) {
            (_, MessageKind::Header | MessageKind::Metadata) | (FanOut::Direct, _) => dsts,
            (FanOut::Chain, _) => 1,
        }
    }

    /// The next send. See the module docs for the contract.
    pub fn poll(&mut self) -> SendPoll {
        let (m, d) = self.cursor;
        let Some(message) = self.plan.messages().get(m) else {
            return SendPoll::Done;
        };
        let kind = message.kind;
        if kind == MessageKind::Trailer && !self.trailer_done {
            if self.missing_digests > 0 {
                return SendPoll::WaitDigests;
            }
            let digests = self.digests.iter();
            self.trailer
                .extend(digests.flat_map(|d| d.unwrap_or_default().to_le_bytes()));
            self.trailer_done = true;
        }
        let op = SendOp {
            to: self.manifest.metadata().destinations[d],
            message: m as u32,
            kind,
            tag: message.tag,
            len: message.len,
            hash: self.manifest.digests() && kind == MessageKind::Data && d == 0,
            prefix: (kind != MessageKind::Header).then_some(self.transfer_id),
        };
        self.cursor = if d + 1 < self.recipients(kind) {
            (m, d + 1)
        } else {
            (m + 1, 0)
        };
        SendPoll::Send(op)
    }

    /// The bytes of message `message` once it was polled: the header, metadata or trailer, or the
    /// storage ranges of a data message.
    pub fn payload(&self, message: u32) -> Result<Payload<'_>> {
        let polled = (message as usize) < self.cursor.0
            || (message as usize == self.cursor.0 && self.cursor.1 > 0);
        let m = self
            .plan
            .messages()
            .get(message as usize)
            .filter(|_| polled)
            .ok_or(Error::MessageNotOutstanding {
                message: message.into(),
            })?;
        Ok(match m.kind {
            MessageKind::Header => Payload::Bytes(&self.header),
            MessageKind::Metadata => Payload::Bytes(&self.metadata),
            MessageKind::Trailer => Payload::Bytes(&self.trailer),
            MessageKind::Data => Payload::Storages {
                prefix: prefix(self.transfer_id),
                segments: self.plan.segments(m),
            },
        })
    }

    /// Reports the digests of the storages data message `message` completes (its segments with
    /// `completes` set, in order), hashed while sending it.
    pub fn handle_digests(&mut self, message: u32, digests: &[u64]) -> Result<()> {
        if !self.manifest.digests() {
            return Err(Error::DigestsOff);
        }
        let polled = (message as usize) < self.cursor.0
            || (message as usize == self.cursor.0 && self.cursor.1 > 0);
        let missing = record_digests(&self.plan, &mut self.digests, message, digests, polled)?;
        self.missing_digests -= missing;
        Ok(())
    }

    /// True once every message has been handed out.
    pub fn is_done(&self) -> bool {
        self.cursor.0 >= self.plan.messages().len()
    }

    /// Where this send stands once the destinations in `failed` failed ([`destination_outcome`] for
    /// its metadata's destinations and fan-out).
    pub fn destination_outcome(&self, failed: &[u32]) -> DestinationOutcome {
        let meta = self.manifest.metadata();
        destination_outcome(meta.plan.fanout, &meta.destinations, failed)
    }
}

/// Where a send stands once some destinations failed (PROTOCOL.md §3, *When a destination fails*):
/// in chain order, the destinations still served (`live`: the send goes on for them, and they count
/// as completed once their sends are done) and those cut off (`cut_off`: in Chain fan-out, the ones
/// after the first failed destination that did not fail themselves — their data would come through
/// it; in Direct fan-out, none). A host stops the send when `live` is empty.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationOutcome {
    /// Not failed and not cut off, in chain order.
    pub live: Vec<u32>,
    /// Chain fan-out: not failed, but after a failed destination, in chain order.
    pub cut_off: Vec<u32>,
}

/// The [`DestinationOutcome`] of `failed` (the destinations whose own sends failed, in any order) for a
/// send to `destinations` (in chain order) by `fanout`.
pub fn destination_outcome(
    fanout: FanOut,
    destinations: &[u32],
    failed: &[u32],
) -> DestinationOutcome {
    let first_failed = match fanout {
        FanOut::Direct => None,
        FanOut::Chain => destinations.iter().position(|d| failed.contains(d)),
    };
    let mut outcome = DestinationOutcome::default();
    for (i, &d) in destinations.iter().enumerate() {
        if failed.contains(&d) {
            continue;
        }
        match first_failed {
            Some(first) if i > first => outcome.cut_off.push(d),
            _ => outcome.live.push(d),
        }
    }
    outcome
}

/// One slot per storage, zero-byte storages already hashed; and how many are missing.
pub(crate) fn digest_slots(manifest: &Manifest) -> (Vec<Option<u64>>, usize) {
    let mut slots = vec![None; manifest.storages().len()];
    let mut missing = 0;
    if manifest.digests() {
        for (slot, s) in slots.iter_mut().zip(manifest.storages()) {
            if s.nbytes == 0 {
                *slot = Some(digest(&[]));
            } else {
                missing += 1;
            }
        }
    }
    (slots, missing)
}

/// Stores a data message's digests in their storages' slots: the message must be a polled data message,
/// reported once, with one digest per segment that completes a storage. Returns how many were stored.
pub(crate) fn record_digests(
    plan: &Plan,
    slots: &mut [Option<u64>],
    message: u32,
    digests: &[u64],
    polled: bool,
) -> Result<usize> {
    let m = plan
        .messages()
        .get(message as usize)
        .filter(|m| m.kind == MessageKind::Data && polled)
        .ok_or(Error::MessageNotOutstanding {
            message: message.into(),
        })?;
    let completing = || plan.segments(m).iter().filter(|s| s.completes);
    let expected = completing().count();
    if digests.len() != expected {
        return Err(Error::DigestCount {
            message: message.into(),
            expected: expected as u64,
            got: digests.len() as u64,
        });
    }
    if completing().any(|s| slots[s.storage as usize].is_some()) {
        return Err(Error::DigestsNotExpected {
            message: message.into(),
        });
    }
    for (s, &d) in completing().zip(digests) {
        slots[s.storage as usize] = Some(d);
    }
    Ok(expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(fanout: FanOut, failed: &[u32]) -> (Vec<u32>, Vec<u32>) {
        let o = destination_outcome(fanout, &[4, 2, 7, 9], failed);
        (o.live, o.cut_off)
    }

    #[test]
    fn a_chain_link_cuts_off_the_destinations_after_it() {
        assert_eq!(outcome(FanOut::Chain, &[]), (vec![4, 2, 7, 9], vec![]));
        assert_eq!(outcome(FanOut::Chain, &[2]), (vec![4], vec![7, 9]));
        // The first failure in chain order counts, whatever order they were reported in; a failed
        // destination is failed, not cut off.
        assert_eq!(outcome(FanOut::Chain, &[9, 2]), (vec![4], vec![7]));
        assert_eq!(outcome(FanOut::Chain, &[4]), (vec![], vec![2, 7, 9]));
        assert_eq!(outcome(FanOut::Chain, &[9]), (vec![4, 2, 7], vec![]));
        assert_eq!(outcome(FanOut::Chain, &[4, 2, 7, 9]), (vec![], vec![]));
    }

    #[test]
    fn a_direct_destination_stands_alone() {
        assert_eq!(outcome(FanOut::Direct, &[4, 2]), (vec![7, 9], vec![]));
        assert_eq!(outcome(FanOut::Direct, &[9, 7, 2, 4]), (vec![], vec![]));
    }
}
