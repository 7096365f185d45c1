"""What each rank runs in the pgt.torch tests (tests/python/test_torch_transport.py runs them on a pool
of gloo ranks, torch_pool.py). Each case is ``case(rank, world, *args)`` and raises on failure.

The first three are PyTorch's own CPU tests of its PGTransport, ported from
pytorch/pytorch test/distributed/checkpoint/test_pg_transport.py (BSD-3-Clause, Copyright (c) Meta
Platforms, Inc. and affiliates): the same state dicts, the same ring, the same assertions, with
``from pgt.torch import PGTransport`` instead of torch's class.
"""

from __future__ import annotations

import collections
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed._shard.sharded_tensor import (
    Shard as ShardedTensorShard,
)
from torch.distributed._shard.sharded_tensor import (
    ShardMetadata,
    init_from_local_shards,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.distributed_c10d import _get_default_group
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.testing._internal.common_utils import TestCase

import pgt.torch as pgt_torch
from pgt.torch import PgtError, PGTransport, PgtTimeout, UnsupportedLeaf

CPU = torch.device("cpu")
_tc = TestCase()
_tc.maxDiff = None


def assert_equal(a, b):
    """torch's TestCase.assertEqual, which PyTorch's tests use."""
    _tc.assertEqual(a, b)


# ---- ported from PyTorch's test_pg_transport.py ----


def _create_sharded_tensor_state_dict(rank: int, world_size: int, device: torch.device) -> dict:
    global_size = 64
    shard_size = global_size // world_size
    start_idx = rank * shard_size
    end_idx = (rank + 1) * shard_size
    local_tensor = torch.arange(
        start_idx * 8, end_idx * 8, dtype=torch.float32, device=device
    ).reshape(shard_size, 8)
    sharded_tensor = init_from_local_shards(
        [
            ShardedTensorShard(
                tensor=local_tensor,
                metadata=ShardMetadata(
                    shard_offsets=[start_idx, 0],
                    shard_sizes=[shard_size, 8],
                    placement=f"rank:{rank}/{device}",
                ),
            )
        ],
        global_size,
        8,
    )
    return {
        "sharded_tensor": sharded_tensor,
        "rank_scalar": torch.tensor(float(rank), device=device),
    }


class SimpleModel(nn.Module):
    def __init__(self, seed: int = 42):
        super().__init__()
        torch.manual_seed(seed)
        self.net1 = nn.Linear(10, 10)
        self.relu = nn.ReLU()
        self.net2 = nn.Linear(10, 10)

    def forward(self, x):
        return self.net2(self.relu(self.net1(x)))


def ring_send_recv_checkpoint(transport, state_dict, rank, world_size, step=0):
    """Sends to rank + 1 and receives from rank - 1."""
    next_rank = (rank + 1) % world_size
    prev_rank = (rank - 1) % world_size
    if rank == 0:
        transport.send_checkpoint([next_rank], state_dict)
        received_checkpoint = transport.recv_checkpoint(prev_rank)
    else:
        received_checkpoint = transport.recv_checkpoint(prev_rank)
        transport.send_checkpoint([next_rank], state_dict)
    return received_checkpoint


def pg_transport(rank, world):
    model = SimpleModel().to(CPU)
    transport = PGTransport(_get_default_group(), timedelta(seconds=10), CPU)
    original_state_dict = model.state_dict()
    received_checkpoint = ring_send_recv_checkpoint(
        transport=transport, state_dict=original_state_dict, rank=rank, world_size=world
    )
    assert_equal(original_state_dict, received_checkpoint)


def pg_transport_with_mixed_content(rank, world):
    torch.manual_seed(1234)  # torch's TestCase seeds every rank alike in setUp
    device_mesh = init_device_mesh(CPU.type, (world,))
    local_tensor = torch.randn(10, 10, device=CPU)
    dtensor = DTensor.from_local(local_tensor, device_mesh)
    model = SimpleModel().to(CPU)
    state_dict = {
        "net1.weight": model.net1.weight.data,
        "net1.bias": model.net1.bias.data,
        "net2.weight": model.net2.weight.data,
        "net2.bias": model.net2.bias.data,
        "dtensor": dtensor,
        "non-tensor": "some string",
        "nested": {"tensor": torch.randn(1, 2), "value": 42},
        "list": [1, 2, 3],
    }
    transport = PGTransport(_get_default_group(), timedelta(seconds=10), CPU)
    received_checkpoint = ring_send_recv_checkpoint(
        transport=transport, state_dict=state_dict, rank=rank, world_size=world
    )
    assert_equal(state_dict, received_checkpoint)
    # Beyond torch's test: the DTensor is rebuilt on this rank's mesh, placements kept.
    got = received_checkpoint["dtensor"]
    assert isinstance(got, DTensor)
    assert got.device_mesh == device_mesh, (got.device_mesh, device_mesh)
    assert list(got.device_mesh.get_coordinate()) == [rank], got.device_mesh.get_coordinate()
    assert got.placements == dtensor.placements


def pg_transport_with_sharded_tensor(rank, world):
    state_dict = _create_sharded_tensor_state_dict(rank, world, CPU)
    transport = PGTransport(_get_default_group(), timedelta(seconds=10), CPU)
    received_checkpoint = ring_send_recv_checkpoint(
        transport=transport, state_dict=state_dict, rank=rank, world_size=world
    )
    prev_rank = (rank - 1) % world
    expected_rank_scalar = torch.tensor(float(prev_rank), device="cpu")
    received_rank_scalar = received_checkpoint["rank_scalar"]
    torch.testing.assert_close(expected_rank_scalar, received_rank_scalar)
    received_st = received_checkpoint["sharded_tensor"]
    global_size = 64
    shard_size = global_size // world
    prev_start_idx = prev_rank * shard_size
    prev_end_idx = (prev_rank + 1) * shard_size
    expected_local_tensor = torch.arange(
        prev_start_idx * 8, prev_end_idx * 8, dtype=torch.float32, device="cpu"
    ).reshape(shard_size, 8)
    received_local_tensor = received_st.local_shards()[0].tensor
    torch.testing.assert_close(expected_local_tensor, received_local_tensor)
    # Beyond torch's test: placements as torch's class sets them (PROTOCOL.md §12). The local shard
    # is placed on this rank; the global metadata is the sender's, unchanged, so exactly one global
    # shard names each rank (rewriting the received shard's entry would make two claim this one).
    shard = received_st.local_shards()[0]
    assert str(shard.metadata.placement) == f"rank:{rank}/cpu"
    assert shard.metadata.shard_offsets == [prev_start_idx, 0]
    sent_global = state_dict["sharded_tensor"].metadata().shards_metadata
    got_global = received_st.metadata().shards_metadata
    assert got_global == sent_global, (got_global, sent_global)
    assert [str(m.placement) for m in got_global] == [f"rank:{r}/cpu" for r in range(world)]


# ---- pgt's own ----


def _storage_bytes(t: torch.Tensor) -> bytes:
    return bytes(pgt_torch.storage_bytes(t).numpy())


def assert_same_tensor(got: torch.Tensor, want: torch.Tensor, what: str = ""):
    """Same dtype, shape, stride, storage offset, storage size and storage bytes."""
    assert type(got) is torch.Tensor, (what, type(got))
    assert got.dtype == want.dtype, (what, got.dtype, want.dtype)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert got.stride() == want.stride(), (what, got.stride(), want.stride())
    assert got.storage_offset() == want.storage_offset(), what
    assert got.untyped_storage().nbytes() == want.untyped_storage().nbytes(), what
    assert _storage_bytes(got) == _storage_bytes(want), what


def _transport(pg=None, timeout=20.0, **kw):
    return PGTransport(pg or _get_default_group(), timedelta(seconds=timeout), CPU, **kw)


def every_dtype_state_dict(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in pgt_torch.DTYPE_BY_NAME:
        dt = pgt_torch.DTYPE_BY_NAME[name]
        raw = torch.randint(0, 256, (3 * 5 * dt.itemsize,), dtype=torch.uint8, generator=g)
        if dt == torch.bool:
            raw = raw % 2
        out[name] = raw.view(dt).reshape(3, 5)
        # A strided, offset view of the same dtype: its whole storage travels.
        out[f"{name}.t"] = raw.view(dt).reshape(3, 5)[1:, 1:4].t()
    return out


def every_dtype(rank, world):
    """Every dtype pgt has, from rank 0 to every other rank (direct fan-out), bit for bit."""
    sd = every_dtype_state_dict(7)
    t = _transport(fanout="direct")
    if rank == 0:
        t.send_checkpoint(list(range(1, world)), sd)
        return None
    got = t.recv_checkpoint(0)
    assert list(got) == list(sd)
    for k in sd:
        assert_same_tensor(got[k], sd[k], k)
    return sorted({str(v.dtype) for v in got.values()})


def strided_views(rank, world):
    base = torch.arange(60, dtype=torch.float32)
    sd = {
        "contiguous": base.reshape(6, 10),
        "transposed": base.reshape(6, 10).t(),
        "offset": base[7:19].reshape(3, 4),
        "step": base[1::3],
        "expanded": torch.arange(4.0).reshape(4, 1).expand(4, 5),  # stride 0
        "overlapping": torch.as_strided(base, (5, 4), (2, 1), 3),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "scalar_view": base[11],
        "empty": torch.empty(0, 3),
        "empty_of_storage": base[5:5],
        "column": torch.arange(12, dtype=torch.int16).reshape(3, 4)[:, 2:3],
    }
    conj = torch.tensor([1 + 2j, 3 - 1j]).conj()  # the conjugate bit is not in the storage
    neg = torch.tensor([1 + 2j, 3 - 1j]).conj().imag  # a negative view
    param = nn.Parameter(torch.arange(3.0))
    t = _transport()
    if rank == 0:
        t.send_checkpoint([1], {**sd, "conj": conj, "neg": neg, "param": param})
    elif rank == 1:
        got = t.recv_checkpoint(0)
        for k in sd:
            assert_same_tensor(got[k], sd[k], k)
            assert torch.equal(got[k], sd[k]), k
        assert (
            torch.equal(got["conj"], torch.tensor([1 - 2j, 3 + 1j])) and not got["conj"].is_conj()
        )
        assert torch.equal(got["neg"], torch.tensor([-2.0, 1.0]))
        assert type(got["param"]) is torch.Tensor and torch.equal(got["param"], param.detach())
        # Views of one storage on the sender are views of separate storages here (as torch).
        assert got["transposed"].untyped_storage().data_ptr() != (
            got["contiguous"].untyped_storage().data_ptr()
        )


def nested_containers(rank, world):
    sd = collections.OrderedDict(
        model={"layers": [{"w": torch.ones(2, 2)}, {"w": torch.zeros(3)}], 7: torch.arange(3)},
        optim=({"lr": 0.1, "betas": (0.9, 0.999)}, [None, True, False]),
        values={
            "int": -(2**63),
            "big": 2**63 - 1,
            "seed": 2**64 - 1,  # torch.initial_seed()'s largest: ints are i128
            "min128": -(2**127),
            "float": -0.0,
            "nan": float("nan"),
            "inf": float("-inf"),
            "str": "héllo",
            "bytes": b"\x00\xff",
            "none": None,
        },
        empty={"dict": {}, "list": [], "tuple": ()},
    )
    sd[-3] = "int key"
    sd["0"] = "str key"
    sd[0] = "int key 0"
    t = _transport()
    if rank == 0:
        t.send_checkpoint([1], sd)
        t.send_checkpoint([1], [torch.ones(1), "root list"])
        t.send_checkpoint([1], torch.arange(4))
    elif rank == 1:
        got = t.recv_checkpoint(0)
        assert list(got) == list(sd)
        assert list(got["model"]) == ["layers", 7]
        assert isinstance(got["optim"], tuple) and isinstance(got["optim"][1], list)
        assert isinstance(got["optim"][0]["betas"], tuple)
        v = got["values"]
        assert v["int"] == -(2**63) and v["big"] == 2**63 - 1
        assert v["seed"] == 2**64 - 1 and v["min128"] == -(2**127)
        assert str(v["float"]) == "-0.0" and v["nan"] != v["nan"] and v["inf"] == float("-inf")
        assert v["str"] == "héllo" and v["bytes"] == b"\x00\xff" and v["none"] is None
        assert got["empty"] == {"dict": {}, "list": [], "tuple": ()}
        assert got[-3] == "int key" and got["0"] == "str key" and got[0] == "int key 0"
        torch.testing.assert_close(got["model"]["layers"][0]["w"], torch.ones(2, 2))
        torch.testing.assert_close(got["model"][7], torch.arange(3))
        got2 = t.recv_checkpoint(0)
        assert isinstance(got2, list) and got2[1] == "root list"
        assert torch.equal(got2[0], torch.ones(1))
        assert torch.equal(t.recv_checkpoint(0), torch.arange(4))


class _NotAValue:
    pass


def unsupported_leaves(rank, world):
    """Refused before anything is sent, naming the key path and the type; then a good transfer."""
    import numpy as np

    cases = [
        ({"a": {"b": [torch.ones(1), _NotAValue()]}}, "['a']['b'][1]", "_NotAValue"),
        ({"opt": {"state": {1, 2}}}, "['opt']['state']", "set"),
        ({"x": np.zeros(3)}, "['x']", "ndarray"),
        ({"p": collections.namedtuple("P", "x y")(1, 2)}, "['p']", "P"),
        ({"k": {(1, 2): torch.ones(1)}}, "['k'][(1, 2)]", "tuple"),
        ({"huge": 2**127}, "['huge']", "int outside i128"),
        ({"neg": {"huge": -(2**127) - 1}}, "['neg']['huge']", "int outside i128"),
        ({"sparse": torch.eye(3).to_sparse()}, "['sparse']", "sparse"),
        ({"bits": torch.zeros(2, dtype=torch.uint8).view(torch.bits8)}, "['bits']", "bits8"),
    ]
    t = _transport(timeout=5.0)
    if rank == 0:
        for sd, path, what in cases:
            start = time.monotonic()
            try:
                t.send_checkpoint([1], sd)
            except UnsupportedLeaf as e:
                msg = str(e)
                assert msg.startswith(f"{path}: ") and what in msg, msg
                assert "pickle" in msg, msg
            else:
                raise AssertionError(f"{sd} was not refused")
            assert time.monotonic() - start < 1.0
        t.send_checkpoint([1], {"fine": torch.ones(2)})
    elif rank == 1:
        got = t.recv_checkpoint(0)
        assert list(got) == ["fine"] and torch.equal(got["fine"], torch.ones(2))


def fanout(rank, world, mode):
    """One sender, every other rank a destination, in chain or direct fan-out, with storages split
    into several chunks and small ones bucketed: every byte arrives at every rank."""
    g = torch.Generator().manual_seed(11)
    sd = {
        "big": torch.randn(300_000, generator=g),  # 1.2 MB: 5 chunks of 256 KiB
        "small": [torch.randn(i + 1, 7, generator=g) for i in range(40)],
        "mid": torch.randint(0, 2**31, (70_000,), generator=g, dtype=torch.int32),
        "step": 12,
    }
    t = _transport(fanout=mode, bucket_size=64 << 10, chunk_size=256 << 10)
    dsts = list(range(1, world))
    if rank == 0:
        t.send_checkpoint(dsts, sd)
        return None
    got = t.recv_checkpoint(0)
    assert_equal(sd, got)
    for a, b in zip(got["small"], sd["small"], strict=True):
        assert_same_tensor(a, b)
    return rank


def in_place(rank, world):
    """Into the receiver's own tensors: same objects back, float casts on receive, and errors that
    name the key path (the transfer drained, so the next one works)."""
    g = torch.Generator().manual_seed(3)
    sd = {
        "f32": torch.randn(4, 4, generator=g),
        "f64": torch.randn(5, dtype=torch.float64, generator=g),
        "bf16": torch.randn(6, generator=g).to(torch.bfloat16),
        "i64": torch.arange(6),
        "fresh": torch.ones(3),
        "t": torch.randn(3, 5, generator=g).t(),
        "nested": {"w": torch.randn(2, 3, generator=g)},
    }
    t_send = _transport()
    if rank == 0:
        t_send.send_checkpoint([1], sd)
        t_send.send_checkpoint([1], sd)  # size mismatch on the receiver: drained
        t_send.send_checkpoint([1], sd)  # dtype mismatch: drained
        t_send.send_checkpoint([1], {"after": torch.arange(3)})
        return None
    if rank != 1:
        return None
    mine = {
        "f32": torch.zeros(4, 4, dtype=torch.float64),  # cast f32 -> f64
        "f64": torch.zeros(5, dtype=torch.float32),  # f64 -> f32
        "bf16": torch.zeros(6, dtype=torch.float16),  # bf16 -> f16
        "i64": torch.zeros(6, dtype=torch.int64),
        "t": torch.zeros(3, 5).t(),  # the same transposed layout as the sender's
        "nested": {"w": torch.zeros(2, 3)},
        "unused": torch.zeros(1),
    }
    keep = {k: v for k, v in mine.items()}
    ptrs = {k: v.untyped_storage().data_ptr() for k, v in mine.items() if k != "nested"}
    calls = []

    def state_dict():
        calls.append(1)
        return mine

    t = _transport(state_dict=state_dict)
    got = t.recv_checkpoint(0)
    assert len(calls) == 1
    for k in ("f32", "f64", "bf16", "i64", "t"):
        assert got[k] is keep[k], k  # the very tensors of the state dict
        assert got[k].untyped_storage().data_ptr() == ptrs[k], k
    assert got["nested"]["w"] is mine["nested"]["w"]
    torch.testing.assert_close(got["f32"], sd["f32"].to(torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(got["f64"], sd["f64"].to(torch.float32), rtol=0, atol=0)
    torch.testing.assert_close(got["bf16"], sd["bf16"].to(torch.float16), rtol=0, atol=0)
    assert torch.equal(got["i64"], sd["i64"]) and torch.equal(got["t"], sd["t"])
    assert torch.equal(got["nested"]["w"], sd["nested"]["w"])
    assert torch.equal(got["fresh"], sd["fresh"]) and "unused" not in got

    mine["nested"]["w"] = torch.zeros(2, 4)  # another size
    try:
        t.recv_checkpoint(0)
    except PgtError as e:
        assert e.name == "InPlaceSizeMismatch" and "['nested']['w']" in e.message, e
    else:
        raise AssertionError("a size mismatch was not refused")
    mine["nested"]["w"] = torch.zeros(2, 3)
    mine["i64"] = torch.zeros(6, dtype=torch.float64)  # int64 -> float64: no cast
    try:
        t.recv_checkpoint(0)
    except PgtError as e:
        assert e.name == "InPlaceDTypeMismatch" and "i64" in e.message, e
    else:
        raise AssertionError("a dtype mismatch was not refused")
    got = t.recv_checkpoint(0)  # the link is clean: the next transfer is its own
    assert list(got) == ["after"] and torch.equal(got["after"], torch.arange(3))
    return None


def in_place_dtensor_and_sharded(rank, world):
    """DTensors and ShardedTensors in place: their local tensors' storages are written."""
    mesh = init_device_mesh("cpu", (world,))
    sd = _create_sharded_tensor_state_dict(rank, world, CPU)
    sd["dt"] = DTensor.from_local(torch.full((4, 2), float(rank)), mesh, [Shard(0)])
    sd["rep"] = DTensor.from_local(torch.full((3,), float(rank)), mesh, [Replicate()])
    mine = _create_sharded_tensor_state_dict(rank, world, CPU)
    mine["dt"] = DTensor.from_local(torch.zeros(4, 2), mesh, [Shard(0)])
    local_ptr = mine["dt"]._local_tensor.untyped_storage().data_ptr()
    shard_ptr = mine["sharded_tensor"].local_shards()[0].tensor.untyped_storage().data_ptr()
    t = _transport(state_dict=lambda: mine)
    got = ring_send_recv_checkpoint(t, sd, rank, world)
    prev = (rank - 1) % world
    assert got["dt"]._local_tensor.untyped_storage().data_ptr() == local_ptr
    assert torch.equal(mine["dt"]._local_tensor, torch.full((4, 2), float(prev)))
    assert got["dt"].placements == (Shard(0),) and got["dt"].shape == (4 * world, 2)
    assert got["dt"].device_mesh == mesh
    shard = got["sharded_tensor"].local_shards()[0].tensor
    assert shard.untyped_storage().data_ptr() == shard_ptr
    assert torch.equal(shard[0], torch.arange(8.0) + prev * 64 // world * 8)
    assert torch.equal(got["rep"].to_local(), torch.full((3,), float(prev)))


def _new_pair_group():
    """A fresh gloo group over ranks 0 and 1 (every rank calls new_group): a case that times out
    closes its gloo pair, and must not break the default group for the cases after it."""
    return dist.new_group(ranks=[0, 1], backend="gloo")


def stalled_sender(rank, world):
    """The sender stops after the metadata: the receiver raises PgtTimeout within timeout + 1 s."""
    pg = _new_pair_group()
    if rank == 0:
        t = _transport(pg, timeout=2.0)
        original = pgt_torch._Sending.send

        def stall(self, op, parts):
            if op["kind"] == "data":
                time.sleep(4.0)
                raise RuntimeError("the sender gave up")
            return original(self, op, parts)

        pgt_torch._Sending.send = stall
        try:
            t.send_checkpoint([1], {"w": torch.ones(1000)})
        except RuntimeError as e:
            assert "gave up" in str(e)
        finally:
            pgt_torch._Sending.send = original
        return None
    if rank == 1:
        t = _transport(pg, timeout=2.0)
        start = time.monotonic()
        try:
            t.recv_checkpoint(0)
        except PgtTimeout as e:
            took = time.monotonic() - start
            assert "timed out after 2 s" in str(e) and "rank 0" in str(e), e
            assert 1.9 < took < 3.0, took
            return took
        raise AssertionError("no timeout")
    return None


def stalled_receiver(rank, world):
    """The receiver never receives: the sender raises PgtTimeout within timeout + 1 s."""
    pg = _new_pair_group()
    if rank == 0:
        t = _transport(pg, timeout=2.0)
        start = time.monotonic()
        try:
            t.send_checkpoint([1], {"w": torch.ones(1000)})
        except PgtTimeout as e:
            took = time.monotonic() - start
            assert "timed out after 2 s" in str(e) and "rank 1" in str(e), e
            assert 1.9 < took < 3.0, took
            return took
        raise AssertionError("no timeout")
    if rank == 1:
        time.sleep(4.0)
    return None


def corrupted_byte(rank, world, which):
    """One byte of one data message altered after the sender hashed it: the receiver raises
    DigestMismatch naming the tensor, returns nothing, and the next transfer is clean."""
    g = torch.Generator().manual_seed(5)
    sd = {
        "a": torch.randn(100, generator=g),
        "big": torch.randn(50_000, generator=g),  # a part of its own (>= 64 KiB)
        "b": torch.randn(10, generator=g),
    }
    if rank == 0:
        t = _transport()
        original = pgt_torch._Sending.send

        def corrupt(self, op, parts):
            if op["kind"] == "data":
                seg = next(i for i, p in enumerate(parts[1:], 1) if len(p) == which)
                bad = bytearray(parts[seg])
                bad[len(bad) // 2] ^= 0x10
                parts = [*parts[:seg], memoryview(bad), *parts[seg + 1 :]]
            return original(self, op, parts)

        pgt_torch._Sending.send = corrupt
        try:
            t.send_checkpoint([1], sd)
        finally:
            pgt_torch._Sending.send = original
        t.send_checkpoint([1], sd)
    elif rank == 1:
        t = _transport()
        try:
            got = t.recv_checkpoint(0)
        except PgtError as e:
            assert e.name == "DigestMismatch", e
            name = "big" if which == 200_000 else "b"
            assert e.message.startswith(f"['{name}']: storage "), e.message
        else:
            raise AssertionError(f"a corrupted byte was not caught: {list(got)}")
        got = t.recv_checkpoint(0)
        assert_equal(sd, got)


def in_place_all_or_nothing(rank, world):
    """Over gloo, in place, a corrupted byte: staged, the receiver's tensors are untouched and the
    error is the DigestMismatch itself; unstaged, InPlaceWritten names every tensor (all data landed
    before the trailer's check) and they hold the bytes that arrived. The next transfer lands whole."""
    g = torch.Generator().manual_seed(9)
    sd = {"a": torch.randn(100, generator=g), "big": torch.randn(50_000, generator=g)}
    good = {k: v + 1 for k, v in sd.items()}
    if rank == 0:
        t = _transport()
        original = pgt_torch._Sending.send

        def corrupt(self, op, parts):
            if op["kind"] == "data":
                seg = max(range(1, len(parts)), key=lambda i: len(parts[i]))
                bad = bytearray(parts[seg])
                bad[len(bad) // 2] ^= 0x10
                parts = [*parts[:seg], memoryview(bad), *parts[seg + 1 :]]
            return original(self, op, parts)

        for _ in ("staged", "unstaged"):
            pgt_torch._Sending.send = corrupt
            try:
                t.send_checkpoint([1], sd)
            finally:
                pgt_torch._Sending.send = original
            t.send_checkpoint([1], good)
    elif rank == 1:
        for staged in (True, False):
            mine = {k: torch.zeros_like(v) for k, v in sd.items()}
            t = _transport(state_dict=lambda mine=mine: mine, staged=staged)
            try:
                t.recv_checkpoint(0)
            except pgt_torch.InPlaceWritten as e:
                assert not staged, e
                assert e.written == ["['a']", "['big']"] and e.partly == [], e
                assert isinstance(e.cause, PgtError) and e.cause.name == "DigestMismatch", e
                assert torch.equal(mine["a"], sd["a"])  # landed as sent; "big" has the bad byte
                assert (mine["big"] != sd["big"]).sum().item() == 1
            except PgtError as e:
                assert staged and e.name == "DigestMismatch", e
                assert all(not v.any() for v in mine.values()), "a staged target was written"
            else:
                raise AssertionError("a corrupted byte was not caught")
            got = t.recv_checkpoint(0)
            assert_equal(good, got)
            assert all(torch.equal(mine[k], good[k]) for k in good)


def stale_message_skipped(rank, world):
    """A message of another transfer under a data tag (its frame names another id) is skipped, its
    parts thrown away, and the transfer behind it received."""
    if rank == 0:
        pg = _get_default_group()
        other = bytes(8 * [0xAB])
        frame = bytearray(pgt_torch.frame_bytes(other, 8 + 100, 2))
        works = [
            pg.send([torch.frombuffer(frame, dtype=torch.uint8)], 1, 3),
            pg.send([torch.full((60,), 7, dtype=torch.uint8)], 1, 3),
            pg.send([torch.full((40,), 9, dtype=torch.uint8)], 1, 3),
        ]
        _transport().send_checkpoint([1], {"x": torch.arange(10)})
        for w in works:
            w.wait()
    elif rank == 1:
        got = _transport().recv_checkpoint(0)
        assert torch.equal(got["x"], torch.arange(10))


def many_small_tensors(rank, world, n, size, stage_min):
    """Throughput of n small tensors (for the framing measurement; run by hand)."""
    pgt_torch.STAGE_MIN = stage_min
    sd = {f"t{i}": torch.full((size // 4,), float(i)) for i in range(n)}
    t = _transport(timeout=120)
    dist.barrier()
    start = time.perf_counter()
    if rank == 0:
        t.send_checkpoint([1], sd)
    elif rank == 1:
        got = t.recv_checkpoint(0)
        took = time.perf_counter() - start
        assert torch.equal(got[f"t{n - 1}"], sd[f"t{n - 1}"])
        return took
    return None


def torch_many_small_tensors(rank, world, n, size):
    """The same with torch's own PGTransport, for comparison (run by hand)."""
    from torch.distributed.checkpoint._pg_transport import PGTransport as TorchPGTransport

    sd = {f"t{i}": torch.full((size // 4,), float(i)) for i in range(n)}
    t = TorchPGTransport(_get_default_group(), timedelta(seconds=120), CPU)
    dist.barrier()
    start = time.perf_counter()
    if rank == 0:
        t.send_checkpoint([1], sd)
    elif rank == 1:
        got = t.recv_checkpoint(0)
        took = time.perf_counter() - start
        assert torch.equal(got[f"t{n - 1}"], sd[f"t{n - 1}"])
        return took
    return None


# ---- torch's cases over pgt's TCP process group ----


def torch_cases_over_tcp(rank, world, port, token):
    """PyTorch's three ported cases, unchanged, over pgt's TCP group instead of the gloo one: the
    cases take their group from ``_get_default_group``, which is pointed at a ``TcpGroup`` for the
    run. gloo stays the default group of torch.distributed, so DeviceMeshes are built as before:
    DTensors and ShardedTensors cross the TCP group and are rebuilt on this rank's mesh."""
    from pgt.tcp import TcpGroup, TcpOptions

    global _get_default_group
    gloo_group = _get_default_group
    opts = TcpOptions("127.0.0.1", port, rank, world, token, timeout=60.0)
    with TcpGroup.join(opts) as pg:
        assert type(pg) is TcpGroup
        _get_default_group = lambda: pg  # noqa: E731
        try:
            pg_transport(rank, world)
            pg_transport_with_mixed_content(rank, world)
            pg_transport_with_sharded_tensor(rank, world)
        finally:
            _get_default_group = gloo_group


def small_storages_element_aligned(rank, world):
    """Small fresh storages land in shared blocks; each still starts at a multiple of its element
    size even after an odd-length byte storage (the run is then scattered into a block laid out for
    alignment), and holds the sender's elements in the sender's view over a storage of its own of
    the sender's size — contiguous views (made from the landing at once) and others alike."""
    base = torch.arange(24, dtype=torch.float32)
    sd = {
        "odd_bytes": torch.arange(3, dtype=torch.uint8),
        "f32": torch.arange(5, dtype=torch.float32),
        "f64": torch.arange(7, dtype=torch.float64),
        "i16": torch.arange(3, dtype=torch.int16),
        "c64": torch.arange(4, dtype=torch.float32).view(torch.complex64),
        "bf16_2d": torch.arange(15, dtype=torch.bfloat16).reshape(3, 5),
        "size1_dims": torch.arange(4, dtype=torch.int64).reshape(1, 4, 1),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.empty(0, 3, dtype=torch.float16),
        "transposed": base.reshape(4, 6).t(),
        "offset": base[5:9],
        "strided": base[::3],
        "bool": torch.tensor([True, False, True]),
    }
    t = _transport()
    if rank == 0:
        t.send_checkpoint([1], sd)
    elif rank == 1:
        got = t.recv_checkpoint(0)
        for k, v in sd.items():
            assert got[k].data_ptr() % got[k].element_size() == 0, k
            assert_same_tensor(got[k], v, k)
            assert torch.equal(got[k], v), k
