"""`python -m pgt send` and `python -m pgt inspect`, which mirror `pgt send` and `pgt inspect`: the
Python sender to Rust `pgt recv` (byte-exact), through a Rust relay to a Python receiver, its failures;
inspect against every golden vector (tests/vectors/index.json) and, field for field, against
`pgt inspect --json`."""

from __future__ import annotations

import contextlib
import io
import json
import random
import secrets
import subprocess
import sys

import pytest
from test_python_receiver import (
    ROOT,
    SMALL_PLAN,
    assert_same_tensors,
    check_ok,
    checkpoint,
    free_port,
    job_env,
    pgt_binary,
    run_job,
    write_safetensors,
)

from pgt import cli_inspect

VECTORS = ROOT / "tests" / "vectors"
INDEX = json.loads((VECTORS / "index.json").read_text())["vectors"]


def py(*args) -> list:
    return [sys.executable, "-m", "pgt", *args]


@pytest.fixture
def ckpt(tmp_path):
    tensors = checkpoint(random.Random(99))
    path = tmp_path / "in.safetensors"
    write_safetensors(path, tensors, {"pgt.step": "7", "note": "hello"})
    return path, tensors


# ---- send ----


def test_python_send_to_rust_recv(ckpt, tmp_path):
    src, tensors = ckpt
    port, token = free_port(), secrets.token_hex(16)
    env = job_env(port, 2, token)
    out = tmp_path / "out.safetensors"
    res = run_job(
        {
            0: (
                py("send", src, "--dst", "1", "--fanout", "direct", "--step", "12", *SMALL_PLAN),
                env,
            ),
            1: ([pgt_binary(), "recv", "--out", out, "--timeout", "30", "-q"], env),
        }
    )
    check_ok(res, 0, 1)
    assert res[0][1].startswith(f"sent {src} to rank(s) 1: "), res[0][1]
    meta = assert_same_tensors(out, tensors)
    assert meta == {"pgt.step": "12", "note": "hello"}


def test_python_send_through_a_rust_relay_to_python(ckpt, tmp_path):
    """Chain 0 -> 1 -> 2 (the default fan-out, every other rank by default): Python sends, Rust
    relays, Python receives; digests off."""
    src, tensors = ckpt
    port, token = free_port(), secrets.token_hex(16)
    env = job_env(port, 3, token)
    outs = {r: tmp_path / f"o{r}.safetensors" for r in (1, 2)}
    res = run_job(
        {
            0: (py("send", src, "--no-digests", "-q", *SMALL_PLAN), env),
            1: ([pgt_binary(), "recv", "--out", outs[1], "--timeout", "30", "-q"], env),
            2: (py("recv", "--out", outs[2], "--timeout", "30"), env),
        }
    )
    check_ok(res, 0, 1, 2)
    assert res[0][1] == ""  # -q
    for r in (1, 2):
        assert assert_same_tensors(outs[r], tensors)["pgt.step"] == "7"


def test_python_send_bad_flags_fail_before_joining(ckpt):
    src, _ = ckpt
    env = job_env(free_port(), 2, "t", RANK=0)
    p = subprocess.run(
        py("send", src, "--chunk-size", "100"), env=env, capture_output=True, text=True, timeout=30
    )
    assert p.returncode == 2 and "BadChunkSize" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    p = subprocess.run(
        py("send", src, "--chunk-size", "12 parsecs"), env=env, capture_output=True, text=True
    )
    assert p.returncode == 2 and "not a size" in p.stderr, p.stderr


def test_python_send_of_a_bad_file_fails_the_job(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\0\0\0\0\0\0\0{oops")
    port, token = free_port(), secrets.token_hex(16)
    env = job_env(port, 2, token)
    res = run_job(
        {
            0: (py("send", bad, "--dst", "1"), env),
            1: (
                [pgt_binary(), "recv", "--out", tmp_path / "o.safetensors", "--timeout", "30"],
                env,
            ),
        }
    )
    code, _, err = res[0]
    assert code == 2 and "bad.safetensors" in err and "Traceback" not in err, err
    assert res[1][0] != 0  # the receiver sees the sender go, rather than waiting for its timeout
    assert not (tmp_path / "o.safetensors").exists()


# ---- inspect against the golden vectors ----


def entry_args(e) -> list[str]:
    args = []
    if e.get("header_len") is not None:
        args += ["--header-len", str(e["header_len"])]
    for k, v in (e.get("limits") or {}).items():
        args += ["--limit", f"{k}={int(v)}"]
    rx = e.get("receiver")
    if isinstance(rx, dict):
        args += ["--rank", str(rx["rank"]), "--source", str(rx["source"])]
        if rx.get("expected_step") is not None:
            args += ["--expect-step", str(rx["expected_step"])]
    return args


def inspect(*args) -> subprocess.CompletedProcess:
    """``python -m pgt inspect ARGS``, run in this process (the compiled module is cached: a process
    per vector would spend most of its time starting up); ``test_inspect_runs_as_a_command`` runs it
    as a command."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_inspect.main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_inspect_runs_as_a_command():
    o = subprocess.run(
        py("inspect", VECTORS / "tensors.bin"), capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert o.returncode == 0 and "bf16_t" in o.stdout and "valid         yes" in o.stdout, o
    o = subprocess.run(
        py("inspect", VECTORS / "bad_magic.bin", "--json"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert o.returncode == 1 and json.loads(o.stdout)["error"]["name"] == "BadMagic", o


def uint(v):
    return None if v is None else int(v)


VALID = [e for e in INDEX if e["kind"] in ("valid_metadata", "stream")]
BAD = [e for e in INDEX if e["kind"] in ("malformed", "malformed_stream", "receiver_reject")]


@pytest.mark.parametrize("e", VALID, ids=[e["file"] for e in VALID])
def test_inspect_valid_vectors_match_the_index(e):
    path = VECTORS / e["file"]
    o = inspect(path, "--json", *entry_args(e))
    assert o.returncode == 0, o.stderr
    j, m = json.loads(o.stdout), e["manifest"]
    assert j["valid"] is True
    assert j["format"] == ("stream" if e["kind"] == "stream" else "metadata")
    assert uint(j["step"]) == uint(m["step"])
    for k in ("source", "destinations", "leaf_count", "storage_count"):
        assert j[k] == m[k], k
    assert uint(j["total_bytes"]) == uint(m["total_bytes"])
    assert j["plan"]["fanout"] == m["plan"]["fanout"].lower()
    assert uint(j["plan"]["chunk_size"]) == uint(m["plan"]["chunk_size"])
    h = m["header"]
    assert uint(j["header"]["metadata_len"]) == uint(h["metadata_len"])
    assert j["header"]["metadata_digest"] == h["metadata_digest"]
    assert j["header"]["flags"] == h["flags"]
    assert [lf["path"] for lf in j["leaves"]] == m["paths"]
    assert [{k: v for k, v in lf.items() if k != "path"} for lf in j["leaves"]] == m["leaves"]
    if e["kind"] == "stream":
        assert j["received"] is True
        assert [s["digest"] for s in j["received_storages"]] == [
            s["digest"] for s in e["result"]["storages"]
        ]
    o = inspect(path, *entry_args(e))
    assert o.returncode == 0 and "valid" in o.stdout and "error" not in o.stdout, o.stdout
    for p in m["paths"]:
        assert p in o.stdout


@pytest.mark.parametrize("e", BAD, ids=[e["file"] for e in BAD])
def test_inspect_malformed_vectors_name_the_error(e):
    path = VECTORS / e["file"]
    o = inspect(path, *entry_args(e))
    assert o.returncode == 1, o.stdout
    lines = o.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pgt inspect: error: "), o.stderr
    assert e["error"] in lines[0] and "Traceback" not in o.stderr
    assert "header" in o.stdout and e["error"] in o.stdout
    o = inspect(path, "--json", *entry_args(e))
    j = json.loads(o.stdout)
    assert o.returncode == 1 and j["valid"] is False
    assert j["error"]["name"] == e["error"] and j["error"]["message"]


def test_inspect_safetensors(ckpt):
    src, tensors = ckpt
    o = inspect(src, "--json")
    assert o.returncode == 0, o.stderr
    j = json.loads(o.stdout)
    assert j["format"] == "safetensors" and j["step"] == 7
    assert j["tensor_count"] == len(tensors)
    data = src.read_bytes()
    by_path = {lf["path"]: lf for lf in j["leaves"]}
    for name, _, shape, blob in tensors:
        lf = by_path[f"['{name}']"]  # a flat key: the file's name, whole
        assert lf["layout"]["shape"] == shape
        lo, hi = lf["file_range"]
        assert data[lo:hi] == blob, name
    assert by_path["['__metadata__']['note']"]["value"] == {"type": "str", "value": "hello"}
    bad = src.with_name("bad.safetensors")
    bad.write_bytes(b"\x05\0\0\0\0\0\0\0{oops")
    o = inspect(bad)
    assert o.returncode == 1 and "bad.safetensors" in o.stderr
    assert len(o.stderr.strip().splitlines()) == 1, o.stderr
    o = inspect(src.with_name("missing.bin"))
    assert o.returncode == 1 and "cannot open" in o.stderr


def _without(j, *keys):
    if isinstance(j, dict):
        return {k: _without(v, *keys) for k, v in j.items() if k not in keys}
    if isinstance(j, list):
        return [_without(v, *keys) for v in j]
    return j


SAME_AS_RUST = [
    e for e in INDEX if e["kind"] in ("valid_metadata", "stream", "malformed", "receiver_reject",
                                      "malformed_stream", "stale_stream")
]  # fmt: skip


@pytest.mark.parametrize("e", SAME_AS_RUST, ids=[e["file"] for e in SAME_AS_RUST])
def test_inspect_json_equals_pgt_inspect(e):
    """The same report as `pgt inspect --json`, field for field (the Rust Debug form of an error,
    ``error.debug``, aside)."""
    path = VECTORS / e["file"]
    args = [path, "--json", *entry_args(e)]
    rust = subprocess.run(
        [pgt_binary(), "inspect", *map(str, args)], capture_output=True, text=True, timeout=60
    )
    ours = inspect(*args)
    assert ours.returncode == (0 if rust.returncode == 0 else 1), (ours.stderr, rust.stderr)
    assert _without(json.loads(ours.stdout), "debug") == _without(json.loads(rust.stdout), "debug")


def test_inspect_safetensors_equals_pgt_inspect(ckpt):
    src, _ = ckpt
    rust = subprocess.run(
        [pgt_binary(), "inspect", src, "--json"], capture_output=True, text=True, timeout=60
    )
    assert rust.returncode == 0, rust.stderr
    assert json.loads(inspect(src, "--json").stdout) == json.loads(rust.stdout)


def test_help_lists_the_commands():
    o = subprocess.run(py("--help"), capture_output=True, text=True)
    assert o.returncode == 0 and all(c in o.stdout for c in ("send", "recv", "inspect"))
    o = subprocess.run(py("nope"), capture_output=True, text=True)
    assert o.returncode == 2
