"""pgt.torch.PGTransport over pgt's TCP process group (``pgt.tcp.TcpGroup``), with Rust ranks: torch
tensors to a Rust `pgt recv` (its output file byte-exact), from a Rust `pgt send` (fresh, and in place
with casts), Python -> Rust relay -> Python byte-exact, a Python relay between Rust ranks; and the
failures: a corrupted byte (DigestMismatch, nothing returned, at a Python and at a Rust receiver), a
stalled Rust sender or receiver (PgtTimeout within timeout + 1 s); and examples/python/torch_checkpoint.py
run as its docstring says. Python ranks are threads of this process
(test_numpy.Job); Rust ranks are the debug `pgt` binary ($PGT_BIN)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")

from test_numpy import Job  # noqa: E402
from test_python_receiver import (  # noqa: E402
    JOB_TIMEOUT,
    ROOT,
    job_env,
    pgt_binary,
    read_safetensors,
    write_safetensors,
)

import pgt.send as pgt_send  # noqa: E402
import pgt.torch as pgt_torch  # noqa: E402
from pgt.dtypes import SAFETENSORS_NAME  # noqa: E402
from pgt.tcp import PgTimeout  # noqa: E402
from pgt.torch import PgtError, PGTransport, PgtTimeout  # noqa: E402

GEN = torch.Generator().manual_seed(14)
# Every pgt dtype a safetensors file can carry, as torch's.
ST_DTYPES = {name: getattr(torch, name) for name in SAFETENSORS_NAME}


def rand(dtype: torch.dtype, shape) -> torch.Tensor:
    """Random bits of ``dtype`` (NaNs and all), made from random bytes."""
    n = 1
    for d in shape:
        n *= d
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=GEN)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def elements(t: torch.Tensor) -> bytes:
    """The elements of ``t`` in row-major order, as bytes (how `pgt recv` writes a view)."""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def storage(t: torch.Tensor) -> bytes:
    return pgt_torch.storage_bytes(t).numpy().tobytes()


def checkpoint() -> dict:
    """A torch state dict: every safetensors dtype, strided/offset/expanded views of shared storages,
    a Parameter, 0-dim and empty tensors, nested dicts (str and int keys), lists, tuples, values."""
    base = rand(torch.float32, (6, 10))
    big = rand(torch.int64, (20,))
    return {
        "dtypes": {name: rand(dt, (3, 2)) for name, dt in ST_DTYPES.items()},
        "views": {
            "transposed": base.t(),
            "offset_block": base[2:5, 3:9],
            "stepped": base[::2, 1::3],
            "expanded": rand(torch.float64, (3,)).expand(4, 3),
            "offset_1d": big[5:9],
            "param": torch.nn.Parameter(rand(torch.bfloat16, (2, 3))),
            "scalar0d": torch.tensor(2.5),
            "empty": torch.zeros(0, 3, dtype=torch.int64),
            "large": rand(torch.float16, (3000,)),  # chunked, a part of its own
        },
        "optim": {
            "state": {0: {"step": torch.tensor(5.0), "exp_avg": rand(torch.float32, (3,))}},
            "param_groups": [{"lr": 0.001, "betas": (0.9, 0.999), "params": [0]}],
        },
        "note": "hi",
        "epoch": 3,
        "seed": 2**64 - 1,  # torch.initial_seed()'s largest: ints travel as i128
        "min128": -(2**127),
        "flag": True,
        "none": None,
        "blob": b"\x00\xff",
    }


def leaves(tree, prefix=()):
    """(key path, leaf) of every leaf, in order."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from leaves(v, (*prefix, k))
    elif isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            yield from leaves(v, (*prefix, i))
    else:
        yield prefix, tree


def name(path) -> str:
    return ".".join(str(k) for k in path)


def value_repr(v) -> str:
    """A value as `pgt recv` writes it into the file's metadata."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, bytes):
        return "0x" + v.hex()
    return str(v)


def check_rust_output(path, sd: dict, step: int | None):
    """`pgt recv`'s file holds every tensor of ``sd`` byte-exact (its elements in row-major order), of
    its dtype and shape, and every value (and the step) in its metadata."""
    meta, got = read_safetensors(path)
    tensors = {name(p): t for p, t in leaves(sd) if isinstance(t, torch.Tensor)}
    values = {name(p): value_repr(v) for p, v in leaves(sd) if not isinstance(v, torch.Tensor)}
    assert set(got) == set(tensors)
    for n, t in tensors.items():
        dtype, shape, data = got[n]
        assert dtype == SAFETENSORS_NAME[pgt_torch.NAME_BY_DTYPE[t.dtype]], n
        assert shape == list(t.shape), n
        assert data == elements(t), f"{n}: bytes differ"
    if step is not None:
        values["pgt.step"] = str(step)
    assert meta == values


def check_same(got, want):
    """``got`` is ``want`` as the sender had it: the same containers and values; every tensor a plain
    tensor of the same dtype, shape, stride and storage offset over a storage with the same bytes."""
    if isinstance(want, dict):
        assert type(got) is dict and list(got) == list(want)
        for k in want:
            check_same(got[k], want[k])
    elif isinstance(want, list | tuple):
        assert type(got) is type(want) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            check_same(g, w)
    elif isinstance(want, torch.Tensor):
        assert type(got) is torch.Tensor
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.stride() == want.stride() and got.storage_offset() == want.storage_offset()
        assert storage(got) == storage(want)
        assert elements(got) == elements(want)
    else:
        assert type(got) is type(want) and got == want


class Rust:
    """A Rust `pgt` rank of a Job: started at once (rank 0 hosts the rendezvous store), waited for
    with ``finish``, killed if still running."""

    def __init__(self, job: Job, rank: int, args: list):
        env = job_env(job.port, job.world, job.token.decode(), RANK=rank)
        self.p = subprocess.Popen(
            [str(pgt_binary()), *[str(a) for a in args], "-q"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def finish(self) -> tuple[int, str]:
        try:
            _, err = self.p.communicate(timeout=JOB_TIMEOUT)
        finally:
            self.kill()
        return self.p.returncode, err

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.communicate()


def job(world: int) -> Job:
    j = Job(world)
    j.token = j.token.hex().encode()  # a token both pgt.tcp and `pgt` (PGT_TOKEN) take as given
    return j


def transport(pg, timeout: float = 30.0, **kw) -> PGTransport:
    return PGTransport(pg, timeout, torch.device("cpu"), **kw)


# ---- torch -> Rust ----


def test_torch_sends_to_rust_pgt_recv(tmp_path):
    """PGTransport.send_checkpoint over a TcpGroup -> `pgt recv`: every tensor byte-exact in its file,
    views as their elements, values and the step in its metadata."""
    sd = checkpoint()
    j = job(2)
    out = tmp_path / "out.safetensors"
    rust = Rust(j, 1, ["recv", "--out", out, "--timeout", "30", "--expect-step", "42"])
    try:
        j.run(
            {
                0: lambda pg: transport(pg, chunk_size=1024, bucket_size=128).send_checkpoint(
                    [1], sd, step=42
                )
            }
        )
    finally:
        code, err = rust.finish()
    assert code == 0, err
    check_rust_output(out, sd, 42)


# ---- Rust -> torch ----

FILE_TENSORS = [
    ("model.layers.0.weight", torch.float32, (3, 4)),
    ("model.layers.0.bias", torch.bfloat16, (5,)),
    ("model.embed", torch.float64, (25, 28)),
    ("model.half", torch.float32, (7,)),
    ("fp8", torch.float8_e5m2, (6,)),
    ("fp8b", torch.float8_e4m3fn, (6,)),
    ("mask", torch.bool, (9,)),
    ("u", torch.uint32, (2, 2)),
    ("empty", torch.int32, (0, 3)),
    ("scalar", torch.int64, ()),
]


def rust_file(path) -> dict:
    """A safetensors file of FILE_TENSORS (finite floats: they are cast in place below); returns the
    tensors by name."""
    tensors = {}
    for n, dt, shape in FILE_TENSORS:
        t = rand(dt, shape)
        if dt in (torch.float32, torch.float64):
            t = torch.randn(shape, dtype=dt, generator=GEN) * 1000
        tensors[n] = t
    write_safetensors(
        path,
        [
            (n, SAFETENSORS_NAME[pgt_torch.NAME_BY_DTYPE[t.dtype]], list(t.shape), elements(t))
            for n, t in tensors.items()
        ],
        {"pgt.step": "9", "k": "v"},
    )
    return tensors


@pytest.mark.parametrize("in_place", [False, True], ids=["fresh", "in-place"])
def test_rust_pgt_send_to_torch(tmp_path, in_place):
    """`pgt send FILE` -> PGTransport.recv_checkpoint over a TcpGroup: a flat dict keyed by the
    file's names (as torch's `model.state_dict()`), torch tensors each of the file's dtype, shape and
    bytes; the step checked. In place: tensors of
    the same dtype are written in their storages and returned as the very objects; float32 -> float64,
    float64 -> bfloat16 and float32 -> float16 are cast on receive (round to nearest even, as torch)."""
    src = tmp_path / "in.safetensors"
    want = rust_file(src)
    targets = {
        "model.layers.0.weight": torch.zeros(3, 4, dtype=torch.float64),
        "model.embed": torch.zeros(25, 28, dtype=torch.bfloat16),
        "model.half": torch.zeros(7, dtype=torch.float16),
        "mask": torch.zeros(9, dtype=torch.bool),
        "unsent": torch.zeros(1),
    }
    objects = {
        n: targets[n] for n in ("model.layers.0.weight", "model.embed", "model.half", "mask")
    }
    j = job(2)
    rust = Rust(j, 0, ["send", src, "--dst", "1", "--chunk-size", "1KiB", "--bucket-size", "256"])
    kw = {"state_dict": lambda: targets} if in_place else {}
    try:
        got = j.run({1: lambda pg: transport(pg, **kw).recv_checkpoint(0, expected_step=9)})[1]
    finally:
        code, err = rust.finish()
    assert code == 0, err
    assert got["__metadata__"] == {"k": "v", "pgt.step": "9"}
    assert list(got) == ["__metadata__", *(n for n, *_ in FILE_TENSORS)]
    for n, t in want.items():
        x = got[n]
        assert type(x) is torch.Tensor and x.shape == t.shape, n
        if in_place and n in objects:
            assert x is objects[n], n
            cast = t.to(x.dtype)
            assert x.dtype == objects[n].dtype and elements(x) == elements(cast), n
        else:
            assert x.dtype == t.dtype and elements(x) == elements(t), n


def test_torch_shaped_names_round_trip_file_rust_python_file(tmp_path):
    """A torch `model.state_dict()` (flat keys with dots) saved as safetensors, sent by Rust `pgt send`,
    received by PGTransport as the same flat dict (`load_state_dict` takes it as is), saved by Python:
    every name byte for byte, every tensor's bytes, in both files."""
    torch.manual_seed(3)
    model = torch.nn.Sequential()
    model.add_module("net1", torch.nn.Linear(4, 3))
    model.add_module("layers", torch.nn.ModuleList([torch.nn.Linear(3, 3), torch.nn.LayerNorm(3)]))
    sd = model.state_dict()
    sd["odd..name"] = torch.arange(3)
    sd["a"], sd["a.b"], sd["größe.0"] = torch.ones(1), torch.zeros(2), torch.tensor(1.5)
    names = list(sd)
    assert "net1.weight" in names and "layers.0.bias" in names and "layers.1.weight" in names
    src, back = tmp_path / "in.safetensors", tmp_path / "back.safetensors"
    write_safetensors(
        src,
        [
            (n, SAFETENSORS_NAME[pgt_torch.NAME_BY_DTYPE[t.dtype]], list(t.shape), elements(t))
            for n, t in sd.items()
        ],
    )
    j = job(2)
    rust = Rust(j, 0, ["send", src, "--dst", "1"])
    try:
        got = j.run({1: lambda pg: transport(pg).recv_checkpoint(0)})[1]
    finally:
        code, err = rust.finish()
    assert code == 0, err
    assert sorted(got) == sorted(names)
    fresh = torch.nn.Sequential()
    fresh.add_module("net1", torch.nn.Linear(4, 3))
    fresh.add_module("layers", torch.nn.ModuleList([torch.nn.Linear(3, 3), torch.nn.LayerNorm(3)]))
    extra = {"odd..name", "a", "a.b", "größe.0"}
    fresh.load_state_dict({n: t for n, t in got.items() if n not in extra})
    for n, t in sd.items():
        assert got[n].dtype == t.dtype and elements(got[n]) == elements(t), n
    write_safetensors(
        back,
        [
            (n, SAFETENSORS_NAME[pgt_torch.NAME_BY_DTYPE[t.dtype]], list(t.shape), elements(t))
            for n, t in got.items()
        ],
    )
    _, original = read_safetensors(src)
    _, again = read_safetensors(back)
    assert [n.encode() for n in sorted(again)] == [n.encode() for n in sorted(original)]
    assert again == original


# ---- chains with Rust ranks ----


@pytest.mark.parametrize("fanout", ["chain", "direct"])
def test_torch_to_rust_relay_to_torch(tmp_path, fanout):
    """Python rank 0 -> Rust `pgt recv` rank 1 -> Python rank 2 (chain: Rust relays; direct: rank 0
    sends to both): rank 2 has every tensor byte-exact — dtype, shape, stride, offset and storage bytes
    — and every container and value; Rust's file has it all too."""
    sd = checkpoint()
    j = job(3)
    out = tmp_path / "relay.safetensors"
    rust = Rust(j, 1, ["recv", "--out", out, "--timeout", "30"])
    try:
        res = j.run(
            {
                0: lambda pg: transport(
                    pg, fanout=fanout, chunk_size=512, bucket_size=64
                ).send_checkpoint([1, 2], sd, step=3),
                2: lambda pg: transport(pg).recv_checkpoint(0, expected_step=3),
            }
        )
    finally:
        code, err = rust.finish()
    assert code == 0, err
    check_same(res[2], sd)
    check_rust_output(out, sd, 3)


def test_rust_to_torch_relay_to_rust(tmp_path):
    """Rust `pgt send` rank 0 -> Python PGTransport rank 1 (relays, as the module orders) -> Rust
    `pgt recv` rank 2: the Python rank and the last Rust rank both have the file's tensors."""
    src = tmp_path / "in.safetensors"
    want = rust_file(src)
    out = tmp_path / "out.safetensors"
    j = job(3)
    sender = Rust(
        j, 0, ["send", src, "--dst", "1,2", "--chunk-size", "1KiB", "--bucket-size", "256"]
    )
    receiver = Rust(j, 2, ["recv", "--out", out, "--timeout", "30"])
    try:
        got = j.run({1: lambda pg: transport(pg).recv_checkpoint(0)})[1]
    finally:
        sent, recv = sender.finish(), receiver.finish()
    assert sent[0] == 0, sent[1]
    assert recv[0] == 0, recv[1]
    meta, file = read_safetensors(out)
    assert meta == {"k": "v", "pgt.step": "9"}
    assert set(file) == set(want)
    for n, t in want.items():
        assert elements(got[n]) == elements(t), n
        assert file[n][2] == elements(t), n


# ---- failures ----


class Corrupting(pgt_send.TcpSendHost):
    """Sends as PGTransport does over a TcpGroup, but flips one bit of the first data message, after
    the sender hashed it."""

    done = False

    def send(self, op, parts):
        if op["kind"] == "data" and not Corrupting.done:
            first = bytearray(parts[1])
            first[0] ^= 1
            parts = [parts[0], first, *parts[2:]]
            Corrupting.done = True
        super().send(op, parts)


def test_a_corrupted_byte_is_a_digest_mismatch_and_nothing_is_returned(monkeypatch):
    """A bit flipped on the wire: the torch receiver raises DigestMismatch naming the tensor and
    returns nothing; the link stays usable (the next checkpoint arrives whole)."""
    sd = {"layer": {"w": rand(torch.float32, (64,))}, "n": 1}
    monkeypatch.setattr(Corrupting, "done", False)
    monkeypatch.setattr(pgt_send, "TcpSendHost", Corrupting)  # corrupts the first transfer only

    def tx(pg):
        t = transport(pg)
        t.send_checkpoint([1], sd)
        t.send_checkpoint([1], sd, step=2)

    def rx(pg):
        t, out = transport(pg), []
        with pytest.raises(PgtError) as e:
            out.append(t.recv_checkpoint(0))
        assert e.value.name == "DigestMismatch" and "['layer']['w']" in e.value.message
        assert out == []
        return t.recv_checkpoint(0, expected_step=2)

    got = job(2).run({0: tx, 1: rx})[1]
    assert Corrupting.done
    check_same(got, sd)


def test_a_corrupted_byte_fails_rust_pgt_recv(tmp_path, monkeypatch):
    """The same flipped bit, sent by PGTransport to a Rust `pgt recv`: it fails with DigestMismatch
    (exit code 1) and writes nothing."""
    sd = {"layer": {"w": rand(torch.float32, (64,))}}
    monkeypatch.setattr(Corrupting, "done", False)
    monkeypatch.setattr(pgt_send, "TcpSendHost", Corrupting)
    out = tmp_path / "out.safetensors"
    j = job(2)
    rust = Rust(j, 1, ["recv", "--out", out, "--timeout", "30"])
    try:
        j.run({0: lambda pg: transport(pg).send_checkpoint([1], sd)})
    finally:
        code, err = rust.finish()
    assert Corrupting.done
    # `pgt recv` names the DigestMismatch in words, with the tensor.
    assert (
        code == 1 and "['layer']['w']: " in err and "does not match the sender's digest" in err
    ), err
    assert not out.exists()


def test_a_stalled_rust_sender_times_out(tmp_path):
    """`pgt send` of a file larger than the socket buffers, stopped (SIGSTOP) once the group is formed:
    recv_checkpoint raises PgtTimeout within timeout + 1 s."""
    src = tmp_path / "big.safetensors"
    nbytes = 48 << 20
    write_safetensors(src, [("w", "U8", [nbytes], os.urandom(nbytes))])
    j = job(2)
    rust = Rust(j, 0, ["send", src, "--dst", "1", "--timeout", "60"])
    timeout = 1.5

    def rx(pg):
        os.kill(rust.p.pid, signal.SIGSTOP)
        pgt_torch._pgt()  # the module compiled (once per process) before the clock starts
        start = time.monotonic()
        with pytest.raises(PgtTimeout):
            transport(pg, timeout=timeout).recv_checkpoint(0)
        return time.monotonic() - start

    try:
        took = j.run({1: rx})[1]
    finally:
        if rust.p.poll() is None:
            os.kill(rust.p.pid, signal.SIGCONT)
        rust.kill()
    assert timeout <= took < timeout + 1.0, took


def test_a_stalled_rust_receiver_times_out(tmp_path):
    """`pgt recv`, stopped (SIGSTOP) once the group is formed, of a checkpoint larger than the socket
    buffers: send_checkpoint raises PgtTimeout (the group's PgTimeout, chained) within
    timeout + 1 s."""
    sd = {"w": torch.zeros(48 << 20, dtype=torch.uint8)}
    j = job(2)
    rust = Rust(j, 1, ["recv", "--out", tmp_path / "out.safetensors", "--timeout", "60"])
    timeout = 1.5

    def tx(pg):
        os.kill(rust.p.pid, signal.SIGSTOP)
        pgt_torch._pgt()  # the module compiled (once per process) before the clock starts
        start = time.monotonic()
        with pytest.raises(PgtTimeout) as e:
            transport(pg, timeout=timeout).send_checkpoint([1], sd)
        assert isinstance(e.value.__cause__, PgTimeout), repr(e.value.__cause__)
        return time.monotonic() - start

    try:
        took = j.run({0: tx})[0]
    finally:
        if rust.p.poll() is None:
            os.kill(rust.p.pid, signal.SIGCONT)
        rust.kill()
    assert timeout <= took < timeout + 1.0, took


# ---- the example ----


def test_the_torch_checkpoint_example_with_a_rust_relay(tmp_path):
    """examples/python/torch_checkpoint.py as its docstring runs it: Python rank 0 sends a model's
    state dict, Rust `pgt recv` (rank 1) writes it and relays it (chain) to Python rank 2, which
    prints every tensor. Both receivers' tensors are the sender's, element for element."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    want = {f"model.{k}": v for k, v in model.state_dict().items()}
    j = job(3)
    script = ROOT / "examples" / "python" / "torch_checkpoint.py"
    out = tmp_path / "r1.safetensors"

    def python_rank(rank):
        env = job_env(j.port, j.world, j.token.decode(), RANK=rank)
        return subprocess.Popen(
            [sys.executable, str(script)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    procs = [python_rank(0)]
    rust = Rust(j, 1, ["recv", "--out", out, "--timeout", "30"])
    procs.append(python_rank(2))
    try:
        results = [p.communicate(timeout=JOB_TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        code, err = rust.finish()
    assert code == 0, err
    for p, (_, stderr) in zip(procs, results, strict=True):
        assert p.returncode == 0, stderr
    assert "rank 0 sent step 100 to ranks 1..2" in results[0][0]
    printed = sorted(line for line in results[1][0].splitlines() if line.startswith("rank 2: "))
    expected = sorted(
        f"rank 2: {k} {v.dtype} {tuple(v.shape)} sum={v.double().sum():.6f}"
        for k, v in want.items()
    )
    assert printed == expected
    _, written = read_safetensors(out)
    assert sorted(written) == sorted(want)
    for k, v in want.items():
        dtype, shape, data = written[k]
        assert (dtype, shape, data) == ("F32", list(v.shape), elements(v)), k
