//! `MemoryHost` and `MemorySender` through the one driver (`pgt_core::drive`): bytes land where the plan
//! says, in place and cast, completions may be reported late, forwards carry the wire bytes, and a
//! message of the wrong length is a named error instead of a panic.

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
    let mut sender = Sender::new(meta, true, &Limits::default()).unwrap();
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
    data.1[0] ^= 1;
    let mut host = MemoryHost::new(source(&sent, 1));
    let err = drive::receive(Receiver::new(options(1)), &mut host).unwrap_err();
    assert_eq!(err.name(), "DigestMismatch");
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
