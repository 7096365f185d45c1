//! `MemoryHost` and `MemorySender` through the one driver (`pgt_core::drive`): bytes land where the plan
//! says, in place and cast, completions may be reported late, forwards carry the wire bytes, a message
//! of the wrong length is a named error instead of a panic, stale messages of other transfers are
//! skipped, and a failed receive drains what its plan still says is coming.

mod common;
use common::*;

use pgt_core::drive;
use pgt_core::dtype::DType;
use pgt_core::header::Limits;
use pgt_core::layout::TensorLayout;
use pgt_core::memory::{MemoryHost, MemorySender};
use pgt_core::receiver::{InPlace, Receiver, ReceiverOptions, RecvOp};
use pgt_core::schema::{FanOut, PlanParams};
use pgt_core::sender::{SendOp, Sender};
use pgt_core::tree::Leaf;
use pgt_core::Error;

/// Two float32 tensors (3 and 100 elements) from rank 0 to `dests`, in small buckets and chunks.
fn two_tensors(dests: Vec<u32>) -> (pgt_core::schema::Metadata, Vec<Vec<u8>>) {
    let mut m = metadata(
        vec![
            pgt_core::tree::Node::List(2),
            pgt_core::tree::Node::Leaf,
            pgt_core::tree::Node::Leaf,
        ],
        vec![
            Leaf::Tensor(TensorLayout::contiguous(DType::Float32, &[3])),
            Leaf::Tensor(TensorLayout::contiguous(DType::Float32, &[100])),
        ],
    );
    m.destinations = dests;
    m.plan = PlanParams {
        fanout: FanOut::Chain,
        bucket_size: 64,
        chunk_size: 128,
    };
    let a: Vec<u8> = [1.0f32, 2.0, 3.0]
        .iter()
        .flat_map(|f| f.to_le_bytes())
        .collect();
    let b: Vec<u8> = (0..100).flat_map(|i| (i as f32).to_le_bytes()).collect();
    (m, vec![a, b])
}

fn send_all(meta: pgt_core::schema::Metadata, storages: &[Vec<u8>]) -> Vec<(SendOp, Vec<u8>)> {
    send_as(meta, storages, TRANSFER_ID)
}

fn send_as(
    meta: pgt_core::schema::Metadata,
    storages: &[Vec<u8>],
    transfer_id: u64,
) -> Vec<(SendOp, Vec<u8>)> {
    let mut sender = Sender::new(meta, true, &Limits::default(), transfer_id).unwrap();
    let mut host = MemorySender::new(storages);
    drive::send(&mut sender, &mut host).unwrap();
    host.sent
}

/// A source that hands out the sent message with the polled tag (to `rank`).
fn source(
    sent: &[(SendOp, Vec<u8>)],
    rank: u32,
) -> impl FnMut(&RecvOp) -> Result<Vec<u8>, Error> + '_ {
    move |op| {
        Ok(sent
            .iter()
            .find(|(s, _)| s.to == rank && s.tag == op.tag)
            .map(|(_, b)| b.clone())
            .expect("sent"))
    }
}

fn options(rank: u32) -> ReceiverOptions {
    ReceiverOptions {
        rank,
        source: 0,
        expected_step: None,
        limits: Limits::default(),
    }
}

#[test]
fn lands_every_byte_and_forwards_the_wire_bytes() {
    let (meta, storages) = two_tensors(vec![1, 2]);
    let sent = send_all(meta, &storages);
    // Rank 1 is the chain's head: its forwards are rank 2's input.
    let mut head = MemoryHost::new(source(&sent, 1)).lookahead(3);
    let received = drive::receive(Receiver::new(options(1)), &mut head).unwrap();
    assert_eq!(received.bindings.len(), 2);
    let forwards = std::mem::take(&mut head.forwards);
    assert_eq!(head.into_storages(), storages);
    let mut tail = MemoryHost::new(|op: &RecvOp| {
        if op.kind == pgt_core::plan::MessageKind::Header
            || op.kind == pgt_core::plan::MessageKind::Metadata
        {
            return source(&sent, 2)(op);
        }
        Ok(forwards
            .iter()
            .find(|(f, _)| f.tag == op.tag)
            .expect("forwarded")
            .1
            .clone())
    });
    drive::receive(Receiver::new(options(2)), &mut tail).unwrap();
    assert_eq!(tail.into_storages(), storages);
}

#[test]
fn in_place_with_a_cast() {
    let (meta, storages) = two_tensors(vec![1]);
    let sent = send_all(meta, &storages);
    // Storage 0 lands in place as bfloat16 (3 elements, 6 bytes); storage 1 fresh.
    let target = InPlace {
        storage: 0,
        id: 7,
        dtype: DType::BFloat16,
        nbytes: 6,
    };
    let mut host = MemoryHost::new(source(&sent, 1)).in_place(vec![(target, vec![0xAA; 6])]);
    let received = drive::receive(Receiver::new(options(1)), &mut host).unwrap();
    assert_eq!(received.bindings[0].cast_from, Some(DType::Float32));
    let got = host.into_storages();
    let want: Vec<u8> = [1.0f32, 2.0, 3.0]
        .iter()
        .flat_map(|&f| half::bf16::from_f32(f).to_le_bytes())
        .collect();
    assert_eq!(got[0], want);
    assert_eq!(got[1], storages[1]);
}

#[test]
fn a_corrupted_byte_fails_the_transfer() {
    let (meta, storages) = two_tensors(vec![1]);
    let mut sent = send_all(meta, &storages);
    let data = sent
        .iter_mut()
        .find(|(op, _)| op.kind == pgt_core::plan::MessageKind::Data)
        .unwrap();
    // The first storage byte, after the 8-byte prefix.
    data.1[8] ^= 1;
    let mut host = MemoryHost::new(source(&sent, 1));
    let err = drive::receive(Receiver::new(options(1)), &mut host).unwrap_err();
    assert_eq!(err.name(), "DigestMismatch");
}

/// One direction of a link: messages in the order sent; a receive takes the oldest with its tag
/// (as a process group does).
#[derive(Default)]
struct Link(std::collections::VecDeque<(u64, Vec<u8>)>);

impl Link {
    fn send(&mut self, sent: &[(SendOp, Vec<u8>)], rank: u32) {
        for (op, b) in sent.iter().filter(|(op, _)| op.to == rank) {
            self.0.push_back((op.tag, b.clone()));
        }
    }

    fn take(&mut self, op: &RecvOp) -> Result<Vec<u8>, Error> {
        let i = self.0.iter().position(|(t, _)| *t == op.tag);
        // A message that never comes: the test's stand-in for a timeout.
        let i = i.ok_or(Error::Incomplete)?;
        Ok(self.0.remove(i).expect("found").1)
    }
}

/// The same two tensors with other values, at another step.
fn second_round(dests: Vec<u32>) -> (pgt_core::schema::Metadata, Vec<Vec<u8>>) {
    let (mut m, storages) = two_tensors(dests);
    m.step = Some(8);
    let storages = storages
        .into_iter()
        .map(|s| s.into_iter().map(|b| b ^ 0x5A).collect())
        .collect();
    (m, storages)
}

#[test]
fn stale_messages_are_skipped_never_used() {
    let (meta, storages) = two_tensors(vec![1]);
    let sent = send_all(meta.clone(), &storages);
    // Another transfer's metadata, first data message (same length) and trailer wait on the link
    // under the same tags, before this transfer's.
    let (m2, s2) = second_round(vec![1]);
    let other = send_as(m2, &s2, TRANSFER_ID ^ 0xFF);
    let mut link = Link::default();
    for (op, b) in &other {
        if op.message == 1 || op.message == 2 || op.kind == pgt_core::plan::MessageKind::Trailer {
            link.0.push_back((op.tag, b.clone()));
        }
    }
    link.send(&sent, 1);
    let mut host = MemoryHost::new(|op: &RecvOp| link.take(op));
    drive::receive(Receiver::new(options(1)), &mut host).unwrap();
    let skipped: Vec<u32> = host.skipped.iter().map(|(op, _)| op.message).collect();
    assert_eq!(skipped.len(), 3, "{skipped:?}");
    assert!(host.drained.is_empty());
    assert_eq!(host.into_storages(), storages);
    assert!(link.0.is_empty());
}

#[test]
fn too_many_stale_messages_is_a_named_error() {
    let (meta, storages) = two_tensors(vec![1]);
    let sent = send_all(meta, &storages);
    let mut link = Link::default();
    link.send(&sent, 1);
    // The same stale data message, over and over.
    let stale = [&(TRANSFER_ID ^ 1).to_le_bytes()[..], &[0; 12]].concat();
    let mut host = MemoryHost::new(|op: &RecvOp| {
        if op.message == 2 {
            return Ok(stale.clone());
        }
        link.take(op)
    });
    let err = drive::receive(Receiver::new(options(1)), &mut host).unwrap_err();
    assert_eq!(
        err,
        Error::TooManyStale {
            message: 2,
            skipped: u64::from(pgt_core::header::MAX_STALE)
        }
    );
}

/// Round 1 is refused after its header (`refuse` makes the receiver that does it); round 2 follows on
/// the same link. Returns what the first receive drained, and checks that the second gets round 2's
/// bytes and leaves the link empty.
fn failed_then_good(
    refuse: impl FnOnce(&mut Link) -> (Error, Vec<(RecvOp, Vec<u8>)>),
) -> Vec<(RecvOp, Vec<u8>)> {
    let (meta, storages) = two_tensors(vec![1]);
    let (m2, s2) = second_round(vec![1]);
    assert_ne!(storages, s2);
    let mut link = Link::default();
    link.send(&send_as(meta, &storages, 1), 1);
    link.send(&send_as(m2, &s2, 2), 1);
    let (_, drained) = refuse(&mut link);
    let mut host = MemoryHost::new(|op: &RecvOp| link.take(op));
    let r = Receiver::new(ReceiverOptions {
        expected_step: Some(8),
        ..options(1)
    });
    let received = drive::receive(r, &mut host).unwrap();
    assert_eq!(received.step, Some(8));
    assert_eq!(host.into_storages(), s2, "round 2's bytes");
    assert!(link.0.is_empty(), "{} messages left", link.0.len());
    drained
}

#[test]
fn a_refused_step_drains_the_rest_of_its_plan() {
    let drained = failed_then_good(|link| {
        let mut host = MemoryHost::new(|op: &RecvOp| link.take(op));
        let r = Receiver::new(ReceiverOptions {
            expected_step: Some(99),
            ..options(1)
        });
        let err = drive::receive(r, &mut host).unwrap_err();
        assert_eq!(err.name(), "StepMismatch");
        (err, std::mem::take(&mut host.drained))
    });
    // Every data message and the trailer of round 1, in order, each with round 1's prefix.
    let messages: Vec<u32> = drained.iter().map(|(op, _)| op.message).collect();
    assert_eq!(messages, (2..2 + messages.len() as u32).collect::<Vec<_>>());
    assert!(messages.len() >= 3);
    assert!(drained.iter().all(|(_, b)| b[..8] == 1u64.to_le_bytes()));
}

#[test]
fn an_in_place_mismatch_drains_the_rest_of_its_plan() {
    let drained = failed_then_good(|link| {
        let target = InPlace {
            storage: 1,
            id: 0,
            dtype: DType::Float32,
            nbytes: 4,
        };
        let mut host =
            MemoryHost::new(|op: &RecvOp| link.take(op)).in_place(vec![(target, vec![0; 4])]);
        let err = drive::receive(Receiver::new(options(1)), &mut host).unwrap_err();
        assert_eq!(err.name(), "InPlaceSizeMismatch");
        (err, std::mem::take(&mut host.drained))
    });
    assert!(drained.len() >= 3);
}

#[test]
fn a_header_refusal_leaves_the_rest_to_be_skipped() {
    // Refused from the header alone: nothing is known of the plan, nothing is drained; the next
    // receive skips the metadata, data and trailer of round 1 as stale.
    let drained = failed_then_good(|link| {
        let mut host = MemoryHost::new(|op: &RecvOp| link.take(op));
        let r = Receiver::new(ReceiverOptions {
            limits: Limits {
                max_metadata_bytes: 8,
                ..Limits::default()
            },
            ..options(1)
        });
        let err = drive::receive(r, &mut host).unwrap_err();
        assert_eq!(err.name(), "MetadataTooLarge");
        (err, std::mem::take(&mut host.drained))
    });
    assert!(drained.is_empty());
}

#[test]
fn a_data_message_of_the_wrong_length_is_refused() {
    let (meta, storages) = two_tensors(vec![1]);
    let sent = send_all(meta, &storages);
    let mut inner = source(&sent, 1);
    let mut host = MemoryHost::new(move |op: &RecvOp| {
        let mut b = inner(op)?;
        if op.kind == pgt_core::plan::MessageKind::Data {
            b.pop();
        }
        Ok(b)
    });
    let err = drive::receive(Receiver::new(options(1)), &mut host).unwrap_err();
    assert!(
        matches!(err, Error::DataLength { message: 2, .. }),
        "{err:?}"
    );
}
