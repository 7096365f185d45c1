"""pgt.numpy: checkpoints of nested numpy arrays over pgt's TCP process group, without torch — between
two Python ranks (threads of this process), to and from Rust ranks (`pgt recv`, `pgt send`), and in a
chain with a Rust relay. Every dtype, nested containers, strided/offset/broadcast views, values, in
place with casts, and the failures: an unsupported leaf (refused before anything is sent), a corrupted
byte (DigestMismatch, nothing returned), a stalled sender (a timeout within timeout + 1 s)."""

from __future__ import annotations

import secrets
import subprocess
import sys
import threading
import time

import ml_dtypes
import numpy as np
import pytest
from test_python_receiver import (
    JOB_TIMEOUT,
    ROOT,
    free_port,
    job_env,
    pgt_binary,
    read_safetensors,
    write_safetensors,
)

from pgt.abi import PgtError
from pgt.dtypes import RawBits, convert
from pgt.metadata import UnsupportedLeaf
from pgt.numpy import DTensor, recv_checkpoint, send_checkpoint
from pgt.tcp import PgError, PgTimeout, TcpGroup, TcpOptions

RNG = np.random.default_rng(7)


def rand(dtype, shape) -> np.ndarray:
    dt = np.dtype(dtype)
    n = int(np.prod(shape)) * dt.itemsize
    raw = RNG.integers(0, 256, size=n, dtype=np.uint8)
    if dt == np.bool_:
        raw = raw % 2
    return raw.view(dt).reshape(shape)


def same(a, b):
    """Same dtype, shape and element bytes (row-major)."""
    if isinstance(b, RawBits):
        assert isinstance(a, RawBits) and a.dtype == b.dtype
        a, b = a.bits, b.bits
    b = np.asarray(b)
    assert a.dtype == b.dtype.newbyteorder("<") or a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape
    want = (
        np.ascontiguousarray(b).astype(b.dtype.newbyteorder("<")) if b.dtype.byteorder == ">" else b
    )
    assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(want).tobytes()


class Job:
    """Ranks of one TCP group as threads of this process: ``run({rank: fn(pg)})`` joins every rank and
    runs its function; returns {rank: result}; re-raises the first rank's exception."""

    def __init__(self, world: int):
        self.port, self.token, self.world = free_port(), secrets.token_bytes(16), world

    def run(self, fns: dict, timeout: float = JOB_TIMEOUT) -> dict:
        out, errs = {}, {}

        def go(rank, fn):
            try:
                opts = TcpOptions("127.0.0.1", self.port, rank, self.world, self.token, timeout=30)
                with TcpGroup.join(opts) as pg:
                    out[rank] = fn(pg)
            except BaseException as e:  # reported below
                errs[rank] = e

        ts = [threading.Thread(target=go, args=(r, f), daemon=True) for r, f in fns.items()]
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout)
            assert not t.is_alive(), "a rank hangs"
        self.errors = errs
        for r in sorted(errs):
            raise errs[r]
        return out


def every_dtype() -> dict:
    bf16, f8 = ml_dtypes.bfloat16, ml_dtypes
    return {
        "float64": rand("<f8", (3, 2)),
        "float32": rand("<f4", (4,)),
        "float16": rand("<f2", (2, 2)),
        "bfloat16": rand(bf16, (5,)),
        "float8_e4m3fn": rand(f8.float8_e4m3fn, (3,)),
        "float8_e5m2": rand(f8.float8_e5m2, (3,)),
        "float8_e4m3fnuz": rand(f8.float8_e4m3fnuz, (3,)),
        "float8_e5m2fnuz": rand(f8.float8_e5m2fnuz, (3,)),
        "complex128": rand("<c16", (2,)),
        "complex64": rand("<c8", (2,)),
        "complex32": RawBits(rand("<u4", (3,)), "complex32"),
        "int64": rand("<i8", (2,)),
        "int32": rand("<i4", (2,)),
        "int16": rand("<i2", (2,)),
        "int8": rand("i1", (2,)),
        "uint64": rand("<u8", (2,)),
        "uint32": rand("<u4", (2,)),
        "uint16": rand("<u2", (2,)),
        "uint8": rand("u1", (2,)),
        "bool": rand("?", (7,)),
    }


def views() -> dict:
    base = rand("<f4", (6, 10))
    return {
        "transposed": base.T,
        "offset_block": base[2:5, 3:9],
        "stepped": base[::2, 1::3],
        "broadcast": np.broadcast_to(rand("<f8", (3,)), (4, 3)),
        "reversed": rand("<i4", (9,))[::-1],  # a negative stride: sent as a contiguous copy
        "big_endian": rand(">f8", (3,)),
        "scalar0d": np.array(2.5, dtype=np.float32),
        "numpy_scalar": np.int16(-7),
        "empty": np.zeros((0, 3), np.int64),
        "empty_view": base[3:3],
    }


VALUES = {
    "none": None,
    "t": True,
    "i": -(1 << 62),
    "f": 0.1,
    "nan": float("nan"),
    "s": "é",
    "b": b"\x00\xff",
}


def nested() -> dict:
    return {
        "dtypes": every_dtype(),
        "views": views(),
        "values": VALUES,
        "list": [rand("<f4", (2,)), [rand("u1", (3,)), "x"], (1, rand("<i8", (1,)))],
        7: {-3: rand("<f2", (2,))},
    }


def check_tree(got, want):
    if isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want)
        for k in want:
            check_tree(got[k], want[k])
    elif isinstance(want, list | tuple):
        assert type(got) is type(want) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            check_tree(g, w)
    elif isinstance(want, np.ndarray | np.generic | RawBits):
        same(got, want if isinstance(want, RawBits) else np.asarray(want))
    elif isinstance(want, float) and want != want:
        assert isinstance(got, float) and got != got
    else:
        assert type(got) is type(want) and got == want


def test_round_trip_between_python_ranks():
    """Every dtype, nested dicts/lists/tuples with str and int keys, views and values, twice (digests on
    and off), over one link: what arrives is what was sent, views keep their layout, nothing is
    copied (each array is a view of a received storage)."""
    sd = nested()
    res = Job(2).run(
        {
            0: lambda pg: [
                send_checkpoint(pg, [1], sd, step=11, chunk_size=1024, bucket_size=64),
                send_checkpoint(pg, 1, sd, digests=False, fanout="direct"),
            ],
            1: lambda pg: [
                recv_checkpoint(pg, 0, expected_step=11, return_step=True),
                recv_checkpoint(pg, 0, return_step=True),
            ],
        }
    )
    (got, step), (got2, step2) = res[1]
    assert (step, step2) == (11, None)
    for g in (got, got2):
        check_tree(g, sd)
        v = g["views"]
        # The layouts of views survive: strides in elements as sent.
        assert v["transposed"].strides == sd["views"]["transposed"].strides
        assert v["stepped"].strides == sd["views"]["stepped"].strides
        assert v["broadcast"].strides[0] == 0
        assert v["reversed"].flags.c_contiguous  # a negative stride travels as a copy
        assert g["dtypes"]["bfloat16"].dtype == ml_dtypes.bfloat16
        assert isinstance(g["dtypes"]["complex32"], RawBits)
        # Built over the received storages: no array owns its memory; they are writable.
        for k, a in g["dtypes"].items():
            if isinstance(a, np.ndarray):
                assert not a.flags.owndata and a.flags.writeable, k


def test_in_place_with_casts_then_a_refused_target():
    """Into existing arrays: same dtype (the same object back, bytes in its memory), float32 -> float64
    and float32 -> bfloat16 (the module's casts, rounded as pgt-core rounds), a transposed target of a
    transposed sender; then a target of the wrong size (InPlaceSizeMismatch, drained: the next
    transfer on the link arrives whole)."""
    w32 = (RNG.standard_normal((4, 5)) * 1000).astype(np.float32)
    sd = {"same": rand("<i4", (3, 2)), "up": w32, "down": w32.copy(), "t": w32.T, "v": 3}
    target = {
        "same": np.zeros((3, 2), np.int32),
        "up": np.zeros((4, 5), np.float64),
        "down": np.zeros((4, 5), ml_dtypes.bfloat16),
        "t": np.zeros((4, 5), np.float32).T,
        "extra": np.zeros(1),
    }
    keep = dict(target)
    bad = {"same": np.zeros((2, 2), np.int32)}

    def rx(pg):
        first = recv_checkpoint(pg, 0, state_dict=target)
        with pytest.raises(PgtError) as e:
            recv_checkpoint(pg, 0, state_dict=bad)
        assert e.value.name == "InPlaceSizeMismatch" and "same" in e.value.message
        return first, recv_checkpoint(pg, 0, expected_step=3)

    res = Job(2).run(
        {
            0: lambda pg: [send_checkpoint(pg, [1], sd, step=s) for s in (1, 2, 3)],
            1: rx,
        }
    )
    got, third = res[1]
    assert set(got) == {"same", "up", "down", "t", "v"}  # the result is what was sent
    for k in ("same", "up", "down", "t"):
        assert got[k] is keep[k], k
    same(got["same"], sd["same"])
    assert np.array_equal(got["up"], w32.astype(np.float64))
    want_bf16 = np.zeros(20, np.uint16)
    convert("float32", w32, "bfloat16", want_bf16)
    assert np.array_equal(got["down"].view(np.uint16).ravel(), want_bf16)
    assert np.array_equal(got["down"], w32.astype(ml_dtypes.bfloat16))  # nearest even, as ml_dtypes
    assert np.array_equal(got["t"], w32.T)
    check_tree(third, sd)


def test_unsupported_leaves_are_refused_before_anything_is_sent():
    class Thing:
        pass

    from collections import namedtuple

    Point = namedtuple("Point", "x y")
    cases = [
        ({"a": {"b": [np.zeros(2), Thing()]}}, "['a']['b'][1]", "Thing"),
        ({"m": np.array(["x"], dtype=object)}, "['m']", "object"),
        ({"s": np.array(["ab"])}, "['s']", "<U2"),
        ({"q": np.zeros(2, np.longdouble)}, "['q']", "float128"),
        ({"d": np.zeros(2, "datetime64[s]")}, "['d']", "datetime64"),
        ({"p": Point(1, 2)}, "['p']", "Point"),
        ({"big": 1 << 127}, "['big']", "outside i128"),
        ({"set": {1, 2}}, "['set']", "set"),
    ]

    def tx(pg):
        for sd, path, what in cases:
            with pytest.raises(UnsupportedLeaf) as e:
                send_checkpoint(pg, [1], sd)
            assert path in str(e.value) and what in str(e.value), str(e.value)
        # Nothing of those went out: the receiver's first transfer is this one.
        send_checkpoint(pg, [1], {"ok": np.arange(3)}, step=5)

    res = Job(2).run({0: tx, 1: lambda pg: recv_checkpoint(pg, 0, expected_step=5, timeout=20)})
    assert np.array_equal(res[1]["ok"], np.arange(3))


class CorruptingHost:
    """Sends as pgt.numpy does, but flips one bit of the first data message after it was hashed."""

    def __init__(self, pg):
        self.pg, self.done = pg, False

    def send(self, op, parts):
        if op["kind"] == "data" and not self.done:
            first = bytearray(parts[1])
            first[0] ^= 1
            parts = [parts[0], first, *parts[2:]]
            self.done = True
        self.pg.send(op["to"], op["tag"], parts, 30)


def test_a_corrupted_byte_is_a_digest_mismatch_and_nothing_is_returned():
    from pgt.abi import Pgt
    from pgt.metadata import encode
    from pgt.numpy import _leaves_of
    from pgt.send import send

    sd = {"layer": {"w": rand("<f4", (8,))}}

    def tx(pg):
        tree, leaves, storages = _leaves_of(sd)
        send(Pgt.load(), CorruptingHost(pg), encode(1, 0, [1], None, tree, leaves), storages)
        send_checkpoint(pg, [1], sd, step=2)

    def rx(pg):
        out = []
        with pytest.raises(PgtError) as e:
            out.append(recv_checkpoint(pg, 0))
        assert e.value.name == "DigestMismatch" and "['layer']['w']" in e.value.message
        assert out == []
        return recv_checkpoint(pg, 0, expected_step=2)  # the link is clean

    res = Job(2).run({0: tx, 1: rx})
    check_tree(res[1], sd)


def test_a_stalled_sender_times_out_within_the_timeout():
    """The sender sends header and metadata, then nothing: the receiver fails with PgTimeout within
    timeout + 1 s of its last message."""
    release = threading.Event()

    class Stall:
        def __init__(self, pg):
            self.pg = pg

        def send(self, op, parts):
            if op["kind"] == "data":
                release.wait(30)
                raise RuntimeError("stalled on purpose")
            self.pg.send(op["to"], op["tag"], parts, 30)

    def tx(pg):
        from pgt.abi import Pgt
        from pgt.metadata import encode
        from pgt.numpy import _leaves_of
        from pgt.send import send

        tree, leaves, storages = _leaves_of({"w": np.zeros(100)})
        with pytest.raises(RuntimeError):
            send(Pgt.load(), Stall(pg), encode(None, 0, [1], None, tree, leaves), storages)

    timeout = 1.5

    def rx(pg):
        start = time.monotonic()
        try:
            with pytest.raises(PgTimeout):
                recv_checkpoint(pg, 0, timeout=timeout)
            return time.monotonic() - start
        finally:
            release.set()

    took = Job(2).run({0: tx, 1: rx})[1]
    assert timeout <= took < timeout + 1.0, took


def big() -> dict:
    """Enough bytes in enough messages (4 KiB chunks) that a dead peer is noticed mid-transfer."""
    return {f"w{i}": rand("<f4", (16384,)) for i in range(8)}


def dead(pg):
    """A rank that joins, then dies: its connections close."""
    pg.close()


def test_direct_a_dead_destination_fails_only_itself():
    """Direct fan-out to ranks 1 and 2, rank 2 gone: rank 1 gets the whole checkpoint byte-exact and
    the sender names rank 2 as failed (PROTOCOL.md §3, *When a destination fails*)."""
    from pgt.send import DestinationsFailed

    sd = big()

    def tx(pg):
        time.sleep(0.2)  # rank 2 has closed
        with pytest.raises(DestinationsFailed) as e:
            send_checkpoint(
                pg, [1, 2], sd, fanout="direct", chunk_size=4096, bucket_size=1024, timeout=5
            )
        return e.value

    res = Job(3).run({0: tx, 1: lambda pg: recv_checkpoint(pg, 0, timeout=5), 2: dead})
    err = res[0]
    assert (err.completed, list(err.failed), err.cut_off) == ([1], [2], [])
    assert isinstance(err.failed[2], PgError)
    check_tree(res[1], sd)


def test_chain_a_dead_last_rank_leaves_the_relay_whole(caplog):
    """Chain 1 -> 2, rank 2 gone: the relay's own checkpoint is complete and verified (its failed
    forward fails no receive, and is logged); the sender either completes (the header and metadata
    it sends rank 2 left before the close was seen) or names rank 2 as failed."""
    from pgt.send import DestinationsFailed

    sd = big()

    def tx(pg):
        time.sleep(0.2)
        try:
            send_checkpoint(pg, [1, 2], sd, chunk_size=4096, bucket_size=1024, timeout=5)
        except DestinationsFailed as e:
            assert (e.completed, list(e.failed), e.cut_off) == ([1], [2], [])

    with caplog.at_level("WARNING", logger="pgt"):
        res = Job(3).run({0: tx, 1: lambda pg: recv_checkpoint(pg, 0, timeout=5), 2: dead})
    check_tree(res[1], sd)
    assert any("forwarding message" in r.getMessage() for r in caplog.records), caplog.text


@pytest.mark.parametrize("fanout", ["Chain", "Direct"])
def test_the_destination_policy_is_the_cores(fanout):
    """What a failed destination does to the others comes from pgt-core through the module
    (``pgt_sender_destination_outcome``), not from a Python copy of the rule: in a chain the ranks
    after the first failed one are cut off, in Direct fan-out each stands alone."""
    from pgt.abi import Pgt
    from pgt.metadata import encode
    from pgt.numpy import _leaves_of

    tree, leaves, _ = _leaves_of({"w": np.zeros(4, np.float32)})
    plan = {"fanout": fanout, "bucket_size": 1024, "chunk_size": 4096}
    metadata = encode(None, 0, [4, 2, 7, 9], plan, tree, leaves)
    sender = Pgt.load().sender(metadata, digests=True, transfer_id=secrets.randbits(64))
    try:
        chain = fanout == "Chain"
        for failed, live, cut in [
            ([], [4, 2, 7, 9], []),
            ([2], [4], [7, 9]) if chain else ([2], [4, 7, 9], []),
            ([9, 2], [4], [7]) if chain else ([9, 2], [4, 7], []),
            ([4], [], [2, 7, 9]) if chain else ([4], [2, 7, 9], []),
            ([4, 2, 7, 9], [], []),
        ]:
            got = sender.destination_outcome(failed)
            assert (got["live"], got["cut_off"]) == (live, cut), failed
    finally:
        sender.drop()


def test_chain_a_dead_first_rank_cuts_off_the_rest():
    """Chain 1 -> 2, rank 1 gone: nobody is left to reach (rank 2's data would come through rank 1),
    so the send fails with rank 1's error, and rank 2's receive fails too — neither reports success."""

    def tx(pg):
        time.sleep(0.2)
        with pytest.raises(PgError):
            send_checkpoint(pg, [1, 2], big(), chunk_size=4096, bucket_size=1024, timeout=5)

    def rx(pg):
        with pytest.raises(PgError):
            recv_checkpoint(pg, 0, timeout=3)

    Job(3).run({0: tx, 1: dead, 2: rx})


def test_bad_arguments_are_named_errors():
    def tx(pg):
        for dst, what in [
            ([], "no destination"),
            ([0], "this rank"),
            ([5], "not a rank"),
            ([1, 1], "repeat"),
        ]:
            with pytest.raises(ValueError, match=what):
                send_checkpoint(pg, dst, {})
        with pytest.raises(ValueError, match="fanout"):
            send_checkpoint(pg, [1], {}, fanout="tree")
        with pytest.raises(PgtError, match="BadChunkSize"):
            send_checkpoint(pg, [1], {"a": np.zeros(1)}, chunk_size=100)
        with pytest.raises(ValueError, match="not another rank"):
            recv_checkpoint(pg, 0)
        with pytest.raises(ValueError, match="RawBits"):
            RawBits(np.zeros(2, np.uint8), "bfloat16")

    Job(2).run({0: tx, 1: lambda pg: None})


def test_without_ml_dtypes_bfloat16_and_float8_travel_as_raw_bits():
    """In a process where ml_dtypes cannot be imported: bfloat16/float8 arrays are sent and received
    as RawBits (uint16/uint8 bits with the dtype named), bit for bit."""
    script = r"""
import sys, threading, secrets, socket
sys.modules["ml_dtypes"] = None  # import ml_dtypes fails
import numpy as np
from pgt.numpy import send_checkpoint, recv_checkpoint, RawBits
from pgt.tcp import TcpGroup, TcpOptions
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
tok = secrets.token_bytes(8)
sd = {"bf": RawBits(np.arange(6, dtype=np.uint16).reshape(2, 3).T, "bfloat16"),
      "f8": RawBits(np.arange(4, dtype=np.uint8), "float8_e5m2fnuz"), "x": np.ones(2, np.float16)}
out = {}
def rx():
    with TcpGroup.join(TcpOptions("127.0.0.1", port, 1, 2, tok, 20)) as pg:
        out["r"] = recv_checkpoint(pg, 0, timeout=20)
t = threading.Thread(target=rx); t.start()
with TcpGroup.join(TcpOptions("127.0.0.1", port, 0, 2, tok, 20)) as pg:
    send_checkpoint(pg, [1], sd)
t.join(30)
r = out["r"]
assert isinstance(r["bf"], RawBits) and r["bf"].dtype == "bfloat16", r
assert r["bf"].bits.dtype == np.uint16 and np.array_equal(r["bf"].bits, sd["bf"].bits)
assert r["bf"].bits.strides == sd["bf"].bits.strides
assert isinstance(r["f8"], RawBits) and r["f8"].dtype == "float8_e5m2fnuz"
assert np.array_equal(r["f8"].bits, sd["f8"].bits) and r["x"].dtype == np.float16
print("ok")
"""
    p = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


# ---- with Rust ranks ----


def rust_checkpoint() -> dict:
    """What a safetensors file can hold (no complex, no fnuz float8), nested, with views and values."""
    d = every_dtype()
    for k in ("complex128", "complex64", "complex32", "float8_e4m3fnuz", "float8_e5m2fnuz"):
        del d[k]
    v = views()
    del v["big_endian"]  # fine to send, but compared below by its little-endian bytes
    return {"dtypes": d, "views": v, "note": "hi", "lr": 0.5}


def flat_names(sd, prefix=""):
    for k, x in sd.items():
        name = f"{prefix}{k}"
        if isinstance(x, dict):
            yield from flat_names(x, name + ".")
        else:
            yield name, x


ST = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8",
    "bool": "BOOL",
}  # fmt: skip


def check_rust_output(path, sd, step):
    from pgt.dtypes import pgt_dtype

    meta, got = read_safetensors(path)
    arrays = {n: np.asarray(x) for n, x in flat_names(sd) if not isinstance(x, str | float)}
    assert set(got) == set(arrays)
    for name, a in arrays.items():
        dtype, shape, data = got[name]
        assert dtype == ST[pgt_dtype(a.dtype)], name
        assert shape == list(a.shape), name
        assert data == np.ascontiguousarray(a).tobytes(), f"{name}: bytes differ"
    assert meta == {"note": "hi", "lr": "0.5", "pgt.step": str(step)}


def test_python_sends_to_rust_pgt_recv(tmp_path):
    """pgt.numpy.send_checkpoint -> `pgt recv`: every tensor byte-exact in the output file (views as
    their elements in row-major order, as `pgt recv` writes them)."""
    pgt_bin = pgt_binary()
    sd = rust_checkpoint()
    job = Job(2)
    env = job_env(job.port, 2, job.token.hex())
    out = tmp_path / "out.safetensors"
    rust = subprocess.Popen(
        [pgt_bin, "recv", "--out", out, "--timeout", "30", "-q"],
        env=dict(env, RANK="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        opts = TcpOptions("127.0.0.1", job.port, 0, 2, job.token.hex().encode(), timeout=30)
        with TcpGroup.join(opts) as pg:
            send_checkpoint(pg, [1], sd, step=42, chunk_size=1024, bucket_size=128)
        _, err = rust.communicate(timeout=JOB_TIMEOUT)
    finally:
        if rust.poll() is None:
            rust.kill()
    assert rust.returncode == 0, err
    check_rust_output(out, sd, 42)


def test_rust_pgt_send_to_python(tmp_path):
    """`pgt send FILE` -> pgt.numpy.recv_checkpoint: flat, keyed by the file's names, every tensor byte-exact
    and of its dtype (ml_dtypes' for bfloat16/float8), the file's metadata as strings, the step."""
    pgt_bin = pgt_binary()
    tensors = [
        ("model.layers.0.weight", "F32", [3, 4], rand("<f4", (3, 4))),
        ("model.layers.0.bias", "BF16", [5], rand(ml_dtypes.bfloat16, (5,))),
        ("model.embed", "F64", [25, 28], rand("<f8", (25, 28))),
        ("fp8", "F8_E5M2", [6], rand(ml_dtypes.float8_e5m2, (6,))),
        ("mask", "BOOL", [9], rand("?", (9,))),
        ("empty", "I32", [0, 3], np.zeros((0, 3), np.int32)),
        ("scalar", "I64", [], rand("<i8", ())),
    ]
    src = tmp_path / "in.safetensors"
    write_safetensors(
        src, [(n, d, s, a.tobytes()) for n, d, s, a in tensors], {"pgt.step": "9", "k": "v"}
    )
    job = Job(2)
    env = job_env(job.port, 2, job.token.hex())
    rust = subprocess.Popen(
        [pgt_bin, "send", src, "--dst", "1", "--chunk-size", "1KiB", "--bucket-size", "256",
         "--timeout", "30", "-q"],
        env=dict(env, RANK="0"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        opts = TcpOptions("127.0.0.1", job.port, 1, 2, job.token.hex().encode(), timeout=30)
        with TcpGroup.join(opts) as pg:
            got, step = recv_checkpoint(pg, 0, expected_step=9, timeout=30, return_step=True)
        _, err = rust.communicate(timeout=JOB_TIMEOUT)
    finally:
        if rust.poll() is None:
            rust.kill()
    assert rust.returncode == 0, err
    assert step == 9
    assert got["__metadata__"] == {"k": "v", "pgt.step": "9"}
    assert list(got) == ["__metadata__", *(n for n, *_ in tensors)]
    for name, _, shape, a in tensors:
        x = got[name]
        assert x.dtype == a.dtype and list(x.shape) == shape, name
        assert x.tobytes() == a.tobytes(), name


def test_chain_with_a_rust_relay(tmp_path):
    """Chain 0 -> 1 -> 2: Python sends (pgt.numpy), Rust `pgt recv` relays, Python receives: both
    receivers have every byte."""
    pgt_bin = pgt_binary()
    sd = rust_checkpoint()
    job = Job(3)
    env = job_env(job.port, 3, job.token.hex())
    out = tmp_path / "relay.safetensors"
    rust = subprocess.Popen(
        [pgt_bin, "recv", "--out", out, "--timeout", "30", "-q"],
        env=dict(env, RANK="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    job.token = job.token.hex().encode()
    try:
        res = Job.run(
            job,
            {
                0: lambda pg: send_checkpoint(
                    pg, [1, 2], sd, step=3, chunk_size=512, bucket_size=64
                ),
                2: lambda pg: recv_checkpoint(pg, 0, timeout=30),
            },
        )
        _, err = rust.communicate(timeout=JOB_TIMEOUT)
    finally:
        if rust.poll() is None:
            rust.kill()
    assert rust.returncode == 0, err
    check_rust_output(out, sd, 3)
    check_tree(res[2], sd)


def test_dtensor_leaves_round_trip():
    spec = {
        "mesh": {"shape": [2], "ranks": [0, 1], "dim_names": None, "device_type": "cpu"},
        "placements": ["Shard(0)"],
        "global_shape": [4],
        "global_stride": [1],
        "dtype": "float32",
    }
    sd = {"d": DTensor(np.arange(2, dtype=np.float32), spec)}
    got = Job(2).run(
        {0: lambda pg: send_checkpoint(pg, [1], sd), 1: lambda pg: recv_checkpoint(pg, 0)}
    )[1]
    assert isinstance(got["d"], DTensor) and got["d"].spec == spec
    same(got["d"].local, sd["d"].local)
