"""pgt's raw-ABI wasm module (wasm/ABI.md, version 3) from Python, with wasmtime-py.

A small host: loads ``pgt_wasm.wasm`` (built by ``scripts/build-wasm.sh``), copies inputs into guest
memory, calls the exports and decodes their result blocks — pgt-core's own types, postcard-encoded —
into plain Python values in the JSON forms of ``tests/vectors/index.json`` (integers above 2**53 - 1
as decimal strings, digests as ``0x…`` hex, dtypes as torch names). Tensor bytes never enter the
guest: it sees metadata, plans, completions and the digests the host computes.

    pgt = Pgt.load()
    summary = pgt.decode(header, metadata)          # or raises PgtError(status, name, message)
    r = pgt.receiver(rank=1, source=0)
    op = r.poll()                                   # {"type": "recv", "kind": "header", …}

How a host drives a receiver with these wrappers: ``pgt.recv.receive`` (as pgt-core's drive.rs).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import math
import os
import struct
from pathlib import Path

import numpy as np
import wasmtime

# The module this package carries (scripts/build-wasm.sh copies it here before `pip install`).
BUNDLED_MODULE = Path(__file__).resolve().parent / "pgt_wasm.wasm"

# Variant orders of pgt-core's enums (postcard writes a variant as its index).
DTYPES = (  # DType, as torch names
    "float64 float32 float16 bfloat16 float8_e4m3fn float8_e5m2 float8_e4m3fnuz float8_e5m2fnuz "
    "complex128 complex64 complex32 int64 int32 int16 int8 uint64 uint32 uint16 uint8 bool"
).split()
KINDS = ["header", "metadata", "data", "trailer"]  # MessageKind
REDUCE_OPS = ["Sum", "Avg", "Product", "Min", "Max"]  # ReduceOp
LIMITS = [  # Limits' fields, in order
    "max_metadata_bytes",
    "max_leaves",
    "max_depth",
    "max_ndim",
    "max_total_bytes",
    "max_messages",
]
MAX_SAFE = 2**53 - 1

# The raw ABI version this host speaks (pgt_abi_version).
ABI_VERSION = 3
# Every message after the header starts with the transfer id, u64 little-endian (PROTOCOL.md §2).
PREFIX_LEN = 8
# Stale messages a host skips while waiting for one message (pgt_core::header::MAX_STALE), and the
# longest one it reads whole to see whether it is stale (MAX_STALE_LEN).
MAX_STALE = 1024
MAX_STALE_LEN = (1 << 30) + 16
# The most data messages a Python receiver accepts by default (the module's default is 2^20): 2^16
# messages of pgt's default 4 MiB chunks carry 256 GiB. Pass ``limits`` to accept more.
HOST_MAX_MESSAGES = 1 << 16
# Result block status words.
OK, ERROR, ABI_ERROR = 0, 1, 2


def module_path() -> Path:
    """$PGT_WASM_MODULE if set, else the module inside this package."""
    if os.environ.get("PGT_WASM_MODULE"):
        return Path(os.environ["PGT_WASM_MODULE"])
    return BUNDLED_MODULE


class PgtError(Exception):
    """A pgt error (an ``ErrorInfo``): ``name`` is the pgt_core::Error variant (or BadHandle /
    BadArgument), ``message`` its Display text; ``error`` keeps the rest of the payload undecoded
    (postcard ``Option<pgt_core::Error>``: ``b"\\x00"`` for ABI errors)."""

    def __init__(self, status: int, name: str, message: str, error: bytes):
        super().__init__(f"{name}: {message}")
        self.status, self.name, self.message, self.error = status, name, message, error


def uint(v: int):
    return v if v <= MAX_SAFE else str(v)


def hex64(v: int) -> str:
    return f"0x{v:016x}"


def prefix_bytes(prefix: str) -> bytes:
    """The 8 bytes a message starts with, from an op's ``prefix`` ("0x…", the transfer id)."""
    return int(prefix, 16).to_bytes(PREFIX_LEN, "little")


def is_stale(op: dict, message) -> bool:
    """Whether ``message`` (or its first bytes) belongs to another transfer than ``op``'s: it has a
    prefix, and the prefix is not ``op["prefix"]`` (pgt_core's RecvOp::is_stale). Such a message is never
    used: skip it and receive the next one with the tag."""
    if op.get("prefix") is None or len(message) < PREFIX_LEN:
        return False
    return bytes(message[:PREFIX_LEN]) != prefix_bytes(op["prefix"])


def sint(v: int):
    return v if abs(v) <= MAX_SAFE else str(v)


# ---- postcard ----


class Reader:
    """Reads postcard: varints (every integer wider than a byte), zigzag, bools as one byte,
    length-prefixed sequences and strings, ``Option`` as 0/1 then the value, enums as a varint variant
    index then the fields, structs as their fields in order."""

    def __init__(self, data: bytes):
        self.b, self.i = data, 0

    def varint(self) -> int:
        i = self.i
        byte = self.b[i]
        if byte < 0x80:  # most integers of a result are below 128
            self.i = i + 1
            return byte
        out, shift = byte & 0x7F, 7
        while True:
            i += 1
            byte = self.b[i]
            out |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                self.i = i + 1
                return out

    def uint(self):
        v = self.varint()
        return v if v <= MAX_SAFE else str(v)

    def uints(self) -> list:
        n, read = self.varint(), self.varint
        out = [read() for _ in range(n)]
        for v in out:
            if v > MAX_SAFE:
                return [uint(v) for v in out]
        return out

    def tokens(self, count: int | None = None) -> list[int]:
        """The next ``count`` varints (default: the rest of the result), decoded at once (numpy): a
        sequence of records made only of varints and 0/1 bytes (each a one-byte varint) is varints
        in a row, and thousands of them (a plan's segments, the storages, the bindings) cost a
        Python call each otherwise."""
        if count == 0 or self.i == len(self.b):
            return []
        data = np.frombuffer(self.b, np.uint8, offset=self.i)
        ends = np.flatnonzero(data < 0x80)
        if count is None:
            if data[-1] >= 0x80:
                raise IndexError("a result ends inside a varint")
            count = len(ends)
        ends = ends[:count]
        if len(ends) < count:
            raise IndexError(f"{count} varints expected, {len(ends)} left in a result")
        n = int(ends[-1]) + 1
        data = data[:n]
        if len(ends) == n:  # every varint is one byte
            self.i += n
            return data.tolist()
        starts = np.empty(count, np.intp)
        starts[0] = 0
        starts[1:] = ends[:-1] + 1
        # each byte's position within its varint: 7 bits more significant per byte
        shift = np.arange(n, dtype=np.uint64) - np.repeat(starts, ends - starts + 1).astype(
            np.uint64
        )
        values = (data & 0x7F).astype(np.uint64) << (shift * np.uint64(7))
        self.i += n
        return np.add.reduceat(values, starts).tolist()

    def zigzag(self) -> int:
        v = self.varint()
        return (v >> 1) ^ -(v & 1)

    def varint128(self) -> int:
        """A varint of up to 128 bits (a ``Value::Int``'s): this reader reads any length."""
        return self.varint()

    def zigzag128(self) -> int:
        v = self.varint128()
        return (v >> 1) ^ -(v & 1)

    def byte(self) -> int:
        self.i += 1
        return self.b[self.i - 1]

    def bool(self) -> bool:
        return self.byte() == 1

    def raw(self, n: int) -> bytes:
        self.i += n
        return bytes(self.b[self.i - n : self.i])

    def bytes(self) -> bytes:
        return self.raw(self.varint())

    def str(self) -> str:
        return self.bytes().decode("utf-8")

    def seq(self, item) -> list:
        return [item(self) for _ in range(self.varint())]

    def opt(self, item):
        return item(self) if self.byte() == 1 else None

    def dtype(self) -> str:
        return DTYPES[self.varint()]

    def rest(self) -> bytes:
        return self.raw(len(self.b) - self.i)

    def done(self):
        assert self.i == len(self.b), f"{len(self.b) - self.i} bytes left in a result"


def varint(v: int) -> bytes:
    if 0 <= v < 0x4000:  # one or two bytes: every count, index and small size (no loop)
        return bytes((v,)) if v < 0x80 else bytes((v & 0x7F | 0x80, v >> 7))
    out = bytearray()
    while True:
        byte = v & 0x7F
        v >>= 7
        if v:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


# ---- inputs: pgt-core's types as postcard ----


def limits_bytes(limits: dict | None) -> bytes:
    """postcard ``Limits``; b"" (the defaults) for None."""
    if not limits:
        return b""
    return b"".join(varint(int(limits[f])) for f in LIMITS)


def options_bytes(rank: int, source: int, expected_step: int | None, limits: dict) -> bytes:
    """postcard ``ReceiverOptions {rank, source, expected_step, limits}``."""
    step = b"\x00" if expected_step is None else b"\x01" + varint(int(expected_step))
    return varint(rank) + varint(source) + step + limits_bytes(limits)


def in_place_bytes(targets) -> bytes:
    """postcard ``Vec<InPlace>``: each ``{storage, id, dtype, nbytes}``."""
    out = bytearray(varint(len(targets)))
    for t in targets:
        out += varint(t["storage"]) + varint(int(t["id"])) + varint(DTYPES.index(t["dtype"]))
        out += varint(int(t["nbytes"]))
    return bytes(out)


def digests_bytes(digests) -> bytes:
    """Digests as the ABI takes them: little-endian u64s, in order."""
    return struct.pack(f"<{len(digests)}Q", *digests)


# ---- results: pgt-core's types, in index.json's JSON forms ----


def limits(r: Reader) -> dict:
    return {f: r.uint() for f in LIMITS}


def layout(r: Reader) -> dict:  # TensorLayout
    dtype, shape, stride = DTYPES[r.varint()], r.uints(), r.uints()
    return {
        "dtype": dtype,
        "shape": shape,
        "stride": stride,
        "storage_offset": r.uint(),
        "nbytes": r.uint(),
    }


def value(r: Reader) -> dict:
    tag = r.varint()
    if tag == 0:
        return {"type": "none"}
    if tag == 1:
        return {"type": "bool", "value": r.bool()}
    if tag == 2:
        return {"type": "int", "value": sint(r.zigzag128())}
    if tag == 3:
        raw = r.raw(8)
        f = struct.unpack("<d", raw)[0]
        out = {"type": "float", "bits": f"0x{struct.unpack('<Q', raw)[0]:016x}"}
        if math.isfinite(f):
            out["value"] = f
        return out
    if tag == 4:
        return {"type": "str", "value": r.str()}
    if tag == 5:
        return {"type": "bytes", "hex": r.bytes().hex()}
    raise ValueError(f"value tag {tag}")


def placement(r: Reader) -> str:
    tag = r.varint()
    if tag == 0:
        return f"Shard({r.varint()})"
    if tag == 1:
        return "Replicate"
    return f"Partial({REDUCE_OPS[r.varint()]})"


def shard_meta(r: Reader) -> dict:
    return {"offsets": r.uints(), "sizes": r.uints(), "placement": r.str()}


def leaf(r: Reader) -> dict:
    tag = r.varint()
    if tag == 0:
        return {"kind": "value", "value": value(r)}
    if tag == 1:
        return {"kind": "tensor", "layout": layout(r)}
    if tag == 2:
        local = layout(r)
        mesh = {
            "shape": r.uints(),
            "ranks": r.uints(),
            "dim_names": r.opt(lambda r: r.seq(Reader.str)),
            "device_type": r.str(),
        }
        spec = {
            "mesh": mesh,
            "placements": r.seq(placement),
            "global_shape": r.uints(),
            "global_stride": r.uints(),
            "dtype": r.dtype(),
        }
        return {"kind": "dtensor", "local": local, "spec": spec}
    if tag == 3:
        local_shards = r.seq(lambda r: {"layout": layout(r), "meta": shard_meta(r)})
        glob = {"shards": r.seq(shard_meta), "global_size": r.uints(), "dtype": r.dtype()}
        return {"kind": "sharded_tensor", "local_shards": local_shards, "global": glob}
    raise ValueError(f"leaf tag {tag}")


def leaves(r: Reader) -> list:
    """``Vec<Leaf>``, as ``r.seq(leaf)``; a tensor leaf (the common one) decoded in one go: its
    varints (dtype, shape and stride as a length then the items, storage offset, nbytes) read inline,
    without a call each (a checkpoint may have 10,000s of leaves)."""
    b, out = r.b, []
    for _ in range(r.varint()):
        i = r.i
        if b[i] != 1 or b[i + 1] >= len(DTYPES):  # not a tensor of a known dtype: the general way
            out.append(leaf(r))
            continue
        dtype = DTYPES[b[i + 1]]
        i += 2
        values = []  # shape's length, shape, stride's length, stride, offset, nbytes
        need, stage = 1, 0
        while True:
            v = b[i]
            i += 1
            if v >= 0x80:
                v &= 0x7F
                shift = 7
                while True:
                    c = b[i]
                    i += 1
                    v |= (c & 0x7F) << shift
                    if c < 0x80:
                        break
                    shift += 7
                if v > MAX_SAFE:
                    v = str(v)
            values.append(v)
            need -= 1
            if need == 0:
                if stage == 2:
                    break
                # after a length: its items, then the next length (stride's) or offset and nbytes
                need, stage = int(v) + 1 + stage, stage + 1
        r.i = i
        nd = values[0]
        nd2 = values[1 + nd]
        out.append(
            {
                "kind": "tensor",
                "layout": {
                    "dtype": dtype,
                    "shape": values[1 : 1 + nd],
                    "stride": values[2 + nd : 2 + nd + nd2],
                    "storage_offset": values[-2],
                    "nbytes": values[-1],
                },
            }
        )
    return out


def key(r: Reader):
    return r.str() if r.varint() == 0 else {"int": sint(r.zigzag())}


def node(r: Reader):
    tag = r.varint()
    if tag == 0:
        return {"dict": r.seq(key)}
    if tag == 1:
        return {"list": r.uint()}
    if tag == 2:
        return {"tuple": r.uint()}
    return "leaf"


def tree(r: Reader) -> list:
    """``Vec<Node>``, as ``r.seq(node)``; a leaf node and a dict's short str keys read inline."""
    b, out = r.b, []
    for _ in range(r.varint()):
        i = r.i
        if b[i] == 3:
            r.i = i + 1
            out.append("leaf")
        elif b[i] != 0:
            out.append(node(r))
        else:
            r.i = i + 1
            keys = []
            for _ in range(r.varint()):
                i = r.i
                if b[i] == 0 and b[i + 1] < 0x80:  # Key::Str, shorter than 128 bytes
                    n = b[i + 1]
                    r.i = i + 2 + n
                    keys.append(b[i + 2 : i + 2 + n].decode("utf-8"))
                else:
                    keys.append(key(r))
            out.append({"dict": keys})
    return out


def key_path(r: Reader) -> list:
    def elem(r):
        if r.varint() == 1:
            return {"index": r.uint()}
        if r.varint() == 0:
            return {"key": r.str()}
        return {"int_key": sint(r.zigzag())}

    return r.seq(elem)


def canonical_key_paths(r: Reader) -> list:
    """``Vec<KeyPath>`` as tuples that tell str keys, int keys and list indices apart — ``("k",
    str)``, ``("i", int)``, ``("x", int)`` — ready to look up in a dict of a nested object's leaves
    (pgt.torch's in-place targets); a str key's common short form read inline."""
    b, out = bytes(r.b), []  # (a result is a bytearray: its slices would not be dict keys)
    keys: dict = {}  # a short str key's bytes -> its element: key paths share most of their keys
    for _ in range(r.varint()):
        path = []
        for _ in range(r.varint()):
            i = r.i
            if b[i] == 1:  # PathElem::Index
                r.i = i + 1
                path.append(("x", r.varint()))
            elif b[i + 1] == 0:  # PathElem::Key(Key::Str)
                n = b[i + 2]
                if n < 0x80:
                    r.i = i + 3 + n
                    raw = b[i + 3 : i + 3 + n]
                    elem = keys.get(raw)
                    if elem is None:
                        elem = keys[raw] = ("k", raw.decode("utf-8"))
                    path.append(elem)
                else:
                    r.i = i + 2
                    path.append(("k", r.str()))
            else:  # PathElem::Key(Key::Int)
                r.i = i + 2
                path.append(("i", r.zigzag()))
        out.append(tuple(path))
    return out


def storage(r: Reader) -> dict:  # StorageRef
    read = r.varint
    leaf, shard, nbytes = read(), read(), read()
    return {"leaf": leaf, "shard": shard, "nbytes": uint(nbytes), "dtype": DTYPES[read()]}


def storages(r: Reader) -> list:
    """``Vec<StorageRef>``: four varints each, decoded at once."""
    n = r.varint()
    v = r.tokens(4 * n)
    return [
        {"leaf": leaf, "shard": shard, "nbytes": uint(nbytes), "dtype": DTYPES[dtype]}
        for leaf, shard, nbytes, dtype in zip(v[0::4], v[1::4], v[2::4], v[3::4], strict=True)
    ]


def summary(r: Reader) -> dict:
    out = {
        "header": {
            "version": r.varint(),
            "flags": r.varint(),
            "metadata_len": r.uint(),
            "metadata_digest": f"0x{r.varint():016x}",
            "transfer_id": f"0x{r.varint():016x}",
        },
        "step": r.opt(Reader.uint),
        "source": r.varint(),
        "destinations": r.seq(Reader.varint),
        "plan": {
            "fanout": ["Direct", "Chain"][r.varint()],
            "bucket_size": r.uint(),
            "chunk_size": r.uint(),
        },
        "digests": r.bool(),
        "total_bytes": r.uint(),
        "tree": tree(r),
        "leaves": leaves(r),
        "paths": r.seq(Reader.str),
        "path_elems": r.seq(key_path),
        "storages": storages(r),
    }
    out["leaf_count"] = len(out["leaves"])
    out["storage_count"] = len(out["storages"])
    return out


def segment(r: Reader) -> dict:
    read = r.varint
    st, off, n = read(), read(), read()
    return {"storage": st, "offset": uint(off), "len": uint(n), "completes": r.byte() == 1}


def segments(r: Reader) -> list:
    """``Vec<Segment>``: three varints and a 0/1 byte each, decoded at once."""
    n = r.varint()
    v = r.tokens(4 * n)
    return [
        {"storage": st, "offset": uint(off), "len": uint(ln), "completes": c == 1}
        for st, off, ln, c in zip(v[0::4], v[1::4], v[2::4], v[3::4], strict=True)
    ]


def plan(r: Reader) -> list:
    """A ``Plan`` (messages, each with a ``Range<u32>`` into the segments; then the segments) as
    index.json's ``messages``: each message with its own segments."""
    messages = r.seq(lambda r: (KINDS[r.varint()], r.uint(), r.uint(), r.varint(), r.varint()))
    segments_ = segments(r)
    return [
        {"kind": kind, "tag": tag, "len": n, "segments": segments_[start:end]}
        for kind, tag, n, start, end in messages
    ]


def op(r: Reader, peer: str) -> dict:
    """The fields RecvOp, ForwardOp and SendOp share: the peer rank, then message, kind, tag, len."""
    rank, message, kind = r.varint(), r.varint(), KINDS[r.varint()]
    return {peer: rank, "message": message, "kind": kind, "tag": r.uint(), "len": r.uint()}


def prefix(r: Reader):
    """An op's ``prefix: Option<u64>``: the transfer id the message starts with, as "0x…", or None."""
    return r.opt(lambda r: hex64(r.varint()))


def recv_op(r: Reader) -> dict:  # RecvOp
    return {"type": "recv", **op(r, "from"), "hash": r.bool(), "prefix": prefix(r)}


def send_poll(r: Reader) -> dict:
    tag = r.varint()
    if tag == 0:  # Send(SendOp)
        return {"type": "send", **op(r, "to"), "hash": r.bool(), "prefix": prefix(r)}
    return {"type": ["send", "wait_digests", "done"][tag]}


def recv_poll(r: Reader) -> dict:
    tag = r.varint()
    if tag == 0:  # Recv(RecvOp)
        return recv_op(r)
    if tag == 2:  # Forward(ForwardOp)
        return {"type": "forward", **op(r, "to"), "prefix": prefix(r)}
    return {"type": ["recv", "need_bindings", "forward", "wait", "done"][tag]}


def incoming(r: Reader) -> dict:
    return {
        "transfer_id": hex64(r.varint()),
        "step": r.opt(Reader.uint),
        "storages": storages(r),
        "total_bytes": r.uint(),
        "plan": plan(r),
    }


def binding(r: Reader) -> dict:
    read = r.varint
    dest = "fresh" if read() == 0 else {"in_place": r.uint()}
    dtype, nbytes = DTYPES[read()], uint(read())
    return {
        "dest": dest,
        "dtype": dtype,
        "nbytes": nbytes,
        "cast_from": DTYPES[read()] if r.byte() == 1 else None,
    }


def bindings(r: Reader) -> list:
    """``Vec<StorageBinding>`` ending a result: made only of varints and 0/1 bytes, decoded at once
    (``binding``'s fields: the destination, then dtype, nbytes and the optional cast)."""
    n = r.varint()
    v = r.tokens()
    out, k = [], 0
    for _ in range(n):
        if v[k] == 0:
            dest = "fresh"
            k += 1
        else:
            dest = {"in_place": uint(v[k + 1])}
            k += 2
        dtype, nbytes = DTYPES[v[k]], uint(v[k + 1])
        cast_from = DTYPES[v[k + 3]] if v[k + 2] == 1 else None
        k += 4 if cast_from is not None else 3
        out.append({"dest": dest, "dtype": dtype, "nbytes": nbytes, "cast_from": cast_from})
    if k != len(v):
        raise ValueError(f"{len(v) - k} varints left after the bindings in a result")
    return out


def received(r: Reader) -> dict:
    return {
        "step": r.opt(Reader.uint),
        "tree": tree(r),
        "leaves": leaves(r),
        "bindings": bindings(r),
    }


def received_without_bindings(r: Reader) -> dict:
    """``received`` for a host that kept the bindings ``finish_bindings`` gave: the same result, its
    last field (every storage's binding again) left undecoded."""
    out = {"step": r.opt(Reader.uint), "tree": tree(r), "leaves": leaves(r)}
    r.i = len(r.b)
    return out


def unit(r: Reader):
    return None


# ---- the module ----

# Compiled modules by path (Pgt.load).
_COMPILED: dict = {}


def _cache_path(module: bytes) -> Path | None:
    """Where the compiled form of ``module`` is cached: $PGT_CACHE_DIR (default ~/.cache/pgt)/wasm/,
    named by the module's SHA-256 and wasmtime's version (a compiled module is native code: only this
    package's own module is ever cached and loaded back). None when caching is off
    (PGT_CACHE_DIR=off)."""
    root = os.environ.get("PGT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pgt")
    if root == "off":
        return None
    try:
        version = importlib.metadata.version("wasmtime")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    digest = hashlib.sha256(module).hexdigest()[:32]
    return Path(root) / "wasm" / f"pgt-{digest}-wasmtime-{version}.cwasm"


class Pgt:
    """One instance of the module (one Store). Not thread-safe; cheap enough to have one per transfer."""

    def __init__(self, module: wasmtime.Module, engine: wasmtime.Engine):
        self.store = wasmtime.Store(engine)
        self.instance = wasmtime.Instance(self.store, module, [])
        self.exports = self.instance.exports(self.store)
        self.memory = self.exports["memory"]
        # One input buffer in guest memory, reused for every call (the module keeps no pointer to an
        # input); it grows when an input does not fit.
        self.buf, self.buf_len = 0, 0

    @staticmethod
    def compile(path: Path | None = None) -> tuple[wasmtime.Module, wasmtime.Engine]:
        """The module at ``path`` compiled: from the on-disk cache when it has this module (keyed by the
        module's SHA-256 and wasmtime's version), else compiled (half a second) and cached."""
        path = path or module_path()
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run scripts/build-wasm.sh")
        engine = wasmtime.Engine()
        data = path.read_bytes()
        cached = _cache_path(data)
        if cached is not None and cached.is_file():
            try:
                return wasmtime.Module.deserialize_file(engine, str(cached)), engine
            except Exception:  # another wasmtime build, a truncated file: compile again
                pass
        module = wasmtime.Module(engine, data)
        if cached is not None:
            with contextlib.suppress(OSError):
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
                tmp.write_bytes(module.serialize())
                os.replace(tmp, cached)
        return module, engine

    @classmethod
    def load(cls, path: Path | None = None) -> Pgt:
        """A fresh instance of the module at ``path`` (default ``module_path()``). The compiled module
        is cached per path (compiling takes about half a second; an instance a millisecond)."""
        key = str((path or module_path()).resolve())
        compiled = _COMPILED.get(key)
        if compiled is None:
            compiled = _COMPILED[key] = cls.compile(path)
        return cls(*compiled)

    def _put(self, inputs: tuple[bytes, ...]) -> list[int]:
        """Writes ``inputs`` one after the other into the input buffer: their (ptr, len) pairs, flat."""
        total = sum(len(b) for b in inputs)
        if total > self.buf_len:
            if self.buf_len:
                self.exports["pgt_free"](self.store, self.buf, self.buf_len)
                self.buf, self.buf_len = 0, 0
            size = max(total, 2 * self.buf_len, 4096)
            ptr = self.exports["pgt_alloc"](self.store, size) & 0xFFFFFFFF
            if ptr == 0:
                raise MemoryError("pgt_alloc failed")
            self.buf, self.buf_len = ptr, size
        flat, at = [], self.buf
        for b in inputs:
            if b:
                self.memory.write(self.store, b, at)
            flat += [at, len(b)]
            at += len(b)
        return flat

    def call(self, name: str, decode, *args, inputs: tuple[bytes, ...] = ()):
        """Calls export ``name`` with ``args``, then the (ptr, len) of each input; decodes the result
        block with ``decode`` (raises PgtError for status 1 and 2)."""
        block = self.exports[name](self.store, *args, *self._put(inputs)) & 0xFFFFFFFF
        status, length = struct.unpack("<II", self.memory.read(self.store, block, block + 8))
        r = Reader(self.memory.read(self.store, block + 8, block + 8 + length))
        if status != OK:
            raise PgtError(status, r.str(), r.str(), r.rest())
        out = decode(r)
        r.done()
        return out

    # memory and versions
    def abi_version(self) -> int:
        return self.exports["pgt_abi_version"](self.store)

    def protocol_version(self) -> int:
        return self.exports["pgt_protocol_version"](self.store)

    def default_limits(self) -> dict:
        return self.call("pgt_default_limits", limits)

    # stateless
    def decode(self, header: bytes, metadata: bytes, limits: dict | None = None) -> dict:
        return self.call("pgt_decode", summary, inputs=(header, metadata, limits_bytes(limits)))

    def plan(self, header: bytes, metadata: bytes, limits: dict | None = None) -> list:
        return self.call("pgt_plan", plan, inputs=(header, metadata, limits_bytes(limits)))

    def encode(
        self, metadata: bytes, digests: bool, transfer_id: int, limits: dict | None = None
    ) -> tuple:
        """Validates and encodes postcard Metadata (the metadata message's schema) for transfer
        ``transfer_id``: ``Encoded``, as (header, metadata message)."""
        return self._metadata_call(
            "pgt_encode", lambda r: (r.bytes(), r.bytes()), metadata, digests, transfer_id, limits
        )

    def _metadata_call(
        self, name, decode, metadata: bytes, digests: bool, transfer_id: int, limits: dict | None
    ):
        # pgt_encode and pgt_sender_new take the digests flag between their two inputs, and the
        # transfer id last, as two 32-bit halves.
        ptr, n, lptr, ln = self._put((metadata, limits_bytes(limits)))
        lo, hi = transfer_id & 0xFFFFFFFF, transfer_id >> 32
        return self.call(name, decode, ptr, n, int(digests), lptr, ln, lo, hi)

    # state machines
    def sender(
        self, metadata: bytes, digests: bool, transfer_id: int, limits: dict | None = None
    ) -> Sender:
        """A sender for postcard Metadata, of transfer ``transfer_id`` (pick it at random)."""
        handle, messages = self._metadata_call(
            "pgt_sender_new",
            lambda r: (r.varint(), plan(r)),
            metadata,
            digests,
            transfer_id,
            limits,
        )
        return Sender(self, handle, messages)

    def host_limits(self) -> dict:
        """The module's default limits, with ``max_messages`` at most ``HOST_MAX_MESSAGES``: this host
        decodes the plan into Python objects (~0.5 KB per data message), so a plan of the module's
        2^20 messages would cost ~0.5 GB of memory for a few bytes of metadata."""
        out = self.default_limits()
        out["max_messages"] = min(int(out["max_messages"]), HOST_MAX_MESSAGES)
        return out

    def receiver(
        self, rank: int, source: int, expected_step: int | None = None, limits: dict | None = None
    ) -> Receiver:
        """A receiver; ``limits`` default to ``host_limits()``."""
        opts = options_bytes(rank, source, expected_step, limits or self.host_limits())
        return Receiver(self, self.call("pgt_receiver_new", Reader.varint, inputs=(opts,)))


class Sender:
    """A sender (``pgt_sender_*``); ``plan`` is its plan, in index.json's ``messages`` form."""

    def __init__(self, pgt: Pgt, handle: int, plan: list):
        self.pgt, self.handle, self.plan = pgt, handle, plan

    def poll(self) -> dict:
        return self.pgt.call("pgt_sender_poll", send_poll, self.handle)

    def bytes(self, message: int) -> bytes:
        """The bytes of header, metadata or trailer message ``message`` (once polled)."""
        return self.pgt.call("pgt_sender_bytes", Reader.bytes, self.handle, message)

    def handle_digests(self, message: int, digests):
        self.pgt.call(
            "pgt_sender_digests", unit, self.handle, message, inputs=(digests_bytes(digests),)
        )

    def destination_outcome(self, failed) -> dict:
        """Where the send stands once the destinations in ``failed`` failed (pgt-core's policy,
        PROTOCOL.md §3): ``{"live": [rank], "cut_off": [rank]}`` in chain order — those still served
        (the completed ones, at the end) and, in chain fan-out, those whose data would come through a
        failed one."""
        ranks = varint(len(failed)) + b"".join(varint(int(r)) for r in failed)
        return self.pgt.call(
            "pgt_sender_destination_outcome",
            lambda r: {"live": r.seq(Reader.varint), "cut_off": r.seq(Reader.varint)},
            self.handle,
            inputs=(ranks,),
        )

    def drop(self):
        self.pgt.call("pgt_sender_drop", unit, self.handle)


class Receiver:
    """A receiver (``pgt_receiver_*``)."""

    def __init__(self, pgt: Pgt, handle: int):
        self.pgt, self.handle = pgt, handle

    def _call(self, name: str, decode, *args, inputs=()):
        return self.pgt.call(name, decode, self.handle, *args, inputs=inputs)

    def poll(self) -> dict:
        return self._call("pgt_receiver_poll", recv_poll)

    def handle_header(self, data: bytes):
        self._call("pgt_receiver_header", unit, inputs=(data,))

    def handle_metadata(self, data: bytes) -> dict:
        """``Incoming``: {step, storages, total_bytes, plan}."""
        return self._call("pgt_receiver_metadata", incoming, inputs=(data,))

    def paths(self, canonical: bool = False) -> list:
        """Every leaf's key path (after the metadata); ``canonical``: as ``canonical_key_paths``."""
        if canonical:
            return self._call("pgt_receiver_paths", canonical_key_paths)
        return self._call("pgt_receiver_paths", lambda r: r.seq(key_path))

    def finish_bindings(self, targets=()) -> list:
        """Binds each target ({storage, id, dtype, nbytes}) in place, every other storage fresh;
        returns every storage's binding."""
        return self._call("pgt_receiver_bind", bindings, inputs=(in_place_bytes(targets),))

    def handle_data(self, message: int):
        self._call("pgt_receiver_data", unit, message)

    def handle_digests(self, message: int, digests):
        self._call("pgt_receiver_digests", unit, message, inputs=(digests_bytes(digests),))

    def handle_trailer(self, data: bytes):
        self._call("pgt_receiver_trailer", unit, inputs=(data,))

    def handle_forwarded(self, message: int):
        self._call("pgt_receiver_forwarded", unit, message)

    def in_place_written(self, not_in_target=()) -> dict:
        """What the transfer has written in place so far: ``{"written": [path], "partly": [path]}``,
        the in-place leaves (key paths, display form) whose bytes all landed in their targets (landed,
        not verified: digests are checked at the trailer) and those that may hold some. Storages in
        ``not_in_target`` (landed in staging, cast later) count as untouched. Ask before
        ``leftover``, and before ``finish`` when it will fail (``has_digest_mismatch``)."""
        storages = varint(len(not_in_target)) + b"".join(varint(int(s)) for s in not_in_target)
        return self._call(
            "pgt_receiver_in_place_written",
            lambda r: {"written": r.seq(Reader.str), "partly": r.seq(Reader.str)},
            inputs=(storages,),
        )

    def has_digest_mismatch(self) -> bool:
        """Whether a storage's digest mismatched so far: once done, the one thing ``finish``
        refuses."""
        return self._call("pgt_receiver_digest_mismatch", lambda r: r.bool())

    def leftover(self):
        """After an error: the next message the failed transfer's plan says is still coming (a "recv"
        op) to receive and discard, or None. The first call ends the transfer."""
        return self._call("pgt_receiver_leftover", lambda r: r.opt(recv_op))

    def finish(self, bindings: bool = True) -> dict:
        """The verified result; frees the receiver whatever the outcome. ``bindings=False``: without
        its ``bindings`` (the host has them from ``finish_bindings``)."""
        return self._call(
            "pgt_receiver_finish", received if bindings else received_without_bindings
        )

    def drop(self):
        self._call("pgt_receiver_drop", unit)
