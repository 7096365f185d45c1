//! The sans-IO receiver: checks the header, decodes and validates the metadata, binds every storage to an
//! in-place or fresh destination, then hands the host one receive (or forward, in chain fan-out) at a
//! time, checks digests and yields the received tree. Nothing here does I/O; tensor bytes never pass
//! through it.
//!
//! Driving it (or let [`crate::drive::receive`] do it): call [`Receiver::poll`] and act on what it
//! returns, until [`RecvPoll::Done`]:
//! - [`RecvPoll::Recv`] of a header, metadata or trailer: receive the message and pass its bytes to
//!   [`Receiver::handle_header`], [`Receiver::handle_metadata`] or [`Receiver::handle_trailer`].
//! - [`RecvPoll::Recv`] of a data message: receive its bytes into the bound destinations of its segments
//!   ([`Incoming::plan`]; through a staging buffer and [`crate::dtype::convert`] where the binding casts)
//!   and call [`Receiver::handle_data`]; when `hash` is set, hash each segment's bytes as in
//!   [`crate::sender`] and report the message's completed digests with [`Receiver::handle_digests`].
//!   Later receives may be polled before earlier ones complete.
//! - [`RecvPoll::NeedBindings`]: pick in-place destinations (from [`Receiver::incoming`] and
//!   [`Receiver::paths`]) and call [`Receiver::finish_bindings`]; unbound storages get fresh destinations.
//! - [`RecvPoll::Forward`]: send the message's wire bytes ([`Receiver::payload`]: as received, before
//!   any cast) to `to`, then call [`Receiver::handle_forwarded`].
//! - [`RecvPoll::Wait`]: something polled is still in flight; complete it, then poll again.
//!
//! After `Done`, [`Receiver::finish`] yields the result. A receiver that stops early never yields a
//! result: a partial checkpoint is never reported complete.
//!
//! Every message after the header starts with the transfer id the header announced
//! ([`RecvOp::prefix`]); a message that starts with another one is stale ([`RecvOp::is_stale`]): the
//! host skips it and receives the next message with that tag. After an error, [`Receiver::leftover`]
//! names the messages the plan says are still coming, for the host to receive and discard, so that the
//! next transfer on the link starts clean (PROTOCOL.md §12).

use alloc::boxed::Box;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use crate::codec::{checked_body, decode_body, split_step};
use crate::dtype::DType;
use crate::header::{self, prefix, prefix_of, Header, Limits, MAX_STALE, PREFIX_LEN};
use crate::manifest::{Manifest, StorageRef};
use crate::plan::{MessageKind, Plan, TAG_HEADER, TAG_METADATA};
use crate::scan::decoded_size_budget;
use crate::schema::FanOut;
use crate::sender::{digest_slots, record_digests, Payload};
use crate::tree::{KeyPath, Leaf, Node};
use crate::{Call, Error, Result};

/// Receiver settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiverOptions {
    /// This receiver's rank.
    pub rank: u32,
    /// The rank the transfer comes from.
    pub source: u32,
    /// If set, the checkpoint must carry this step.
    pub expected_step: Option<u64>,
    /// Caps on the untrusted metadata.
    pub limits: Limits,
}

/// Where a storage's bytes end up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Dest {
    /// A buffer the host allocates (of the binding's `nbytes`).
    Fresh,
    /// An existing buffer, by the host's id.
    InPlace(u64),
}

/// The destination of one storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Binding {
    /// Fresh or in place.
    pub dest: Dest,
    /// The destination's dtype; differs from the wire dtype when the host casts on receive.
    pub dtype: DType,
    /// The destination's byte size.
    pub nbytes: u64,
    /// The wire dtype when it differs from `dtype` (cast on receive).
    pub cast_from: Option<DType>,
}

/// An existing buffer the host offers for storage `storage` (see [`Receiver::finish_bindings`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct InPlace {
    /// Index of the storage ([`Incoming::storages`]).
    pub storage: u32,
    /// The host's id for the buffer (reported back in [`Dest::InPlace`]).
    pub id: u64,
    /// The buffer's dtype.
    pub dtype: DType,
    /// The buffer's size in bytes.
    pub nbytes: u64,
}

/// What the metadata announced, for a host to bind and place bytes: the storages and the plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incoming {
    /// The transfer's id (the header's): every message after the header starts with it.
    pub transfer_id: u64,
    /// Step of the checkpoint.
    pub step: Option<u64>,
    /// Every storage, in wire order.
    pub storages: Vec<StorageRef>,
    /// Total storage bytes.
    pub total_bytes: u64,
    /// The plan: which storage byte ranges each message carries.
    pub plan: Plan,
}

/// One receive for the host to perform.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RecvOp {
    /// Rank to receive from.
    pub from: u32,
    /// Index of the message in the plan (0 = header, 1 = metadata).
    pub message: u32,
    /// What the message carries.
    pub kind: MessageKind,
    /// Tag of the message.
    pub tag: u64,
    /// Exact length of the message (the prefix included).
    pub len: u64,
    /// Hash the storage bytes as they land (digests on).
    pub hash: bool,
    /// The transfer id the message starts with (8 bytes little-endian; `None` for the header, which
    /// announces it). A data message's first 8 bytes are received apart from its segments' bytes;
    /// a metadata or trailer message is handed to the receiver whole. A message that starts with
    /// another id is stale: skip it ([`RecvOp::is_stale`]).
    pub prefix: Option<u64>,
}

impl RecvOp {
    /// Whether `message` (or at least its first 8 bytes) belongs to another transfer: a stale or
    /// foreign message with this op's tag, never used. The host discards it and receives the next
    /// message with the tag (counting with [`RecvOp::skip_stale`]).
    pub fn is_stale(&self, message: &[u8]) -> bool {
        self.prefix.is_some_and(|id| header::is_stale(message, id))
    }

    /// Counts one stale message skipped while waiting for this op's message; fails with
    /// [`Error::TooManyStale`] past [`MAX_STALE`].
    pub fn skip_stale(&self, skipped: &mut u64) -> Result<()> {
        *skipped += 1;
        if *skipped > u64::from(MAX_STALE) {
            return Err(Error::TooManyStale {
                message: self.message.into(),
                skipped: *skipped - 1,
            });
        }
        Ok(())
    }

    /// The prefix's bytes (empty for the header).
    pub fn prefix_bytes(&self) -> Option<[u8; PREFIX_LEN as usize]> {
        self.prefix.map(prefix)
    }
}

/// One message to forward to the next receiver (chain fan-out); its bytes are
/// [`Receiver::payload`]`(message)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ForwardOp {
    /// Rank to send to.
    pub to: u32,
    /// Index of the message in the plan.
    pub message: u32,
    /// What the message carries.
    pub kind: MessageKind,
    /// Tag of the message.
    pub tag: u64,
    /// Length of the message (the prefix included).
    pub len: u64,
    /// The transfer id the message starts with: a data message's 8 first bytes, sent before its
    /// segments' bytes (a forwarded trailer is the trailer as received, prefix included).
    pub prefix: Option<u64>,
}

/// What the receiver wants next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RecvPoll {
    /// Receive this message.
    Recv(RecvOp),
    /// Bind destinations: call [`Receiver::finish_bindings`].
    NeedBindings,
    /// Forward this message.
    Forward(ForwardOp),
    /// Complete an operation in flight, then poll again.
    Wait,
    /// Every message is handled: call [`Receiver::finish`] for the verified result.
    Done,
}

/// The result of a complete, verified transfer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Received {
    /// Step of the checkpoint.
    pub step: Option<u64>,
    /// The tree structure as sent, flat in pre-order.
    pub tree: Vec<Node>,
    /// The leaves as received: tensor dtypes and storage sizes as bound (after cast on receive), each
    /// local shard placed on this receiver (`rank:R/cpu`, [`crate::sharded::ShardMetadata::received_on`]);
    /// a ShardedTensor's global metadata as sent but for its dtype, the bound one.
    pub leaves: Vec<Leaf>,
    /// The destination of every storage, in storage order.
    pub bindings: Vec<Binding>,
}

/// What an in-place receive has written into its in-place targets so far, by leaf
/// ([`Receiver::in_place_written`]): what a caller whose receive failed needs to know about the
/// buffers it serves from. Leaves are named by key path, in display form, in leaf order.
///
/// "Written" means *landed, not verified*: digests are compared once the trailer is in, so the
/// leaves of a transfer that failed on a digest mismatch are listed as written (their targets hold
/// the bytes that arrived, the wrong ones included).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct InPlaceWritten {
    /// In-place leaves whose every in-place storage landed whole in its target: they hold the new
    /// bytes.
    pub written: Vec<String>,
    /// In-place leaves not in `written` that may hold some new bytes: a data message carrying part
    /// of one of their storages was handed to the host (it may have landed whole, in part, or not at
    /// all). Every other in-place leaf's target is untouched.
    pub partly: Vec<String>,
}

impl InPlaceWritten {
    /// Nothing was (or may have been) written in place.
    pub fn is_empty(&self) -> bool {
        self.written.is_empty() && self.partly.is_empty()
    }
}

#[derive(Debug)]
enum State {
    Header,
    Metadata(Header),
    Binding(Box<Transfer>),
    Streaming(Box<Transfer>),
    /// Failed, or refused what was announced: only [`Receiver::leftover`] is left.
    Leftover(Box<Leftover>),
    Finished,
}

/// What a failed transfer's plan still says is coming to this receiver.
#[derive(Debug)]
struct Leftover {
    plan: Plan,
    from: u32,
    transfer_id: u64,
    next: usize,
}

#[derive(Debug)]
struct Transfer {
    manifest: Manifest,
    /// For [`Receiver::finish_keeping`]: the postcard metadata after the step.
    kept: Option<Vec<u8>>,
    plan: Plan,
    transfer_id: u64,
    metadata_digest: u64,
    bindings: Vec<Binding>,
    upstream: u32,
    downstream: Option<u32>,
    /// Next message to hand out as a receive.
    next_recv: usize,
    received: Vec<bool>,
    /// Messages 2.. received in order up to here (forwarding follows this).
    received_prefix: usize,
    next_forward: usize,
    forwards_done: usize,
    /// Messages whose forward the host has reported (a repeated report must not count twice).
    forwarded: Vec<bool>,
    digests: Vec<Option<u64>>,
    missing_digests: usize,
    trailer: Option<Vec<u8>>,
    /// The first digest mismatch in storage order. Kept, not returned at once, so that a chain
    /// receiver still forwards everything (downstream ranks check their own copy);
    /// [`Receiver::finish`] reports it.
    mismatch: Option<Error>,
}

/// The largest metadata, by decoded size (PROTOCOL.md §11), that [`Receiver::finish_keeping`] keeps:
/// keeping clones the manifest and copies the message's bytes, so a receive's memory would grow by up
/// to twice its metadata. 16 MiB is three times the 10,220-leaf reference dict's 5.0 MB.
pub const MAX_KEPT_DECODED: u64 = 16 << 20;

// A kept manifest is within the decoded-size budget of a message of any length (checked here, when
// pgt-core compiles): a new step's length cannot take a kept metadata over its budget.
const _: () = assert!(MAX_KEPT_DECODED <= decoded_size_budget(0));

/// A receiver's validated metadata, kept from a complete transfer ([`Receiver::finish_keeping`]). A
/// receiver given it ([`Receiver::keeping`]) takes a metadata message whose postcard bytes are the
/// same but for the step as this manifest at that step, without decoding and validating it again:
/// what a receiver of a trainer's weights, pushed every step, gets. Everything else is checked as
/// for any message, in the same order, with the same errors.
#[derive(Debug)]
pub struct KeptManifest {
    manifest: Manifest,
    /// The postcard metadata after the step.
    rest: Vec<u8>,
    limits: Limits,
}

impl KeptManifest {
    /// The kept manifest at `step` when `bytes` (checked postcard metadata that `header` announced)
    /// are its metadata at that step, validated under the same `limits`; else `None`, and the bytes
    /// are decoded as any others.
    fn reuse(self, header: &Header, bytes: &[u8], limits: &Limits) -> Option<(Manifest, Vec<u8>)> {
        if self.limits != *limits || self.manifest.digests() != header.has_digests() {
            return None;
        }
        let (step, rest) = split_step(bytes)?;
        // The decoded size is the kept one. A step of another length changes the budget
        // (`64 × length + 16 MiB`), but never below a kept manifest's size (see `MAX_KEPT_DECODED`).
        if rest != self.rest {
            return None;
        }
        let mut manifest = self.manifest;
        manifest.set_step(step);
        Some((manifest, self.rest))
    }
}

/// The receiver state machine for one transfer.
#[derive(Debug)]
pub struct Receiver {
    options: ReceiverOptions,
    state: State,
    /// Whether [`Receiver::finish_keeping`] keeps the manifest ([`Receiver::keeping`]).
    keep: bool,
    /// What the previous transfer from the same source kept, until the metadata comes.
    kept: Option<KeptManifest>,
}

impl Receiver {
    /// A receiver waiting for the header from `options.source`.
    pub fn new(options: ReceiverOptions) -> Receiver {
        Receiver {
            options,
            state: State::Header,
            keep: false,
            kept: None,
        }
    }

    /// [`Receiver::new`], for a receiver whose validated metadata [`Receiver::finish_keeping`] keeps for
    /// the next transfer, given what the previous transfer from the same source kept (if any).
    pub fn keeping(options: ReceiverOptions, kept: Option<KeptManifest>) -> Receiver {
        Receiver {
            keep: true,
            kept,
            ..Receiver::new(options)
        }
    }

    fn transfer(&self) -> Option<&Transfer> {
        match &self.state {
            State::Binding(t) | State::Streaming(t) => Some(t),
            _ => None,
        }
    }

    /// The validated metadata, once received.
    pub fn manifest(&self) -> Option<&Manifest> {
        self.transfer().map(|t| &t.manifest)
    }

    /// The plan, once the metadata is received.
    pub fn plan(&self) -> Option<&Plan> {
        self.transfer().map(|t| &t.plan)
    }

    /// What the metadata announced (an owned copy, for hosts that keep it across calls).
    pub fn incoming(&self) -> Result<Incoming> {
        let t = self.transfer().ok_or(Error::UnexpectedCall {
            call: Call::Incoming,
        })?;
        Ok(Incoming {
            transfer_id: t.transfer_id,
            step: t.manifest.metadata().step,
            storages: t.manifest.storages().to_vec(),
            total_bytes: t.manifest.total_bytes(),
            plan: t.plan.clone(),
        })
    }

    /// The key path of every leaf, once the metadata is received (for binding in place by key path).
    pub fn paths(&self) -> Result<&[KeyPath]> {
        let t = self.transfer().ok_or(Error::UnexpectedCall {
            call: Call::Incoming,
        })?;
        Ok(t.manifest.paths())
    }

    /// The received tree's nodes, pre-order (the metadata's `tree`), once the metadata is in: what a
    /// host compares its own tree with before it binds in place by position.
    pub fn tree(&self) -> Result<&[Node]> {
        let t = self.transfer().ok_or(Error::UnexpectedCall {
            call: Call::Incoming,
        })?;
        Ok(&t.manifest.metadata().tree)
    }

    /// Every storage's binding, in storage order, once bindings are finished (else empty).
    pub fn bindings(&self) -> &[Binding] {
        match &self.state {
            State::Streaming(t) => &t.bindings,
            _ => &[],
        }
    }

    /// What to do next. See the module docs.
    pub fn poll(&mut self) -> RecvPoll {
        let source = self.options.source;
        match &mut self.state {
            State::Header => RecvPoll::Recv(RecvOp {
                from: source,
                message: 0,
                kind: MessageKind::Header,
                tag: TAG_HEADER,
                len: Header::SIZE as u64,
                hash: false,
                prefix: None,
            }),
            State::Metadata(h) => RecvPoll::Recv(RecvOp {
                from: source,
                message: 1,
                kind: MessageKind::Metadata,
                tag: TAG_METADATA,
                len: h.metadata_message_len(),
                hash: false,
                prefix: Some(h.transfer_id),
            }),
            State::Binding(_) => RecvPoll::NeedBindings,
            State::Streaming(t) => t.poll(),
            // Only `leftover` is left; `finish` says `Incomplete`.
            State::Finished | State::Leftover(_) => RecvPoll::Done,
        }
    }

    /// Handles the header message's bytes.
    pub fn handle_header(&mut self, bytes: &[u8]) -> Result<()> {
        if !matches!(self.state, State::Header) {
            return Err(Error::UnexpectedCall { call: Call::Header });
        }
        self.state = State::Metadata(Header::parse(bytes, &self.options.limits)?);
        Ok(())
    }

    /// Handles the metadata message's bytes (its prefix included): decodes, validates, then checks, in
    /// this order, that the source is the expected one, the step is the expected one and this rank is
    /// a destination. When one of these three refuses a valid transfer this rank is a destination of,
    /// the plan says what is still coming: [`Receiver::leftover`].
    pub fn handle_metadata(&mut self, bytes: &[u8]) -> Result<()> {
        let State::Metadata(header) = &self.state else {
            return Err(Error::UnexpectedCall {
                call: Call::Metadata,
            });
        };
        let header = *header;
        let limits = &self.options.limits;
        let body = checked_body(&header, bytes)?;
        let reused = self
            .kept
            .take()
            .and_then(|kept| kept.reuse(&header, body, limits));
        let (manifest, kept) = match reused {
            Some((manifest, rest)) => (manifest, Some(rest)),
            None => {
                let (manifest, decoded) = decode_body(&header, body, limits)?;
                let kept = match self.keep && decoded <= MAX_KEPT_DECODED {
                    true => split_step(body).map(|(_, rest)| rest.to_vec()),
                    false => None,
                };
                (manifest, kept)
            }
        };
        let meta = manifest.metadata();
        let rank = self.options.rank;
        let position = meta.destinations.iter().position(|&d| d == rank);
        let upstream = |p: usize| match (meta.plan.fanout, p) {
            (FanOut::Direct, _) | (FanOut::Chain, 0) => meta.source,
            (FanOut::Chain, p) => meta.destinations[p - 1],
        };
        let refused = if meta.source != self.options.source {
            Some(Error::UnexpectedSource {
                expected: self.options.source,
                got: meta.source,
            })
        } else if self
            .options
            .expected_step
            .is_some_and(|step| meta.step != Some(step))
        {
            Some(Error::StepMismatch {
                expected: self.options.expected_step,
                got: meta.step,
            })
        } else if position.is_none() {
            Some(Error::NotADestination { rank })
        } else {
            None
        };
        if let Some(e) = refused {
            // Drain only what comes from the ranks this receiver expects: a transfer from another
            // source, or for other ranks, sends this rank nothing more it could name.
            if let (Error::StepMismatch { .. }, Some(p)) = (&e, position) {
                self.state = State::Leftover(Box::new(Leftover {
                    from: upstream(p),
                    plan: manifest.plan(header.metadata_len),
                    transfer_id: header.transfer_id,
                    next: 2,
                }));
            }
            return Err(e);
        }
        let position = position.unwrap_or_default();
        let downstream = match meta.plan.fanout {
            FanOut::Direct => None,
            FanOut::Chain => meta.destinations.get(position + 1).copied(),
        };
        let upstream = upstream(position);
        let plan = manifest.plan(header.metadata_len);
        let (digests, missing_digests) = digest_slots(&manifest);
        let messages = plan.messages().len();
        self.state = State::Binding(Box::new(Transfer {
            manifest,
            kept,
            plan,
            transfer_id: header.transfer_id,
            metadata_digest: header.metadata_digest,
            bindings: Vec::new(),
            upstream,
            downstream,
            next_recv: 2,
            received: vec![false; messages],
            received_prefix: 2,
            next_forward: 2,
            forwards_done: 0,
            forwarded: vec![false; messages],
            digests,
            missing_digests,
            trailer: None,
            mismatch: None,
        }));
        Ok(())
    }

    /// Ends binding: each of `in_place` binds its storage to an existing buffer, whose size must match
    /// the incoming storage exactly (after cast, when its dtype is another float type; the error names
    /// the leaf's key path); every other storage gets a fresh destination of its wire dtype and size.
    /// Returns every storage's binding, in storage order.
    pub fn finish_bindings(&mut self, in_place: &[InPlace]) -> Result<&[Binding]> {
        let State::Binding(t) = &mut self.state else {
            return Err(Error::UnexpectedCall {
                call: Call::Bindings,
            });
        };
        let mut bindings: Vec<Binding> = t
            .manifest
            .storages()
            .iter()
            .map(|s| Binding {
                dest: Dest::Fresh,
                dtype: s.dtype,
                nbytes: s.nbytes,
                cast_from: None,
            })
            .collect();
        for target in in_place {
            let binding = bind(&t.manifest, target)?;
            bindings[target.storage as usize] = binding;
        }
        t.bindings = bindings;
        let State::Binding(t) = core::mem::replace(&mut self.state, State::Finished) else {
            unreachable!("checked above");
        };
        self.state = State::Streaming(t);
        Ok(self.bindings())
    }

    fn streaming(&mut self, call: Call) -> Result<&mut Transfer> {
        match &mut self.state {
            State::Streaming(t) => Ok(t),
            _ => Err(Error::UnexpectedCall { call }),
        }
    }

    /// Reports that data message `message` (polled before) has fully landed.
    pub fn handle_data(&mut self, message: u32) -> Result<()> {
        let t = self.streaming(Call::Data)?;
        t.mark_received(message as usize, MessageKind::Data)
    }

    /// Reports the digests of the storages data message `message` completes (its segments with
    /// `completes` set, in order), hashed as they landed.
    pub fn handle_digests(&mut self, message: u32, digests: &[u64]) -> Result<()> {
        let t = self.streaming(Call::Digests)?;
        if !t.manifest.digests() {
            return Err(Error::DigestsOff);
        }
        let polled = (message as usize) < t.next_recv;
        t.missing_digests -= record_digests(&t.plan, &mut t.digests, message, digests, polled)?;
        t.check_digests();
        Ok(())
    }

    /// Handles the trailer's bytes (its prefix included), checking in this order: its prefix is this
    /// transfer's ([`Error::TransferMismatch`]), its length ([`Error::TrailerLength`]), its copy of the
    /// metadata digest is the header's ([`Error::TrailerMetadataDigest`]). The per-storage digests are
    /// compared once every storage's digest is known.
    pub fn handle_trailer(&mut self, bytes: &[u8]) -> Result<()> {
        let t = self.streaming(Call::Trailer)?;
        let message = t.plan.messages().len() - 1;
        let expected = t.plan.messages()[message].len;
        if t.trailer.is_some() || message >= t.next_recv || !t.manifest.digests() {
            return Err(Error::UnexpectedCall {
                call: Call::Trailer,
            });
        }
        if let Some(got) = prefix_of(bytes).filter(|&id| id != t.transfer_id) {
            return Err(Error::TransferMismatch {
                message: message as u64,
                expected: t.transfer_id,
                got,
            });
        }
        if bytes.len() as u64 != expected {
            return Err(Error::TrailerLength {
                expected,
                got: bytes.len() as u64,
            });
        }
        let at = PREFIX_LEN as usize;
        if prefix_of(&bytes[at..]) != Some(t.metadata_digest) {
            return Err(Error::TrailerMetadataDigest);
        }
        t.trailer = Some(bytes.to_vec());
        t.mark_received(message, MessageKind::Trailer)?;
        t.check_digests();
        Ok(())
    }

    /// The wire bytes of message `message` for a forward: the storage ranges of a data message, or the
    /// trailer as received.
    pub fn payload(&self, message: u32) -> Result<Payload<'_>> {
        let t = self.transfer().ok_or(Error::UnexpectedCall {
            call: Call::Forwarded,
        })?;
        let m = t
            .plan
            .messages()
            .get(message as usize)
            .ok_or(Error::ForwardNotIssued {
                message: message.into(),
            })?;
        match m.kind {
            MessageKind::Data => Ok(Payload::Storages {
                prefix: prefix(t.transfer_id),
                segments: t.plan.segments(m),
            }),
            MessageKind::Trailer => Ok(Payload::Bytes(t.trailer.as_deref().ok_or(
                Error::ForwardNotIssued {
                    message: message.into(),
                },
            )?)),
            _ => Err(Error::ForwardNotIssued {
                message: message.into(),
            }),
        }
    }

    /// Reports that forward `message` (polled before) has been sent.
    pub fn handle_forwarded(&mut self, message: u32) -> Result<()> {
        let t = self.streaming(Call::Forwarded)?;
        let m = message as usize;
        if m >= t.next_forward || m < 2 {
            return Err(Error::ForwardNotIssued {
                message: message.into(),
            });
        }
        if core::mem::replace(&mut t.forwarded[m], true) {
            return Err(Error::ForwardReportedTwice {
                message: message.into(),
            });
        }
        t.forwards_done += 1;
        Ok(())
    }

    /// After an error (of the receiver's, or of the host's): the next message the plan says is still
    /// coming to this receiver, which a host receives (skipping stale messages as usual) and discards,
    /// so that the next transfer on the link does not meet it (PROTOCOL.md §12). `None` once there is
    /// none left, or when nothing is known to be coming: the header or the metadata failed, or the
    /// transfer was refused for another source or for other ranks. Messages handed out as receives
    /// before are the host's (it knows whether they arrived). The first call ends the transfer: the
    /// receiver then only hands out leftovers, and never yields a result.
    pub fn leftover(&mut self) -> Option<RecvOp> {
        let state = core::mem::replace(&mut self.state, State::Finished);
        let mut left = match state {
            State::Binding(t) | State::Streaming(t) => Box::new(Leftover {
                from: t.upstream,
                next: t.next_recv,
                transfer_id: t.transfer_id,
                plan: t.plan,
            }),
            State::Leftover(l) => l,
            _ => return None,
        };
        let m = left.next;
        let message = left.plan.messages().get(m)?;
        let op = RecvOp {
            from: left.from,
            message: m as u32,
            kind: message.kind,
            tag: message.tag,
            len: message.len,
            hash: false,
            prefix: Some(left.transfer_id),
        };
        left.next += 1;
        self.state = State::Leftover(left);
        Some(op)
    }

    /// Which in-place leaves the transfer has written so far ([`InPlaceWritten`]), from the data
    /// messages reported landed ([`Receiver::handle_data`]) and those handed out as receives. A host
    /// whose landed bytes do not reach some in-place targets at once (held in staging until the
    /// transfer verified, or cast later) names those storages in `not_in_target`: their targets count
    /// as untouched. A storage of no bytes counts for nothing. Empty before bindings are final and
    /// after [`Receiver::leftover`] (ask before draining).
    pub fn in_place_written(&self, not_in_target: &[u32]) -> InPlaceWritten {
        let State::Streaming(t) = &self.state else {
            return InPlaceWritten::default();
        };
        let storages = t.manifest.storages();
        // Per storage: every message carrying a part of it landed / one was handed out.
        let mut landed = vec![true; storages.len()];
        let mut touched = vec![false; storages.len()];
        for m in t.plan.data_messages() {
            let (issued, received) = (m < t.next_recv, t.received[m]);
            for seg in t.plan.segments(&t.plan.messages()[m]) {
                let s = seg.storage as usize;
                landed[s] &= received;
                touched[s] |= issued;
            }
        }
        // Per leaf: (every counted storage landed, some counted storage touched), None when it
        // counts no in-place storage.
        let mut leaves: Vec<Option<(bool, bool)>> = vec![None; t.manifest.paths().len()];
        for (s, (storage, binding)) in storages.iter().zip(&t.bindings).enumerate() {
            if !matches!(binding.dest, Dest::InPlace(_)) || binding.nbytes == 0 {
                continue;
            }
            let (full, some) = if not_in_target.contains(&(s as u32)) {
                (false, false)
            } else {
                (landed[s], touched[s])
            };
            let leaf = leaves[storage.leaf as usize].get_or_insert((true, false));
            leaf.0 &= full;
            leaf.1 |= some;
        }
        let mut written = InPlaceWritten::default();
        for (leaf, state) in leaves.iter().enumerate() {
            let path = || t.manifest.paths()[leaf].to_string();
            match state {
                Some((true, _)) => written.written.push(path()),
                Some((false, true)) => written.partly.push(path()),
                _ => {}
            }
        }
        written
    }

    /// The digest mismatch of the lowest storage found so far, if any: the transfer goes on (a chain
    /// receiver keeps forwarding) but [`Receiver::finish`] will fail with it (or with a lower storage's,
    /// found later).
    pub fn digest_mismatch(&self) -> Option<&Error> {
        match &self.state {
            State::Streaming(t) => t.mismatch.as_ref(),
            _ => None,
        }
    }

    /// The result, once [`Receiver::poll`] said [`RecvPoll::Done`]: [`Error::Incomplete`] before, and
    /// [`Error::DigestMismatch`] (the first wrong storage in storage order) when a storage's bytes
    /// differ from the sender's.
    pub fn finish(self) -> Result<Received> {
        Ok(self.finish_keeping()?.0)
    }

    /// [`Receiver::finish`]; a receiver made by [`Receiver::keeping`] also returns its validated
    /// metadata for the next transfer from the same source, unless its decoded size is over
    /// [`MAX_KEPT_DECODED`].
    pub fn finish_keeping(self) -> Result<(Received, Option<KeptManifest>)> {
        let State::Streaming(t) = self.state else {
            return Err(Error::Incomplete);
        };
        if !t.is_complete() {
            return Err(Error::Incomplete);
        }
        if let Some(mismatch) = t.mismatch {
            return Err(mismatch);
        }
        // Only a keeping receiver holds the bytes after the step (`handle_metadata`).
        let kept = t.kept.map(|rest| KeptManifest {
            manifest: t.manifest.clone(),
            rest,
            limits: self.options.limits,
        });
        let bindings = t.bindings;
        let rank = u64::from(self.options.rank);
        let meta = t.manifest.into_metadata();
        let mut leaves = meta.leaves;
        let mut storage = 0;
        for leaf in &mut leaves {
            match leaf {
                Leaf::Value(_) => {}
                Leaf::Tensor(l) | Leaf::DTensor { local: l, .. } => {
                    rebind(l, &bindings[storage]);
                    if let Leaf::DTensor { spec, .. } = leaf {
                        spec.dtype = bindings[storage].dtype;
                    }
                    storage += 1;
                }
                Leaf::Sharded {
                    local_shards,
                    global,
                } => {
                    // As torch's PGTransport: the global metadata as sent (its placements name
                    // the sender's ranks), each local shard placed on this receiver.
                    for shard in local_shards.iter_mut() {
                        shard.meta = shard.meta.received_on(rank);
                        rebind(&mut shard.layout, &bindings[storage]);
                        global.dtype = bindings[storage].dtype;
                        storage += 1;
                    }
                }
            }
        }
        let received = Received {
            step: meta.step,
            tree: meta.tree,
            leaves,
            bindings,
        };
        Ok((received, kept))
    }
}

/// The binding of one in-place target: same dtype, or a float cast; exactly the incoming size.
fn bind(manifest: &Manifest, target: &InPlace) -> Result<Binding> {
    let incoming =
        *manifest
            .storages()
            .get(target.storage as usize)
            .ok_or(Error::NoSuchStorage {
                storage: target.storage.into(),
            })?;
    let path = || manifest.paths()[incoming.leaf as usize].to_string();
    let dtype = target.dtype;
    let cast_from = if dtype == incoming.dtype {
        None
    } else if dtype.is_castable_float() && incoming.dtype.is_castable_float() {
        Some(incoming.dtype)
    } else {
        return Err(Error::InPlaceDTypeMismatch {
            path: path(),
            incoming: incoming.dtype,
            destination: dtype,
        });
    };
    let expected = incoming.nbytes / incoming.dtype.element_size() * dtype.element_size();
    if target.nbytes != expected {
        return Err(Error::InPlaceSizeMismatch {
            path: path(),
            expected,
            got: target.nbytes,
        });
    }
    Ok(Binding {
        dest: Dest::InPlace(target.id),
        dtype,
        nbytes: target.nbytes,
        cast_from,
    })
}

fn rebind(layout: &mut crate::layout::TensorLayout, binding: &Binding) {
    layout.dtype = binding.dtype;
    layout.nbytes = binding.nbytes;
}

impl Transfer {
    fn poll(&mut self) -> RecvPoll {
        let messages = self.plan.messages();
        if let Some(to) = self.downstream {
            if self.next_forward < self.received_prefix {
                let m = self.next_forward;
                self.next_forward += 1;
                let message = &messages[m];
                return RecvPoll::Forward(ForwardOp {
                    to,
                    message: m as u32,
                    kind: message.kind,
                    tag: message.tag,
                    len: message.len,
                    prefix: Some(self.transfer_id),
                });
            }
        }
        if let Some(message) = messages.get(self.next_recv) {
            let m = self.next_recv;
            self.next_recv += 1;
            return RecvPoll::Recv(RecvOp {
                from: self.upstream,
                message: m as u32,
                kind: message.kind,
                tag: message.tag,
                len: message.len,
                hash: self.manifest.digests() && message.kind == MessageKind::Data,
                prefix: Some(self.transfer_id),
            });
        }
        if self.is_complete() {
            RecvPoll::Done
        } else {
            RecvPoll::Wait
        }
    }

    fn is_complete(&self) -> bool {
        let all = self.plan.messages().len();
        let forwards = if self.downstream.is_some() {
            all - 2
        } else {
            0
        };
        self.received_prefix == all && self.missing_digests == 0 && self.forwards_done == forwards
    }

    fn mark_received(&mut self, message: usize, kind: MessageKind) -> Result<()> {
        let issued = message >= 2 && message < self.next_recv;
        if !issued || self.plan.messages()[message].kind != kind || self.received[message] {
            return Err(Error::MessageNotOutstanding {
                message: message as u64,
            });
        }
        self.received[message] = true;
        while self.received.get(self.received_prefix) == Some(&true) {
            self.received_prefix += 1;
        }
        Ok(())
    }

    /// Compares every digest known so far with the trailer, once both are there; keeps the first
    /// mismatch in storage order (so which one is reported does not depend on arrival order).
    fn check_digests(&mut self) {
        let Some(trailer) = &self.trailer else {
            return;
        };
        // After the prefix and the metadata digest.
        let trailer = &trailer[2 * PREFIX_LEN as usize..];
        if self.missing_digests > 0 {
            return;
        }
        for (storage, computed) in self.digests.iter().enumerate() {
            let mut sent = [0u8; 8];
            sent.copy_from_slice(&trailer[storage * 8..storage * 8 + 8]);
            if Some(u64::from_le_bytes(sent)) != *computed {
                let leaf = self.manifest.storages()[storage].leaf as usize;
                self.mismatch = Some(Error::DigestMismatch {
                    path: self.manifest.paths()[leaf].to_string(),
                    storage: storage as u32,
                });
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drive;
    use crate::layout::TensorLayout;
    use crate::memory::{MemoryHost, MemorySender};
    use crate::schema::{FanOut, Metadata, PlanParams};
    use crate::sender::Sender;
    use crate::sharded::{LocalShard, ShardMetadata, ShardedTensorMetadata};
    use alloc::string::String;

    fn shard(row: u64, placement: &str) -> ShardMetadata {
        ShardMetadata {
            offsets: vec![row, 0],
            sizes: vec![2, 4],
            placement: placement.into(),
        }
    }

    /// `in_place_written` follows the plan: a leaf is written once every message carrying it landed,
    /// partly written while one was handed out, untouched else or when the host keeps its bytes out
    /// of the target; nothing once the transfer is drained.
    #[test]
    fn in_place_written_follows_the_messages() {
        let layout = TensorLayout::contiguous(DType::Float32, &[64]);
        let metadata = Metadata {
            step: None,
            source: 0,
            destinations: vec![1],
            // 256-byte storages in 128-byte chunks: `a` in messages 2 and 3, `b` in 4 and 5.
            plan: PlanParams {
                fanout: FanOut::Direct,
                bucket_size: 64,
                chunk_size: 128,
            },
            tree: vec![
                Node::Dict(vec!["a".into(), "b".into()]),
                Node::Leaf,
                Node::Leaf,
            ],
            leaves: vec![Leaf::Tensor(layout.clone()), Leaf::Tensor(layout)],
        };
        let storages = vec![vec![1u8; 256], vec![2u8; 256]];
        let mut sender = Sender::new(metadata, true, &Limits::default(), 7).unwrap();
        let mut net = MemorySender::new(&storages);
        drive::send(&mut sender, &mut net).unwrap();
        let mut r = Receiver::new(ReceiverOptions {
            rank: 1,
            source: 0,
            expected_step: None,
            limits: Limits::default(),
        });
        r.handle_header(&net.sent[0].1).unwrap();
        r.handle_metadata(&net.sent[1].1).unwrap();
        assert_eq!(r.poll(), RecvPoll::NeedBindings);
        assert!(r.in_place_written(&[]).is_empty(), "nothing bound yet");
        let targets: Vec<InPlace> = (0..2)
            .map(|s| InPlace {
                storage: s,
                id: s.into(),
                dtype: DType::Float32,
                nbytes: 256,
            })
            .collect();
        r.finish_bindings(&targets).unwrap();
        let written = |w: &[&str], p: &[&str]| InPlaceWritten {
            written: w.iter().map(|s| s.to_string()).collect(),
            partly: p.iter().map(|s| s.to_string()).collect(),
        };
        let next = |r: &mut Receiver| match r.poll() {
            RecvPoll::Recv(op) => op.message,
            other => panic!("not a receive: {other:?}"),
        };
        assert!(r.in_place_written(&[]).is_empty(), "nothing handed out");
        assert_eq!(next(&mut r), 2);
        assert_eq!(r.in_place_written(&[]), written(&[], &["['a']"]));
        r.handle_data(2).unwrap();
        assert_eq!(next(&mut r), 3);
        assert_eq!(r.in_place_written(&[]), written(&[], &["['a']"]));
        r.handle_data(3).unwrap();
        assert_eq!(r.in_place_written(&[]), written(&["['a']"], &[]));
        assert_eq!(next(&mut r), 4);
        assert_eq!(r.in_place_written(&[]), written(&["['a']"], &["['b']"]));
        // Storages whose landed bytes the host keeps elsewhere count as untouched.
        assert_eq!(r.in_place_written(&[1]), written(&["['a']"], &[]));
        assert_eq!(r.in_place_written(&[0, 1]), written(&[], &[]));
        assert!(r.leftover().is_some());
        assert!(r.in_place_written(&[]).is_empty(), "drained");
    }

    /// Rank 0 sends its ShardedTensor (rows 0–1 of a [4, 4] split over ranks 0 and 1) to rank 1, as in
    /// a ring: what rank 1 gets is torch's PGTransport's ShardedTensor.
    #[test]
    fn received_shards_are_placed_as_torch_places_them() {
        let global = ShardedTensorMetadata {
            shards: vec![shard(0, "rank:0/cuda:0"), shard(2, "rank:1/cuda:1")],
            global_size: vec![4, 4],
            dtype: DType::Float32,
        };
        let metadata = Metadata {
            step: None,
            source: 0,
            destinations: vec![1],
            plan: PlanParams::default(),
            tree: vec![Node::Dict(vec!["st".into()]), Node::Leaf],
            leaves: vec![Leaf::Sharded {
                local_shards: vec![LocalShard {
                    layout: TensorLayout::contiguous(DType::Float32, &[2, 4]),
                    meta: shard(0, "rank:0/cuda:0"),
                }],
                global: global.clone(),
            }],
        };
        let storages = vec![vec![7u8; 32]];
        let mut sender = Sender::new(metadata, true, &Limits::default(), 42).unwrap();
        let mut net = MemorySender::new(&storages);
        drive::send(&mut sender, &mut net).unwrap();
        let mut sent = net.sent.into_iter().map(|(_, bytes)| bytes);
        let mut host = MemoryHost::new(|_: &RecvOp| -> Result<Vec<u8>> {
            sent.next().ok_or(Error::Incomplete)
        });
        let receiver = Receiver::new(ReceiverOptions {
            rank: 1,
            source: 0,
            expected_step: None,
            limits: Limits::default(),
        });
        let received = drive::receive(receiver, &mut host).unwrap();
        let Leaf::Sharded {
            local_shards,
            global: got,
        } = &received.leaves[0]
        else {
            panic!("the leaf is a ShardedTensor: {:?}", received.leaves[0]);
        };
        // The global metadata as sent: rank 0 still holds rows 0–1 and rank 1 rows 2–3, so exactly one
        // global shard names each rank.
        assert_eq!(got, &global);
        // The local shard: the sender's offsets and sizes, on this rank and the device type its bytes
        // landed on (host memory: cpu), not the sender's device.
        let placements: Vec<&String> = local_shards.iter().map(|s| &s.meta.placement).collect();
        assert_eq!(placements, ["rank:1/cpu"]);
        assert_eq!(local_shards[0].meta.offsets, [0, 0]);
        assert_eq!(local_shards[0].meta.sizes, [2, 4]);
        assert_eq!(host.into_storages(), storages);
    }
}
