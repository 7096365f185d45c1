//! `MemoryStorages`: the in-memory host part shared by tools and tests lands data where the plan says,
//! and refuses a message or segment that does not fit instead of panicking.

mod common;
use common::*;

use pgt_core::dtype::DType;
use pgt_core::layout::TensorLayout;
use pgt_core::plan::Segment;
use pgt_core::receiver::{MemoryStorages, RecvInto, RecvPoll};
use pgt_core::tree::Leaf;
use pgt_core::Error;

#[test]
fn lands_data_and_refuses_what_does_not_fit() {
    let leaf = Leaf::Tensor(TensorLayout::contiguous(DType::UInt8, &[8]));
    let mut rx = receiver_at_bindings(single("t", leaf), false, 1);
    rx.finish_bindings().unwrap();
    let mut mem = MemoryStorages::for_receiver(&rx);
    let (message, segments) = match rx.poll() {
        RecvPoll::Recv(op) => match op.into {
            RecvInto::Storages(s) => (op.message, s.to_vec()),
            RecvInto::Core => panic!("expected data"),
        },
        _ => panic!("expected a receive"),
    };
    assert_eq!(
        mem.land(&mut rx, message, &segments, false, &[1, 2, 3]),
        Err(Error::ProtocolState(
            "a data message's length differs from its segments"
        ))
    );
    let outside = [Segment {
        storage: 0,
        offset: 4,
        len: 8,
    }];
    assert_eq!(
        mem.land(&mut rx, message, &outside, false, &[0; 8]),
        Err(Error::ProtocolState("a segment lies outside its storage"))
    );
    let bytes: Vec<u8> = (1..=8).collect();
    mem.land(&mut rx, message, &segments, false, &bytes)
        .unwrap();
    assert_eq!(mem.gather(&segments), bytes);
    assert_eq!(mem.into_inner(), vec![bytes]);
}
