"""pgt's raw-ABI wasm module (wasm/ABI.md) from Python, with wasmtime-py.

A small host: loads ``pgt_wasm.wasm`` (built by ``scripts/build-wasm.sh``), copies inputs into guest
memory, calls the exports and decodes their result blocks (postcard) into plain Python values in the
JSON forms of ``tests/vectors/index.json`` (integers above 2**53 - 1 as decimal strings, digests as
``0x…`` hex, dtypes as torch names). Tensor bytes never enter the guest: it sees metadata, plans,
completions and the digests the host computes.

    pgt = Pgt.load()
    summary = pgt.decode(header, metadata)          # or raises PgtError(name, message, debug)
    r = pgt.receiver(rank=1, source=0)
    op = r.poll()                                   # {"type": "recv", "kind": "header", …}
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import wasmtime

ROOT = Path(__file__).resolve().parents[2]

DTYPES = [
    "float64",
    "float32",
    "float16",
    "bfloat16",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "complex128",
    "complex64",
    "complex32",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint64",
    "uint32",
    "uint16",
    "uint8",
    "bool",
]
KINDS = ["header", "metadata", "data", "trailer"]
REDUCE_OPS = ["Sum", "Avg", "Product", "Min", "Max"]
MAX_SAFE = 2**53 - 1

# Result block status words.
OK, ERROR, ABI_ERROR = 0, 1, 2


def module_path() -> Path:
    """$PGT_WASM_MODULE, else $CARGO_TARGET_DIR/pgt-wasm/pgt_wasm.wasm, else target/pgt-wasm/…"""
    if os.environ.get("PGT_WASM_MODULE"):
        return Path(os.environ["PGT_WASM_MODULE"])
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    if not target.is_absolute():
        target = ROOT / target
    return target / "pgt-wasm" / "pgt_wasm.wasm"


class PgtError(Exception):
    """A pgt error: ``name`` is the pgt_core::Error variant (or BadHandle / BadArgument)."""

    def __init__(self, status: int, name: str, message: str, debug: str):
        super().__init__(f"{name}: {message}")
        self.status, self.name, self.message, self.debug = status, name, message, debug


def uint(v: int):
    return v if v <= MAX_SAFE else str(v)


def sint(v: int):
    return v if abs(v) <= MAX_SAFE else str(v)


# ---- postcard ----


class Reader:
    """Reads postcard: varints, zigzag, length-prefixed sequences, enum tags, struct fields in order."""

    def __init__(self, data: bytes):
        self.b, self.i = data, 0

    def varint(self) -> int:
        out = shift = 0
        while True:
            byte = self.b[self.i]
            self.i += 1
            out |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return out

    def zigzag(self) -> int:
        v = self.varint()
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

    def seq(self, item):
        return [item() for _ in range(self.varint())]

    def opt(self, item):
        return item() if self.byte() == 1 else None

    def u64s(self):
        return self.seq(lambda: uint(self.varint()))

    def dtype(self) -> str:
        return DTYPES[self.varint()]

    def done(self):
        assert self.i == len(self.b), f"{len(self.b) - self.i} bytes left in a result"


def varint(v: int) -> bytes:
    out = bytearray()
    while True:
        byte = v & 0x7F
        v >>= 7
        if v:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def limits_bytes(limits: dict | None) -> bytes:
    """postcard LimitsW; b"" (the defaults) for None."""
    if not limits:
        return b""
    fields = [
        "max_metadata_bytes",
        "max_leaves",
        "max_depth",
        "max_ndim",
        "max_total_bytes",
        "max_messages",
    ]
    return b"".join(varint(int(limits[f])) for f in fields)


# ---- the result types, in index.json's JSON forms ----


def layout(r: Reader) -> dict:
    return {
        "dtype": r.dtype(),
        "shape": r.u64s(),
        "stride": r.u64s(),
        "storage_offset": uint(r.varint()),
        "nbytes": uint(r.varint()),
    }


def value(r: Reader) -> dict:
    tag = r.varint()
    if tag == 0:
        return {"type": "none"}
    if tag == 1:
        return {"type": "bool", "value": r.bool()}
    if tag == 2:
        return {"type": "int", "value": sint(r.zigzag())}
    if tag == 3:
        raw = r.raw(8)
        f = struct.unpack("<d", raw)[0]
        out = {"type": "float", "bits": f"0x{struct.unpack('<Q', raw)[0]:016x}"}
        if f == f and f not in (float("inf"), float("-inf")):
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
    return {"offsets": r.u64s(), "sizes": r.u64s(), "placement": r.str()}


def leaf(r: Reader) -> dict:
    tag = r.varint()
    if tag == 0:
        return {"kind": "value", "value": value(r)}
    if tag == 1:
        return {"kind": "tensor", "layout": layout(r)}
    if tag == 2:
        local = layout(r)
        mesh = {
            "shape": r.u64s(),
            "ranks": r.u64s(),
            "dim_names": r.opt(lambda: r.seq(r.str)),
            "device_type": r.str(),
        }
        spec = {
            "mesh": mesh,
            "placements": r.seq(lambda: placement(r)),
            "global_shape": r.u64s(),
            "global_stride": r.u64s(),
            "dtype": r.dtype(),
        }
        return {"kind": "dtensor", "local": local, "spec": spec}
    if tag == 3:
        local_shards = r.seq(lambda: {"layout": layout(r), "meta": shard_meta(r)})
        glob = {"shards": r.seq(lambda: shard_meta(r)), "global_size": r.u64s(), "dtype": r.dtype()}
        return {"kind": "sharded_tensor", "local_shards": local_shards, "global": glob}
    raise ValueError(f"leaf tag {tag}")


def key(r: Reader):
    return r.str() if r.varint() == 0 else {"int": sint(r.zigzag())}


def node(r: Reader):
    tag = r.varint()
    if tag == 0:
        return {"dict": r.seq(lambda: key(r))}
    if tag == 1:
        return {"list": uint(r.varint())}
    if tag == 2:
        return {"tuple": uint(r.varint())}
    return "leaf"


def path_elem(r: Reader) -> dict:
    if r.varint() == 0:
        if r.varint() == 0:
            return {"key": r.str()}
        return {"int_key": sint(r.zigzag())}
    return {"index": uint(r.varint())}


def storage(r: Reader) -> dict:
    return {"leaf": r.varint(), "shard": r.varint(), "nbytes": uint(r.varint()), "dtype": r.dtype()}


def segment(r: Reader) -> dict:
    return {"storage": r.varint(), "offset": uint(r.varint()), "len": uint(r.varint())}


def plan_params(r: Reader) -> dict:
    return {
        "fanout": ["Direct", "Chain"][r.varint()],
        "bucket_size": uint(r.varint()),
        "chunk_size": uint(r.varint()),
    }


def summary(r: Reader) -> dict:
    header = {
        "version": r.varint(),
        "flags": r.varint(),
        "metadata_len": uint(r.varint()),
        "metadata_digest": f"0x{r.varint():016x}",
    }
    out = {
        "header": header,
        "step": r.opt(lambda: uint(r.varint())),
        "source": r.varint(),
        "destinations": r.seq(r.varint),
        "plan": plan_params(r),
        "digests": r.bool(),
        "total_bytes": uint(r.varint()),
        "tree": r.seq(lambda: node(r)),
        "leaves": r.seq(lambda: leaf(r)),
        "paths": r.seq(r.str),
        "path_elems": r.seq(lambda: r.seq(lambda: path_elem(r))),
        "storages": r.seq(lambda: storage(r)),
    }
    out["leaf_count"] = len(out["leaves"])
    out["storage_count"] = len(out["storages"])
    return out


def message(r: Reader) -> dict:
    return {
        "kind": KINDS[r.varint()],
        "tag": uint(r.varint()),
        "len": uint(r.varint()),
        "segments": r.seq(lambda: segment(r)),
    }


def payload(r: Reader, out: dict) -> dict:
    if r.varint() == 0:
        out["bytes"] = r.bytes()
    else:
        out["segments"] = r.seq(lambda: segment(r))
    return out


def send_next(r: Reader) -> dict:
    tag = r.varint()
    if tag == 1:
        return {"type": "wait_digests"}
    if tag == 2:
        return {"type": "done"}
    op = {
        "type": "send",
        "to": r.varint(),
        "message": r.varint(),
        "tag": r.varint(),
        "len": r.varint(),
    }
    payload(r, op)
    op["hash"] = r.bool()
    return op


def recv_next(r: Reader) -> dict:
    tag = r.varint()
    if tag == 0:
        return {
            "type": "recv",
            "from": r.varint(),
            "message": r.varint(),
            "kind": KINDS[r.varint()],
            "tag": r.varint(),
            "len": r.varint(),
            "segments": r.seq(lambda: segment(r)),
            "hash": r.bool(),
        }
    if tag == 2:
        op = {
            "type": "forward",
            "to": r.varint(),
            "message": r.varint(),
            "tag": r.varint(),
            "len": r.varint(),
        }
        return payload(r, op)
    return {"type": {1: "need_bindings", 3: "wait", 4: "done"}[tag]}


def binding(r: Reader) -> dict:
    dest = "fresh" if r.varint() == 0 else {"in_place": uint(r.varint())}
    return {
        "dest": dest,
        "dtype": r.dtype(),
        "nbytes": uint(r.varint()),
        "cast_from": r.opt(r.dtype),
    }


def incoming(r: Reader) -> dict:
    return {
        "step": r.opt(lambda: uint(r.varint())),
        "paths": r.seq(lambda: r.seq(lambda: path_elem(r))),
        "storages": r.seq(lambda: storage(r)),
        "total_bytes": uint(r.varint()),
    }


def received(r: Reader) -> dict:
    return {
        "step": r.opt(lambda: uint(r.varint())),
        "tree": r.seq(lambda: node(r)),
        "leaves": r.seq(lambda: leaf(r)),
        "bindings": r.seq(lambda: binding(r)),
    }


def unit(r: Reader):
    return None


def i64(v: int) -> int:
    """A u64 argument as the signed i64 wasm passes."""
    return v - (1 << 64) if v >= 1 << 63 else v


# ---- the module ----


class Pgt:
    """One instance of the module (one Store). Not thread-safe; cheap enough to have one per transfer."""

    def __init__(self, module: wasmtime.Module, engine: wasmtime.Engine):
        self.store = wasmtime.Store(engine)
        self.instance = wasmtime.Instance(self.store, module, [])
        self.exports = self.instance.exports(self.store)
        self.memory = self.exports["memory"]

    @staticmethod
    def compile(path: Path | None = None) -> tuple[wasmtime.Module, wasmtime.Engine]:
        path = path or module_path()
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run scripts/build-wasm.sh")
        engine = wasmtime.Engine()
        return wasmtime.Module.from_file(engine, str(path)), engine

    @classmethod
    def load(cls, path: Path | None = None) -> Pgt:
        return cls(*cls.compile(path))

    def _put(self, data: bytes) -> tuple[int, int]:
        n = len(data)
        ptr = self.exports["pgt_alloc"](self.store, n) & 0xFFFFFFFF
        if n:
            if ptr == 0:
                raise MemoryError("pgt_alloc failed")
            self.memory.write(self.store, data, ptr)
        return ptr, n

    def _free(self, placed):
        for ptr, n in placed:
            if n:
                self.exports["pgt_free"](self.store, ptr, n)

    def call(self, name: str, decode, *args, inputs: tuple[bytes, ...] = ()):
        """Calls export ``name`` with ``args`` after the (ptr, len) of each input; decodes the result."""
        placed = [self._put(b) for b in inputs]
        try:
            flat = [x for p in placed for x in p]
            block = self.exports[name](self.store, *args, *flat)
        finally:
            self._free(placed)
        return self._result(block, decode)

    # stateless
    def abi_version(self) -> int:
        return self.exports["pgt_abi_version"](self.store)

    def protocol_version(self) -> int:
        return self.exports["pgt_protocol_version"](self.store)

    def default_limits(self) -> dict:
        def limits(r):
            keys = [
                "max_metadata_bytes",
                "max_leaves",
                "max_depth",
                "max_ndim",
                "max_total_bytes",
                "max_messages",
            ]
            return {k: uint(r.varint()) for k in keys}

        return self.call("pgt_default_limits", limits)

    def decode(self, header: bytes, metadata: bytes, limits: dict | None = None) -> dict:
        return self.call("pgt_decode", summary, inputs=(header, metadata, limits_bytes(limits)))

    def plan(self, header: bytes, metadata: bytes, limits: dict | None = None) -> list:
        return self.call(
            "pgt_plan",
            lambda r: r.seq(lambda: message(r)),
            inputs=(header, metadata, limits_bytes(limits)),
        )

    def encode(
        self, metadata_postcard: bytes, digests: bool, limits: dict | None = None
    ) -> tuple[bytes, bytes]:
        """Validates and encodes postcard Metadata (the metadata message's schema): (header, metadata)."""

        def encoded(r):
            return r.bytes(), r.bytes()

        # pgt_encode(metadata ptr, len, digests, limits ptr, len): the flag sits between the inputs.
        placed = [self._put(metadata_postcard), self._put(limits_bytes(limits))]
        try:
            block = self.exports["pgt_encode"](self.store, *placed[0], int(digests), *placed[1])
        finally:
            self._free(placed)
        return self._result(block, encoded)

    def _result(self, block: int, decode):
        """Decodes the result block at ``block`` (valid until the next call)."""
        block &= 0xFFFFFFFF
        status, length = struct.unpack("<II", self.memory.read(self.store, block, block + 8))
        r = Reader(self.memory.read(self.store, block + 8, block + 8 + length))
        if status != OK:
            raise PgtError(status, r.str(), r.str(), r.str())
        out = decode(r)
        r.done()
        return out

    # state machines
    def sender(self, metadata_postcard: bytes, digests: bool, limits: dict | None = None) -> Sender:
        placed = [self._put(metadata_postcard), self._put(limits_bytes(limits))]
        try:
            block = self.exports["pgt_sender_new"](self.store, *placed[0], int(digests), *placed[1])
        finally:
            self._free(placed)
        handle, storages = self._result(block, lambda r: (r.varint(), r.seq(lambda: storage(r))))
        return Sender(self, handle, storages)

    def receiver(
        self, rank: int, source: int, expected_step: int | None = None, limits: dict | None = None
    ) -> Receiver:
        opts = varint(rank) + varint(source)
        opts += b"\x00" if expected_step is None else b"\x01" + varint(expected_step)
        lim = limits or self.default_limits()
        opts += limits_bytes(lim)
        handle = self.call("pgt_receiver_new", lambda r: r.varint(), inputs=(opts,))
        return Receiver(self, handle)


class Sender:
    def __init__(self, pgt: Pgt, handle: int, storages: list):
        self.pgt, self.handle, self.storages = pgt, handle, storages

    def poll(self) -> dict:
        return self.pgt.call("pgt_sender_poll", send_next, self.handle)

    def handle_storage_digest(self, storage: int, digest: int):
        self.pgt.call("pgt_sender_digest", unit, self.handle, storage, i64(digest))

    def drop(self):
        self.pgt.call("pgt_sender_drop", unit, self.handle)


class Receiver:
    def __init__(self, pgt: Pgt, handle: int):
        self.pgt, self.handle = pgt, handle

    def poll(self) -> dict:
        return self.pgt.call("pgt_receiver_poll", recv_next, self.handle)

    def handle_header(self, data: bytes):
        self.pgt.call("pgt_receiver_header", unit, self.handle, inputs=(data,))

    def handle_metadata(self, data: bytes) -> dict:
        return self.pgt.call("pgt_receiver_metadata", incoming, self.handle, inputs=(data,))

    def bind_in_place(self, storage: int, buffer_id: int, dtype: str, nbytes: int):
        self.pgt.call(
            "pgt_receiver_bind",
            unit,
            self.handle,
            storage,
            i64(buffer_id),
            DTYPES.index(dtype),
            i64(nbytes),
        )

    def finish_bindings(self) -> list:
        return self.pgt.call(
            "pgt_receiver_finish_bindings", lambda r: r.seq(lambda: binding(r)), self.handle
        )

    def handle_data(self, message: int):
        self.pgt.call("pgt_receiver_data", unit, self.handle, message)

    def handle_trailer(self, data: bytes):
        self.pgt.call("pgt_receiver_trailer", unit, self.handle, inputs=(data,))

    def handle_storage_digest(self, storage: int, digest: int):
        self.pgt.call("pgt_receiver_digest", unit, self.handle, storage, i64(digest))

    def handle_forwarded(self, message: int):
        self.pgt.call("pgt_receiver_forwarded", unit, self.handle, message)

    def finish(self) -> dict:
        return self.pgt.call("pgt_receiver_finish", received, self.handle)

    def drop(self):
        self.pgt.call("pgt_receiver_drop", unit, self.handle)
