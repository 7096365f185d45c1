"""pgt.torch: PyTorch's ``PGTransport`` on pgt's protocol, over any ``torch.distributed`` process group.

    from pgt.torch import PGTransport   # instead of torch.distributed.checkpoint._pg_transport

    transport = PGTransport(pg, timeout=timedelta(seconds=30), device=torch.device("cpu"))
    transport.send_checkpoint([1, 2], state_dict)      # on rank 0
    state_dict = transport.recv_checkpoint(0)          # on ranks 1 and 2

The constructor and the two methods are torch's; what crosses the wire is pgt's (PROTOCOL.md): no
pickle — the metadata is pgt's postcard ``Metadata``, decoded and validated by pgt's wasm module
(``pgt.abi``), which makes every protocol decision on both sides; tensors travel as their storages'
raw bytes, with an XXH3-64 digest of each checked before anything is returned. Leaves are tensors of
every dtype pgt has, DTensors, ShardedTensors and plain values (None, bool, int, float, str, bytes) in
nested dicts, lists and tuples with str or int keys; anything else is refused before anything is sent,
naming its key path.

**The torch.distributed binding** (PROTOCOL.md §1). gloo's ``recv`` takes one tensor of a size fixed
in advance, and gloo aborts the receiving *process* when a message is longer than the tensor posted
for it. So over a torch process group a protocol message crosses as several point-to-point messages,
all under the message's tag, in this order:

- the header (tag 1): one message, its 32 bytes;
- every later message: first a **frame** of 24 bytes — the message's 8-byte prefix (the transfer id),
  then the message's length (prefix included) and its number of parts, each a u64 LE — then the
  **parts**, the rest of the message cut in order: the metadata and the trailer in one part; a data
  message's segments (PROTOCOL.md §9) grouped: a segment of at least ``STAGE_MIN`` (64 KiB) is a part
  of its own, sent from and received into its storage's bytes (no copy); each maximal run of
  consecutive shorter segments is one part, gathered into a staging tensor by the sender and scattered
  by copy by the receiver (one pg operation instead of one per small tensor).

The grouping depends only on the plan, which both sides compute, so they agree. The frame is what
makes the link safe: a receiver sees a message of another transfer (a stale one, PROTOCOL.md §12) or of
another length before it posts anything sized for it; it skips a stale message by receiving its parts
into a scratch buffer of the frame's length (gloo accepts a shorter message into a larger tensor), and
fails a message of this transfer of the wrong length, consumed, with ``PgtTransportError``. Only pgt's
torch binding speaks to pgt's torch binding over a torch group (Rust ranks use pgt's TCP or MPI groups).

**Over pgt's TCP process group.** ``pg`` may instead be a ``pgt.tcp.TcpGroup`` (TCP.md), the group
``pgt send``/``pgt recv``/Rust's ``Transport`` and ``pgt.numpy`` use: a protocol message is one frame
there, so no binding is needed — the send loop (``pgt.send``) hands each message to the group, and the
receive side is ``pgt.recv``'s ``ReceiveHost`` (the host every Python receiver uses: data straight into
the storages, stale messages skipped, forwarding in chain fan-out, drains after a failure) with torch
storages behind its hooks. The leaves, the in-place targets and casts (``_Landing``) and the returned
checkpoint (``PGTransport._assemble``) are the same code for both links. A torch rank then sends to and
receives from Rust ranks, relays for them, and they for it::

    pg = TcpGroup.join(TcpOptions.from_env())   # MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, PGT_TOKEN
    PGTransport(pg, timedelta(seconds=30), "cpu").send_checkpoint([1, 2], state_dict, step=7)

The group's errors surface as this module's: ``pgt.tcp.PgTimeout`` as ``PgtTimeout``, any other
``pgt.tcp.PgError`` as ``PgtTransportError`` (each chained to the group's).

Every wait on the process group honours ``timeout`` (torch's class stores it and never uses it): a
peer that stalls makes the waiting side raise ``PgtTimeout`` within the timeout (gloo then closes the
pair: that link is dead, as in torch). Receives are posted ahead (the frames of the next data messages,
each data message's parts as soon as its frame arrives) and sends are asynchronous, a bounded window
of each in flight.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import gc
import secrets
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping
from datetime import timedelta

import torch
import torch.distributed as dist
import xxhash

from . import abi as pgt_abi
from . import metadata as pgt_metadata
from . import recv as pgt_recv
from . import send as pgt_send
from .abi import MAX_STALE, MAX_STALE_LEN, PREFIX_LEN, Pgt, PgtError
from .tcp import PgError, PgTimeout, TcpGroup

__all__ = [
    "InPlaceWritten",
    "PGTransport",
    "PgtDestinationsFailed",
    "PgtError",
    "PgtTimeout",
    "PgtTransportError",
    "UnsupportedLeaf",
]

UnsupportedLeaf = pgt_metadata.UnsupportedLeaf

# The binding's constants (module docstring): the frame's length, and the smallest segment that is a
# part of its own.
FRAME_LEN = 24
STAGE_MIN = 64 << 10
# Frames of data messages posted ahead of the data message being received, data messages whose parts
# are in flight at once, and messages a sender keeps in flight before waiting for the oldest.
FRAMES_AHEAD = 8
RECV_DEPTH = 4
SEND_WINDOW = 16
# The sender's default chunk size over a torch group: 64 MiB (pgt's default is 4 MiB). Every message
# costs a frame and a round trip through each side's Python (gloo sends a message once its receive is
# posted, and a part's receive is posted once its frame arrived): fewer, longer messages keep gloo busy.
CHUNK_SIZE = 1 << 26
# Likewise the default bucket: 4 MiB (pgt's: 1 MiB), a quarter of the frames and round trips for a dict
# of many small tensors (the 10,220-leaf reference dict: 1.0-1.1 s against 1.2 s in one run).
BUCKET_SIZE = 1 << 22
# A sender's staging buffers hold at least this many bytes (a run of small segments fills at most a
# bucket), so that one buffer serves every later run.
STAGE_BUFFER = BUCKET_SIZE

DTYPE_BY_NAME = {name: getattr(torch, name) for name in pgt_abi.DTYPES}
NAME_BY_DTYPE = {dt: name for name, dt in DTYPE_BY_NAME.items()}
REDUCE_OP_NAMES = {op.lower(): op for op in pgt_abi.REDUCE_OPS}  # DTensor's Partial("sum") -> Sum


# An in-place receive that failed after writing (see PGTransport), as pgt.torch.InPlaceWritten too.
InPlaceWritten = pgt_recv.InPlaceWritten


class PgtTransportError(RuntimeError):
    """The process group failed a transfer, or a message did not fit the protocol (another length
    than the plan's, too many stale messages)."""


class PgtDestinationsFailed(PgtTransportError):
    """A send over pgt's TCP group where some destinations failed and the others got everything:
    ``completed``, ``failed`` ({rank: error}) and ``cut_off`` as in ``pgt.send.DestinationsFailed``."""

    def __init__(self, message: str, outcome):
        super().__init__(message)
        self.completed, self.failed, self.cut_off = (
            outcome.completed,
            outcome.failed,
            outcome.cut_off,
        )


class PgtTimeout(PgtTransportError, TimeoutError):
    """A peer did not send or receive within the timeout."""


# ---- the binding: parts of a message ----


def group_parts(lengths) -> list[tuple[int, int]]:
    """The parts of a data message whose segments have ``lengths``: (first segment, end) ranges, a
    segment of at least STAGE_MIN alone, each maximal run of shorter ones together."""
    parts, start = [], None
    for i, n in enumerate(lengths):
        if n >= STAGE_MIN:
            if start is not None:
                parts.append((start, i))
                start = None
            parts.append((i, i + 1))
        elif start is None:
            start = i
    if start is not None:
        parts.append((start, len(lengths)))
    return parts


def frame_bytes(prefix, length: int, nparts: int) -> bytes:
    return bytes(prefix[:PREFIX_LEN]) + struct.pack("<QQ", length, nparts)


def _u8(buf) -> torch.Tensor:
    """A uint8 tensor over a buffer-protocol object's bytes (no copy)."""
    return (
        torch.frombuffer(buf, dtype=torch.uint8) if len(buf) else torch.empty(0, dtype=torch.uint8)
    )


def storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 tensor over the whole storage of ``t`` (no copy)."""
    s = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(s, 0, (s.nbytes(),), (1,))


def _storage_array(t: torch.Tensor):
    """The bytes of the storage under ``t`` as a flat uint8 numpy array (no copy on the CPU; as torch
    does, a copy on the host for another device)."""
    if t.is_cpu and t.storage_offset() == 0 and t.nbytes == t.untyped_storage().nbytes():
        if t.is_contiguous():  # the common case, in fewer steps: the tensor's bytes are the storage
            return (t.detach() if t.requires_grad else t).view(-1).view(torch.uint8).numpy()
    b = storage_bytes(t)
    return (b if b.is_cpu else b.cpu()).numpy()


# For each dtype, a dtype of the same element size that numpy has: a tensor's bytes through numpy
# in fewer calls than a flat uint8 view (bfloat16, the float8s and complex32 have no numpy dtype).
_SAME_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.complex128}
_NUMPY_SAME_SIZE = {dt: _SAME_SIZE[dt.itemsize] for dt in DTYPE_BY_NAME.values()}
for _dt in (torch.bool, torch.float16, torch.float32, torch.float64, torch.complex64):
    _NUMPY_SAME_SIZE[_dt] = _dt  # numpy has these: no view needed


def view_of(base: torch.Tensor, layout: dict, dtype_name: str) -> torch.Tensor:
    """The view ``layout`` (sender's shape, stride and storage offset) of the storage under ``base``,
    as ``dtype_name`` — for every dtype, bool, complex32 and the float8s included."""
    return torch.empty(0, dtype=DTYPE_BY_NAME[dtype_name], device=base.device).set_(
        base.untyped_storage(),
        int(layout["storage_offset"]),
        [int(d) for d in layout["shape"]],
        [int(d) for d in layout["stride"]],
    )


def _seconds(timeout) -> float:
    return timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)


def _no_gc(f):
    """``f`` with the cyclic garbage collector paused: a checkpoint of 10,000 leaves allocates enough
    objects to set off collections, each a walk over every object of the process (torch's included);
    what it allocates is freed by reference counting anyway."""

    @functools.wraps(f)
    def paused(*args, **kwargs):
        was = gc.isenabled()
        gc.disable()
        try:
            return f(*args, **kwargs)
        finally:
            if was:
                gc.enable()

    return paused


# ---- waiting on the process group ----


class _Link:
    """The process group and the timeout: every wait gets the time left until its deadline.

    A torch process group (gloo) matches messages on (peer, tag) itself and keeps no stash of
    pgt's, so nothing here forgets a failed transfer's id (PROTOCOL.md §12, *Forgetting a failed
    transfer*): a late message stays in the group until a later receive of its tag takes it and
    skips it as stale. Over ``TcpGroup`` (``_TcpReceiving``), ``pgt.recv.ReceiveHost`` does forget."""

    def __init__(self, pg, timeout: float):
        self.pg, self.timeout = pg, timeout
        self.rank = pg.rank()

    def deadline(self) -> float:
        return time.monotonic() + self.timeout

    def wait(self, work, deadline: float, what: str, peer: int):
        left = max(deadline - time.monotonic(), 0.001)
        try:
            work.wait(timedelta(seconds=left))
        except RuntimeError as e:
            if "imed out" in str(e) or time.monotonic() >= deadline:
                raise PgtTimeout(
                    f"pgt: rank {self.rank}: timed out after {self.timeout:g} s {what} rank {peer}"
                ) from e
            raise PgtTransportError(f"pgt: rank {self.rank}: {what} rank {peer}: {e}") from e

    def send(self, t: torch.Tensor, to: int, tag: int):
        return self.pg.send([t], to, tag)

    def recv(self, t: torch.Tensor, peer: int, tag: int):
        return self.pg.recv([t], peer, tag)


class _Sending:
    """pgt.send's host: each protocol message as the binding's frame and parts, sent asynchronously;
    at most SEND_WINDOW messages in flight."""

    def __init__(self, link: _Link):
        self.link = link
        self.inflight: collections.deque = collections.deque()  # (op, works, tensors, stages)
        # Staging buffers whose sends completed, reused: a fresh one per run would take a page
        # fault every 4 KiB (the 10,220-leaf dict stages 334 MB; the window needs ~70 MB).
        self.free: list[bytearray] = []

    def _stage(self, segments: list) -> tuple[bytearray, torch.Tensor]:
        """A staging buffer with ``segments`` gathered at its start, and a tensor of those bytes."""
        n = sum(len(s) for s in segments)
        buf = self.free.pop() if self.free and len(self.free[-1]) >= n else None
        if buf is None:
            buf = bytearray(max(n, STAGE_BUFFER))
        mv, at = memoryview(buf), 0
        for s in segments:
            mv[at : at + len(s)] = s
            at += len(s)
        return buf, _u8(buf)[:n]

    def send(self, op: dict, parts: list):
        to, tag = op["to"], op["tag"]
        tensors, stages = [], []
        if op["kind"] == "header":
            tensors.append(_u8(bytearray(parts[0])))
        elif op["kind"] == "data":
            segs = parts[1:]
            groups = group_parts([len(s) for s in segs])
            tensors.append(_u8(bytearray(frame_bytes(parts[0], op["len"], len(groups)))))
            for a, b in groups:
                if b == a + 1:
                    tensors.append(_u8(segs[a]))
                else:  # a run of small segments: gathered into one staging tensor
                    buf, t = self._stage(segs[a:b])
                    stages.append(buf)
                    tensors.append(t)
        else:  # metadata, trailer: the frame, then the message after its prefix in one part
            data = bytes(parts[0]) if len(parts) == 1 else b"".join(bytes(p) for p in parts)
            rest = data[PREFIX_LEN:]
            tensors.append(_u8(bytearray(frame_bytes(data, len(data), 1 if rest else 0))))
            if rest:
                tensors.append(_u8(bytearray(rest)))
        works = [self.link.send(t, to, tag) for t in tensors]
        self.inflight.append((op, works, tensors, stages))
        while len(self.inflight) > SEND_WINDOW:
            self._finish_oldest()

    def _finish_oldest(self):
        op, works, _, stages = self.inflight.popleft()
        deadline = self.link.deadline()
        for w in works:
            self.link.wait(
                w, deadline, f"sending {op['kind']} message {op['message']} to", op["to"]
            )
        self.free += stages

    def flush(self):
        while self.inflight:
            self._finish_oldest()


# ---- prefaulting fresh storages ----

# madvise(2)'s MADV_POPULATE_WRITE (Linux 5.14): maps a range's pages writable without touching the
# bytes, so it is safe on memory a receive is writing meanwhile.
MADV_POPULATE_WRITE = 23
PREFAULT_STEP = 8 << 20
# The smallest landing block of small storages (_Receiving._blocks) the prefaulter maps.
BLOCK_PREFAULT_MIN = 1 << 20
# Where a storage starts in a block whose run is scattered: a multiple of this (torch's CPU allocator's
# alignment), so each storage is as aligned as a ``torch.empty`` of its own.
BLOCK_ALIGN = 64
# How far ahead of the data landed the prefaulter maps: the receives posted ahead (RECV_DEPTH messages
# of up to CHUNK_SIZE) and a step more.
PREFAULT_WINDOW = RECV_DEPTH * CHUNK_SIZE + (64 << 20)
_MADVISE = None


def _madvise():
    global _MADVISE
    if _MADVISE is None:
        import ctypes

        try:
            f = ctypes.CDLL(None, use_errno=True).madvise
            f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
            probe = torch.empty(2 << 12, dtype=torch.uint8)
            page = (probe.data_ptr() + 4095) & ~4095
            _MADVISE = f if f(page, 4096, MADV_POPULATE_WRITE) == 0 else False
        except (OSError, AttributeError):
            _MADVISE = False
    return _MADVISE


class _Prefault:
    """Maps the pages of fresh storages ahead of the data, in a thread (ctypes lets go of the GIL),
    at most PREFAULT_WINDOW bytes past the data landed so far: gloo's receive then copies into mapped
    memory instead of taking a page fault every 4 KiB inline (1 GiB of fresh memory received by gloo:
    1.5-3 s; mapped: 0.4 s). Memory announced and never sent stays unmapped beyond the window."""

    def __init__(self, regions: list):
        self.regions = regions  # uint8 tensors, in the order their data arrives
        self.cond = threading.Condition()
        self.landed = 0
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="pgt-prefault", daemon=True)
        self.thread.start()

    def advance(self, n: int):
        with self.cond:
            self.landed += n
            self.cond.notify()

    def stop(self):
        with self.cond:
            self.stopped = True
            self.cond.notify()
        self.thread.join()

    def _run(self):
        madvise, done = _madvise(), 0
        for t in self.regions:
            p, n = t.data_ptr(), t.numel()
            start = (p + 4095) & ~4095
            for at in range(start, p + n, PREFAULT_STEP):
                with self.cond:
                    while not self.stopped and done - self.landed > PREFAULT_WINDOW:
                        self.cond.wait()
                    if self.stopped:
                        return
                step = min(PREFAULT_STEP, p + n - at)
                madvise(at, step, MADV_POPULATE_WRITE)
                done += step


class _Frame:
    def __init__(self, data: bytes):
        self.prefix = data[:PREFIX_LEN]
        self.length, self.nparts = struct.unpack("<QQ", data[PREFIX_LEN:FRAME_LEN])


class _Landing:
    """Where a receive's storages land, as torch tensors — shared by the hosts of both links (a torch
    process group's ``_Receiving``, a ``TcpGroup``'s ``_TcpReceiving``) and read by
    ``PGTransport._assemble``: fresh storages are uint8 tensors of the wire's size; an in-place target
    (an existing tensor whose key path matches, ``state_dict``) takes the bytes in its own storage, or
    — when the module orders a cast — after the transfer is verified, from a fresh staging tensor."""

    def __init__(self, inplace: dict | None, staged: bool = False):
        self.inplace = inplace  # canonical key path -> existing tensor-like, or None
        self.stage_in_place = staged  # in-place storages land in staging, copied in once verified
        self.staged_in_place: list = []
        self.paths: list = []  # every leaf's canonical key path (when receiving in place)
        self.candidates: dict = {}  # target id (= storage) -> existing plain tensor
        self.landing: dict = {}  # storage -> the uint8 tensor its wire bytes land in (CPU)
        self.placed: dict = {}  # storage -> (existing tensor, its storage as uint8)
        self.after: list = []  # (storage, cast_from): casts once the transfer is verified

    def in_place_targets(self, storages: list, paths) -> list:
        """The in-place targets (``Receiver.finish_bindings``' form) of the incoming ``storages``:
        every storage whose leaf's key path has a CPU tensor in ``inplace``."""
        if not self.inplace:
            return []
        out = []
        self.paths = paths(canonical=True)
        for s, st in enumerate(storages):
            path = self.paths[int(st["leaf"])]
            t = _inplace_tensor(self.inplace.get(path), int(st["shard"]))
            if t is None:
                continue
            self.candidates[s] = t
            out.append(
                {
                    "storage": s,
                    "id": s,
                    "dtype": NAME_BY_DTYPE[t.dtype],
                    "nbytes": t.untyped_storage().nbytes(),
                }
            )
        return out

    def fresh_storage(self, s: int, nbytes: int) -> torch.Tensor:
        """A fresh uint8 tensor for storage s's wire bytes (its landing)."""
        land = self.landing[s] = torch.empty(nbytes, dtype=torch.uint8)
        return land

    def target_storage(self, s: int, binding: dict) -> torch.Tensor:
        """The storage (as uint8) of the in-place target ``binding`` names: storage s's destination,
        and its landing unless a cast follows (then ``fresh_storage`` gives the landing)."""
        t = self.candidates[int(binding["dest"]["in_place"])]
        dest = storage_bytes(t)
        self.placed[s] = (t, dest)
        self.landing[s] = dest
        if binding["cast_from"] is not None:
            self.after.append((s, binding["cast_from"]))
        elif self.stage_in_place:  # a staging landing, copied into the target once verified
            self.staged_in_place.append(s)
            return self.fresh_storage(s, dest.numel())
        return dest

    def not_in_target(self) -> list:
        """In-place storages whose landed bytes are not in their target: cast or staged."""
        return sorted([s for s, _ in self.after] + self.staged_in_place)

    def copy_staged(self):
        """After the result is verified: the staged storages into their targets."""
        for s in self.staged_in_place:
            _, dest = self.placed[s]
            dest.copy_(self.landing[s])
            self.landing[s] = dest
        self.staged_in_place = []

    def cast_storage(self, s: int, cast_from: str):
        """Storage s's wire bytes (``cast_from``) into its target, as a whole (torch's copy_, round to
        nearest even)."""
        t, dest = self.placed[s]
        src, wire_dtype = self.landing[s], DTYPE_BY_NAME[cast_from]
        wire = torch.empty(0, dtype=wire_dtype).set_(
            src.untyped_storage(), 0, (src.numel() // wire_dtype.itemsize,)
        )
        out = torch.empty(0, dtype=t.dtype).set_(
            dest.untyped_storage(), 0, (dest.numel() // t.dtype.itemsize,)
        )
        out.copy_(wire)
        self.landing[s] = dest


class _Receiving(_Landing):
    """pgt.recv.receive's host over a torch process group: frames posted ahead, each data message's
    parts posted as its frame arrives (into the storages, or a staging tensor per run of small
    segments), hashed with XXH3-64 when the op says so; forwards (chain) asynchronously."""

    def __init__(self, link: _Link, inplace: dict | None, staged: bool = False):
        super().__init__(inplace, staged)
        self.link = link
        self.events: collections.deque = collections.deque()
        self.frames: dict = {}  # tag -> (work, tensor): frames posted ahead
        self.data: collections.OrderedDict = (
            collections.OrderedDict()
        )  # tag -> in-flight data message
        self.done_tags: set = set()  # data messages wholly received (reported or not)
        self.forwards: collections.deque = collections.deque()  # (message, works, tensors)
        self.hashers: dict = {}  # storage -> its XXH3-64 so far (used by the hashing thread only)
        self.hashing: collections.deque = collections.deque()  # (message, future of its digests)
        self.pool = None  # the hashing thread, started at the first hashed message
        self.prefault = None  # the prefaulter of fresh storages, if any
        self.plan: list = []
        self.storages: list = []  # Incoming storages
        self.views: dict = {}  # storage -> a memoryview of its landing
        self.blocks: dict = {}  # (data message, first segment of a run) -> the run's landing block
        self.free_staging: list = []  # staging tensors of scattered runs, landed and free again
        self.orphans: list = []  # works still posted when a transfer failed (kept alive)

    # -- frames --

    def _post_frame(self, peer: int, tag: int):
        if tag not in self.frames:
            t = torch.empty(FRAME_LEN, dtype=torch.uint8)
            self.frames[tag] = (self.link.recv(t, peer, tag), t)

    def _frame(self, op: dict, deadline: float) -> _Frame:
        """The frame of ``op``'s message, stale messages skipped (at most MAX_STALE)."""
        peer, tag = op["from"], op["tag"]
        for _ in range(MAX_STALE + 1):
            self._post_frame(peer, tag)
            work, t = self.frames.pop(tag)
            self.link.wait(work, deadline, f"waiting for {op['kind']} (tag {tag}) from", peer)
            frame = _Frame(t.numpy().tobytes())
            if op.get("prefix") is None or frame.prefix == pgt_abi.prefix_bytes(op["prefix"]):
                return frame
            self._consume(frame, peer, tag, deadline, "a stale message")
        raise PgtTransportError(
            f"TooManyStale: skipped {MAX_STALE} stale messages waiting for tag {tag} from rank {peer}"
        )

    def _consume(self, frame: _Frame, peer: int, tag: int, deadline: float, what: str):
        """Receives and throws away the parts of the message ``frame`` announced."""
        rest = frame.length - PREFIX_LEN
        if frame.length > MAX_STALE_LEN or (frame.nparts and rest <= 0) or frame.nparts > rest:
            raise PgtTransportError(
                f"rank {peer} sent {what} under tag {tag} whose frame announces {frame.nparts} parts "
                f"of {frame.length} bytes: cannot skip it"
            )
        scratch = torch.empty(max(rest, 0), dtype=torch.uint8)
        for _ in range(frame.nparts):
            self.link.wait(
                self.link.recv(scratch, peer, tag), deadline, f"skipping {what} from", peer
            )

    # -- the host interface of pgt.recv.receive --

    def recv_bytes(self, op: dict) -> bytes:
        peer, tag, n = op["from"], op["tag"], int(op["len"])
        deadline = self.link.deadline()
        if op["kind"] == "header":
            t = torch.empty(n, dtype=torch.uint8)
            self.link.wait(
                self.link.recv(t, peer, tag), deadline, "waiting for the header from", peer
            )
            return t.numpy().tobytes()
        frame = self._frame(op, deadline)
        if frame.length > n or frame.nparts != (1 if frame.length > PREFIX_LEN else 0):
            self._consume(frame, peer, tag, deadline, f"a {op['kind']} message")
            raise PgtTransportError(
                f"TooLarge: rank {peer} sent a {op['kind']} message of {frame.length} bytes in "
                f"{frame.nparts} parts under tag {tag}; expected at most {n} bytes in one part"
            )
        body = b""
        if frame.nparts:
            t = torch.empty(frame.length - PREFIX_LEN, dtype=torch.uint8)
            self.link.wait(
                self.link.recv(t, peer, tag), deadline, f"receiving the {op['kind']} from", peer
            )
            body = t.numpy().tobytes()
        return frame.prefix + body

    def bind(self, incoming: dict, paths) -> list:
        self.plan, self.storages = incoming["plan"], incoming["storages"]
        return self.in_place_targets(self.storages, paths)

    def bound(self, incoming: dict, bindings: list):
        small = {}  # fresh storages that may land in a block: storage -> wire length
        for s, b in enumerate(bindings):
            wire = int(self.storages[s]["nbytes"])
            if b["dest"] != "fresh":
                self.target_storage(s, b)  # straight into the existing storage, unless cast
                if b["cast_from"] is not None:
                    self.fresh_storage(s, wire)
            elif wire < STAGE_MIN:
                small[s] = wire
            else:
                self.fresh_storage(s, wire)
        fresh = self._blocks(small)  # (first storage, region): fresh memory, in arrival order
        for s, b in enumerate(bindings):
            if s in small and s not in self.landing:  # a small storage outside any block
                self.fresh_storage(s, small[s])
            elif (b["dest"] == "fresh" or b["cast_from"] is not None) and s not in small:
                if int(self.storages[s]["nbytes"]) >= PREFAULT_STEP:
                    fresh.append((s, self.landing[s]))  # (small ones come from the heap, mapped)
            if s not in self.views:
                self.views[s] = memoryview(self.landing[s].numpy())
        if fresh and _madvise():
            self.prefault = _Prefault([t for _, t in sorted(fresh, key=lambda x: x[0])])

    def _blocks(self, small: dict) -> list:
        """One fresh block per staged run of whole ``small`` storages, each storage landing in its
        range of the block as a tensor of its own storage (of the wire's size) over that memory, of
        its dtype (``_assemble`` then makes the sender's view with one call or none): one allocation
        instead of one per storage. When every storage of the run starts at a multiple of its
        element size in the wire's order (``_aligned``), the run's part is received straight into
        the block; otherwise each starts at a multiple of BLOCK_ALIGN and the part lands in a staging
        tensor, scattered into the block. The blocks of at least BLOCK_PREFAULT_MIN bytes, as (first
        storage, block), for the prefaulter."""
        out = []
        for m, message in enumerate(self.plan):
            if message["kind"] != "data":
                continue
            segments = message["segments"]
            for a, b in group_parts([int(x["len"]) for x in segments]):
                run = segments[a:b]
                if b == a + 1 or not all(
                    small.get(x["storage"]) == int(x["len"]) and int(x["offset"]) == 0 for x in run
                ):
                    continue
                direct = self._aligned(run)
                starts, at = [], 0
                for x in run:
                    if not direct:
                        at = -(-at // BLOCK_ALIGN) * BLOCK_ALIGN
                    starts.append(at)
                    at += small[x["storage"]]
                block = torch.empty(at, dtype=torch.uint8)
                mv = memoryview(block.numpy())
                for x, start in zip(run, starts, strict=True):
                    s = x["storage"]
                    size = small[s]
                    view = self.views[s] = mv[start : start + size]
                    dtype = DTYPE_BY_NAME[self.storages[s]["dtype"]]
                    if size % dtype.itemsize:
                        dtype = torch.uint8
                    self.landing[s] = (
                        torch.frombuffer(view, dtype=dtype) if size else torch.empty(0, dtype=dtype)
                    )
                if direct:
                    self.blocks[(m, a)] = block
                if at >= BLOCK_PREFAULT_MIN:
                    out.append((run[0]["storage"], block))
        return out

    def _staging(self, n: int) -> torch.Tensor:
        """A staging tensor of ``n`` bytes for a run scattered once landed: one that a landed run
        freed, when one is long enough (a fresh one would take a page fault every 4 KiB inside
        gloo's receive), else a new one of at least a bucket's size."""
        free = self.free_staging
        for i in range(len(free) - 1, -1, -1):
            if free[i].numel() >= n:
                return free.pop(i)[:n]
        return torch.empty(max(n, BUCKET_SIZE), dtype=torch.uint8)[:n]

    def _aligned(self, run: list) -> bool:
        """Whether every storage of a run starts at a multiple of its element size inside the block
        (the block itself is 64-byte aligned): torch's kernels, and any device copy later, may rely
        on element-aligned data, which a run of, say, an odd-length uint8 storage then a float32
        one would break."""
        at = 0
        for x in run:
            if at % DTYPE_BY_NAME[self.storages[x["storage"]]["dtype"]].itemsize:
                return False
            at += int(x["len"])
        return True

    def _slice(self, seg: dict) -> torch.Tensor:
        off = int(seg["offset"])
        return self.landing[seg["storage"]][off : off + int(seg["len"])]

    def recv_data(self, op: dict, segments: list):
        peer, tag = op["from"], op["tag"]
        self._post_ahead(op)
        deadline = self.link.deadline()
        frame = self._frame(op, deadline)
        groups = group_parts([int(s["len"]) for s in segments])
        if frame.length != int(op["len"]) or frame.nparts != len(groups):
            self._consume(frame, peer, tag, deadline, "a data message")
            self.done_tags.add(tag)
            raise PgtTransportError(
                f"LengthMismatch: rank {peer} sent data message {op['message']} (tag {tag}) of "
                f"{frame.length} bytes in {frame.nparts} parts; the plan says {op['len']} bytes in "
                f"{len(groups)} parts"
            )
        parts, works = [], []
        for a, b in groups:
            if b == a + 1:
                t = self._slice(segments[a])
            else:  # a run: straight into its block, or a staging tensor scattered once landed
                t = self.blocks.get((op["message"], a))
                if t is None:
                    t = self._staging(sum(int(s["len"]) for s in segments[a:b]))
            parts.append(t)
            works.append(self.link.recv(t, peer, tag))
        self.data[tag] = (op, segments, groups, parts, works)
        while len(self.data) > RECV_DEPTH:
            self._land_oldest()

    def _post_ahead(self, op: dict):
        """Posts the frames of the next FRAMES_AHEAD messages after ``op``'s (same upstream)."""
        for m in range(op["message"] + 1, min(op["message"] + 1 + FRAMES_AHEAD, len(self.plan))):
            if self.plan[m]["kind"] in ("data", "trailer"):
                self._post_frame(op["from"], self.plan[m]["tag"])

    def _land_oldest(self):
        tag, (op, segments, groups, parts, works) = self.data.popitem(last=False)
        deadline = self.link.deadline()
        for w in works:
            self.link.wait(w, deadline, f"receiving data message {op['message']} from", op["from"])
        self.done_tags.add(tag)
        if self.prefault is not None:
            self.prefault.advance(int(op["len"]))
        for (a, b), part in zip(groups, parts, strict=True):
            if b > a + 1 and (op["message"], a) not in self.blocks:  # scatter a staged run
                # (memoryview copies: torch's _foreach_copy_ took 28 s for this on a loaded
                # machine, its threads spinning)
                src, at = memoryview(part.numpy()), 0
                views = self.views
                for s in segments[a:b]:
                    off, n = int(s["offset"]), int(s["len"])
                    views[s["storage"]][off : off + n] = src[at : at + n]
                    at += n
                self.free_staging.append(part if part._base is None else part._base)
        self.events.append(("landed", op["message"]))
        if op["hash"] and (self.hashing or int(op["len"]) >= pgt_send.HASH_THREAD_MIN):
            # hashed in the hashing thread while the next messages land
            job = self._hasher().submit(self._hash, segments)
            self.hashing.append((op["message"], job))
        elif op["hash"]:  # short: at once (a thread's turns at the GIL would cost more)
            self.events.append(("digests", op["message"], self._hash(segments)))

    def _hasher(self) -> concurrent.futures.ThreadPoolExecutor:
        if self.pool is None:
            self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pgt-hash")
        return self.pool

    def _hash(self, segments: list) -> list:
        """XXH3-64 of a landed message's segments (the hashing thread: xxhash lets go of the GIL);
        the digests of the storages it completes."""
        digests = []
        for s in segments:
            off, n = int(s["offset"]), int(s["len"])
            if off == 0 and s["completes"]:  # a whole storage: hashed in one call
                digests.append(xxhash.xxh3_64_intdigest(self.views[s["storage"]][:n]))
                continue
            h = self.hashers.get(s["storage"])
            if h is None:
                h = self.hashers[s["storage"]] = xxhash.xxh3_64()
            h.update(self.views[s["storage"]][off : off + n])
            if s["completes"]:
                digests.append(self.hashers.pop(s["storage"]).intdigest())
        return digests

    def _digests(self):
        m, job = self.hashing.popleft()
        return ("digests", m, job.result())

    def forward(self, op: dict, payload):
        link = _Sending(self.link)
        if isinstance(payload, bytes):  # the trailer as received
            link.send(op, [payload])
        else:
            link.send(op, [pgt_abi.prefix_bytes(op["prefix"]), *[self._mv(s) for s in payload]])
        self.forwards.append((op, link))

    def _mv(self, seg: dict) -> memoryview:
        off = int(seg["offset"])
        return self.views[seg["storage"]][off : off + int(seg["len"])]

    def next_event(self, wait: bool):
        if self.events:
            return self.events.popleft()
        if self.hashing and self.hashing[0][1].done():
            return self._digests()
        if self.forwards and all(
            w.is_completed() for _, works, *_ in self.forwards[0][1].inflight for w in works
        ):
            op, _ = self.forwards.popleft()
            return ("forwarded", op["message"])
        if not wait:
            return None
        if self.data:
            self._land_oldest()
            return self.events.popleft()
        if self.hashing:
            return self._digests()
        if self.forwards:
            op, link = self.forwards.popleft()
            link.flush()
            return ("forwarded", op["message"])
        return None

    def discard(self, op: dict) -> bool:
        """Receives and throws away a message a failed transfer still sends; False when that fails."""
        tag = op["tag"]
        try:
            if tag in self.done_tags:
                return True
            if tag in self.data:
                _, _, _, _, works = self.data.pop(tag)
                deadline = self.link.deadline()
                for w in works:
                    self.link.wait(w, deadline, "draining from", op["from"])
                return True
            deadline = self.link.deadline()
            frame = self._frame(op, deadline)
            self._consume(frame, op["from"], tag, deadline, "a message of the failed transfer")
            return True
        except Exception:
            return False

    def close(self):
        if self.prefault is not None:
            self.prefault.stop()
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def abandon(self):
        """Keeps every work still posted alive (a gloo buffer must outlive its posted receive)."""
        self.orphans += [w for w, _ in self.frames.values()]
        self.orphans += [w for *_, works in self.data.values() for w in works]
        self.orphans += [link for _, link in self.forwards]

    def finish(self):
        """After the result is verified: the casts on receive, the staged copies."""
        for s, cast_from in self.after:
            self.cast_storage(s, cast_from)
        self.copy_staged()


# ---- key paths ----


def _leaves_by_path(obj) -> dict:
    """Every non-container of a nested dict/list/tuple by canonical key path."""
    out, stack = {}, [((), obj)]
    while stack:
        path, x = stack.pop()
        if isinstance(x, Mapping):
            for k, v in x.items():
                if isinstance(k, str):
                    stack.append(((*path, ("k", k)), v))
                elif isinstance(k, int) and not isinstance(k, bool):
                    stack.append(((*path, ("i", k)), v))
        elif isinstance(x, list | tuple) and not hasattr(x, "_fields"):
            stack.extend(((*path, ("x", i)), v) for i, v in enumerate(x))
        else:
            out[path] = x
    return out


# A DTensor or ShardedTensor exists only once its module has been imported: until then nothing is
# one, and the check costs no import (torch.distributed.tensor's first import takes seconds).
def _is_dtensor(x) -> bool:
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(x, mod.DTensor)


def _is_sharded(x) -> bool:
    mod = sys.modules.get("torch.distributed._shard.sharded_tensor")
    return mod is not None and isinstance(x, mod.ShardedTensor)


def _inplace_tensor(x, shard: int):
    """The plain tensor of an existing leaf that storage ``shard`` of the leaf may land in."""
    if type(x) is torch.Tensor:  # the common leaf, without the checks for the others
        if x.layout == torch.strided and x.is_cpu and x.dtype in NAME_BY_DTYPE:
            return x
        return None
    if x is None:
        return None
    if _is_sharded(x):
        shards = x.local_shards()
        return shards[shard].tensor if shard < len(shards) else None
    if _is_dtensor(x):
        x = x._local_tensor
    # As torch's class: only a tensor on the transport's device type (CPU) is written in place.
    if type(x) in (torch.Tensor, torch.nn.Parameter) and x.layout == torch.strided:
        return x if x.device.type == "cpu" and x.dtype in NAME_BY_DTYPE else None
    return None


# ---- the sender's leaves ----


def _layout(t: torch.Tensor, path: tuple) -> dict:
    if t.layout != torch.strided:
        raise UnsupportedLeaf(path, f"a tensor with layout {t.layout}")
    dtype = NAME_BY_DTYPE.get(t.dtype)
    if dtype is None:
        raise UnsupportedLeaf(path, f"a tensor of dtype {t.dtype}")
    if t.is_meta:
        raise UnsupportedLeaf(path, "a tensor on the meta device (it has no bytes)")
    return {
        "dtype": dtype,
        "shape": list(t.shape),
        "stride": list(t.stride()),
        "storage_offset": t.storage_offset(),
        "nbytes": t.untyped_storage().nbytes(),
    }


def _plain(t: torch.Tensor, path: tuple) -> torch.Tensor:
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        raise UnsupportedLeaf(path, f"a tensor subclass {type(t).__module__}.{type(t).__name__}")
    # The conjugate and negative bits are not in a storage's bytes: send the values they show.
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return t


def _placement(p, path: tuple) -> str:
    from torch.distributed.tensor.placement_types import Partial, Replicate, Shard

    if type(p) is Shard:
        return f"Shard({p.dim})"
    if type(p) is Replicate:
        return "Replicate"
    if type(p) is Partial and p.reduce_op in REDUCE_OP_NAMES:
        return f"Partial({REDUCE_OP_NAMES[p.reduce_op]})"
    raise UnsupportedLeaf(path, f"a DTensor placement {p!r}")


class _Leaves:
    """The sender's leaf function for pgt.metadata.flatten: leaf forms, and the tensors whose storages
    travel, in storage order."""

    def __init__(self):
        self.tensors: list[torch.Tensor] = []
        self.storages: list = []  # the bytes of each tensor's storage (buffer protocol, no copy)
        self.meshes: list = []

    def _tensor(self, t: torch.Tensor, path: tuple) -> dict:
        t = _plain(t, path)
        layout = _layout(t, path)
        self.tensors.append(t)
        self.storages.append(_storage_array(t))
        return layout

    def _plain_tensor(self, t: torch.Tensor) -> bytes | None:
        """The common leaf in the fewest torch calls: a strided CPU tensor of a dtype pgt has,
        without the conjugate or negative bit, its layout encoded at once and, when it is all of its
        storage, contiguous (the usual parameter), its bytes viewed through numpy. None for any other
        tensor (the general way: ``_tensor``)."""
        dtype = NAME_BY_DTYPE.get(t.dtype)
        if dtype is None or t.layout != torch.strided or not t.is_cpu or t.is_conj() or t.is_neg():
            return None
        shape, stride, offset = t.shape, t.stride(), t.storage_offset()
        nbytes = t.untyped_storage().nbytes()
        try:
            leaf = pgt_metadata.tensor_leaf_bytes(dtype, shape, stride, offset, nbytes)
        except (KeyError, TypeError):
            return None
        if offset == 0 and nbytes and shape and t.nbytes == nbytes and t.is_contiguous():
            u = t.detach() if t.requires_grad else t
            same = _NUMPY_SAME_SIZE[t.dtype]
            view = memoryview((u if same is t.dtype else u.view(same)).numpy()).cast("B")
        else:
            view = _storage_array(t)
        self.tensors.append(t)
        self.storages.append(view)
        return leaf

    def __call__(self, path: tuple, x) -> dict | bytes:
        if type(x) is torch.Tensor:  # the common leaf, without the checks for the others
            leaf = self._plain_tensor(x)
            return leaf if leaf is not None else {"kind": "tensor", "layout": self._tensor(x, path)}
        if _is_dtensor(x):
            mesh = x.device_mesh
            names = mesh.mesh_dim_names
            self.meshes.append(mesh)
            spec = {
                "mesh": {
                    "shape": list(mesh.mesh.shape),
                    "ranks": [int(r) for r in mesh.mesh.flatten().tolist()],
                    "dim_names": list(names) if names else None,
                    "device_type": mesh.device_type,
                },
                "placements": [_placement(p, path) for p in x.placements],
                "global_shape": list(x.shape),
                "global_stride": list(x.stride()),
                "dtype": NAME_BY_DTYPE.get(x.dtype, str(x.dtype)),
            }
            return {"kind": "dtensor", "local": self._tensor(x._local_tensor, path), "spec": spec}
        if _is_sharded(x):
            md = x.metadata()

            def meta(m) -> dict:
                return {
                    "offsets": list(m.shard_offsets),
                    "sizes": list(m.shard_sizes),
                    "placement": str(m.placement),
                }

            local = [
                {"layout": self._tensor(s.tensor, path), "meta": meta(s.metadata)}
                for s in x.local_shards()
            ]
            glob = {
                "shards": [meta(m) for m in md.shards_metadata],
                "global_size": list(md.size),
                "dtype": NAME_BY_DTYPE.get(md.tensor_properties.dtype, "float32"),
            }
            return {"kind": "sharded_tensor", "local_shards": local, "global": glob}
        if isinstance(x, torch.Tensor):
            return {"kind": "tensor", "layout": self._tensor(x, path)}
        leaf = pgt_metadata.value_leaf(x)
        if leaf is None:
            what = (
                "an int outside i128 (-2**127 to 2**127 - 1)"
                if isinstance(x, int)
                else f"a value of type {type(x).__module__}.{type(x).__qualname__}"
            )
            raise UnsupportedLeaf(path, what)
        return leaf


# ---- over pgt's TCP process group ----


class _TcpReceiving(_Landing, pgt_recv.ReceiveHost):
    """pgt.recv's generic host over a ``TcpGroup`` — the one ``python -m pgt recv`` and pgt.numpy use:
    data lands straight in the storages, stale messages are skipped, it forwards when the module says
    so (chain), drains after a failure — with torch storages behind its hooks: a fresh storage is
    ``torch.empty(nbytes, dtype=torch.uint8)``, an in-place target the existing tensor's storage, a
    cast torch's ``copy_``."""

    def __init__(self, pg: TcpGroup, timeout: float, inplace: dict | None, staged: bool = False):
        _Landing.__init__(self, inplace, staged)
        pgt_recv.ReceiveHost.__init__(self, pg, timeout)  # unstaged: _Landing stages (in_place)

    def targets(self, incoming: dict, paths) -> list:
        return self.in_place_targets(incoming["storages"], paths)

    def fresh(self, s: int, nbytes: int):
        return self.fresh_storage(s, nbytes).numpy()

    def in_place(self, s: int, binding: dict):
        return self.target_storage(s, binding).numpy()

    def not_in_target(self) -> list:
        return _Landing.not_in_target(self)

    def cast(self, s: int, binding: dict, staging, target):
        self.cast_storage(s, binding["cast_from"])


@contextlib.contextmanager
def _tcp_errors(rank: int, what: str):
    """A TcpGroup's failures as pgt.torch's: PgTimeout as PgtTimeout, any other PgError (a closed
    peer, a message of the wrong length) as PgtTransportError."""
    try:
        yield
    except pgt_recv.InPlaceWritten as e:
        cause = e.cause
        if isinstance(cause, PgError):  # the cause as pgt.torch's, the leaves as they are
            kind = PgtTimeout if isinstance(cause, PgTimeout) else PgtTransportError
            cause = kind(f"pgt: rank {rank}: {what}: {type(e.cause).__name__}: {e.cause}")
            raise pgt_recv.InPlaceWritten(e.written, e.partly, cause) from cause
        raise
    except PgTimeout as e:
        raise PgtTimeout(f"pgt: rank {rank}: {what}: {e}") from e
    except PgError as e:
        raise PgtTransportError(f"pgt: rank {rank}: {what}: {type(e).__name__}: {e}") from e
    except pgt_send.DestinationsFailed as e:
        raise PgtDestinationsFailed(f"pgt: rank {rank}: {what}: {e}", e) from e


# ---- the module ----

_COMPILED = None


def _pgt() -> Pgt:
    """An instance of pgt's wasm module (compiled once per process; an instance per transfer)."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = Pgt.compile()
    return Pgt(*_COMPILED)


class PGTransport:
    """A checkpoint transport over the process group ``pg``, with the constructor and methods of
    ``torch.distributed.checkpoint._pg_transport.PGTransport``.

    Args:
        pg: the process group: a ``torch.distributed`` one (gloo, or any backend that moves CPU
            tensors point to point; the binding of the module docstring), or pgt's own
            ``pgt.tcp.TcpGroup`` (TCP.md: a protocol message is one frame), whose peers may be Rust
            ranks (``pgt send``/``pgt recv``, ``Transport``), ``pgt.numpy`` ranks or other
            ``PGTransport`` ranks over the same group.
        timeout: every wait on the process group (timedelta, or seconds): a peer that stalls raises
            ``PgtTimeout`` within it.
        device: where fresh received tensors live (CPU; see the README for CUDA).
        state_dict: if given, called at each receive; every tensor of the checkpoint whose key path
            exists in what it returns is written into that tensor's storage (same size, else
            ``PgtError`` InPlaceSizeMismatch naming the path; float64/32/16 and bfloat16 cast on
            receive), and the returned checkpoint holds those tensors.

    pgt's own options, keyword-only: ``fanout`` ("chain": the first destination relays to the next;
    "direct": the sender sends to each), ``digests`` (XXH3-64 of every storage, checked before a
    receive returns; on by default), ``bucket_size`` and ``chunk_size`` (PROTOCOL.md §9; over a torch
    group 4 MiB and 64 MiB by default: see BUCKET_SIZE and CHUNK_SIZE); and the methods'
    ``step``/``expected_step`` (pgt's training step, which ``pgt recv --expect-step`` checks).

    In place (``state_dict``), a receive that fails after writing into some of the tensors raises
    ``pgt.recv.InPlaceWritten``: ``written`` names the leaves (key paths) whose new bytes all landed
    (landed, not verified: after a digest mismatch, every one), ``partly`` those that may hold some,
    ``cause`` the error (``PgtError``, ``PgtTimeout``, …). With ``staged=True`` every in-place tensor
    lands in a staging buffer first and is copied in only once the transfer verified: a failure leaves
    the tensors untouched and raises the cause itself; the cost is staging memory equal to the
    in-place tensors' total size and one copy of them.
    """

    def __init__(
        self,
        pg,
        timeout,
        device,
        state_dict: Callable[[], object] | None = None,
        *,
        fanout: str = "chain",
        digests: bool = True,
        bucket_size: int = BUCKET_SIZE,
        chunk_size: int = CHUNK_SIZE,
        staged: bool = False,
    ) -> None:
        self._pg = pg
        self._tcp = isinstance(pg, TcpGroup)
        self._timeout = timeout
        self._device = torch.device(device)
        self._state_dict = state_dict
        if self._device.type != "cpu":
            raise NotImplementedError(
                f"pgt.torch receives into CPU memory only (device {self._device}); see the README"
            )
        if fanout not in ("chain", "direct"):
            raise ValueError(f"fanout is 'chain' or 'direct', not {fanout!r}")
        self._plan = {
            "fanout": fanout.capitalize(),
            "bucket_size": bucket_size,
            "chunk_size": chunk_size,
        }
        self._digests = digests
        self._staged = staged
        self._meshes: dict = {}  # DeviceMeshes seen, by their pgt form (for DTensors received)
        self._orphans: list = []
        # Over pgt's TCP group, a chain relay's last receive: {rank, message, reason} when forwarding
        # failed (its own checkpoint was received and verified all the same), else None.
        self.last_forward_failure: dict | None = None

    def _link(self) -> _Link:
        return _Link(self._pg, _seconds(self._timeout))

    def _rank(self) -> int:
        return self._pg.rank if self._tcp else self._pg.rank()

    @_no_gc
    def send_checkpoint(
        self, dst_ranks: list[int], state_dict: object, *, step: int | None = None
    ) -> None:
        """Sends ``state_dict`` to every rank of ``dst_ranks`` (pgt's plan: chain or direct fan-out),
        with pgt's training ``step`` if given. A leaf pgt cannot carry raises ``UnsupportedLeaf``
        naming its key path before anything is sent."""
        if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
            raise ValueError(f"send_checkpoint: step is a non-negative int, not {step!r}")
        leaves = _Leaves()
        tree, forms = pgt_metadata.flatten(state_dict, leaves)
        for mesh in leaves.meshes:
            self._meshes.setdefault(_mesh_key_of(mesh), mesh)
        metadata = pgt_metadata.encode(
            step, self._rank(), [int(r) for r in dst_ranks], self._plan, tree, forms
        )
        storages = leaves.storages
        if self._tcp:
            with _tcp_errors(self._rank(), f"sending to ranks {list(dst_ranks)}"):
                pgt_send.send(
                    _pgt(),
                    pgt_send.TcpSendHost(self._pg, _seconds(self._timeout)),
                    metadata,
                    storages,
                    digests=self._digests,
                    transfer_id=secrets.randbits(64),
                )
            return
        host = _Sending(self._link())
        try:
            pgt_send.send(
                _pgt(),
                host,
                metadata,
                storages,
                digests=self._digests,
                transfer_id=secrets.randbits(64),
            )
        except BaseException:
            self._orphans += [w for _, works, *_ in host.inflight for w in works]
            raise

    @_no_gc
    def recv_checkpoint(self, src_rank: int, *, expected_step: int | None = None) -> object:
        """Receives a checkpoint from ``src_rank``: returned only once every storage's digest has been
        checked (and, with ``expected_step``, its step: StepMismatch). Raises ``PgtError`` (pgt's
        named error: DigestMismatch, InPlaceSizeMismatch, …), ``PgtTimeout`` or
        ``PgtTransportError``."""
        existing = self._state_dict() if self._state_dict else None
        inplace = _leaves_by_path(existing) if existing is not None else None
        pgt = _pgt()
        engine = pgt.receiver(rank=self._rank(), source=int(src_rank), expected_step=expected_step)
        if self._tcp:
            tcp = _TcpReceiving(self._pg, _seconds(self._timeout), inplace, self._staged)
            with _tcp_errors(self._rank(), f"receiving from rank {src_rank}"):
                result = tcp.run(engine)  # the casts made, once verified
            tcp.copy_staged()
            self.last_forward_failure = tcp.forward_failed
            return self._assemble(tcp, result, inplace or {})
        host = _Receiving(self._link(), inplace, self._staged)
        try:
            result = pgt_recv.receive(engine, host, with_bindings=False)
        except BaseException:
            host.abandon()
            self._orphans += host.orphans
            raise
        finally:
            host.close()
        host.finish()
        return self._assemble(host, result, inplace or {})

    # -- the result --

    def _assemble(self, host: _Landing, result: dict, inplace: dict):
        """The received checkpoint, from either link's host: tensors as views of the sender's layout
        over their storages (an in-place target itself when its view matches), DTensors and
        ShardedTensors rebuilt, values as Python values."""
        storage = 0
        values = []

        def tensor(layout: dict) -> tuple:
            nonlocal storage
            s = storage
            storage += 1
            target = host.placed.get(s)
            if target is None:
                land = host.landing[s]
                if _whole_view(layout, land):  # (a landing is always a whole storage)
                    shape = layout["shape"]  # the landing's own elements, as the sender's shape
                    return (land if len(shape) == 1 else land.view(shape)), None
                return view_of(land, layout, layout["dtype"]), None
            t, dest = target
            same = (
                t.dtype is DTYPE_BY_NAME.get(layout["dtype"])
                and t.storage_offset() == layout["storage_offset"]
                and t.shape == tuple(layout["shape"])
                and t.stride() == tuple(layout["stride"])
            )
            return (t if same else view_of(dest, layout, layout["dtype"])), t

        for i, leaf in enumerate(result["leaves"]):
            kind = leaf["kind"]
            if kind == "value":
                values.append(pgt_metadata.value_of(leaf["value"]))
            elif kind == "tensor":
                values.append(tensor(leaf["layout"])[0])
            elif kind == "dtensor":
                local, _ = tensor(leaf["local"])
                existing = inplace.get(host.paths[i]) if host.paths else None
                values.append(self._dtensor(local, leaf["spec"], existing))
            else:
                locals_ = [tensor(s["layout"])[0] for s in leaf["local_shards"]]
                values.append(_sharded(locals_, leaf))
        return pgt_metadata.unflatten(result["tree"], values)

    def _dtensor(self, local: torch.Tensor, spec: dict, existing):
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
        from torch.distributed.tensor.placement_types import Partial, Replicate, Shard

        key = _mesh_key(spec["mesh"])
        mesh = None
        if existing is not None and _is_dtensor(existing):
            if _mesh_key_of(existing.device_mesh) == key:
                mesh = existing.device_mesh
        if mesh is None:
            mesh = self._meshes.get(key) or _build_mesh(spec["mesh"])
            self._meshes[key] = mesh
        placements = []
        for p in spec["placements"]:
            if p.startswith("Shard("):
                placements.append(Shard(int(p[6:-1])))
            elif p == "Replicate":
                placements.append(Replicate())
            else:
                placements.append(Partial(p[8:-1].lower()))
        meta = TensorMeta(
            torch.Size(int(d) for d in spec["global_shape"]),
            tuple(int(d) for d in spec["global_stride"]),
            DTYPE_BY_NAME[spec["dtype"]],
        )
        dspec = DTensorSpec(mesh, tuple(placements), tensor_meta=meta)
        return DTensor(local, dspec, requires_grad=False)


def _whole_view(layout: dict, land: torch.Tensor) -> bool:
    """Whether ``layout`` is the contiguous view of all of the storage of ``land``, a flat tensor of
    the layout's dtype: its strides exactly the ones ``view(shape)`` gives (torch's contiguous
    strides), its elements all of the storage's."""
    if layout["storage_offset"] != 0 or DTYPE_BY_NAME.get(layout["dtype"]) is not land.dtype:
        return False
    stride, numel = 1, 1
    for d, st in zip(reversed(layout["shape"]), reversed(layout["stride"]), strict=True):
        if st != stride or type(d) is not int:
            return False
        stride *= max(d, 1)
        numel *= d
    return numel == land.numel()


def _sharded(local_tensors: list, leaf: dict):
    """A ShardedTensor as torch's class rebuilds it, from the module's result, which has placed
    each local shard on this rank (``rank:R/cpu``) and kept the sender's global metadata
    (PROTOCOL.md §12)."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import (
        ShardedTensorMetadata,
        TensorProperties,
    )

    def meta(m: dict) -> ShardMetadata:
        return ShardMetadata(
            shard_offsets=[int(x) for x in m["offsets"]],
            shard_sizes=[int(x) for x in m["sizes"]],
            placement=m["placement"],
        )

    shards = [
        Shard(tensor=t, metadata=meta(s["meta"]))
        for t, s in zip(local_tensors, leaf["local_shards"], strict=True)
    ]
    g = leaf["global"]
    dtype = local_tensors[-1].dtype if local_tensors else DTYPE_BY_NAME[g["dtype"]]
    gmeta = ShardedTensorMetadata(
        shards_metadata=[meta(m) for m in g["shards"]],
        size=torch.Size(int(d) for d in g["global_size"]),
        tensor_properties=TensorProperties(dtype=dtype),
    )
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        local_shards=shards, sharded_tensor_metadata=gmeta
    )


# ---- device meshes ----


def _mesh_key(m: dict) -> tuple:
    names = m.get("dim_names")
    return (
        m["device_type"],
        tuple(int(d) for d in m["shape"]),
        tuple(int(r) for r in m["ranks"]),
        tuple(names) if names else None,
    )


def _mesh_key_of(mesh) -> tuple:
    names = mesh.mesh_dim_names
    return (
        mesh.device_type,
        tuple(mesh.mesh.shape),
        tuple(int(r) for r in mesh.mesh.flatten().tolist()),
        tuple(names) if names else None,
    )


def _build_mesh(m: dict):
    """A DeviceMesh on this rank for a received DTensor, without collectives (a receive must not
    call into other ranks): torch's mesh over ``ranks`` with this rank's coordinates, and for each mesh
    dimension the existing process group over exactly its ranks, when there is one (the default group
    for a dimension spanning the world), so that collectives on the mesh work."""
    from torch.distributed.device_mesh import DeviceMesh

    shape = [int(d) for d in m["shape"]]
    ranks = torch.tensor([int(r) for r in m["ranks"]], dtype=torch.int).reshape(shape)
    names = tuple(m["dim_names"]) if m.get("dim_names") else None
    mesh = DeviceMesh(m["device_type"], ranks, mesh_dim_names=names, _init_backend=False)
    if not dist.is_initialized():
        return mesh
    me = dist.get_rank()
    where = (ranks == me).nonzero()
    if where.shape[0] != 1:
        return mesh
    coord = where[0].tolist()
    groups = {}
    world = dist.get_world_size()
    c10d = dist.distributed_c10d
    for pg, members in c10d._world.pg_group_ranks.items():
        ordered = tuple(g for g, _ in sorted(members.items(), key=lambda kv: kv[1]))
        groups.setdefault(ordered, pg)
    names_out = []
    for d in range(len(shape)):
        idx = list(coord)
        idx[d] = slice(None)
        along = tuple(int(r) for r in ranks[tuple(idx)].tolist())
        pg = groups.get(along)
        if pg is None and along == tuple(range(world)):
            pg = c10d._get_default_group()
        if pg is None:
            return mesh  # no group for this dimension: local operations only
        names_out.append(pg.group_name)
    with contextlib.suppress(AttributeError):
        mesh._dim_group_names = names_out
        mesh._pg_registry = {n: c10d._resolve_process_group(n) for n in names_out}
    return mesh
