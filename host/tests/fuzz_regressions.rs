//! Replays the host fuzz targets' committed inputs through their harnesses (`pgt_host::fuzzing`,
//! the same code the cargo-fuzz targets of `fuzz/` run): every crasher ever found
//! (`fuzz/regressions/<target>/*.bin`) and every seed (`fuzz/seeds/<target>/*.bin`), which must
//! also get through to the accepting path.
//!
//! `cargo test -p pgt-host --test fuzz_regressions -- --ignored write_seeds` rewrites the seeds
//! (after a wire-format change); `seeds_are_current` fails while they are stale.

#[path = "../../fuzz/corpus.rs"]
mod corpus;

use std::fs;

use pgt_core::header::{Limits, PREFIX_LEN};
use pgt_core::manifest::Manifest;
use pgt_core::schema::{FanOut, PlanParams};
use pgt_host::fuzzing;

use corpus::{fuzz_dir, inputs};

/// A harness: whether the input got through to the accepting path.
type Harness = fn(&[u8]) -> bool;

/// The host targets and their harnesses.
const TARGETS: &[(&str, Harness)] = &[
    ("frame", fuzzing::frame),
    ("handshake", fuzzing::handshake),
    ("rendezvous", fuzzing::rendezvous),
    #[cfg(feature = "wasm")]
    ("wasm", fuzzing::wasm),
];

#[test]
fn replay_regressions() {
    for &(target, run) in TARGETS {
        for (path, data) in inputs("regressions", target) {
            eprintln!("replaying {}", path.display());
            run(&data);
        }
    }
}

#[test]
fn seeds_reach_the_accepting_path() {
    for &(target, run) in TARGETS {
        let files = inputs("seeds", target);
        assert!(files.len() >= 2, "{target}: only {} seeds", files.len());
        for (path, data) in files {
            assert!(run(&data), "{} is refused", path.display());
        }
    }
}

#[test]
fn seeds_are_current() {
    for (target, name, data) in seeds() {
        let path = fuzz_dir().join("seeds").join(target).join(name);
        let on_disk = fs::read(&path).unwrap_or_default();
        assert!(
            on_disk == data,
            "{} is stale: run `cargo test -p pgt-host --test fuzz_regressions -- --ignored write_seeds`",
            path.display()
        );
    }
}

#[test]
#[ignore = "rewrites fuzz/seeds/"]
fn write_seeds() {
    for (target, name, data) in seeds() {
        let dir = fuzz_dir().join("seeds").join(target);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(name), data).unwrap();
    }
}

/// A frame: tag, payload length (u64 LE each), payload.
fn frame(tag: u64, payload: &[u8]) -> Vec<u8> {
    [
        &tag.to_le_bytes()[..],
        &(payload.len() as u64).to_le_bytes(),
        payload,
    ]
    .concat()
}

/// A hello (TCP.md §3): magic, purpose, 3 zero bytes, rank, world size, nonce.
fn hello(purpose: u8, rank: u32, world: u32) -> Vec<u8> {
    [
        &b"PGTAUTH1"[..],
        &[purpose, 0, 0, 0],
        &rank.to_le_bytes(),
        &world.to_le_bytes(),
        &[0x11; 32],
    ]
    .concat()
}

/// The TABLE payload for `addrs`.
fn table(addrs: &[&str]) -> Vec<u8> {
    let mut v = (addrs.len() as u32).to_le_bytes().to_vec();
    for a in addrs {
        v.extend_from_slice(&(a.len() as u16).to_le_bytes());
        v.extend_from_slice(a.as_bytes());
    }
    v
}

/// Valid inputs that reach each harness's accepting path (the mode bytes are documented at each
/// harness in `pgt_host::fuzzing`).
fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let zero_mac = [0u8; 32];
    let mut seeds = vec![
        (
            "frame",
            "small.bin",
            [&[3u8][..], &frame(7, b"hello")].concat(),
        ),
        (
            "frame",
            "registration.bin",
            [&[2u8][..], &frame(1, b"127.0.0.1:29500")].concat(),
        ),
        // Server side (bit 0), right proof filled in (bit 1), a peer (bit 2 clear), admitted.
        (
            "handshake",
            "server_peer.bin",
            [&[0b011u8][..], &hello(2, 0, 4), &zero_mac].concat(),
        ),
        // The store (bit 2): the REGISTER frame follows the proof.
        (
            "handshake",
            "server_store.bin",
            [
                &[0b111u8][..],
                &hello(1, 2, 4),
                &zero_mac,
                &frame(1, b"[::1]:4000"),
            ]
            .concat(),
        ),
        // Client side: the server's hello with the right MAC filled in, verdict 0.
        (
            "handshake",
            "client_peer.bin",
            [&[0b010u8][..], &hello(2, 1, 4), &zero_mac, &[0]].concat(),
        ),
        (
            "handshake",
            "client_store.bin",
            [&[0b110u8][..], &hello(1, u32::MAX, 4), &zero_mac, &[0]].concat(),
        ),
        // A rank reading the TABLE (bit 0: framed by the harness, bit 2: tag 2) of world 2.
        (
            "rendezvous",
            "table.bin",
            [
                &[0b101u8, 1][..],
                &table(&["127.0.0.1:29501", "[::1]:29502"]),
            ]
            .concat(),
        ),
        // The store reading a REGISTER frame (bit 1), framed with tag 1.
        (
            "rendezvous",
            "register.bin",
            [&[0b011u8, 3, 1][..], b"10.1.2.3:4567"].concat(),
        ),
    ];
    for (name, fanout, digests) in [
        ("reference_direct.bin", FanOut::Direct, true),
        ("reference_chain.bin", FanOut::Chain, false),
    ] {
        let plan = PlanParams {
            fanout,
            ..PlanParams::default()
        };
        let m = pgt_core::reference::reference_metadata(0, vec![1, 2], plan);
        let manifest = Manifest::new(m, digests, &Limits::default()).unwrap();
        let (h, message) = pgt_core::codec::encode(&manifest, 7).unwrap();
        // Mode 0: the header as encoded, generous caps.
        seeds.push(("wasm", name, [&[0u8][..], &h.to_bytes(), &message].concat()));
        if digests {
            // Mode bit 0 and 1: the harness writes the header (with digests) for the postcard bytes.
            let postcard = &message[PREFIX_LEN as usize..];
            seeds.push((
                "wasm",
                "reference_fixed_header.bin",
                [&[0b011u8][..], &h.to_bytes(), postcard].concat(),
            ));
        }
    }
    seeds
}
