//! `Sender::again` (the kept metadata of a finished send, sent again at another step) against
//! `Sender::new` of the same metadata at that step: the same bytes on the wire, the same plan, the
//! same errors.

mod common;

use common::*;
use pgt_core::header::Limits;
use pgt_core::plan::Plan;
use pgt_core::reference::reference_metadata;
use pgt_core::schema::{Metadata, PlanParams};
use pgt_core::sender::{KeptMetadata, Payload, SendPoll, Sender};
use pgt_core::tree::{Leaf, Node, Value};
use pgt_core::Error;

/// The header's and the metadata message's bytes, the plan, and what the sender keeps.
fn wire(mut sender: Sender) -> ((Vec<u8>, Vec<u8>, Plan), KeptMetadata) {
    let plan = sender.plan().clone();
    while let SendPoll::Send(op) = sender.poll() {
        if op.message > 1 {
            break;
        }
    }
    let bytes = |m| match sender.payload(m) {
        Ok(Payload::Bytes(b)) => b.to_vec(),
        other => panic!("message {m}: {other:?}"),
    };
    ((bytes(0), bytes(1), plan), sender.into_kept())
}

fn at_step(metadata: &Metadata, step: Option<u64>) -> Metadata {
    Metadata {
        step,
        ..metadata.clone()
    }
}

#[test]
fn a_kept_metadata_sent_again_is_what_a_new_sender_sends() {
    let limits = Limits::default();
    let reference = reference_metadata(SOURCE, DESTS.to_vec(), PlanParams::default());
    // Steps whose encodings are 1, 2, 3 and 11 bytes long, in an order that grows and shrinks them.
    let steps = [
        Some(1),
        Some(127),
        Some(128),
        None,
        Some(u64::MAX),
        Some(0),
        Some(1 << 20),
        Some(2),
    ];
    for metadata in [sample(), reference, nested_lists(3)] {
        for digests in [false, true] {
            let first = Sender::new(metadata.clone(), digests, &limits, TRANSFER_ID).unwrap();
            let (_, mut kept) = wire(first);
            for (i, step) in steps.into_iter().enumerate() {
                let id = TRANSFER_ID + 1 + i as u64;
                let new = Sender::new(at_step(&metadata, step), digests, &limits, id).unwrap();
                let again = Sender::again(kept, step, &limits, id).unwrap();
                let (expected, _) = wire(new);
                let (got, next) = wire(again);
                assert_eq!(got, expected, "step {step:?}");
                assert_eq!(next.metadata(), &at_step(&metadata, step));
                assert_eq!(next.digests(), digests);
                kept = next;
            }
        }
    }
}

#[test]
fn a_kept_metadata_is_validated_again_under_other_limits() {
    let limits = Limits::default();
    let sender = Sender::new(sample(), true, &limits, TRANSFER_ID).unwrap();
    let (_, kept) = wire(sender);
    let fewer = Limits {
        max_leaves: 1,
        ..limits
    };
    let again = Sender::again(kept, Some(9), &fewer, TRANSFER_ID);
    let new = Sender::new(at_step(&sample(), Some(9)), true, &fewer, TRANSFER_ID);
    assert!(matches!(new, Err(Error::TooManyLeaves { .. })), "{new:?}");
    assert_eq!(again.err(), new.err());

    // Under larger limits it is sent as a new sender would send it.
    let sender = Sender::new(sample(), true, &limits, TRANSFER_ID).unwrap();
    let (_, kept) = wire(sender);
    let more = Limits {
        max_leaves: limits.max_leaves + 1,
        ..limits
    };
    let (again, _) = wire(Sender::again(kept, None, &more, 5).unwrap());
    let (new, _) = wire(Sender::new(at_step(&sample(), None), true, &more, 5).unwrap());
    assert_eq!(again, new);
}

/// `n` `None` values in a list, at `step`.
fn nones(n: usize, step: Option<u64>) -> Metadata {
    let mut tree = vec![Node::List(n as u64)];
    tree.extend(std::iter::repeat_n(Node::Leaf, n));
    at_step(&metadata(tree, vec![Leaf::Value(Value::None); n]), step)
}

#[test]
fn a_shorter_step_that_takes_the_metadata_over_its_decoded_size_budget_is_refused() {
    // The decoded-size budget (PROTOCOL.md §11) grows with the encoded length, so a step that encodes
    // shorter can take metadata over it. Find the most `None` values a sender accepts at step
    // u64::MAX (11 bytes): at step `None` (1 byte), the same values are over the budget.
    let limits = Limits::default();
    let accepts = |n| Sender::new(nones(n, Some(u64::MAX)), false, &limits, TRANSFER_ID).is_ok();
    let (mut fits, mut over) = (1usize, 1usize << 20);
    assert!(accepts(fits) && !accepts(over));
    while over - fits > 1 {
        let mid = (fits + over) / 2;
        if accepts(mid) {
            fits = mid;
        } else {
            over = mid;
        }
    }
    let new = Sender::new(nones(fits, None), false, &limits, TRANSFER_ID);
    assert!(matches!(new, Err(Error::DecodedTooLarge { .. })), "{new:?}");
    let sender = Sender::new(nones(fits, Some(u64::MAX)), false, &limits, TRANSFER_ID).unwrap();
    let (_, kept) = wire(sender);
    assert_eq!(
        Sender::again(kept, None, &limits, TRANSFER_ID).err(),
        new.err()
    );
}
