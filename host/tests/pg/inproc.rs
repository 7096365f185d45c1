use std::time::{Duration, Instant};

use pgt_host::pg::inproc::InProcLimits;
use pgt_host::pg::{InProcessGroup, PgError, ProcessGroup};

use crate::scenarios::{self, T};

#[test]
fn inproc_ring() {
    scenarios::ring(&InProcessGroup::new(4));
}

#[test]
fn inproc_scatter_gather() {
    scenarios::scatter_gather(&InProcessGroup::new(3));
}

#[test]
fn inproc_tags_out_of_order() {
    scenarios::tags_out_of_order(&InProcessGroup::new(2));
}

#[test]
fn inproc_zero_length() {
    scenarios::zero_length(&InProcessGroup::new(2));
}

#[test]
fn inproc_large_message() {
    scenarios::large_message(&InProcessGroup::new(2));
}

#[test]
fn inproc_length_checks() {
    scenarios::length_checks(&InProcessGroup::new(2));
    scenarios::too_large_on_wire(&InProcessGroup::new(2));
}

#[test]
fn inproc_stalled_peer() {
    scenarios::stalled_peer(&InProcessGroup::new(2));
}

#[test]
fn inproc_invalid_ranks() {
    scenarios::invalid_ranks(&InProcessGroup::new(3));
}

#[test]
fn inproc_concurrent_same_peer() {
    scenarios::concurrent_same_peer(&InProcessGroup::new(2));
}

#[test]
fn inproc_full_duplex() {
    scenarios::full_duplex(&InProcessGroup::new(2));
}

#[test]
fn inproc_handles_move_to_threads() {
    let handles: Vec<_> = InProcessGroup::new(3)
        .into_iter()
        .map(|g| {
            std::thread::spawn(move || {
                let n = g.size();
                g.send((g.rank() + 1) % n, 0, &[&[g.rank() as u8]], T)
                    .unwrap();
                let v = g.recv_vec((g.rank() + n - 1) % n, 0, 1, T).unwrap();
                assert_eq!(v, [((g.rank() + n - 1) % n) as u8]);
                // Keep the handle alive until everybody received.
                g
            })
        })
        .collect();
    let _groups: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
}

#[test]
fn inproc_send_waits_for_wire_capacity() {
    let limits = InProcLimits {
        wire_capacity: 1000,
        ..InProcLimits::default()
    };
    let g = InProcessGroup::with_limits(2, limits);
    // Always accepted onto an empty wire, whatever the size.
    g[0].send(1, 1, &[&[0u8; 5000]], T).unwrap();
    let t0 = Instant::now();
    let e = g[0]
        .send(1, 2, &[&[0u8; 10]], Duration::from_millis(200))
        .unwrap_err();
    assert!(e.is_timeout(), "{e}");
    assert!(t0.elapsed() < Duration::from_millis(1200));
    assert_eq!(g[1].recv_vec(0, 1, 5000, T).unwrap().len(), 5000);
    g[0].send(1, 2, &[&[0u8; 10]], T).unwrap();
}

#[test]
fn inproc_stash_limit() {
    let limits = InProcLimits {
        stash_limit: 1 << 20,
        ..InProcLimits::default()
    };
    let g = InProcessGroup::with_limits(2, limits);
    g[0].send(1, 1, &[&vec![1u8; 2 << 20]], T).unwrap();
    g[0].send(1, 2, &[b"two"], T).unwrap();
    let e = g[1].recv_vec(0, 2, 10, T).unwrap_err();
    assert!(
        matches!(
            e,
            PgError::UnexpectedBacklog {
                peer: 0,
                wanted: 2,
                blocking_tag: 1,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(g[1].recv_vec(0, 1, 2 << 20, T).unwrap().len(), 2 << 20);
    assert_eq!(g[1].recv_vec(0, 2, 10, T).unwrap(), b"two");
}

#[test]
fn inproc_peer_closed() {
    let mut g = InProcessGroup::new(2);
    let g1 = g.pop().unwrap();
    let g0 = g.pop().unwrap();
    g1.send(0, 1, &[b"last words"], T).unwrap();
    drop(g1);
    // What was sent before closing is still delivered, then PeerClosed.
    assert_eq!(g0.recv_vec(1, 1, 100, T).unwrap(), b"last words");
    let t0 = Instant::now();
    assert_eq!(
        g0.recv_vec(1, 1, 100, T).unwrap_err(),
        PgError::PeerClosed { peer: 1 }
    );
    assert!(t0.elapsed() < Duration::from_secs(1));
    assert_eq!(
        g0.send(1, 1, &[], T).unwrap_err(),
        PgError::PeerClosed { peer: 1 }
    );
}

#[test]
fn inproc_debug_output_is_a_summary() {
    let g = InProcessGroup::new(2);
    g[0].send(1, 1, &[&vec![0xabu8; 1 << 20]], T).unwrap();
    let s = format!("{:?}", g[1]);
    assert!(s.len() < 10_000, "{} bytes of Debug output", s.len());
}
