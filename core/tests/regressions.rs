//! Replays the fuzz corpus kept in the repository through the fuzz harnesses themselves
//! (`fuzz/harness.rs`, the same code the cargo-fuzz targets run): every crasher ever found
//! (`fuzz/regressions/<target>/*.bin`) and every seed (`fuzz/seeds/<target>/*.bin`).
//!
//! `cargo test -p pgt-core --test regressions -- --ignored write_seeds` rewrites the seeds from the
//! sample state dicts below (after a wire-format change).

mod common;

#[path = "../../fuzz/harness.rs"]
mod harness;

#[path = "../../fuzz/corpus.rs"]
mod corpus;

use std::fs;

use common::*;
use corpus::{fuzz_dir, inputs};
use pgt_core::schema::FanOut;
use pgt_core::schema::Metadata;

fn replay<T>(kind: &str, target: &str, run: fn(&[u8]) -> T) -> usize {
    let files = inputs(kind, target);
    for (path, data) in &files {
        eprintln!("replaying {}", path.display());
        let _ = run(data);
    }
    files.len()
}

#[test]
fn replay_decode_regressions() {
    replay("regressions", "decode", harness::decode);
}

#[test]
fn replay_receiver_regressions() {
    replay("regressions", "receiver", harness::receiver);
}

#[test]
fn replay_seeds() {
    assert!(replay("seeds", "decode", harness::decode) >= 2);
    assert!(replay("seeds", "receiver", harness::receiver) >= 2);
}

// ---------------------------------------------------------------- seeds

/// The receiver program that drives a transfer to the end, then calls finish: op 11 (drive), op 13.
const DRIVE_ALL: [u8; 2] = [11, 13];

/// A decode seed: mode 0 (header as given), the header, the metadata message.
fn decode_seed(meta: &Metadata, digests: bool) -> Vec<u8> {
    let (header, bytes) = encode_raw(meta, digests);
    let mut out = vec![0u8];
    out.extend(header);
    out.extend(message_for(&bytes));
    out
}

/// A decode seed of the harness's kept sample at step 8, postcard behind a matching header with
/// digests, compared by a receiver given the sample's kept manifest (mode 1 | 2 | 8).
fn kept_seed() -> Vec<u8> {
    let meta = Metadata {
        step: Some(8),
        ..harness::kept_sample()
    };
    let mut out = vec![1 | 2 | 8];
    out.extend([0u8; pgt_core::header::Header::SIZE]);
    out.extend(postcard::to_allocvec(&meta).unwrap());
    out
}

/// A receiver seed: `mode` (rank selector etc., see harness), the metadata message's length, header,
/// metadata message, then `program`.
fn receiver_seed(mode: u8, meta: &Metadata, digests: bool, program: &[u8]) -> Vec<u8> {
    let (header, bytes) = encode_raw(meta, digests);
    let bytes = message_for(&bytes);
    let mut out = vec![mode];
    out.extend((bytes.len() as u16).to_le_bytes());
    out.extend(header);
    out.extend(bytes);
    out.extend(program);
    out
}

fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let direct = with_fanout(sample(), FanOut::Direct);
    // A small-chunk plan: the sample's 48-byte weight and 32-byte tensors chunked at 64 bytes, bucket 16.
    let mut chunked = sample();
    chunked.plan.bucket_size = 16;
    chunked.plan.chunk_size = 64;
    vec![
        ("decode", "sample", decode_seed(&sample(), false)),
        ("decode", "sample_digests", decode_seed(&direct, true)),
        (
            "decode",
            "dtensor",
            decode_seed(&single("d", dtensor_leaf_2d()), false),
        ),
        // The harness's kept sample at another step: a receiver given its kept manifest takes it
        // without decoding it again (mode 1 | 2 | 8: a matching header with digests, kept).
        ("decode", "kept_sample_step_8", kept_seed()),
        // Rank 1 (chain head, forwards to 2), digests on: the whole transfer.
        (
            "receiver",
            "chain_head_digests",
            receiver_seed(0, &sample(), true, &DRIVE_ALL),
        ),
        // Rank 2 (chain tail), expecting step 7, small chunks.
        (
            "receiver",
            "chain_tail_chunked",
            receiver_seed(1 | 4, &chunked, true, &DRIVE_ALL),
        ),
        // Rank 1, direct, no digests; binds storage 0 in place as bfloat16 (op 4: storage 0, id 9,
        // dtype 3 = bfloat16, exact size), then drives.
        (
            "receiver",
            "direct_in_place_cast",
            receiver_seed(0, &direct, false, &[0, 0, 4, 0, 0, 9, 3, 0, 11, 13]),
        ),
        // Polls several receives, completes them out of order (ops 1 and 10), then drives.
        (
            "receiver",
            "out_of_order",
            receiver_seed(
                0,
                &chunked,
                true,
                &[0, 0, 0, 1, 1, 1, 10, 2, 10, 0, 10, 1, 11, 13],
            ),
        ),
    ]
}

#[test]
#[ignore = "writes fuzz/seeds; run by hand after a wire-format change"]
fn write_seeds() {
    for (target, name, data) in seeds() {
        let dir = fuzz_dir().join("seeds").join(target);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(format!("{name}.bin")), data).unwrap();
    }
}

#[test]
fn seeds_are_current() {
    // The committed seeds are exactly what `write_seeds` makes: a wire-format change shows up here.
    for (target, name, data) in seeds() {
        let path = fuzz_dir()
            .join("seeds")
            .join(target)
            .join(format!("{name}.bin"));
        let committed = fs::read(&path).unwrap_or_default();
        assert!(
            committed == data,
            "{} is stale: run write_seeds",
            path.display()
        );
    }
}

#[test]
fn receiver_seeds_reach_a_result() {
    // The receiver seeds drive whole transfers, so the fuzzer starts deep.
    for (target, name, data) in seeds() {
        if target == "receiver" {
            assert!(harness::receiver(&data), "{name} does not complete");
        }
    }
}
