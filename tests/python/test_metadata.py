"""pgt.metadata: the Python encoder of the metadata a sender announces, against the golden vectors and
the module's own decoder (encode(decode(x)) == x), and flatten/unflatten of nested containers."""

import json
import math
from collections import OrderedDict
from pathlib import Path

import pytest

from pgt.abi import Pgt
from pgt.metadata import (
    UnsupportedLeaf,
    encode,
    flatten,
    unflatten,
    value_leaf,
    value_of,
)

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
INDEX = json.loads((VECTORS / "index.json").read_text())
VALID = [v for v in INDEX["vectors"] if v["kind"] in ("valid_metadata", "stream")]


@pytest.fixture(scope="module")
def pgt():
    return Pgt.load()


def header_and_metadata(v):
    """The header and the metadata message (its 8-byte prefix, then postcard Metadata)."""
    b = (VECTORS / v["file"]).read_bytes()
    if v["kind"] == "stream":  # records: tag u64, len u64, payload; the metadata's prefix first
        n0 = int.from_bytes(b[8:16], "little")
        header = b[16 : 16 + n0]
        at = 16 + n0
        n1 = int.from_bytes(b[at + 8 : at + 16], "little")
        return header, b[at + 16 : at + 16 + n1]
    n = int(v["header_len"])
    return b[:n], b[n:]


@pytest.mark.parametrize("v", VALID, ids=[v["file"] for v in VALID])
def test_encode_of_decode_is_the_vectors_bytes(pgt, v):
    header, metadata = header_and_metadata(v)
    s = pgt.decode(header, metadata)
    got = encode(s["step"], s["source"], s["destinations"], s["plan"], s["tree"], s["leaves"])
    assert got == metadata[8:]


def test_every_value_round_trips_through_the_module(pgt):
    values = [None, True, False, 0, -1, 2**63 - 1, -(2**63), 1.5, -0.0, math.inf, math.nan, "", "ü"]
    values += [2**63, 2**64 - 1, -(2**63) - 1, 2**127 - 1, -(2**127)]  # ints are i128
    values += [b"", b"\x00\xff"]
    tree, leaves = flatten({str(i): v for i, v in enumerate(values)}, lambda p, x: value_leaf(x))
    metadata = encode(7, 0, [1], None, tree, leaves)
    header, message = pgt.encode(metadata, False, 1)
    assert message[8:] == metadata
    s = pgt.decode(header, message)
    got = [value_of(leaf["value"]) for leaf in s["leaves"]]
    for want, have in zip(values, got, strict=True):
        if isinstance(want, float) and math.isnan(want):
            assert math.isnan(have)
        else:
            assert (type(have), have) == (type(want), want)
    assert math.copysign(1, got[8]) == -1  # -0.0 keeps its sign
    assert s["step"] == 7 and s["plan"] == {
        "fanout": "Chain",
        "bucket_size": 2**20,
        "chunk_size": 2**22,
    }


def test_flatten_is_pre_order_and_unflatten_inverts_it():
    obj = OrderedDict(a=1, b=[2, (3, {"c": 4, 5: 6})], d={})
    tree, leaves = flatten(obj, lambda p, x: (p, x))
    assert tree == [
        {"dict": ["a", "b", "d"]},
        "leaf",
        {"list": 2},
        "leaf",
        {"tuple": 2},
        "leaf",
        {"dict": ["c", {"int": 5}]},
        "leaf",
        "leaf",
        {"dict": []},
    ]
    assert [p for p, _ in leaves] == [
        ("a",),
        ("b", 0),
        ("b", 1, 0),
        ("b", 1, 1, "c"),
        ("b", 1, 1, 5),
    ]
    assert unflatten(tree, [x for _, x in leaves]) == {
        "a": 1,
        "b": [2, (3, {"c": 4, 5: 6})],
        "d": {},
    }


def test_unsupported_keys_and_values_name_their_path():
    with pytest.raises(UnsupportedLeaf) as e:
        flatten({"a": {1.5: 0}}, lambda p, x: value_leaf(x))
    assert "['a'][1.5]: " in str(e.value) and "float" in str(e.value), str(e.value)
    assert value_leaf(object()) is None and value_leaf(2**127) is None
    assert value_leaf(-(2**127) - 1) is None and value_leaf(-(2**127)) is not None
    # Dict keys stay i64; values beyond i128 cannot be written at all.
    with pytest.raises(UnsupportedLeaf, match="int"):
        flatten({2**63: 0}, lambda p, x: value_leaf(x))
    with pytest.raises(ValueError, match="outside i128"):
        encode(
            None,
            0,
            [1],
            None,
            ["leaf"],
            [{"kind": "value", "value": {"type": "int", "value": 2**127}}],
        )
    with pytest.raises(ValueError, match="outside u64"):
        encode(-1, 0, [1], None, ["leaf"], [value_leaf(None)])


def test_the_module_refuses_what_the_encoder_writes_badly(pgt):
    # The encoder writes; the module validates: a destination equal to the source is a named error.
    from pgt.abi import PgtError

    metadata = encode(None, 0, [0], None, ["leaf"], [value_leaf(1)])
    with pytest.raises(PgtError) as e:
        pgt.encode(metadata, True, 1)
    assert e.value.name


def test_send_refuses_a_storage_of_the_wrong_size_before_sending(pgt):
    from pgt.send import send

    layout = {"dtype": "float32", "shape": [4], "stride": [1], "storage_offset": 0, "nbytes": 16}
    metadata = encode(None, 0, [1], None, ["leaf"], [{"kind": "tensor", "layout": layout}])

    class Host:
        sent: list = []

        def send(self, op, parts):
            self.sent.append(op)

    host = Host()
    with pytest.raises(ValueError, match="storage 0 has 12 bytes; the metadata says 16"):
        send(pgt, host, metadata, [bytearray(12)])
    assert host.sent == []
    send(pgt, host, metadata, [bytearray(16)])
    assert [op["kind"] for op in host.sent] == ["header", "metadata", "data", "trailer"]
