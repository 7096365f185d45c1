//! `pgt send`, `pgt recv` and `pgt inspect`: safetensors files over a job, and a look inside pgt's wire
//! bytes (metadata blobs, message streams) and safetensors files.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use clap::{Args, ValueEnum};
use pgt_core::codec;
use pgt_core::header::{Header, Limits, MAGIC};
use pgt_core::manifest::Manifest;
use pgt_core::schema::Metadata;
use pgt_core::schema::FanOut;
use pgt_core::plan::{MessageKind, TAG_HEADER, TAG_METADATA};
use pgt_core::drive;
use pgt_core::memory::MemoryHost;
use pgt_core::receiver::{Receiver, ReceiverOptions, RecvOp};
use pgt_core::tree::{key_paths, Leaf, Value};
use pgt_host::pg::ProcessGroup;
use pgt_host::safetensors_io;
use pgt_host::state_dict::{Entry, StateDict, Storage};
use pgt_host::transport::{TransferStats, Transport, TransportOptions};
use serde_json::{json, Value as Json};

use crate::common::{self, GroupArgs, TransferArgs};

// ------------------------------------------------------------------------------------------------
// send / recv

/// `pgt send` flags.
#[derive(Args, Debug)]
pub struct SendArgs {
    /// The safetensors file to send (memory-mapped: its bytes go to the wire without a copy).
    pub file: PathBuf,
    /// Receiving ranks, comma-separated (e.g. `1,2`); in chain fan-out also the relay order.
    /// Default: every other rank of the job, in rank order.
    #[arg(long, value_delimiter = ',')]
    pub dst: Vec<u32>,
    /// Training step to send (default: the file's `pgt.step` metadata entry, if any).
    #[arg(long)]
    pub step: Option<u64>,
    #[command(flatten)]
    pub group: GroupArgs,
    #[command(flatten)]
    pub transfer: TransferArgs,
}

/// `pgt recv` flags.
#[derive(Args, Debug)]
pub struct RecvArgs {
    /// Rank that sends the checkpoint.
    #[arg(long, default_value_t = 0)]
    pub src: u32,
    /// Where to write the received checkpoint (a safetensors file, replaced atomically). `{rank}`
    /// in it becomes this rank, for launchers that give every receiver the same arguments.
    #[arg(long)]
    pub out: PathBuf,
    /// Refuse a checkpoint of another training step.
    #[arg(long)]
    pub expect_step: Option<u64>,
    #[command(flatten)]
    pub group: GroupArgs,
    #[command(flatten)]
    pub transfer: TransferArgs,
}

/// The group-formation timeout: `PGT_TIMEOUT_SECS` if set (as for the library's `from_env`), else
/// `--timeout`.
fn rendezvous_timeout(transfer: &TransferArgs) -> Result<Duration> {
    match std::env::var("PGT_TIMEOUT_SECS") {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse::<f64>()
            .ok()
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .with_context(|| format!("PGT_TIMEOUT_SECS={v:?} is not a number of seconds")),
        _ => transfer.timeout(),
    }
}

fn ranks(r: &[u32]) -> String {
    r.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

fn rate(stats: &TransferStats) -> String {
    format!(
        "{} bytes ({}), {} tensors, {:.3} s, {:.2} GB/s",
        stats.bytes,
        human(stats.bytes),
        stats.tensors,
        stats.seconds,
        stats.bytes as f64 / stats.seconds.max(1e-9) / 1e9
    )
}

/// `pgt send FILE --dst 1,2`.
pub fn send(args: SendArgs) -> Result<()> {
    // Bad flags fail before joining. Join, then load: a bad file then fails the whole job at once
    // (TCP peers see the connection close; an MPI job is aborted) instead of leaving the peers
    // waiting for a timeout.
    let options = args.transfer.options()?;
    let pg = args.group.connect(rendezvous_timeout(&args.transfer)?)?;
    let group = args.group.clone();
    // Ended (under MPI) while the group is still up: dropping it would finalise MPI first.
    let result = send_with(&*pg, args, options);
    common::end_job_on_error(&group, result)
}

fn send_with(
    pg: &dyn ProcessGroup,
    mut args: SendArgs,
    mut options: TransportOptions,
) -> Result<()> {
    if args.dst.is_empty() {
        args.dst = (0..pg.size()).filter(|&r| r != pg.rank()).collect();
    }
    ensure!(
        !args.dst.is_empty(),
        "a job of one rank has nobody to send to"
    );
    let mut sd = safetensors_io::load(&args.file)?;
    if args.step.is_some() {
        sd.step = args.step;
    }
    let (progress, bar) = common::progress("send", args.transfer.quiet);
    options.progress = progress;
    let transport = Transport::new(pg, options);
    let result = transport.send_checkpoint(&args.dst, &sd);
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let stats = result.with_context(|| {
        format!(
            "sending {} to rank(s) {}",
            args.file.display(),
            ranks(&args.dst)
        )
    })?;
    if !args.transfer.quiet {
        println!(
            "sent {} to rank(s) {}: {}",
            args.file.display(),
            ranks(&args.dst),
            rate(&stats)
        );
    }
    Ok(())
}

/// `pgt recv --src 0 --out FILE`.
pub fn recv(args: RecvArgs) -> Result<()> {
    let options = args.transfer.options()?; // bad flags fail before joining
    let pg = args.group.connect(rendezvous_timeout(&args.transfer)?)?;
    let group = args.group.clone();
    let result = recv_with(&*pg, args, options);
    common::end_job_on_error(&group, result)
}

fn recv_with(pg: &dyn ProcessGroup, args: RecvArgs, mut options: TransportOptions) -> Result<()> {
    options.expected_step = args.expect_step;
    let out = match args.out.to_str() {
        Some(s) if s.contains("{rank}") => {
            PathBuf::from(s.replace("{rank}", &pg.rank().to_string()))
        }
        _ => args.out.clone(),
    };
    let args = RecvArgs { out, ..args };
    // After joining, so that the sender fails at once instead of waiting at the rendezvous.
    let dir = match args.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    ensure!(
        dir.is_dir(),
        "cannot write {}: {} is not a directory",
        args.out.display(),
        dir.display()
    );
    let (progress, bar) = common::progress("recv", args.transfer.quiet);
    options.progress = progress;
    let transport = Transport::new(pg, options);
    let mut sd = StateDict::new();
    let result = transport.recv_checkpoint_into(args.src, &mut sd);
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let stats = result.with_context(|| format!("receiving from rank {}", args.src))?;
    safetensors_io::save(&sd, &args.out)?;
    if !args.transfer.quiet {
        let step = sd.step.map_or("none".to_string(), |s| s.to_string());
        println!(
            "received {} from rank {} (step {step}): {}",
            args.out.display(),
            args.src,
            rate(&stats)
        );
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// inspect

/// What `pgt inspect` reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Guess from the first bytes (and the `.safetensors` extension).
    Auto,
    /// A header message immediately followed by the metadata message (golden `valid_metadata` and
    /// `malformed` vectors).
    Metadata,
    /// Messages as one receiver gets them: `tag u64 LE | len u64 LE | bytes`, repeated.
    Stream,
    /// A safetensors file.
    Safetensors,
}

/// `pgt inspect` flags.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A pgt metadata blob, a message stream (as in tests/vectors) or a safetensors file.
    pub file: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// What FILE is.
    #[arg(long, value_enum, default_value = "auto")]
    pub format: Format,
    /// Bytes of the header message in a metadata blob (24, unless the file is malformed on purpose).
    #[arg(long)]
    pub header_len: Option<usize>,
    /// Also check the metadata as this receiving rank would (for streams: which receiver to run;
    /// default the first destination).
    #[arg(long)]
    pub rank: Option<u32>,
    /// With --rank: the sender the receiver expects (default: the metadata's source).
    #[arg(long)]
    pub source: Option<u32>,
    /// With --rank or a stream: the step the receiver expects.
    #[arg(long)]
    pub expect_step: Option<u64>,
    /// Override a decoding limit, e.g. `--limit max_leaves=2` (max_metadata_bytes, max_leaves,
    /// max_depth, max_ndim, max_total_bytes, max_messages); repeatable.
    #[arg(long = "limit", value_name = "NAME=N", value_parser = parse_limit)]
    pub limits: Vec<(String, u64)>,
}

fn parse_limit(s: &str) -> Result<(String, u64), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=N"))?;
    let value: u64 = value
        .trim()
        .parse()
        .map_err(|_| format!("{value:?} is not a number"))?;
    let name = name.trim().to_string();
    apply_limit(&mut Limits::default(), &name, value)?;
    Ok((name, value))
}

fn apply_limit(l: &mut Limits, name: &str, value: u64) -> Result<(), String> {
    let small = || u32::try_from(value).map_err(|_| format!("{name}={value} is too large"));
    match name {
        "max_metadata_bytes" => l.max_metadata_bytes = value,
        "max_leaves" => l.max_leaves = value,
        "max_depth" => l.max_depth = small()?,
        "max_ndim" => l.max_ndim = small()?,
        "max_total_bytes" => l.max_total_bytes = value,
        "max_messages" => l.max_messages = value,
        _ => return Err(format!("unknown limit {name:?}")),
    }
    Ok(())
}

impl InspectArgs {
    fn limits(&self) -> Limits {
        let mut l = Limits::default();
        for (name, value) in &self.limits {
            // Checked by the parser.
            let _ = apply_limit(&mut l, name, *value);
        }
        l
    }
}

/// What inspecting found: a JSON report (always, even for malformed input) and the first error.
struct Report {
    json: serde_json::Map<String, Json>,
    error: Option<anyhow::Error>,
}

impl Report {
    fn new(file: &Path, format: &str, file_bytes: u64) -> Report {
        let mut json = serde_json::Map::new();
        json.insert("file".into(), json!(file.display().to_string()));
        json.insert("format".into(), json!(format));
        json.insert("file_bytes".into(), json!(file_bytes));
        Report { json, error: None }
    }

    fn set(&mut self, key: &str, value: Json) {
        self.json.insert(key.into(), value);
    }

    /// Records a pgt-core error (the first one wins).
    fn core_error(&mut self, e: pgt_core::Error) {
        if self.error.is_some() {
            return;
        }
        let debug = format!("{e:?}");
        self.set(
            "error",
            json!({"name": e.name(), "debug": debug, "message": e.to_string()}),
        );
        self.error = Some(anyhow!("{debug}: {e}"));
    }

    /// Records any other error (the first one wins).
    fn other_error(&mut self, e: anyhow::Error) {
        if self.error.is_some() {
            return;
        }
        self.set(
            "error",
            json!({"name": null, "debug": null, "message": format!("{e:#}")}),
        );
        self.error = Some(e);
    }
}

/// `pgt inspect FILE`.
pub fn inspect(args: InspectArgs) -> Result<()> {
    let path = &args.file;
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let file_bytes = file.metadata()?.len();
    let mut head = Vec::new();
    (&mut file).take(24).read_to_end(&mut head)?;
    let format = match args.format {
        Format::Auto => detect(&head, file_bytes, path),
        f => f,
    };
    let mut report = match format {
        Format::Safetensors => inspect_safetensors(path, file_bytes),
        _ => {
            let bytes =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            if format == Format::Stream {
                inspect_stream(path, &bytes, &args)
            } else {
                inspect_blob(path, &bytes, &args)
            }
        }
    };
    report.set("valid", json!(report.error.is_none()));
    let text = if args.json {
        serde_json::to_string_pretty(&Json::Object(report.json.clone()))? + "\n"
    } else {
        render(&report.json)
    };
    // A closed pipe (`pgt inspect … | head`) is not an error worth a panic.
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e).context("cannot write to stdout");
        }
    }
    let name = path.display().to_string();
    match report.error {
        Some(e) if format!("{e:#}").contains(&name) => Err(e),
        Some(e) => Err(e.context(name)),
        None => Ok(()),
    }
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// A stream starts with the header record (tag 1); a safetensors file with its header's size and
/// `{`; anything else is taken for a metadata blob (whose first bytes are the magic, never tag 1).
fn detect(head: &[u8], file_bytes: u64, path: &Path) -> Format {
    if u64_at(head, 0) == Some(TAG_HEADER)
        && u64_at(head, 8).is_some_and(|len| len <= file_bytes - 16)
    {
        return Format::Stream;
    }
    if head.get(8) == Some(&b'{') && u64_at(head, 0).is_some_and(|n| n <= file_bytes - 8) {
        return Format::Safetensors;
    }
    if path.extension().is_some_and(|e| e == "safetensors") {
        return Format::Safetensors;
    }
    Format::Metadata
}

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
    })
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
            leaf_json(&path, leaf)
        })
        .collect();
    report.set("leaves", Json::Array(leaves));
}

fn value_json(v: &Value) -> (Json, &'static str) {
    match v {
        Value::None => (Json::Null, "none"),
        Value::Bool(b) => (json!(b), "bool"),
        Value::Int(i) => (json!(i), "int"),
        Value::Float(f) if f.is_finite() => (json!(f), "float"),
        Value::Float(f) => (json!(value_text(&Value::Float(*f))), "float"),
        Value::Str(s) => (json!(s), "str"),
        // `0x` and the hex digits, as a safetensors metadata entry holds them.
        Value::Bytes(_) => (json!(safetensors_io::value_repr(v)), "bytes"),
    }
}

/// A value as text: strings quoted, floats exact (NaN with its bits).
fn value_text(v: &Value) -> String {
    match v {
        Value::None => "None".into(),
        Value::Bool(b) => if *b { "True" } else { "False" }.into(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) if f.is_nan() => format!("nan (bits 0x{:016x})", f.to_bits()),
        Value::Float(f) => format!("{f:?}"),
        Value::Str(s) => format!("{s:?}"),
        Value::Bytes(_) => format!("bytes {}", safetensors_io::value_repr(v)),
    }
}

fn layout_json(l: &pgt_core::layout::TensorLayout) -> serde_json::Map<String, Json> {
    let mut m = serde_json::Map::new();
    m.insert("dtype".into(), json!(l.dtype.torch_name()));
    m.insert("shape".into(), json!(l.shape));
    m.insert("stride".into(), json!(l.stride));
    m.insert("offset".into(), json!(l.storage_offset));
    m.insert("nbytes".into(), json!(l.nbytes));
    m
}

fn leaf_json(path: &str, leaf: &Leaf) -> Json {
    let mut m = serde_json::Map::new();
    m.insert("path".into(), json!(path));
    m.insert("kind".into(), json!(leaf.kind()));
    match leaf {
        Leaf::Value(v) => {
            let (value, ty) = value_json(v);
            m.insert("value_type".into(), json!(ty));
            m.insert("value".into(), value);
            m.insert("text".into(), json!(value_text(v)));
        }
        Leaf::Tensor(l) => m.extend(layout_json(l)),
        Leaf::DTensor { local, spec } => {
            m.extend(layout_json(local));
            let placements: Vec<String> =
                spec.placements.iter().map(|p| format!("{p:?}")).collect();
            let names = spec
                .mesh
                .dim_names
                .as_ref()
                .map(|n| format!(" ({})", n.join(", ")))
                .unwrap_or_default();
            m.insert(
                "summary".into(),
                json!(format!(
                    "global {:?} {} on {} mesh {:?}{names}: {}",
                    spec.global_shape,
                    spec.dtype,
                    spec.mesh.device_type,
                    spec.mesh.shape,
                    placements.join(", ")
                )),
            );
            m.insert(
                "spec".into(),
                json!({
                    "global_shape": spec.global_shape,
                    "global_stride": spec.global_stride,
                    "dtype": spec.dtype.torch_name(),
                    "placements": placements,
                    "mesh": {
                        "shape": spec.mesh.shape,
                        "ranks": spec.mesh.ranks,
                        "dim_names": spec.mesh.dim_names,
                        "device_type": spec.mesh.device_type,
                    },
                }),
            );
        }
        Leaf::Sharded {
            local_shards,
            global,
        } => {
            m.insert("dtype".into(), json!(global.dtype.torch_name()));
            m.insert("shape".into(), json!(global.global_size));
            let nbytes: u128 = local_shards
                .iter()
                .map(|s| u128::from(s.layout.nbytes))
                .sum();
            m.insert("nbytes".into(), json!(u64::try_from(nbytes).ok()));
            let locals: Vec<String> = local_shards
                .iter()
                .map(|s| {
                    format!(
                        "{:?}+{:?}@{}",
                        s.meta.offsets, s.meta.sizes, s.meta.placement
                    )
                })
                .collect();
            m.insert(
                "summary".into(),
                json!(format!(
                    "{} local of {} shards: {}",
                    local_shards.len(),
                    global.shards.len(),
                    locals.join(", ")
                )),
            );
            m.insert(
                "local_shards".into(),
                Json::Array(
                    local_shards
                        .iter()
                        .map(|s| {
                            let mut j = layout_json(&s.layout);
                            j.insert("offsets".into(), json!(s.meta.offsets));
                            j.insert("sizes".into(), json!(s.meta.sizes));
                            j.insert("placement".into(), json!(s.meta.placement));
                            Json::Object(j)
                        })
                        .collect(),
                ),
            );
            m.insert(
                "global_shards".into(),
                Json::Array(
                    global
                        .shards
                        .iter()
                        .map(|s| json!({"offsets": s.offsets, "sizes": s.sizes, "placement": s.placement}))
                        .collect(),
                ),
            );
        }
    }
    Json::Object(m)
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
fn inspect_blob(path: &Path, bytes: &[u8], args: &InspectArgs) -> Report {
    let mut report = Report::new(path, "metadata", bytes.len() as u64);
    let header_len = args.header_len.unwrap_or(Header::SIZE).min(bytes.len());
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
        None => codec::decode_metadata(m).ok(),
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
/// hashing and keeping every storage's bytes. Returns each storage's path, size and digest.
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
        if op_kind != MessageKind::Trailer && bytes.len() as u64 != op_len {
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
fn inspect_stream(path: &Path, bytes: &[u8], args: &InspectArgs) -> Report {
    let mut report = Report::new(path, "stream", bytes.len() as u64);
    let (records, cut) = parse_records(bytes);
    let kind = |tag: u64| match tag {
        TAG_HEADER => "header",
        TAG_METADATA => "metadata",
        _ => "data/trailer",
    };
    report.set(
        "records",
        Json::Array(
            records
                .iter()
                .map(|(tag, b)| json!({"tag": tag, "len": b.len(), "kind": kind(*tag)}))
                .collect(),
        ),
    );
    if let Some(cut) = cut {
        report.other_error(anyhow!("malformed stream: {cut}"));
    }
    // Header and metadata, shown whatever happens next.
    let header = records.first().filter(|r| r.0 == TAG_HEADER).map(|r| r.1);
    let meta = records.get(1).filter(|r| r.0 == TAG_METADATA).map(|r| r.1);
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
            .or_else(|| codec::decode_metadata(m).ok());
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

/// A safetensors file: its header (via [`safetensors_io::load`], so exactly what `pgt send` would send).
fn inspect_safetensors(path: &Path, file_bytes: u64) -> Report {
    let mut report = Report::new(path, "safetensors", file_bytes);
    let mut head = [0u8; 8];
    if std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
    {
        report.set("header_len", json!(u64::from_le_bytes(head)));
    }
    let sd = match safetensors_io::load(path) {
        Ok(sd) => sd,
        Err(e) => {
            report.other_error(e);
            return report;
        }
    };
    report.set("step", json!(sd.step));
    let entries = sd.entries();
    let mut tensors = 0u64;
    let mut total = 0u64;
    let leaves: Vec<Json> = entries
        .iter()
        .map(|(kp, entry)| {
            let path = kp.to_string();
            let mut j = match entry {
                Entry::Tensor(t) => leaf_json(&path, &Leaf::Tensor(t.layout.clone())),
                other => leaf_json(&path, &other.to_leaf()),
            };
            for t in entry.tensors() {
                tensors += 1;
                total += t.layout.nbytes;
                if let (Storage::Shared(_, range), Json::Object(m)) = (&t.storage, &mut j) {
                    m.insert("file_range".into(), json!([range.start, range.end]));
                    m.insert(
                        "summary".into(),
                        json!(format!("file bytes {}..{}", range.start, range.end)),
                    );
                }
            }
            j
        })
        .collect();
    report.set("tensor_count", json!(tensors));
    report.set("leaf_count", json!(leaves.len()));
    report.set("total_bytes", json!(total));
    report.set("leaves", Json::Array(leaves));
    report
}

// ------------------------------------------------------------------------------------------------
// text rendering

/// Bytes with a binary unit.
fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn list(j: &Json) -> String {
    match j.as_array() {
        Some(a) => format!(
            "[{}]",
            a.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => "-".into(),
    }
}

fn opt(j: &Json) -> String {
    match j {
        Json::Null => "-".into(),
        Json::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The report as aligned text: a block of fields, then one line per leaf.
fn render(r: &serde_json::Map<String, Json>) -> String {
    let get = |k: &str| r.get(k).cloned().unwrap_or(Json::Null);
    let mut fields: Vec<(&str, String)> = Vec::new();
    fields.push((
        "file",
        format!("{} ({} bytes)", opt(&get("file")), opt(&get("file_bytes"))),
    ));
    let format = opt(&get("format"));
    fields.push((
        "format",
        match format.as_str() {
            "metadata" => "pgt header + metadata message".into(),
            "stream" => "pgt message stream (tag | len | bytes records)".into(),
            _ => format.clone(),
        },
    ));
    if let Some(recs) = r.get("records").and_then(Json::as_array) {
        let data = recs
            .iter()
            .filter(|x| x["tag"].as_u64() > Some(TAG_METADATA))
            .count();
        let lens: Vec<String> = recs
            .iter()
            .map(|x| format!("{}:{}", opt(&x["tag"]), opt(&x["len"])))
            .collect();
        fields.push((
            "records",
            format!(
                "{} ({} after the metadata) tag:len {}",
                recs.len(),
                data,
                lens.join(" ")
            ),
        ));
    }
    if let Some(h) = r.get("header") {
        let flags = h["flags"]
            .as_u64()
            .map(|f| {
                let digests = if f & u64::from(pgt_core::header::FLAG_DIGESTS) != 0 {
                    " (digests)"
                } else {
                    ""
                };
                format!("0x{f:04x}{digests}")
            })
            .unwrap_or("-".into());
        fields.push((
            "header",
            format!(
                "{} bytes: magic \"{}\"{}, version {}, flags {}, metadata_len {}, metadata_digest {}",
                opt(&h["len"]),
                opt(&h["magic"]),
                if h["magic_ok"] == json!(true) { "" } else { " (bad)" },
                opt(&h["version"]),
                flags,
                opt(&h["metadata_len"]),
                opt(&h["metadata_digest"]),
            ),
        ));
    }
    if let Some(n) = r.get("header_len").and_then(Json::as_u64) {
        fields.push((
            "header",
            format!(
                "{n} bytes of JSON; tensor data from byte {}",
                n.saturating_add(8)
            ),
        ));
    }
    if let Some(m) = r.get("metadata_bytes") {
        fields.push(("metadata", format!("{} bytes", opt(m))));
    }
    if r.contains_key("step") {
        let step = match get("step") {
            Json::Null => "none".into(),
            s => s.to_string(),
        };
        fields.push(("step", step));
    }
    if let Some(s) = r.get("source") {
        fields.push(("source", opt(s)));
    }
    if let Some(d) = r.get("destinations") {
        fields.push(("destinations", list(d)));
    }
    if let Some(p) = r.get("plan") {
        let size = |j: &Json| match j.as_u64() {
            Some(n) => format!("{n} ({})", human(n)),
            None => "-".into(),
        };
        fields.push((
            "plan",
            format!(
                "fanout {}, bucket_size {}, chunk_size {}",
                opt(&p["fanout"]),
                size(&p["bucket_size"]),
                size(&p["chunk_size"])
            ),
        ));
    }
    if let Some(m) = r.get("messages") {
        fields.push(("messages", opt(m)));
    }
    if let Some(n) = r.get("leaf_count") {
        let storages = r
            .get("storage_count")
            .or(r.get("tensor_count"))
            .map(opt)
            .unwrap_or("-".into());
        fields.push(("leaves", format!("{} ({storages} storages)", opt(n))));
    }
    if let Some(t) = r.get("total_bytes") {
        let human_total = t
            .as_u64()
            .map(|n| format!(" ({})", human(n)))
            .unwrap_or_default();
        fields.push(("total bytes", format!("{}{human_total}", opt(t))));
    }
    if r.get("validated") == Some(&json!(false)) {
        fields.push((
            "validated",
            "no: the metadata decodes but does not validate".into(),
        ));
    }
    if let Some(rx) = r.get("receiver") {
        let received = match r.get("received") {
            Some(Json::Bool(true)) => {
                let n = r
                    .get("received_storages")
                    .and_then(Json::as_array)
                    .map_or(0, Vec::len);
                format!(": received completely, {n} storages verified")
            }
            Some(Json::Bool(false)) => ": failed".into(),
            _ => String::new(),
        };
        fields.push((
            "receiver",
            format!(
                "rank {}, source {}, expected step {}{received}",
                opt(&rx["rank"]),
                opt(&rx["source"]),
                opt(&rx["expected_step"])
            ),
        ));
    }
    let valid = get("valid") == json!(true);
    if let Some(e) = r.get("error") {
        let text = match e["name"].as_str() {
            Some(_) => format!("{}: {}", opt(&e["debug"]), opt(&e["message"])),
            None => opt(&e["message"]),
        };
        fields.push(("error", text));
    } else {
        fields.push(("valid", if valid { "yes".into() } else { "no".into() }));
    }
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in &fields {
        let _ = writeln!(out, "{k:<width$}  {v}");
    }

    let Some(leaves) = r.get("leaves").and_then(Json::as_array) else {
        return out;
    };
    if leaves.is_empty() {
        return out;
    }
    let mut rows: Vec<[String; 8]> = vec![[
        "PATH", "KIND", "DTYPE", "SHAPE", "STRIDE", "OFFSET", "NBYTES", "DETAILS",
    ]
    .map(String::from)];
    for l in leaves {
        let is_value = l["kind"] == json!("value");
        let details = if is_value {
            opt(&l["text"])
        } else {
            l.get("summary").map(opt).unwrap_or_default()
        };
        rows.push([
            opt(&l["path"]),
            opt(&l["kind"]),
            if is_value {
                opt(&l["value_type"])
            } else {
                opt(&l["dtype"])
            },
            if is_value {
                "-".into()
            } else {
                list(&l["shape"])
            },
            list(&l["stride"]),
            opt(&l["offset"]),
            opt(&l["nbytes"]),
            details,
        ]);
    }
    let mut widths = [0usize; 8];
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    out.push('\n');
    for row in &rows {
        let mut line = String::new();
        for (i, (c, w)) in row.iter().zip(widths).enumerate() {
            if i == 7 {
                line.push_str(c);
            } else if (5..=6).contains(&i) {
                let _ = write!(line, "{c:>w$}  ");
            } else {
                let _ = write!(line, "{c:<w$}  ");
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(16 << 20), "16.0 MiB");
    }

    #[test]
    fn detects_formats() {
        let p = Path::new("x.bin");
        let mut stream = 1u64.to_le_bytes().to_vec();
        stream.extend(24u64.to_le_bytes());
        assert_eq!(detect(&stream, 100, p), Format::Stream);
        assert_eq!(
            detect(b"PGT\0\x01\0\x01\0\x10\0\0\0", 40, p),
            Format::Metadata
        );
        assert_eq!(
            detect(b"PGX\0\x01\0\x01\0{\0\0\0", 140, p),
            Format::Metadata
        );
        let mut st = 2u64.to_le_bytes().to_vec();
        st.extend(b"{}");
        assert_eq!(detect(&st, 10, p), Format::Safetensors);
        assert_eq!(
            detect(b"", 0, Path::new("a.safetensors")),
            Format::Safetensors
        );
        assert_eq!(detect(b"", 0, p), Format::Metadata);
    }
}
