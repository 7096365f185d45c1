//! The sans-IO receiver: checks the header, decodes and validates the metadata, binds every storage to an
//! in-place or fresh destination, then hands the host one receive (or forward, in chain fan-out) at a
//! time, checks digests and yields the received tree. Nothing here does I/O; tensor bytes never pass
//! through it.
//!
//! Driving it: call [`Receiver::poll`] and act on what it returns, until [`RecvPoll::Done`]:
//! - [`RecvPoll::Recv`] with [`RecvInto::Core`]: receive the message and pass its bytes to
//!   [`Receiver::handle_header`], [`Receiver::handle_metadata`] or [`Receiver::handle_trailer`] (by
//!   [`RecvOp::kind`]).
//! - [`RecvPoll::Recv`] with [`RecvInto::Storages`]: receive the message's bytes into the bound
//!   destinations of its segments (through a staging buffer and [`crate::dtype::convert`] where the
//!   binding casts), hash them when `hash` is set (see [`crate::sender`]; report each storage with
//!   [`Receiver::handle_storage_digest`]), then call [`Receiver::handle_data`]. Later receives may be
//!   polled before earlier ones complete.
//! - [`RecvPoll::NeedBindings`]: bind in-place destinations with [`Receiver::bind_in_place`], then call
//!   [`Receiver::finish_bindings`]; unbound storages get fresh destinations.
//! - [`RecvPoll::Forward`]: send the message's wire bytes (as received, before any cast) to `to`, then
//!   call [`Receiver::handle_forwarded`].
//! - [`RecvPoll::Wait`]: something polled is still in flight; complete it, then poll again.
//!
//! After `Done`, [`Receiver::finish`] yields the result. A receiver that stops early never yields a
//! result: a partial checkpoint is never reported complete.

use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;

use crate::codec::{decode, Header, Limits, Manifest};
use crate::digest::{digest, StorageHasher};
use crate::dtype::DType;
use crate::plan::{FanOut, MessageKind, Plan, Segment, TAG_HEADER};
use crate::sender::Payload;
use crate::sharded::ShardMetadata;
use crate::tree::Leaf;
use crate::{Error, Result};

/// Receiver settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dest {
    /// A buffer the host allocates (of the binding's `nbytes`).
    Fresh,
    /// An existing buffer, by the host's id.
    InPlace(u64),
}

/// The destination of one storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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

/// Where a message's bytes go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecvInto<'a> {
    /// Hand the bytes to the state machine.
    Core,
    /// Into the bound destinations of these storage ranges (in wire bytes).
    Storages(&'a [Segment]),
}

/// One receive for the host to perform.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecvOp<'a> {
    /// Rank to receive from.
    pub from: u32,
    /// Index of the message in the plan (0 = header, 1 = metadata).
    pub message: usize,
    /// What the message carries.
    pub kind: MessageKind,
    /// Tag of the message.
    pub tag: u64,
    /// Exact length of the message.
    pub len: u64,
    /// Where its bytes go.
    pub into: RecvInto<'a>,
    /// Hash the storage bytes as they land (digests on).
    pub hash: bool,
}

/// One message to forward to the next receiver (chain fan-out).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwardOp<'a> {
    /// Rank to send to.
    pub to: u32,
    /// Index of the message in the plan.
    pub message: usize,
    /// Tag of the message.
    pub tag: u64,
    /// Length of the message.
    pub len: u64,
    /// Its bytes: storage ranges as received, or the trailer.
    pub payload: Payload<'a>,
}

/// What the receiver wants next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecvPoll<'a> {
    /// Receive this message.
    Recv(RecvOp<'a>),
    /// Bind destinations, then call [`Receiver::finish_bindings`].
    NeedBindings,
    /// Forward this message.
    Forward(ForwardOp<'a>),
    /// Complete an operation in flight, then poll again.
    Wait,
    /// Every message is handled: call [`Receiver::finish`] for the verified result.
    Done,
}

/// The result of a complete, verified transfer.
#[derive(Clone, Debug, PartialEq)]
pub struct Received {
    /// The validated metadata as sent.
    pub manifest: Manifest,
    /// The leaves as received: tensor dtypes and storage sizes as bound (after cast on receive), and
    /// each local shard's placement rewritten to this receiver's rank.
    pub leaves: Vec<Leaf>,
    /// The destination of every storage, in storage order.
    pub bindings: Vec<Binding>,
}

#[derive(Debug)]
enum State {
    Header,
    Metadata(Header),
    Binding(Box<Transfer>),
    Streaming(Box<Transfer>),
    Finished,
}

use alloc::boxed::Box;

#[derive(Debug)]
struct Transfer {
    manifest: Manifest,
    plan: Plan,
    bindings: Vec<Option<Binding>>,
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
    /// The digest mismatch of the lowest storage index found so far. Kept, not returned at once, so that
    /// a chain receiver still forwards everything (downstream ranks check their own copy);
    /// [`Receiver::finish`] reports it.
    mismatch: Option<Error>,
}

/// The receiver state machine for one transfer.
#[derive(Debug)]
pub struct Receiver {
    options: ReceiverOptions,
    state: State,
}

impl Receiver {
    /// A receiver waiting for the header from `options.source`.
    pub fn new(options: ReceiverOptions) -> Receiver {
        Receiver {
            options,
            state: State::Header,
        }
    }

    /// The validated metadata, once received.
    pub fn manifest(&self) -> Option<&Manifest> {
        match &self.state {
            State::Binding(t) | State::Streaming(t) => Some(&t.manifest),
            _ => None,
        }
    }

    /// The plan, once the metadata is received.
    pub fn plan(&self) -> Option<&Plan> {
        match &self.state {
            State::Binding(t) | State::Streaming(t) => Some(&t.plan),
            _ => None,
        }
    }

    /// The binding of storage `storage`, once bindings are finished.
    pub fn binding(&self, storage: usize) -> Option<&Binding> {
        match &self.state {
            State::Streaming(t) => t.bindings.get(storage)?.as_ref(),
            _ => None,
        }
    }

    /// Every storage's binding, in storage order, once bindings are finished (else empty).
    pub fn bindings(&self) -> Vec<Binding> {
        match &self.state {
            // `finish_bindings` filled every slot.
            State::Streaming(t) => t.bindings.iter().flatten().copied().collect(),
            _ => Vec::new(),
        }
    }

    /// What to do next. See the module docs.
    pub fn poll(&mut self) -> RecvPoll<'_> {
        let source = self.options.source;
        match &mut self.state {
            State::Header => RecvPoll::Recv(RecvOp {
                from: source,
                message: 0,
                kind: MessageKind::Header,
                tag: TAG_HEADER,
                len: Header::SIZE as u64,
                into: RecvInto::Core,
                hash: false,
            }),
            State::Metadata(h) => RecvPoll::Recv(RecvOp {
                from: source,
                message: 1,
                kind: MessageKind::Metadata,
                tag: crate::plan::TAG_METADATA,
                len: h.metadata_len,
                into: RecvInto::Core,
                hash: false,
            }),
            State::Binding(_) => RecvPoll::NeedBindings,
            State::Streaming(t) => t.poll(),
            State::Finished => RecvPoll::Done,
        }
    }

    /// Handles the header message's bytes.
    pub fn handle_header(&mut self, bytes: &[u8]) -> Result<()> {
        if !matches!(self.state, State::Header) {
            return Err(Error::ProtocolState("header not expected"));
        }
        self.state = State::Metadata(Header::parse(bytes, &self.options.limits)?);
        Ok(())
    }

    /// Handles the metadata message's bytes: decodes, validates, checks this rank is a destination and
    /// the source and step are the expected ones.
    pub fn handle_metadata(&mut self, bytes: &[u8]) -> Result<()> {
        let State::Metadata(header) = &self.state else {
            return Err(Error::ProtocolState("metadata not expected"));
        };
        let manifest = decode(header, bytes, &self.options.limits)?;
        let meta = manifest.metadata();
        if meta.source != self.options.source {
            return Err(Error::UnexpectedSource {
                expected: self.options.source,
                got: meta.source,
            });
        }
        if let Some(step) = self.options.expected_step {
            if meta.step != Some(step) {
                return Err(Error::StepMismatch {
                    expected: Some(step),
                    got: meta.step,
                });
            }
        }
        let rank = self.options.rank;
        let position = meta
            .destinations
            .iter()
            .position(|&d| d == rank)
            .ok_or(Error::NotADestination { rank })?;
        let (upstream, downstream) = match meta.plan.fanout {
            FanOut::Direct => (meta.source, None),
            FanOut::Chain => (
                match position {
                    0 => meta.source,
                    p => meta.destinations[p - 1],
                },
                meta.destinations.get(position + 1).copied(),
            ),
        };
        let plan = Plan::new(&manifest, header.metadata_len);
        let n = manifest.storages().len();
        let mut digests = vec![None; n];
        let mut missing_digests = 0;
        if manifest.digests() {
            for (slot, s) in digests.iter_mut().zip(manifest.storages()) {
                if s.nbytes == 0 {
                    *slot = Some(digest(&[]));
                } else {
                    missing_digests += 1;
                }
            }
        }
        let messages = plan.messages().len();
        self.state = State::Binding(Box::new(Transfer {
            manifest,
            plan,
            bindings: vec![None; n],
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

    /// Binds storage `storage` to the host's existing buffer `id` of `dtype` and `nbytes`. The sizes must
    /// match the incoming storage exactly (after cast, when `dtype` is another float type); the error
    /// names the leaf's key path.
    pub fn bind_in_place(
        &mut self,
        storage: usize,
        id: u64,
        dtype: DType,
        nbytes: u64,
    ) -> Result<()> {
        let State::Binding(t) = &mut self.state else {
            return Err(Error::ProtocolState("bindings not expected"));
        };
        let incoming = *t
            .manifest
            .storages()
            .get(storage)
            .ok_or(Error::ProtocolState("no such storage"))?;
        let path = || t.manifest.paths()[incoming.leaf as usize].to_string();
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
        if nbytes != expected {
            return Err(Error::InPlaceSizeMismatch {
                path: path(),
                expected,
                got: nbytes,
            });
        }
        t.bindings[storage] = Some(Binding {
            dest: Dest::InPlace(id),
            dtype,
            nbytes,
            cast_from,
        });
        Ok(())
    }

    /// Ends binding: every unbound storage gets a fresh destination of its wire dtype and size.
    pub fn finish_bindings(&mut self) -> Result<()> {
        let state = core::mem::replace(&mut self.state, State::Finished);
        let State::Binding(mut t) = state else {
            self.state = state;
            return Err(Error::ProtocolState("bindings not expected"));
        };
        for (slot, s) in t.bindings.iter_mut().zip(t.manifest.storages()) {
            slot.get_or_insert(Binding {
                dest: Dest::Fresh,
                dtype: s.dtype,
                nbytes: s.nbytes,
                cast_from: None,
            });
        }
        self.state = State::Streaming(t);
        Ok(())
    }

    fn streaming(&mut self) -> Result<&mut Transfer> {
        match &mut self.state {
            State::Streaming(t) => Ok(t),
            _ => Err(Error::ProtocolState("not streaming")),
        }
    }

    /// Reports that data message `message` (polled before) has fully landed.
    pub fn handle_data(&mut self, message: usize) -> Result<()> {
        let t = self.streaming()?;
        t.mark_received(message, MessageKind::Data)
    }

    /// Handles the trailer's bytes (per-storage digests).
    pub fn handle_trailer(&mut self, bytes: &[u8]) -> Result<()> {
        let t = self.streaming()?;
        let message = t.plan.messages().len() - 1;
        let expected = t.plan.messages()[message].len;
        if t.trailer.is_some() || message >= t.next_recv || !t.manifest.digests() {
            return Err(Error::ProtocolState("trailer not expected"));
        }
        if bytes.len() as u64 != expected {
            return Err(Error::TrailerLength {
                expected,
                got: bytes.len() as u64,
            });
        }
        t.trailer = Some(bytes.to_vec());
        t.mark_received(message, MessageKind::Trailer)?;
        for storage in 0..t.digests.len() {
            t.check_digest(storage);
        }
        Ok(())
    }

    /// Reports the digest of storage `storage`'s wire bytes, hashed as they landed.
    pub fn handle_storage_digest(&mut self, storage: u32, value: u64) -> Result<()> {
        let t = self.streaming()?;
        if !t.manifest.digests() {
            return Err(Error::ProtocolState("digests are off for this transfer"));
        }
        let slot = t
            .digests
            .get_mut(storage as usize)
            .ok_or(Error::ProtocolState("no such storage"))?;
        if slot.is_some() {
            return Err(Error::ProtocolState("storage digest reported twice"));
        }
        *slot = Some(value);
        t.missing_digests -= 1;
        t.check_digest(storage as usize);
        Ok(())
    }

    /// Reports that forward `message` (polled before) has been sent.
    pub fn handle_forwarded(&mut self, message: usize) -> Result<()> {
        let t = self.streaming()?;
        if message >= t.next_forward || message < 2 {
            return Err(Error::ProtocolState("forward not issued"));
        }
        if core::mem::replace(&mut t.forwarded[message], true) {
            return Err(Error::ProtocolState("forward reported twice"));
        }
        t.forwards_done += 1;
        Ok(())
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
    /// [`Error::DigestMismatch`] naming the lowest storage whose bytes differ from the sender's.
    pub fn finish(self) -> Result<Received> {
        let State::Streaming(t) = self.state else {
            return Err(Error::Incomplete);
        };
        if !t.is_complete() {
            return Err(Error::Incomplete);
        }
        if let Some(mismatch) = t.mismatch {
            return Err(mismatch);
        }
        let bindings: Vec<Binding> = t.bindings.into_iter().flatten().collect();
        let rank = u64::from(self.options.rank);
        let mut leaves = t.manifest.metadata().leaves.clone();
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
                    let held: Vec<ShardMetadata> =
                        local_shards.iter().map(|s| s.meta.clone()).collect();
                    global.rewrite_placements(&held, rank);
                    for shard in local_shards.iter_mut() {
                        shard.meta = shard.meta.placed_on(rank);
                        rebind(&mut shard.layout, &bindings[storage]);
                        global.dtype = bindings[storage].dtype;
                        storage += 1;
                    }
                }
            }
        }
        Ok(Received {
            manifest: t.manifest,
            leaves,
            bindings,
        })
    }
}

fn rebind(layout: &mut crate::layout::TensorLayout, binding: &Binding) {
    layout.dtype = binding.dtype;
    layout.nbytes = binding.nbytes;
}

impl Transfer {
    fn poll(&mut self) -> RecvPoll<'_> {
        let messages = self.plan.messages();
        if let Some(to) = self.downstream {
            if self.next_forward < self.received_prefix {
                let m = self.next_forward;
                self.next_forward += 1;
                let message = &messages[m];
                let payload = match message.kind {
                    MessageKind::Data => Payload::Storages(self.plan.segments(message)),
                    _ => Payload::Bytes(self.trailer.as_deref().unwrap_or_default()),
                };
                return RecvPoll::Forward(ForwardOp {
                    to,
                    message: m,
                    tag: message.tag,
                    len: message.len,
                    payload,
                });
            }
        }
        if let Some(message) = messages.get(self.next_recv) {
            let m = self.next_recv;
            self.next_recv += 1;
            let into = match message.kind {
                MessageKind::Data => RecvInto::Storages(self.plan.segments(message)),
                _ => RecvInto::Core,
            };
            return RecvPoll::Recv(RecvOp {
                from: self.upstream,
                message: m,
                kind: message.kind,
                tag: message.tag,
                len: message.len,
                into,
                hash: self.manifest.digests() && message.kind == MessageKind::Data,
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
            return Err(Error::ProtocolState("message not outstanding"));
        }
        self.received[message] = true;
        while self.received.get(self.received_prefix) == Some(&true) {
            self.received_prefix += 1;
        }
        Ok(())
    }

    fn check_digest(&mut self, storage: usize) {
        let (Some(trailer), Some(computed)) = (&self.trailer, self.digests[storage]) else {
            return;
        };
        let mut sent = [0u8; 8];
        sent.copy_from_slice(&trailer[storage * 8..storage * 8 + 8]);
        // The lowest mismatching storage is reported, whatever order the digests and the trailer came
        // in (a host may report a digest after the trailer).
        let lower = match &self.mismatch {
            Some(Error::DigestMismatch { storage: s, .. }) => storage < *s as usize,
            _ => true,
        };
        if u64::from_le_bytes(sent) != computed && lower {
            let leaf = self.manifest.storages()[storage].leaf as usize;
            self.mismatch = Some(Error::DigestMismatch {
                path: self.manifest.paths()[leaf].to_string(),
                storage: storage as u32,
            });
        }
    }
}

/// Storage bytes kept in plain memory, for hosts that hold a whole checkpoint in `Vec`s (tools, tests):
/// it does a host's part for data messages — land each segment where the plan says, hash when asked,
/// report every digest a message completes — so such hosts don't each write it again. The receiver's
/// state machine itself still never holds tensor bytes.
#[derive(Clone, Default)]
pub struct MemoryStorages {
    bytes: Vec<Vec<u8>>,
    hashers: Vec<StorageHasher>,
}

impl core::fmt::Debug for MemoryStorages {
    /// Storage sizes only: the bytes can be huge.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MemoryStorages")
            .field("storages", &self.bytes.len())
            .field("bytes", &self.bytes.iter().map(Vec::len).sum::<usize>())
            .finish()
    }
}

impl MemoryStorages {
    /// Zeroed storages of the wire sizes `receiver`'s metadata announced (after
    /// [`Receiver::finish_bindings`]; empty before the metadata).
    pub fn for_receiver(receiver: &Receiver) -> MemoryStorages {
        let sizes: Vec<u64> = receiver
            .manifest()
            .map(|m| m.storages().iter().map(|s| s.nbytes).collect())
            .unwrap_or_default();
        MemoryStorages {
            bytes: sizes.iter().map(|&n| vec![0u8; n as usize]).collect(),
            hashers: vec![StorageHasher::new(); sizes.len()],
        }
    }

    /// Lands data message `message`, the concatenation of `segments` (as polled), hashing them if
    /// `hash`, and reports the message and every storage digest it completes to `receiver`.
    pub fn land(
        &mut self,
        receiver: &mut Receiver,
        message: usize,
        segments: &[Segment],
        hash: bool,
        bytes: &[u8],
    ) -> Result<()> {
        if segments.iter().map(|s| s.len).sum::<u64>() != bytes.len() as u64 {
            return Err(Error::ProtocolState(
                "a data message's length differs from its segments",
            ));
        }
        let mut at = 0usize;
        for s in segments {
            let i = s.storage as usize;
            let part = &bytes[at..at + s.len as usize];
            at += s.len as usize;
            let storage = self
                .bytes
                .get_mut(i)
                .ok_or(Error::ProtocolState("no such storage"))?;
            let start = s.offset as usize;
            storage
                .get_mut(start..start + part.len())
                .ok_or(Error::ProtocolState("a segment lies outside its storage"))?
                .copy_from_slice(part);
            if hash {
                self.hashers[i].update(part);
                if start + part.len() == storage.len() {
                    receiver.handle_storage_digest(s.storage, self.hashers[i].finish())?;
                }
            }
        }
        receiver.handle_data(message)
    }

    /// The bytes of `segments`, concatenated (what a forward of them sends).
    pub fn gather(&self, segments: &[Segment]) -> Vec<u8> {
        segments
            .iter()
            .flat_map(|s| {
                let start = s.offset as usize;
                &self.bytes[s.storage as usize][start..start + s.len as usize]
            })
            .copied()
            .collect()
    }

    /// Every storage's bytes, in storage order.
    pub fn into_inner(self) -> Vec<Vec<u8>> {
        self.bytes
    }
}
