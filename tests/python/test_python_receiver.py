"""`python -m pgt recv` (examples/python/pgt_recv.py) — a Python rank that receives checkpoints with pgt's wasm module — against
the real `pgt` binary over TCP: `pgt send FILE` as rank 0, the Python receiver as another rank
(subprocesses on loopback, a fresh port and token each), then every byte of every tensor of the Python
output is compared with the input file. Also: chain fan-out with the Python rank as the relay and as the
last rank (with a Rust `pgt recv` beside it), a wrong job token (the Python rank fails cleanly with an
authentication error), a step mismatch (the module's named error), and — with a Python sender driving the
module's sender state machine — strided views, values, DTensors, ShardedTensors, the same output as Rust's
`pgt recv`, and corrupted bytes (DigestMismatch).

Needs the debug `pgt` binary ($PGT_BIN, else $CARGO_TARGET_DIR/debug/pgt; scripts/test.sh builds it with
`cargo test --workspace` before pytest) and the raw-ABI module (scripts/build-wasm.sh). Nothing here
waits more than 60 s: every process has a deadline and is killed past it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import secrets
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import xxhash

from pgt.abi import DTYPES, Pgt, module_path, prefix_bytes

ROOT = Path(__file__).resolve().parents[2]
JOB_TIMEOUT = 60  # seconds for a whole job, after which every process is killed
HAVE_NUMPY = importlib.util.find_spec("numpy") is not None


def pgt_binary() -> Path:
    if os.environ.get("PGT_BIN"):
        p = Path(os.environ["PGT_BIN"])
    else:
        target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
        if not target.is_absolute():
            target = ROOT / target
        p = target / "debug" / "pgt"
    if not p.is_file():
        pytest.fail(
            f"the pgt binary is missing at {p}: build it with `cargo build -p pgt-host` (scripts/test.sh "
            "runs `cargo test --workspace` first, which builds it), or point $PGT_BIN at one"
        )
    return p


@pytest.fixture(scope="module")
def pgt_bin() -> Path:
    return pgt_binary()


@pytest.fixture(scope="module")
def wasm() -> Path:
    p = module_path()
    if not p.is_file():
        pytest.fail(f"{p} is missing: run scripts/build-wasm.sh")
    return p


def free_port() -> int:
    """A loopback port nothing listens on, outside the ephemeral range (32768–60999): a master port
    inside it can become a client's own source port before the store listens (a connection to
    itself, then the store cannot bind), which made jobs fail now and then under load."""
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    while True:
        port = rng.randrange(20_000, 32_000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def job_env(port: int, world: int, token: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RUST_LOG", "RANK")}
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        PGT_TOKEN=token,
        PGT_TIMEOUT_SECS="30",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_job(ranks: dict, timeout: float = JOB_TIMEOUT) -> dict:
    """Starts one process per rank ({rank: (argv, env)}) and waits for all, killing every one that is still
    running at the deadline. Returns {rank: (returncode, stdout, stderr)}."""
    procs = {}
    for rank, (argv, env) in ranks.items():
        env = dict(env, RANK=str(rank))
        procs[rank] = subprocess.Popen(
            [str(a) for a in argv],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
    out, timed_out = {}, []
    deadline = time.monotonic() + timeout
    try:
        for rank, p in procs.items():
            try:
                so, se = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                so, se = p.communicate()
                timed_out.append(rank)
            out[rank] = (p.returncode, so, se)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    if timed_out:
        pytest.fail(f"ranks {timed_out} still running after {timeout} s: {out}")
    return out


def python_rank(wasm: Path, *args) -> list:
    return [sys.executable, "-m", "pgt", "recv", "--wasm", wasm, "--timeout", "30", *args]


# ---- safetensors by hand (no numpy needed) ----

ST_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}


TORCH_NAME = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}


def write_safetensors(path: Path, tensors: list, metadata: dict | None = None):
    header, blobs, off = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def read_safetensors(path: Path) -> tuple[dict | None, dict]:
    """(metadata, {name: (dtype, shape, bytes)}), checking the layout rules on the way."""
    b = path.read_bytes()
    (n,) = struct.unpack_from("<Q", b)
    header = json.loads(b[8 : 8 + n])
    data = b[8 + n :]
    meta = header.pop("__metadata__", None)
    out, end = {}, 0
    for name, t in header.items():
        lo, hi = t["data_offsets"]
        count = 1
        for d in t["shape"]:
            count *= d
        assert hi - lo == count * ST_SIZES[t["dtype"]], name
        out[name] = (t["dtype"], t["shape"], data[lo:hi])
        end = max(end, hi)
    assert end == len(data), "bytes after the last tensor"
    return meta, out


def checkpoint(rng: random.Random) -> list:
    """A few tensors of many dtypes: nested names, a zero-size and a 0-dim tensor, one large enough to be
    chunked (with --chunk-size 1KiB) and small ones coalesced into buckets (--bucket-size 256)."""

    def t(name, dtype, shape, data=None):
        n = ST_SIZES[dtype]
        for d in shape:
            n *= d
        return (name, dtype, shape, data if data is not None else rng.randbytes(n))

    return [
        t("model.layers.0.weight", "F32", [3, 4]),
        t("model.layers.0.bias", "BF16", [5]),
        t("model.layers.1.weight", "F16", [2, 3, 2]),
        t("model.embed", "F64", [25, 28]),  # 5600 bytes: 6 chunks of at most 1 KiB
        t("ids", "I64", [2, 3]),
        t("counts.i32", "I32", [4]),
        t("counts.i16", "I16", [3]),
        t("counts.i8", "I8", [7]),
        t("counts.u64", "U64", [2]),
        t("counts.u32", "U32", [2]),
        t("counts.u16", "U16", [3]),
        t("pixels", "U8", [4, 4]),
        t("fp8.e4m3", "F8_E4M3", [6]),
        t("fp8.e5m2", "F8_E5M2", [6]),
        t("mask", "BOOL", [9], bytes(rng.randrange(2) for _ in range(9))),
        t("empty", "F32", [0, 3]),
        t("scalar", "F64", []),
    ]


def assert_same_tensors(got_path: Path, want: list):
    meta, got = read_safetensors(got_path)
    assert set(got) == {name for name, *_ in want}
    for name, dtype, shape, data in want:
        assert got[name][0] == dtype, name
        assert got[name][1] == shape, name
        assert got[name][2] == data, f"{name}: bytes differ"
    return meta


@pytest.fixture
def ckpt(tmp_path):
    tensors = checkpoint(random.Random(1234))
    path = tmp_path / "in.safetensors"
    write_safetensors(path, tensors, {"pgt.step": "7", "note": "hello"})
    return path, tensors


SMALL_PLAN = ["--bucket-size", "256", "--chunk-size", "1KiB"]


def check_ok(res, *ranks):
    for r in ranks:
        code, so, se = res[r]
        assert code == 0, f"rank {r} failed ({code}):\nstdout: {so}\nstderr: {se}"


# ---- against `pgt send` ----


def test_receives_a_checkpoint_from_pgt_send(pgt_bin, wasm, ckpt, tmp_path):
    src, tensors = ckpt
    port, token = free_port(), secrets.token_hex(16)
    env = job_env(port, 2, token)
    out = tmp_path / "out.safetensors"
    npz = ["--npz", tmp_path / "out.npz"] if HAVE_NUMPY else []
    res = run_job(
        {
            0: (
                [
                    pgt_bin,
                    "send",
                    src,
                    "--dst",
                    "1",
                    "--fanout",
                    "direct",
                    *SMALL_PLAN,
                    "--timeout",
                    "30",
                    "-q",
                ],
                env,
            ),
            1: (python_rank(wasm, "--out", out, *npz), env),
        }
    )
    check_ok(res, 0, 1)
    assert "received" in res[1][2] and "(step 7)" in res[1][2], res[1][2]
    meta = assert_same_tensors(out, tensors)
    assert meta == {"pgt.step": "7", "note": "hello"}
    if HAVE_NUMPY:
        import numpy as np

        z = np.load(tmp_path / "out.npz")
        dtypes = json.loads(str(z["__pgt_dtypes__"]))
        for name, dtype, shape, data in tensors:
            assert list(z[name].shape) == shape, name
            assert z[name].tobytes() == data, name
            assert dtypes[name] == TORCH_NAME[dtype], name


@pytest.mark.parametrize("python_at", [1, 2], ids=["python-relays", "python-last"])
def test_chain_with_a_rust_receiver(pgt_bin, wasm, ckpt, tmp_path, python_at):
    """Chain fan-out 0 -> 1 -> 2: the Python rank forwards the data to rank 2 as the module orders
    (python-relays), or receives it from a Rust relay (python-last); both ranks end with every byte."""
    src, tensors = ckpt
    port, token = free_port(), secrets.token_hex(16)
    env = job_env(port, 3, token)
    outs = {r: tmp_path / f"out{r}.safetensors" for r in (1, 2)}
    rust_at = 3 - python_at
    res = run_job(
        {
            0: (
                [
                    pgt_bin,
                    "send",
                    src,
                    "--dst",
                    "1,2",
                    "--fanout",
                    "chain",
                    *SMALL_PLAN,
                    "--timeout",
                    "30",
                    "-q",
                ],
                env,
            ),
            python_at: (python_rank(wasm, "--out", outs[python_at]), env),
            rust_at: ([pgt_bin, "recv", "--out", outs[rust_at], "--timeout", "30", "-q"], env),
        }
    )
    check_ok(res, 0, 1, 2)
    for r in (1, 2):
        assert assert_same_tensors(outs[r], tensors)["pgt.step"] == "7"


def test_direct_to_two_python_ranks(pgt_bin, wasm, ckpt, tmp_path):
    """Two Python ranks in one job: rank 1 connects to rank 2 itself (each rank connects to every higher
    one); the destination order is not the rank order."""
    src, tensors = ckpt
    port, token = free_port(), secrets.token_hex(16)
    env = job_env(port, 3, token)
    res = run_job(
        {
            0: (
                [
                    pgt_bin,
                    "send",
                    src,
                    "--dst",
                    "2,1",
                    "--fanout",
                    "direct",
                    "--timeout",
                    "30",
                    "-q",
                ],
                env,
            ),
            1: (python_rank(wasm, "--out", tmp_path / "o1.safetensors"), env),
            2: (python_rank(wasm, "--out", tmp_path / "o2.safetensors"), env),
        }
    )
    check_ok(res, 0, 1, 2)
    for r in (1, 2):
        assert_same_tensors(tmp_path / f"o{r}.safetensors", tensors)


def test_python_rank_zero_hosts_the_store(pgt_bin, wasm, ckpt, tmp_path):
    src, tensors = ckpt
    port, token = free_port(), secrets.token_hex(16)
    env = job_env(port, 2, token)
    res = run_job(
        {
            1: ([pgt_bin, "send", src, "--dst", "0", "--timeout", "30", "-q"], env),
            0: (python_rank(wasm, "--src", "1", "--out", tmp_path / "o.safetensors"), env),
        }
    )
    check_ok(res, 0, 1)
    assert_same_tensors(tmp_path / "o.safetensors", tensors)


def test_wrong_token_fails_cleanly(pgt_bin, wasm, ckpt, tmp_path):
    src, _ = ckpt
    port = free_port()
    out = tmp_path / "out.safetensors"
    res = run_job(
        {
            0: (
                [pgt_bin, "send", src, "--dst", "1", "--timeout", "10", "-q"],
                job_env(port, 2, "the-right-token", PGT_TIMEOUT_SECS=5),
            ),
            1: (python_rank(wasm, "--out", out), job_env(port, 2, "a-wrong-token")),
        }
    )
    code, _, err = res[1]
    assert code == 3, err
    assert "AuthFailed" in err and "does not know the job token" in err, err
    assert "Traceback" not in err, err
    assert not out.exists()
    assert res[0][0] != 0  # the sender's rendezvous times out: rank 1 never registered


def test_step_mismatch_is_the_modules_named_error(pgt_bin, wasm, ckpt, tmp_path):
    src, _ = ckpt
    port, token = free_port(), secrets.token_hex(16)
    env = job_env(port, 2, token)
    out = tmp_path / "out.safetensors"
    res = run_job(
        {
            0: ([pgt_bin, "send", src, "--dst", "1", "--timeout", "10", "-q"], env),
            1: (python_rank(wasm, "--out", out, "--expect-step", "5"), env),
        }
    )
    code, _, err = res[1]
    assert code == 1, err
    assert "StepMismatch" in err and "Traceback" not in err, err
    assert not out.exists()


def test_no_store_times_out(wasm, tmp_path):
    env = job_env(free_port(), 2, "t", PGT_TIMEOUT_SECS=1)
    res = run_job({1: (python_rank(wasm, "--out", tmp_path / "o.safetensors"), env)}, timeout=30)
    code, _, err = res[1]
    assert code == 3 and "could not reach the rendezvous store" in err, err


# ---- against a Python sender (the module's sender state machine over pgt_tcp) ----


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _vec(items) -> bytes:
    items = list(items)
    return _varint(len(items)) + b"".join(items)


def _str(s: str) -> bytes:
    return _varint(len(s.encode())) + s.encode()


def _tensor(dtype: str, shape, stride, offset: int, nbytes: int) -> bytes:
    return _varint(1) + _layout(dtype, shape, stride, offset, nbytes)


def _layout(dtype: str, shape, stride, offset: int, nbytes: int) -> bytes:
    return (
        _varint(DTYPES.index(dtype))
        + _vec(map(_varint, shape))
        + _vec(map(_varint, stride))
        + _varint(offset)
        + _varint(nbytes)
    )


def _shard_meta(offsets, sizes, placement: str) -> bytes:
    return _vec(map(_varint, offsets)) + _vec(map(_varint, sizes)) + _str(placement)


def _dtensor() -> bytes:
    """Leaf::DTensor: float32 local [2] of global [4], mesh [2] on ranks 0, 1, Shard(0)."""
    mesh = _vec([_varint(2)]) + _vec([_varint(0), _varint(1)]) + b"\x00" + _str("cpu")
    spec = (
        mesh
        + _vec([_varint(0) + _varint(0)])
        + _vec([_varint(4)])
        + _vec([_varint(1)])
        + _varint(1)
    )
    return _varint(2) + _layout("float32", [2], [1], 0, 8) + spec


def _sharded() -> bytes:
    """Leaf::Sharded: int32 global [4]; the local shard is [2:4] (placed on rank 0 by the sender)."""
    local = _layout("int32", [2], [1], 0, 8) + _shard_meta([2], [2], "rank:0/cpu")
    glob = _vec([_shard_meta([0], [2], "rank:2/cpu"), _shard_meta([2], [2], "rank:0/cpu")]) + _vec(
        [_varint(4)]
    )
    return _varint(3) + _vec([local]) + glob + _varint(DTYPES.index("int32"))


def _metadata(step, dests, keys, leaves) -> bytes:
    """postcard Metadata (PROTOCOL.md §6): a root dict of leaves, Direct fan-out from rank 0."""
    return (
        b"\x01"
        + _varint(step)
        + _varint(0)
        + _vec(map(_varint, dests))
        + _varint(0)
        + _varint(256)
        + _varint(1024)  # Direct, bucket 256, chunk 1 KiB
        + _vec([_varint(0) + _vec(_varint(0) + _str(k) for k in keys)] + [_varint(3)] * len(keys))
        + _vec(leaves)
    )


def _python_send(port, token, metadata, storages, corrupt=None, errors=None, world=2, stale=()):
    """Rank 0 in Python: hosts the store, joins, and drives the module's sender; ``corrupt`` = a storage
    whose bytes get one bit flipped on the wire *after* hashing; ``stale`` = (tag, bytes) messages sent
    to rank 1 before the transfer (another transfer's, which the receiver must skip)."""
    from pgt.tcp import TcpGroup, TcpOptions

    try:
        # A random transfer id, as every sender picks one.
        s = Pgt.load().sender(metadata, digests=True, transfer_id=secrets.randbits(64))
        with TcpGroup.join(
            TcpOptions("127.0.0.1", port, 0, world, token.encode(), timeout=30)
        ) as pg:
            for tag, message in stale:
                pg.send(1, tag, [message], 30)
            hashers, digests = {}, []
            while True:  # as pgt_core::drive::send, each send done (and hashed) at once
                while digests:
                    s.handle_digests(*digests.pop(0))
                op = s.poll()
                if op["type"] == "done":
                    break
                assert op["type"] == "send", op
                if op["kind"] != "data":
                    parts = [s.bytes(op["message"])]
                else:  # the transfer id's prefix, then the storage bytes
                    parts, done = [prefix_bytes(op["prefix"])], []
                    for seg in s.plan[op["message"]]["segments"]:
                        st, off, n = seg["storage"], seg["offset"], seg["len"]
                        part = storages[st][off : off + n]
                        if op["hash"]:
                            hashers.setdefault(st, xxhash.xxh3_64()).update(part)
                            if seg["completes"]:
                                done.append(hashers.pop(st).intdigest())
                        if st == corrupt:
                            part = bytes([part[0] ^ 1]) + part[1:]
                        parts.append(part)
                    if op["hash"]:
                        digests.append((op["message"], done))
                pg.send(op["to"], op["tag"], parts, 30)
    except Exception as e:  # reported by the test
        errors.append(e)


def _with_python_sender(wasm, tmp_path, metadata, storages, corrupt=None, extra=(), stale=()):
    port, token = free_port(), secrets.token_hex(16)
    errors = []
    t = threading.Thread(
        target=_python_send,
        args=(port, token, metadata, storages, corrupt, errors, 2, stale),
        daemon=True,
    )
    t.start()
    out = tmp_path / "out.safetensors"
    res = run_job({1: (python_rank(wasm, "--out", out, *extra), job_env(port, 2, token))})
    t.join(JOB_TIMEOUT)
    assert not t.is_alive(), "the Python sender hangs"
    assert not errors, errors
    return res[1], out


def _strided_job(dests=(1,)):
    f32 = lambda *xs: struct.pack(f"<{len(xs)}f", *xs)  # noqa: E731
    storages = [
        f32(0, 1, 2, 3, 4, 5),
        f32(10, 11, 12, 13, 14),
        bytes(range(200)) * 7,
        f32(-1, -2),
        struct.pack("<2i", 7, -8),
    ]
    leaves = [
        _tensor("float32", [3, 2], [1, 3], 0, 24),  # a transposed [2, 3]: [[0, 3], [1, 4], [2, 5]]
        _tensor("float32", [2], [2], 1, 20),  # every other element from 1: [11, 13]
        _varint(0) + _varint(2) + _varint(84),  # Value::Int(42) (zigzag)
        _tensor("uint8", [1400], [1], 0, 1400),  # chunked
        _dtensor(),
        _sharded(),
    ]
    return _metadata(9, list(dests), ["t", "odd", "count", "blob", "dt", "sh"], leaves), storages


def test_strided_views_values_and_step_from_a_python_sender(wasm, tmp_path):
    metadata, storages = _strided_job()
    (code, _, err), out = _with_python_sender(wasm, tmp_path, metadata, storages)
    assert code == 0, err
    meta, got = read_safetensors(out)
    f32 = lambda *xs: struct.pack(f"<{len(xs)}f", *xs)  # noqa: E731
    assert got["t"] == ("F32", [3, 2], f32(0, 3, 1, 4, 2, 5))
    assert got["odd"] == ("F32", [2], f32(11, 13))
    assert got["blob"] == ("U8", [1400], storages[2])
    assert got["dt"] == ("F32", [2], storages[3])
    assert got["sh.shard0"] == ("I32", [2], storages[4])
    assert meta == {
        "count": "42",
        "pgt.step": "9",
        "pgt.dtensor.dt": '{"global_shape":[4],"mesh":[2],"placements":["Shard(0)"]}',
        # the module rewrote the local shard's placement to the receiving rank
        "pgt.sharded.sh": '{"dtype":"int32","global_size":[4],"local_shards":[{"offsets":[2],"placement":"rank:1/cpu","sizes":[2]}]}',
    }


def test_stale_messages_of_another_transfer_are_skipped(wasm, tmp_path):
    """Messages of another transfer (another 8-byte prefix) wait for the receiver under the metadata's,
    a data message's and the trailer's tags, some of the right length, some not: it skips every one
    and receives this transfer's checkpoint, byte for byte."""
    metadata, storages = _strided_job()
    other = (0xFEDC_BA98_7654_3210).to_bytes(8, "little")
    stale = [
        (2, other + b"\x00" * 90),
        (3, other + b"\xee" * 100),
        (3, other + b"\xdd" * 5),
        (4, other + bytes(64)),
    ]
    (code, _, err), out = _with_python_sender(wasm, tmp_path, metadata, storages, stale=stale)
    assert code == 0, err
    _, got = read_safetensors(out)
    assert got["blob"] == ("U8", [1400], storages[2])
    assert got["dt"] == ("F32", [2], storages[3])
    assert got["sh.shard0"] == ("I32", [2], storages[4])


def test_output_matches_pgt_recv(pgt_bin, wasm, tmp_path):
    """One transfer from the Python sender, Direct to a Python rank and a Rust `pgt recv`: both write the
    same tensors (names, dtypes, shapes, bytes) and the same __metadata__."""
    metadata, storages = _strided_job(dests=(1, 2))
    port, token = free_port(), secrets.token_hex(16)
    errors = []
    t = threading.Thread(
        target=_python_send, args=(port, token, metadata, storages, None, errors, 3), daemon=True
    )
    t.start()
    env = job_env(port, 3, token)
    outs = {r: tmp_path / f"o{r}.safetensors" for r in (1, 2)}
    res = run_job(
        {
            1: (python_rank(wasm, "--out", outs[1]), env),
            2: ([pgt_bin, "recv", "--out", outs[2], "--timeout", "30", "-q"], env),
        }
    )
    t.join(JOB_TIMEOUT)
    assert not t.is_alive() and not errors, errors
    check_ok(res, 1, 2)
    py, rust = read_safetensors(outs[1]), read_safetensors(outs[2])
    assert py[1] == rust[1]
    # the sharded tensor's placement names the receiving rank, which differs
    py_meta = {k: v.replace("rank:1/", "rank:R/") for k, v in py[0].items()}
    rust_meta = {k: v.replace("rank:2/", "rank:R/") for k, v in rust[0].items()}
    assert py_meta == rust_meta


def test_corrupted_bytes_are_a_digest_mismatch(wasm, tmp_path):
    metadata, storages = _strided_job()
    (code, _, err), out = _with_python_sender(wasm, tmp_path, metadata, storages, corrupt=2)
    assert code == 1, err
    assert "DigestMismatch" in err and "blob" in err, err
    assert not out.exists()


def test_view_bytes_without_numpy_matches_numpy():
    """The pure-Python gather of a strided view equals the numpy one (the receiver uses numpy when it is
    installed)."""
    from pgt import recv as pgt_recv

    buf = bytes(range(256)) * 2
    layout = {
        "dtype": "int16",
        "shape": [3, 4, 2],
        "stride": [1, 9, 40],
        "storage_offset": 5,
        "nbytes": 512,
    }
    want = b"".join(
        buf[(5 + i + 9 * j + 40 * k) * 2 :][:2]
        for i in range(3)
        for j in range(4)
        for k in range(2)
    )
    saved = pgt_recv.np
    try:
        pgt_recv.np = None
        assert bytes(pgt_recv.view_bytes(buf, layout)) == want
    finally:
        pgt_recv.np = saved
    assert bytes(pgt_recv.view_bytes(buf, layout)) == want
    dense = {
        "dtype": "int16",
        "shape": [2, 1, 3],
        "stride": [3, 7, 1],
        "storage_offset": 4,
        "nbytes": 512,
    }
    assert bytes(pgt_recv.view_bytes(buf, dense)) == buf[8:20]
