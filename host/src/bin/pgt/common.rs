//! What every subcommand shares: rendezvous flags, transfer flags, progress bars, memory figures, and
//! spawning a local job of `pgt` processes.

use std::io::IsTerminal;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pgt_core::schema::{FanOut, PlanParams};
use pgt_host::pg::{ProcessGroup, TcpOptions, TcpProcessGroup};
use pgt_host::transport::{Progress, SenderHash, TransportOptions};

/// Which process group a rank joins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PgArg {
    /// The embedded default: torch-style rendezvous at MASTER_ADDR:MASTER_PORT, authenticated TCP.
    Tcp,
    /// The ranks of an MPI job (run under `mpirun`/`srun`); needs a pgt built with the `mpi`
    /// feature.
    Mpi,
}

/// Where this rank is in the job (torch-style; every flag also reads its environment variable).
#[derive(Args, Clone, Debug)]
pub struct GroupArgs {
    /// Process group: `tcp` (rendezvous flags below) or `mpi` (ranks from the MPI launcher).
    #[arg(long, value_enum, env = "PGT_PG", default_value = "tcp")]
    pub pg: PgArg,
    /// This process's rank (needed for `--pg tcp`).
    #[arg(long, env = "RANK")]
    pub rank: Option<u32>,
    /// Number of ranks in the job (needed for `--pg tcp`).
    #[arg(long, env = "WORLD_SIZE")]
    pub world_size: Option<u32>,
    /// Host of rank 0 (which hosts the rendezvous store).
    #[arg(long, env = "MASTER_ADDR", default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Port of the rendezvous store on rank 0.
    #[arg(long, env = "MASTER_PORT", default_value_t = 29500)]
    pub master_port: u16,
    /// Shared job token: every connection is authenticated with it (needed for `--pg tcp`).
    #[arg(long, env = "PGT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Interface to listen on for peers (default: the one that routes to the master).
    #[arg(long, env = "PGT_LISTEN_HOST")]
    pub listen_host: Option<String>,
}

impl GroupArgs {
    /// Joins the job's process group.
    pub fn connect(&self, timeout: Duration) -> Result<Box<dyn ProcessGroup>> {
        match self.pg {
            PgArg::Tcp => Ok(Box::new(self.connect_tcp(timeout)?)),
            PgArg::Mpi => connect_mpi(),
        }
    }

    fn connect_tcp(&self, timeout: Duration) -> Result<TcpProcessGroup> {
        let (Some(rank), Some(world_size)) = (self.rank, self.world_size) else {
            bail!("--rank and --world-size (RANK, WORLD_SIZE) are needed for --pg tcp");
        };
        let token = self.token.clone().unwrap_or_default();
        if token.is_empty() {
            bail!("the job token is empty: set PGT_TOKEN or --token");
        }
        TcpProcessGroup::connect(TcpOptions {
            master_addr: self.master_addr.clone(),
            master_port: self.master_port,
            rank,
            world_size,
            token: token.into_bytes(),
            timeout,
            listen_host: self.listen_host.clone(),
        })
        .with_context(|| {
            format!(
                "rank {rank} could not join the job at {}:{}",
                self.master_addr, self.master_port
            )
        })
    }
}

/// Under `--pg mpi`, a failure on this rank ends the whole job at once (`MPI_Abort`) rather than
/// leave the other ranks waiting for their timeouts; otherwise gives `result` back.
pub fn end_job_on_error<T>(group: &GroupArgs, result: Result<T>) -> Result<T> {
    #[cfg(feature = "mpi")]
    if let (PgArg::Mpi, Err(e)) = (group.pg, &result) {
        eprintln!("pgt: error: {e:#}");
        pgt_host::pg::mpi::abort_job(1);
    }
    #[cfg(not(feature = "mpi"))]
    let _ = group;
    result
}

#[cfg(feature = "mpi")]
fn connect_mpi() -> Result<Box<dyn ProcessGroup>> {
    let pg = pgt_host::pg::MpiProcessGroup::init().context("joining the MPI job")?;
    Ok(Box::new(pg))
}

#[cfg(not(feature = "mpi"))]
fn connect_mpi() -> Result<Box<dyn ProcessGroup>> {
    bail!("this pgt was built without MPI support: build it with `cargo build --release -p pgt-host --features mpi`")
}

/// Fan-out modes on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FanOutArg {
    /// The sender sends everything to every receiver.
    Direct,
    /// The sender sends once; receivers relay to the next.
    Chain,
}

/// Which protocol engine runs the core.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CoreArg {
    /// pgt-core linked natively.
    Native,
    /// pgt-core compiled to wasm, sandboxed in wasmtime.
    Wasm,
}

/// Where the sender hashes the bytes it sends (`SenderHash`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SenderHashArg {
    /// A thread of its own when the machine has more than one core, else before each send.
    Auto,
    /// The sending thread, right before each send.
    BeforeSend,
    /// A thread of its own, beside the sends.
    OwnThread,
}

/// How transfers run.
#[derive(Args, Clone, Debug)]
pub struct TransferArgs {
    /// Fan-out to several receivers.
    #[arg(long, value_enum, default_value = "chain")]
    pub fanout: FanOutArg,
    /// Storages up to this size are coalesced into buckets of this size (e.g. 1MiB).
    #[arg(long, value_parser = parse_size, default_value = "1MiB")]
    pub bucket_size: u64,
    /// Larger storages travel in chunks of this size (a multiple of 64, at most 1GiB).
    #[arg(long, value_parser = parse_size, default_value = "4MiB")]
    pub chunk_size: u64,
    /// Skip the per-tensor digests.
    #[arg(long)]
    pub no_digests: bool,
    /// Which sender thread hashes the bytes for the digests.
    #[arg(long, value_enum, default_value = "auto")]
    pub sender_hash: SenderHashArg,
    /// Per-operation timeout in seconds: a stalled peer fails the transfer within it.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
    /// Protocol engine.
    #[arg(long, value_enum, default_value = "native")]
    pub core: CoreArg,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

impl TransferArgs {
    /// The timeout as a duration.
    pub fn timeout(&self) -> Result<Duration> {
        Duration::try_from_secs_f64(self.timeout).context("--timeout must be a positive number")
    }

    /// Transport options from the flags.
    pub fn options(&self) -> Result<TransportOptions> {
        let mut options = TransportOptions {
            timeout: self.timeout()?,
            plan: PlanParams {
                fanout: match self.fanout {
                    FanOutArg::Direct => FanOut::Direct,
                    FanOutArg::Chain => FanOut::Chain,
                },
                bucket_size: self.bucket_size,
                chunk_size: self.chunk_size,
            },
            digests: !self.no_digests,
            sender_hash: match self.sender_hash {
                SenderHashArg::Auto => SenderHash::Auto,
                SenderHashArg::BeforeSend => SenderHash::BeforeSend,
                SenderHashArg::OwnThread => SenderHash::OwnThread,
            },
            ..TransportOptions::default()
        };
        options
            .plan
            .validate()
            .context("invalid --bucket-size/--chunk-size")?;
        if self.core == CoreArg::Wasm {
            options.engine = wasm_engine()?;
        }
        Ok(options)
    }

    /// Command-line arguments that reproduce these flags in a child process.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            "--fanout".into(),
            format!("{:?}", self.fanout).to_lowercase(),
            "--bucket-size".into(),
            self.bucket_size.to_string(),
            "--chunk-size".into(),
            self.chunk_size.to_string(),
            "--timeout".into(),
            self.timeout.to_string(),
            "--core".into(),
            format!("{:?}", self.core).to_lowercase(),
            "--sender-hash".into(),
            self.sender_hash
                .to_possible_value()
                .expect("no variant is skipped")
                .get_name()
                .to_owned(),
        ];
        if self.no_digests {
            a.push("--no-digests".into());
        }
        if self.quiet {
            a.push("--quiet".into());
        }
        a
    }
}

#[cfg(feature = "wasm")]
fn wasm_engine() -> Result<Arc<dyn pgt_host::engine::EngineFactory>> {
    Ok(Arc::new(pgt_host::wasm_engine::WasmEngine::new()?))
}

#[cfg(not(feature = "wasm"))]
fn wasm_engine() -> Result<Arc<dyn pgt_host::engine::EngineFactory>> {
    bail!("this pgt was built without the `wasm` feature: --core wasm is not available")
}

/// Parses a byte size: `1048576`, `64KiB`, `16MiB`, `1GiB`, `1.5GB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1u64,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        u => return Err(format!("unknown size unit {u:?}")),
    };
    if num.is_nan() || num < 0.0 {
        return Err(format!("{s:?} is not a size"));
    }
    Ok((num * mult as f64) as u64)
}

/// A progress bar that appears only when stderr is a terminal, `quiet` is off and the transfer has
/// run for more than a second.
pub fn progress(label: &str, quiet: bool) -> (Option<Progress>, Option<ProgressBar>) {
    if quiet || !std::io::stderr().is_terminal() {
        return (None, None);
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(label.to_string());
    let start = Instant::now();
    let shown = Arc::new(Mutex::new(false));
    let b = bar.clone();
    let callback: Progress = Arc::new(move |done, total| {
        b.set_length(total);
        b.set_position(done);
        let mut shown = shown.lock().unwrap_or_else(|p| p.into_inner());
        if !*shown && start.elapsed() > Duration::from_secs(1) {
            *shown = true;
            b.set_draw_target(ProgressDrawTarget::stderr());
        }
    });
    (Some(callback), Some(bar))
}

/// Bytes with a binary unit.
pub fn human(n: u64) -> String {
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

/// Resident set size now, in bytes (Linux `/proc/self/status`).
pub fn rss_bytes() -> u64 {
    status_kib("VmRSS:") * 1024
}

/// Peak resident set size since start or the last [`reset_peak_rss`], in bytes.
pub fn peak_rss_bytes() -> u64 {
    status_kib("VmHWM:") * 1024
}

/// CPU time (user + system, all threads) this process has used so far, in seconds.
pub fn cpu_seconds() -> f64 {
    // SAFETY: `rusage` is plain old data (integers and timevals): all-zero bytes are a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes the struct it is given, which is valid and exclusively borrowed.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Resets the peak RSS counter to the current RSS (Linux ≥ 4.0), so a transfer's growth can be measured.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A free loopback port for a local job's rendezvous.
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("no free loopback port")?;
    Ok(l.local_addr()?.port())
}

/// A fresh random job token.
pub fn random_token() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("OS randomness");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Starts `world` copies of this executable on loopback as one job, rank `r` with `args(r)`; their
/// stdout is piped (each child reports one JSON line).
pub fn spawn_local_job(world: u32, args: impl Fn(u32) -> Vec<String>) -> Result<Vec<Child>> {
    let exe = std::env::current_exe().context("cannot find the pgt executable")?;
    let port = free_port()?;
    let token = random_token();
    let mut children = Vec::new();
    for rank in 0..world {
        let child = Command::new(&exe)
            .args(args(rank))
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("PGT_TOKEN", &token)
            .env("PGT_PG", "tcp")
            .stdout(Stdio::piped())
            // Collected and printed per rank (see `collect_reports`), not interleaved.
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start rank {rank}"))?;
        children.push(child);
    }
    Ok(children)
}

/// Waits for every child, prints what each wrote to stderr with its rank in front, and parses the
/// last stdout line of each as JSON.
pub fn collect_reports(children: Vec<Child>) -> Result<Vec<serde_json::Value>> {
    // Each child on its own thread: a child blocked on a full stderr pipe must not wait for us to
    // finish waiting on another.
    let waiting: Vec<_> = children
        .into_iter()
        .map(|c| std::thread::spawn(move || c.wait_with_output()))
        .collect();
    let mut reports = Vec::new();
    let mut failed = Vec::new();
    for (rank, waiter) in waiting.into_iter().enumerate() {
        let out = waiter
            .join()
            .map_err(|_| anyhow::anyhow!("waiting for rank {rank} panicked"))??;
        for line in String::from_utf8_lossy(&out.stderr).lines() {
            eprintln!("[rank {rank}] {line}");
        }
        if !out.status.success() {
            failed.push(format!("rank {rank} exited with {}", out.status));
            continue;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .last()
            .with_context(|| format!("rank {rank} reported nothing"))?;
        reports.push(
            serde_json::from_str(line).with_context(|| format!("rank {rank} reported {line:?}"))?,
        );
    }
    if !failed.is_empty() {
        bail!("{}", failed.join("; "));
    }
    Ok(reports)
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
}
