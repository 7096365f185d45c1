//! `pgt recv` against a sender that announces more than it sends, or sends metadata that decodes to much
//! more than its size (issue 10 #3 and #4): a receiver's memory follows the data, within a budget, and
//! hostile metadata is refused before it is decoded. The sender is this test, rank 0 of a real TCP job,
//! sending a raw header and metadata message (and nothing else); the receiver is a `pgt recv` process,
//! whose peak resident memory (`rusage`) each case bounds.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pgt_core::codec;
use pgt_core::digest::digest;
use pgt_core::dtype::DType;
use pgt_core::header::{Header, FLAG_DIGESTS, VERSION};
use pgt_core::layout::TensorLayout;
use pgt_core::scan::decoded_size_budget;
use pgt_core::schema::PlanParams;
use pgt_core::tree::{Key, Leaf, Node};
use pgt_host::pg::{ProcessGroup, TcpOptions, TcpProcessGroup};

mod hostile;
use hostile::{deep_nones, encode, free_port, lists_of_values, varint, wait_with_rusage};

const PGT: &str = env!("CARGO_BIN_EXE_pgt");
/// No child may run longer than this: a hang fails the test instead of stalling the suite.
const HANG: Duration = Duration::from_secs(90);
/// The receiver's `--timeout` where it waits for data that never comes; elsewhere it is 60 s, and
/// each refusal comes long before it.
const TIMEOUT_SECS: u64 = 3;
const MIB: i64 = 1 << 10; // in KiB, as rusage counts

/// How a `pgt recv` ended.
#[derive(Debug)]
struct Ended {
    code: Option<i32>,
    stderr: String,
    /// Peak resident memory of the process, KiB (its own `rusage`, from `wait4`).
    max_rss_kib: i64,
    /// From the metadata's send until it exited.
    seconds: f64,
}

/// Waits for `child` (killing it and failing after [`HANG`]), with its own peak memory.
fn wait(mut child: Child, start: Instant) -> Ended {
    let mut err = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let (status, rusage) = wait_with_rusage(&mut child, start, HANG);
    Ended {
        code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        stderr: reader.join().expect("stderr reader"),
        max_rss_kib: rusage.ru_maxrss,
        seconds: start.elapsed().as_secs_f64(),
    }
}

/// Runs `pgt recv` (with `extra` flags) as rank 1 of a 2-rank job and sends it, as rank 0, a header
/// announcing `metadata` (digests on), then `metadata`, and nothing else.
fn send_raw(name: &str, metadata: &[u8], extra: &[&str]) -> Ended {
    send_raw_waiting(name, metadata, extra, 60)
}

/// [`send_raw`] to a receiver that waits `timeout` seconds for a message.
fn send_raw_waiting(name: &str, metadata: &[u8], extra: &[&str], timeout: u64) -> Ended {
    let dir = std::env::temp_dir().join(format!("pgt-budget-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let port = free_port();
    let token = format!("budget-{}", std::process::id());
    let child = Command::new(PGT)
        .args(["recv", "--src", "0", "--quiet", "--out"])
        .arg(dir.join("out.safetensors"))
        .args(["--timeout", &timeout.to_string()])
        .args(extra)
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("RANK", "1")
        .env("WORLD_SIZE", "2")
        .env("PGT_TOKEN", &token)
        .env("PGT_TIMEOUT_SECS", "60")
        .env_remove("PGT_LISTEN_HOST")
        .env_remove("RUST_LOG")
        // A backtrace of the error would be symbolized from the debug build's 200 MB of debug info.
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
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
    const TRANSFER: u64 = 7;
    let header = Header {
        version: VERSION,
        flags: FLAG_DIGESTS,
        metadata_len: metadata.len() as u64,
        metadata_digest: digest(metadata),
        transfer_id: TRANSFER,
    };
    let t = Duration::from_secs(60);
    pg.send(1, 1, &[&header.to_bytes()], t)
        .expect("send header");
    let start = Instant::now();
    // The metadata message: the transfer id, then the postcard bytes (protocol version 2).
    pg.send(1, 2, &[&pgt_core::header::prefix(TRANSFER), metadata], t)
        .expect("send metadata");
    let ended = wait(child, start);
    let files = std::fs::read_dir(&dir).expect("read dir").count();
    assert_eq!(files, 0, "{name}: left files behind");
    std::fs::remove_dir_all(&dir).ok();
    eprintln!(
        "{name}: {} bytes of metadata: {} (peak {} MiB, {:.2} s)",
        metadata.len(),
        ended.stderr.trim_end(),
        ended.max_rss_kib / MIB,
        ended.seconds
    );
    ended
}

/// Asserts a one-line `pgt recv` error containing `want`, within `max_rss_mib` (peak memory includes
/// the metadata received).
#[track_caller]
fn assert_refused_quickly(ended: &Ended, want: &str, max_rss_mib: i64) {
    assert_eq!(ended.code, Some(1), "{ended:?}");
    let line = ended.stderr.trim_end();
    assert!(
        line.starts_with("pgt: error: ") && !line.contains('\n'),
        "{ended:?}"
    );
    assert!(line.contains(want), "{want:?} not in {line:?}");
    assert!(
        ended.max_rss_kib < max_rss_mib * MIB,
        "peak {} KiB",
        ended.max_rss_kib
    );
}

#[test]
fn announced_storages_are_not_faulted_in_before_their_data() {
    // 50 bytes of metadata announcing two 512 MiB tensors, and no data: the receiver allocated both and
    // its prefaulter faulted them in, 1 GiB resident within half a second. Now the prefaulter stays a
    // window (32 MiB) ahead of the data received: none.
    let half = Leaf::Tensor(TensorLayout::contiguous(DType::UInt8, &[512 << 20]));
    let metadata = encode(
        vec![Node::List(2), Node::Leaf, Node::Leaf],
        vec![half.clone(), half],
        PlanParams::default(),
    );
    assert!(metadata.len() < 64);
    let size = codec::decoded_size(&metadata).expect("valid metadata");
    let ended = send_raw_waiting("announced", &metadata, &[], TIMEOUT_SECS);
    assert_eq!(ended.code, Some(1), "{ended:?}");
    assert!(ended.stderr.contains("timed out"), "{ended:?}");
    assert!(
        ended.max_rss_kib < 64 * MIB + 48 * MIB,
        "peak {} KiB",
        ended.max_rss_kib
    );
    // A budget below the announced 1 GiB refuses the transfer before allocating any of it.
    let ended = send_raw("over-budget", &metadata, &["--memory-budget", "1000MiB"]);
    let needed = (1 << 30) + size;
    assert_refused_quickly(
        &ended,
        &format!("receiving needs {needed} bytes of memory (the metadata decoded and the announced storages), more than the receiver's memory budget of 1048576000 bytes"),
        96,
    );
}

#[test]
fn metadata_that_decodes_to_too_much_is_refused_before_decoding() {
    // 3 MB of valid metadata, 1M `None` values: it decoded to 1.2 GB in pgt recv and took 11 s of CPU
    // after the last byte (a debug build).
    let metadata = deep_nones(1, 1_000_000);
    let ended = send_raw("nones", &metadata, &[]);
    let max = decoded_size_budget(metadata.len() as u64);
    assert_refused_quickly(
        &ended,
        &format!("metadata would take more than {max} bytes of memory decoded (64 × its length + 16 MiB)"),
        96,
    );
    // 600 KB: 200,000 `None` values under 64 lists, each key path 64 indices long: 687 MB, 11 s.
    let ended = send_raw("deep", &deep_nones(64, 200_000), &[]);
    assert_refused_quickly(&ended, "metadata would take more than", 96);
    // 30 MB: a shape of 30M dims, decoded (263 MB) before the 64-dims check.
    let mut metadata = encode(
        vec![Node::Dict(vec![Key::Str("t".into())]), Node::Leaf],
        vec![Leaf::Tensor(TensorLayout::contiguous(DType::UInt8, &[1]))],
        PlanParams::default(),
    );
    let dims = 30_000_000usize;
    // The leaf is the last 8 bytes: Tensor, dtype, shape [1] (01 01), stride [1] (01 01), offset,
    // nbytes. Its shape becomes 30M dims.
    let tail = metadata.split_off(metadata.len() - 8);
    assert_eq!(tail, [1, 18, 1, 1, 1, 1, 0, 1]);
    metadata.extend(&tail[..2]);
    varint(dims as u64, &mut metadata);
    metadata.resize(metadata.len() + dims, 1);
    metadata.extend(&tail[4..]);
    let ended = send_raw("dims", &metadata, &[]);
    assert_refused_quickly(&ended, "30000000 dims exceed the limit of 64", 96 + 30);
    // Metadata within pgt-core's bound (it decodes to 58 × its 700 KB) but not within the receiver's
    // own memory budget: refused before it is decoded.
    let metadata = lists_of_values(1, 100_000, |i, b| {
        b.push(2); // Value::Int, zigzag
        varint(i as u64 * 977 * 2, b);
    });
    let size = codec::decoded_size(&metadata).expect("within pgt-core's bound");
    let ended = send_raw("ints-over-budget", &metadata, &["--memory-budget", "16MiB"]);
    assert_refused_quickly(
        &ended,
        &format!("receiving needs {size} bytes of memory"),
        96,
    );
}
