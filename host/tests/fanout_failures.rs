//! A failed destination stops only its own stream (PROTOCOL.md §3, *When a destination fails*), in
//! process with a process group that fails the sends to one rank: in Direct fan-out the others
//! complete and the sender names who failed and who completed ([`Error::Destinations`]); in Chain
//! fan-out a relay whose forward fails still completes its own receive
//! ([`TransferStats::forward_failed`]), and the sender counts the ranks downstream of a failed one as
//! cut off. `faults.rs` does the same with real processes.

mod common;
use common::{faulty, Fault};

use std::time::{Duration, Instant};

use pgt_core::schema::{FanOut, PlanParams};
use pgt_host::pg::{InProcessGroup, PgError};
use pgt_host::state_dict::StateDict;
use pgt_host::synthetic::{self, Shape};
use pgt_host::transport::{ForwardFailure, TransferStats, Transport, TransportOptions};
use pgt_host::Error;

/// Small buckets and chunks: many data messages, so a failure lands mid-stream.
fn options(fanout: FanOut, timeout: Duration) -> TransportOptions {
    TransportOptions {
        timeout,
        plan: PlanParams {
            fanout,
            bucket_size: 64 << 10,
            chunk_size: 256 << 10,
        },
        ..TransportOptions::default()
    }
}

fn shape() -> Shape {
    synthetic::large(4 << 20, 6)
}

type Received = pgt_host::Result<(StateDict<'static>, TransferStats)>;

/// Sends `shape()` from rank 0 of `world` ranks to `dsts` with `fanout`; `faulty_rank` is the rank whose
/// group misbehaves on its sends to rank `to` from tag `from_tag` on (rank 0: the sender). Receivers
/// time out after 2 s. Returns the send's result and each receiver's (rank 1 first).
fn transfer(
    world: u32,
    dsts: &[u32],
    fanout: FanOut,
    (faulty_rank, to, from_tag): (u32, u32, u64),
) -> (pgt_host::Result<TransferStats>, Vec<Received>) {
    let sd = synthetic::materialize(&shape()).unwrap();
    let sender_opts = options(fanout, Duration::from_secs(20));
    let recv_opts = options(fanout, Duration::from_secs(2));
    let wrap = |pg: InProcessGroup| {
        let to = if pg_rank(&pg) == faulty_rank {
            to
        } else {
            u32::MAX
        };
        faulty(pg, to, Fault::CloseFrom { tag: from_tag })
    };
    let mut groups = InProcessGroup::new(world).into_iter().map(wrap);
    let sender = Transport::new(groups.next().unwrap(), sender_opts);
    std::thread::scope(|s| {
        let receivers: Vec<_> = groups
            .map(|pg| {
                let t = Transport::new(pg, recv_opts.clone());
                s.spawn(move || {
                    let mut sd = StateDict::new();
                    t.recv_checkpoint_into(0, &mut sd).map(|stats| (sd, stats))
                })
            })
            .collect();
        let sent = sender.send_checkpoint(dsts, &sd);
        let received = receivers.into_iter().map(|h| h.join().unwrap()).collect();
        (sent, received)
    })
}

fn pg_rank(pg: &InProcessGroup) -> u32 {
    pgt_host::pg::ProcessGroup::rank(pg)
}

fn assert_complete(r: &Received, rank: u32) -> &TransferStats {
    let (sd, stats) = r
        .as_ref()
        .unwrap_or_else(|e| panic!("rank {rank} should complete: {e:#}"));
    synthetic::verify(sd, &shape()).unwrap();
    stats
}

fn is_closed(e: &Error, rank: u32) -> bool {
    matches!(e, Error::Peer { rank: r, source: PgError::PeerClosed { .. }, .. } if *r == rank)
}

#[test]
fn direct_a_failed_destination_leaves_the_others_complete() {
    // Rank 1's sends fail from data message 3 on (tag 4); rank 2's trailer still carries every
    // digest.
    let (sent, received) = transfer(3, &[1, 2], FanOut::Direct, (0, 1, 4));
    assert_complete(&received[1], 2);
    assert!(received[0].is_err(), "rank 1 lost its stream");
    match sent {
        Err(Error::Destinations {
            completed,
            failed,
            cut_off,
        }) => {
            assert_eq!(completed, [2]);
            assert_eq!(failed.len(), 1);
            assert_eq!(failed[0].0, 1);
            assert!(is_closed(&failed[0].1, 1), "{:?}", failed[0].1);
            assert!(cut_off.is_empty());
        }
        other => panic!("expected Destinations, got {other:?}"),
    }
}

#[test]
fn direct_every_destination_failed_is_the_first_failure_at_once() {
    let start = Instant::now();
    let (sent, _) = transfer(2, &[1], FanOut::Direct, (0, 1, 4));
    let e = sent.unwrap_err();
    assert!(is_closed(&e, 1), "{e:?}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn chain_a_failed_forward_leaves_the_relay_complete() {
    // 0 → 1 → 2: rank 1's forwards to rank 2 fail from data message 3 on. Rank 1 completes and says
    // its forward failed; rank 2 fails naming rank 1, its broken link; the sender, whose data went
    // to rank 1, completes.
    let (sent, received) = transfer(3, &[1, 2], FanOut::Chain, (1, 2, 4));
    sent.unwrap();
    let stats = assert_complete(&received[0], 1);
    match &stats.forward_failed {
        Some(ForwardFailure {
            rank: 2,
            message: 3,
            reason,
        }) => assert!(reason.contains("rank 2 closed the connection"), "{reason}"),
        other => panic!("expected rank 1's forward failure, got {other:?}"),
    }
    // Rank 1's group is gone once it completed (a process that exits closes its connections too),
    // or rank 2 has waited out its timeout, whichever comes first.
    let e = received[1].as_ref().unwrap_err();
    assert!(
        matches!(e, Error::Peer { rank: 1, source, .. } if source.is_timeout() || matches!(source, PgError::PeerClosed { peer: 1 })),
        "{e:?}"
    );
}

#[test]
fn chain_a_failed_middle_destination_cuts_off_the_ones_below_it() {
    // 0 → 1 → 2 → 3: the sender cannot send rank 2 its header. Rank 1 gets everything (its forwards
    // land in rank 2's queue); ranks 2 and 3 fail.
    let (sent, received) = transfer(4, &[1, 2, 3], FanOut::Chain, (0, 2, 0));
    assert!(assert_complete(&received[0], 1).forward_failed.is_none());
    assert!(received[1].is_err() && received[2].is_err());
    match sent {
        Err(e @ Error::Destinations { .. }) => {
            let text = e.to_string();
            let Error::Destinations {
                completed,
                failed,
                cut_off,
            } = e
            else {
                unreachable!()
            };
            assert_eq!(completed, [1]);
            assert_eq!(failed.iter().map(|(r, _)| *r).collect::<Vec<_>>(), [2]);
            assert_eq!(cut_off, [3]);
            assert!(
                text.starts_with("the checkpoint was sent to rank(s) 1 but not to rank(s) 2,3; rank 2 failed: sending message 0 to rank 2: rank 2 closed the connection")
                    && text.ends_with("rank(s) 3 cut off: downstream of a failed rank in the chain"),
                "{text}"
            );
        }
        other => panic!("expected Destinations, got {other:?}"),
    }
}

#[test]
fn chain_the_first_destination_failed_fails_the_send_at_once() {
    // Everything rides on the first destination: the send stops at its failure, naming it.
    let start = Instant::now();
    let (sent, received) = transfer(3, &[1, 2], FanOut::Chain, (0, 1, 4));
    let e = sent.unwrap_err();
    assert!(is_closed(&e, 1), "{e:?}");
    assert!(received.iter().all(Result::is_err));
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}
