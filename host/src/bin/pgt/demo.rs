//! `pgt demo`: the embedded default end to end — a sender and receivers as separate processes on
//! loopback, a generated state dict mixing every leaf kind, every byte verified on every receiver.

use anyhow::{ensure, Context, Result};
use clap::Args;
use pgt_host::pg::raw_loopback_gbps;
use pgt_host::synthetic;

use crate::bench::{run_job, RunKind, Scenario};
use crate::common::{self, TransferArgs};

/// `pgt demo` flags.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Size of the generated checkpoint.
    #[arg(long, value_parser = common::parse_size, default_value = "1GiB")]
    pub size: u64,
    /// Receiving processes.
    #[arg(long, default_value_t = 2)]
    pub receivers: u32,
    #[command(flatten)]
    pub transfer: TransferArgs,
}

pub fn run(args: DemoArgs) -> Result<()> {
    ensure!(args.receivers >= 1, "--receivers must be at least 1");
    // Bad flags fail here, once, rather than in every rank.
    args.transfer.options()?;
    let shape = synthetic::mixed(args.size);
    let bytes = synthetic::total_bytes(&shape);
    let leaves = shape.leaves.len();
    println!(
        "pgt demo: {} leaves ({} storages, {:.1} MiB: plain tensors of 6 dtypes, a strided and an offset view, \
         a 0-dim and a zero-size tensor, DTensors, a ShardedTensor, plain values)",
        leaves,
        synthetic::storage_count(&shape),
        bytes as f64 / (1 << 20) as f64
    );
    println!(
        "  1 sender -> {} receivers over loopback TCP, fan-out {:?}, core {:?}, digests {}",
        args.receivers,
        args.transfer.fanout,
        args.transfer.core,
        if args.transfer.no_digests {
            "off"
        } else {
            "on"
        }
    );
    let raw = raw_loopback_gbps(bytes).context("measuring raw loopback TCP")?;
    let reports = run_job(
        Scenario::Mixed,
        args.size,
        args.receivers,
        &args.transfer,
        RunKind::Pgt,
        0, // no warm-up: the demo shows a first transfer
    )?;
    println!();
    println!(
        "{:>4}  {:<8}  {:>9}  {:>7}  {:>8}  {:>12}  {:>9}",
        "rank", "role", "seconds", "GB/s", "x raw", "peak RSS MiB", "verified"
    );
    let mut all_ok = true;
    for r in &reports {
        let rank = r["rank"].as_u64().unwrap_or(0);
        let seconds = r["seconds"].as_f64().unwrap_or(f64::NAN);
        let gbps = bytes as f64 / seconds / 1e9;
        let verified = match r["verified"].as_bool() {
            Some(v) => {
                all_ok &= v;
                if v {
                    "every byte"
                } else {
                    "FAILED"
                }
            }
            None => "-",
        };
        println!(
            "{:>4}  {:<8}  {:>9.3}  {:>7.2}  {:>8.2}  {:>12.1}  {:>9}",
            rank,
            if rank == 0 { "sender" } else { "receiver" },
            seconds,
            gbps,
            gbps / raw,
            r["peak_rss_bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64,
            verified
        );
    }
    println!("\nraw loopback TCP in this run: {raw:.2} GB/s (one stream, same bytes)");
    ensure!(all_ok, "a receiver did not verify every byte");
    Ok(())
}
