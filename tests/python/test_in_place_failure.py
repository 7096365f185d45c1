"""All or nothing in place (issue 13, item 2), for the Python receivers: ``pgt.numpy.recv_checkpoint``
and ``pgt.torch.PGTransport.recv_checkpoint`` over pgt's TCP group, in place, unstaged (the default)
and ``staged=True``, with a failure injected at several points of the stream by a hostile sender (the
module's own sender, whose host changes what goes out): a corrupted byte in the first or the last
data message, a wrong trailer, a sender that stalls after some data messages, an in-place size
mismatch (refused before any data).

Unstaged: ``InPlaceWritten`` names exactly the leaves whose bytes all landed — derived from the plan
and the messages the fault let through — and those that were being received; the written ones hold
the bytes that arrived, every other one is untouched. Staged: every target byte is as it was, and the
error is the cause itself. Either way the next transfer over the same group lands byte for byte."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from test_numpy import Job

from pgt.abi import Pgt, PgtError
from pgt.metadata import encode
from pgt.numpy import _leaves_of, recv_checkpoint, send_checkpoint
from pgt.recv import InPlaceWritten
from pgt.send import send
from pgt.tcp import PgTimeout

LEAVES = {"a": 100, "b": 8, "c": 8, "d": 300, "e": 16}
# 256-byte chunks, 64-byte buckets: a and d are chunked (2 and 5 messages), b and c share a bucket.
PLAN = {"fanout": "Direct", "bucket_size": 64, "chunk_size": 256}
PREFIX = 8

FAULTS = [
    ("corrupt_first",),
    ("corrupt_last",),
    ("wrong_trailer",),
    ("stall", 3),
    ("stall", 1),
    ("stall", 8),
    ("size",),
]


def checkpoint(round_: int) -> dict:
    return {
        k: (np.arange(n, dtype="<f4") * 0.5 + round_ * 1000 + i * 100).astype("<f4")
        for i, (k, n) in enumerate(LEAVES.items())
    }


class Stalled(RuntimeError):
    pass


class FaultySender:
    """pgt.send's host that sends as pgt.numpy does, with ``fault`` applied; records the header, the
    metadata and the data messages it sent whole."""

    def __init__(self, pg, fault: tuple):
        self.pg, self.fault = pg, fault
        self.header = self.metadata = b""
        self.sent: dict = {}  # data message -> the bytes sent

    def plan(self) -> list:
        return Pgt.load().plan(self.header, self.metadata)

    def send(self, op, parts):
        body = bytearray(b"".join(bytes(p) for p in parts))
        kind, fault = op["kind"], self.fault
        if kind == "header":
            self.header = bytes(body)
        elif kind == "metadata":
            self.metadata = bytes(body)
        elif kind == "data":
            data = [m for m, msg in enumerate(self.plan()) if msg["kind"] == "data"]
            if fault[0] == "stall" and len(self.sent) == fault[1]:
                raise Stalled("stalled on purpose")
            if fault == ("corrupt_first",) and op["message"] == data[0]:
                body[PREFIX + 3] ^= 0x40
            if fault == ("corrupt_last",) and op["message"] == data[-1]:
                body[-1] ^= 0x01
        elif kind == "trailer" and fault == ("wrong_trailer",):
            body[PREFIX] ^= 0xFF  # the trailer's copy of the metadata digest
        self.pg.send(op["to"], op["tag"], [bytes(body)], 30)
        if kind == "data":
            self.sent[op["message"]] = bytes(body)


def expectation(host: FaultySender, before: dict) -> tuple:
    """(fully written leaf paths, partly written ones, each leaf's expected bytes) from the plan and
    the data messages that went out whole. One storage per leaf, in LEAVES order."""
    names = list(LEAVES)
    got = {k: bytearray(v.tobytes()) for k, v in before.items()}
    if host.fault == ("size",):
        return [], [], got
    plan = host.plan()
    for m, body in host.sent.items():
        at = PREFIX
        for seg in plan[m]["segments"]:
            off, n = int(seg["offset"]), int(seg["len"])
            got[names[seg["storage"]]][off : off + n] = body[at : at + n]
            at += n
    data = [m for m, msg in enumerate(plan) if msg["kind"] == "data"]
    waited = [m for m in data if m not in host.sent][:1] if host.fault[0] == "stall" else []
    written, partly = [], []
    for s, name in enumerate(names):
        carried = [m for m in data if any(seg["storage"] == s for seg in plan[m]["segments"])]
        if all(m in host.sent for m in carried):
            written.append(f"['{name}']")
        elif any(m in host.sent or m in waited for m in carried):
            partly.append(f"['{name}']")
    return written, partly, got


def check_cause(err: BaseException, fault: tuple):
    cause = err.cause if isinstance(err, InPlaceWritten) else err
    if fault[0] == "stall":
        assert isinstance(cause, TimeoutError | PgTimeout), repr(cause)
        return
    assert isinstance(cause, PgtError), repr(cause)
    want = {
        "corrupt_first": "DigestMismatch",
        "corrupt_last": "DigestMismatch",
        "wrong_trailer": "TrailerMetadataDigest",
        "size": "InPlaceSizeMismatch",
    }[fault[0]]
    assert cause.name == want, cause


def fail_then_recover(fault: tuple, staged: bool, receive):
    """A faulty transfer then a good one from rank 0 to rank 1; ``receive(pg, target, staged,
    timeout, expected_step)`` receives in place into ``target`` (a dict of float32 arrays)."""
    what = f"{fault}, staged {staged}"
    host_of: dict = {}
    failed = threading.Event()

    def tx(pg):
        tree, leaves, storages = _leaves_of(checkpoint(1))
        host = host_of["tx"] = FaultySender(pg, fault)
        try:
            send(Pgt.load(), host, encode(1, 0, [1], PLAN, tree, leaves), storages)
        except Stalled:
            pass
        failed.wait(30)  # the next transfer once the receiver gave up on this one
        send_checkpoint(pg, [1], checkpoint(2), step=2, fanout="direct", bucket_size=64)

    def rx(pg):
        target = checkpoint(0)
        if fault == ("size",):
            target["d"] = np.zeros(LEAVES["d"] - 1, "<f4")
        before = {k: v.copy() for k, v in target.items()}
        timeout = 0.5 if fault[0] == "stall" else 20
        try:
            with pytest.raises(Exception) as e:
                receive(pg, target, staged, timeout, None)
        finally:
            failed.set()
        err = e.value
        check_cause(err, fault)
        written, partly, got = expectation(host_of["tx"], before)
        if staged or fault == ("size",):
            assert not isinstance(err, InPlaceWritten), f"{what}: {err}"
            for k, v in target.items():
                assert v.tobytes() == before[k].tobytes(), f"{what}: {k} changed"
        else:
            assert isinstance(err, InPlaceWritten), f"{what}: {err!r}"
            assert err.written == written, what
            assert err.partly == partly, what
            assert err.__cause__ is err.cause
            for path in written:
                assert path in str(err), str(err)
            for k, v in target.items():
                path = f"['{k}']"
                if path in written:
                    assert v.tobytes() == bytes(got[k]), f"{what}: {k} does not hold what landed"
                    assert v.tobytes() != before[k].tobytes(), f"{what}: {k} was not written"
                elif path not in partly:
                    assert v.tobytes() == before[k].tobytes(), f"{what}: {k} is not untouched"
        if fault == ("size",):
            target["d"] = np.zeros(LEAVES["d"], "<f4")
        receive(pg, target, staged, 20, 2)
        for k, v in checkpoint(2).items():
            assert target[k].tobytes() == v.tobytes(), f"{what}: {k} after the next transfer"

    Job(2).run({0: tx, 1: rx})


def numpy_receive(pg, target, staged, timeout, expected_step):
    recv_checkpoint(
        pg, 0, state_dict=target, staged=staged, timeout=timeout, expected_step=expected_step
    )


@pytest.mark.parametrize("staged", [False, True], ids=["unstaged", "staged"])
@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: "-".join(map(str, f)))
def test_numpy_in_place_failure(fault, staged):
    fail_then_recover(fault, staged, numpy_receive)


def torch_receive(pg, target, staged, timeout, expected_step):
    """pgt.torch's PGTransport in place (state_dict=callable) over the TCP group, into torch tensors
    sharing ``target``'s arrays."""
    torch = pytest.importorskip("torch")
    from pgt.torch import PGTransport

    tensors = {k: torch.from_numpy(v) for k, v in target.items()}
    t = PGTransport(pg, timeout, "cpu", state_dict=lambda: tensors, staged=staged)
    t.recv_checkpoint(0, expected_step=expected_step)


@pytest.mark.parametrize("staged", [False, True], ids=["unstaged", "staged"])
@pytest.mark.parametrize(
    "fault", [("corrupt_last",), ("stall", 3)], ids=lambda f: "-".join(map(str, f))
)
def test_torch_in_place_failure(fault, staged):
    pytest.importorskip("torch")
    fail_then_recover(fault, staged, torch_receive)
