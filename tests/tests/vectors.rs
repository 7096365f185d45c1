//! The golden vectors in `tests/vectors/`: today's encoder reproduces every committed file byte for byte,
//! and pgt-core decodes every vector exactly as `index.json` says. After an intended wire change, run
//! `cargo run -p pgt-tests --bin gen-vectors` (and bump the protocol version: see PROTOCOL.md).

use std::path::PathBuf;

use pgt_core::codec;
use pgt_core::dtype::DType;
use pgt_core::header::{self, Header, Limits};
use pgt_core::receiver::{Dest, Receiver};
use pgt_core::Error;
use pgt_tests::vectors::{self, host, spec, Kind};
use serde_json::Value as Json;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vectors")
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn index() -> Json {
    serde_json::from_slice(&read("index.json")).expect("index.json parses")
}

fn entries() -> Vec<Json> {
    index()["vectors"]
        .as_array()
        .expect("vectors is a list")
        .clone()
}

fn str_of<'a>(e: &'a Json, key: &str) -> &'a str {
    e[key].as_str().unwrap_or_else(|| panic!("{key} in {e}"))
}

/// Splits a header + metadata vector.
fn split(e: &Json, bytes: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let n = e["header_len"].as_u64().expect("header_len") as usize;
    let n = n.min(bytes.len());
    (bytes[..n].to_vec(), bytes[n..].to_vec())
}

fn stale() -> &'static str {
    "regenerate with `cargo run -p pgt-tests --bin gen-vectors` if the change is intended"
}

#[test]
fn committed_files_are_what_the_generator_writes() {
    let files = vectors::files();
    for (name, bytes) in &files {
        let committed = read(name);
        assert!(
            committed == *bytes,
            "tests/vectors/{name} differs from today's encoding ({} vs {} bytes); {}",
            committed.len(),
            bytes.len(),
            stale()
        );
    }
    for entry in std::fs::read_dir(dir()).expect("vectors dir") {
        let name = entry.expect("dir entry").file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".bin") {
            assert!(
                files.iter().any(|(f, _)| *f == name),
                "tests/vectors/{name} is not generated any more; {}",
                stale()
            );
        }
    }
}

#[test]
fn index_lists_every_file_once() {
    let entries = entries();
    let mut names: Vec<&str> = entries.iter().map(|e| str_of(e, "file")).collect();
    let count = names.len();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), count, "duplicate file in index.json");
    let idx = index();
    assert_eq!(idx["protocol_version"], Json::from(header::VERSION));
    assert_eq!(
        vectors::limits_from_json(&idx["default_limits"]),
        Some(Limits::default())
    );
}

#[test]
fn valid_metadata_decodes_to_its_manifest() {
    let mut seen = 0;
    for e in entries()
        .iter()
        .filter(|e| e["kind"] == Kind::ValidMetadata.name())
    {
        seen += 1;
        let name = str_of(e, "file");
        let (h, meta) = split(e, &read(name));
        let header =
            Header::parse(&h, &Limits::default()).unwrap_or_else(|err| panic!("{name}: {err}"));
        let manifest = codec::decode(&header, &meta, &Limits::default())
            .unwrap_or_else(|err| panic!("{name}: {err}"));
        let want = &e["manifest"];
        assert_eq!(
            want["leaf_count"].as_u64(),
            Some(manifest.metadata().leaves.len() as u64),
            "{name}"
        );
        let paths: Vec<String> = manifest.paths().iter().map(|p| p.to_string()).collect();
        assert_eq!(want["paths"], serde_json::json!(paths), "{name}: key paths");
        assert_eq!(
            vectors::summary(&header, &manifest),
            *want,
            "{name}: decoded manifest differs from index.json"
        );
        // Core's encoder and the encoder written from PROTOCOL.md both give exactly these bytes:
        // the metadata message is the transfer id's prefix, then the postcard metadata.
        assert_eq!(header.transfer_id, vectors::TRANSFER_ID, "{name}");
        let (h2, meta2) = codec::encode(&manifest, vectors::TRANSFER_ID).expect("encodes");
        assert_eq!(h2.to_bytes().as_slice(), h.as_slice(), "{name}: header");
        assert_eq!(meta2, meta, "{name}: core re-encoding");
        assert_eq!(&meta[..8], &header::prefix(vectors::TRANSFER_ID), "{name}");
        assert_eq!(
            spec::metadata(manifest.metadata()),
            meta[8..],
            "{name}: the PROTOCOL.md encoder (tests/src/vectors/spec.rs) disagrees with pgt-core"
        );
    }
    assert!(seen >= 8, "only {seen} valid vectors");
}

#[test]
fn malformed_vectors_fail_with_their_named_error() {
    let idx = index();
    let defaults = vectors::limits_from_json(&idx["default_limits"]).expect("default_limits");
    let mut seen = 0;
    for e in entries()
        .iter()
        .filter(|e| e["kind"] == Kind::Malformed.name())
    {
        seen += 1;
        let name = str_of(e, "file");
        let limits = match e.get("limits") {
            Some(l) => vectors::limits_from_json(l).expect("limits"),
            None => defaults,
        };
        let (h, meta) = split(e, &read(name));
        let err = Header::parse(&h, &limits)
            .and_then(|header| codec::decode(&header, &meta, &limits))
            .err()
            .unwrap_or_else(|| panic!("{name} decodes"));
        assert_eq!(err.name(), str_of(e, "error"), "{name}");
        assert_eq!(format!("{err:?}"), str_of(e, "error_debug"), "{name}");
        // Vectors that get past the header carry a header consistent with their metadata, except the
        // ones about exactly that.
        let consistent = !matches!(
            str_of(e, "error"),
            "HeaderLength"
                | "BadMagic"
                | "UnsupportedVersion"
                | "UnknownFlags"
                | "MetadataTooLarge"
                | "MetadataLength"
                | "MetadataDigest"
        );
        if consistent {
            let header = Header::parse(&h, &limits).expect("header parses");
            assert_eq!(header.metadata_message_len(), meta.len() as u64, "{name}");
            assert_eq!(
                header.metadata_digest,
                pgt_core::digest::digest(&meta[8..]),
                "{name}"
            );
            if str_of(e, "error") != "TransferMismatch" {
                assert_eq!(&meta[..8], &header::prefix(header.transfer_id), "{name}");
            }
        }
    }
    assert!(seen >= 40, "only {seen} malformed vectors");
}

#[test]
fn receiver_rejects() {
    for e in entries()
        .iter()
        .filter(|e| e["kind"] == Kind::ReceiverReject.name())
    {
        let name = str_of(e, "file");
        let (h, meta) = split(e, &read(name));
        // The metadata itself is valid…
        let header = Header::parse(&h, &Limits::default()).expect("header");
        let manifest = codec::decode(&header, &meta, &Limits::default()).expect("metadata decodes");
        assert_eq!(
            vectors::summary(&header, &manifest),
            e["manifest"],
            "{name}"
        );
        // …but this receiver rejects it.
        let options = vectors::options_from_json(&e["receiver"]).expect("receiver options");
        let mut rx = Receiver::new(options);
        rx.handle_header(&h).expect("header accepted");
        let err = rx.handle_metadata(&meta).expect_err("rejected");
        assert_eq!(err.name(), str_of(e, "error"), "{name}");
        assert_eq!(format!("{err:?}"), str_of(e, "error_debug"), "{name}");
    }
}

#[test]
fn streams_are_received_completely() {
    let mut seen = 0;
    for e in entries()
        .iter()
        .filter(|e| e["kind"] == Kind::Stream.name())
    {
        seen += 1;
        let name = str_of(e, "file");
        let records =
            host::decode_stream(&read(name)).unwrap_or_else(|err| panic!("{name}: {err}"));
        let want_records = e["records"].as_array().expect("records");
        assert_eq!(records.len(), want_records.len(), "{name}: record count");
        for ((tag, bytes), want) in records.iter().zip(want_records) {
            assert_eq!(Some(*tag), want["tag"].as_u64(), "{name}");
            assert_eq!(Some(bytes.len() as u64), want["len"].as_u64(), "{name}");
        }
        let options = vectors::options_from_json(&e["receiver"]).expect("receiver options");
        let outcome =
            vectors::run_stream(options, &records).unwrap_or_else(|err| panic!("{name}: {err:?}"));
        // The metadata is the second record; the manifest is as listed, and the receiver received it.
        let header = Header::parse(&records[0].1, &Limits::default()).expect("header");
        let manifest = &codec::decode(&header, &records[1].1, &Limits::default())
            .unwrap_or_else(|err| panic!("{name}: {err}"));
        assert_eq!(vectors::summary(&header, manifest), e["manifest"], "{name}");
        let received = &outcome.received;
        assert_eq!(received.step, manifest.metadata().step, "{name}: step");
        assert_eq!(received.tree, manifest.metadata().tree, "{name}: tree");
        let bound: Vec<(Dest, DType, u64)> = received
            .bindings
            .iter()
            .map(|b| (b.dest, b.dtype, b.nbytes))
            .collect();
        let announced: Vec<(Dest, DType, u64)> = manifest
            .storages()
            .iter()
            .map(|s| (Dest::Fresh, s.dtype, s.nbytes))
            .collect();
        assert_eq!(
            bound, announced,
            "{name}: storages bound fresh as announced"
        );
        // Every storage holds the pattern.
        assert_eq!(
            outcome.storages,
            host::pattern_storages(manifest),
            "{name}: storage bytes"
        );
        let want = &e["result"];
        let leaves: Vec<Json> = outcome
            .received
            .leaves
            .iter()
            .map(vectors::leaf_json)
            .collect();
        assert_eq!(
            Json::Array(leaves),
            want["leaves"],
            "{name}: received leaves"
        );
        for (i, s) in want["storages"]
            .as_array()
            .expect("storages")
            .iter()
            .enumerate()
        {
            let d = format!("0x{:016x}", pgt_core::digest::digest(&outcome.storages[i]));
            assert_eq!(
                s["digest"].as_str(),
                Some(d.as_str()),
                "{name}: storage {i}"
            );
        }
    }
    assert!(seen >= 3, "only {seen} streams");
}

#[test]
fn stale_streams_are_received_completely_skipping_the_stale_records() {
    let mut seen = 0;
    for e in entries()
        .iter()
        .filter(|e| e["kind"] == Kind::StaleStream.name())
    {
        seen += 1;
        let name = str_of(e, "file");
        let records =
            host::decode_stream(&read(name)).unwrap_or_else(|err| panic!("{name}: {err}"));
        let want_records = e["records"].as_array().expect("records");
        assert_eq!(records.len(), want_records.len(), "{name}: record count");
        let header = Header::parse(&records[0].1, &Limits::default()).expect("header");
        let mut stale = 0;
        for ((tag, bytes), want) in records.iter().zip(want_records) {
            assert_eq!(Some(*tag), want["tag"].as_u64(), "{name}");
            assert_eq!(Some(bytes.len() as u64), want["len"].as_u64(), "{name}");
            // A stale record is one whose prefix is another transfer's.
            let is_stale = *tag != 1 && header::is_stale(bytes, header.transfer_id);
            assert_eq!(Some(is_stale), want["stale"].as_bool(), "{name}");
            stale += usize::from(is_stale);
        }
        assert!(stale >= 3, "{name}: {stale} stale records");
        let options = vectors::options_from_json(&e["receiver"]).expect("receiver options");
        let outcome =
            vectors::run_stream(options, &records).unwrap_or_else(|err| panic!("{name}: {err:?}"));
        assert_eq!(outcome.skipped, stale, "{name}: every stale record skipped");
        let leaves: Vec<Json> = outcome
            .received
            .leaves
            .iter()
            .map(vectors::leaf_json)
            .collect();
        assert_eq!(Json::Array(leaves), e["result"]["leaves"], "{name}");
        for (i, s) in e["result"]["storages"]
            .as_array()
            .expect("storages")
            .iter()
            .enumerate()
        {
            let d = format!("0x{:016x}", pgt_core::digest::digest(&outcome.storages[i]));
            assert_eq!(
                s["digest"].as_str(),
                Some(d.as_str()),
                "{name}: storage {i}"
            );
        }
        // A host that does not skip them uses none: it fails at the first one.
        let mut rx = Receiver::new(options);
        rx.handle_header(&records[0].1).unwrap();
        assert!(matches!(
            rx.handle_metadata(&records[1].1),
            Err(Error::TransferMismatch { message: 1, .. })
        ));
    }
    assert!(seen >= 1, "no stale streams");
}

#[test]
fn malformed_streams_fail_with_their_named_error() {
    let mut seen = 0;
    for e in entries()
        .iter()
        .filter(|e| e["kind"] == Kind::MalformedStream.name())
    {
        seen += 1;
        let name = str_of(e, "file");
        let records =
            host::decode_stream(&read(name)).unwrap_or_else(|err| panic!("{name}: {err}"));
        let options = vectors::options_from_json(&e["receiver"]).expect("receiver options");
        match vectors::run_stream(options, &records) {
            Err(host::HostError::Core(err)) => {
                assert_eq!(err.name(), str_of(e, "error"), "{name}");
                assert_eq!(format!("{err:?}"), str_of(e, "error_debug"), "{name}");
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    assert!(seen >= 2, "only {seen} malformed streams");
}

#[test]
fn host_reject_streams_are_refused_by_the_host() {
    let mut seen = 0;
    for e in entries()
        .iter()
        .filter(|e| e["kind"] == Kind::HostRejectStream.name())
    {
        seen += 1;
        let name = str_of(e, "file");
        let records =
            host::decode_stream(&read(name)).unwrap_or_else(|err| panic!("{name}: {err}"));
        let options = vectors::options_from_json(&e["receiver"]).expect("receiver options");
        let err = vectors::run_stream(options, &records).expect_err(name);
        assert_eq!(
            vectors::host_error_json(&err).as_ref(),
            Some(&e["host_error"]),
            "{name}: {err:?}"
        );
    }
    assert!(seen >= 4, "only {seen} host_reject streams");
}

#[test]
fn empty_storage_digest_is_the_documented_constant() {
    assert_eq!(pgt_core::digest::digest(&[]), 0x2D06_8005_38D3_94C2);
}

/// The variant names of `pgt_core::Error`, from the enum itself.
fn error_variants() -> &'static [&'static str] {
    let variants = Error::NAMES;
    assert!(variants.len() > 40, "only {variants:?}");
    variants
}

#[test]
fn every_error_variant_is_documented() {
    let protocol =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../PROTOCOL.md"))
            .expect("PROTOCOL.md");
    let missing: Vec<&str> = error_variants()
        .iter()
        .copied()
        .filter(|v| !protocol.contains(&format!("| `{v}")))
        .collect();
    assert!(
        missing.is_empty(),
        "Error::{missing:?} missing from PROTOCOL.md §13"
    );
}

#[test]
fn every_wire_error_has_a_vector() {
    // Errors that no bytes on the wire can cause: host API use (a call in the wrong state, an unknown
    // storage or message, a digest or forward report that does not fit the plan), host-side casts, the
    // encoder. `DataLength` too: a transport delivers a message of exactly its planned length or fails;
    // only an in-memory host can be handed a data message of another length. And the checks a host
    // makes beyond validation (PROTOCOL.md §11), which no vector can show: the process group's size,
    // writing a view out.
    let not_from_the_wire = [
        "Encode",
        "UnsupportedCast",
        "CastLength",
        "UnexpectedCall",
        "NoSuchStorage",
        "MessageNotOutstanding",
        "DigestsOff",
        "DigestsNotExpected",
        "DigestCount",
        "ForwardNotIssued",
        "ForwardReportedTwice",
        "DataLength",
        // A host's bound on its own work while skipping stale messages (MAX_STALE), not a property
        // of any message.
        "TooManyStale",
        "InPlaceSizeMismatch",
        "InPlaceDTypeMismatch",
        "Incomplete",
        "MeshRankOutOfRange",
        "PlacementRankOutOfRange",
        "ViewTooLarge",
    ];
    for v in &not_from_the_wire {
        assert!(error_variants().contains(v), "Error::{v} does not exist");
    }
    let entries = entries();
    for v in error_variants() {
        let has_vector = entries.iter().any(|e| e["error"] == *v);
        if not_from_the_wire.contains(v) {
            assert!(!has_vector, "Error::{v} is listed as not from the wire");
        } else {
            assert!(
                has_vector,
                "Error::{v} has no vector in tests/vectors (add one in tests/src/vectors.rs)"
            );
        }
    }
}
