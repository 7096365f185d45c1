"""pgt's dtypes (PROTOCOL.md §6) in numpy terms, and the casts a receive into existing arrays makes.

Every pgt dtype has a torch name (``pgt.abi.DTYPES``), an element size and, for most, a safetensors
name. numpy has its own types for the integers, bool, float64/32/16 and complex128/64. The others —
bfloat16 and the four float8 types — are ``ml_dtypes``' when that package is installed (an optional
dependency: ``pip install ml_dtypes``); without it, and always for complex32 (which no numpy package
has), an array of such a dtype travels as :class:`RawBits`: its elements' bits as unsigned integers
of the same size (``uint16`` for bfloat16, ``uint8`` for float8, ``uint32`` for complex32), with the
pgt dtype named beside them.

``convert`` is the cast of PROTOCOL.md §12 between float64, float32, float16 and bfloat16: round to
nearest even, through float64 (exact for every source), as torch's ``.to()`` and pgt-core's
``dtype::convert`` — bfloat16 from float64 directly, not through float32 (no double rounding).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from .abi import DTYPES

try:  # bfloat16 and float8 as numpy dtypes, when installed
    import ml_dtypes
except ImportError:  # pragma: no cover - exercised by the tests' without-ml_dtypes runs
    ml_dtypes = None

# PROTOCOL.md §6, by torch name (DTYPES order): element size, safetensors name (None: the format has
# none), numpy dtype string of numpy's own type (None: numpy has none; "raw bits" below).
DTYPE_INFO = {
    "float64": (8, "F64", "<f8"),
    "float32": (4, "F32", "<f4"),
    "float16": (2, "F16", "<f2"),
    "bfloat16": (2, "BF16", None),
    "float8_e4m3fn": (1, "F8_E4M3", None),
    "float8_e5m2": (1, "F8_E5M2", None),
    "float8_e4m3fnuz": (1, None, None),
    "float8_e5m2fnuz": (1, None, None),
    "complex128": (16, None, "<c16"),
    "complex64": (8, None, "<c8"),
    "complex32": (4, None, None),
    "int64": (8, "I64", "<i8"),
    "int32": (4, "I32", "<i4"),
    "int16": (2, "I16", "<i2"),
    "int8": (1, "I8", "i1"),
    "uint64": (8, "U64", "<u8"),
    "uint32": (4, "U32", "<u4"),
    "uint16": (2, "U16", "<u2"),
    "uint8": (1, "U8", "u1"),
    "bool": (1, "BOOL", "?"),
}
assert list(DTYPE_INFO) == DTYPES
ELEMENT_SIZE = {d: info[0] for d, info in DTYPE_INFO.items()}
SAFETENSORS_NAME = {d: info[1] for d, info in DTYPE_INFO.items() if info[1]}
FROM_SAFETENSORS = {st: d for d, st in SAFETENSORS_NAME.items()}
# The unsigned integer type of each element size: the bits of a dtype numpy lacks.
BITS = {1: np.dtype("u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}
# The dtypes ``convert`` casts between (pgt_core::dtype::DType::is_castable_float).
CASTABLE = ("float64", "float32", "float16", "bfloat16")


def _ml(name: str):
    return None if ml_dtypes is None else np.dtype(getattr(ml_dtypes, name))


def numpy_dtype(name: str, raw: bool = False) -> np.dtype | None:
    """The numpy dtype (little-endian) of pgt dtype ``name``: numpy's own, else ml_dtypes' when it is
    installed and ``raw`` is false, else None (the dtype travels as :class:`RawBits`)."""
    own = DTYPE_INFO[name][2]
    if own is not None:
        return np.dtype(own)
    if raw or name == "complex32":
        return None
    return _ml(name)


def _by_numpy() -> dict:
    out = {np.dtype(info[2]): d for d, info in DTYPE_INFO.items() if info[2] is not None}
    for d in ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
        dt = _ml(d)
        if dt is not None:
            out[dt] = d
    return out


_BY_NUMPY = _by_numpy()


def pgt_dtype(dt: np.dtype) -> str | None:
    """The pgt dtype of numpy dtype ``dt`` (either byte order), or None when pgt has none (object,
    strings, structured, datetime, float128, …)."""
    dt = np.dtype(dt)
    if not dt.isnative:
        dt = dt.newbyteorder("=")
    return _BY_NUMPY.get(dt)


def little_endian(dt: np.dtype) -> bool:
    """Whether arrays of ``dt`` hold their elements in the wire's byte order (little-endian)."""
    order = np.dtype(dt).byteorder
    return order in ("<", "|") or (order == "=" and sys.byteorder == "little")


@dataclass(frozen=True, eq=False)
class RawBits:
    """An array of a pgt dtype that numpy (or this installation) has no type for: ``bits`` holds each
    element's bits as an unsigned integer of the element's size (``uint16`` for bfloat16, ``uint8``
    for the float8 types, ``uint32`` for complex32), ``dtype`` names the pgt dtype. Sent as that
    dtype; received arrays of such dtypes come back as RawBits when ml_dtypes is missing (complex32:
    always). ``RawBits(a.view(np.uint16), "bfloat16")`` sends a bfloat16 array's bits; with
    ml_dtypes, ``r.bits.view(ml_dtypes.bfloat16)`` is the array."""

    bits: np.ndarray
    dtype: str

    def __post_init__(self):
        if self.dtype not in DTYPE_INFO:
            raise ValueError(f"RawBits: {self.dtype!r} is not a pgt dtype (one of {DTYPES})")
        if not isinstance(self.bits, np.ndarray):
            raise TypeError(f"RawBits: bits must be a numpy array, not {type(self.bits).__name__}")
        size = ELEMENT_SIZE[self.dtype]
        if self.bits.dtype.kind not in "ub" or self.bits.dtype.itemsize != size:
            raise ValueError(
                f"RawBits: {self.dtype} elements are {size} bytes; bits has dtype {self.bits.dtype} "
                f"(give unsigned integers of {size} bytes)"
            )

    @property
    def shape(self) -> tuple:
        return self.bits.shape

    def array(self) -> np.ndarray:
        """The elements as their numpy dtype (a view of ``bits``), when there is one."""
        dt = numpy_dtype(self.dtype)
        if dt is None:
            raise TypeError(
                f"numpy has no {self.dtype} type here"
                + (" (pip install ml_dtypes)" if self.dtype != "complex32" else "")
            )
        return self.bits.view(dt)


# ---- casts (PROTOCOL.md §12) ----

_CHUNK = 1 << 20  # elements converted at a time: bounds the float64 temporaries


def _bf16_to_f64(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _f64_to_bf16(x: np.ndarray) -> np.ndarray:
    """bfloat16 bits of float64 ``x``, rounded to nearest even directly: float64 is first rounded to
    float32 *to odd* (truncate, and set the last bit when inexact), which keeps enough bits that the
    second rounding, float32 to bfloat16 to nearest even, is exact. NaN stays NaN (quiet, sign kept)."""
    with np.errstate(over="ignore", invalid="ignore"):
        f = x.astype(np.float32)
        back = f.astype(np.float64)
    bits = f.view(np.uint32).copy()
    inexact = (back != x) & ~np.isnan(x)
    away = inexact & (np.abs(back) > np.abs(x))  # rounded away from zero: step back toward it
    bits[away] -= np.uint32(1)
    bits[inexact] |= np.uint32(1)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = ((bits[nan] >> 16) | np.uint32(0x0040)).astype(np.uint16)
    return out


def _read(dtype: str, src: np.ndarray) -> np.ndarray:
    if dtype == "bfloat16":
        return _bf16_to_f64(src.view(BITS[2]))
    return src.view(DTYPE_INFO[dtype][2]).astype(np.float64)


def _write(dtype: str, x: np.ndarray, dst: np.ndarray) -> None:
    if dtype == "bfloat16":
        dst.view(BITS[2])[:] = _f64_to_bf16(x)
        return
    with np.errstate(over="ignore", invalid="ignore"):
        dst.view(DTYPE_INFO[dtype][2])[:] = x.astype(DTYPE_INFO[dtype][2])


def convert(src_dtype: str, src, dst_dtype: str, dst) -> None:
    """Casts the elements of ``src`` (bytes of ``src_dtype``, little-endian) into ``dst`` (a writable
    buffer of as many ``dst_dtype`` elements), element by element, as pgt-core's
    ``dtype::convert``. Raises ValueError for another pair of dtypes or mismatched lengths."""
    if src_dtype not in CASTABLE or dst_dtype not in CASTABLE:
        raise ValueError(f"UnsupportedCast: cannot cast {src_dtype} to {dst_dtype}")
    s = np.frombuffer(src, dtype=np.uint8)
    d = np.frombuffer(dst, dtype=np.uint8)
    fs, ts = ELEMENT_SIZE[src_dtype], ELEMENT_SIZE[dst_dtype]
    if len(s) % fs or len(d) % ts or len(s) // fs != len(d) // ts:
        raise ValueError(f"CastLength: {len(s)} bytes of {src_dtype} into {len(d)} of {dst_dtype}")
    n = len(s) // fs
    for i in range(0, n, _CHUNK):
        j = min(n, i + _CHUNK)
        _write(dst_dtype, _read(src_dtype, s[i * fs : j * fs]), d[i * ts : j * ts])
