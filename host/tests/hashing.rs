//! Storage digests hashed piece by piece as the bytes move over TCP (`ProcessGroup::send_observed`,
//! `ProcessGroup::recv_into_observed`): they equal the digests of the whole storages, whatever cuts
//! the messages and pieces make, and a byte flipped inside a piece is caught.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pgt_core::schema::{FanOut, PlanParams};
use pgt_host::pg::{ProcessGroup, TcpProcessGroup, OBSERVE_GRAIN};
use pgt_host::state_dict::StateDict;
use pgt_host::synthetic::{self, Shape};
use pgt_host::transport::{SenderHash, Transport, TransportOptions};

mod common;
use common::{tcp_groups, OnSend};

fn options(fanout: FanOut, bucket: u64, chunk: u64, sender_hash: SenderHash) -> TransportOptions {
    TransportOptions {
        sender_hash,
        timeout: Duration::from_secs(20),
        plan: PlanParams {
            fanout,
            bucket_size: bucket,
            chunk_size: chunk,
        },
        ..TransportOptions::default()
    }
}

/// Sends `shape` from rank 0 of a TCP group over `sender` (given rank 0's group) to every other rank;
/// returns the sender's result and the receivers'.
type Sent = (
    pgt_host::Result<()>,
    Vec<pgt_host::Result<StateDict<'static>>>,
);

fn send_over_tcp<P: ProcessGroup>(
    world: u32,
    shape: &Shape,
    opts: &TransportOptions,
    sender: impl FnOnce(TcpProcessGroup) -> P,
) -> Sent {
    let sd = synthetic::materialize(shape).unwrap();
    let mut groups = tcp_groups(world, b"hashing-test-token").into_iter();
    let tx = Transport::new(sender(groups.next().unwrap()), opts.clone());
    let dsts: Vec<u32> = (1..world).collect();
    std::thread::scope(|s| {
        let hs: Vec<_> = groups
            .map(|pg| {
                let t = Transport::new(pg, opts.clone());
                s.spawn(move || t.recv_checkpoint(0))
            })
            .collect();
        let sent = tx.send_checkpoint(&dsts, &sd).map(|_| ());
        (sent, hs.into_iter().map(|h| h.join().unwrap()).collect())
    })
}

#[test]
fn piecewise_digests_verify_whatever_the_cuts() {
    // The mixed dict (every leaf kind, odd sizes), buckets and chunks that cut storages at odd
    // places, pieces of the observer's grain inside them; one receiver, and a chain whose relay
    // hashes as it lands and forwards; the sender hashing before each send and on a thread of its own.
    let shape = synthetic::mixed(3 << 20);
    let cases = [
        // Chunks are multiples of 64 (PROTOCOL.md); buckets of any size.
        (2, FanOut::Direct, 100_003, 1_000_064),
        (2, FanOut::Direct, 4 << 20, 4 << 20),
        (3, FanOut::Chain, 65_537, 333_312),
        (3, FanOut::Direct, 65_537, 333_312),
    ];
    let placements = [SenderHash::BeforeSend, SenderHash::OwnThread];
    for ((world, fanout, bucket, chunk), hash) in
        cases.into_iter().flat_map(|c| placements.map(|h| (c, h)))
    {
        let case = format!("{fanout:?}, bucket {bucket}, chunk {chunk}, {hash:?}");
        let opts = options(fanout, bucket, chunk, hash);
        let (sent, received) = send_over_tcp(world, &shape, &opts, |pg| pg);
        sent.unwrap_or_else(|e| panic!("{case}: send: {e}"));
        for (rank, r) in received.iter().enumerate() {
            let got = r
                .as_ref()
                .unwrap_or_else(|e| panic!("{case}: rank {}: {e}", rank + 1));
            synthetic::verify(got, &shape).unwrap();
        }
    }
}

#[test]
fn a_byte_flipped_inside_a_piece_is_caught() {
    // Four 4 MiB tensors, one per message: the flipped byte is in the first data message (the
    // header and metadata are shorter), in the middle of its fourth piece, in tensor w00.
    let shape = synthetic::large(16 << 20, 4);
    let offset = 3 * OBSERVE_GRAIN + OBSERVE_GRAIN / 2 + 1;
    for hash in [SenderHash::BeforeSend, SenderHash::OwnThread] {
        let opts = options(FanOut::Direct, 4 << 20, 4 << 20, hash);
        // Rank 0's group flips the byte at `offset` of the payload of the first message longer than that.
        let flipped = AtomicBool::new(false);
        let (_, results) = send_over_tcp(2, &shape, &opts, |pg| OnSend {
            inner: pg,
            hook: move |pg: &TcpProcessGroup, dst, tag, parts: &[&[u8]], timeout| {
                let len: usize = parts.iter().map(|p| p.len()).sum();
                if len > offset && !flipped.swap(true, Ordering::SeqCst) {
                    let mut bytes = parts.concat();
                    bytes[offset] ^= 0x10;
                    return pg.send(dst, tag, &[&bytes], timeout);
                }
                pg.send(dst, tag, parts, timeout)
            },
        });
        match &results[0] {
            Err(pgt_host::Error::Protocol(pgt_core::Error::DigestMismatch { path, .. })) => {
                assert_eq!(path, "['w00']")
            }
            other => panic!("{hash:?}: expected a digest mismatch, got {other:?}"),
        }
    }
}
