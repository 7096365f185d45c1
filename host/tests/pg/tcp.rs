use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pgt_host::pg::{PgError, ProcessGroup, TcpOptions, TcpProcessGroup, TcpTuning};

use crate::scenarios::{self, T};

pub(crate) const TOKEN: &[u8] = b"test-job-token";

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(crate) fn opts(port: u16, rank: u32, world: u32, token: &[u8]) -> TcpOptions {
    TcpOptions {
        master_addr: "127.0.0.1".into(),
        master_port: port,
        rank,
        world_size: world,
        token: token.to_vec(),
        timeout: Duration::from_secs(8),
        listen_host: None,
    }
}

fn spawn_rank(
    port: u16,
    rank: u32,
    world: u32,
    tuning: TcpTuning,
) -> JoinHandle<Result<TcpProcessGroup, PgError>> {
    std::thread::spawn(move || {
        TcpProcessGroup::connect_with(opts(port, rank, world, TOKEN), tuning)
    })
}

pub(crate) fn form_with(world: u32, tuning: TcpTuning) -> Vec<TcpProcessGroup> {
    let port = free_port();
    let handles: Vec<_> = (0..world)
        .map(|r| spawn_rank(port, r, world, tuning.clone()))
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap().expect("group formation"))
        .collect()
}

fn form(world: u32) -> Vec<TcpProcessGroup> {
    form_with(world, TcpTuning::default())
}

#[test]
fn tcp_ring_of_four() {
    let g = form(4);
    for (r, g) in g.iter().enumerate() {
        assert_eq!((g.rank(), g.size()), (r as u32, 4));
    }
    scenarios::ring(&g);
}

#[test]
fn tcp_scatter_gather() {
    scenarios::scatter_gather(&form(3));
}

#[test]
fn tcp_tags_out_of_order() {
    scenarios::tags_out_of_order(&form(2));
}

#[test]
fn tcp_zero_length() {
    scenarios::zero_length(&form(2));
}

#[test]
fn tcp_large_message() {
    scenarios::large_message(&form(2));
}

#[test]
fn tcp_length_checks() {
    let g = form(2);
    scenarios::length_checks(&g);
    scenarios::too_large_on_wire(&g);
}

#[test]
fn tcp_stalled_peer() {
    scenarios::stalled_peer(&form(3));
}

#[test]
fn tcp_invalid_ranks() {
    scenarios::invalid_ranks(&form(2));
}

#[test]
fn tcp_concurrent_same_peer() {
    scenarios::concurrent_same_peer(&form(2));
}

#[test]
fn tcp_full_duplex() {
    scenarios::full_duplex(&form(2));
}

#[test]
fn tcp_small_chunks_and_buffers() {
    // Streaming in many small pieces through small socket buffers.
    let tuning = TcpTuning {
        chunk_size: 4096,
        send_buffer: Some(64 << 10),
        recv_buffer: Some(64 << 10),
        ..TcpTuning::default()
    };
    let g = form_with(2, tuning);
    scenarios::scatter_gather(&g);
    scenarios::full_duplex(&g);
}

#[test]
fn tcp_world_of_one() {
    let g = TcpProcessGroup::connect(opts(free_port(), 0, 1, TOKEN)).unwrap();
    assert_eq!((g.rank(), g.size()), (0, 1));
    assert!(matches!(
        g.send(0, 1, &[], T).unwrap_err(),
        PgError::InvalidRank { .. }
    ));
}

#[test]
fn tcp_bad_options() {
    let e = TcpProcessGroup::connect(opts(free_port(), 2, 2, TOKEN)).unwrap_err();
    assert!(matches!(e, PgError::Config(_)), "{e}");
    let e = TcpProcessGroup::connect(opts(free_port(), 0, 2, b"")).unwrap_err();
    assert!(matches!(e, PgError::Config(_)), "{e}");
}

#[test]
fn tcp_stash_limit() {
    let tuning = TcpTuning {
        stash_limit: 1 << 20,
        ..TcpTuning::default()
    };
    let g = form_with(2, tuning);
    g[0].send(1, 1, &[&vec![1u8; 2 << 20]], T).unwrap();
    g[0].send(1, 2, &[b"two"], T).unwrap();
    let e = g[1].recv_vec(0, 2, 10, T).unwrap_err();
    assert!(
        matches!(e, PgError::UnexpectedBacklog { peer: 0, wanted: 2, blocking_tag: 1, len, .. } if len == 2 << 20),
        "{e}"
    );
    // Nothing was lost: the big frame is still first in line.
    assert_eq!(g[1].recv_vec(0, 1, 2 << 20, T).unwrap().len(), 2 << 20);
    assert_eq!(g[1].recv_vec(0, 2, 10, T).unwrap(), b"two");
}

#[test]
fn tcp_send_timeout_mid_frame_poisons() {
    let g = form(2);
    // Far more than loopback socket buffers hold; rank 1 is not reading.
    let big = vec![7u8; 64 << 20];
    let timeout = Duration::from_millis(300);
    let t0 = Instant::now();
    let e = g[0].send(1, 1, &[&big], timeout).unwrap_err();
    let el = t0.elapsed();
    assert_eq!(
        e,
        PgError::Timeout {
            peer: 1,
            tag: 1,
            after: timeout
        }
    );
    assert!(el < timeout + Duration::from_secs(1), "{el:?}");
    // The stream is cut mid-frame: later operations refuse rather than misparse.
    assert_eq!(
        g[0].send(1, 2, &[b"x"], T).unwrap_err(),
        PgError::Poisoned { peer: 1 }
    );
    assert_eq!(
        g[0].recv_vec(1, 2, 10, T).unwrap_err(),
        PgError::Poisoned { peer: 1 }
    );
    // The receiver sees a truncated frame, then refuses too.
    let e = g[1].recv_vec(0, 1, 64 << 20, T).unwrap_err();
    assert_eq!(e, PgError::PeerClosed { peer: 0 });
    assert_eq!(
        g[1].recv_vec(0, 1, 64 << 20, T).unwrap_err(),
        PgError::Poisoned { peer: 0 }
    );
}

#[test]
fn tcp_send_timeout_before_first_byte_keeps_connection() {
    // A send stuck waiting for the per-peer send lock times out without touching the stream.
    let g = form(2);
    let big = vec![7u8; 32 << 20];
    let started = std::sync::Barrier::new(2);
    std::thread::scope(|s| {
        let first = s.spawn(|| {
            started.wait();
            g[0].send(1, 1, &[&big], T)
        });
        started.wait();
        // The first send takes the send lock at once and then blocks: rank 1 isn't reading.
        std::thread::sleep(Duration::from_millis(200));
        let t0 = Instant::now();
        let e = g[0]
            .send(1, 2, &[b"x"], Duration::from_millis(200))
            .unwrap_err();
        assert!(e.is_timeout(), "{e}");
        assert!(t0.elapsed() < Duration::from_millis(1200));
        assert_eq!(g[1].recv_vec(0, 1, 32 << 20, T).unwrap().len(), 32 << 20);
        first.join().unwrap().unwrap();
    });
    g[0].send(1, 2, &[b"x"], T).unwrap();
    assert_eq!(g[1].recv_vec(0, 2, 1, T).unwrap(), b"x");
}

#[test]
fn tcp_peer_closed() {
    let mut g = form(2);
    let g1 = g.pop().unwrap();
    g1.send(0, 1, &[b"bye"], T).unwrap();
    drop(g1);
    assert_eq!(g[0].recv_vec(1, 1, 10, T).unwrap(), b"bye");
    let t0 = Instant::now();
    assert_eq!(
        g[0].recv_vec(1, 1, 10, T).unwrap_err(),
        PgError::PeerClosed { peer: 1 }
    );
    assert!(t0.elapsed() < Duration::from_secs(1));
}

// ---------------------------------------------------------------------------------------------
// Strangers. The handshake (see pgt_host::pg::tcp docs): ClientHello = "PGTAUTH1" | purpose u8 |
// 3 zero bytes | rank u32 | world u32 | nonce[32]; ServerHello 84 bytes; proof 32 bytes; verdict 1.

fn connect_retry(addr: SocketAddr) -> TcpStream {
    let t0 = Instant::now();
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => return s,
            Err(e) if t0.elapsed() < Duration::from_secs(5) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("cannot reach {addr}: {e}"),
        }
    }
}

/// Read until the other side closes; returns how long it took. Panics if it stays open 5 s.
fn wait_closed(mut s: TcpStream) -> Duration {
    let t0 = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return t0.elapsed(),
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return t0.elapsed(),
            Err(e) => panic!("connection not closed by the server: {e}"),
        }
    }
}

fn garbage(addr: SocketAddr) {
    let mut s = connect_retry(addr);
    s.write_all(&[b'G'; 64]).unwrap();
    wait_closed(s);
}

fn forged_proof(addr: SocketAddr, purpose: u8, rank: u32, world: u32) {
    let mut s = connect_retry(addr);
    let mut hello = Vec::new();
    hello.extend_from_slice(b"PGTAUTH1");
    hello.extend_from_slice(&[purpose, 0, 0, 0]);
    hello.extend_from_slice(&rank.to_le_bytes());
    hello.extend_from_slice(&world.to_le_bytes());
    hello.extend_from_slice(&[0x5a; 32]);
    s.write_all(&hello).unwrap();
    let mut sh = [0u8; 84];
    s.read_exact(&mut sh).unwrap();
    assert_eq!(&sh[..8], b"PGTAUTH1");
    s.write_all(&[0u8; 32]).unwrap();
    let mut verdict = [9u8; 1];
    s.read_exact(&mut verdict).unwrap();
    assert_eq!(verdict[0], 1, "bad proof must be refused");
    wait_closed(s);
}

#[test]
fn tcp_strangers_are_refused_and_group_still_forms() {
    let port = free_port();
    let p1 = free_port();
    let store: SocketAddr = ([127, 0, 0, 1], port).into();
    let rank1: SocketAddr = ([127, 0, 0, 1], p1).into();
    let hs = Duration::from_secs(1);
    let tuning = |listen_port| TcpTuning {
        handshake_timeout: hs,
        listen_port,
        ..TcpTuning::default()
    };
    // Phase A: ranks 0 and 1 are up; rank 2 is not, so the store and rank 1's listener wait.
    let h0 = spawn_rank(port, 0, 3, tuning(0));
    let h1 = spawn_rank(port, 1, 3, tuning(p1));

    // Silent strangers: they must be dropped after the handshake timeout, and must not keep
    // real ranks out meanwhile (checked at the end).
    let silent: Vec<_> = [store, rank1]
        .into_iter()
        .map(|a| {
            let s = connect_retry(a);
            std::thread::spawn(move || wait_closed(s))
        })
        .collect();

    garbage(store);
    garbage(rank1);
    forged_proof(store, 1, 2, 3);
    forged_proof(rank1, 2, 0, 3);
    // A "rank 2" with the wrong token speaking the real protocol: it notices the store can't
    // prove the token and gives up; the store drops it.
    let t0 = Instant::now();
    let e = TcpProcessGroup::connect_with(opts(port, 2, 3, b"wrong token"), tuning(0)).unwrap_err();
    assert!(matches!(e, PgError::AuthFailed { .. }), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(2));

    // Phase B: the real rank 2 joins while the silent strangers are still connected.
    let h2 = spawn_rank(port, 2, 3, tuning(0));
    let g: Vec<TcpProcessGroup> = [h0, h1, h2]
        .into_iter()
        .map(|h| h.join().unwrap().expect("real ranks form the group"))
        .collect();
    scenarios::ring(&g);

    for h in silent {
        let el = h.join().unwrap();
        assert!(
            el < hs + Duration::from_secs(2),
            "silent stranger kept for {el:?}"
        );
    }
}

#[test]
fn tcp_rank_with_wrong_token_cannot_join() {
    // Rank 1 has the wrong token: it fails fast with AuthFailed; rank 0 times out waiting.
    let port = free_port();
    let mut o0 = opts(port, 0, 2, TOKEN);
    o0.timeout = Duration::from_millis(1000);
    let h0 = std::thread::spawn(move || TcpProcessGroup::connect(o0));
    let mut o1 = opts(port, 1, 2, b"other job");
    o1.timeout = Duration::from_millis(1000);
    let e1 = TcpProcessGroup::connect(o1).unwrap_err();
    assert!(matches!(e1, PgError::AuthFailed { .. }), "{e1}");
    let t0 = Instant::now();
    let e0 = h0.join().unwrap().unwrap_err();
    assert!(matches!(e0, PgError::Rendezvous(_)), "{e0}");
    assert!(t0.elapsed() < Duration::from_secs(3));
}
