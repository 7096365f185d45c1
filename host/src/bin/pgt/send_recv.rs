//! `pgt send` and `pgt recv`: a safetensors file from one rank of a job to others.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use clap::Args;
use pgt_core::header::Limits;
use pgt_host::pg::ProcessGroup;
use pgt_host::safetensors_io;
use pgt_host::state_dict::{Entry, StateDict};
use pgt_host::transport::{TransferStats, Transport, TransportOptions};

use crate::common::{self, human, parse_size, GroupArgs, TransferArgs};

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
    /// The most memory the receive may take (e.g. 8GiB): the metadata decoded and the checkpoint's
    /// storages, checked before anything is allocated. Default: half of physical memory.
    #[arg(long, value_parser = parse_size)]
    pub memory_budget: Option<u64>,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub group: GroupArgs,
    #[command(flatten)]
    pub transfer: TransferArgs,
}

/// The receiver's caps on untrusted metadata (PROTOCOL.md §11, *Limits*); each defaults to the
/// protocol's default.
#[derive(Args, Debug)]
pub struct LimitArgs {
    /// Largest metadata accepted (e.g. 64MiB), checked from the header before it is received.
    #[arg(long, value_parser = parse_size, default_value_t = Limits::default().max_metadata_bytes)]
    pub max_metadata_bytes: u64,
    /// Most leaves (tensors and values) in a checkpoint.
    #[arg(long, default_value_t = Limits::default().max_leaves)]
    pub max_leaves: u64,
    /// Deepest nesting of dicts, lists and tuples.
    #[arg(long, default_value_t = Limits::default().max_depth)]
    pub max_depth: u32,
    /// Most dimensions of a tensor, global shape or device mesh.
    #[arg(long, default_value_t = Limits::default().max_ndim)]
    pub max_ndim: u32,
    /// Most tensor bytes in a checkpoint (bytes, or e.g. 512GiB).
    #[arg(long, value_parser = parse_size, default_value_t = Limits::default().max_total_bytes)]
    pub max_total_bytes: u64,
    /// Most data messages in a transfer's plan.
    #[arg(long, default_value_t = Limits::default().max_messages)]
    pub max_messages: u64,
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        Limits {
            max_metadata_bytes: self.max_metadata_bytes,
            max_leaves: self.max_leaves,
            max_depth: self.max_depth,
            max_ndim: self.max_ndim,
            max_total_bytes: self.max_total_bytes,
            max_messages: self.max_messages,
        }
    }
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
    options.limits = args.limits.limits();
    if let Some(budget) = args.memory_budget {
        options.memory_budget = budget;
    }
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
    check_ranks(&sd, pg.size())?;
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

/// Torch's rules that need the process group's size, which validation does not know (PROTOCOL.md
/// §11, *Checks beyond validation*): every DTensor mesh rank and ShardedTensor placement is a rank of
/// this job.
fn check_ranks(sd: &StateDict<'_>, world_size: u32) -> Result<()> {
    for (path, entry) in sd.entries() {
        let checked = match entry {
            Entry::DTensor { spec, .. } => spec.mesh.check_world_size(world_size.into()),
            Entry::Sharded { global, .. } => global.check_world_size(world_size.into()),
            _ => Ok(()),
        };
        checked.with_context(|| format!("{path}: refusing the checkpoint"))?;
    }
    Ok(())
}
