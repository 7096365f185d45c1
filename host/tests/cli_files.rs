//! End to end through the `pgt` binary: `send`/`recv` of a safetensors file between real processes on
//! loopback, `inspect` on every golden vector, and clean failures (wrong token, missing file).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use pgt_core::dtype::DType;
use pgt_core::layout::TensorLayout;
use pgt_core::tree::{Key, KeyPath, PathElem, Value};
use pgt_host::memory::Buffer;
use pgt_host::safetensors_io;
use pgt_host::state_dict::{Entry, StateDict, Storage, Tensor};
use serde_json::Value as Json;

const PGT: &str = env!("CARGO_BIN_EXE_pgt");
/// No child may run longer than this: a hang fails the test instead of stalling the suite.
const HANG: Duration = Duration::from_secs(60);

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "pgt-cli-{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    l.local_addr().expect("local addr").port()
}

/// One job on loopback: every rank's environment.
struct Job {
    port: u16,
    world: u32,
    token: String,
    /// `PGT_TIMEOUT_SECS`: how long group formation may take.
    rendezvous_secs: u32,
}

impl Job {
    fn new(world: u32, rendezvous_secs: u32) -> Job {
        Job {
            port: free_port(),
            world,
            token: format!("test-token-{}", std::process::id()),
            rendezvous_secs,
        }
    }

    /// Starts `pgt args…` as rank `rank` (with `token` instead of the job's, if given).
    fn spawn(&self, rank: u32, args: &[&str], token: Option<&str>) -> Child {
        Command::new(PGT)
            .args(args)
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", self.port.to_string())
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", self.world.to_string())
            .env("PGT_TOKEN", token.unwrap_or(&self.token))
            .env("PGT_TIMEOUT_SECS", self.rendezvous_secs.to_string())
            .env_remove("PGT_LISTEN_HOST")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start pgt")
    }
}

/// Waits for every child; kills them all and fails if any is still running after [`HANG`].
fn wait_all(children: Vec<Child>) -> Vec<Output> {
    let start = Instant::now();
    let mut children: Vec<Option<Child>> = children.into_iter().map(Some).collect();
    let mut outputs: Vec<Option<Output>> = (0..children.len()).map(|_| None).collect();
    while outputs.iter().any(Option::is_none) {
        for (slot, out) in children.iter_mut().zip(outputs.iter_mut()) {
            let done = match slot {
                Some(c) => c.try_wait().expect("try_wait").is_some(),
                None => false,
            };
            if done {
                let child = slot.take().expect("child");
                *out = Some(child.wait_with_output().expect("output"));
            }
        }
        if start.elapsed() > HANG {
            for c in children.iter_mut().flatten() {
                let _ = c.kill();
                let _ = c.wait();
            }
            panic!("pgt processes still running after {HANG:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    outputs.into_iter().map(|o| o.expect("output")).collect()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn describe(o: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}--- stderr\n{}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    )
}

/// A checkpoint with nested names, several dtypes, a strided view, a 0-dim and a zero-size tensor, a
/// tensor large enough to travel in several chunks, plain values and a step.
fn checkpoint() -> StateDict<'static> {
    let mut sd = StateDict::new();
    let f: Vec<f32> = (0..64 * 33).map(|i| i as f32 * 0.25 - 7.0).collect();
    sd.insert(
        "model.layers.0.weight",
        Entry::Tensor(Tensor::from_values(&[64, 33], &f).unwrap()),
    )
    .unwrap();
    let b: Vec<half::bf16> = (0..33).map(|i| half::bf16::from_f32(i as f32)).collect();
    sd.insert(
        "model.layers.0.bias",
        Entry::Tensor(Tensor::from_values(&[33], &b).unwrap()),
    )
    .unwrap();
    // A transposed [4, 6] view of a [6, 4] int32 storage.
    let ints: Vec<i32> = (0..24).collect();
    let t = Tensor::new(
        TensorLayout {
            dtype: DType::Int32,
            shape: vec![4, 6],
            stride: vec![1, 4],
            storage_offset: 0,
            nbytes: 96,
        },
        Storage::Owned(Buffer::from_slice(bytemuck::cast_slice(&ints))),
    )
    .unwrap();
    sd.insert("model.layers.1.proj_t", Entry::Tensor(t))
        .unwrap();
    sd.insert(
        "model.scale",
        Entry::Tensor(Tensor::from_values::<f64>(&[], &[0.125]).unwrap()),
    )
    .unwrap();
    sd.insert(
        "model.empty",
        Entry::Tensor(Tensor::from_bytes(DType::Float16, &[0, 8], &[]).unwrap()),
    )
    .unwrap();
    // 3 MiB + 5 bytes of a pattern: several 1 MiB chunks and a short tail.
    let big: Vec<u8> = (0..(3 << 20) + 5u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    sd.insert(
        "embed.weight",
        Entry::Tensor(Tensor::from_bytes(DType::UInt8, &[big.len() as u64], &big).unwrap()),
    )
    .unwrap();
    sd.insert(
        "mask",
        Entry::Tensor(Tensor::from_bytes(DType::Bool, &[5], &[1, 0, 1, 1, 0]).unwrap()),
    )
    .unwrap();
    sd.insert_path(&["__metadata__", "format"], Value::Str("pt".into()))
        .unwrap();
    sd.insert("optimizer.lr", Entry::Value(Value::Float(3e-4)))
        .unwrap();
    sd.step = Some(1234);
    sd
}

/// Every tensor of `want` is in `got` under the same name with the same dtype, shape and bytes.
fn assert_same_tensors(want: &StateDict<'_>, got: &StateDict<'_>, what: &str) {
    let want_t = safetensors_io::tensor_names(want);
    let got_t = safetensors_io::tensor_names(got);
    assert_eq!(want_t.len(), got_t.len(), "{what}: tensor count");
    for (name, t) in want_t {
        let u = got
            .tensor(&name)
            .unwrap_or_else(|| panic!("{what}: {name} missing"));
        assert_eq!(u.dtype(), t.dtype(), "{what}: {name} dtype");
        assert_eq!(u.shape(), t.shape(), "{what}: {name} shape");
        assert!(
            u.contiguous_bytes().unwrap() == t.contiguous_bytes().unwrap(),
            "{what}: {name} bytes differ"
        );
    }
}

fn transfer(fanout: &str, extra: &[&str]) {
    let dir = temp_dir(&format!("transfer-{fanout}"));
    let input = dir.join("in.safetensors");
    let original = checkpoint();
    safetensors_io::save(&original, &input).unwrap();
    let job = Job::new(3, 30);
    let outs: Vec<PathBuf> = (1..=2)
        .map(|r| dir.join(format!("out{r}.safetensors")))
        .collect();
    let common = [
        "--fanout",
        fanout,
        "--bucket-size",
        "64KiB",
        "--chunk-size",
        "1MiB",
        "--timeout",
        "30",
    ];
    let mut children = Vec::new();
    for (r, out) in (1..=2).zip(&outs) {
        let mut args = vec!["recv", "--src", "0", "--out", out.to_str().unwrap()];
        args.extend(common);
        args.extend(["--expect-step", "1234"]);
        children.push(job.spawn(r, &args, None));
    }
    let mut args = vec!["send", input.to_str().unwrap(), "--dst", "1,2"];
    args.extend(common);
    args.extend(extra);
    children.push(job.spawn(0, &args, None));
    let outputs = wait_all(children);
    for o in &outputs {
        assert!(o.status.success(), "{}", describe(o));
    }
    // One summary line each (none from a --quiet sender).
    let sent = text(&outputs[2].stdout);
    if extra.contains(&"--quiet") {
        assert_eq!(sent, "");
    } else {
        assert!(
            sent.starts_with("sent ") && sent.contains("to rank(s) 1,2") && sent.contains("GB/s"),
            "{sent}"
        );
        assert_eq!(sent.lines().count(), 1, "{sent}");
    }
    for o in &outputs[..2] {
        let line = text(&o.stdout);
        assert!(
            line.starts_with("received ") && line.contains("(step 1234)"),
            "{line}"
        );
        assert_eq!(line.lines().count(), 1, "{line}");
    }
    let loaded = safetensors_io::load(&input).unwrap();
    assert_same_tensors(&original, &loaded, "input file");
    for out in &outs {
        let got = safetensors_io::load(out).unwrap();
        assert_same_tensors(&loaded, &got, &out.display().to_string());
        assert_eq!(got.step, Some(1234));
        assert!(
            matches!(got.get(&["__metadata__", "format"]), Some(Entry::Value(Value::Str(s))) if s == "pt")
        );
        // Values travel as metadata strings, keyed by their dotted path.
        let lr = KeyPath(vec![
            PathElem::Key(Key::Str("__metadata__".into())),
            PathElem::Key(Key::Str("optimizer.lr".into())),
        ]);
        assert!(
            matches!(got.get(&lr), Some(Entry::Value(Value::Str(s))) if s == "0.0003"),
            "{:?}",
            got.get(&lr)
        );
    }
    // What arrived inspects as a valid safetensors file.
    let o = Command::new(PGT)
        .args(["inspect", outs[0].to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", describe(&o));
    assert!(text(&o.stdout).contains("model.layers.1.proj_t"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn send_to_two_receivers_chain() {
    transfer("chain", &[]);
}

#[test]
fn send_to_two_receivers_direct_without_digests() {
    transfer("direct", &["--no-digests", "--quiet"]);
}

#[test]
fn wrong_token_fails_cleanly() {
    let dir = temp_dir("token");
    let input = dir.join("in.safetensors");
    safetensors_io::save(&checkpoint(), &input).unwrap();
    let job = Job::new(3, 5);
    let out1 = dir.join("out1.safetensors");
    let out2 = dir.join("out2.safetensors");
    let start = Instant::now();
    let children = vec![
        job.spawn(
            0,
            &[
                "send",
                input.to_str().unwrap(),
                "--dst",
                "1,2",
                "--timeout",
                "5",
            ],
            None,
        ),
        job.spawn(
            1,
            &["recv", "--out", out1.to_str().unwrap(), "--timeout", "5"],
            Some("not-the-token"),
        ),
        job.spawn(
            2,
            &["recv", "--out", out2.to_str().unwrap(), "--timeout", "5"],
            None,
        ),
    ];
    let outputs = wait_all(children);
    assert!(
        start.elapsed() < Duration::from_secs(40),
        "took {:?}",
        start.elapsed()
    );
    for o in &outputs {
        assert!(!o.status.success(), "{}", describe(o));
        let stderr = text(&o.stderr);
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("pgt: error:"))
            .collect();
        assert_eq!(errors.len(), 1, "{}", describe(o));
    }
    assert!(
        text(&outputs[1].stderr).contains("token"),
        "{}",
        describe(&outputs[1])
    );
    assert!(!out1.exists() && !out2.exists());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn missing_file_fails_the_whole_job_quickly() {
    let dir = temp_dir("missing");
    let job = Job::new(2, 30);
    let out = dir.join("out.safetensors");
    let missing = dir.join("missing.safetensors");
    let children = vec![
        job.spawn(
            0,
            &[
                "send",
                missing.to_str().unwrap(),
                "--dst",
                "1",
                "--timeout",
                "30",
            ],
            None,
        ),
        job.spawn(
            1,
            &["recv", "--out", out.to_str().unwrap(), "--timeout", "30"],
            None,
        ),
    ];
    let start = Instant::now();
    let outputs = wait_all(children);
    // The receiver learns at once (the sender's connection closes), not after --timeout.
    assert!(
        start.elapsed() < Duration::from_secs(25),
        "took {:?}",
        start.elapsed()
    );
    for o in &outputs {
        assert!(!o.status.success(), "{}", describe(o));
    }
    let sender = text(&outputs[0].stderr);
    assert!(
        sender.contains("pgt: error: cannot open") && sender.contains("missing.safetensors"),
        "{sender}"
    );
    assert!(!out.exists());
    std::fs::remove_dir_all(&dir).ok();
}

// ------------------------------------------------------------------------------------------------
// inspect

fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/vectors")
}

fn index() -> Vec<Json> {
    let text = std::fs::read_to_string(vectors_dir().join("index.json")).expect("index.json");
    let j: Json = serde_json::from_str(&text).expect("index.json is JSON");
    j["vectors"].as_array().expect("vectors").clone()
}

fn inspect(args: &[String]) -> Output {
    let mut c = Command::new(PGT);
    c.arg("inspect").args(args);
    c.output().expect("run pgt inspect")
}

/// An integer of index.json (large ones are decimal strings).
fn uint(j: &Json) -> Option<u64> {
    j.as_u64().or_else(|| j.as_str()?.parse().ok())
}

/// `inspect` flags that make the receiver and limits of an index entry.
fn entry_args(e: &Json) -> Vec<String> {
    let mut args = Vec::new();
    if let Some(h) = e["header_len"].as_u64() {
        args.extend(["--header-len".to_string(), h.to_string()]);
    }
    if let Some(limits) = e["limits"].as_object() {
        for (k, v) in limits {
            args.extend(["--limit".to_string(), format!("{k}={}", uint(v).unwrap())]);
        }
    }
    let rx = &e["receiver"];
    if rx.is_object() {
        args.extend(["--rank".into(), rx["rank"].to_string()]);
        args.extend(["--source".into(), rx["source"].to_string()]);
        if let Some(s) = rx["expected_step"].as_u64() {
            args.extend(["--expect-step".into(), s.to_string()]);
        }
    }
    args
}

#[test]
fn inspect_valid_vectors_matches_the_index() {
    let mut seen = 0;
    for e in index() {
        let kind = e["kind"].as_str().unwrap();
        if kind != "valid_metadata" && kind != "stream" {
            continue;
        }
        seen += 1;
        let file = e["file"].as_str().unwrap();
        let path = vectors_dir().join(file);
        let mut args = vec![path.display().to_string(), "--json".into()];
        args.extend(entry_args(&e));
        let o = inspect(&args);
        assert!(o.status.success(), "{file}: {}", describe(&o));
        let j: Json = serde_json::from_slice(&o.stdout).expect("JSON report");
        let m = &e["manifest"];
        assert_eq!(j["valid"], Json::Bool(true), "{file}");
        assert_eq!(
            j["format"],
            if kind == "stream" {
                "stream"
            } else {
                "metadata"
            },
            "{file}"
        );
        assert_eq!(j["step"].as_u64(), uint(&m["step"]), "{file}: step");
        assert_eq!(j["source"], m["source"], "{file}: source");
        assert_eq!(j["destinations"], m["destinations"], "{file}: destinations");
        assert_eq!(j["leaf_count"], m["leaf_count"], "{file}: leaf_count");
        assert_eq!(
            j["storage_count"], m["storage_count"],
            "{file}: storage_count"
        );
        assert_eq!(j["total_bytes"].as_u64(), uint(&m["total_bytes"]), "{file}");
        assert_eq!(
            j["plan"]["fanout"].as_str().map(str::to_lowercase),
            m["plan"]["fanout"].as_str().map(str::to_lowercase),
            "{file}: fanout"
        );
        assert_eq!(
            j["plan"]["chunk_size"].as_u64(),
            uint(&m["plan"]["chunk_size"])
        );
        let h = &m["header"];
        assert_eq!(
            j["header"]["metadata_len"].as_u64(),
            uint(&h["metadata_len"])
        );
        assert_eq!(
            j["header"]["metadata_digest"], h["metadata_digest"],
            "{file}"
        );
        assert_eq!(j["header"]["flags"], h["flags"], "{file}");
        let paths: Vec<&Json> = j["leaves"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| &l["path"])
            .collect();
        let want: Vec<&Json> = m["paths"].as_array().unwrap().iter().collect();
        assert_eq!(paths, want, "{file}: paths");
        // Each leaf in pgt-wasm's JSON form, as index.json has it, plus its path.
        let leaves: Vec<Json> = j["leaves"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                let mut l = l.clone();
                l.as_object_mut().unwrap().remove("path");
                l
            })
            .collect();
        assert_eq!(Some(&leaves), m["leaves"].as_array(), "{file}: leaves");
        if kind == "stream" {
            assert_eq!(j["received"], Json::Bool(true), "{file}");
            let digests: Vec<&Json> = j["received_storages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| &s["digest"])
                .collect();
            let want: Vec<&Json> = e["result"]["storages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| &s["digest"])
                .collect();
            assert_eq!(digests, want, "{file}: storage digests");
        }
        // The text form lists every leaf and says it is valid.
        let mut args = vec![path.display().to_string()];
        args.extend(entry_args(&e));
        let o = inspect(&args);
        assert!(o.status.success(), "{file}: {}", describe(&o));
        let out = text(&o.stdout);
        assert!(
            out.contains("valid") && !out.contains("error"),
            "{file}: {out}"
        );
        for p in want {
            assert!(out.contains(p.as_str().unwrap()), "{file}: {p} not listed");
        }
    }
    assert!(seen >= 10, "only {seen} valid vectors");
}

#[test]
fn inspect_tensors_vector_prints_layouts() {
    let o = inspect(&[vectors_dir().join("tensors.bin").display().to_string()]);
    assert!(o.status.success(), "{}", describe(&o));
    let out = text(&o.stdout);
    let line = out
        .lines()
        .find(|l| l.starts_with("['bf16_t'] "))
        .unwrap_or_else(|| panic!("no bf16_t line in\n{out}"));
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        cols,
        [
            "['bf16_t']",
            "tensor",
            "bfloat16",
            "[3,",
            "2]",
            "[1,",
            "3]",
            "0",
            "12"
        ]
    );
    assert!(out.contains("destinations  [1, 2]"), "{out}");
}

#[test]
fn inspect_malformed_vectors_names_the_error() {
    let mut seen = 0;
    for e in index() {
        let kind = e["kind"].as_str().unwrap();
        if !matches!(kind, "malformed" | "malformed_stream" | "receiver_reject") {
            continue;
        }
        seen += 1;
        let file = e["file"].as_str().unwrap();
        let name = e["error"].as_str().unwrap();
        let mut args = vec![vectors_dir().join(file).display().to_string()];
        args.extend(entry_args(&e));
        let o = inspect(&args);
        assert!(!o.status.success(), "{file}: {}", describe(&o));
        let stderr = text(&o.stderr);
        assert_eq!(stderr.lines().count(), 1, "{file}: {stderr}");
        assert!(
            stderr.starts_with("pgt: error: ") && stderr.contains(name),
            "{file}: {stderr}"
        );
        // Still prints what it can: at least the header fields.
        let out = text(&o.stdout);
        assert!(
            out.contains("header") && out.contains(name),
            "{file}: {out}"
        );
        // And the JSON form names it too.
        args.push("--json".into());
        let o = inspect(&args);
        assert!(!o.status.success(), "{file}");
        let j: Json = serde_json::from_slice(&o.stdout).expect("JSON report");
        assert_eq!(j["error"]["name"], name, "{file}");
        assert_eq!(j["error"]["debug"], e["error_debug"], "{file}");
        assert_eq!(j["valid"], Json::Bool(false), "{file}");
    }
    assert!(seen >= 40, "only {seen} malformed vectors");
}

#[test]
fn inspect_safetensors_and_garbage() {
    let dir = temp_dir("inspect");
    let path = dir.join("model.safetensors");
    safetensors_io::save(&checkpoint(), &path).unwrap();
    let o = inspect(&[path.display().to_string(), "--json".into()]);
    assert!(o.status.success(), "{}", describe(&o));
    let j: Json = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["format"], "safetensors");
    assert_eq!(j["step"], 1234);
    assert_eq!(j["tensor_count"], 7);
    let t = j["leaves"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["path"] == "['model.layers.1.proj_t']")
        .expect("proj_t listed");
    let layout = &t["layout"];
    assert_eq!(layout["dtype"], "int32");
    assert_eq!(layout["shape"], serde_json::json!([4, 6]));
    assert_eq!(layout["stride"], serde_json::json!([6, 1]));

    // Not a safetensors file, whatever its name says.
    let bad = dir.join("bad.safetensors");
    std::fs::write(&bad, b"\x05\0\0\0\0\0\0\0{oops").unwrap();
    let o = inspect(&[bad.display().to_string()]);
    assert!(!o.status.success());
    let stderr = text(&o.stderr);
    assert!(
        stderr.starts_with("pgt: error: ") && stderr.contains("bad.safetensors"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}
