//! Real processes over loopback TCP: `pgt demo` sends the mixed dict (every leaf kind, strided and
//! offset views, 0-dim and zero-size tensors, DTensors, a ShardedTensor, values) to 3 receivers in
//! both fan-out modes, and every receiver checks every byte; `pgt bench` reports its JSON contract.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn pgt(args: &[&str]) -> Output {
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgt"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("pgt starts");
    // Never hang the suite: a job that takes a minute is a failure.
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if start.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            panic!("pgt {args:?} did not finish in 90 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn demo_delivers_every_byte_to_three_receivers_in_both_fanout_modes() {
    for fanout in ["chain", "direct"] {
        let out = pgt(&[
            "demo",
            "--size",
            "2MiB",
            "--receivers",
            "3",
            "--fanout",
            fanout,
            "--chunk-size",
            "64KiB",
            "--bucket-size",
            "16KiB",
            "--quiet",
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{fanout}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout.matches("every byte").count(), 3, "{stdout}");
        assert!(stdout.contains("raw loopback TCP in this run"), "{stdout}");
    }
}

/// `pgt bench --scenario S --bytes B --repeat 1 --json [extra…]`, which must succeed; its JSON line.
fn bench_json(scenario: &str, bytes: &str) -> serde_json::Value {
    bench_json_with(scenario, bytes, &[])
}

fn bench_json_with(scenario: &str, bytes: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "bench",
        "--scenario",
        scenario,
        "--bytes",
        bytes,
        "--repeat",
        "1",
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = pgt(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).expect("one JSON line")
}

#[test]
fn bench_prints_the_json_contract() {
    let v = bench_json("large-inplace", "4MiB");
    for key in [
        "scenario",
        "world_size",
        "bytes",
        "tensors",
        "seconds",
        "gbps",
        "raw_gbps",
        "ratio",
        "sender_rss_growth_bytes",
        "receiver_rss_growth_bytes",
        "verified",
        "floor_seconds",
        "floor_cpu_seconds",
        "ratio_to_floor",
        "digest_floor_seconds",
        "digest_floor_cpu_seconds",
        "ratio_to_digest_floor",
        "raw_cpu_seconds",
        "cpu_model",
        "pg",
    ] {
        assert!(v.get(key).is_some(), "missing {key}: {v}");
    }
    assert_eq!(v["scenario"], "large-inplace");
    assert_eq!(v["world_size"], 2);
    assert_eq!(v["tensors"], 16);
    assert_eq!(v["verified"], true);
    assert!(v["seconds"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_large_pooled_times_a_receive_into_recycled_buffers() {
    let v = bench_json("large-pooled", "16MiB");
    assert_eq!(v["scenario"], "large-pooled");
    assert_eq!(v["verified"], true);
    assert!(v["receiver_cpu_seconds"].as_f64().unwrap() > 0.0, "{v}");
    // The timed receive reuses the first one's 16 MiB: its resident memory hardly grows.
    let growth = v["receiver_rss_growth_bytes"].as_u64().unwrap();
    assert!(growth < 8 << 20, "receiver grew {growth} bytes: {v}");
}

/// `--warmup N`: every rank of a pgt run makes N untimed transfers in the same processes before the
/// timed one (`large-pooled` already makes two), and the last one is verified.
#[test]
fn bench_warmup_times_a_later_transfer_of_the_same_processes() {
    for (scenario, warmup, transfers) in [
        ("large", "0", 1),
        ("large", "1", 2),
        ("large-inplace", "2", 3),
        ("large-pooled", "1", 3),
    ] {
        let v = bench_json_with(scenario, "8MiB", &["--warmup", warmup]);
        assert_eq!(v["warmup"].to_string(), warmup, "{v}");
        assert_eq!(v["transfers_per_run"], transfers, "{scenario}: {v}");
        assert_eq!(v["verified"], true, "{v}");
    }
}

/// Every scenario kind's floor runs with pgt: fresh and touched memory, one stream of many leaves,
/// chain relay and direct fan-out; the line has the floor's figures, and the floor's receivers
/// checked every byte too (`verified` covers both).
#[test]
fn bench_measures_each_scenario_against_its_floor() {
    for (scenario, bytes, extra) in [
        ("large", "8MiB", &[][..]),
        ("large-inplace", "8MiB", &[][..]),
        ("fanout", "8MiB", &["--chunk-size", "1MiB"][..]),
        ("fanout", "8MiB", &["--fanout", "direct"][..]),
        ("mixed", "4MiB", &[][..]),
    ] {
        let v = bench_json_with(scenario, bytes, extra);
        let what = format!("{scenario} {extra:?}: {v}");
        assert_eq!(v["verified"], true, "{what}");
        assert_eq!(v["pg"], "tcp", "{what}");
        let floor = v["floor_seconds"].as_f64().unwrap();
        assert!(floor > 0.0 && floor < 30.0, "{what}");
        assert!(v["floor_cpu_seconds"].as_f64().unwrap() > 0.0, "{what}");
        let ratio = v["ratio_to_floor"].as_f64().unwrap();
        assert!(ratio.is_finite() && ratio > 0.0, "{what}");
        let expected = floor / v["seconds"].as_f64().unwrap();
        assert!((ratio - expected).abs() < 0.01 + expected * 0.01, "{what}");
        assert!(!v["cpu_model"].as_str().unwrap().is_empty(), "{what}");
        assert!(
            v["cpu_signature"].as_str().unwrap().starts_with("family "),
            "{what}"
        );
        // The digests' least cost: every byte hashed from cache once per rank, at the line's own rate.
        let hot = v["xxh3_hot_gbps"].as_f64().unwrap();
        assert!(
            hot > 0.0 && v["xxh3_cold_gbps"].as_f64().unwrap() > 0.0,
            "{what}"
        );
        let least = v["world_size"].as_f64().unwrap() * v["bytes"].as_f64().unwrap() / (hot * 1e9);
        let got = v["digests_least_cpu_seconds"].as_f64().unwrap();
        assert!((got - least).abs() <= least * 0.1, "{what}");
        // The digest floor ran as often as pgt, its ranks' digests agreeing (`verified`).
        let runs = v["runs"].as_array().unwrap().len();
        assert_eq!(
            v["digest_floor_runs"].as_array().unwrap().len(),
            runs,
            "{what}"
        );
        let digest_floor = v["digest_floor_seconds"].as_f64().unwrap();
        assert!(digest_floor > 0.0 && digest_floor < 30.0, "{what}");
        assert!(
            v["digest_floor_cpu_seconds"].as_f64().unwrap() > 0.0,
            "{what}"
        );
        let expected = digest_floor / v["seconds"].as_f64().unwrap();
        let ratio = v["ratio_to_digest_floor"].as_f64().unwrap();
        assert!((ratio - expected).abs() < 0.01 + expected * 0.01, "{what}");
    }
    // Without digests there is no digest floor to run.
    let v = bench_json_with("large", "8MiB", &["--no-digests"]);
    assert!(v["digests_least_cpu_seconds"].is_null(), "{v}");
    assert!(v["digest_floor_seconds"].is_null(), "{v}");
    assert!(v["ratio_to_digest_floor"].is_null(), "{v}");
    assert_eq!(v["digest_floor_runs"], serde_json::json!([]), "{v}");
    assert!(v["floor_seconds"].as_f64().unwrap() > 0.0, "{v}");
}
