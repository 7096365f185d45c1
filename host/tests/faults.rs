//! Real process faults over TCP: `pgt send` and `pgt recv` processes on loopback, one of them killed
//! (SIGKILL) or stopped (SIGSTOP) in the middle of a transfer. Each test asserts who completes (byte
//! for byte), who fails with an error naming which rank, and how long the failure took to surface
//! after the fault (README.md, *Failure behaviour*, has the figures).
//!
//! The fault lands mid-transfer without a sleep: the test polls the receiving end's `/proc/<pid>/io`
//! (`rchar`, the bytes its `read`s returned) and strikes once it has read a sixteenth of the
//! checkpoint, which takes the checkpoint's size well beyond what loopback moves in one poll.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pgt_host::safetensors_io;
use pgt_host::state_dict::StateDict;
use pgt_host::synthetic;

mod hostile;
use hostile::{files_in, free_port};

const PGT: &str = env!("CARGO_BIN_EXE_pgt");
/// No child may run longer than this: a hang fails the test instead of stalling the suite.
const HANG: Duration = Duration::from_secs(60);
/// Every process's `--timeout`, seconds.
const TIMEOUT_SECS: u64 = 5;
/// How long after a fault every affected rank must have failed: the timeout and a second.
const FAIL_WITHIN: Duration = Duration::from_secs(TIMEOUT_SECS + 1);
/// The checkpoint's size: large enough that a fault lands mid-transfer (see the module doc).
const CHECKPOINT_BYTES: u64 = 64 << 20;
/// The received bytes after which a fault strikes.
const STRIKE_AT: u64 = CHECKPOINT_BYTES / 16;

/// One test at a time: the transfers of several at once would share the CPU and blur the timings.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// The checkpoint every test sends: 8 float32 tensors of synthetic data, as a safetensors file
/// written once per test binary.
fn checkpoint_file() -> &'static Path {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        remove_stale_inputs();
        let dir = temp_dir("input");
        let file = dir.join("in.safetensors");
        let sd = synthetic::materialize(&synthetic::large(CHECKPOINT_BYTES, 8)).expect("synthetic");
        safetensors_io::save(&sd, &file).expect("write the checkpoint");
        file
    })
}

/// The checkpoint outlives the tests that share it (nothing runs after the last test): each run
/// removes those of earlier runs whose process is gone (`pgt-faults-input-<pid>-…`).
fn remove_stale_inputs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("pgt-faults-input-")
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "pgt-faults-{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// One job on loopback: a fresh rendezvous (port and token) every time, as a trainer forms a new
/// group after a failure.
struct Job {
    port: u16,
    world: u32,
    token: String,
    fanout: &'static str,
    /// The sender's `--chunk-size` (and `--bucket-size`, which may not exceed it).
    chunk_size: &'static str,
}

impl Job {
    fn new(world: u32, fanout: &'static str) -> Job {
        Job {
            port: free_port(),
            world,
            token: format!("faults-{}-{}", std::process::id(), free_port()),
            fanout,
            chunk_size: "4MiB",
        }
    }

    fn spawn(&self, rank: u32, args: &[&str]) -> Proc {
        let timeout = TIMEOUT_SECS.to_string();
        let mut child = Command::new(PGT)
            .args(args)
            .args(["--fanout", self.fanout, "--timeout", &timeout])
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", self.port.to_string())
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", self.world.to_string())
            .env("PGT_TOKEN", &self.token)
            .env("PGT_TIMEOUT_SECS", "30")
            .env_remove("PGT_LISTEN_HOST")
            .env_remove("RUST_LOG")
            .env_remove("NO_COLOR")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start pgt");
        let read = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = r.read_to_string(&mut s);
                s
            })
        };
        let stdout = read(Box::new(child.stdout.take().expect("stdout")));
        let stderr = read(Box::new(child.stderr.take().expect("stderr")));
        Proc {
            rank,
            child,
            stdout,
            stderr,
        }
    }

    /// `pgt send` of the checkpoint to `dst` as rank 0.
    fn send(&self, dst: &str) -> Proc {
        let file = checkpoint_file().to_str().expect("utf-8 path");
        let chunk = self.chunk_size;
        let sizes = ["--chunk-size", chunk, "--bucket-size", chunk];
        self.spawn(0, &[&["send", file, "--dst", dst][..], &sizes].concat())
    }

    /// `pgt recv` from rank 0 as `rank`, into `<dir>/out{rank}.safetensors`.
    fn recv(&self, rank: u32, dir: &Path) -> Proc {
        let out = out_file(dir, rank);
        self.spawn(
            rank,
            &["recv", "--src", "0", "--out", out.to_str().expect("utf-8")],
        )
    }
}

fn out_file(dir: &Path, rank: u32) -> PathBuf {
    dir.join(format!("out{rank}.safetensors"))
}

/// A running `pgt` process.
struct Proc {
    rank: u32,
    child: Child,
    stdout: std::thread::JoinHandle<String>,
    stderr: std::thread::JoinHandle<String>,
}

/// How a `pgt` process ended, and when.
#[derive(Debug)]
struct Ended {
    rank: u32,
    /// The exit code; `None` when a signal ended it.
    code: Option<i32>,
    stdout: String,
    stderr: String,
    at: Instant,
}

impl Ended {
    fn succeeded(&self) -> bool {
        self.code == Some(0)
    }

    /// Asserts that it failed with a one-line error containing every one of `needles`, within
    /// [`FAIL_WITHIN`] of `fault`; returns how long after the fault it failed.
    fn assert_failed(&self, fault: Instant, needles: &[&str]) -> Duration {
        let after = self.assert_error(fault, needles);
        assert!(
            after < FAIL_WITHIN,
            "rank {} failed {after:?} after the fault",
            self.rank
        );
        after
    }

    /// Asserts that it failed with a one-line error containing every one of `needles`; returns how
    /// long after `fault` it failed.
    fn assert_error(&self, fault: Instant, needles: &[&str]) -> Duration {
        assert_eq!(
            self.code,
            Some(1),
            "rank {} should fail: {self:#?}",
            self.rank
        );
        let error = self
            .stderr
            .lines()
            .find(|l| l.starts_with("pgt: error: "))
            .unwrap_or_else(|| panic!("rank {}: no error line: {self:#?}", self.rank));
        for n in needles {
            assert!(
                error.contains(n),
                "rank {}: {n:?} not in {error:?}",
                self.rank
            );
        }
        let after = self.at.saturating_duration_since(fault);
        eprintln!(
            "rank {} failed {after:.2?} after the fault: {error}",
            self.rank
        );
        after
    }

    /// Asserts that it succeeded and printed its one-line summary (`sent …` or `received …`).
    fn assert_succeeded(&self) {
        assert!(
            self.succeeded(),
            "rank {} should succeed: {self:#?}",
            self.rank
        );
        let summary = if self.rank == 0 { "sent " } else { "received " };
        assert!(
            self.stdout.starts_with(summary) && self.stdout.lines().count() == 1,
            "rank {}: {:?}",
            self.rank,
            self.stdout
        );
    }
}

/// Waits for every process (killing them all and failing after [`HANG`]), noting when each ended.
fn wait_all(procs: Vec<Proc>) -> Vec<Ended> {
    let start = Instant::now();
    let mut procs: Vec<Option<Proc>> = procs.into_iter().map(Some).collect();
    let mut ended: Vec<Option<Ended>> = procs.iter().map(|_| None).collect();
    while ended.iter().any(Option::is_none) {
        for (slot, end) in procs.iter_mut().zip(ended.iter_mut()) {
            let Some(p) = slot else { continue };
            if let Some(status) = p.child.try_wait().expect("try_wait") {
                let at = Instant::now();
                let p = slot.take().expect("proc");
                *end = Some(Ended {
                    rank: p.rank,
                    code: status.code(),
                    stdout: p.stdout.join().expect("stdout reader"),
                    stderr: p.stderr.join().expect("stderr reader"),
                    at,
                });
            }
        }
        if start.elapsed() > HANG {
            for p in procs.iter_mut().flatten() {
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
            panic!("pgt processes still running after {HANG:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    ended.into_iter().map(|e| e.expect("ended")).collect()
}

/// The bytes `pid`'s reads have returned so far (`rchar` of `/proc/<pid>/io`); `None` once it is gone.
fn bytes_read(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("rchar:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Waits until the process `watched` has read [`STRIKE_AT`] bytes, then returns the instant: the
/// transfer is under way. Fails if `watched` ends first or takes longer than [`HANG`].
fn mid_transfer(watched: &mut Proc) -> Instant {
    let start = Instant::now();
    loop {
        match bytes_read(watched.child.id()) {
            Some(n) if n >= STRIKE_AT => return Instant::now(),
            _ => {}
        }
        if let Some(status) = watched.child.try_wait().expect("try_wait") {
            panic!(
                "rank {} ended ({status}) before the transfer was under way",
                watched.rank
            );
        }
        assert!(start.elapsed() < HANG, "the transfer never got under way");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// SIGKILLs `victim` once `watched` has read [`STRIKE_AT`] bytes; returns the instant of the kill.
fn kill_mid_transfer(victim: &mut Proc, watched: &mut Proc) -> Instant {
    mid_transfer(watched);
    victim.child.kill().expect("SIGKILL");
    Instant::now()
}

/// Sends `signal` (e.g. `STOP`) to `p` with kill(1).
fn signal(p: &Proc, signal: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{signal}"), &p.child.id().to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -{signal} {}", p.child.id());
}

/// `out` holds exactly the checkpoint: every tensor, byte for byte.
fn assert_byte_exact(out: &Path) {
    let want = safetensors_io::load(checkpoint_file()).expect("load the input");
    let got = safetensors_io::load(out).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
    assert_same(&want, &got, out);
}

fn assert_same(want: &StateDict<'_>, got: &StateDict<'_>, what: &Path) {
    let want_t = safetensors_io::tensor_names(want);
    assert_eq!(
        want_t.len(),
        safetensors_io::tensor_names(got).len(),
        "{}: tensor count",
        what.display()
    );
    for (name, t) in want_t {
        let u = got
            .tensor(&name)
            .unwrap_or_else(|| panic!("{}: {name} missing", what.display()));
        assert_eq!(u.shape(), t.shape(), "{}: {name}", what.display());
        assert!(
            u.contiguous_bytes().expect("bytes") == t.contiguous_bytes().expect("bytes"),
            "{}: {name} differs",
            what.display()
        );
    }
}

/// No output (nor temporary) file of `ranks` in `dir`.
fn assert_no_output(dir: &Path, ranks: &[u32]) {
    let files = files_in(dir);
    for r in ranks {
        let name = format!("out{r}.safetensors");
        assert!(
            !files.iter().any(|f| f.contains(&name)),
            "rank {r} left {files:?}"
        );
    }
}

/// The sender killed mid-transfer: every receiver fails within the timeout and a second (at once in
/// practice: the connection closes), naming the rank it was receiving from — rank 0; in chain
/// fan-out rank 2 names its upstream, rank 1, which failed and closed the connection first. None
/// writes a file.
fn sender_killed(fanout: &'static str) {
    let _one = one_at_a_time();
    let dir = temp_dir(&format!("sender-killed-{fanout}"));
    let job = Job::new(3, fanout);
    let mut r1 = job.recv(1, &dir);
    let r2 = job.recv(2, &dir);
    let mut sender = job.send("1,2");
    let fault = kill_mid_transfer(&mut sender, &mut r1);
    let ended = wait_all(vec![sender, r1, r2]);
    assert_eq!(
        ended[0].code, None,
        "the sender was killed: {:#?}",
        ended[0]
    );
    ended[1].assert_failed(
        fault,
        &["receiving from rank 0", "rank 0 closed the connection"],
    );
    let upstream = if fanout == "chain" { 1 } else { 0 };
    ended[2].assert_failed(
        fault,
        &[
            "receiving from rank 0",
            &format!("rank {upstream} closed the connection"),
        ],
    );
    assert_no_output(&dir, &[1, 2]);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn sender_killed_direct() {
    sender_killed("direct");
}

#[test]
fn sender_killed_chain() {
    sender_killed("chain");
}

/// Direct fan-out, a receiver killed mid-transfer: the other completes byte for byte; the sender
/// finishes sending to it, then fails naming the destination that failed and the one that
/// completed. Then the recovery a trainer runs: the failed rank's process restarts and joins a new
/// group (a fresh rendezvous), and the sender re-sends to it alone.
#[test]
fn receiver_killed_direct_the_others_complete_and_a_restarted_one_joins_a_new_group() {
    let _one = one_at_a_time();
    let dir = temp_dir("receiver-killed-direct");
    let job = Job::new(3, "direct");
    let r1 = job.recv(1, &dir);
    let mut r2 = job.recv(2, &dir);
    let sender = job.send("1,2");
    let fault = {
        let at = mid_transfer(&mut r2);
        r2.child.kill().expect("SIGKILL");
        at
    };
    let ended = wait_all(vec![sender, r1, r2]);
    let (sender, r1, r2) = (&ended[0], &ended[1], &ended[2]);
    assert_eq!(r2.code, None, "{r2:#?}");
    r1.assert_succeeded();
    assert_byte_exact(&out_file(&dir, 1));
    // The sender reports once it has finished sending to rank 1: right after rank 1 completes.
    sender.assert_error(
        fault,
        &[
            "sent to rank(s) 1 but not to rank(s) 2",
            "rank 2 failed: sending message",
            "to rank 2",
        ],
    );
    let lag = sender.at.saturating_duration_since(r1.at);
    eprintln!("the sender reported {lag:.2?} after rank 1 completed");
    assert!(
        lag < Duration::from_secs(1),
        "the sender reported {lag:?} after rank 1 completed"
    );
    assert_no_output(&dir, &[2]);

    // The restarted process is rank 1 of a new job of two: the sender and it.
    let retry = Job::new(2, "direct");
    let restarted_dir = dir.join("restarted");
    std::fs::create_dir_all(&restarted_dir).expect("dir");
    let started = Instant::now();
    let ended = wait_all(vec![retry.send("1"), retry.recv(1, &restarted_dir)]);
    for e in &ended {
        e.assert_succeeded();
    }
    eprintln!(
        "the re-send to the restarted rank took {:.2?}",
        started.elapsed()
    );
    assert_byte_exact(&out_file(&restarted_dir, 1));
    std::fs::remove_dir_all(&dir).ok();
}

/// Chain fan-out 0 → 1 → 2 → 3, the middle relay (rank 2) killed mid-transfer: rank 1 (upstream)
/// completes byte for byte and warns that its forward failed; rank 3 (downstream) fails at once,
/// naming rank 2; the sender, whose part was to rank 1, completes.
#[test]
fn relay_killed_chain_upstream_completes_downstream_fails_fast() {
    let _one = one_at_a_time();
    let dir = temp_dir("relay-killed-chain");
    let job = Job::new(4, "chain");
    let r1 = job.recv(1, &dir);
    let mut r2 = job.recv(2, &dir);
    let r3 = job.recv(3, &dir);
    let sender = job.send("1,2,3");
    let fault = {
        let at = mid_transfer(&mut r2);
        r2.child.kill().expect("SIGKILL");
        at
    };
    let ended = wait_all(vec![sender, r1, r2, r3]);
    let (sender, r1, r2, r3) = (&ended[0], &ended[1], &ended[2], &ended[3]);
    assert_eq!(r2.code, None, "{r2:#?}");
    sender.assert_succeeded();
    r1.assert_succeeded();
    assert!(
        r1.stderr.contains("forwarding failed") && r1.stderr.contains("rank 2"),
        "rank 1 should warn of its forward: {r1:#?}"
    );
    // Plain text in a pipe: no ANSI colour codes.
    assert!(!r1.stderr.contains('\u{1b}'), "{:?}", r1.stderr);
    assert_byte_exact(&out_file(&dir, 1));
    let after = r3.assert_failed(
        fault,
        &["receiving from rank 0", "rank 2 closed the connection"],
    );
    assert!(
        after < Duration::from_secs(1),
        "rank 3 failed {after:?} after"
    );
    assert_no_output(&dir, &[2, 3]);
    std::fs::remove_dir_all(&dir).ok();
}

/// Chain fan-out 0 → 1 → 2, the first receiver killed: everything rode on it, so the sender fails at
/// once naming it, and rank 2 fails at once naming it too.
#[test]
fn first_receiver_killed_chain_the_sender_names_it() {
    let _one = one_at_a_time();
    let dir = temp_dir("first-killed-chain");
    let job = Job::new(3, "chain");
    let mut r1 = job.recv(1, &dir);
    let r2 = job.recv(2, &dir);
    let sender = job.send("1,2");
    let fault = {
        let at = mid_transfer(&mut r1);
        r1.child.kill().expect("SIGKILL");
        at
    };
    let ended = wait_all(vec![sender, r1, r2]);
    let (sender, r1, r2) = (&ended[0], &ended[1], &ended[2]);
    assert_eq!(r1.code, None, "{r1:#?}");
    let took = sender.assert_failed(fault, &["to rank 1: rank 1 closed the connection"]);
    assert!(took < Duration::from_secs(1), "the sender took {took:?}");
    let took = r2.assert_failed(
        fault,
        &["receiving from rank 0", "rank 1 closed the connection"],
    );
    assert!(took < Duration::from_secs(1), "rank 2 took {took:?}");
    assert_no_output(&dir, &[1, 2]);
    std::fs::remove_dir_all(&dir).ok();
}

/// Sender 0 to ranks 1 and 2 with `fanout`; rank 1 is stopped (SIGSTOP) mid-transfer. Waits for the
/// two live ranks, then resumes and kills rank 1: (the output dir, when rank 1 stopped, how the
/// sender and rank 2 ended).
fn stall_rank_1(
    name: &str,
    fanout: &'static str,
    chunk_size: &'static str,
) -> (PathBuf, Instant, Vec<Ended>) {
    let dir = temp_dir(name);
    let job = Job {
        chunk_size,
        ..Job::new(3, fanout)
    };
    let mut r1 = job.recv(1, &dir);
    let r2 = job.recv(2, &dir);
    let sender = job.send("1,2");
    mid_transfer(&mut r1);
    signal(&r1, "STOP");
    let fault = Instant::now();
    let ended = wait_all(vec![sender, r2]);
    signal(&r1, "CONT");
    r1.child.kill().expect("SIGKILL");
    let _ = r1.child.wait();
    (dir, fault, ended)
}

/// Chain fan-out 0 → 1 → 2, the relay stopped (SIGSTOP) mid-transfer: alive but silent. The sender
/// and rank 2 both fail within the timeout and a second, naming rank 1; then the relay is resumed
/// and killed.
#[test]
fn relay_stalled_chain_fails_within_the_timeout() {
    let _one = one_at_a_time();
    let (dir, fault, live) = stall_rank_1("relay-stalled-chain", "chain", "4MiB");
    // Not before the timeout either: a stall is told from a slow peer only by waiting it out.
    let at_least = Duration::from_secs(TIMEOUT_SECS) - Duration::from_millis(500);
    let took = live[0].assert_failed(fault, &["to rank 1: timed out after 5s", "with rank 1"]);
    assert!(took >= at_least, "the sender failed after {took:?}");
    let took = live[1].assert_failed(
        fault,
        &["receiving from rank 0", "timed out after 5s", "with rank 1"],
    );
    assert!(took >= at_least, "rank 2 failed after {took:?}");
    assert_no_output(&dir, &[1, 2]);
    std::fs::remove_dir_all(&dir).ok();
}

/// Direct fan-out, the first destination stopped (SIGSTOP) mid-transfer: the other completes byte for
/// byte without waiting for it (its digests come from a thread of their own, not from the stalled
/// destination's); the sender fails the stalled one after the timeout, naming it.
#[test]
fn receiver_stalled_direct_the_others_complete() {
    let _one = one_at_a_time();
    // How long rank 2's own transfer took: no bound here (a slow machine is slow), only that it
    // completed.
    receiver_stalled_direct("receiver-stalled-direct", "4MiB");
}

/// As above with 64 KiB chunks: 1,024 data messages per destination, far more than the sender ever
/// got ahead of a destination when its per-destination queue was bounded (256 messages). The
/// stalled destination's queue grows instead of holding up the main thread, so the other completes
/// without waiting out the timeout (before, it stalled with the queue until the stalled send timed
/// out, and timed out itself meanwhile).
#[test]
fn receiver_stalled_direct_with_many_messages_the_others_complete_without_waiting() {
    let _one = one_at_a_time();
    let done = receiver_stalled_direct("receiver-stalled-direct-many", "64KiB");
    assert!(
        done < Duration::from_secs(TIMEOUT_SECS) / 2,
        "rank 2 completed {done:?} after the stall: it waited for the stalled rank"
    );
}

/// Direct fan-out to ranks 1 and 2 in chunks of `chunk_size`, rank 1 stopped mid-transfer: rank 2
/// completes byte-exact and the sender fails rank 1 after the timeout, naming it. Returns when rank
/// 2 completed, counted from the stall.
fn receiver_stalled_direct(name: &str, chunk_size: &'static str) -> Duration {
    let (dir, fault, ended) = stall_rank_1(name, "direct", chunk_size);
    let (sender, r2) = (&ended[0], &ended[1]);
    r2.assert_succeeded();
    let done = r2.at.saturating_duration_since(fault);
    eprintln!("rank 2 completed {done:.2?} after the stall");
    assert_byte_exact(&out_file(&dir, 2));
    sender.assert_failed(
        fault,
        &[
            "sent to rank(s) 2 but not to rank(s) 1",
            "to rank 1: timed out after 5s",
        ],
    );
    assert_no_output(&dir, &[1]);
    std::fs::remove_dir_all(&dir).ok();
    done
}
