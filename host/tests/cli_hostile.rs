//! `pgt recv` fed what a hostile (or careless) sender can send in valid metadata: a view that writes
//! terabytes out of 4 bytes, a value whose safetensors header the library refuses to load, DTensors and
//! ShardedTensors placed on ranks outside the job. The sender is this test, rank 0 of a real TCP job
//! (`Transport::send_checkpoint` with hand-built tensors); the receiver is a `pgt recv` process. Each
//! case must end with a one-line named error and a non-zero exit, leave no file (and no temporary
//! file) behind, and keep the receiver's memory small.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pgt_core::dtype::DType;
use pgt_core::sharded::{ShardMetadata, ShardedTensorMetadata};
use pgt_core::tree::Value;
use pgt_host::pg::{TcpOptions, TcpProcessGroup};
use pgt_host::safetensors_io;
use pgt_host::state_dict::{Entry, StateDict};
use pgt_host::transport::{Transport, TransportOptions};

mod hostile;
use hostile::{broadcast, f32s, files_in, free_port, row_sharded_spec, wait_with_rusage};

const PGT: &str = env!("CARGO_BIN_EXE_pgt");
/// No child may run longer than this: a hang fails the test instead of stalling the suite.
const HANG: Duration = Duration::from_secs(90);

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "pgt-hostile-{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// How a `pgt recv` ended.
#[derive(Debug)]
struct Ended {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    /// Peak resident memory of the process, KiB (its own `rusage`, from `wait4`).
    max_rss_kib: i64,
}

/// Waits for `child` (killing it and failing after [`HANG`]), with its own peak memory.
fn wait(mut child: Child) -> Ended {
    let read = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = read(Box::new(child.stdout.take().expect("stdout")));
    let err = read(Box::new(child.stderr.take().expect("stderr")));
    let start = Instant::now();
    let (status, rusage) = wait_with_rusage(&mut child, start, HANG);
    Ended {
        code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
        max_rss_kib: rusage.ru_maxrss,
    }
}

/// Runs `pgt recv --src 0 --out <dir>/out.safetensors` as rank 1 of a 2-rank job and sends it `sd` from
/// this process as rank 0. Returns how the receiver ended and the directory.
fn send_to_pgt_recv(name: &str, sd: &StateDict<'_>) -> (Ended, PathBuf) {
    let dir = temp_dir(name);
    let out = dir.join("out.safetensors");
    let port = free_port();
    let token = format!("hostile-{}", std::process::id());
    let child = Command::new(PGT)
        .args([
            "recv",
            "--src",
            "0",
            "--out",
            out.to_str().expect("utf-8 path"),
        ])
        .args(["--timeout", "60", "--quiet"])
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("RANK", "1")
        .env("WORLD_SIZE", "2")
        .env("PGT_TOKEN", &token)
        .env("PGT_TIMEOUT_SECS", "60")
        .env_remove("PGT_LISTEN_HOST")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pgt recv");
    let pg = TcpProcessGroup::connect(TcpOptions {
        master_addr: "127.0.0.1".into(),
        master_port: port,
        rank: 0,
        world_size: 2,
        token: token.into_bytes(),
        timeout: Duration::from_secs(60),
        listen_host: None,
    })
    .expect("rank 0 joins");
    let options = TransportOptions {
        timeout: Duration::from_secs(60),
        ..TransportOptions::default()
    };
    // The receiver fails only after everything arrived: the send itself succeeds.
    Transport::new(pg, options)
        .send_checkpoint(&[1], sd)
        .expect("send");
    (wait(child), dir)
}

/// Asserts that the receiver failed with `want` in its one-line error and left nothing in `dir`.
#[track_caller]
fn assert_refused(ended: &Ended, dir: &Path, want: &[&str]) {
    assert_eq!(ended.code, Some(1), "{ended:?}");
    assert_eq!(ended.stdout, "", "{ended:?}");
    let line = ended.stderr.trim_end();
    assert!(
        line.starts_with("pgt: error: ") && !line.contains('\n'),
        "{ended:?}"
    );
    for w in want {
        assert!(line.contains(w), "{w:?} not in {line:?}");
    }
    assert!(files_in(dir).is_empty(), "left behind: {:?}", files_in(dir));
    eprintln!("{line} (peak {} KiB)", ended.max_rss_kib);
}

#[test]
fn a_view_that_would_write_terabytes_is_refused() {
    // 4 bytes of storage broadcast to [2^20, 2^20]: valid metadata, 4 TiB written out (issue 10 #2:
    // the receiver used to abort trying to allocate it, leaving its temporary file).
    let mut sd = StateDict::new();
    sd.insert("model.weight", Entry::Tensor(f32s(&[4, 4])))
        .unwrap();
    sd.insert("model.bias", Entry::Tensor(broadcast(&[1 << 20, 1 << 20])))
        .unwrap();
    let (ended, dir) = send_to_pgt_recv("view-4tib", &sd);
    assert_refused(
        &ended,
        &dir,
        &[
            "model.bias: writing the view out takes 4398046511104 bytes",
            "more than the 67108868 allowed",
        ],
    );
    assert!(ended.max_rss_kib < 256 << 10, "{} KiB", ended.max_rss_kib);
    // 256 MiB out of 4 bytes: refused too.
    let mut sd = StateDict::new();
    sd.insert("b", Entry::Tensor(broadcast(&[1 << 13, 1 << 13])))
        .unwrap();
    let (ended, dir2) = send_to_pgt_recv("view-256mib", &sd);
    assert_refused(
        &ended,
        &dir2,
        &["b: writing the view out takes 268435456 bytes"],
    );
    assert!(ended.max_rss_kib < 256 << 10, "{} KiB", ended.max_rss_kib);
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_dir_all(&dir2).ok();
}

#[test]
fn a_header_the_safetensors_library_refuses_is_not_written() {
    // A 20 MB string of control characters: JSON writes each as `\u0001`, a 120 MB header, which the
    // safetensors library refuses to load ("header too large"; issue 10 #7: pgt recv wrote it and
    // exited 0).
    let mut sd = StateDict::new();
    sd.insert("w", Entry::Tensor(f32s(&[2]))).unwrap();
    sd.insert("note", Entry::Value(Value::Str("\u{1}".repeat(20_000_000))))
        .unwrap();
    let (ended, dir) = send_to_pgt_recv("header", &sd);
    assert_refused(
        &ended,
        &dir,
        &[
            "out.safetensors: the safetensors header would be 12000",
            "more than the 100000000 the safetensors library loads",
        ],
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A DTensor `[4, 2]` sharded on rows over a 2-rank mesh of `ranks`, and a ShardedTensor `[4, 2]` in two
/// row shards on ranks 0 and `other`.
fn distributed(ranks: [u64; 2], other: u64) -> StateDict<'static> {
    let mut sd = StateDict::new();
    let spec = row_sharded_spec(ranks);
    sd.insert(
        "d",
        Entry::DTensor {
            local: f32s(&[2, 2]),
            spec,
        },
    )
    .unwrap();
    let shard = |row: u64, rank: u64| ShardMetadata {
        offsets: vec![row, 0],
        sizes: vec![2, 2],
        placement: format!("rank:{rank}/cpu"),
    };
    sd.insert(
        "s",
        Entry::Sharded {
            local_shards: vec![(f32s(&[2, 2]), shard(0, 0))],
            global: ShardedTensorMetadata {
                shards: vec![shard(0, 0), shard(2, other)],
                global_size: vec![4, 2],
                dtype: DType::Float32,
            },
        },
    )
    .unwrap();
    sd
}

#[test]
fn ranks_outside_the_job_are_refused() {
    // Inside the 2-rank job: received and written.
    let (ended, dir) = send_to_pgt_recv("ranks-ok", &distributed([0, 1], 1));
    assert_eq!(ended.code, Some(0), "{ended:?}");
    let got = safetensors_io::load(dir.join("out.safetensors")).unwrap();
    assert!(got.tensor("d").is_some() && got.tensor("s.shard0").is_some());
    std::fs::remove_dir_all(&dir).ok();
    // A mesh naming rank 5 (issue 10 #9: torch refuses such a mesh in a 2-rank world).
    let (ended, dir) = send_to_pgt_recv("mesh-rank", &distributed([0, 5], 1));
    assert_refused(
        &ended,
        &dir,
        &["['d']: refusing the checkpoint: device mesh names rank 5, outside the process group of 2 ranks"],
    );
    std::fs::remove_dir_all(&dir).ok();
    // A shard placed on rank 7.
    let (ended, dir) = send_to_pgt_recv("placement-rank", &distributed([0, 1], 7));
    assert_refused(
        &ended,
        &dir,
        &["['s']: refusing the checkpoint: shard placed on rank 7, outside the process group of 2 ranks"],
    );
    std::fs::remove_dir_all(&dir).ok();
}
