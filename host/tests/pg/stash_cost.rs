//! What the stash holds against what it is charged: a peer floods a receiver with frames nobody asked
//! for (the receive wants a tag that never comes) until the stash refuses one; an allocation counter
//! on the receiving thread measures the memory the stashed frames really hold.

use pgt_host::pg::{PgError, ProcessGroup, TcpTuning};

use crate::alloc_count;
use crate::scenarios::T;
use crate::tcp::form_with;

const LIMIT: usize = 4 << 20;

/// Rank 0 sends `frames` frames (tags from `tag_of`, `len` bytes each) to rank 1, which asks for tag 1
/// (never sent) and so stashes them until the limit. Returns (charged, really held) bytes.
fn flood(frames: u64, len: usize, tag_of: impl Fn(u64) -> u64 + Sync) -> (u64, i64) {
    let tuning = TcpTuning {
        stash_limit: LIMIT,
        ..TcpTuning::default()
    };
    let mut g = form_with(2, tuning);
    let receiver = g.pop().expect("two ranks");
    let payload = vec![7u8; len];
    let (e, real) = std::thread::scope(|s| {
        let g0 = &g[0];
        let (payload, tag_of) = (&payload, &tag_of);
        s.spawn(move || {
            for i in 0..frames {
                // Fails once the receiver is gone, after the measurement.
                if g0.send(1, tag_of(i), &[payload], T).is_err() {
                    break;
                }
            }
        });
        let before = alloc_count::live();
        let e = receiver.recv_vec(0, 1, 0, T).unwrap_err();
        let real = alloc_count::live() - before;
        drop(receiver); // frees the stash; the sender's next send fails
        (e, real)
    });
    let PgError::UnexpectedBacklog {
        peer: 0,
        wanted: 1,
        stashed,
        limit,
        ..
    } = e
    else {
        panic!("expected the stash to fill up: {e}")
    };
    assert_eq!(limit, LIMIT as u64, "{e}");
    assert!(stashed <= limit && stashed + 256 > limit, "{e}");
    eprintln!(
        "{frames} frames of {len} bytes: {stashed} bytes charged, {real} held ({:.2}x)",
        real as f64 / stashed as f64
    );
    (stashed, real)
}

/// More frames than fit even if each were charged only 48 bytes.
const FRAMES: u64 = (LIMIT / 48) as u64;

#[test]
fn stash_flood_of_empty_frames_with_distinct_tags_stays_within_the_limit() {
    let (charged, real) = flood(FRAMES, 0, |i| 1000 + i);
    assert!(
        real <= charged as i64,
        "{real} bytes held, {charged} charged"
    );
}

#[test]
fn stash_flood_of_empty_frames_two_per_tag_stays_within_the_limit() {
    let (charged, real) = flood(FRAMES, 0, |i| 1000 + i / 2);
    assert!(
        real <= charged as i64,
        "{real} bytes held, {charged} charged"
    );
}

#[test]
fn stash_flood_of_small_frames_stays_within_the_limit() {
    let (charged, real) = flood(FRAMES, 1, |i| u64::MAX - i);
    assert!(
        real <= charged as i64,
        "{real} bytes held, {charged} charged"
    );
    let (charged, real) = flood(FRAMES, 40, |i| 1000 + i % 3);
    assert!(
        real <= charged as i64,
        "{real} bytes held, {charged} charged"
    );
}
