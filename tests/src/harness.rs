//! A deterministic in-memory harness: one [`Sender`] and N [`Receiver`]s wired through a simulated
//! network of queues, with no threads or sockets. Both sides run through pgt-core's one driver
//! ([`drive::send`], [`drive::receive`]) with its in-memory hosts ([`MemorySender`], [`MemoryHost`]);
//! the harness adds only the network (the receive hosts' message source), corruption in flight and
//! lookahead, so every protocol path runs in a unit test and every byte can be checked.
//!
//! The sender runs to completion first, then each destination in destination order: in chain fan-out a
//! receiver's forwards are on the network before the next rank in the chain runs.

use std::collections::{HashMap, VecDeque};

use pgt_core::drive;
use pgt_core::dtype::DType;
use pgt_core::header::Limits;
use pgt_core::memory::{MemoryHost, MemorySender};
use pgt_core::receiver::{self, Received, Receiver, ReceiverOptions, RecvOp};
use pgt_core::schema::Metadata;
use pgt_core::sender::Sender;
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
    /// How many receives a receiver may have in flight (≥ 1; 0 counts as 1): each receiver holds up to
    /// `lookahead - 1` completions back ([`MemoryHost::lookahead`]), so with more than 1 it polls later
    /// receives before earlier ones complete.
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
    /// The destination bytes of every storage (in storage order), as bound (empty if binding failed).
    pub storages: Vec<Vec<u8>>,
    /// Messages this receiver forwarded.
    pub forwarded: usize,
}

type Queue = VecDeque<(u64, Vec<u8>)>;

/// The simulated network: one FIFO queue per (from, to) pair.
struct Net {
    queues: HashMap<(u32, u32), Queue>,
    corrupt: Option<Corruption>,
}

impl Net {
    fn send(&mut self, from: u32, to: u32, tag: u64, message: u32, mut bytes: Vec<u8>) {
        if let Some(c) = self.corrupt {
            if c.to == to && c.message == message as usize && c.byte < bytes.len() {
                bytes[c.byte] ^= 0xFF;
            }
        }
        self.queues
            .entry((from, to))
            .or_default()
            .push_back((tag, bytes));
    }

    /// The next message from `from` to `to`, which must be the one with `tag`; `None` when there is
    /// none (a receiver waiting for it would wait forever: its run fails).
    fn take(&mut self, from: u32, to: u32, tag: u64) -> Option<Vec<u8>> {
        let (t, bytes) = self.queues.get_mut(&(from, to))?.pop_front()?;
        assert_eq!(t, tag, "messages from {from} to {to} arrive in plan order");
        Some(bytes)
    }
}

/// Sends `metadata` with the given storage bytes (one buffer per storage, in storage order) from its
/// source to its destinations, and returns each receiver's outcome by rank.
pub fn transfer(metadata: Metadata, storages: &[Vec<u8>], run: &Run) -> HashMap<u32, Outcome> {
    let limits = Limits::default();
    let source = metadata.source;
    let destinations = metadata.destinations.clone();
    let mut sender = Sender::new(metadata, run.digests, &limits, crate::vectors::TRANSFER_ID)
        .expect("valid metadata");
    let mut sent = MemorySender::new(storages);
    drive::send(&mut sender, &mut sent).expect("the sender runs to completion");
    let mut net = Net {
        queues: HashMap::new(),
        corrupt: run.corrupt,
    };
    for (op, bytes) in sent.sent {
        assert_eq!(bytes.len() as u64, op.len, "message length as planned");
        net.send(source, op.to, op.tag, op.message, bytes);
    }
    let held_back = run.lookahead.max(1) - 1;
    let mut outcomes = HashMap::new();
    for rank in destinations {
        // In storage order, so that which mismatch is reported first does not depend on hashing.
        let mut targets: Vec<(receiver::InPlace, Vec<u8>)> = run
            .in_place
            .get(&rank)
            .into_iter()
            .flatten()
            .map(|(&storage, t)| {
                let target = receiver::InPlace {
                    storage: storage as u32,
                    id: t.id,
                    dtype: t.dtype,
                    nbytes: t.bytes.len() as u64,
                };
                (target, t.bytes.clone())
            })
            .collect();
        targets.sort_by_key(|(t, _)| t.storage);
        // A message never sent is the run's error (no progress); after a failure, the receiver's
        // drain stops there too.
        let mut host =
            MemoryHost::new(|op: &RecvOp| net.take(op.from, rank, op.tag).ok_or(Error::Incomplete))
                .in_place(targets)
                .lookahead(held_back);
        let options = ReceiverOptions {
            rank,
            source,
            expected_step: None,
            limits,
        };
        let result = drive::receive(Receiver::new(options), &mut host);
        let forwards = std::mem::take(&mut host.forwards);
        let storages = host.into_storages();
        let forwarded = forwards.len();
        for (op, bytes) in forwards {
            assert_eq!(bytes.len() as u64, op.len, "forward length as planned");
            net.send(rank, op.to, op.tag, op.message, bytes);
        }
        outcomes.insert(
            rank,
            Outcome {
                result,
                storages,
                forwarded,
            },
        );
    }
    let left: usize = net.queues.values().map(VecDeque::len).sum();
    let stopped = outcomes.values().any(|o| o.result.is_err());
    assert!(
        left == 0 || stopped,
        "{left} messages were never received, yet every receiver succeeded"
    );
    outcomes
}
