//! Backend-independent scenarios, run against both the TCP and the in-process group.

use std::time::{Duration, Instant};

use pgt_host::pg::{PgError, ProcessGroup};

pub const T: Duration = Duration::from_secs(10);

/// Run `f` once per rank, each in its own thread; panics propagate.
pub fn run_all<G: ProcessGroup>(groups: &[G], f: impl Fn(&G) + Sync) {
    std::thread::scope(|s| {
        let handles: Vec<_> = groups.iter().map(|g| s.spawn(|| f(g))).collect();
        for h in handles {
            h.join().expect("rank thread panicked");
        }
    });
}

/// Deterministic test pattern.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Several rounds of a ring: rank r sends to r+1 and receives from r-1.
pub fn ring<G: ProcessGroup>(groups: &[G]) {
    run_all(groups, |g| {
        let (r, n) = (g.rank(), g.size());
        let next = (r + 1) % n;
        let prev = (r + n - 1) % n;
        for round in 0..5u64 {
            let msg = pattern(
                1000 + r as usize * 10 + round as usize,
                round * 100 + r as u64,
            );
            g.send(next, round, &[&msg], T).unwrap();
            let want = pattern(
                1000 + prev as usize * 10 + round as usize,
                round * 100 + prev as u64,
            );
            let got = g.recv_vec(prev, round, 1 << 20, T).unwrap();
            assert_eq!(got, want, "rank {r} round {round}");
            let mut buf = vec![0u8; want.len()];
            g.send(next, 1000 + round, &[&msg[..10], &msg[10..]], T)
                .unwrap();
            g.recv_into(prev, 1000 + round, &mut [&mut buf], T).unwrap();
            assert_eq!(buf, want);
        }
    });
}

/// Gather on send, scatter on receive, with boundaries that don't line up.
pub fn scatter_gather<G: ProcessGroup>(groups: &[G]) {
    let data = pattern(100_003, 7);
    run_all(groups, |g| match g.rank() {
        0 => {
            let parts: Vec<&[u8]> = vec![&data[..1], &[], &data[1..40_000], &data[40_000..]];
            g.send(1, 5, &parts, T).unwrap();
        }
        1 => {
            let mut out = vec![0u8; data.len()];
            {
                let (a, rest) = out.split_at_mut(17);
                let (b, rest) = rest.split_at_mut(60_000);
                let (c, d) = rest.split_at_mut(1);
                g.recv_into(0, 5, &mut [a, &mut [], b, c, d], T).unwrap();
            }
            assert_eq!(out, data);
        }
        _ => {}
    });
}

/// Tags received in another order than sent: earlier frames are stashed and found later.
pub fn tags_out_of_order<G: ProcessGroup>(groups: &[G]) {
    run_all(groups, |g| match g.rank() {
        0 => {
            for tag in 1..=4u64 {
                g.send(1, tag, &[&pattern(100 * tag as usize, tag)], T)
                    .unwrap();
            }
            // Same tag twice: FIFO within a tag.
            g.send(1, 9, &[b"first"], T).unwrap();
            g.send(1, 9, &[b"second"], T).unwrap();
        }
        1 => {
            for tag in [4u64, 2, 3, 1] {
                if tag % 2 == 0 {
                    let v = g.recv_vec(0, tag, 10_000, T).unwrap();
                    assert_eq!(v, pattern(100 * tag as usize, tag));
                } else {
                    let mut b = vec![0u8; 100 * tag as usize];
                    g.recv_into(0, tag, &mut [&mut b], T).unwrap();
                    assert_eq!(b, pattern(100 * tag as usize, tag));
                }
            }
            assert_eq!(g.recv_vec(0, 9, 100, T).unwrap(), b"first");
            assert_eq!(g.recv_vec(0, 9, 100, T).unwrap(), b"second");
        }
        _ => {}
    });
}

/// Zero-length messages, with no parts or empty parts, received both ways, also via the stash.
pub fn zero_length<G: ProcessGroup>(groups: &[G]) {
    run_all(groups, |g| match g.rank() {
        0 => {
            g.send(1, 1, &[], T).unwrap();
            g.send(1, 2, &[&[], &[]], T).unwrap();
            g.send(1, 3, &[], T).unwrap();
            g.send(1, 4, &[b"after"], T).unwrap();
        }
        1 => {
            assert_eq!(g.recv_vec(0, 4, 10, T).unwrap(), b"after"); // stashes 1..=3
            g.recv_into(0, 1, &mut [], T).unwrap();
            g.recv_into(0, 2, &mut [&mut []], T).unwrap();
            assert!(g.recv_vec(0, 3, 0, T).unwrap().is_empty());
        }
        _ => {}
    });
}

/// A message of many MiB (well past socket buffers), in parts, streamed.
pub fn large_message<G: ProcessGroup>(groups: &[G]) {
    const LEN: usize = 12 << 20;
    let data = pattern(LEN, 42);
    run_all(groups, |g| match g.rank() {
        0 => {
            let (a, b) = data.split_at(LEN / 3);
            g.send(1, 77, &[a, b], T).unwrap();
            g.send(1, 78, &[&data], T).unwrap();
        }
        1 => {
            let mut out = vec![0u8; LEN];
            let (a, b) = out.split_at_mut(1 << 20);
            g.recv_into(0, 77, &mut [a, b], T).unwrap();
            assert!(out == data);
            let v = g.recv_vec(0, 78, LEN, T).unwrap();
            assert!(v == data);
        }
        _ => {}
    });
}

/// LengthMismatch and TooLarge fail without consuming the message (on the wire or stashed).
pub fn length_checks<G: ProcessGroup>(groups: &[G]) {
    run_all(groups, |g| match g.rank() {
        0 => {
            g.send(1, 1, &[&[1u8; 10]], T).unwrap();
            g.send(1, 2, &[&[2u8; 100]], T).unwrap();
            g.send(1, 3, &[b"x"], T).unwrap();
        }
        1 => {
            let mut small = [0u8; 8];
            let e = g.recv_into(0, 1, &mut [&mut small], T).unwrap_err();
            assert_eq!(
                e,
                PgError::LengthMismatch {
                    peer: 0,
                    tag: 1,
                    expected: 8,
                    got: 10
                }
            );
            let mut big = [0u8; 12];
            let (a, b) = big.split_at_mut(6);
            let e = g.recv_into(0, 1, &mut [a, b], T).unwrap_err();
            assert!(matches!(
                e,
                PgError::LengthMismatch {
                    expected: 12,
                    got: 10,
                    ..
                }
            ));
            // Still there.
            let mut ok = [0u8; 10];
            g.recv_into(0, 1, &mut [&mut ok], T).unwrap();
            assert_eq!(ok, [1u8; 10]);

            // Tag 3 first, so tag 2 goes to the stash; then check it there.
            assert_eq!(g.recv_vec(0, 3, 1, T).unwrap(), b"x");
            let e = g.recv_vec(0, 2, 99, T).unwrap_err();
            assert_eq!(
                e,
                PgError::TooLarge {
                    peer: 0,
                    tag: 2,
                    max: 99,
                    got: 100
                }
            );
            let mut wrong = [0u8; 3];
            let e = g.recv_into(0, 2, &mut [&mut wrong], T).unwrap_err();
            assert!(matches!(e, PgError::LengthMismatch { .. }));
            assert_eq!(g.recv_vec(0, 2, 100, T).unwrap(), vec![2u8; 100]);
        }
        _ => {}
    });
}

/// TooLarge on the wire (not stashed), then the message is still receivable.
pub fn too_large_on_wire<G: ProcessGroup>(groups: &[G]) {
    run_all(groups, |g| match g.rank() {
        0 => g.send(1, 5, &[&[5u8; 1000]], T).unwrap(),
        1 => {
            let e = g.recv_vec(0, 5, 999, T).unwrap_err();
            assert!(
                matches!(
                    e,
                    PgError::TooLarge {
                        max: 999,
                        got: 1000,
                        ..
                    }
                ),
                "{e}"
            );
            assert_eq!(g.recv_vec(0, 5, 1000, T).unwrap().len(), 1000);
        }
        _ => {}
    });
}

/// The peer never sends: Timeout promptly, and the connection stays usable.
pub fn stalled_peer<G: ProcessGroup>(groups: &[G]) {
    let timeout = Duration::from_millis(300);
    run_all(groups, |g| match g.rank() {
        0 => {
            let t0 = Instant::now();
            let e = g.recv_vec(1, 11, 100, timeout).unwrap_err();
            let el = t0.elapsed();
            assert_eq!(
                e,
                PgError::Timeout {
                    peer: 1,
                    tag: 11,
                    after: timeout
                }
            );
            assert!(el >= timeout, "{el:?}");
            assert!(el < timeout + Duration::from_secs(1), "{el:?}");
            let mut b = [0u8; 4];
            let t0 = Instant::now();
            let e = g.recv_into(1, 12, &mut [&mut b], timeout).unwrap_err();
            assert!(e.is_timeout());
            assert!(t0.elapsed() < timeout + Duration::from_secs(1));
            // Still usable.
            g.send(1, 13, &[b"ping"], T).unwrap();
            g.recv_into(1, 14, &mut [&mut b], T).unwrap();
            assert_eq!(&b, b"pong");
        }
        1 => {
            assert_eq!(g.recv_vec(0, 13, 4, T).unwrap(), b"ping");
            g.send(0, 14, &[b"pong"], T).unwrap();
        }
        _ => {}
    });
}

/// Bad ranks are rejected up front.
pub fn invalid_ranks<G: ProcessGroup>(groups: &[G]) {
    let g = &groups[0];
    let n = g.size();
    for bad in [0, n, u32::MAX] {
        let e = g.send(bad, 1, &[], T).unwrap_err();
        assert!(matches!(e, PgError::InvalidRank { .. }), "{e}");
        assert!(matches!(
            g.recv_vec(bad, 1, 0, T).unwrap_err(),
            PgError::InvalidRank { .. }
        ));
        assert!(matches!(
            g.recv_into(bad, 1, &mut [], T).unwrap_err(),
            PgError::InvalidRank { .. }
        ));
    }
}

/// Many threads per rank: concurrent sends to one peer (never interleaved) and concurrent
/// receives of different tags from one peer (hand-off / stash), plus the opposite direction at
/// the same time.
pub fn concurrent_same_peer<G: ProcessGroup>(groups: &[G]) {
    const THREADS: u64 = 4;
    const MSGS: u64 = 16;
    let len = |t: u64, i: u64| ((t * 7919 + i * 104_729) % 300_000) as usize;
    run_all(groups, |g| {
        if g.rank() > 1 {
            return;
        }
        let peer = 1 - g.rank();
        std::thread::scope(|s| {
            for t in 0..THREADS {
                s.spawn(move || {
                    for i in 0..MSGS {
                        let m = pattern(len(t, i), t * 1000 + i + g.rank() as u64 * 77);
                        let (a, b) = m.split_at(m.len() / 2);
                        g.send(peer, t, &[a, b], T).unwrap();
                    }
                });
                s.spawn(move || {
                    for i in 0..MSGS {
                        let want = pattern(len(t, i), t * 1000 + i + peer as u64 * 77);
                        if i % 2 == 0 {
                            let mut buf = vec![0u8; want.len()];
                            g.recv_into(peer, t, &mut [&mut buf], T).unwrap();
                            assert!(buf == want, "thread {t} msg {i}");
                        } else {
                            let v = g.recv_vec(peer, t, 1 << 20, T).unwrap();
                            assert!(v == want, "thread {t} msg {i}");
                        }
                    }
                });
            }
        });
    });
}

/// Both ranks send a large message to each other at the same time (full duplex: a send and a
/// receive with the same peer run concurrently).
pub fn full_duplex<G: ProcessGroup>(groups: &[G]) {
    const LEN: usize = 8 << 20;
    run_all(groups, |g| {
        if g.rank() > 1 {
            return;
        }
        let peer = 1 - g.rank();
        let mine = pattern(LEN, g.rank() as u64);
        std::thread::scope(|s| {
            s.spawn(|| g.send(peer, 1, &[&mine], T).unwrap());
            let mut buf = vec![0u8; LEN];
            g.recv_into(peer, 1, &mut [&mut buf], T).unwrap();
            assert!(buf == pattern(LEN, peer as u64));
        });
    });
}
