//! Hosts that keep a whole checkpoint in plain memory, for tools and tests (pgt inspect, the golden
//! vectors, the harnesses): [`MemoryHost`] receives, [`MemorySender`] sends. They move bytes only; the
//! protocol is [`crate::drive`]'s. [`MemoryHost`] skips stale messages ([`RecvOp::is_stale`]) as every
//! host must, and drains a failed transfer's leftovers ([`ReceiveHost::discard`]).

use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;

use crate::digest::StorageHasher;
use crate::drive::{Event, ReceiveHost, ReceivedTree, SendHost};
use crate::dtype::convert;
use crate::header::PREFIX_LEN;
use crate::plan::Segment;
use crate::receiver::{Binding, ForwardOp, InPlace, Incoming, RecvOp};
use crate::sender::{Payload, SendOp};
use crate::tree::KeyPath;
use crate::Error;

/// One storage's destination and hashing state.
#[derive(Clone, Debug, Default)]
struct Slot {
    /// Destination bytes (binding size).
    dest: Vec<u8>,
    /// Wire bytes of a storage cast on receive (wire size), converted once complete.
    staging: Option<Vec<u8>>,
    hasher: StorageHasher,
    cast: Option<Binding>,
}

/// A receiving host in memory. Message bytes come from `source` (a recorded stream, a simulated
/// network, …): each call yields the next message from `op.from` with `op.tag`, or fails with the
/// host's own error `E`. A message that belongs to another transfer ([`RecvOp::is_stale`]) is skipped
/// and the next one asked for. Forwards are collected in [`MemoryHost::forwards`].
pub struct MemoryHost<S, E = Error> {
    source: S,
    /// What the metadata announced, once bound.
    incoming: Option<Incoming>,
    /// Every leaf's key path, when asked for with [`MemoryHost::keep_paths`].
    paths: Option<Vec<KeyPath>>,
    keep_paths: bool,
    /// Buffers offered for in-place binding, with their current bytes, by storage index.
    in_place: Vec<(InPlace, Vec<u8>)>,
    slots: Vec<Slot>,
    events: VecDeque<Event>,
    /// Completions held back before they are reported (tests out-of-order completion).
    lookahead: usize,
    /// Every forward, in order: the op and its bytes.
    pub forwards: Vec<(ForwardOp, Vec<u8>)>,
    /// Stale messages skipped, in order: the op they were skipped for, and their bytes.
    pub skipped: Vec<(RecvOp, Vec<u8>)>,
    /// Messages drained after a failure ([`ReceiveHost::discard`]), in order.
    pub drained: Vec<(RecvOp, Vec<u8>)>,
    _error: core::marker::PhantomData<fn() -> E>,
}

impl<S, E> core::fmt::Debug for MemoryHost<S, E> {
    /// Sizes only: the bytes can be huge.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MemoryHost")
            .field("storages", &self.slots.len())
            .field("forwards", &self.forwards.len())
            .finish()
    }
}

impl<S, E> MemoryHost<S, E>
where
    S: FnMut(&RecvOp) -> Result<Vec<u8>, E>,
    E: From<Error>,
{
    /// A host receiving every message from `source`, into fresh buffers.
    pub fn new(source: S) -> MemoryHost<S, E> {
        MemoryHost {
            source,
            incoming: None,
            paths: None,
            keep_paths: false,
            _error: core::marker::PhantomData,
            in_place: Vec::new(),
            slots: Vec::new(),
            events: VecDeque::new(),
            lookahead: 0,
            forwards: Vec::new(),
            skipped: Vec::new(),
            drained: Vec::new(),
        }
    }

    /// Offers existing buffers: `(target, bytes)` binds storage `target.storage` in place.
    pub fn in_place(mut self, targets: Vec<(InPlace, Vec<u8>)>) -> Self {
        self.in_place = targets;
        self
    }

    /// Holds up to `n` completions back before reporting them, so that the receiver polls later
    /// receives before earlier ones complete.
    pub fn lookahead(mut self, n: usize) -> Self {
        self.lookahead = n;
        self
    }

    /// Asks for every leaf's key path when binding (see [`MemoryHost::paths`]).
    pub fn keep_paths(mut self) -> Self {
        self.keep_paths = true;
        self
    }

    /// What the metadata announced, once bound.
    pub fn incoming(&self) -> Option<&Incoming> {
        self.incoming.as_ref()
    }

    /// Every leaf's key path, once bound, if asked for with [`MemoryHost::keep_paths`].
    pub fn paths(&self) -> Option<&[KeyPath]> {
        self.paths.as_deref()
    }

    /// Every storage's destination bytes, in storage order.
    pub fn into_storages(self) -> Vec<Vec<u8>> {
        self.slots.into_iter().map(|s| s.dest).collect()
    }

    /// The next message for `op` that is not stale: stale ones are skipped (at most
    /// [`crate::header::MAX_STALE`]).
    fn current(&mut self, op: &RecvOp) -> Result<Vec<u8>, E> {
        let mut skipped = 0;
        loop {
            let bytes = (self.source)(op)?;
            if !op.is_stale(&bytes) {
                return Ok(bytes);
            }
            op.skip_stale(&mut skipped)?;
            self.skipped.push((*op, bytes));
        }
    }

    /// The wire bytes of `segments`, concatenated (what a forward of them sends).
    pub fn gather(&self, segments: &[Segment]) -> Vec<u8> {
        let mut out = Vec::new();
        for s in segments {
            let slot = &self.slots[s.storage as usize];
            let wire = slot.staging.as_ref().unwrap_or(&slot.dest);
            out.extend_from_slice(&wire[s.offset as usize..(s.offset + s.len) as usize]);
        }
        out
    }
}

impl<S, E> ReceiveHost for MemoryHost<S, E>
where
    S: FnMut(&RecvOp) -> Result<Vec<u8>, E>,
    E: From<Error>,
{
    type Error = E;

    fn recv_bytes(&mut self, op: &RecvOp) -> Result<Vec<u8>, E> {
        self.current(op)
    }

    fn bind(&mut self, _: &Incoming, tree: &mut dyn ReceivedTree<E>) -> Result<Vec<InPlace>, E> {
        if self.keep_paths {
            self.paths = Some(tree.paths()?);
        }
        Ok(self.in_place.iter().map(|(t, _)| *t).collect())
    }

    fn bound(&mut self, incoming: &Incoming, bindings: &[Binding]) -> Result<(), E> {
        self.incoming = Some(incoming.clone());
        let mut offered: Vec<Option<Vec<u8>>> = vec![None; bindings.len()];
        for (t, bytes) in core::mem::take(&mut self.in_place) {
            if let Some(o) = offered.get_mut(t.storage as usize) {
                *o = Some(bytes);
            }
        }
        self.slots = bindings
            .iter()
            .zip(&incoming.storages)
            .zip(offered)
            .map(|((b, s), offered)| Slot {
                dest: offered.unwrap_or_else(|| vec![0; b.nbytes as usize]),
                staging: b.cast_from.map(|_| vec![0; s.nbytes as usize]),
                hasher: StorageHasher::new(),
                cast: b.cast_from.map(|_| *b),
            })
            .collect();
        Ok(())
    }

    fn recv_data(&mut self, op: &RecvOp, segments: &[Segment]) -> Result<(), E> {
        let bytes = self.current(op)?;
        let expected = PREFIX_LEN + segments.iter().map(|s| s.len).sum::<u64>();
        if bytes.len() as u64 != expected {
            return Err(Error::DataLength {
                message: op.message.into(),
                expected,
                got: bytes.len() as u64,
            }
            .into());
        }
        let mut digests = Vec::new();
        let mut at = PREFIX_LEN as usize;
        for s in segments {
            let part = &bytes[at..at + s.len as usize];
            at += s.len as usize;
            let no_such = || Error::NoSuchStorage {
                storage: s.storage.into(),
            };
            let slot = self.slots.get_mut(s.storage as usize).ok_or_else(no_such)?;
            let wire = slot.staging.as_mut().unwrap_or(&mut slot.dest);
            wire.get_mut(s.offset as usize..s.offset as usize + part.len())
                .ok_or_else(no_such)?
                .copy_from_slice(part);
            if op.hash {
                slot.hasher.update(part);
                if s.completes {
                    digests.push(slot.hasher.finish());
                }
            }
            if let (true, Some(b), Some(staging)) = (s.completes, slot.cast, &slot.staging) {
                convert(
                    b.cast_from.unwrap_or(b.dtype),
                    staging,
                    b.dtype,
                    &mut slot.dest,
                )?;
            }
        }
        self.events.push_back(Event::Landed(op.message));
        if op.hash {
            self.events.push_back(Event::Digests(op.message, digests));
        }
        Ok(())
    }

    fn forward(&mut self, op: &ForwardOp, payload: Payload<'_>) -> Result<(), E> {
        let bytes = match payload {
            Payload::Bytes(b) => b.to_vec(),
            Payload::Storages { prefix, segments } => {
                [&prefix[..], &self.gather(segments)].concat()
            }
        };
        self.forwards.push((*op, bytes));
        self.events.push_back(Event::Forwarded(op.message));
        Ok(())
    }

    fn next_event(&mut self, wait: bool) -> Result<Option<Event>, E> {
        if wait || self.events.len() > self.lookahead {
            Ok(self.events.pop_front())
        } else {
            Ok(None)
        }
    }

    fn discard(&mut self, op: &RecvOp) -> bool {
        match self.current(op) {
            Ok(bytes) => {
                self.drained.push((*op, bytes));
                true
            }
            Err(_) => false,
        }
    }
}

/// A sending host in memory: storage bytes from a `Vec` per storage, every message collected in
/// [`MemorySender::sent`] in send order.
#[derive(Debug, Default)]
pub struct MemorySender<'a> {
    storages: &'a [Vec<u8>],
    hashers: Vec<StorageHasher>,
    events: VecDeque<Event>,
    /// Every send: the op and its bytes.
    pub sent: Vec<(SendOp, Vec<u8>)>,
}

impl<'a> MemorySender<'a> {
    /// Sends the bytes of `storages` (one buffer per storage, in storage order).
    pub fn new(storages: &'a [Vec<u8>]) -> MemorySender<'a> {
        MemorySender {
            storages,
            hashers: vec![StorageHasher::new(); storages.len()],
            events: VecDeque::new(),
            sent: Vec::new(),
        }
    }
}

impl SendHost for MemorySender<'_> {
    type Error = Error;

    fn send(&mut self, op: &SendOp, payload: Payload<'_>) -> Result<(), Error> {
        let bytes = match payload {
            Payload::Bytes(b) => b.to_vec(),
            Payload::Storages { prefix, segments } => {
                let mut out = Vec::with_capacity(op.len as usize);
                out.extend_from_slice(&prefix);
                let mut digests = Vec::new();
                for s in segments {
                    let i = s.storage as usize;
                    let part = self
                        .storages
                        .get(i)
                        .and_then(|b| b.get(s.offset as usize..(s.offset + s.len) as usize))
                        .ok_or(Error::NoSuchStorage { storage: i as u64 })?;
                    out.extend_from_slice(part);
                    if op.hash {
                        self.hashers[i].update(part);
                        if s.completes {
                            digests.push(self.hashers[i].finish());
                        }
                    }
                }
                if op.hash {
                    self.events.push_back(Event::Digests(op.message, digests));
                }
                out
            }
        };
        self.sent.push((*op, bytes));
        Ok(())
    }

    fn next_event(&mut self, _wait: bool) -> Result<Option<Event>, Error> {
        Ok(self.events.pop_front())
    }

    fn flush(&mut self) -> Result<(), Error> {
        Ok(())
    }
}
