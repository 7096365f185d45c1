//! A minimal in-memory host for the stream vectors: runs a [`Sender`] to completion, and a [`Receiver`]
//! over messages handed to it one at a time (from a stream file or a simulated network), both through
//! pgt-core's one driver ([`drive::send`], [`drive::receive`]) with its in-memory hosts
//! ([`MemorySender`], [`MemoryHost`]). Sequential and fully buffered: every send completes at once, and
//! every receive is reported before the receiver is polled again. Storages are bound fresh (no in-place
//! binding, no cast).

use pgt_core::drive;
use pgt_core::header::Limits;
use pgt_core::manifest::Manifest;
use pgt_core::memory::{MemoryHost, MemorySender};
use pgt_core::plan::MessageKind;
use pgt_core::receiver::{Received, Receiver, ReceiverOptions, RecvOp};
use pgt_core::schema::Metadata;
use pgt_core::sender::Sender;
use pgt_core::Error;

/// One message on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wire {
    /// Sending rank.
    pub from: u32,
    /// Receiving rank.
    pub to: u32,
    /// Tag.
    pub tag: u64,
    /// Payload.
    pub bytes: Vec<u8>,
}

/// Byte `i` of storage `s` in the stream vectors: `(17·s + i) mod 256`.
pub fn pattern_byte(storage: usize, i: u64) -> u8 {
    ((17 * storage as u64 + i) % 256) as u8
}

/// The pattern-filled wire bytes of every storage of `manifest`.
pub fn pattern_storages(manifest: &Manifest) -> Vec<Vec<u8>> {
    manifest
        .storages()
        .iter()
        .enumerate()
        .map(|(s, r)| (0..r.nbytes).map(|i| pattern_byte(s, i)).collect())
        .collect()
}

/// Runs a sender of transfer [`super::TRANSFER_ID`] over `storages` (wire bytes, in storage order) and
/// returns every send, in order.
pub fn send_all(
    metadata: Metadata,
    digests: bool,
    storages: &[Vec<u8>],
) -> Result<Vec<Wire>, Error> {
    send_as(metadata, digests, storages, super::TRANSFER_ID)
}

/// [`send_all`] for transfer `transfer_id`.
pub fn send_as(
    metadata: Metadata,
    digests: bool,
    storages: &[Vec<u8>],
    transfer_id: u64,
) -> Result<Vec<Wire>, Error> {
    let mut sender = Sender::new(metadata, digests, &Limits::default(), transfer_id)?;
    let source = sender.manifest().metadata().source;
    let mut host = MemorySender::new(storages);
    drive::send(&mut sender, &mut host)?;
    Ok(host
        .sent
        .into_iter()
        .map(|(op, bytes)| {
            assert_eq!(bytes.len() as u64, op.len, "sender payload length");
            Wire {
                from: source,
                to: op.to,
                tag: op.tag,
                bytes,
            }
        })
        .collect())
}

/// Why a receiver run stopped.
#[derive(Debug, PartialEq)]
pub enum HostError {
    /// The receiver (the state machine, or the in-memory host placing its bytes) returned this error.
    Core(Error),
    /// The host refused a header, metadata or data message of another length than the receiver asked
    /// for (a trailer goes to the core whatever its length).
    Length {
        /// The rank it came from.
        from: u32,
        /// Its tag.
        tag: u64,
        /// The length asked for.
        expected: u64,
        /// Its length.
        got: u64,
    },
    /// The message the receiver asked for never came.
    Missing {
        /// The rank it was to come from.
        from: u32,
        /// Its tag.
        tag: u64,
    },
    /// Anything else the host found wrong.
    Host(String),
}

impl From<Error> for HostError {
    fn from(e: Error) -> HostError {
        HostError::Core(e)
    }
}

/// The end of a successful receiver run.
#[derive(Debug)]
pub struct Outcome {
    /// The receiver's result.
    pub received: Received,
    /// Every storage's bytes as received, in storage order.
    pub storages: Vec<Vec<u8>>,
    /// Every message the receiver consumed, in order.
    pub consumed: Vec<Wire>,
    /// Every message it forwarded (chain fan-out), in order.
    pub forwarded: Vec<Wire>,
    /// Messages of other transfers it skipped.
    pub skipped: usize,
}

/// Runs a receiver to completion through the one driver. `next(from, tag)` yields the next message
/// from `from` (`None`: none left). A message of another transfer (stale) is skipped by the in-memory
/// host, whatever its length. The host refuses a header, metadata or data message of this transfer of
/// another length than asked for ([`HostError::Length`]); a trailer goes to the core whatever its
/// length (`TrailerLength`).
pub fn run_receiver(
    options: ReceiverOptions,
    mut next: impl FnMut(u32, u64) -> Option<Vec<u8>>,
) -> Result<Outcome, HostError> {
    let rank = options.rank;
    let mut consumed = Vec::new();
    let mut host = MemoryHost::new(|op: &RecvOp| -> Result<Vec<u8>, HostError> {
        let (from, tag) = (op.from, op.tag);
        let bytes = next(from, tag).ok_or(HostError::Missing { from, tag })?;
        consumed.push(Wire {
            from,
            to: rank,
            tag,
            bytes: bytes.clone(),
        });
        if op.kind != MessageKind::Trailer && !op.is_stale(&bytes) && bytes.len() as u64 != op.len {
            return Err(HostError::Length {
                from,
                tag,
                expected: op.len,
                got: bytes.len() as u64,
            });
        }
        Ok(bytes)
    });
    let result = drive::receive(Receiver::new(options), &mut host);
    let skipped = host.skipped.len();
    let forwarded = std::mem::take(&mut host.forwards)
        .into_iter()
        .map(|(op, bytes)| Wire {
            from: rank,
            to: op.to,
            tag: op.tag,
            bytes,
        })
        .collect();
    let storages = host.into_storages();
    Ok(Outcome {
        received: result?,
        storages,
        consumed,
        forwarded,
        skipped,
    })
}

/// Simulates a whole transfer: the sender's sends, then each destination in order (so that in chain
/// fan-out a receiver's forwards are queued before the next one runs). Returns each destination's run.
pub fn simulate(
    metadata: &Metadata,
    digests: bool,
    storages: &[Vec<u8>],
) -> Result<Vec<(u32, Outcome)>, HostError> {
    let mut net = send_all(metadata.clone(), digests, storages)?;
    let mut runs = Vec::new();
    for &rank in &metadata.destinations {
        let options = ReceiverOptions {
            rank,
            source: metadata.source,
            expected_step: metadata.step,
            limits: Limits::default(),
        };
        let outcome = run_receiver(options, |from, tag| {
            let i = net
                .iter()
                .position(|w| w.from == from && w.to == rank && w.tag == tag)?;
            Some(net.remove(i).bytes)
        })?;
        net.extend(outcome.forwarded.iter().cloned());
        runs.push((rank, outcome));
    }
    if !net.is_empty() {
        return Err(HostError::Host(format!(
            "{} messages were never received",
            net.len()
        )));
    }
    Ok(runs)
}

/// A stream file: `tag u64 LE | len u64 LE | len bytes`, repeated.
pub fn encode_stream(messages: &[Wire]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        out.extend_from_slice(&m.tag.to_le_bytes());
        out.extend_from_slice(&(m.bytes.len() as u64).to_le_bytes());
        out.extend_from_slice(&m.bytes);
    }
    out
}

/// Parses a stream file into `(tag, bytes)` records.
pub fn decode_stream(mut bytes: &[u8]) -> Result<Vec<(u64, Vec<u8>)>, String> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < 16 {
            return Err("stream record header cut short".into());
        }
        let tag = u64::from_le_bytes(bytes[0..8].try_into().expect("8 bytes"));
        let len = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        let rest = &bytes[16..];
        if (rest.len() as u64) < len {
            return Err(format!("stream record {tag} cut short"));
        }
        out.push((tag, rest[..len as usize].to_vec()));
        bytes = &rest[len as usize..];
    }
    Ok(out)
}
