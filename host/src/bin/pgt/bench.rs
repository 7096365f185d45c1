//! `pgt bench`: the benchmark scenarios, run as real processes over loopback TCP, and the hidden
//! `pgt worker` that plays one rank of a local job for `bench` and `demo`.
//!
//! Timing: every rank joins the group and prepares (the sender generates the checkpoint, in-place
//! receivers allocate and touch their buffers); the receivers tell the sender they are ready, the
//! sender answers "go" and starts sending. A receiver's `seconds` runs from "go" until
//! `recv_checkpoint` returned —
//! metadata decoded and validated, every storage landed and its digest checked. Afterwards (off the
//! clock) the receiver checks every byte against the generator's pattern: `verified`.
//!
//! Each repetition runs pgt, the scenario's floor (`floor.rs`: the same bytes over the same kind
//! of group and topology, into the same kind of memory, by a plain send/recv loop) and, with digests
//! on, its digest floor (the same loop hashing every byte once per rank), taking turns going first,
//! then raw loopback TCP (`raw_loopback_gbps`); the line reports medians, `ratio_to_floor` = floor
//! seconds / pgt seconds and `ratio_to_digest_floor` = digest floor seconds / pgt seconds. With
//! `--pg tcp` every run is a fresh local job of real processes; with
//! `--pg mpi` the bench runs inside an `mpirun` job whose ranks do every run in turn.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::{Args, ValueEnum};

use pgt_host::memory::BufferPool;
use pgt_host::pg::{raw_loopback_gbps, ProcessGroup};
use pgt_host::state_dict::StateDict;
use pgt_host::synthetic::{self, Shape};
use pgt_host::transport::{digest_gbps, Transport};
use serde_json::{json, Value};

use crate::common::{self, FanOutArg, GroupArgs, PgArg, TransferArgs};
use crate::floor::Floor;

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

    /// This scenario's floor (see `floor.rs`): its storages (or, for the many-leaf dicts, one stream
    /// of all their bytes), in pgt's message sizes, into the same kind of memory; hashed by every
    /// rank when `digests` (the digest floor).
    fn floor(self, bytes: u64, transfer: &TransferArgs, receivers: u32, digests: bool) -> Floor {
        let shape = self.shape(bytes);
        let (regions, message) = match self {
            Scenario::Small | Scenario::SmallInplace => (
                vec![synthetic::total_bytes(&shape) as usize],
                transfer.bucket_size,
            ),
            Scenario::Mixed => (
                vec![synthetic::total_bytes(&shape) as usize],
                transfer.chunk_size,
            ),
            _ => (
                shape
                    .leaves
                    .iter()
                    .flat_map(|l| l.storages())
                    .map(|s| s.nbytes as usize)
                    .collect(),
                transfer.chunk_size,
            ),
        };
        Floor {
            regions,
            message: message as usize,
            fresh: !matches!(
                self,
                Scenario::LargeInplace | Scenario::SmallInplace | Scenario::LargePooled
            ),
            chain: receivers > 1 && transfer.fanout == FanOutArg::Chain,
            digests,
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
    /// Runs (each with a floor run, a digest floor run unless --no-digests, and a raw-TCP
    /// measurement); figures are medians.
    #[arg(long, default_value_t = 3)]
    pub repeat: u32,
    /// Untimed transfers each pgt run makes first, in the same processes: the timed one is then a
    /// long-lived sender's and receiver's steady state (allocator, page tables, caches) rather than
    /// each process's first transfer. The floors are not warmed.
    #[arg(long, default_value_t = 0)]
    pub warmup: u32,
    /// Process group: `tcp` spawns the ranks on loopback; `mpi` is one rank of an `mpirun` job of
    /// receivers + 1 ranks (every rank runs `pgt bench --pg mpi …`; rank 0 prints).
    #[arg(long, value_enum, default_value = "tcp")]
    pub pg: PgArg,
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
    /// Run the scenario's floor (see `floor.rs`) instead of pgt.
    #[arg(long)]
    floor: bool,
    /// With `--floor`: its digest floor.
    #[arg(long, requires = "floor")]
    floor_digests: bool,
    /// Untimed pgt transfers before the timed one (see `pgt bench --warmup`).
    #[arg(long, default_value_t = 0, conflicts_with = "floor")]
    warmup: u32,
    #[command(flatten)]
    group: GroupArgs,
    #[command(flatten)]
    transfer: TransferArgs,
}

/// What one run of a repetition runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunKind {
    /// pgt itself.
    Pgt,
    /// The scenario's floor.
    Floor,
    /// The scenario's floor, hashing every byte once per rank.
    DigestFloor,
}

impl RunKind {
    /// The kinds of a repetition, in the order repetition `rep` runs them: which goes first
    /// rotates, because a run follows the previous one while the kernel (and this VM's host, which
    /// takes freed memory back) still reclaims its gigabyte, which measurably slowed whichever
    /// always came second.
    fn order(rep: u32, digests: bool) -> Vec<RunKind> {
        let mut kinds = vec![RunKind::Pgt, RunKind::Floor];
        if digests {
            kinds.push(RunKind::DigestFloor);
        }
        let first = rep as usize % kinds.len();
        kinds.rotate_left(first);
        kinds
    }
}

/// Runs a local job for `scenario` (pgt, or one of its floors) and returns each rank's report (rank
/// 0 first).
pub fn run_job(
    scenario: Scenario,
    bytes: u64,
    receivers: u32,
    transfer: &TransferArgs,
    kind: RunKind,
    warmup: u32,
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
        match kind {
            RunKind::Pgt => a.extend(["--warmup".into(), warmup.to_string()]),
            RunKind::Floor => a.push("--floor".into()),
            RunKind::DigestFloor => a.extend(["--floor".into(), "--floor-digests".into()]),
        }
        a.extend(transfer.to_args().into_iter().filter(|x| x != "--quiet"));
        a
    })?;
    common::collect_reports(children)
}

/// Every run of one invocation: each repetition is a pgt run, a floor run and (digests on) a digest
/// floor run, taking turns going first, and then a raw loopback measurement, so that all of them see
/// the same machine state.
#[derive(Default)]
struct Runs {
    /// Each pgt run's reports, rank 0 first.
    pgt: Vec<Vec<Value>>,
    /// Each floor run's reports, rank 0 first.
    floor: Vec<Vec<Value>>,
    /// Each digest floor run's reports, rank 0 first.
    digest_floor: Vec<Vec<Value>>,
    raw_gbps: Vec<f64>,
    raw_cpu: Vec<f64>,
}

impl Runs {
    fn push(&mut self, kind: RunKind, reports: Vec<Value>) {
        match kind {
            RunKind::Pgt => self.pgt.push(reports),
            RunKind::Floor => self.floor.push(reports),
            RunKind::DigestFloor => self.digest_floor.push(reports),
        }
    }

    /// Raw loopback TCP (two threads of this process): `raw_loopback_gbps`.
    fn measure_raw(&mut self, bytes: u64) -> Result<()> {
        let cpu_before = common::cpu_seconds();
        self.raw_gbps
            .push(raw_loopback_gbps(bytes).context("measuring raw loopback TCP")?);
        self.raw_cpu.push(common::cpu_seconds() - cpu_before);
        Ok(())
    }
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
    let bytes = synthetic::total_bytes(&args.scenario.shape(args.bytes));
    let runs = match args.pg {
        PgArg::Tcp => {
            let mut runs = Runs::default();
            for rep in 0..args.repeat.max(1) {
                for kind in RunKind::order(rep, !transfer.no_digests) {
                    let reports = run_job(
                        args.scenario,
                        args.bytes,
                        receivers,
                        &transfer,
                        kind,
                        args.warmup,
                    )?;
                    runs.push(kind, reports);
                }
                runs.measure_raw(bytes)?;
            }
            runs
        }
        PgArg::Mpi => {
            // Under MPI the launcher gives the ranks: none of the TCP rendezvous fields are used.
            let group = GroupArgs {
                pg: PgArg::Mpi,
                rank: None,
                world_size: None,
                master_addr: String::new(),
                master_port: 0,
                token: None,
                listen_host: None,
            };
            let runs = common::end_job_on_error(
                &group,
                run_mpi(&args, &group, receivers, &transfer, bytes),
            )?;
            match runs {
                Some(runs) => runs,
                // Not rank 0: rank 0 reports.
                None => return Ok(()),
            }
        }
    };
    report(&args, &transfer, receivers, &runs)
}

/// `--pg mpi`: this process is one rank of the job; every rank runs the same repetitions. Rank 0
/// gathers every rank's reports and gets them back; the other ranks get `None`. The raw measurement
/// is loopback TCP on rank 0 alone (MPI has no "raw" of its own here: the floor is MPI's raw), while
/// the others wait at the next run's barrier.
fn run_mpi(
    args: &BenchArgs,
    group: &GroupArgs,
    receivers: u32,
    transfer: &TransferArgs,
    bytes: u64,
) -> Result<Option<Runs>> {
    let pg = group.connect(Duration::from_secs(120))?;
    let pg: &dyn ProcessGroup = &*pg;
    ensure!(
        pg.size() == receivers + 1,
        "{} needs {} ranks (`mpirun -n {}`), this job has {}",
        args.scenario.name(),
        receivers + 1,
        receivers + 1,
        pg.size()
    );
    let timeout = transfer.timeout()?;
    let mut runs = Runs::default();
    for rep in 0..args.repeat.max(1) {
        // The kinds take turns going first, as with `--pg tcp`.
        for kind in RunKind::order(rep, !transfer.no_digests) {
            let report = match kind {
                RunKind::Pgt => pgt_rank(pg, args.scenario, args.bytes, transfer, args.warmup)?,
                RunKind::Floor | RunKind::DigestFloor => {
                    let digests = kind == RunKind::DigestFloor;
                    let floor = args
                        .scenario
                        .floor(args.bytes, transfer, receivers, digests);
                    floor.run_rank(pg, timeout)?
                }
            };
            if let Some(reports) = gather(pg, report, timeout)? {
                check_verified(&reports)?;
                runs.push(kind, reports);
            }
        }
        if pg.rank() == 0 {
            runs.measure_raw(bytes)?;
        }
    }
    Ok((pg.rank() == 0).then_some(runs))
}

/// Tag of the reports sent to rank 0 under `--pg mpi`.
const REPORT_TAG: u64 = u64::MAX - 3;

/// Every rank's report, rank 0 first, on rank 0 (`None` on the others).
fn gather(pg: &dyn ProcessGroup, report: Value, timeout: Duration) -> Result<Option<Vec<Value>>> {
    if pg.rank() != 0 {
        pg.send(0, REPORT_TAG, &[report.to_string().as_bytes()], timeout)?;
        return Ok(None);
    }
    let mut reports = vec![report];
    for r in 1..pg.size() {
        let bytes = pg.recv_vec(r, REPORT_TAG, 1 << 20, timeout)?;
        reports.push(serde_json::from_slice(&bytes).context("a rank's report")?);
    }
    Ok(Some(reports))
}

fn check_verified(reports: &[Value]) -> Result<()> {
    ensure!(
        verified(reports),
        "a receiver did not verify every byte, or its digest differs from the sender's: {reports:?}"
    );
    Ok(())
}

/// Whether every receiver of one run (rank 0, the sender, first) checked every byte, and, where the
/// sender reports a digest (the digest floor), reports the same.
fn verified(reports: &[Value]) -> bool {
    let digest = reports.first().map_or(&Value::Null, |r| &r["digest"]);
    reports
        .iter()
        .skip(1)
        .all(|r| r["verified"] == json!(true) && (digest.is_null() || r["digest"] == *digest))
}

/// A field of /proc/cpuinfo's first CPU, or `None`.
fn cpuinfo_field(info: &str, name: &str) -> Option<String> {
    info.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim() == name)
        .map(|(_, v)| v.trim().to_string())
}

/// The CPU model (`model name` in /proc/cpuinfo), or "unknown".
fn cpu_model(info: &str) -> String {
    cpuinfo_field(info, "model name").unwrap_or_else(|| "unknown".into())
}

/// The CPU's family, model and stepping (/proc/cpuinfo), which `model name` leaves out on some VMs:
/// this project's "AMD EPYC" VMs have been two CPUs whose XXH3 speeds differ threefold (a Zen 1,
/// family 23 model 1, at 16 GB/s from cache; an earlier one at 48 GB/s).
fn cpu_signature(info: &str) -> String {
    let field = |name| cpuinfo_field(info, name).unwrap_or_else(|| "?".into());
    format!(
        "family {} model {} stepping {}",
        field("cpu family"),
        field("model"),
        field("stepping")
    )
}

/// The one value every report has, or null when they differ or there are none.
fn all_ranks_agree<'v>(mut values: impl Iterator<Item = &'v Value>) -> Value {
    match values.next() {
        Some(first) if values.all(|v| v == first) => first.clone(),
        _ => Value::Null,
    }
}

/// Prints the invocation's line from its runs.
fn report(args: &BenchArgs, transfer: &TransferArgs, receivers: u32, runs: &Runs) -> Result<()> {
    let shape = args.scenario.shape(args.bytes);
    let bytes = synthetic::total_bytes(&shape);
    let raw_gbps = median(runs.raw_gbps.clone());
    let run_seconds: Vec<f64> = runs.pgt.iter().map(|r| slowest_receiver(r)).collect();
    let floor_seconds: Vec<f64> = runs.floor.iter().map(|r| slowest_receiver(r)).collect();
    let digest_floor_seconds: Vec<f64> = runs
        .digest_floor
        .iter()
        .map(|r| slowest_receiver(r))
        .collect();
    let seconds = median(run_seconds.clone());
    let floor = median(floor_seconds.clone());
    // Null without digests: no digest floor ran.
    let digest_floor =
        (!digest_floor_seconds.is_empty()).then(|| median(digest_floor_seconds.clone()));
    let gbps = bytes as f64 / seconds / 1e9;
    let receivers_of = |r: &Vec<Value>| r.iter().skip(1).cloned().collect::<Vec<_>>();
    let all_receivers: Vec<Value> = runs.pgt.iter().flat_map(receivers_of).collect();
    let verified = runs
        .pgt
        .iter()
        .chain(&runs.floor)
        .chain(&runs.digest_floor)
        .all(|r| verified(r));
    let max_of = |reports: &[Value]| {
        reports
            .iter()
            .filter_map(|r| r["rss_growth_bytes"].as_u64())
            .max()
            .unwrap_or(0)
    };
    let receiver_rss = max_of(&all_receivers);
    let senders: Vec<Value> = runs.pgt.iter().filter_map(|r| r.first().cloned()).collect();
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
    let cpu_of = |reports: &[Value]| {
        median(
            reports
                .iter()
                .filter_map(|r| r["cpu_seconds"].as_f64())
                .collect(),
        )
    };
    let total_cpu_of = |runs: &[Vec<Value>]| {
        median(
            runs.iter()
                .map(|r| r.iter().filter_map(|x| x["cpu_seconds"].as_f64()).sum())
                .collect(),
        )
    };
    let (xxh3_hot, xxh3_cold) = digest_gbps();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    // Every byte is hashed once by the sender and once by each receiver; from cache, that is the
    // least the digests can cost here.
    let digests_least = (!transfer.no_digests).then(|| {
        round(
            f64::from(receivers + 1) * bytes as f64 / (xxh3_hot * 1e9),
            6,
        )
    });
    let line = json!({
        "scenario": args.scenario.name(),
        "pg": format!("{:?}", args.pg).to_lowercase(),
        "world_size": receivers + 1,
        "bytes": bytes,
        "tensors": synthetic::storage_count(&shape),
        "seconds": round(seconds, 4),
        "gbps": round(gbps, 3),
        "raw_gbps": round(raw_gbps, 3),
        "ratio": round(gbps / raw_gbps, 3),
        "floor_seconds": round(floor, 4),
        "ratio_to_floor": round(floor / seconds, 3),
        "digest_floor_seconds": digest_floor.map(|f| round(f, 4)),
        "ratio_to_digest_floor": digest_floor.map(|f| round(f / seconds, 3)),
        "sender_rss_growth_bytes": sender_rss,
        "receiver_rss_growth_bytes": receiver_rss,
        "verified": verified,
        "fanout": format!("{:?}", transfer.fanout).to_lowercase(),
        "core": format!("{:?}", transfer.core).to_lowercase(),
        "digests": !transfer.no_digests,
        "sender_hash": transfer.sender_hash.to_possible_value().map(|v| v.get_name().to_owned()),
        "warmup": args.warmup,
        // What the ranks did: every rank of every pgt run reports the transfers it made.
        "transfers_per_run": all_ranks_agree(runs.pgt.iter().flatten().map(|r| &r["transfers"])),
        "metadata_seconds": round(metadata_seconds, 4),
        "staged_copy_seconds": round(staged_copy_seconds, 4),
        "sender_cpu_seconds": round(cpu_of(&senders), 4),
        "receiver_cpu_seconds": round(cpu_of(&all_receivers), 4),
        "total_cpu_seconds": round(total_cpu_of(&runs.pgt), 4),
        "floor_cpu_seconds": round(total_cpu_of(&runs.floor), 4),
        "digest_floor_cpu_seconds": digest_floor.map(|_| round(total_cpu_of(&runs.digest_floor), 4)),
        "raw_cpu_seconds": round(median(runs.raw_cpu.clone()), 4),
        "runs": run_seconds.iter().map(|s| round(*s, 4)).collect::<Vec<_>>(),
        "floor_runs": floor_seconds.iter().map(|s| round(*s, 4)).collect::<Vec<_>>(),
        "digest_floor_runs": digest_floor_seconds.iter().map(|s| round(*s, 4)).collect::<Vec<_>>(),
        "raw_runs": runs.raw_gbps.iter().map(|g| round(*g, 3)).collect::<Vec<_>>(),
        "cpu_model": cpu_model(&cpuinfo),
        "cpu_signature": cpu_signature(&cpuinfo),
        "xxh3_hot_gbps": round(xxh3_hot, 3),
        "xxh3_cold_gbps": round(xxh3_cold, 3),
        "digests_least_cpu_seconds": digests_least,
    });
    if args.json {
        println!("{line}");
    } else {
        println!(
            "{}: {} bytes in {:.3} s = {:.2} GB/s ({:.2}x raw loopback {:.2} GB/s; floor {:.3} s, \
             {:.2}x of it{}), verified: {}",
            args.scenario.name(),
            bytes,
            seconds,
            gbps,
            gbps / raw_gbps,
            raw_gbps,
            floor,
            floor / seconds,
            digest_floor
                .map(|f| format!("; digest floor {f:.3} s, {:.2}x of it", f / seconds))
                .unwrap_or_default(),
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

/// The sender's half of the start barrier: waits until every receiver in `receivers` is ready, then
/// tells each to go.
pub fn sender_barrier(pg: &dyn ProcessGroup, receivers: &[u32], timeout: Duration) -> Result<()> {
    for &d in receivers {
        pg.recv_into(d, READY_TAG, &mut [], timeout)
            .with_context(|| format!("waiting for rank {d} to be ready"))?;
    }
    for &d in receivers {
        pg.send(d, GO_TAG, &[], timeout)?;
    }
    Ok(())
}

/// A receiver's half of the start barrier: says it is ready, waits for "go".
pub fn receiver_barrier(pg: &dyn ProcessGroup, timeout: Duration) -> Result<()> {
    pg.send(0, READY_TAG, &[], timeout)?;
    pg.recv_into(0, GO_TAG, &mut [], timeout)
        .context("waiting for the sender to start")?;
    Ok(())
}

pub fn worker(args: WorkerArgs) -> Result<()> {
    let pg = args.group.connect(Duration::from_secs(120))?;
    let report = if args.floor {
        let receivers = pg.size() - 1;
        let floor = args
            .scenario
            .floor(args.bytes, &args.transfer, receivers, args.floor_digests);
        floor.run_rank(&*pg, args.transfer.timeout()?)?
    } else {
        pgt_rank(&*pg, args.scenario, args.bytes, &args.transfer, args.warmup)?
    };
    println!("{report}");
    if report["verified"] == json!(false) {
        bail!("rank {} did not verify every byte", pg.rank());
    }
    Ok(())
}

/// One rank's part of a pgt run of `scenario` over `pg` (rank 0 sends), after `warmup` untimed
/// transfers; its report.
fn pgt_rank(
    pg: &dyn ProcessGroup,
    scenario: Scenario,
    bytes: u64,
    transfer: &TransferArgs,
    warmup: u32,
) -> Result<Value> {
    let shape = scenario.shape(bytes);
    let options = transfer.options()?;
    let timeout = options.timeout;
    let rank = pg.rank();
    let world = pg.size();
    let rounds = scenario.rounds() + warmup;
    let report = if rank == 0 {
        let sd = synthetic::materialize(&shape)?;
        let dsts: Vec<u32> = (1..world).collect();
        let transport = Transport::new(pg, options);
        let mut report = json!(null);
        for _ in 0..rounds {
            sender_barrier(pg, &dsts, timeout)?;
            common::reset_peak_rss();
            let before = common::rss_bytes();
            let cpu_before = common::cpu_seconds();
            let stats = transport.send_checkpoint(&dsts, &sd)?;
            report = json!({
                "rank": rank,
                "transfers": rounds,
                "seconds": stats.seconds,
                "cpu_seconds": common::cpu_seconds() - cpu_before,
                "bytes": stats.bytes,
                "rss_growth_bytes": common::peak_rss_bytes().saturating_sub(before),
                "peak_rss_bytes": common::peak_rss_bytes(),
            });
        }
        report
    } else {
        let mut target = if scenario.in_place() {
            Some(synthetic::materialize_blank(&shape)?)
        } else {
            None
        };
        let mut options = options;
        options.staged = scenario == Scenario::LargeInplaceStaged;
        let pool =
            (scenario == Scenario::LargePooled).then(|| Arc::new(BufferPool::new(usize::MAX)));
        options.pool = pool.clone();
        let transport = Transport::new(pg, options);
        let mut received = None;
        let mut round_report = json!(null);
        for _ in 0..rounds {
            // The previous round's checkpoint goes before the next round's clock starts: recycled
            // into the pool, or dropped with the pattern's temporary.
            if let (Some(pool), Some(previous)) = (&pool, received.take()) {
                pool.recycle(StateDict::into_buffers(previous));
            }
            common::reset_peak_rss();
            let before = common::rss_bytes();
            receiver_barrier(pg, timeout)?;
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
                "transfers": rounds,
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
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_verifies_only_when_every_receiver_checked_its_bytes_and_has_the_senders_digest() {
        let run = |sender: Value, receivers: &[Value]| {
            let mut reports = vec![json!({"rank": 0, "digest": sender})];
            reports.extend(
                receivers
                    .iter()
                    .map(|r| json!({"verified": r[0], "digest": r[1]})),
            );
            verified(&reports)
        };
        let (d, other) = (json!("00000000000000aa"), json!("00000000000000ab"));
        let (yes, no, null) = (json!(true), json!(false), Value::Null);
        // pgt and the plain floor report no digest.
        assert!(run(null.clone(), &[json!([yes, null])]));
        assert!(!run(null.clone(), &[json!([yes, null]), json!([no, null])]));
        // The digest floor: each receiver's digest must be the sender's.
        assert!(run(d.clone(), &[json!([yes, d]), json!([yes, d])]));
        assert!(!run(d.clone(), &[json!([yes, d]), json!([yes, other])]));
        assert!(!run(d.clone(), &[json!([yes, null])]));
        assert!(!run(d.clone(), &[json!([no, d])]));
    }

    #[test]
    fn each_kind_of_run_goes_first_in_turn() {
        use RunKind::*;
        assert_eq!(RunKind::order(0, false), [Pgt, Floor]);
        assert_eq!(RunKind::order(1, false), [Floor, Pgt]);
        assert_eq!(RunKind::order(2, false), [Pgt, Floor]);
        assert_eq!(RunKind::order(0, true), [Pgt, Floor, DigestFloor]);
        assert_eq!(RunKind::order(1, true), [Floor, DigestFloor, Pgt]);
        assert_eq!(RunKind::order(2, true), [DigestFloor, Pgt, Floor]);
    }
}
