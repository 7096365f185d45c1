"""pgt's raw-ABI wasm module, loaded by wasmtime-py, against the golden vectors of tests/vectors:
every vector decodes to the summary, plan and error index.json gives; receivers driven from Python (by
pgt.recv's loop, as pgt-core's drive.rs, with real XXH3-64 digests) accept the streams and reject the
malformed ones with the named error; a sender driven from Python produces the streams' bytes.

Run: pytest tests/python (after scripts/build-wasm.sh).
"""

import collections
import json
import re
from pathlib import Path

import pytest
import xxhash

from pgt.abi import (
    ABI_ERROR,
    DTYPES,
    ERROR,
    Pgt,
    PgtError,
    Reader,
    is_stale,
    module_path,
    varint,
)
from pgt.recv import receive as drive
from pgt.send import send

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
INDEX = json.loads((VECTORS / "index.json").read_text())


def by_kind(kind):
    return [v for v in INDEX["vectors"] if v["kind"] == kind]


def ids(vs):
    return [v["file"] for v in vs]


@pytest.fixture(scope="module")
def compiled():
    return Pgt.compile()


@pytest.fixture
def pgt(compiled):
    return Pgt(*compiled)  # a fresh instance per test


def split(v):
    b = (VECTORS / v["file"]).read_bytes()
    return b[: v["header_len"]], b[v["header_len"] :]


def records(v):
    b = (VECTORS / v["file"]).read_bytes()
    out, at = [], 0
    while at < len(b):
        tag, n = (
            int.from_bytes(b[at : at + 8], "little"),
            int.from_bytes(b[at + 8 : at + 16], "little"),
        )
        out.append((tag, b[at + 16 : at + 16 + n]))
        at += 16 + n
    return out


def pattern(s, n):
    return bytes((17 * s + i) % 256 for i in range(n))


def check_error(e: PgtError, v):
    assert e.status == ERROR
    assert e.name == v["error"], e.message
    # The error itself follows name and message: Some(pgt_core::Error), its variant index, its fields.
    r = Reader(e.error)
    assert r.byte() == 1
    r.varint()
    assert r.rest() == debug_fields(v["error_debug"]), v["error_debug"]
    assert e.message


def debug_fields(debug: str) -> bytes:
    """The postcard of an error's fields from its Debug form (``StepMismatch { expected: Some(10),
    got: Some(9) }``): integers as varints, options, strings, and dtypes as their variant index."""
    t = re.findall(r'"(?:[^"\\]|\\.)*"|\w+|[{}(),:]', debug)[1:]  # after the variant's name

    def value() -> bytes:
        v = t.pop(0)
        if v == "Some":
            assert t.pop(0) == "("
            out = b"\x01" + value()
            assert t.pop(0) == ")"
            return out
        if v == "None":
            return b"\x00"
        if v.isdigit():
            return varint(int(v))
        if v.startswith('"'):
            s = json.loads(v).encode()
            return varint(len(s)) + s
        return varint([d.replace("_", "") for d in DTYPES].index(v.lower()))

    out = b""
    while t and t.pop(0) in "{,":  # then "name: value"
        _, colon = t.pop(0), t.pop(0)
        assert colon == ":", debug
        out += value()
    return out


def test_module_imports_nothing(compiled):
    module, _ = compiled
    assert module.imports == [], [f"{i.module}::{i.name}" for i in module.imports]
    names = {e.name for e in module.exports}
    for name in [
        "memory",
        "pgt_alloc",
        "pgt_free",
        "pgt_decode",
        "pgt_plan",
        "pgt_encode",
        "pgt_sender_new",
        "pgt_receiver_new",
    ]:
        assert name in names


def test_versions_and_default_limits(pgt):
    assert pgt.abi_version() == 3
    assert pgt.protocol_version() == INDEX["protocol_version"]
    assert pgt.default_limits() == INDEX["default_limits"]


@pytest.mark.parametrize("v", by_kind("valid_metadata"), ids=ids(by_kind("valid_metadata")))
def test_valid_metadata(pgt, v):
    h, m = split(v)
    summary = pgt.decode(h, m)
    expected = dict(v["manifest"])
    messages = expected.pop("messages")
    for k, want in expected.items():
        assert summary[k] == want, k
    assert pgt.plan(h, m) == messages
    # The metadata message is the transfer id's prefix, then postcard Metadata: encoding it again for
    # that transfer gives the same two messages.
    transfer_id = int(summary["header"]["transfer_id"], 16)
    assert m[:8] == transfer_id.to_bytes(8, "little")
    assert pgt.encode(m[8:], summary["digests"], transfer_id) == (h, m)


@pytest.mark.parametrize("v", by_kind("malformed"), ids=ids(by_kind("malformed")))
def test_malformed(pgt, v):
    h, m = split(v)
    with pytest.raises(PgtError) as e:
        pgt.decode(h, m, v.get("limits"))
    check_error(e.value, v)


@pytest.mark.parametrize("v", by_kind("receiver_reject"), ids=ids(by_kind("receiver_reject")))
def test_receiver_reject(pgt, v):
    h, m = split(v)
    pgt.decode(h, m)
    o = v["receiver"]
    r = pgt.receiver(o["rank"], o["source"], o["expected_step"])
    assert r.poll()["kind"] == "header"
    r.handle_header(h)
    with pytest.raises(PgtError) as e:
        r.handle_metadata(m)
    check_error(e.value, v)


class HostReject(Exception):
    """The host refuses a message before the core sees it: ``error`` as in a host_reject_stream entry."""

    def __init__(self, error):
        super().__init__(error)
        self.error = error


class RecordsHost:
    """A sequential host over a stream's records (pgt.recv.receive drives it): each message is the
    next record; data lands in fresh storages, hashed with XXH3-64 per message when the op says so. A
    record with another tag than the one asked for is not that message, which then never comes; a
    record of another transfer (stale: its prefix is not the op's) is skipped; a data message must have
    exactly the plan's length (the core never sees its bytes)."""

    def __init__(self, v, targets=()):
        self.recs, self.targets = iter(records(v)), list(targets)
        self.storages, self.paths, self.hashers = [], None, {}
        self.events = collections.deque()
        self.skipped = 0

    def recv_bytes(self, op):
        want = int(op["tag"])
        while True:
            tag, data = next(self.recs, (None, None))
            if tag != want:
                raise HostReject({"reason": "missing", "from": op["from"], "tag": want})
            if not is_stale(op, data):
                return data
            self.skipped += 1

    def discard(self, op):
        try:
            self.recv_bytes(op)
        except HostReject:
            return False
        return True

    def bind(self, incoming, paths):
        self.paths = paths()
        return self.targets

    def bound(self, incoming, bindings):
        assert all(b["dest"] == "fresh" for b in bindings[len(self.targets) :])
        self.bindings = bindings
        self.storages = [bytearray(int(b["nbytes"])) for b in bindings]

    def recv_data(self, op, segments):
        data, at, digests = self.recv_bytes(op), 8, []  # the storage bytes follow the prefix
        if len(data) != int(op["len"]):
            raise HostReject(
                {"reason": "length", "from": op["from"], "tag": int(op["tag"]),
                 "expected": int(op["len"]), "got": len(data)}
            )  # fmt: skip
        for seg in segments:
            s, off, n = seg["storage"], int(seg["offset"]), int(seg["len"])
            self.storages[s][off : off + n] = data[at : at + n]
            if op["hash"]:
                h = self.hashers.setdefault(s, xxhash.xxh3_64())
                h.update(data[at : at + n])
                if seg["completes"]:
                    digests.append(h.intdigest())
            at += n
        self.events.append(("landed", op["message"]))
        if op["hash"]:
            self.events.append(("digests", op["message"], digests))

    def forward(self, op, payload):
        self.events.append(("forwarded", op["message"]))

    def next_event(self, wait):
        return self.events.popleft() if self.events else None


def receive(pgt, v, targets=()):
    """Receives a stream vector with the vector's receiver options: the host and the result."""
    o = v["receiver"]
    host = RecordsHost(v, targets)
    result = drive(pgt.receiver(o["rank"], o["source"], o["expected_step"]), host)
    assert next(host.recs, None) is None, "records left over"
    return host, result


@pytest.mark.parametrize("v", by_kind("stream"), ids=ids(by_kind("stream")))
def test_stream(pgt, v):
    host, result = receive(pgt, v)
    assert result["leaves"] == v["result"]["leaves"]
    recs = records(v)
    assert host.paths == pgt.decode(recs[0][1], recs[1][1])["path_elems"]
    for i, (s, want) in enumerate(zip(host.storages, v["result"]["storages"], strict=True)):
        assert bytes(s) == pattern(i, len(s))
        assert f"0x{xxhash.xxh3_64_intdigest(bytes(s)):016x}" == want["digest"]


@pytest.mark.parametrize("v", by_kind("stale_stream"), ids=ids(by_kind("stale_stream")))
def test_stale_stream(pgt, v):
    """Records of another transfer are skipped by their prefix; the result is the transfer's own."""
    host, result = receive(pgt, v)
    stale = [r["stale"] for r in v["records"]]
    assert host.skipped == sum(stale) >= 3
    assert result["leaves"] == v["result"]["leaves"]
    for i, (s, want) in enumerate(zip(host.storages, v["result"]["storages"], strict=True)):
        assert bytes(s) == pattern(i, len(s))
        assert f"0x{xxhash.xxh3_64_intdigest(bytes(s)):016x}" == want["digest"]
    # A host that hands the module a stale metadata message is refused by name, never served.
    recs = records(v)
    r = pgt.receiver(v["receiver"]["rank"], v["receiver"]["source"])
    r.poll()
    r.handle_header(recs[0][1])
    with pytest.raises(PgtError) as e:
        r.handle_metadata(recs[1][1])
    assert e.value.name == "TransferMismatch"


@pytest.mark.parametrize("v", by_kind("malformed_stream"), ids=ids(by_kind("malformed_stream")))
def test_malformed_stream(pgt, v):
    with pytest.raises(PgtError) as e:
        receive(pgt, v)
    check_error(e.value, v)


def test_in_place_targets(pgt):
    """A target binds its storage in place (its id in the binding); a target of the wrong size is the
    named error, with the leaf's key path."""
    v = next(v for v in by_kind("stream") if v["file"] == "stream_small.bin")
    recs = records(v)
    st = pgt.decode(recs[0][1], recs[1][1])["storages"][0]
    target = {"storage": 0, "id": 2**40 + 7, "dtype": st["dtype"], "nbytes": st["nbytes"]}
    host, result = receive(pgt, v, [target])
    assert host.bindings[0]["dest"] == {"in_place": 2**40 + 7}
    assert result["bindings"] == host.bindings
    assert bytes(host.storages[0]) == pattern(0, int(st["nbytes"]))
    with pytest.raises(PgtError) as e:
        receive(pgt, v, [dict(target, nbytes=int(st["nbytes"]) + 2)])
    assert e.value.name == "InPlaceSizeMismatch", e.value.message


@pytest.mark.parametrize("v", by_kind("host_reject_stream"), ids=ids(by_kind("host_reject_stream")))
def test_host_reject_stream(pgt, v):
    with pytest.raises(HostReject) as e:
        receive(pgt, v)
    assert e.value.error == v["host_error"]


def test_every_kind_is_tested():
    assert {v["kind"] for v in INDEX["vectors"]} == {
        "valid_metadata",
        "malformed",
        "receiver_reject",
        "stream",
        "stale_stream",
        "malformed_stream",
        "host_reject_stream",
    }
    assert len(by_kind("host_reject_stream")) >= 4


@pytest.mark.parametrize("v", by_kind("stream"), ids=ids(by_kind("stream")))
def test_sender_produces_the_stream(pgt, v):
    """pgt.send's loop (the package's sender) puts the stream's bytes on the wire."""
    recs = records(v)
    summary = pgt.decode(recs[0][1], recs[1][1])
    transfer_id = int(summary["header"]["transfer_id"], 16)
    storages = [pattern(i, int(st["nbytes"])) for i, st in enumerate(summary["storages"])]
    rank, chain = v["receiver"]["rank"], summary["plan"]["fanout"] == "Chain"

    class Recorder:
        sent: list = []

        def send(self, op, parts):
            data = b"".join(bytes(p) for p in parts)
            assert len(data) == op["len"]
            if op["to"] == rank or (chain and op["tag"] > 2):
                self.sent.append((op["tag"], data))

    host = Recorder()
    got = send(
        pgt, host, recs[1][1][8:], storages, digests=summary["digests"], transfer_id=transfer_id
    )
    assert got == transfer_id
    assert host.sent == recs


def test_misuse_is_an_abi_error(pgt):
    with pytest.raises(PgtError) as e:
        pgt.call("pgt_receiver_poll", lambda r: None, 12345)
    assert (e.value.status, e.value.name) == (ABI_ERROR, "BadHandle")
    h, m = split(by_kind("valid_metadata")[0])
    with pytest.raises(PgtError) as e:
        pgt.call("pgt_decode", lambda r: None, inputs=(h, m, b"\xff"))  # not postcard Limits
    assert (e.value.status, e.value.name) == (ABI_ERROR, "BadArgument")


def test_module_path_points_at_the_built_module():
    assert module_path().is_file()
