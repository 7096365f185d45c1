//! `pgt`: move model checkpoints between processes — fast, verified, no pickle.
#![deny(clippy::undocumented_unsafe_blocks)]

mod bench;
mod common;
mod demo;
mod floor;
mod inspect;
mod send_recv;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Move model checkpoints between processes over TCP: metadata first, then every tensor's bytes,
/// verified by digest, optionally straight into existing buffers.
#[derive(Parser, Debug)]
#[command(name = "pgt", version, about)]
struct Cli {
    /// More log output (repeat for more); RUST_LOG overrides.
    #[arg(long, short, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Spawn a sender and receivers on loopback, send a generated checkpoint, verify every byte.
    Demo(demo::DemoArgs),
    /// Run a benchmark scenario and print its figures.
    Bench(bench::BenchArgs),
    /// Send a safetensors file to receiving ranks.
    Send(send_recv::SendArgs),
    /// Receive a checkpoint and write it as a safetensors file.
    Recv(send_recv::RecvArgs),
    /// Decode and print a metadata blob, a golden vector or a safetensors file's header.
    Inspect(inspect::InspectArgs),
    /// One rank of a local job started by `demo` or `bench` (internal).
    #[command(hide = true)]
    Worker(bench::WorkerArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Colour only on a terminal (a log file or a pipe gets plain text), and never under NO_COLOR
    // (https://no-color.org: set and not empty).
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && !no_color)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .init();
    let result = match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Send(a) => send_recv::send(a),
        Command::Recv(a) => send_recv::recv(a),
        Command::Inspect(a) => inspect::inspect(a),
        Command::Worker(a) => bench::worker(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One clear line: the context chain, outermost first.
            eprintln!("pgt: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
