"""A safetensors file as pgt sends it: ``load`` reads it the way pgt's Rust ``safetensors_io::load``
does (``pgt send``), without copying a tensor byte — the file is memory-mapped and every tensor is a
memoryview of the mapping.

- **Names.** Flat, as PyTorch's ``model.state_dict()``: one dict whose keys are the tensor names
  byte for byte, dots included (``"model.layers.0.weight"`` is one key).
- **Order.** Tensors in the order of their bytes in the file.
- **``__metadata__``.** The file's string map, when present (even empty), becomes a dict of strings
  under the top-level key ``__metadata__`` (first in the root dict), sorted by key; an integer
  ``pgt.step`` entry is also the step.
- **dtypes.** By their safetensors names (PROTOCOL.md §6); ``F4``, ``F6_*``, ``F8_E8M0`` and unknown
  names are errors naming the tensor.

A malformed file is a :class:`SafetensorsError` naming the file and what is wrong.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from .dtypes import ELEMENT_SIZE, FROM_SAFETENSORS

METADATA_KEY = "__metadata__"
STEP_KEY = "pgt.step"
# The safetensors format's own bound on the JSON header (the `safetensors` crate's MAX_HEADER_SIZE).
MAX_HEADER = 100_000_000


class SafetensorsError(ValueError):
    """A file that is not a safetensors file pgt can send."""


@dataclass
class Loaded:
    """A loaded file: the state dict's tree and leaves (pgt.abi's decoded forms), each tensor's bytes
    (a memoryview of the mapping, in leaf order), its step, and each tensor's name and file range."""

    tree: list
    leaves: list
    storages: list
    step: int | None
    tensors: list  # (name, dtype, shape, (start, end) in the file), in leaf order
    header_len: int
    file_bytes: int


def read_header(path: Path, data) -> tuple[int, dict]:
    """(header length, header JSON) of a safetensors file's bytes, checked."""
    if len(data) < 8:
        raise SafetensorsError(
            f"{path}: not a safetensors file: {len(data)} bytes (the header size alone takes 8)"
        )
    (n,) = struct.unpack_from("<Q", data)
    if n > MAX_HEADER or 8 + n > len(data):
        raise SafetensorsError(
            f"{path}: not a valid safetensors file: the header announces {n} bytes, "
            f"{len(data) - 8} follow"
        )
    try:
        header = json.loads(bytes(data[8 : 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: not a valid safetensors file: its header: {e}") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: not a valid safetensors file: the header is not an object")
    return n, header


def _tensors(path: Path, header: dict, data_len: int) -> list:
    """(name, dtype, shape, start, end) of every tensor, in file order, checked as the `safetensors`
    crate checks them: known fields, sizes that match, byte ranges that tile the data."""
    out = []
    for name, info in header.items():
        if name == METADATA_KEY:
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise SafetensorsError(f"{path}: tensor {name!r}: not a tensor entry: {info!r}")
        st, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        dtype = FROM_SAFETENSORS.get(st)
        if dtype is None:
            raise SafetensorsError(
                f"{path}: tensor {name!r} has dtype {st}, which pgt does not support"
            )
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise SafetensorsError(f"{path}: tensor {name!r}: bad shape {shape!r}")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
            or not 0 <= offs[0] <= offs[1]
        ):
            raise SafetensorsError(f"{path}: tensor {name!r}: bad data_offsets {offs!r}")
        n = math.prod(shape) * ELEMENT_SIZE[dtype]
        if offs[1] - offs[0] != n:
            raise SafetensorsError(
                f"{path}: tensor {name!r}: {offs[1] - offs[0]} bytes for {n} bytes of {dtype} {shape}"
            )
        out.append((name, dtype, shape, offs[0], offs[1]))
    out.sort(key=lambda t: (t[3], t[4]))
    end = 0
    for name, _, _, start, stop in out:
        if start != end:
            raise SafetensorsError(
                f"{path}: not a valid safetensors file: tensor {name!r} starts at byte {start} "
                f"of the data, the previous one ends at {end}"
            )
        end = stop
    if end != data_len:
        raise SafetensorsError(
            f"{path}: not a valid safetensors file: the tensors take {end} bytes of data, the file "
            f"has {data_len}"
        )
    return out


def _flatten(obj, tree: list, order: list):
    """Pre-order tree nodes of nested dicts whose leaves are ints (their tensor's index)."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            tree.append({"dict": list(x)})
            stack.extend(reversed(list(x.values())))
        else:
            tree.append("leaf")
            order.append(x)


def load(path) -> Loaded:
    """Maps ``path`` and reads it as pgt sends it (see the module docs)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except OSError as e:
        raise SafetensorsError(f"cannot open {path}: {e.strerror or e}") from None
    view = memoryview(data)
    n, header = read_header(path, view)
    meta = header.get(METADATA_KEY)
    if meta is not None and (
        not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())
    ):
        raise SafetensorsError(f"{path}: __metadata__ is not a map of strings")
    start = 8 + n
    tensors = _tensors(path, header, len(view) - start)
    names = [t[0] for t in tensors]
    # Flat, as a PyTorch state dict: every name is one key, dots and all.
    nested = {name: i for i, name in enumerate(names)}
    tree: list = []
    order: list = []
    root_items = []
    if meta is not None:
        root_items.append(METADATA_KEY)
    tree.append({"dict": root_items + list(nested)})
    leaves: list = []
    storages: list = []
    listed = []
    step = None
    if meta is not None:
        keys = sorted(meta)
        tree.append({"dict": keys})
        for k in keys:
            tree.append("leaf")
            leaves.append({"kind": "value", "value": {"type": "str", "value": meta[k]}})
        s = meta.get(STEP_KEY, "").strip()
        if s.isascii() and s.isdigit() and int(s) < 1 << 64:
            step = int(s)
    for v in nested.values():
        _flatten(v, tree, order)
    for i in order:
        name, dtype, shape, lo, hi = tensors[i]
        stride = []
        acc = 1
        for d in reversed(shape):
            stride.append(acc)
            acc *= d
        layout = {
            "dtype": dtype,
            "shape": shape,
            "stride": stride[::-1],
            "storage_offset": 0,
            "nbytes": hi - lo,
        }
        leaves.append({"kind": "tensor", "layout": layout})
        storages.append(view[start + lo : start + hi])
        listed.append((name, dtype, shape, (start + lo, start + hi)))
    return Loaded(tree, leaves, storages, step, listed, n, len(view))
