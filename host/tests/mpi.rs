//! The MPI process group in real MPI jobs (feature `mpi`; needs `mpirun`): the `mpi_check` example
//! with 3 and 4 ranks, and `pgt send`/`pgt recv --pg mpi` started by one `mpirun`.
#![cfg(feature = "mpi")]

use std::path::PathBuf;
use std::process::{Command, Output};

use pgt_host::safetensors_io;
use pgt_host::state_dict::{Entry, StateDict, Tensor};

const PGT: &str = env!("CARGO_BIN_EXE_pgt");

/// `mpirun` allowed to run as root (CI does) and with more ranks than cores, bounded in time.
fn mpirun(args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("300")
        .arg("mpirun")
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .output()
        .expect("mpirun (Debian: openmpi-bin)")
}

fn assert_ok(out: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Examples live next to the test binaries' `deps` directory. `cargo test --test mpi` does not build
/// them: scripts/test.sh runs `cargo build -p pgt-host --features mpi --example mpi_check` first.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    dir.join("examples").join(name)
}

#[test]
fn mpi_check_passes_with_3_and_4_ranks() {
    let check = example("mpi_check");
    assert!(check.is_file(), "{} not built", check.display());
    for n in ["3", "4"] {
        let stdout = assert_ok(&mpirun(&["-n", n, check.to_str().unwrap()]), "mpi_check");
        assert_eq!(
            stdout.matches(": ok").count(),
            n.parse::<usize>().unwrap(),
            "{stdout}"
        );
    }
}

#[test]
fn a_send_nobody_receives_ends_the_job() {
    let check = example("mpi_check");
    let start = std::time::Instant::now();
    let out = mpirun(&["-n", "2", check.to_str().unwrap(), "stalled-receiver"]);
    let took = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the job should have been aborted");
    assert!(
        stderr.contains("MPI still owns its buffer: aborting the job"),
        "{stderr}"
    );
    assert!(took < std::time::Duration::from_secs(30), "took {took:?}");
}

#[test]
fn cli_send_and_recv_over_mpi() {
    let dir = std::env::temp_dir().join(format!("pgt-mpi-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut sd = StateDict::new();
    let values: Vec<f32> = (0..300_000).map(|i| i as f32 * 0.25).collect();
    sd.insert(
        "w",
        Entry::Tensor(Tensor::from_values(&[600, 500], &values).unwrap()),
    )
    .unwrap();
    let ids: Vec<i64> = (0..1000).map(|i| i * 7 - 3).collect();
    sd.insert(
        "ids",
        Entry::Tensor(Tensor::from_values(&[1000], &ids).unwrap()),
    )
    .unwrap();
    let input = dir.join("in.safetensors");
    safetensors_io::save(&sd, &input).unwrap();
    let out = dir.join("out.{rank}.safetensors");
    // One job, two programs: rank 0 sends (to every other rank by default), ranks 1 and 2 receive.
    let output = mpirun(&[
        "-n",
        "1",
        PGT,
        "send",
        input.to_str().unwrap(),
        "--pg",
        "mpi",
        "--quiet",
        ":",
        "-n",
        "2",
        PGT,
        "recv",
        "--out",
        out.to_str().unwrap(),
        "--pg",
        "mpi",
        "--quiet",
    ]);
    assert_ok(&output, "mpirun pgt send : pgt recv");
    for rank in [1, 2] {
        let got = safetensors_io::load(dir.join(format!("out.{rank}.safetensors"))).unwrap();
        for key in ["w", "ids"] {
            assert_eq!(
                got.tensor(key).unwrap().storage.bytes(),
                sd.tensor(key).unwrap().storage.bytes(),
                "rank {rank}: {key}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_failing_rank_ends_the_cli_job_at_once() {
    let dir = std::env::temp_dir().join(format!("pgt-mpi-fail-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("missing.safetensors");
    let out = dir.join("out.{rank}.safetensors");
    let start = std::time::Instant::now();
    // The sender can't load its file; without MPI_Abort the receiver would wait for its timeout.
    let output = mpirun(&[
        "-n",
        "1",
        PGT,
        "send",
        missing.to_str().unwrap(),
        "--pg",
        "mpi",
        ":",
        "-n",
        "1",
        PGT,
        "recv",
        "--out",
        out.to_str().unwrap(),
        "--pg",
        "mpi",
        "--timeout",
        "100",
    ]);
    let took = start.elapsed();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("missing.safetensors"), "{stderr}");
    assert!(took < std::time::Duration::from_secs(30), "took {took:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `pgt bench --pg mpi` inside one `mpirun` job: rank 0 prints the one line, with the floor and the
/// digest floor measured over the same MPI group (chain relay across the 3 ranks), every byte checked
/// by pgt and both floors, and the digest floor's digests compared.
#[test]
fn bench_runs_pgt_and_its_floor_inside_one_mpi_job() {
    // `mpirun -n N pgt bench --pg mpi --scenario fanout --json` with `extra` options.
    let fanout_bench = |n: &str, extra: &[&str]| {
        let head = [
            "-n",
            n,
            PGT,
            "bench",
            "--pg",
            "mpi",
            "--scenario",
            "fanout",
            "--json",
        ];
        mpirun(&[&head[..], extra].concat())
    };
    let out = fanout_bench(
        "3",
        &["--bytes", "8MiB", "--chunk-size", "1MiB", "--repeat", "2"],
    );
    let stdout = assert_ok(&out, "pgt bench --pg mpi");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).expect("JSON");
    assert_eq!(v["pg"], "mpi", "{v}");
    assert_eq!(v["world_size"], 3, "{v}");
    assert_eq!(v["verified"], true, "{v}");
    assert_eq!(v["floor_runs"].as_array().map(Vec::len), Some(2), "{v}");
    assert!(v["floor_seconds"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["ratio_to_floor"].as_f64().unwrap().is_finite(), "{v}");
    assert_eq!(
        v["digest_floor_runs"].as_array().map(Vec::len),
        Some(2),
        "{v}"
    );
    assert!(v["digest_floor_seconds"].as_f64().unwrap() > 0.0, "{v}");
    assert!(
        v["ratio_to_digest_floor"].as_f64().unwrap().is_finite(),
        "{v}"
    );

    // A job of the wrong size fails with a message that says what to run.
    let out = fanout_bench("2", &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("mpirun -n 3"), "{stderr}");
}
