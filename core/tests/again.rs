//! Metadata kept across transfers. `Sender::again` (a finished send's metadata, sent again at another
//! step) against `Sender::new` of the same metadata at that step: the same bytes on the wire, the
//! same plan, the same errors. A receiver given a kept manifest (`Receiver::keeping`) against a new
//! receiver: the same result and the same errors, whatever the metadata message holds.

mod common;

use common::*;
use pgt_core::header::Limits;
use pgt_core::manifest::Manifest;
use pgt_core::receiver::{KeptManifest, Receiver, ReceiverOptions, MAX_KEPT_DECODED};
use pgt_core::reference::reference_metadata;
use pgt_core::schema::{Metadata, PlanParams};
use pgt_core::sender::Sender;
use pgt_core::tree::{Leaf, Node, Value};
use pgt_core::Error;

/// Steps whose encodings are 1, 2, 3 and 11 bytes long, in an order that grows and shrinks them.
const STEPS: [Option<u64>; 8] = [
    Some(1),
    Some(127),
    Some(128),
    None,
    Some(u64::MAX),
    Some(0),
    Some(1 << 20),
    Some(2),
];

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
    for metadata in [sample(), reference, nested_lists(3)] {
        for digests in [false, true] {
            let first = Sender::new(metadata.clone(), digests, &limits, TRANSFER_ID).unwrap();
            let (_, mut kept) = sent_metadata(first);
            for (i, step) in STEPS.into_iter().enumerate() {
                let id = TRANSFER_ID + 1 + i as u64;
                let new = Sender::new(at_step(&metadata, step), digests, &limits, id).unwrap();
                let again = Sender::again(kept, step, &limits, id).unwrap();
                let (expected, _) = sent_metadata(new);
                let (got, next) = sent_metadata(again);
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
    let (_, kept) = sent_metadata(sender);
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
    let (_, kept) = sent_metadata(sender);
    let more = Limits {
        max_leaves: limits.max_leaves + 1,
        ..limits
    };
    let (again, _) = sent_metadata(Sender::again(kept, None, &more, 5).unwrap());
    let (new, _) = sent_metadata(Sender::new(at_step(&sample(), None), true, &more, 5).unwrap());
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
    let (_, kept) = sent_metadata(sender);
    assert_eq!(
        Sender::again(kept, None, &limits, TRANSFER_ID).err(),
        new.err()
    );
}

// ---- the receiver ----

/// A receiver of rank 1 from `SOURCE`, under `limits`, given `kept` (else a plain receiver), after
/// the header and metadata messages: its manifest, or the error.
fn metadata_outcome(
    kept: Option<Option<KeptManifest>>,
    limits: Limits,
    header: &[u8],
    bytes: &[u8],
) -> Result<Manifest, Error> {
    let options = ReceiverOptions {
        rank: DESTS[0],
        source: SOURCE,
        expected_step: None,
        limits,
    };
    let mut r = match kept {
        Some(kept) => Receiver::keeping(options, kept),
        None => Receiver::new(options),
    };
    r.handle_header(header)?;
    r.handle_metadata(&message_for(bytes))?;
    Ok(r.manifest().expect("metadata handled").clone())
}

/// What a transfer of `metadata` keeps.
fn kept_from(metadata: &Metadata, digests: bool) -> KeptManifest {
    let (_, kept) = transfer_keeping(metadata.clone(), digests, None);
    kept.expect("a keeping receiver keeps a complete transfer's manifest")
}

#[test]
fn a_kept_manifest_receives_the_same_metadata_at_another_step_as_a_new_receiver() {
    let reference = reference_metadata(SOURCE, DESTS.to_vec(), PlanParams::default());
    for metadata in [sample(), reference, nested_lists(3)] {
        for digests in [false, true] {
            let mut kept = Some(kept_from(&metadata, digests));
            for step in STEPS {
                let metadata = at_step(&metadata, step);
                let (got, next) = transfer_keeping(metadata.clone(), digests, kept);
                assert_eq!(got, transfer(metadata, digests).remove(0), "step {step:?}");
                assert!(next.is_some());
                kept = next;
            }
        }
    }
}

#[test]
fn metadata_that_differs_beyond_its_step_is_decoded_again() {
    let limits = Limits::default();
    let same = |kept: KeptManifest, header: &[u8], bytes: &[u8], limits: Limits| {
        let new = metadata_outcome(None, limits, header, bytes);
        assert_eq!(
            metadata_outcome(Some(Some(kept)), limits, header, bytes),
            new
        );
        new
    };
    let base = sample();
    // Another value, other digests, another plan, other destinations: each as a new receiver sees it.
    let mut other_value = base.clone();
    other_value.leaves[0] = Leaf::Value(Value::Int(-3));
    let mut other_plan = base.clone();
    other_plan.plan.chunk_size /= 2;
    let mut other_destinations = base.clone();
    other_destinations.destinations.reverse();
    for (metadata, digests) in [
        (&other_value, true),
        (&base, false),
        (&other_plan, true),
        (&other_destinations, true),
    ] {
        let (header, bytes) = encode_raw(metadata, digests);
        let got = same(kept_from(&base, true), &header, &bytes, limits).unwrap();
        assert_eq!(got.metadata(), metadata);
    }
    // Other limits: validated under them.
    let (header, bytes) = encode_raw(&at_step(&base, Some(3)), true);
    let fewer = Limits {
        max_leaves: 1,
        ..limits
    };
    let refused = same(kept_from(&base, true), &header, &bytes, fewer);
    assert!(
        matches!(refused, Err(Error::TooManyLeaves { .. })),
        "{refused:?}"
    );
}

#[test]
fn a_step_that_is_not_postcards_own_encoding_is_decoded_as_any_other() {
    // `Some(5)`: tag 1, then the varint 5, padded to three bytes; and a tag that is not an Option's.
    let base = at_step(&sample(), Some(5));
    let bytes = postcard::to_allocvec(&base).unwrap();
    assert_eq!(&bytes[..2], &[1, 5]);
    for step in [&[1, 0x85, 0x80, 0x00][..], &[2, 5][..], &[1][..]] {
        let bytes = [step, &bytes[2..]].concat();
        let header = header_for(&bytes, true);
        let limits = Limits::default();
        let new = metadata_outcome(None, limits, &header, &bytes);
        let kept = Some(Some(kept_from(&base, true)));
        assert_eq!(metadata_outcome(kept, limits, &header, &bytes), new);
    }
}

#[test]
fn metadata_over_the_kept_size_is_not_kept() {
    // Keeping would double a large metadata's memory: `None` values cost 332 bytes decoded each.
    // (So a kept manifest is within the decoded-size budget of a message of any length, whatever
    // the length of a new step: checked when pgt-core compiles.)
    let under = (MAX_KEPT_DECODED / 332 - 100) as usize;
    let over = (MAX_KEPT_DECODED / 332 + 100) as usize;
    for (n, keeps) in [(under, true), (over, false)] {
        let bytes = postcard::to_allocvec(&nones(n, Some(1))).unwrap();
        let decoded = pgt_core::codec::decoded_size(&bytes).unwrap();
        assert_eq!(decoded <= MAX_KEPT_DECODED, keeps, "{decoded}");
        let (_, kept) = transfer_keeping(nones(n, Some(1)), true, None);
        assert_eq!(kept.is_some(), keeps, "{n} values");
    }
}

#[test]
fn kept_metadata_describes_a_send_that_differs_at_most_in_its_step() {
    let metadata = sample();
    let sender = Sender::new(metadata.clone(), true, &Limits::default(), TRANSFER_ID).unwrap();
    let (_, kept) = sent_metadata(sender);
    let m = &metadata;
    let same_leaves = |leaves: &[Leaf]| leaves == m.leaves.as_slice();
    let other_plan = PlanParams {
        bucket_size: m.plan.bucket_size + 64,
        ..m.plan
    };
    let mut other_dests = m.destinations.clone();
    other_dests.push(99);
    let cases: [(&str, bool, bool); 7] = [
        (
            "the same",
            kept.describes(
                (m.source, &m.destinations),
                m.plan,
                true,
                &m.tree,
                same_leaves,
            ),
            true,
        ),
        (
            "another source",
            kept.describes(
                (m.source + 1, &m.destinations),
                m.plan,
                true,
                &m.tree,
                same_leaves,
            ),
            false,
        ),
        (
            "other destinations",
            kept.describes((m.source, &other_dests), m.plan, true, &m.tree, same_leaves),
            false,
        ),
        (
            "another plan",
            kept.describes(
                (m.source, &m.destinations),
                other_plan,
                true,
                &m.tree,
                same_leaves,
            ),
            false,
        ),
        (
            "no digests",
            kept.describes(
                (m.source, &m.destinations),
                m.plan,
                false,
                &m.tree,
                same_leaves,
            ),
            false,
        ),
        (
            "another tree",
            kept.describes(
                (m.source, &m.destinations),
                m.plan,
                true,
                &m.tree[1..],
                same_leaves,
            ),
            false,
        ),
        (
            "other leaves",
            kept.describes((m.source, &m.destinations), m.plan, true, &m.tree, |_| {
                false
            }),
            false,
        ),
    ];
    for (what, got, want) in cases {
        assert_eq!(got, want, "{what}");
    }
    // At another step it still describes the send, and sends that step.
    let again = Sender::again(kept, Some(7), &Limits::default(), TRANSFER_ID + 1).unwrap();
    let (_, kept) = sent_metadata(again);
    assert!(kept.describes(
        (m.source, &m.destinations),
        m.plan,
        true,
        &m.tree,
        same_leaves
    ));
    assert_eq!(kept.into_metadata_at(Some(8)), at_step(m, Some(8)));
}
