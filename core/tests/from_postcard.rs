//! `Sender::from_postcard` (the sandboxed core's sender, given its metadata as postcard bytes) against
//! `Sender::new`: the same bytes on the wire, the same plan, the same errors, whether the bytes it is
//! given are postcard's own (sent as they are) or decode the same with padded varints (encoded again).

mod common;

use common::*;
use pgt_core::codec;
use pgt_core::header::Limits;
use pgt_core::plan::Plan;
use pgt_core::reference::reference_metadata;
use pgt_core::schema::{Metadata, PlanParams};
use pgt_core::sender::Sender;
use pgt_core::tree::{Leaf, Node, Value};
use pgt_core::Error;

/// The header's and the metadata message's bytes, and the plan.
fn wire(sender: Sender) -> (Vec<u8>, Vec<u8>, Plan) {
    sent_metadata(sender).0
}

fn both(
    metadata: &Metadata,
    bytes: &[u8],
    digests: bool,
) -> (Result<Sender, Error>, Result<Sender, Error>) {
    let limits = Limits::default();
    (
        Sender::new(metadata.clone(), digests, &limits, TRANSFER_ID),
        Sender::from_postcard(bytes, digests, &limits, TRANSFER_ID),
    )
}

#[test]
fn a_sender_from_postcard_bytes_sends_what_a_sender_from_the_metadata_sends() {
    let reference = reference_metadata(SOURCE, DESTS.to_vec(), PlanParams::default());
    for metadata in [sample(), reference, nested_lists(3)] {
        let bytes = postcard::to_allocvec(&metadata).unwrap();
        for digests in [false, true] {
            let (new, from_bytes) = both(&metadata, &bytes, digests);
            let (new, from_bytes) = (wire(new.unwrap()), wire(from_bytes.unwrap()));
            assert_eq!(new, from_bytes);
            // The metadata message is the prefix, then the bytes it was given.
            assert_eq!(&from_bytes.1[8..], &bytes[..]);
        }
    }
}

#[test]
fn padded_varints_decode_the_same_and_are_encoded_again() {
    let metadata = sample();
    let bytes = postcard::to_allocvec(&metadata).unwrap();
    // step: Some(7), then source 0: [1, 7, 0, …]. The source written as `0x80 0x00` instead.
    assert_eq!(&bytes[..3], &[1, 7, 0]);
    let padded = [&bytes[..2], &[0x80, 0x00], &bytes[3..]].concat();
    assert_eq!(codec::decode_metadata(&padded).unwrap(), metadata);
    let (new, from_padded) = both(&metadata, &padded, true);
    let (new, from_padded) = (wire(new.unwrap()), wire(from_padded.unwrap()));
    assert_eq!(new, from_padded);
    assert_eq!(&from_padded.1[8..], &bytes[..]);

    // The same for an i128 (`Value::Int`), whose varint the scan skips rather than reads.
    let metadata = metadata_with_int(5);
    let bytes = postcard::to_allocvec(&metadata).unwrap();
    // The last leaf's value is the last varint: zigzag(5) = 10.
    assert_eq!(bytes.last(), Some(&10));
    let padded = [&bytes[..bytes.len() - 1], &[0x8A, 0x80, 0x00]].concat();
    assert_eq!(codec::decode_metadata(&padded).unwrap(), metadata);
    let (new, from_padded) = both(&metadata, &padded, false);
    assert_eq!(wire(new.unwrap()), wire(from_padded.unwrap()));
}

#[test]
fn a_sender_from_postcard_bytes_refuses_what_a_sender_from_the_metadata_refuses() {
    // Over the decoded-size budget (PROTOCOL.md §11): 1M `None` leaves.
    let n = 1_000_000;
    let mut tree = vec![Node::List(n as u64)];
    tree.extend(std::iter::repeat_n(Node::Leaf, n));
    let nones = metadata(tree, vec![Leaf::Value(Value::None); n]);
    let bytes = postcard::to_allocvec(&nones).unwrap();
    let (new, from_bytes) = both(&nones, &bytes, false);
    assert!(matches!(new, Err(Error::DecodedTooLarge { .. })), "{new:?}");
    assert_eq!(new.err(), from_bytes.err());

    // Invalid metadata: no destinations.
    let mut invalid = sample();
    invalid.destinations.clear();
    let bytes = postcard::to_allocvec(&invalid).unwrap();
    let (new, from_bytes) = both(&invalid, &bytes, true);
    assert_eq!(new.err(), Some(Error::NoDestinations));
    assert_eq!(from_bytes.err(), Some(Error::NoDestinations));

    // Bytes that do not decode: what decoding says.
    let bytes = postcard::to_allocvec(&sample()).unwrap();
    for cut in [
        &bytes[..bytes.len() - 1],
        &[0xFF][..],
        &[bytes.as_slice(), &[0]].concat()[..],
    ] {
        let got = Sender::from_postcard(cut, true, &Limits::default(), TRANSFER_ID).err();
        assert_eq!(got, codec::decode_metadata(cut).err());
        assert!(got.is_some());
    }
}

/// A one-leaf dict whose value is the integer `v`.
fn metadata_with_int(v: i128) -> Metadata {
    metadata(
        vec![Node::Dict(vec![key("seed")]), Node::Leaf],
        vec![Leaf::Value(Value::Int(v))],
    )
}
