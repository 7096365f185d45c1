"""pgt.abi's bulk decoders (numpy varints, inline tensor leaves, tree, key paths, bindings) against
its general one-call-per-field decoders, on postcard bytes with the cases the fast paths step around:
multi-byte varints up to u64::MAX, values above 2**53 - 1 (decimal strings), long and int keys,
value leaves between tensor leaves, in-place bindings with and without casts."""

import pytest

from pgt import abi
from pgt.abi import Reader
from pgt.metadata import Writer, _leaf, _node

BIG = [0, 1, 127, 128, 300, 16383, 16384, 2**35, 2**53, 2**64 - 1]


def test_tokens_decode_every_varint_width():
    w = Writer()
    for v in BIG:
        w.varint(v)
    r = Reader(bytes(w.out) + b"\x05")
    assert r.tokens(len(BIG)) == BIG
    assert r.tokens() == [5] and r.i == len(r.b)


def test_tokens_refuse_a_truncated_varint():
    with pytest.raises(IndexError):
        Reader(b"\x01\x80").tokens()
    with pytest.raises(IndexError):
        Reader(b"\x01\x80").tokens(2)


def layout(dtype="float32", shape=(4,), stride=(1,), offset=0, nbytes=16):
    return {
        "dtype": dtype,
        "shape": list(shape),
        "stride": list(stride),
        "storage_offset": offset,
        "nbytes": nbytes,
    }


LEAVES = [
    {"kind": "tensor", "layout": layout()},
    {"kind": "value", "value": {"type": "str", "value": "é" * 100}},
    {"kind": "tensor", "layout": layout("bfloat16", (2**35, 3), (3, 1), 2**53 + 7, 2**64 - 1)},
    {"kind": "tensor", "layout": layout("bool", (), (), 0, 1)},
    {"kind": "value", "value": {"type": "float", "bits": "0xfff8000000000001"}},
    {"kind": "tensor", "layout": layout("uint8", [1] * 200, [1] * 200, 300, 1)},
]


def seq(items, write) -> bytes:
    w = Writer()
    w.seq(items, write)
    return bytes(w.out)


def test_leaves_match_the_general_decoder():
    data = seq(LEAVES, _leaf)
    fast, general = Reader(data), Reader(data)
    got = abi.leaves(fast)
    assert got == general.seq(abi.leaf)
    assert fast.i == general.i == len(data)
    assert got[2]["layout"]["storage_offset"] == str(2**53 + 7)  # above 2**53 - 1: a string
    assert got[2]["layout"]["shape"] == [2**35, 3]


TREE = [
    {"dict": ["a", {"int": -3}, "k" * 200, ""]},
    "leaf",
    {"list": 2},
    "leaf",
    {"tuple": 2**40},
    {"dict": [{"int": 2**62}]},
]


def test_tree_matches_the_general_decoder():
    data = seq(TREE, _node)
    fast, general = Reader(data), Reader(data)
    assert abi.tree(fast) == general.seq(abi.node)
    assert fast.i == general.i == len(data)


def test_canonical_key_paths():
    w = Writer().varint(2)
    w.varint(3).varint(0).varint(0).str("model").varint(1).varint(300).varint(0).varint(1)
    w.zigzag(-(2**40))
    w.varint(1).varint(0).varint(0).str("x" * 130)
    data = bytes(w.out)
    paths = abi.canonical_key_paths(Reader(data))
    assert paths == [(("k", "model"), ("x", 300), ("i", -(2**40))), (("k", "x" * 130),)]
    assert len(abi.Reader(data).seq(abi.key_path)) == 2


def test_bindings_match_the_general_decoder():
    w = Writer().varint(4)
    w.varint(0).varint(1).varint(16).bool(False)  # fresh
    w.varint(1).varint(7).varint(0).varint(2**40).bool(True).varint(1)  # in place, cast
    w.varint(1).varint(300).varint(19).varint(1).bool(False)  # in place
    w.varint(0).varint(3).varint(2**64 - 1).bool(False)
    data = bytes(w.out)
    got = abi.bindings(Reader(data))
    assert got == Reader(data).seq(abi.binding)
    assert got[1] == {
        "dest": {"in_place": 7},
        "dtype": "float64",
        "nbytes": 2**40,
        "cast_from": "float32",
    }
    with pytest.raises(ValueError, match="left after the bindings"):
        abi.bindings(Reader(data + b"\x00"))
