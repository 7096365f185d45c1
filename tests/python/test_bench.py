"""``python -m pgt.bench`` at tiny sizes: one JSON line per scenario, of the documented shape, every
receiver's bytes verified (not the speed)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")

from pgt.bench import reference_spec, tensor_bytes  # noqa: E402

KEYS = {"scenario", "pgt_seconds", "torch_seconds", "floor_seconds", "speedup", "verified"}
# What makes a target that needs pgt faster than a floor visible (beside the fields).
BOUNDS = {"floor_fresh_seconds", "max_speedup", "max_speedup_fresh", "target_reachable"}


def ratio_of(r, num, den) -> bool:
    """Whether ``r`` is ``num / den`` for the unrounded figures behind them (seconds are rounded to
    4 decimals: at tiny sizes a floor of 1 ms is only known to 5%)."""
    lo, hi = num / (den + 5e-5), num / max(den - 5e-5, 1e-9)
    return lo * 0.99 <= r <= hi * 1.01


def test_reference_dict_has_pgt_cores_shape():
    spec = reference_spec()
    tensors = [form for _, form in spec if form[0] == "tensor"]
    assert (len(spec), len(tensors)) == (10_220, 10_000)
    assert {f[1] for f in tensors} == {"float32", "bfloat16", "int64"}
    # pgt_core::reference: the README's 334 MB; its first leaf, model.layer0.block0.p0.
    assert tensor_bytes(spec) == 333_958_500
    assert spec[0] == (("model", "layer0", "block0", "p0"), ("tensor", "float32", [2393]))
    assert spec[-1][0] == ("meta", "v219")


def test_bench_json_lines_verified():
    scenarios = ["large", "large-inplace", "small", "small-inplace", "fanout"]
    cmd = [sys.executable, "-m", "pgt.bench", "--json", "--repeat", "1", "--bytes", "1MiB"]
    cmd += ["--small-tensors", "40"] + [a for s in scenarios for a in ("--scenario", s)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    assert [x["scenario"] for x in lines] == scenarios
    for x in lines:
        assert KEYS | BOUNDS <= x.keys(), x
        assert x["verified"] is True, x
        assert x["pgt_seconds"] > 0 and x["torch_seconds"] > 0 and x["floor_seconds"] > 0
        assert x["speedup"] == pytest.approx(x["torch_seconds"] / x["pgt_seconds"], rel=0.01)
        assert ratio_of(x["max_speedup"], x["torch_seconds"], x["floor_seconds"]), x
        if "inplace" in x["scenario"]:  # received into touched memory: no fresh floor
            assert x["floor_fresh_seconds"] is None and x["max_speedup_fresh"] is None, x
            bound = x["max_speedup"]
        else:  # the fresh floor was run as often as the others, interleaved
            assert x["floor_fresh_seconds"] > 0 and len(x["runs"]["floor_fresh"]) == 1, x
            bound = x["max_speedup_fresh"]
            assert ratio_of(bound, x["torch_seconds"], x["floor_fresh_seconds"]), x
        assert x["target_reachable"] is (x["target"] <= bound), x
    assert lines[0]["bytes"] == 1 << 20 and lines[2]["leaves"] == 40 + 220


def test_bench_tcp_scenario_verified():
    """large-inplace-tcp: Rust ``pgt send`` to a Python rank in place, beside ``pgt bench``'s Rust
    receiver (needs the Rust binary: $PGT_BIN)."""
    pgt_bin = os.environ.get("PGT_BIN")
    if not pgt_bin:
        pytest.skip("PGT_BIN is not set")
    cmd = [sys.executable, "-m", "pgt.bench", "--json", "--repeat", "1", "--bytes", "1MiB"]
    cmd += ["--scenario", "large-inplace-tcp", "--pgt-bin", pgt_bin]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    (line,) = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    assert KEYS <= line.keys() and line["verified"] is True, line
    assert line["rust_seconds"] > 0 and line["ratio"] > 0 and line["bytes"] == 1 << 20
    assert ratio_of(line["max_ratio"], line["rust_seconds"], line["floor_seconds"]), line
    assert line["target_reachable"] is (line["target"] <= line["max_ratio"]), line
