//! A send whose destination fails reports the destination's error — the process group's, named by
//! rank and message — not a wait for the storage digests that the failed send will never produce.
//! Over real TCP connections: the destination closes, or stops reading.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use pgt_host::pg::{PgError, ProcessGroup, TcpOptions, TcpProcessGroup};
use pgt_host::synthetic;
use pgt_host::transport::{Transport, TransportOptions};

fn pair() -> (TcpProcessGroup, TcpProcessGroup) {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let opts = |rank| TcpOptions {
        master_addr: "127.0.0.1".into(),
        master_port: port,
        rank,
        world_size: 2,
        token: b"send-errors".to_vec(),
        timeout: Duration::from_secs(10),
        listen_host: None,
    };
    let o1 = opts(1);
    let h1 = std::thread::spawn(move || TcpProcessGroup::connect(o1));
    let g0 = TcpProcessGroup::connect(opts(0)).unwrap();
    (g0, h1.join().unwrap().unwrap())
}

/// 64 MiB in 4 tensors: far more than the loopback socket buffers hold.
fn checkpoint() -> pgt_host::state_dict::StateDict<'static> {
    synthetic::materialize(&synthetic::large(64 << 20, 4)).unwrap()
}

/// The error of a send to rank 1 must be `Peer { Sending, rank 1 }` whose source satisfies `source`.
fn assert_sending_error(e: &pgt_host::Error, source: impl Fn(&PgError) -> bool) {
    match e {
        // (`PeerAction` is not exported: its Display names it.)
        pgt_host::Error::Peer {
            action,
            rank: 1,
            source: s,
            ..
        } if action.to_string() == "sending" && source(s) => {}
        other => panic!("expected the destination's error, got {other:?} ({other})"),
    }
}

#[test]
fn a_send_to_a_destination_that_closes_reports_the_destination() {
    let (g0, g1) = pair();
    let timeout = Duration::from_secs(10);
    let sender = Transport::new(
        g0,
        TransportOptions {
            timeout,
            ..TransportOptions::default()
        },
    );
    let sd = checkpoint();
    // The destination takes the first message, then goes away.
    let h = std::thread::spawn(move || {
        let header = g1.recv_vec(0, 1, 1 << 10, timeout);
        drop(g1);
        header
    });
    let t0 = Instant::now();
    let e = sender.send_checkpoint(&[1], &sd).unwrap_err();
    let took = t0.elapsed();
    h.join().unwrap().unwrap();
    eprintln!("closed destination, after {took:.2?}: {e} ({e:?})");
    assert_sending_error(&e, |s| {
        matches!(
            s,
            PgError::PeerClosed { peer: 1 } | PgError::Io { peer: Some(1), .. }
        )
    });
    assert!(took < timeout / 2, "{took:?}");
}

/// The send that stalls is the error reported, not the wait for its digests: that wait outlasts the
/// timeout by a short grace, so the stalled send's own timeout (a little later: socket timers are
/// coarse) is seen first. Failed in 18 of 20 runs before the grace.
#[test]
fn a_send_to_a_destination_that_stops_reading_reports_the_send_timeout() {
    for _ in 0..3 {
        let (g0, g1) = pair();
        let timeout = Duration::from_millis(500);
        let sender = Transport::new(
            g0,
            TransportOptions {
                timeout,
                ..TransportOptions::default()
            },
        );
        let sd = checkpoint();
        // Rank 1 stays connected and reads nothing.
        let t0 = Instant::now();
        let e = sender.send_checkpoint(&[1], &sd).unwrap_err();
        let took = t0.elapsed();
        drop(g1);
        eprintln!("stalled destination, after {took:.2?}: {e} ({e:?})");
        assert_sending_error(&e, |s| s.is_timeout());
        assert!(took < timeout + Duration::from_secs(2), "{took:?}");
    }
}
