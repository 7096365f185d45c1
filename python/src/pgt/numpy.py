"""Checkpoints of numpy arrays over pgt's TCP process group, without torch.

    from pgt.tcp import TcpGroup, TcpOptions
    from pgt.numpy import send_checkpoint, recv_checkpoint

    pg = TcpGroup.join(TcpOptions.from_env())
    send_checkpoint(pg, [1, 2], {"model": {"w": w, "b": b}, "step": 7}, step=7)   # on rank 0
    state = recv_checkpoint(pg, 0)                                                # on ranks 1, 2
    state = recv_checkpoint(pg, 0, state_dict=state)        # the next one, into the same arrays

The peers may be Rust ranks (``pgt send``/``pgt recv``, ``pgt_host::transport::Transport``), other
Python ranks or torch ranks: it is one protocol (PROTOCOL.md), run by pgt's wasm module.

**What travels.** A state dict is nested dicts (``str`` or ``int`` keys, in order), lists and tuples;
its leaves are numpy arrays (any shape, 0-dim included; numpy scalars travel as 0-dim arrays and come
back as such), :class:`RawBits`, :class:`DTensor`/:class:`ShardedTensor` (the decoded forms of
torch's, as Rust or torch ranks send them) and plain values (``None``, ``bool``, ``int`` in i64,
``float``, ``str``, ``bytes``). Anything else — object or string arrays, ``float128``, datetimes,
namedtuples, sets, arbitrary objects — is :class:`pgt.metadata.UnsupportedLeaf` (a ``TypeError``
naming the key path and the type) before anything is sent: pgt never pickles.

**dtypes.** Every pgt dtype (PROTOCOL.md §6). numpy's own types as they are; bfloat16 and the four
float8 types as ``ml_dtypes``' (an optional dependency) when it is installed, on both sides; without
it, and always for complex32 (which no numpy package has), as :class:`RawBits` — the elements' bits
as unsigned integers of the same size, with the pgt dtype beside them. A received array has the dtype
it was sent as: ``ml_dtypes.bfloat16`` when ml_dtypes is installed, else ``RawBits(uint16 bits,
"bfloat16")``. Big-endian arrays are sent as little-endian copies (the wire's byte order).

**Views.** pgt sends a tensor's storage and its layout (shape, strides and offset in elements), the
way torch does. Here an array's storage is its *extent*: the bytes from its first element to its last
in the buffer it views — no copy, and never more of a large base array than the view reaches. A
transposed, sliced, stepped (``a[::2]``) or broadcast view keeps its strides: the receiver gets a view
of the same layout over the received bytes (a stepped view's gaps travel with it, as with torch). A
view numpy lays out in ways the protocol cannot say — negative strides, strides that are not a
multiple of the element size — is sent as a contiguous copy (the same values, C order).

**Receive.** Every storage lands straight in its own buffer (``np.empty``) and each array is built
over it (``np.ndarray(buffer=…)``, no copy), writable. With ``state_dict``, arrays whose key paths
match the incoming tensors are reused in place (PROTOCOL.md §12): the storage's bytes land in the
array's memory, and where the dtypes differ between float64, float32, float16 and bfloat16 the module
orders a cast (round to nearest even), made once the transfer is verified. An in-place target's
storage is its extent, of the dtype of the array (of its ``RawBits``); its size must equal the
incoming storage's (``InPlaceSizeMismatch`` otherwise, the module's error); it must be writable. The
returned state dict is the received one: an in-place target comes back as the same object when the
sender's layout equals its own (the usual case), else as a view of the incoming layout over its
memory. Entries of ``state_dict`` that the sender did not send are not in the result. After a failure
(``DigestMismatch``, a timeout) nothing is returned, but in-place targets may hold some of the
failed transfer's bytes.

**Errors.** ``pgt.abi.PgtError`` (the module's named error: ``DigestMismatch``, ``StepMismatch``,
``InPlaceSizeMismatch``, …), ``pgt.tcp.PgError`` (``PgTimeout`` within ``timeout`` of a stall,
``PeerClosed``, ``AuthFailed``), ``UnsupportedLeaf``, ``ValueError`` for bad arguments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .abi import Pgt, PgtError
from .dtypes import (
    BITS,
    ELEMENT_SIZE,
    RawBits,
    little_endian,
    numpy_dtype,
    pgt_dtype,
)
from .metadata import (
    UnsupportedLeaf,
    display,
    encode,
    flatten,
    unflatten,
    value_leaf,
    value_of,
)
from .recv import InPlaceWritten, ReceiveHost
from .send import TcpSendHost, send
from .tcp import PgError, PgTimeout, TcpGroup

__all__ = [
    "DEFAULT_TIMEOUT",
    "DTensor",
    "InPlaceWritten",
    "PgError",
    "PgTimeout",
    "PgtError",
    "RawBits",
    "ShardedTensor",
    "UnsupportedLeaf",
    "recv_checkpoint",
    "send_checkpoint",
]

DEFAULT_TIMEOUT = 120.0  # seconds, per operation (as pgt's TransportOptions)
# The module's memory cap, as WasmEngine's default: a runaway guest traps.
WASM_MEMORY = 2 << 30


@dataclass(frozen=True, eq=False)
class DTensor:
    """A DTensor's local tensor and its ``spec`` (pgt.abi's decoded form: ``mesh``, ``placements``,
    ``global_shape``, ``global_stride``, ``dtype``), as a torch or Rust rank sends one."""

    local: np.ndarray | RawBits
    spec: dict


@dataclass(frozen=True, eq=False)
class ShardedTensor:
    """A ShardedTensor's local shards — ``(array, meta)`` pairs, ``meta`` = ``{offsets, sizes,
    placement}`` — and its ``global`` metadata (``{shards, global_size, dtype}``)."""

    local_shards: list
    global_: dict


def _load(pgt: Pgt | None) -> Pgt:
    if pgt is not None:
        return pgt
    p = Pgt.load()
    p.store.set_limits(memory_size=WASM_MEMORY)
    return p


# ---- arrays as storages ----


class _Extent:
    """``n`` bytes at address ``ptr`` as a flat uint8 array (through the array interface), keeping
    ``owner`` (the array whose memory it is) alive."""

    def __init__(self, ptr: int, n: int, readonly: bool, owner):
        self.owner = owner
        self.__array_interface__ = {
            "data": (ptr, readonly),
            "shape": (n,),
            "typestr": "|u1",
            "version": 3,
        }


def _contiguous_strides(shape) -> list[int]:
    out, n = [], 1
    for d in reversed(shape):
        out.append(n)
        n *= d
    return out[::-1]


def _extent(a: np.ndarray) -> tuple[np.ndarray, list[int]] | None:
    """The bytes ``a`` spans (its first element to its last) as a flat uint8 array over its memory,
    and its strides in elements; None when its strides cannot be said in elements (negative, or not
    a multiple of the element size)."""
    es = a.dtype.itemsize
    if a.size == 0:
        return np.empty(0, np.uint8), _contiguous_strides(a.shape)
    if any(s < 0 or s % es for s in a.strides):
        return None
    n = sum((d - 1) * s for d, s in zip(a.shape, a.strides, strict=True)) + es
    ptr = a.__array_interface__["data"][0]
    ext = np.asarray(_Extent(ptr, n, not a.flags.writeable, a))
    return ext, [s // es for s in a.strides]


def _array_and_dtype(path: tuple, x) -> tuple[np.ndarray, str]:
    """The array to send for leaf ``x`` (an ndarray, numpy scalar or RawBits) and its pgt dtype."""
    if isinstance(x, RawBits):
        return x.bits, x.dtype
    a = np.asarray(x)
    name = pgt_dtype(a.dtype)
    if name is None:
        raise UnsupportedLeaf(path, f"a numpy array of dtype {a.dtype}")
    return a, name


def _tensor(path: tuple, x, storages: list) -> dict:
    """The layout of array leaf ``x``; its storage (extent, no copy) appended to ``storages``."""
    a, dtype = _array_and_dtype(path, x)
    if not little_endian(a.dtype):
        a = a.astype(a.dtype.newbyteorder("<"))
    ext = _extent(a)
    if ext is None:
        a = np.ascontiguousarray(a)
        ext = _extent(a)
    buf, strides = ext
    storages.append(buf)
    return {
        "dtype": dtype,
        "shape": list(a.shape),
        "stride": strides,
        "storage_offset": 0,
        "nbytes": len(buf),
    }


def _leaves_of(state_dict) -> tuple[list, list, list]:
    """(tree, leaves, storages) of a state dict, refusing what pgt does not carry."""
    storages: list = []

    def leaf(path: tuple, x) -> dict:
        if isinstance(x, np.ndarray | np.generic | RawBits):
            return {"kind": "tensor", "layout": _tensor(path, x, storages)}
        if isinstance(x, DTensor):
            return {"kind": "dtensor", "local": _tensor(path, x.local, storages), "spec": x.spec}
        if isinstance(x, ShardedTensor):
            shards = [
                {"layout": _tensor((*path, i), a, storages), "meta": meta}
                for i, (a, meta) in enumerate(x.local_shards)
            ]
            return {"kind": "sharded_tensor", "local_shards": shards, "global": x.global_}
        v = value_leaf(x)
        if v is None:
            if isinstance(x, int):
                raise UnsupportedLeaf(path, f"the int {x} (outside i128, -2**127 to 2**127 - 1)")
            raise UnsupportedLeaf(
                path, f"a value of type {type(x).__module__}.{type(x).__qualname__}"
            )
        return v

    tree, leaves = flatten(state_dict, leaf)
    return tree, leaves, storages


# ---- send ----


def _ranks(pg: TcpGroup, dst_ranks) -> list[int]:
    dst = [dst_ranks] if isinstance(dst_ranks, int) else list(dst_ranks)
    if not dst:
        raise ValueError("send_checkpoint: no destination ranks")
    for r in dst:
        if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < pg.size:
            raise ValueError(f"send_checkpoint: {r!r} is not a rank of this group of {pg.size}")
        if r == pg.rank:
            raise ValueError(f"send_checkpoint: rank {r} is this rank (the sender)")
    if len(set(dst)) != len(dst):
        raise ValueError(f"send_checkpoint: destination ranks repeat: {dst}")
    return dst


def send_checkpoint(
    pg: TcpGroup,
    dst_ranks: int | Sequence[int],
    state_dict,
    *,
    step: int | None = None,
    fanout: str = "chain",
    digests: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    bucket_size: int = 1 << 20,
    chunk_size: int = 4 << 20,
    transfer_id: int | None = None,
    pgt: Pgt | None = None,
) -> int:
    """Sends ``state_dict`` to ``dst_ranks`` (in Chain fan-out, also the relay order) over ``pg``.
    Returns when every byte has been handed to the network (the transfer id). ``timeout`` bounds each
    operation. Raises UnsupportedLeaf / ValueError before anything is sent; PgtError (the module's
    named error: bad metadata, limits) also before; PgError if the link fails; ``DestinationsFailed``
    (pgt.send) when some destinations failed and the others got everything (Direct: only the failed
    ones miss it; Chain: those after a failed one are cut off too)."""
    fan = {"chain": "Chain", "direct": "Direct"}.get(str(fanout).lower())
    if fan is None:
        raise ValueError(f"send_checkpoint: fanout is 'chain' or 'direct', not {fanout!r}")
    if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
        raise ValueError(f"send_checkpoint: step is a non-negative int, not {step!r}")
    dst = _ranks(pg, dst_ranks)
    tree, leaves, storages = _leaves_of(state_dict)
    plan = {"fanout": fan, "bucket_size": bucket_size, "chunk_size": chunk_size}
    metadata = encode(step, pg.rank, dst, plan, tree, leaves)
    return send(
        _load(pgt),
        TcpSendHost(pg, timeout),
        metadata,
        storages,
        digests=digests,
        transfer_id=transfer_id,
    )


# ---- receive ----


def _path_key(path) -> tuple:
    """A module key path (pgt.abi's ``[{"key"|"int_key"|"index": …}]``) as a hashable tuple."""
    out = []
    for e in path:
        if "key" in e:
            out.append(("s", e["key"]))
        elif "int_key" in e:
            out.append(("k", int(e["int_key"])))
        else:
            out.append(("i", int(e["index"])))
    return tuple(out)


def _targets_of(state_dict) -> dict:
    """Every array (or RawBits) leaf of ``state_dict`` by its key path (as ``_path_key``)."""
    out: dict = {}
    stack = [((), state_dict)]
    while stack:
        path, x = stack.pop()
        if isinstance(x, Mapping):
            for k, v in x.items():
                if isinstance(k, str):
                    stack.append(((*path, ("s", k)), v))
                elif isinstance(k, int) and not isinstance(k, bool):
                    stack.append(((*path, ("k", k)), v))
        elif isinstance(x, list | tuple):
            stack.extend(((*path, ("i", i)), v) for i, v in enumerate(x))
        elif isinstance(x, np.ndarray | RawBits):
            out[path] = x
    return out


def _display(key: tuple) -> str:
    return display(tuple(v for _, v in key))


class NumpyHost(ReceiveHost):
    """The receive host of ``recv_checkpoint``: fresh storages are ``np.empty`` buffers; in-place
    targets are the extents of the given arrays."""

    def __init__(self, pg: TcpGroup, timeout: float, targets: dict | None, *, staged: bool = False):
        super().__init__(pg, timeout, staged=staged)
        self.by_path = targets or {}
        self.target_of: dict[int, tuple] = {}  # target id (= storage) -> (target leaf, its extent)

    def targets(self, incoming: dict, paths) -> list:
        if not self.by_path:
            return []
        ps = paths()
        out = []
        for s, ref in enumerate(incoming["storages"]):
            if int(ref["shard"]) != 0:
                continue
            key = _path_key(ps[ref["leaf"]])
            t = self.by_path.get(key)
            if t is None:
                continue
            a, dtype = (t.bits, t.dtype) if isinstance(t, RawBits) else (t, pgt_dtype(t.dtype))
            where = f"state_dict{_display(key)}" if key else "state_dict"
            if dtype is None:
                raise ValueError(f"{where}: pgt has no dtype for {a.dtype}")
            if not little_endian(a.dtype):
                raise ValueError(f"{where}: a big-endian array cannot take the wire's bytes")
            if not a.flags.writeable:
                raise ValueError(f"{where}: the array is read-only")
            ext = _extent(a)
            if ext is None:
                raise ValueError(f"{where}: its strides {a.strides} cannot be said in elements")
            self.target_of[s] = (t, a, ext)
            out.append({"storage": s, "id": s, "dtype": dtype, "nbytes": len(ext[0])})
        return out

    def fresh(self, s: int, nbytes: int):
        return np.empty(nbytes, np.uint8)

    def in_place(self, s: int, binding: dict):
        return self.target_of[int(binding["dest"]["in_place"])][2][0]


def _array(buf: np.ndarray, layout: dict, raw: bool = False):
    """The view ``layout`` over storage bytes ``buf`` (no copy): an ndarray, or RawBits when numpy has
    no type for the dtype."""
    dtype = layout["dtype"]
    es = ELEMENT_SIZE[dtype]
    dt = numpy_dtype(dtype, raw)
    shape = tuple(int(d) for d in layout["shape"])
    strides = tuple(int(s) * es for s in layout["stride"])
    offset = int(layout["storage_offset"]) * es
    if 0 in shape:  # numpy wants no bytes of an empty view, whatever its offset
        offset = 0
    a = np.ndarray(shape, dt or BITS[es], buffer=buf, offset=offset, strides=strides)
    return a if dt is not None else RawBits(a, dtype)


def _same_layout(target, a: np.ndarray, strides: list, layout: dict) -> bool:
    dtype = target.dtype if isinstance(target, RawBits) else pgt_dtype(a.dtype)
    return (
        dtype == layout["dtype"]
        and list(a.shape) == [int(d) for d in layout["shape"]]
        and (a.size == 0 or list(strides) == [int(s) for s in layout["stride"]])
        and int(layout["storage_offset"]) == 0
    )


def _result(host: NumpyHost, result: dict):
    """The received tree: arrays over the storages (the in-place targets themselves where the layouts
    agree), values as Python values, DTensors and ShardedTensors as this module's classes."""
    storage = iter(range(len(host.dest)))

    def tensor(layout: dict):
        s = next(storage)
        hit = host.target_of.get(s) if host.bindings[s]["dest"] != "fresh" else None
        if hit is not None:
            target, a, (_, strides) = hit
            if _same_layout(target, a, strides, layout):
                return target
        return _array(host.dest[s], layout)

    values = []
    for leaf in result["leaves"]:
        k = leaf["kind"]
        if k == "value":
            values.append(value_of(leaf["value"]))
        elif k == "tensor":
            values.append(tensor(leaf["layout"]))
        elif k == "dtensor":
            values.append(DTensor(tensor(leaf["local"]), leaf["spec"]))
        else:
            shards = [(tensor(s["layout"]), s["meta"]) for s in leaf["local_shards"]]
            values.append(ShardedTensor(shards, leaf["global"]))
    return unflatten(result["tree"], values)


def recv_checkpoint(
    pg: TcpGroup,
    src_rank: int,
    *,
    state_dict=None,
    expected_step: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    limits: dict | None = None,
    return_step: bool = False,
    pgt: Pgt | None = None,
    staged: bool = False,
):
    """Receives one checkpoint from ``src_rank`` over ``pg`` and returns it (verified: every digest
    checked); with ``return_step``, ``(state_dict, step)``. ``state_dict``: arrays to receive into
    in place, by key path. ``expected_step``: refuse another step (StepMismatch). ``timeout`` bounds
    each operation. Raises PgtError (the module's named error), PgError or ValueError (an in-place
    target that cannot take bytes); a failed transfer returns nothing. In place, a failure after
    bytes were written into the arrays raises ``pgt.recv.InPlaceWritten`` (naming the leaves fully
    written; its ``cause`` is the error) — unless ``staged``: then every in-place array lands in
    staging first (memory: their total size) and is written only once the transfer verified, so a
    failure leaves them untouched and raises the cause itself."""
    if not isinstance(src_rank, int) or not 0 <= src_rank < pg.size or src_rank == pg.rank:
        raise ValueError(
            f"recv_checkpoint: {src_rank!r} is not another rank of this group of {pg.size}"
        )
    targets = _targets_of(state_dict) if state_dict is not None else None
    p = _load(pgt)
    engine = p.receiver(rank=pg.rank, source=src_rank, expected_step=expected_step, limits=limits)
    host = NumpyHost(pg, timeout, targets, staged=staged)
    result = host.run(engine)
    out = _result(host, result)
    return (out, result["step"]) if return_step else out
