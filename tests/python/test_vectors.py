"""pgt's raw-ABI wasm module, loaded by wasmtime-py, against the golden vectors of tests/vectors:
every vector decodes to the summary, plan and error index.json gives; receivers driven from Python (with
real XXH3-64 digests) accept the streams and reject the malformed ones with the named error; a sender
driven from Python produces the streams' bytes.

Run: pytest tests/python (after scripts/build-wasm.sh).
"""

import json
from pathlib import Path

import pytest
import xxhash
from pgt_abi import ABI_ERROR, ERROR, Pgt, PgtError, module_path

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
    assert e.debug == v["error_debug"]
    assert e.message


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
    assert pgt.abi_version() == 1
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
    # The metadata message is postcard Metadata: encoding it again gives the same two messages.
    assert pgt.encode(m, summary["digests"]) == (h, m)


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


def receive(pgt, v):
    """Drives a receiver over the stream's records as a sequential host that hashes what lands."""
    recs = iter(records(v))
    o = v["receiver"]
    r = pgt.receiver(o["rank"], o["source"], o["expected_step"])
    storages, hashers, ops = [], [], []
    while True:
        op = r.poll()
        ops.append(op["type"])
        if op["type"] == "done":
            break
        if op["type"] == "need_bindings":
            assert all(b["dest"] == "fresh" for b in r.finish_bindings())
            continue
        if op["type"] == "forward":
            r.handle_forwarded(op["message"])
            continue
        assert op["type"] == "recv", "a sequential receiver never waits"
        tag, data = next(recs)
        assert tag == op["tag"]
        if op["kind"] == "header":
            r.handle_header(data)
        elif op["kind"] == "metadata":
            incoming = r.handle_metadata(data)
            storages = [bytearray(int(s["nbytes"])) for s in incoming["storages"]]
            hashers = [xxhash.xxh3_64() for _ in storages]
        elif op["kind"] == "trailer":
            r.handle_trailer(data)
        else:
            at = 0
            for seg in op["segments"]:
                s, off, n = seg["storage"], int(seg["offset"]), int(seg["len"])
                storages[s][off : off + n] = data[at : at + n]
                if op["hash"]:
                    hashers[s].update(data[at : at + n])
                    if off + n == len(storages[s]):
                        r.handle_storage_digest(s, hashers[s].intdigest())
                at += n
            r.handle_data(op["message"])
    return storages, r.finish(), ops


@pytest.mark.parametrize("v", by_kind("stream"), ids=ids(by_kind("stream")))
def test_stream(pgt, v):
    storages, result, _ = receive(pgt, v)
    assert result["leaves"] == v["result"]["leaves"]
    for i, (s, want) in enumerate(zip(storages, v["result"]["storages"], strict=True)):
        assert bytes(s) == pattern(i, len(s))
        assert f"0x{xxhash.xxh3_64_intdigest(bytes(s)):016x}" == want["digest"]


@pytest.mark.parametrize("v", by_kind("malformed_stream"), ids=ids(by_kind("malformed_stream")))
def test_malformed_stream(pgt, v):
    with pytest.raises(PgtError) as e:
        receive(pgt, v)
    check_error(e.value, v)


@pytest.mark.parametrize("v", by_kind("stream"), ids=ids(by_kind("stream")))
def test_sender_produces_the_stream(pgt, v):
    recs = records(v)
    summary = pgt.decode(recs[0][1], recs[1][1])
    s = pgt.sender(recs[1][1], summary["digests"])
    storages = [pattern(i, int(st["nbytes"])) for i, st in enumerate(s.storages)]
    hashers = [xxhash.xxh3_64() for _ in storages]
    rank, chain = v["receiver"]["rank"], summary["plan"]["fanout"] == "Chain"
    sent = []
    while (op := s.poll())["type"] != "done":
        assert op["type"] == "send"
        data = op.get("bytes")
        if data is None:
            data = b"".join(
                storages[g["storage"]][int(g["offset"]) : int(g["offset"]) + int(g["len"])]
                for g in op["segments"]
            )
        assert len(data) == op["len"]
        if op["to"] == rank or (chain and op["tag"] > 2):
            sent.append((op["tag"], data))
        if op["hash"]:
            for g in op["segments"]:
                part = storages[g["storage"]][int(g["offset"]) : int(g["offset"]) + int(g["len"])]
                hashers[g["storage"]].update(part)
                if int(g["offset"]) + int(g["len"]) == len(storages[g["storage"]]):
                    s.handle_storage_digest(g["storage"], hashers[g["storage"]].intdigest())
    assert sent == recs


def test_misuse_is_an_abi_error(pgt):
    with pytest.raises(PgtError) as e:
        pgt.call("pgt_receiver_poll", lambda r: None, 12345)
    assert (e.value.status, e.value.name) == (ABI_ERROR, "BadHandle")
    h, m = split(by_kind("valid_metadata")[0])
    with pytest.raises(PgtError) as e:
        pgt.call(
            "pgt_decode", lambda r: None, inputs=(h, m, b"\xff")
        )  # limits: not postcard LimitsW
    assert (e.value.status, e.value.name) == (ABI_ERROR, "BadArgument")


def test_module_path_points_at_the_built_module():
    assert module_path().is_file()
