"""The metadata a sender announces (PROTOCOL.md §6), built in Python and encoded as postcard.

The forms are the ones ``pgt.abi`` decodes into (index.json's JSON forms), so that
``encode(decode(x)) == x``: tree nodes ``{"dict": [key, …]}`` (a key is a ``str`` or ``{"int": n}``),
``{"list": n}``, ``{"tuple": n}``, ``"leaf"``; leaves ``{"kind": "tensor", "layout": …}``,
``{"kind": "dtensor", "local": …, "spec": …}``, ``{"kind": "sharded_tensor", "local_shards": …,
"global": …}`` and ``{"kind": "value", "value": {"type": …}}``; placements ``"Shard(0)"``,
``"Replicate"``, ``"Partial(Sum)"``. Integers may be ``int`` or decimal strings (as the decoders give
integers above 2**53 - 1).

The module validates what this encodes (``Pgt.sender`` refuses bad metadata with a named error); this
file only writes bytes, and refuses what cannot be written at all (unknown forms, out-of-range ints).

``flatten`` turns a nested container into the tree and its leaves, in the protocol's pre-order.
"""

from __future__ import annotations

import math
import re
import struct
import unicodedata
from collections.abc import Callable, Mapping
from typing import Any

from .abi import DTYPES, REDUCE_OPS

U64_MAX = (1 << 64) - 1
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
# A value's int (``Value::Int``) is an i128; dict keys stay i64 (PROTOCOL.md §6).
I128_MIN, I128_MAX = -(1 << 127), (1 << 127) - 1
FANOUTS = ("Direct", "Chain")
# pgt's sender defaults (PROTOCOL.md §9).
DEFAULT_PLAN = {"fanout": "Chain", "bucket_size": 1 << 20, "chunk_size": 1 << 22}


class UnsupportedLeaf(TypeError):
    """A leaf (or dict key) of a type pgt does not carry; ``path`` is its key path."""

    def __init__(self, path: tuple, what: str):
        self.path, self.what = path, what
        super().__init__(f"{display(path)}: {what} is not supported by pgt (no pickle)")


def _quote(key: str) -> str:
    """``key`` quoted as pgt-core quotes it (Python's ``repr`` for every key whose characters are
    printable or control characters): single quotes unless it holds a ``'`` and no ``"``."""
    quote = '"' if "'" in key and '"' not in key else "'"
    out = [quote]
    for c in key:
        if c == "\\":
            out.append("\\\\")
        elif c in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[c])
        elif c == quote:
            out.append("\\" + c)
        elif unicodedata.category(c) == "Cc":
            out.append(f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
        else:
            out.append(c)
    out.append(quote)
    return "".join(out)


def display(path: tuple) -> str:
    """A key path as pgt displays it, as torch's pytree ``keystr`` does: ``['net1.weight']``,
    ``['layers'][0]`` (string keys quoted, int keys and list indices as numbers), '<root>' for the
    empty path. The same text as pgt-core's ``KeyPath`` display."""
    if not path:
        return "<root>"
    # Ints in decimal; a key pgt refuses (a float, …) as Python prints it, for the error naming it.
    return "".join(f"[{_quote(p)}]" if isinstance(p, str) else f"[{p!r}]" for p in path)


# ---- postcard primitives ----


class Writer:
    def __init__(self):
        self.out = bytearray()

    def varint(self, v, bits: int = 64) -> Writer:
        if type(v) is int and 0 <= v < 0x80:  # the common case: one byte
            self.out.append(v)
            return self
        v = int(v)
        if not 0 <= v < 1 << bits:
            raise ValueError(f"{v} is outside u{bits}")
        while True:
            b, v = v & 0x7F, v >> 7
            self.out.append(b | (0x80 if v else 0))
            if not v:
                return self

    def zigzag(self, v) -> Writer:
        v = int(v)
        if not I64_MIN <= v <= I64_MAX:
            raise ValueError(f"{v} is outside i64")
        return self.varint((v << 1) ^ (v >> 63))

    def zigzag128(self, v) -> Writer:
        """An i128 (a value's int): within i64, the same bytes as ``zigzag``."""
        v = int(v)
        if not I128_MIN <= v <= I128_MAX:
            raise ValueError(f"{v} is outside i128")
        return self.varint((v << 1) ^ (v >> 127), 128)

    def bool(self, v: bool) -> Writer:
        self.out.append(1 if v else 0)
        return self

    def raw(self, b: bytes) -> Writer:
        self.out += b
        return self

    def bytes(self, b: bytes) -> Writer:
        return self.varint(len(b)).raw(b)

    def str(self, s: str) -> Writer:
        return self.bytes(s.encode())

    def seq(self, items, item: Callable[[Writer, Any], Any]) -> Writer:
        items = list(items)
        self.varint(len(items))
        for x in items:
            item(self, x)
        return self

    def uints(self, items) -> Writer:
        return self.seq(items, Writer.varint)

    def opt(self, v, item: Callable[[Writer, Any], Any]) -> Writer:
        if v is None:
            return self.bool(False)
        self.bool(True)
        item(self, v)
        return self

    def dtype(self, name: str) -> Writer:
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}")
        return self.varint(DTYPES.index(name))


# ---- pgt-core's types ----


class _Varints(dict):
    """The varint bytes of an int in u64, by value: the numbers of a checkpoint's layouts and key
    lengths repeat, and a lookup costs less than writing one (those below 2^20 are kept); anything
    else (a decimal string, a negative or too large int) is a KeyError, for the general way."""

    def __missing__(self, v):
        if type(v) is not int or not 0 <= v <= U64_MAX:
            raise KeyError(v)
        out = bytes(Writer().varint(v).out)
        if v < 1 << 20:
            self[v] = out
        return out


_VARINTS = _Varints()
_DTYPE_INDEX = {name: bytes([i]) for i, name in enumerate(DTYPES)}


def _layout_bytes(dtype: str, shape, stride, storage_offset: int, nbytes: int) -> bytes:
    """A ``TensorLayout``'s postcard bytes from cached varints: every number a non-negative int below
    2^64, else KeyError or TypeError (the caller then writes it the general way)."""
    small = _VARINTS
    return b"".join(
        [
            _DTYPE_INDEX[dtype],
            small[len(shape)],
            *[small[v] for v in shape],
            small[len(stride)],
            *[small[v] for v in stride],
            small[storage_offset],
            small[nbytes],
        ]
    )


def _layout(w: Writer, x: Mapping) -> None:
    shape, stride = x["shape"], x["stride"]
    try:
        w.out += _layout_bytes(x["dtype"], shape, stride, x["storage_offset"], x["nbytes"])
    except (KeyError, TypeError):  # decimal strings, bad values: the general way
        w.dtype(x["dtype"]).uints(shape).uints(stride)
        w.varint(x["storage_offset"]).varint(x["nbytes"])


def _value(w: Writer, v: Mapping) -> None:
    t = v["type"]
    if t == "none":
        w.varint(0)
    elif t == "bool":
        w.varint(1).bool(v["value"])
    elif t == "int":
        w.varint(2).zigzag128(v["value"])
    elif t == "float":
        w.varint(3)
        if "bits" in v:  # exact, NaN payloads included
            w.raw(struct.pack("<Q", int(v["bits"], 16)))
        else:
            w.raw(struct.pack("<d", float(v["value"])))
    elif t == "str":
        w.varint(4).str(v["value"])
    elif t == "bytes":
        w.varint(5).bytes(bytes.fromhex(v["hex"]) if "hex" in v else bytes(v["value"]))
    else:
        raise ValueError(f"unknown value type {t!r}")


_PLACEMENT = re.compile(r"^(Shard)\((\d+)\)$|^(Replicate)(?:\(\))?$|^(Partial)\((\w+)\)$")


def _placement(w: Writer, p: str) -> None:
    m = _PLACEMENT.match(p)
    if not m:
        raise ValueError(f"unknown placement {p!r}")
    if m.group(1):
        w.varint(0).varint(int(m.group(2)))
    elif m.group(3):
        w.varint(1)
    else:
        op = m.group(5)
        op = op[:1].upper() + op[1:].lower()
        if op not in REDUCE_OPS:
            raise ValueError(f"unknown reduce op in placement {p!r}")
        w.varint(2).varint(REDUCE_OPS.index(op))


def _shard_meta(w: Writer, m: Mapping) -> None:
    w.uints(m["offsets"]).uints(m["sizes"]).str(m["placement"])


def tensor_leaf_bytes(dtype: str, shape, stride, storage_offset: int, nbytes: int) -> bytes:
    """A tensor leaf's postcard bytes (``Leaf::Tensor``), for a leaf function that returns them
    instead of the form (``flatten``'s ``leaf``): every number a non-negative int below 2^64, else
    KeyError or TypeError."""
    return b"\x01" + _layout_bytes(dtype, shape, stride, storage_offset, nbytes)


def _leaf(w: Writer, x: Mapping) -> None:
    if type(x) is bytes:  # already encoded (tensor_leaf_bytes)
        w.out += x
        return
    kind = x["kind"]
    if kind == "value":
        w.varint(0)
        _value(w, x["value"])
    elif kind == "tensor":
        w.varint(1)
        _layout(w, x["layout"])
    elif kind == "dtensor":
        w.varint(2)
        _layout(w, x["local"])
        spec, mesh = x["spec"], x["spec"]["mesh"]
        w.uints(mesh["shape"]).uints(mesh["ranks"])
        w.opt(mesh.get("dim_names"), lambda w, names: w.seq(names, Writer.str))
        w.str(mesh["device_type"])
        w.seq(spec["placements"], _placement)
        w.uints(spec["global_shape"]).uints(spec["global_stride"]).dtype(spec["dtype"])
    elif kind == "sharded_tensor":
        w.varint(3)

        def local(w: Writer, s: Mapping) -> None:
            _layout(w, s["layout"])
            _shard_meta(w, s["meta"])

        w.seq(x["local_shards"], local)
        g = x["global"]
        w.seq(g["shards"], _shard_meta).uints(g["global_size"]).dtype(g["dtype"])
    else:
        raise ValueError(f"unknown leaf kind {kind!r}")


def _key(w: Writer, k) -> None:
    if isinstance(k, str):
        b = k.encode()
        w.out += b"\x00" + _VARINTS[len(b)] + b
    else:
        w.varint(1).zigzag(k["int"])


def _node(w: Writer, n) -> None:
    if n == "leaf":
        w.varint(3)
    elif "dict" in n:
        w.varint(0).seq(n["dict"], _key)
    elif "list" in n:
        w.varint(1).varint(n["list"])
    elif "tuple" in n:
        w.varint(2).varint(n["tuple"])
    else:
        raise ValueError(f"unknown tree node {n!r}")


def encode(
    step: int | None,
    source: int,
    destinations: list[int],
    plan: Mapping | None,
    tree: list,
    leaves: list,
) -> bytes:
    """postcard ``Metadata`` (PROTOCOL.md §6). ``plan`` defaults to pgt's sender defaults."""
    plan = {**DEFAULT_PLAN, **(plan or {})}
    if plan["fanout"] not in FANOUTS:
        raise ValueError(f"unknown fan-out {plan['fanout']!r}")
    w = Writer()
    w.opt(step, Writer.varint).varint(source).uints(destinations)
    w.varint(FANOUTS.index(plan["fanout"])).varint(plan["bucket_size"]).varint(plan["chunk_size"])
    w.seq(tree, _node).seq(leaves, _leaf)
    return bytes(w.out)


# ---- from Python objects ----


def value_leaf(obj) -> dict | None:
    """The value leaf of a plain value pgt carries (None, bool, int, float, str, bytes), else None."""
    if obj is None:
        v = {"type": "none"}
    elif isinstance(obj, bool):
        v = {"type": "bool", "value": obj}
    elif isinstance(obj, int):
        if not I128_MIN <= obj <= I128_MAX:
            return None
        v = {"type": "int", "value": obj}
    elif isinstance(obj, float):
        v = {"type": "float", "bits": f"0x{struct.unpack('<Q', struct.pack('<d', obj))[0]:016x}"}
        if math.isfinite(obj):
            v["value"] = obj
    elif isinstance(obj, str):
        v = {"type": "str", "value": obj}
    elif isinstance(obj, bytes | bytearray):
        v = {"type": "bytes", "hex": bytes(obj).hex()}
    else:
        return None
    return {"kind": "value", "value": v}


def value_of(v: Mapping):
    """The Python value of a value leaf's ``value`` (the inverse of ``value_leaf``)."""
    t = v["type"]
    if t == "none":
        return None
    if t in ("bool", "str"):
        return v["value"]
    if t == "int":
        return int(v["value"])
    if t == "float":
        return struct.unpack("<d", struct.pack("<Q", int(v["bits"], 16)))[0]
    if t == "bytes":
        return bytes.fromhex(v["hex"])
    raise ValueError(f"unknown value type {t!r}")


def flatten(obj, leaf: Callable[[tuple, Any], dict]) -> tuple[list, list]:
    """The tree (pre-order nodes) and leaves of ``obj``: dicts (any ``Mapping``, keys ``str`` or
    ``int``, in iteration order), lists and tuples are nodes; everything else is a leaf, turned into
    its leaf form by ``leaf(path, obj)`` (which raises ``UnsupportedLeaf`` for what it cannot carry;
    it may return the leaf's postcard bytes instead, which ``encode`` writes as they are).
    Iterative, so deep nesting is bounded by the module's ``max_depth``, not Python's stack."""
    tree: list = []
    leaves: list = []
    stack = [((), obj)]
    while stack:
        path, x = stack.pop()
        if isinstance(x, Mapping):
            keys = []
            for k in x:
                if isinstance(k, str):
                    keys.append(k)
                elif isinstance(k, int) and not isinstance(k, bool) and I64_MIN <= k <= I64_MAX:
                    keys.append({"int": k})
                else:
                    raise UnsupportedLeaf((*path, k), f"a dict key of type {type(k).__name__}")
            tree.append({"dict": keys})
            stack.extend(reversed([((*path, k), x[k]) for k in x]))
        elif isinstance(x, list | tuple) and not _is_namedtuple(x):
            tree.append({"tuple" if isinstance(x, tuple) else "list": len(x)})
            stack.extend(reversed([((*path, i), v) for i, v in enumerate(x)]))
        else:
            tree.append("leaf")
            leaves.append(leaf(path, x))
    return tree, leaves


def _is_namedtuple(x) -> bool:
    # A namedtuple would come back as a plain tuple: refuse it rather than lose its type.
    return isinstance(x, tuple) and hasattr(x, "_fields")


def unflatten(tree: list, values: list):
    """The nested object of ``tree`` with ``values`` at its leaves, in order: dicts, lists, tuples."""
    it_nodes, it_values = iter(tree), iter(values)

    def build():
        n = next(it_nodes)
        if n == "leaf":
            return next(it_values)
        if "dict" in n:
            return {(k if isinstance(k, str) else int(k["int"])): build() for k in n["dict"]}
        if "list" in n:
            return [build() for _ in range(int(n["list"]))]
        return tuple(build() for _ in range(int(n["tuple"])))

    # Iterative over siblings, recursive over depth: depth is bounded by the module's max_depth (64).
    return build() if tree else None
