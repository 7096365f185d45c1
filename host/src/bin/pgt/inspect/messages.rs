//! Inspecting pgt's own bytes: a header message followed by a metadata message (a "blob", as the
//! golden `valid_metadata` and `malformed` vectors hold them), or a message stream as one receiver
//! gets it, run through a real receiver.

use std::path::Path;

use anyhow::anyhow;
use pgt_core::codec;
use pgt_core::drive;
use pgt_core::header::{is_stale, Header, MAGIC, PREFIX_LEN};
use pgt_core::manifest::Manifest;
use pgt_core::memory::MemoryHost;
use pgt_core::plan::{MessageKind, TAG_HEADER, TAG_METADATA};
use pgt_core::receiver::{Receiver, ReceiverOptions, RecvOp};
use pgt_core::schema::FanOut;
use pgt_core::schema::Metadata;
use pgt_core::tree::key_paths;
use serde_json::{json, Value as Json};

use super::leaves::leaf_json;
use super::{u64_at, InspectArgs, Report};

/// The header's fields as read, whether or not they are valid.
fn raw_header_json(h: &[u8]) -> Json {
    let u16_at = |i: usize| h.get(i..i + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let magic = h.get(0..4).map(|m| m.escape_ascii().to_string());
    let flags = u16_at(6);
    json!({
        "len": h.len(),
        "magic": magic,
        "magic_ok": h.get(0..4) == Some(&MAGIC[..]),
        "version": u16_at(4),
        "flags": flags,
        "digests": flags.map(|f| f & pgt_core::header::FLAG_DIGESTS != 0),
        "metadata_len": u64_at(h, 8),
        "metadata_digest": u64_at(h, 16).map(|d| format!("0x{d:016x}")),
        "transfer_id": u64_at(h, 24).map(|d| format!("0x{d:016x}")),
    })
}

/// The postcard metadata of a metadata message: what follows its 8-byte prefix.
fn postcard_part(message: &[u8]) -> &[u8] {
    message.get(PREFIX_LEN as usize..).unwrap_or_default()
}

/// Header, metadata and (unless `validated` is false and the tree is malformed) leaves of a metadata
/// message, into the report.
fn metadata_json(report: &mut Report, metadata: &Metadata, manifest: Option<&Manifest>) {
    report.set("step", json!(metadata.step));
    report.set("source", json!(metadata.source));
    report.set("destinations", json!(metadata.destinations));
    report.set(
        "plan",
        json!({
            "fanout": match metadata.plan.fanout { FanOut::Direct => "direct", FanOut::Chain => "chain" },
            "bucket_size": metadata.plan.bucket_size,
            "chunk_size": metadata.plan.chunk_size,
        }),
    );
    report.set("validated", json!(manifest.is_some()));
    report.set("leaf_count", json!(metadata.leaves.len()));
    let storages: usize = metadata.leaves.iter().map(|l| l.storages().count()).sum();
    report.set("storage_count", json!(storages));
    let total: u128 = metadata
        .leaves
        .iter()
        .flat_map(|l| l.storages())
        .map(|l| u128::from(l.nbytes))
        .sum();
    report.set("total_bytes", json!(u64::try_from(total).ok()));
    // Paths: from the manifest, else from the tree if it is well formed, else leaf numbers.
    let paths: Vec<String> = match manifest {
        Some(m) => m.paths().iter().map(|p| p.to_string()).collect(),
        None => key_paths(&metadata.tree, u32::MAX)
            .map(|ps| ps.iter().map(|p| p.to_string()).collect())
            .unwrap_or_default(),
    };
    let leaves: Vec<Json> = metadata
        .leaves
        .iter()
        .enumerate()
        .map(|(i, leaf)| {
            let path = paths.get(i).cloned().unwrap_or_else(|| format!("#{i}"));
            leaf_json(&path, leaf, None)
        })
        .collect();
    report.set("leaves", Json::Array(leaves));
}

/// The options of the receiver `--rank` plays (source: `--source`, else the metadata's), also put in
/// the report.
fn receiver_options(
    report: &mut Report,
    args: &InspectArgs,
    rank: u32,
    metadata: Option<&Metadata>,
) -> ReceiverOptions {
    let options = ReceiverOptions {
        rank,
        source: args
            .source
            .or(metadata.map(|m| m.source))
            .unwrap_or_default(),
        expected_step: args.expect_step,
        limits: args.limits(),
    };
    report.set(
        "receiver",
        json!({"rank": options.rank, "source": options.source, "expected_step": options.expected_step}),
    );
    options
}

/// Runs the receiver checks of `--rank` on a parsed header and metadata message.
fn receiver_check(
    report: &mut Report,
    args: &InspectArgs,
    rank: u32,
    metadata: Option<&Metadata>,
    header: &[u8],
    meta: &[u8],
) {
    let options = receiver_options(report, args, rank, metadata);
    let mut rx = Receiver::new(options);
    if let Err(e) = rx
        .handle_header(header)
        .and_then(|()| rx.handle_metadata(meta))
    {
        report.core_error(e);
    }
}

/// A header message followed by the metadata message.
pub(super) fn inspect_blob(path: &Path, bytes: &[u8], args: &InspectArgs) -> Report {
    let mut report = Report::new(path, "metadata", bytes.len() as u64);
    // A version-1 header (no transfer id) is 24 bytes.
    let default_len = match bytes.get(4..6) {
        Some([1, 0]) => 24,
        _ => Header::SIZE,
    };
    let header_len = args.header_len.unwrap_or(default_len).min(bytes.len());
    let (h, m) = bytes.split_at(header_len);
    report.set("header", raw_header_json(h));
    report.set("metadata_bytes", json!(m.len()));
    let limits = args.limits();
    let manifest = match Header::parse(h, &limits) {
        Ok(header) => match codec::decode(&header, m, &limits) {
            Ok(manifest) => {
                let plan = manifest.plan(header.metadata_len);
                report.set("messages", json!(plan.messages().len()));
                Some(manifest)
            }
            Err(e) => {
                report.core_error(e);
                None
            }
        },
        Err(e) => {
            report.core_error(e);
            None
        }
    };
    // Show the metadata even when it is invalid, as far as it decodes.
    let metadata = match &manifest {
        Some(man) => Some(man.metadata().clone()),
        None => codec::decode_metadata(postcard_part(m)).ok(),
    };
    if let Some(md) = &metadata {
        metadata_json(&mut report, md, manifest.as_ref());
    }
    if let (Some(rank), true) = (args.rank, manifest.is_some()) {
        receiver_check(&mut report, args, rank, metadata.as_ref(), h, m);
    }
    report
}

fn parse_records(mut bytes: &[u8]) -> (Vec<(u64, &[u8])>, Option<String>) {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (Some(tag), Some(len)) = (u64_at(bytes, 0), u64_at(bytes, 8)) else {
            let why = format!(
                "record {} is cut short: {} bytes left, a record header takes 16",
                out.len(),
                bytes.len()
            );
            return (out, Some(why));
        };
        let rest = &bytes[16..];
        if (rest.len() as u64) < len {
            let why = format!(
                "record {} (tag {tag}) announces {len} bytes, {} follow",
                out.len(),
                rest.len()
            );
            return (out, Some(why));
        }
        out.push((tag, &rest[..len as usize]));
        bytes = &rest[len as usize..];
    }
    (out, None)
}

/// Drives a receiver over the records in order (through the one driver, with the in-memory host),
/// hashing and keeping every storage's bytes; a record of another transfer (stale) is skipped, as a
/// receiver does. Returns each storage's path, size and digest.
fn run_stream(
    options: ReceiverOptions,
    records: &[(u64, &[u8])],
) -> Result<Vec<Json>, StreamError> {
    let mut it = records.iter().enumerate();
    let source = |op: &RecvOp| -> Result<Vec<u8>, StreamError> {
        let (op_kind, op_tag, op_len) = (op.kind, op.tag, op.len);
        let Some((i, (tag, bytes))) = it.next() else {
            return Err(StreamError::Host(format!(
                "the stream ends where the receiver expects message tag {op_tag} ({op_kind:?})"
            )));
        };
        if *tag != op_tag {
            return Err(StreamError::Host(format!(
                "record {i} has tag {tag}, the receiver expects tag {op_tag} ({op_kind:?})"
            )));
        }
        if op_kind != MessageKind::Trailer && !op.is_stale(bytes) && bytes.len() as u64 != op_len {
            return Err(StreamError::Host(format!(
                "record {i} (tag {tag}) is {} bytes, the receiver expects {op_len}",
                bytes.len()
            )));
        }
        Ok(bytes.to_vec())
    };
    // A middle rank of a chain forwards; here the forwarded bytes are collected and dropped.
    let mut host = MemoryHost::new(source).keep_paths();
    drive::receive(Receiver::new(options), &mut host)?;
    let paths = host.paths().unwrap_or_default().to_vec();
    let refs = host
        .incoming()
        .map(|i| i.storages.clone())
        .unwrap_or_default();
    let storages = host.into_storages();
    if let Some((i, (tag, _))) = it.next() {
        return Err(StreamError::Host(format!(
            "record {i} (tag {tag}) and later ones are left over after the transfer completed"
        )));
    }
    Ok(refs
        .iter()
        .zip(storages)
        .map(|(r, bytes)| {
            json!({
                "path": paths.get(r.leaf as usize).map(ToString::to_string).unwrap_or_default(),
                "shard": r.shard,
                "nbytes": r.nbytes,
                "digest": format!("0x{:016x}", pgt_core::digest::digest(&bytes)),
            })
        })
        .collect())
}

enum StreamError {
    Core(pgt_core::Error),
    Host(String),
}

impl From<pgt_core::Error> for StreamError {
    fn from(e: pgt_core::Error) -> StreamError {
        StreamError::Core(e)
    }
}

/// A message stream: header and metadata first, then what the receiver makes of the rest.
pub(super) fn inspect_stream(path: &Path, bytes: &[u8], args: &InspectArgs) -> Report {
    let mut report = Report::new(path, "stream", bytes.len() as u64);
    let (records, cut) = parse_records(bytes);
    let kind = |tag: u64| match tag {
        TAG_HEADER => "header",
        TAG_METADATA => "metadata",
        _ => "data/trailer",
    };
    // A record after the header that starts with another transfer's id than the header's is stale: a
    // receiver skips it (PROTOCOL.md §12).
    let header = records.first().filter(|r| r.0 == TAG_HEADER).map(|r| r.1);
    let id = header.and_then(|h| u64_at(h, 24));
    let stale = |i: usize, b: &[u8]| i > 0 && id.is_some_and(|id| is_stale(b, id));
    report.set(
        "records",
        Json::Array(
            records
                .iter()
                .enumerate()
                .map(|(i, (tag, b))| {
                    json!({"tag": tag, "len": b.len(), "kind": kind(*tag), "stale": stale(i, b)})
                })
                .collect(),
        ),
    );
    if let Some(cut) = cut {
        report.other_error(anyhow!("malformed stream: {cut}"));
    }
    // Header and metadata (this transfer's first one), shown whatever happens next.
    let meta = records
        .iter()
        .enumerate()
        .skip(1)
        .find(|(i, r)| r.0 == TAG_METADATA && !stale(*i, r.1))
        .map(|(_, r)| r.1);
    let mut metadata = None;
    if let Some(h) = header {
        report.set("header", raw_header_json(h));
    }
    if let Some(m) = meta {
        report.set("metadata_bytes", json!(m.len()));
        let limits = args.limits();
        let manifest = header
            .and_then(|h| Header::parse(h, &limits).ok())
            .and_then(|h| codec::decode(&h, m, &limits).ok());
        metadata = manifest
            .as_ref()
            .map(|man| man.metadata().clone())
            .or_else(|| codec::decode_metadata(postcard_part(m)).ok());
        if let Some(md) = &metadata {
            metadata_json(&mut report, md, manifest.as_ref());
        }
    }
    // The receiver names what is wrong, from the header on (a missing or misplaced record too).
    run_and_report(&mut report, args, metadata.as_ref(), &records);
    report
}

fn run_and_report(
    report: &mut Report,
    args: &InspectArgs,
    metadata: Option<&Metadata>,
    records: &[(u64, &[u8])],
) {
    let rank = args
        .rank
        .or_else(|| metadata.and_then(|m| m.destinations.first().copied()))
        .unwrap_or(1);
    let options = receiver_options(report, args, rank, metadata);
    match run_stream(options, records) {
        Ok(storages) => {
            report.set("received", json!(true));
            report.set("received_storages", Json::Array(storages));
        }
        Err(e) => {
            report.set("received", json!(false));
            match e {
                StreamError::Core(e) => report.core_error(e),
                StreamError::Host(m) => report.other_error(anyhow!("malformed stream: {m}")),
            }
        }
    }
}
