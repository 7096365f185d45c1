//! A deterministic in-memory harness: one [`Sender`] and N [`Receiver`]s wired through queues, with no
//! threads or sockets — the host loop reduced to its essentials, so every protocol path runs in a unit
//! test and every byte can be checked.

use std::collections::{HashMap, VecDeque};

use pgt_core::codec::{Limits, Metadata};
use pgt_core::digest::StorageHasher;
use pgt_core::dtype::{convert, DType};
use pgt_core::plan::{MessageKind, Segment};
use pgt_core::receiver::{Dest, Received, Receiver, ReceiverOptions, RecvInto, RecvPoll};
use pgt_core::sender::{Payload, SendPoll, Sender};
use pgt_core::Error;

/// A byte flipped in flight: message `message` to rank `to`, byte `byte` XOR 0xFF.
#[derive(Clone, Copy, Debug)]
pub struct Corruption {
    /// Rank whose incoming copy is corrupted.
    pub to: u32,
    /// Plan index of the message.
    pub message: usize,
    /// Byte offset within the message.
    pub byte: usize,
}

/// An in-place destination buffer the receiving test owns.
#[derive(Clone, Debug)]
pub struct InPlace {
    /// Host id passed to the receiver.
    pub id: u64,
    /// The destination dtype (may differ from the wire dtype: cast on receive).
    pub dtype: DType,
    /// The buffer, pre-filled.
    pub bytes: Vec<u8>,
}

/// Options of one harness run.
#[derive(Clone, Debug, Default)]
pub struct Run {
    /// Digest trailer on.
    pub digests: bool,
    /// How many receives a receiver may have in flight (≥ 1).
    pub lookahead: usize,
    /// A byte to corrupt in flight.
    pub corrupt: Option<Corruption>,
    /// Per receiver rank: storage index → in-place destination.
    pub in_place: HashMap<u32, HashMap<usize, InPlace>>,
}

/// What one receiver ended with.
#[derive(Debug)]
pub struct Outcome {
    /// The result, or the receiver's first error.
    pub result: Result<Received, Error>,
    /// The destination bytes of every storage (in storage order), as bound.
    pub storages: Vec<Vec<u8>>,
    /// Messages this receiver forwarded.
    pub forwarded: usize,
}

type Queue = VecDeque<(u64, Vec<u8>)>;

struct Net {
    queues: HashMap<(u32, u32), Queue>,
    corrupt: Option<Corruption>,
    wire_bytes: u64,
}

impl Net {
    fn send(&mut self, from: u32, to: u32, tag: u64, message: usize, mut bytes: Vec<u8>) {
        if let Some(c) = self.corrupt {
            if c.to == to && c.message == message && c.byte < bytes.len() {
                bytes[c.byte] ^= 0xFF;
            }
        }
        self.wire_bytes += bytes.len() as u64;
        self.queues
            .entry((from, to))
            .or_default()
            .push_back((tag, bytes));
    }

    fn take(&mut self, from: u32, to: u32, tag: u64) -> Option<Vec<u8>> {
        let q = self.queues.get_mut(&(from, to))?;
        let (t, _) = q.front()?;
        assert_eq!(*t, tag, "messages from {from} to {to} arrive in plan order");
        q.pop_front().map(|(_, b)| b)
    }
}

#[derive(Clone, Debug)]
struct PendingRecv {
    from: u32,
    message: usize,
    kind: MessageKind,
    tag: u64,
    len: u64,
    segments: Vec<Segment>,
    hash: bool,
}

struct Rx {
    rank: u32,
    receiver: Option<Receiver>,
    pending: VecDeque<PendingRecv>,
    /// Destination bytes per storage (fresh or in place), and wire-bytes staging for cast storages.
    dest: Vec<Vec<u8>>,
    staging: HashMap<usize, Vec<u8>>,
    hashers: HashMap<usize, StorageHasher>,
    in_place: HashMap<usize, InPlace>,
    error: Option<Error>,
    done: bool,
    forwarded: usize,
}

impl Rx {
    /// Advances as far as possible; returns whether anything happened.
    fn step(&mut self, net: &mut Net, lookahead: usize) -> bool {
        let mut progressed = false;
        while !self.done && self.error.is_none() {
            match self.step_once(net, lookahead) {
                Ok(true) => progressed = true,
                Ok(false) => break,
                Err(e) => {
                    self.error = Some(e);
                    progressed = true;
                }
            }
        }
        progressed
    }

    fn step_once(&mut self, net: &mut Net, lookahead: usize) -> Result<bool, Error> {
        // Complete the oldest receive when its message has arrived.
        if let Some(p) = self.pending.front().cloned() {
            if let Some(bytes) = net.take(p.from, self.rank, p.tag) {
                self.pending.pop_front();
                self.complete(p, bytes)?;
                return Ok(true);
            }
            // Header and metadata receives are polled one at a time; data may look ahead.
            if p.kind != MessageKind::Data || self.pending.len() >= lookahead {
                return Ok(false);
            }
        }
        let rank = self.rank;
        let rx = self.receiver.as_mut().expect("receiver present until done");
        match rx.poll() {
            RecvPoll::Recv(op) => {
                let segments = match op.into {
                    RecvInto::Storages(s) => s.to_vec(),
                    RecvInto::Core => Vec::new(),
                };
                self.pending.push_back(PendingRecv {
                    from: op.from,
                    message: op.message,
                    kind: op.kind,
                    tag: op.tag,
                    len: op.len,
                    segments,
                    hash: op.hash,
                });
                Ok(true)
            }
            RecvPoll::NeedBindings => {
                for (storage, target) in &self.in_place {
                    rx.bind_in_place(*storage, target.id, target.dtype, target.bytes.len() as u64)?;
                }
                rx.finish_bindings()?;
                let n = rx.manifest().map_or(0, |m| m.storages().len());
                self.dest = (0..n)
                    .map(|s| {
                        let b = rx.binding(s).expect("bound");
                        match b.dest {
                            Dest::InPlace(_) => self.in_place[&s].bytes.clone(),
                            Dest::Fresh => vec![0u8; b.nbytes as usize],
                        }
                    })
                    .collect();
                Ok(true)
            }
            RecvPoll::Forward(op) => {
                let bytes = match op.payload {
                    Payload::Bytes(b) => b.to_vec(),
                    Payload::Storages(segments) => {
                        let mut out = Vec::with_capacity(op.len as usize);
                        for s in segments {
                            let wire = self
                                .staging
                                .get(&(s.storage as usize))
                                .unwrap_or(&self.dest[s.storage as usize]);
                            out.extend_from_slice(
                                &wire[s.offset as usize..(s.offset + s.len) as usize],
                            );
                        }
                        out
                    }
                };
                assert_eq!(bytes.len() as u64, op.len);
                let (to, tag, message) = (op.to, op.tag, op.message);
                net.send(rank, to, tag, message, bytes);
                rx.handle_forwarded(message)?;
                self.forwarded += 1;
                Ok(true)
            }
            RecvPoll::Wait => Ok(false),
            RecvPoll::Done => {
                self.done = true;
                Ok(true)
            }
        }
    }

    fn complete(&mut self, p: PendingRecv, bytes: Vec<u8>) -> Result<(), Error> {
        let rx = self.receiver.as_mut().expect("receiver present");
        match p.kind {
            MessageKind::Header => rx.handle_header(&bytes),
            MessageKind::Metadata => rx.handle_metadata(&bytes),
            MessageKind::Trailer => rx.handle_trailer(&bytes),
            MessageKind::Data => {
                assert_eq!(bytes.len() as u64, p.len, "message length as planned");
                let mut at = 0usize;
                for s in &p.segments {
                    let storage = s.storage as usize;
                    let part = &bytes[at..at + s.len as usize];
                    at += s.len as usize;
                    let binding = *rx.binding(storage).expect("bound");
                    let wire_nbytes = rx.manifest().expect("manifest").storages()[storage].nbytes;
                    if p.hash {
                        let h = self.hashers.entry(storage).or_default();
                        h.update(part);
                        if s.offset + s.len == wire_nbytes {
                            let d = h.finish();
                            rx.handle_storage_digest(s.storage, d)?;
                        }
                    }
                    match binding.cast_from {
                        None => self.dest[storage][s.offset as usize..][..part.len()]
                            .copy_from_slice(part),
                        Some(from) => {
                            let staging = self
                                .staging
                                .entry(storage)
                                .or_insert_with(|| vec![0; wire_nbytes as usize]);
                            staging[s.offset as usize..][..part.len()].copy_from_slice(part);
                            if s.offset + s.len == wire_nbytes {
                                convert(from, staging, binding.dtype, &mut self.dest[storage])?;
                            }
                        }
                    }
                }
                rx.handle_data(p.message)
            }
        }
    }
}

/// Sends `metadata` with the given storage bytes (one buffer per storage, in storage order) from its
/// source to its destinations, and returns each receiver's outcome by rank.
pub fn transfer(metadata: Metadata, storages: &[Vec<u8>], run: &Run) -> HashMap<u32, Outcome> {
    let limits = Limits::default();
    let source = metadata.source;
    let destinations = metadata.destinations.clone();
    let mut sender = Sender::new(metadata, run.digests, &limits).expect("valid metadata");
    let mut net = Net {
        queues: HashMap::new(),
        corrupt: run.corrupt,
        wire_bytes: 0,
    };
    let mut sender_hashers: HashMap<u32, StorageHasher> = HashMap::new();
    let mut receivers: Vec<Rx> = destinations
        .iter()
        .map(|&rank| Rx {
            rank,
            receiver: Some(Receiver::new(ReceiverOptions {
                rank,
                source,
                expected_step: None,
                limits,
            })),
            pending: VecDeque::new(),
            dest: Vec::new(),
            staging: HashMap::new(),
            hashers: HashMap::new(),
            in_place: run.in_place.get(&rank).cloned().unwrap_or_default(),
            error: None,
            done: false,
            forwarded: 0,
        })
        .collect();
    let lookahead = run.lookahead.max(1);
    let mut sender_done = false;
    let nbytes: Vec<u64> = sender
        .manifest()
        .storages()
        .iter()
        .map(|s| s.nbytes)
        .collect();
    loop {
        let mut progressed = false;
        // The sender sends a few messages per round, so receivers run interleaved with it.
        for _ in 0..3 {
            if sender_done {
                break;
            }
            let mut digests = Vec::new();
            match sender.poll() {
                SendPoll::Send(op) => {
                    let bytes = match op.payload {
                        Payload::Bytes(b) => b.to_vec(),
                        Payload::Storages(segments) => {
                            let mut out = Vec::with_capacity(op.len as usize);
                            for s in segments {
                                let part = &storages[s.storage as usize][s.offset as usize..]
                                    [..s.len as usize];
                                out.extend_from_slice(part);
                                if op.hash {
                                    let h = sender_hashers.entry(s.storage).or_default();
                                    h.update(part);
                                    if s.offset + s.len == nbytes[s.storage as usize] {
                                        digests.push((s.storage, h.finish()));
                                    }
                                }
                            }
                            out
                        }
                    };
                    net.send(source, op.to, op.tag, op.message, bytes);
                    progressed = true;
                }
                SendPoll::WaitDigests => panic!("harness reports digests as it sends"),
                SendPoll::Done => sender_done = true,
            }
            for (storage, d) in digests {
                sender.handle_storage_digest(storage, d).expect("digest");
            }
        }
        for rx in &mut receivers {
            progressed |= rx.step(&mut net, lookahead);
        }
        let all_settled = receivers.iter().all(|r| r.done || r.error.is_some());
        if sender_done && all_settled {
            break;
        }
        assert!(progressed, "no progress: the state machines deadlocked");
    }
    receivers
        .into_iter()
        .map(|mut r| {
            let receiver = r.receiver.take().expect("receiver");
            let result = match r.error {
                Some(e) => Err(e),
                None => receiver.finish(),
            };
            (
                r.rank,
                Outcome {
                    result,
                    storages: r.dest,
                    forwarded: r.forwarded,
                },
            )
        })
        .collect()
}
