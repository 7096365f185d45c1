//! `pgt bench`: the benchmark scenarios, run as real processes over loopback TCP, and the hidden
//! `pgt worker` that plays one rank of a local job for `bench` and `demo`.
//!
//! Timing: every rank joins the group and prepares (the sender generates the checkpoint, in-place
//! receivers allocate and touch their buffers); the receivers tell the sender they are ready, the
//! sender answers "go" and starts sending. A receiver's `seconds` runs from "go" until
//! `recv_checkpoint` returned —
//! metadata decoded and validated, every storage landed and its digest checked. Afterwards (off the
//! clock) the receiver checks every byte against the generator's pattern: `verified`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::{Args, ValueEnum};

use pgt_host::memory::BufferPool;
use pgt_host::pg::{raw_loopback_gbps, ProcessGroup};
use pgt_host::state_dict::StateDict;
use pgt_host::synthetic::{self, Shape};
use pgt_host::transport::Transport;
use serde_json::json;

use crate::common::{self, FanOutArg, GroupArgs, TransferArgs};

/// Benchmark scenarios.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// 16 float32 tensors totalling `--bytes` (1 GiB), one receiver, fresh buffers.
    Large,
    /// `large`, received into pre-allocated, touched buffers.
    LargeInplace,
    /// `large-inplace`, staged (all or nothing: landed in staging, copied into the buffers once
    /// verified); reports the copy's time as `staged_copy_seconds`.
    LargeInplaceStaged,
    /// `large` to two receivers (chain relay unless `--fanout direct`).
    Fanout,
    /// `large` twice into one receiver process that keeps a `BufferPool`: the second receive, the
    /// one timed, lands in the first one's recycled buffers (a long-lived receiver's steady state).
    LargePooled,
    /// The 10,220-leaf reference dict (10,000 tensors of 1–64 KiB), one receiver.
    Small,
    /// `small`, received in place.
    SmallInplace,
    /// The demo's mixed dict (every leaf kind) of `--bytes`.
    Mixed,
}

impl Scenario {
    fn shape(self, bytes: u64) -> Shape {
        match self {
            Scenario::Large
            | Scenario::LargeInplace
            | Scenario::LargeInplaceStaged
            | Scenario::Fanout
            | Scenario::LargePooled => synthetic::large(bytes, 16),
            Scenario::Small | Scenario::SmallInplace => synthetic::reference(),
            Scenario::Mixed => synthetic::mixed(bytes),
        }
    }

    fn in_place(self) -> bool {
        matches!(
            self,
            Scenario::LargeInplace | Scenario::LargeInplaceStaged | Scenario::SmallInplace
        )
    }

    /// Checkpoints sent per run; the last one is timed.
    fn rounds(self) -> u32 {
        if self == Scenario::LargePooled {
            2
        } else {
            1
        }
    }

    fn receivers(self) -> u32 {
        if self == Scenario::Fanout {
            2
        } else {
            1
        }
    }

    fn name(self) -> String {
        format!("{self:?}")
            .chars()
            .enumerate()
            .flat_map(|(i, c)| {
                let dash = (i > 0 && c.is_ascii_uppercase()).then_some('-');
                dash.into_iter()
                    .chain(std::iter::once(c.to_ascii_lowercase()))
            })
            .collect()
    }
}

/// `pgt bench` flags.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Scenario to run.
    #[arg(long, value_enum)]
    pub scenario: Scenario,
    /// Checkpoint size for the large/fanout/mixed scenarios.
    #[arg(long, value_parser = common::parse_size, default_value = "1GiB")]
    pub bytes: u64,
    /// Receivers (default: 1, or 2 for fanout).
    #[arg(long)]
    pub receivers: Option<u32>,
    /// Print one JSON line (else a short summary).
    #[arg(long)]
    pub json: bool,
    /// Runs (each paired with a raw-TCP measurement); figures are medians.
    #[arg(long, default_value_t = 3)]
    pub repeat: u32,
    #[command(flatten)]
    pub transfer: TransferArgs,
}

/// `pgt worker` flags (internal).
#[derive(Args, Debug)]
pub struct WorkerArgs {
    #[arg(long, value_enum)]
    scenario: Scenario,
    #[arg(long)]
    bytes: u64,
    #[command(flatten)]
    group: GroupArgs,
    #[command(flatten)]
    transfer: TransferArgs,
}

/// Runs a local job for `scenario` and returns each rank's report (rank 0 first).
pub fn run_job(
    scenario: Scenario,
    bytes: u64,
    receivers: u32,
    transfer: &TransferArgs,
) -> Result<Vec<serde_json::Value>> {
    let children = common::spawn_local_job(receivers + 1, |_| {
        let mut a = vec![
            "worker".to_string(),
            "--scenario".into(),
            scenario.name(),
            "--bytes".into(),
            bytes.to_string(),
            "--quiet".into(),
        ];
        a.extend(transfer.to_args().into_iter().filter(|x| x != "--quiet"));
        a
    })?;
    common::collect_reports(children)
}

pub fn run(args: BenchArgs) -> Result<()> {
    // Bad flags fail here, once, rather than in every rank.
    args.transfer.options()?;
    let mut transfer = args.transfer.clone();
    if args.scenario != Scenario::Fanout && args.receivers.unwrap_or(1) == 1 {
        // One receiver: chain and direct are the same plan.
        transfer.fanout = FanOutArg::Direct;
    }
    let receivers = args.receivers.unwrap_or(args.scenario.receivers());
    ensure!(receivers >= 1, "--receivers must be at least 1");
    let shape = args.scenario.shape(args.bytes);
    let bytes = synthetic::total_bytes(&shape);
    // Runs alternate with plain loopback TCP over the same bytes, measured in this invocation, so that
    // both see the same machine state; the figures are medians over the runs (a 2-core machine is noisy).
    let mut raws = Vec::new();
    let mut raw_cpus = Vec::new();
    let mut runs = Vec::new();
    for _ in 0..args.repeat.max(1) {
        // The raw transfer's two threads are all this process runs meanwhile.
        let cpu_before = common::cpu_seconds();
        raws.push(raw_loopback_gbps(bytes).context("measuring raw loopback TCP")?);
        raw_cpus.push(common::cpu_seconds() - cpu_before);
        runs.push(run_job(args.scenario, args.bytes, receivers, &transfer)?);
    }
    let raw_gbps = median(raws.clone());
    let run_seconds: Vec<f64> = runs.iter().map(|r| slowest_receiver(r)).collect();
    let seconds = median(run_seconds.clone());
    let gbps = bytes as f64 / seconds / 1e9;
    let receivers_of = |r: &Vec<serde_json::Value>| r.iter().skip(1).cloned().collect::<Vec<_>>();
    let all_receivers: Vec<serde_json::Value> = runs.iter().flat_map(receivers_of).collect();
    let verified = all_receivers
        .iter()
        .all(|r| r["verified"].as_bool() == Some(true));
    let max_of = |reports: &[serde_json::Value]| {
        reports
            .iter()
            .filter_map(|r| r["rss_growth_bytes"].as_u64())
            .max()
            .unwrap_or(0)
    };
    let receiver_rss = max_of(&all_receivers);
    let senders: Vec<serde_json::Value> = runs.iter().filter_map(|r| r.first().cloned()).collect();
    let sender_rss = max_of(&senders);
    let metadata_seconds = median(
        all_receivers
            .iter()
            .filter_map(|r| r["metadata_seconds"].as_f64())
            .collect(),
    );
    let staged_copy_seconds = median(
        all_receivers
            .iter()
            .filter_map(|r| r["staged_copy_seconds"].as_f64())
            .collect(),
    );
    // CPU seconds (all threads) over the timed window: on a CPU-bound machine they say where time goes.
    let cpu_of = |reports: &[serde_json::Value]| {
        median(
            reports
                .iter()
                .filter_map(|r| r["cpu_seconds"].as_f64())
                .collect(),
        )
    };
    let total_cpu = median(
        runs.iter()
            .map(|r| r.iter().filter_map(|x| x["cpu_seconds"].as_f64()).sum())
            .collect(),
    );
    let line = json!({
        "scenario": args.scenario.name(),
        "world_size": receivers + 1,
        "bytes": bytes,
        "tensors": synthetic::storage_count(&shape),
        "seconds": round(seconds, 4),
        "gbps": round(gbps, 3),
        "raw_gbps": round(raw_gbps, 3),
        "ratio": round(gbps / raw_gbps, 3),
        "sender_rss_growth_bytes": sender_rss,
        "receiver_rss_growth_bytes": receiver_rss,
        "verified": verified,
        "fanout": format!("{:?}", transfer.fanout).to_lowercase(),
        "core": format!("{:?}", transfer.core).to_lowercase(),
        "digests": !transfer.no_digests,
        "metadata_seconds": round(metadata_seconds, 4),
        "staged_copy_seconds": round(staged_copy_seconds, 4),
        "sender_cpu_seconds": round(cpu_of(&senders), 4),
        "receiver_cpu_seconds": round(cpu_of(&all_receivers), 4),
        "total_cpu_seconds": round(total_cpu, 4),
        "raw_cpu_seconds": round(median(raw_cpus), 4),
        "runs": run_seconds.iter().map(|s| round(*s, 4)).collect::<Vec<_>>(),
        "raw_runs": raws.iter().map(|g| round(*g, 3)).collect::<Vec<_>>(),
    });
    if args.json {
        println!("{line}");
    } else {
        println!(
            "{}: {} bytes in {:.3} s = {:.2} GB/s ({:.2}x raw loopback {:.2} GB/s), verified: {}",
            args.scenario.name(),
            bytes,
            seconds,
            gbps,
            gbps / raw_gbps,
            raw_gbps,
            verified
        );
    }
    ensure!(verified, "a receiver did not verify every byte");
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The slowest receiver's seconds in one run's reports (rank 0, the sender, first).
fn slowest_receiver(reports: &[serde_json::Value]) -> f64 {
    reports
        .iter()
        .skip(1)
        .filter_map(|r| r["seconds"].as_f64())
        .fold(0.0, f64::max)
}

fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

/// Tags of the start barrier, far above the transfer's tags (3 + message index): each receiver tells the
/// sender it is ready (buffers allocated), and the sender answers "go" to all once every one is.
const READY_TAG: u64 = u64::MAX - 1;
const GO_TAG: u64 = u64::MAX - 2;

pub fn worker(args: WorkerArgs) -> Result<()> {
    let shape = args.scenario.shape(args.bytes);
    let options = args.transfer.options()?;
    let timeout = options.timeout;
    let pg = args.group.connect(Duration::from_secs(120))?;
    let rank = pg.rank();
    let world = pg.size();
    let rounds = args.scenario.rounds();
    let report = if rank == 0 {
        let sd = synthetic::materialize(&shape)?;
        let dsts: Vec<u32> = (1..world).collect();
        let transport = Transport::new(pg, options);
        let mut report = json!(null);
        for _ in 0..rounds {
            for &d in &dsts {
                let mut ready = [0u8; 0];
                transport
                    .process_group()
                    .recv_into(d, READY_TAG, &mut [&mut ready[..]], timeout)
                    .with_context(|| format!("waiting for rank {d} to be ready"))?;
            }
            for &d in &dsts {
                transport.process_group().send(d, GO_TAG, &[], timeout)?;
            }
            common::reset_peak_rss();
            let before = common::rss_bytes();
            let cpu_before = common::cpu_seconds();
            let stats = transport.send_checkpoint(&dsts, &sd)?;
            report = json!({
                "rank": rank,
                "seconds": stats.seconds,
                "cpu_seconds": common::cpu_seconds() - cpu_before,
                "bytes": stats.bytes,
                "rss_growth_bytes": common::peak_rss_bytes().saturating_sub(before),
                "peak_rss_bytes": common::peak_rss_bytes(),
            });
        }
        report
    } else {
        let mut target = if args.scenario.in_place() {
            Some(synthetic::materialize_blank(&shape)?)
        } else {
            None
        };
        let mut options = options;
        options.staged = args.scenario == Scenario::LargeInplaceStaged;
        let pool =
            (args.scenario == Scenario::LargePooled).then(|| Arc::new(BufferPool::new(usize::MAX)));
        options.pool = pool.clone();
        let transport = Transport::new(pg, options);
        let mut received = None;
        let mut round_report = json!(null);
        for _ in 0..rounds {
            if let (Some(pool), Some(previous)) = (&pool, received.take()) {
                pool.recycle(StateDict::into_buffers(previous));
            }
            common::reset_peak_rss();
            let before = common::rss_bytes();
            transport.process_group().send(0, READY_TAG, &[], timeout)?;
            let mut go = [0u8; 0];
            transport
                .process_group()
                .recv_into(0, GO_TAG, &mut [&mut go[..]], timeout)
                .context("waiting for the sender to start")?;
            let start = Instant::now();
            let cpu_before = common::cpu_seconds();
            let (metadata_seconds, staged_copy_seconds) = match target.as_mut() {
                Some(t) => {
                    let stats = transport.recv_checkpoint_into(0, t)?;
                    (stats.metadata_seconds, stats.staged_copy_seconds)
                }
                None => {
                    received = Some(transport.recv_checkpoint(0)?);
                    (0.0, 0.0)
                }
            };
            round_report = json!({
                "rank": rank,
                "seconds": start.elapsed().as_secs_f64(),
                "metadata_seconds": metadata_seconds,
                "staged_copy_seconds": staged_copy_seconds,
                "cpu_seconds": common::cpu_seconds() - cpu_before,
                "rss_growth_bytes": common::peak_rss_bytes().saturating_sub(before),
                "peak_rss_bytes": common::peak_rss_bytes(),
            });
        }
        let sd = received
            .as_ref()
            .or(target.as_ref())
            .context("nothing received")?;
        let verified = synthetic::verify(sd, &shape);
        if let Err(e) = &verified {
            eprintln!("rank {rank}: verification failed: {e:#}");
        }
        round_report["bytes"] = json!(synthetic::total_bytes(&shape));
        round_report["verified"] = json!(verified.is_ok());
        round_report["verified_bytes"] = json!(verified.as_ref().ok());
        round_report
    };
    println!("{report}");
    if report["verified"] == json!(false) {
        bail!("rank {rank} did not verify every byte");
    }
    Ok(())
}
