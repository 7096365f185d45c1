#!/usr/bin/env python3
"""pgt.recv: receive a checkpoint from `pgt send` in Python, as one rank of the job.

    MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 RANK=1 WORLD_SIZE=2 PGT_TOKEN=… \\
        python -m pgt recv --out received.safetensors [--npz received.npz]

Division of labour:
- pgt.tcp joins the TCP process group (rendezvous with rank 0's store, HMAC-authenticated connections,
  frames) and moves bytes;
- pgt's wasm module (wasm/ABI.md, loaded with wasmtime through pgt.abi) makes every protocol
  decision: it checks the header, decodes and validates the metadata, computes the plan, tells this host
  which message to receive from whom with which tag and length, into which byte ranges of which storage,
  what to forward where (chain fan-out), checks the digests and yields the final result;
- this file follows the module's orders, in the one loop of pgt-core's drive.rs (``receive``): it
  receives each data message straight into per-storage buffers (memoryview slices, no staging copy),
  hashes its storage bytes with XXH3-64 when asked and reports the digests of the storages it
  completes, forwards when asked, and at the end writes the tensors the module returned as a
  safetensors file and/or a .npz file.

Exit status: 0 received and verified; 1 pgt protocol error (the module's named error, e.g.
DigestMismatch, StepMismatch, NotADestination); 2 usage or setup error; 3 process-group error
(authentication, rendezvous, timeout, peer closed).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import logging
import math
import mmap
import os
import re
import struct
import sys
import time
from pathlib import Path

import numpy as np  # a dependency of the package; view_bytes also gathers without it
import wasmtime
import xxhash

from . import abi as pgt_abi
from .abi import MAX_STALE, MAX_STALE_LEN, PREFIX_LEN, Pgt, PgtError, is_stale
from .dtypes import BITS, DTYPE_INFO, ELEMENT_SIZE, SAFETENSORS_NAME, convert
from .tcp import LengthMismatch, PgError, TcpGroup, TcpOptions

# The .npz output stores dtypes numpy lacks as their raw bits (listed in __pgt_dtypes__).
NUMPY_DTYPE = {d: info[2] or BITS[info[0]].str for d, info in DTYPE_INFO.items()}
METADATA_KEY = "__metadata__"
STEP_KEY = "pgt.step"

EXIT_PROTOCOL, EXIT_SETUP, EXIT_GROUP = 1, 2, 3


class Log:
    def __init__(self, verbose: int, quiet: bool):
        self.verbose, self.quiet = verbose, quiet

    def info(self, msg: str):
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def debug(self, msg: str):
        if self.verbose:
            print(f"pgt recv: {msg}", file=sys.stderr, flush=True)

    def warn(self, msg: str):
        # Through logging, so a library's caller decides where it goes (stderr when unconfigured).
        logging.getLogger("pgt").warning("pgt recv: %s", msg)


# ---- the receive loop (pgt-core's drive.rs): the module decides, a host moves bytes ----


def receive(engine, host, with_bindings: bool = True) -> dict:
    """Runs receiver ``engine`` (a ``pgt_abi.Receiver``) to completion over ``host`` and returns the
    verified result, as ``pgt_core::drive::receive`` does: one loop that reports the host's completions,
    polls, and acts on the op. The plan (from the metadata) says which storage ranges each data message
    carries; a forwarded trailer is the trailer as received. The first error — the module's PgtError or
    the host's — ends the transfer and frees the receiver.

    A host has ``recv_bytes(op) -> bytes``; ``bind(incoming, paths) -> [InPlace target]`` (``paths()``
    gives every leaf's key path); ``bound(incoming, bindings)``; ``recv_data(op, segments)``;
    ``forward(op, payload)`` (a data message's segments, or the trailer's bytes); ``next_event(wait)``,
    the next completion: ``("landed", m)``, ``("digests", m, [u64, …])`` (the digests of the storages
    data message m completes, in segment order) or ``("forwarded", m)``; None when none is ready (with
    ``wait``: when nothing is in flight); and ``discard(op) -> bool``, which receives a message a failed
    transfer's plan still says is coming and throws it away (False: stop draining). Every receive skips
    messages of other transfers (``pgt_abi.is_stale``): never use one.

    After an error, the host drains what the plan still says is coming (``engine.leftover()``), so
    that the next transfer on the link does not meet it (PROTOCOL.md §12). When the transfer had
    written in place, the error is ``InPlaceWritten`` (the cause as ``cause`` and ``__cause__``),
    naming the in-place leaves written; a host's optional ``stop()`` ends its background work first,
    and its optional ``not_in_target()`` names the in-place storages whose landed bytes are held
    elsewhere (staging; a cast after the transfer verified): untouched targets."""
    incoming, trailer, finished = None, b"", False
    in_place, written = False, None
    try:
        while True:
            while (event := host.next_event(False)) is not None:
                apply(engine, event)
            op = engine.poll()
            if op["type"] == "recv":
                kind = op["kind"]
                if kind == "header":
                    engine.handle_header(host.recv_bytes(op))
                elif kind == "metadata":
                    incoming = engine.handle_metadata(host.recv_bytes(op))
                elif kind == "trailer":
                    trailer = host.recv_bytes(op)
                    engine.handle_trailer(trailer)
                else:
                    host.recv_data(op, incoming["plan"][op["message"]]["segments"])
            elif op["type"] == "need_bindings":
                bindings = engine.finish_bindings(host.bind(incoming, engine.paths))
                in_place = any(b["dest"] != "fresh" for b in bindings)
                host.bound(incoming, bindings)
            elif op["type"] == "forward":
                data = op["kind"] == "data"
                host.forward(op, incoming["plan"][op["message"]]["segments"] if data else trailer)
            elif op["type"] == "wait":
                event = host.next_event(True)
                if event is None:
                    raise RuntimeError("the receiver waits, but nothing is in flight: incomplete")
                apply(engine, event)
            else:  # done
                # Once done, finish refuses only a digest mismatch, and frees the receiver: what was
                # written in place is asked before, and only then (naming every leaf costs time).
                if in_place and engine.has_digest_mismatch():
                    written = engine.in_place_written(_not_in_target(host))
                finished = True
                # DigestMismatch etc. surface here; frees the receiver. Without ``bindings``, the
                # result leaves out the bindings the host was given (``bound``).
                return engine.finish(with_bindings)
    except Exception as e:
        if not finished:
            if hasattr(host, "stop"):
                host.stop()
            if in_place:
                with contextlib.suppress(Exception):
                    while (event := host.next_event(False)) is not None:
                        apply(engine, event)  # what landed and was not reported yet
                with contextlib.suppress(PgtError):
                    written = engine.in_place_written(_not_in_target(host))
            with contextlib.suppress(PgtError, PgError):
                while (op := engine.leftover()) is not None and host.discard(op):
                    pass
            if (forget := getattr(host, "forget_failed", None)) is not None:
                forget()
        if written and (written["written"] or written["partly"]):
            raise InPlaceWritten(written["written"], written["partly"], e) from e
        raise
    finally:
        if not finished:
            with contextlib.suppress(PgtError):
                engine.drop()


class InPlaceWritten(RuntimeError):
    """An in-place receive failed after writing into some of its targets (unstaged: a staged receive
    leaves them untouched and raises the cause itself). ``written``: key paths (display form) of the
    in-place leaves whose new bytes all landed — landed, not verified: on a digest mismatch they
    usually all are, the wrong bytes included; ``partly``: those that may hold some new bytes; every
    other in-place leaf is untouched. ``cause`` (also ``__cause__``): why the receive failed."""

    SHOWN = 8  # key paths named in the message (all are in ``written`` and ``partly``)

    def __init__(self, written: list, partly: list, cause: BaseException):
        self.written, self.partly, self.cause = list(written), list(partly), cause

        def names(paths):
            more = f" and {len(paths) - self.SHOWN} more" if len(paths) > self.SHOWN else ""
            return ", ".join(paths[: self.SHOWN]) + more

        msg = f"the in-place receive failed after writing {len(self.written)} leaf(s) fully"
        if self.written:
            msg += f" ({names(self.written)})"
        if self.partly:
            msg += f" and {len(self.partly)} partly ({names(self.partly)})"
        super().__init__(
            f"{msg}; every other in-place leaf is untouched: {type(cause).__name__}: {cause}"
        )


def _not_in_target(host) -> list:
    return list(host.not_in_target()) if hasattr(host, "not_in_target") else []


def apply(engine, event):
    """Reports a host's completion to the receiver."""
    if event[0] == "landed":
        engine.handle_data(event[1])
    elif event[0] == "digests":
        engine.handle_digests(event[1], event[2])
    else:
        engine.handle_forwarded(event[1])


# Fresh storages at least this large are anonymous mappings: their pages are committed as the bytes
# land, not when the metadata announces them (a bytearray zero-fills, committing everything at once).
MAPPED_MIN = 1 << 20


def default_memory_budget() -> int:
    """Half of physical memory, as pgt-host's receivers default to."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError):
        return 8 << 30


class MemoryBudget(RuntimeError):
    """The storages a checkpoint announces need more fresh memory than the receiver's budget (checked
    before anything is allocated; the rest of the transfer is drained)."""

    name = "MemoryBudget"

    def __init__(self, needed: int, budget: int):
        self.needed, self.budget = needed, budget
        super().__init__(
            f"receiving needs {needed} bytes of memory (the announced storages), more than the "
            f"receiver's memory budget of {budget} bytes"
        )


def parse_size(text: str) -> int:
    """``8GiB``, ``512MiB``, ``64KiB``, ``1GB`` or plain bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 8GiB, 512MiB, 1000000)")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}.get(unit)
    if scale is None:
        scale = 1 << (10 * "KMGT".index(unit[0]) + 10)
    return int(m.group(1)) * scale


class ReceiveHost:
    """The host side of one receive over the process group (``receive``'s ``host``), for every
    receiver in this package — ``python -m pgt recv``, ``pgt.numpy`` (and ``pgt.torch``): it moves
    a transfer's bytes, each operation at once (its completion is reported at the loop's next turn).
    Data messages land straight in the storages' buffers (memoryview slices, no staging copy) after
    their 8-byte prefix, hashed with XXH3-64 when the op says so; messages of other transfers (stale)
    are skipped, whatever their length; forwarded messages go out as received; after a failure it
    drains what the failed transfer still sends, unless the link itself failed.

    Where storage s lives is the subclass's business, through three hooks:

    - ``targets(incoming, paths) -> [InPlace]``: the in-place targets (``{storage, id, dtype,
      nbytes}``, ``Receiver.finish_bindings``' form) — default none, every storage fresh. ``paths()``
      gives every leaf's key path (built only when called);
    - ``fresh(s, nbytes)``: a writable buffer of ``nbytes`` for storage s (default a bytearray, an
      anonymous mapping from ``MAPPED_MIN`` bytes on: memory follows the data, not the metadata);
    - ``in_place(s, binding)``: the writable buffer of in-place target ``binding["dest"]["in_place"]``
      (the id given in ``targets``), ``binding["nbytes"]`` bytes.

    Where the module casts (``binding["cast_from"]``: the wire dtype), the wire bytes land in a fresh
    staging buffer and ``finish_casts`` (after the transfer verified) converts them into the target
    (``cast(s, binding, staging, target)``, default ``pgt.dtypes.convert``). After ``bound``:
    ``wire[s]`` holds storage s's wire bytes, ``dest[s]`` its final bytes (equal unless cast).

    ``staged``: in place, all or nothing — every in-place storage lands in a fresh staging buffer,
    copied into its target only once the transfer verified (``run``; without digests: once every
    byte landed), so a failed receive leaves every target untouched; the staging costs the in-place
    storages' total size (in the memory budget) and one copy at the end. Unstaged, a failure after
    writing in place raises ``InPlaceWritten``, which names the leaves written.

    The fresh buffers (and cast staging) a checkpoint needs are summed before any is allocated:
    over ``memory_budget`` (default half of physical memory) the receive fails with ``MemoryBudget``."""

    def __init__(
        self,
        pg: TcpGroup,
        timeout: float,
        log: Log | None = None,
        memory_budget: int | None = None,
        *,
        staged: bool = False,
    ):
        self.pg, self.timeout = pg, timeout
        self.staged = staged
        self.staged_storages: list = []  # in-place storages landing in staging (staged)
        self.memory_budget = default_memory_budget() if memory_budget is None else memory_budget
        self.log = log if log is not None else Log(0, True)
        self.events: collections.deque = collections.deque()
        self.incoming: dict | None = None
        self.bindings: list = []
        self.wire: list = []  # per storage: the buffer its wire bytes land in
        self.dest: list = []  # per storage: its final buffer (the in-place target when cast)
        self.views: list = []  # per storage: a flat byte memoryview of wire[s]
        self.casts: list = []  # storages whose bytes are cast after the transfer
        self.hashers: dict = {}  # storage -> xxh3_64 of its wire bytes so far
        self.moved = 0
        self.link_failed = False
        # Chain relay: {rank, message, reason} of the first forward that failed (see ``forward``).
        self.forward_failed: dict | None = None
        self.transfer: tuple[bytes, list] | None = None  # the id's 8 bytes, the ranks sending it

    # ---- hooks ----

    def targets(self, incoming: dict, paths) -> list:
        return []

    def fresh(self, s: int, nbytes: int):
        return mmap.mmap(-1, nbytes) if nbytes >= MAPPED_MIN else bytearray(nbytes)

    def in_place(self, s: int, binding: dict):
        raise RuntimeError(f"storage {s} is bound in place, but this host has no targets")

    def cast(self, s: int, binding: dict, staging, target):
        convert(binding["cast_from"], staging, binding["dtype"], target)

    # ---- the process group, with link failures noted ----

    def _pg(self, f, *args):
        try:
            return f(*args)
        except PgError:
            self.link_failed = True
            raise

    def _skip(self, op: dict, skipped: int, n: int) -> int:
        """Counts a stale message (``n`` bytes) skipped while waiting for ``op``'s."""
        self.log.debug(
            f"skipped a stale message of {n} bytes, tag {op['tag']} from rank {op['from']}"
        )
        if skipped + 1 > MAX_STALE:
            raise RuntimeError(
                f"TooManyStale: skipped {skipped} stale messages waiting for message {op['message']}"
            )
        return skipped + 1

    def _whole(self, op: dict) -> bytes:
        """The next message with ``op``'s tag, whatever its length (up to what a stale message can be)."""
        cap = max(int(op["len"]), MAX_STALE_LEN)
        return self._pg(self.pg.recv_bytes, op["from"], op["tag"], cap, self.timeout)

    # ---- the receive loop's host ----

    def _note_sender(self, op: dict):
        """Notes the transfer id ``op`` waits for and the rank it comes from (``forget_failed``)."""
        if op.get("prefix") is None:
            return
        if self.transfer is None:
            self.transfer = (pgt_abi.prefix_bytes(op["prefix"]), [])
        if op["from"] not in self.transfer[1]:
            self.transfer[1].append(op["from"])

    def forget_failed(self):
        """After a failed receive: tells the process group that no receive will want what the
        failed transfer still sends (PROTOCOL.md §12), so that its late messages are dropped, not
        stashed until the stash is full. A group without ``forget_prefix`` is left as it is."""
        forget = getattr(self.pg, "forget_prefix", None)
        if self.transfer is None or forget is None:
            return
        prefix, senders = self.transfer
        for r in senders:
            forget(r, prefix)

    def recv_bytes(self, op: dict) -> bytes:
        self._note_sender(op)
        skipped = 0
        while True:
            data = self._whole(op)
            if not is_stale(op, data):
                break
            skipped = self._skip(op, skipped, len(data))
        if len(data) > int(op["len"]):
            raise LengthMismatch(
                f"message with tag {op['tag']} from rank {op['from']} has {len(data)} bytes, more than the limit of {op['len']}"
            )
        self.log.debug(f"{op['kind']}: {len(data)} bytes, tag {op['tag']} from rank {op['from']}")
        return data

    def bind(self, incoming: dict, paths) -> list:
        self.incoming = incoming
        self.log.debug(
            f"metadata: {len(incoming['storages'])} storages, {incoming['total_bytes']} bytes, "
            f"{len(incoming['plan'])} messages"
        )
        return self.targets(incoming, paths)

    def bound(self, incoming: dict, bindings: list):
        self.bindings = bindings
        needed = sum(
            int(ref["nbytes"])
            for b, ref in zip(bindings, incoming["storages"], strict=True)
            if b["dest"] == "fresh" or b["cast_from"] is not None or self.staged
        )
        if needed > self.memory_budget:
            raise MemoryBudget(needed, self.memory_budget)
        for s, (b, ref) in enumerate(zip(bindings, incoming["storages"], strict=True)):
            if b["dest"] == "fresh":
                if b["cast_from"] is not None:
                    raise RuntimeError(f"unexpected binding {b}: a fresh storage is never cast")
                buf = self.fresh(s, int(b["nbytes"]))
                self.wire.append(buf)
                self.dest.append(buf)
            elif b["cast_from"] is None and self.staged:  # copied in once verified
                self.dest.append(self.in_place(s, b))
                self.wire.append(self.fresh(s, int(b["nbytes"])))
                self.staged_storages.append(s)
            elif b["cast_from"] is None:
                buf = self.in_place(s, b)
                self.wire.append(buf)
                self.dest.append(buf)
            else:  # the wire bytes in staging, cast into the target once verified
                self.dest.append(self.in_place(s, b))
                self.wire.append(self.fresh(s, int(ref["nbytes"])))
                self.casts.append(s)
        self.views = [memoryview(b).cast("B") for b in self.wire]
        for s, (v, ref) in enumerate(zip(self.views, incoming["storages"], strict=True)):
            if len(v) != int(ref["nbytes"]):
                raise RuntimeError(
                    f"storage {s}: the host's buffer has {len(v)} bytes, the wire {ref['nbytes']}"
                )
        self.log.debug(f"bound {len(self.wire)} storages ({len(self.casts)} cast)")

    def _parts(self, segments: list) -> list:
        return [
            self.views[s["storage"]][int(s["offset"]) : int(s["offset"]) + int(s["len"])]
            for s in segments
        ]

    def recv_data(self, op: dict, segments: list):
        self._note_sender(op)
        parts = self._parts(segments)
        prefix, skipped = bytearray(PREFIX_LEN), 0
        while True:
            try:
                # The prefix into its own 8 bytes, the rest straight into the storages.
                self._pg(self.pg.recv_into, op["from"], op["tag"], [prefix, *parts], self.timeout)
                if not is_stale(op, prefix):
                    break
                n = int(op["len"])  # its bytes in the storages are overwritten by the next
            except LengthMismatch:
                # Another length: stale (skip it), or this transfer's (the transfer fails).
                self.link_failed = False  # the message is still first in line: not a broken link
                whole = self._whole(op)
                if not is_stale(op, whole):
                    self.link_failed = True
                    raise
                n = len(whole)
            skipped = self._skip(op, skipped, n)
        self.moved += int(op["len"]) - PREFIX_LEN
        self.events.append(("landed", op["message"]))
        if op["hash"]:
            digests = []
            for s, part in zip(segments, parts, strict=True):
                h = self.hashers.get(s["storage"])
                if h is None:
                    h = self.hashers[s["storage"]] = xxhash.xxh3_64()
                h.update(part)
                if s["completes"]:  # the storage's last bytes: its digest is done
                    digests.append(self.hashers.pop(s["storage"]).intdigest())
            self.events.append(("digests", op["message"], digests))
        self.log.debug(f"data message {op['message']}: {op['len']} bytes, tag {op['tag']}")

    def forward(self, op: dict, payload):
        """Relays a message down the chain. A failed forward fails no receive (pgt-host's
        ``TransferStats::forward_failed``): this rank's checkpoint goes on to its verified end, the
        later forwards are skipped, and the ranks downstream fail naming this link."""
        if self.forward_failed is None:
            if isinstance(payload, bytes):  # the trailer as received, prefix included
                parts = [payload]
            else:  # a data message: the prefix, then the segments' bytes as received
                parts = [pgt_abi.prefix_bytes(op["prefix"]), *self._parts(payload)]
            try:
                self.pg.send(op["to"], op["tag"], parts, self.timeout)
                self.log.debug(
                    f"forwarded message {op['message']} ({op['len']} bytes) to rank {op['to']}"
                )
            except PgError as e:
                self.forward_failed = {"rank": op["to"], "message": op["message"], "reason": str(e)}
                self.log.warn(
                    f"forwarding message {op['message']} to rank {op['to']} failed; this rank's "
                    f"receive goes on, the ranks downstream fail: {type(e).__name__}: {e}"
                )
        self.events.append(("forwarded", op["message"]))

    def next_event(self, wait: bool):
        return self.events.popleft() if self.events else None

    def discard(self, op: dict) -> bool:
        """Receives a message a failed transfer still sends and throws it away (skipping stale ones);
        False when the link failed (a timeout, a closed peer: the next receive skips what is left by
        its prefix instead), or fails now."""
        if self.link_failed:
            return False
        try:
            skipped = 0
            while is_stale(op, data := self._whole(op)):
                skipped = self._skip(op, skipped, len(data))
        except (PgError, RuntimeError):
            return False
        self.log.debug(f"drained message {op['message']}, tag {op['tag']} from rank {op['from']}")
        return True

    # ---- after the loop ----

    def not_in_target(self) -> list:
        """In-place storages whose landed bytes are not in their target: staged, or cast later."""
        return sorted(self.casts + self.staged_storages)

    def run(self, engine) -> dict:
        """``receive(engine, self)``, then the casts and the staged copies: the verified result."""
        result = receive(engine, self)
        self.finish_casts()
        self.finish_staged()
        return result

    def finish_staged(self):
        for s in self.staged_storages:
            memoryview(self.dest[s]).cast("B")[:] = memoryview(self.wire[s]).cast("B")
            self.wire[s] = self.dest[s]  # the staging buffer is dropped
        self.staged_storages = []

    def finish_casts(self):
        for s in self.casts:
            self.cast(s, self.bindings[s], self.wire[s], self.dest[s])
            self.wire[s] = self.dest[s]  # the staging buffer is dropped


class TcpHost(ReceiveHost):
    """``python -m pgt recv``'s host: every storage fresh; the key paths kept, to name the output."""

    def __init__(self, pg: TcpGroup, timeout: float, log: Log, memory_budget: int | None = None):
        super().__init__(pg, timeout, log, memory_budget)
        self.paths: list = []

    def targets(self, incoming: dict, paths) -> list:
        self.paths = paths()
        return []

    @property
    def buffers(self) -> list:
        return self.dest


class Received:
    """What a finished transfer gives: the module's result, the key paths and the storages' bytes."""

    def __init__(self, result: dict, paths: list, buffers: list, seconds: float, nbytes: int):
        self.result, self.paths, self.buffers = result, paths, buffers
        self.seconds, self.nbytes = seconds, nbytes


def receive_checkpoint(
    pg: TcpGroup,
    pgt: Pgt,
    src: int,
    expected_step: int | None,
    timeout: float,
    log: Log,
    limits: dict | None = None,
    memory_budget: int | None = None,
) -> Received:
    """Receives one checkpoint from rank ``src`` over the process group. Raises PgtError (the module's
    named error), PgError (the process group's) or MemoryBudget."""
    start = time.monotonic()
    engine = pgt.receiver(rank=pg.rank, source=src, expected_step=expected_step, limits=limits)
    host = TcpHost(pg, timeout, log, memory_budget)
    result = host.run(engine)
    return Received(result, host.paths, host.buffers, time.monotonic() - start, host.moved)


# ---- turning the result into tensors ----


def dotted_name(path: list) -> str:
    """The name a leaf at ``path`` is saved under in a safetensors file, as pgt-host's
    ``dotted_name``: keys and indices joined by '.', '<root>' for the empty path."""
    if not path:
        return "<root>"
    out = []
    for e in path:
        out.append(str(e["key"]) if "key" in e else str(e.get("int_key", e.get("index"))))
    return ".".join(out)


def view_bytes(buf, layout: dict):
    """The elements of the view ``layout`` of storage ``buf`` in row-major order (a memoryview slice when
    the view is dense, else a gathered copy)."""
    es = ELEMENT_SIZE[layout["dtype"]]
    shape = [int(d) for d in layout["shape"]]
    stride = [int(d) for d in layout["stride"]]
    off = int(layout["storage_offset"])
    numel = math.prod(shape)
    if numel == 0:
        return b""
    dense, expect = True, 1
    for d in reversed(range(len(shape))):
        if shape[d] != 1 and stride[d] != expect:
            dense = False
            break
        expect *= shape[d]
    mv = memoryview(buf)
    if dense:
        return mv[off * es : (off + numel) * es]
    if np is not None:
        base = np.frombuffer(buf, dtype=np.uint8)[off * es :]
        v = np.lib.stride_tricks.as_strided(
            base, shape + [es], [s * es for s in stride] + [1], writeable=False
        )
        return np.ascontiguousarray(v).tobytes()
    out = bytearray()
    inner, istride = shape[-1], stride[-1]
    for idx in itertools.product(*[range(d) for d in shape[:-1]]):
        first = off + sum(i * s for i, s in zip(idx, stride[:-1], strict=True))
        if istride == 1:
            out += mv[first * es : (first + inner) * es]
        else:
            for j in range(inner):
                e = first + j * istride
                out += mv[e * es : (e + 1) * es]
    return bytes(out)


def value_repr(v: dict) -> str:
    """A value leaf as a safetensors metadata string (as pgt's safetensors_io::value_repr)."""
    t = v["type"]
    if t == "none":
        return "null"
    if t == "bool":
        return "true" if v["value"] else "false"
    if t == "int":
        return str(v["value"])
    if t == "float":
        f = struct.unpack("<d", int(v["bits"], 16).to_bytes(8, "little"))[0]
        if f != f:
            return "NaN"
        if f in (math.inf, -math.inf):
            return "inf" if f > 0 else "-inf"
        return json.dumps(f)
    if t == "str":
        return v["value"]
    return "0x" + v["hex"]


def tensors_of(rec: Received):
    """(name, dtype, shape, bytes) for every tensor of the result, and the metadata map — named and laid
    out as `pgt recv` writes a safetensors file (see host/src/safetensors_io.rs; its JSON entries have
    sorted keys, as serde_json's)."""
    res = rec.result
    paths = rec.paths
    tree = res["tree"]
    root_keys = tree[0].get("dict", []) if tree and isinstance(tree[0], dict) else []
    write_metadata = METADATA_KEY in root_keys
    tensors, metadata, names = [], {}, set()

    def meta(key, value):
        if key in metadata:
            raise ValueError(f"{key}: two values would share this __metadata__ entry")
        metadata[key] = value

    def add(name, layout, storage):
        if name in names:
            raise ValueError(f"{name}: two tensors would share this name")
        names.add(name)
        tensors.append(
            (
                name,
                layout["dtype"],
                [int(d) for d in layout["shape"]],
                view_bytes(rec.buffers[storage], layout),
            )
        )

    storage = 0
    for leaf, path in zip(res["leaves"], paths, strict=True):
        name = dotted_name(path)
        k = leaf["kind"]
        if k == "value":
            if len(path) > 1 and path[0].get("key") == METADATA_KEY:
                meta(dotted_name(path[1:]), value_repr(leaf["value"]))
            else:
                meta(name, value_repr(leaf["value"]))
        elif k == "tensor":
            add(name, leaf["layout"], storage)
            storage += 1
        elif k == "dtensor":
            spec = leaf["spec"]
            meta(
                f"pgt.dtensor.{name}",
                json.dumps(
                    {
                        "global_shape": [int(d) for d in spec["global_shape"]],
                        "mesh": [int(d) for d in spec["mesh"]["shape"]],
                        "placements": spec["placements"],
                    },
                    separators=(",", ":"),
                    sort_keys=True,
                ),
            )
            add(name, leaf["local"], storage)
            storage += 1
        else:  # sharded_tensor
            g = leaf["global"]
            meta(
                f"pgt.sharded.{name}",
                json.dumps(
                    {
                        "global_size": [int(d) for d in g["global_size"]],
                        "dtype": g["dtype"],
                        "local_shards": [
                            {
                                "offsets": [int(x) for x in s["meta"]["offsets"]],
                                "sizes": [int(x) for x in s["meta"]["sizes"]],
                                "placement": s["meta"]["placement"],
                            }
                            for s in leaf["local_shards"]
                        ],
                    },
                    separators=(",", ":"),
                    sort_keys=True,
                ),
            )
            for i, shard in enumerate(leaf["local_shards"]):
                add(f"{name}.shard{i}", shard["layout"], storage)
                storage += 1
    if res["step"] is not None:
        metadata[STEP_KEY] = str(res["step"])
    return tensors, (metadata if write_metadata or metadata else None)


def _atomic_write(path: Path, write):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_safetensors(path: Path, tensors, metadata: dict | None):
    """The safetensors format by hand: u64 LE header size, JSON header (padded with spaces to 8 bytes),
    then the tensors' bytes."""
    header, offset = {}, 0
    if metadata is not None:
        header[METADATA_KEY] = metadata
    for name, dtype, shape, data in tensors:
        st = SAFETENSORS_NAME.get(dtype)
        if st is None:
            raise ValueError(f"{name}: dtype {dtype} has no safetensors name (write --npz instead)")
        header[name] = {"dtype": st, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)

    def write(f):
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for _, _, _, data in tensors:
            f.write(data)

    _atomic_write(path, write)


def write_npz(path: Path, tensors, metadata: dict | None):
    if np is None:
        raise RuntimeError("--npz needs numpy (pip install -r requirements.txt)")
    arrays = {}
    for name, dtype, shape, data in tensors:
        arr = np.frombuffer(data, dtype=np.dtype(NUMPY_DTYPE[dtype])).reshape(shape)
        arrays[name] = arr
    arrays["__pgt_dtypes__"] = np.array(json.dumps({n: d for n, d, _, _ in tensors}))
    if metadata is not None:
        arrays[METADATA_KEY] = np.array(json.dumps(metadata))
    _atomic_write(path, lambda f: np.savez(f, **arrays))


# ---- command line ----


def add_group_args(p: argparse.ArgumentParser):
    """The flags every subcommand that joins a job has (each also read from its variable)."""
    p.add_argument("--rank", type=int, help="this process's rank (RANK)")
    p.add_argument("--world-size", type=int, help="number of ranks in the job (WORLD_SIZE)")
    p.add_argument("--master-addr", help="host of rank 0's rendezvous store (MASTER_ADDR)")
    p.add_argument("--master-port", type=int, help="port of the rendezvous store (MASTER_PORT)")
    p.add_argument("--token", help="job token (prefer PGT_TOKEN: flags show in ps)")
    p.add_argument("--listen-host", help="interface to listen on for peers (PGT_LISTEN_HOST)")
    p.add_argument(
        "--setup-timeout",
        type=float,
        help="group formation timeout in seconds (PGT_TIMEOUT_SECS, default 300)",
    )
    p.add_argument(
        "--wasm",
        type=Path,
        help="pgt_wasm.wasm (default $PGT_WASM_MODULE, else the module inside the package)",
    )
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("-v", "--verbose", action="count", default=0)


def load_module(path: Path | None) -> Pgt:
    """The wasm module, capped and of this host's ABI version; RuntimeError/FileNotFoundError else."""
    pgt = Pgt.load(path)
    # As WasmEngine's default cap: a runaway guest traps.
    pgt.store.set_limits(memory_size=2 << 30)
    abi = pgt.abi_version()
    if abi != pgt_abi.ABI_VERSION:
        raise RuntimeError(
            f"{path or pgt_abi.module_path()} speaks raw ABI {abi}; "
            f"this host speaks {pgt_abi.ABI_VERSION}"
        )
    return pgt


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m pgt recv",
        description="Receive a checkpoint from `pgt send` as one rank of the job (pgt's wasm module runs the protocol).",
        epilog="Flags default to the torch-style environment: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, "
        "PGT_TOKEN, PGT_TIMEOUT_SECS (setup timeout), PGT_LISTEN_HOST, PGT_WASM_MODULE.",
    )
    p.add_argument("--out", type=Path, help="write the checkpoint here as a safetensors file")
    p.add_argument("--npz", type=Path, help="write the checkpoint here as a numpy .npz file")
    p.add_argument("--src", type=int, default=0, help="rank that sends (default 0)")
    p.add_argument("--expect-step", type=int, help="refuse a checkpoint of another training step")
    p.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="per-operation timeout in seconds (default 120)",
    )
    p.add_argument(
        "--memory-budget",
        type=parse_size,
        help="the most memory the checkpoint's storages may take (e.g. 8GiB), checked before "
        "anything is allocated (default: half of physical memory)",
    )
    add_group_args(p)
    args = p.parse_args(argv)
    if args.out is None and args.npz is None:
        p.error("give --out FILE.safetensors and/or --npz FILE.npz")
    return args


def options_from(args) -> TcpOptions:
    env = dict(os.environ)
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")
    for flag, var in [
        ("rank", "RANK"),
        ("world_size", "WORLD_SIZE"),
        ("master_addr", "MASTER_ADDR"),
        ("master_port", "MASTER_PORT"),
        ("token", "PGT_TOKEN"),
        ("listen_host", "PGT_LISTEN_HOST"),
        ("setup_timeout", "PGT_TIMEOUT_SECS"),
    ]:
        v = getattr(args, flag)
        if v is not None:
            env[var] = str(v)
    return TcpOptions.from_env(env)


def main(argv=None) -> int:
    args = parse_args(argv)
    log = Log(args.verbose, args.quiet)
    for out in (args.out, args.npz):
        if out is not None and not (out.parent if str(out.parent) else Path(".")).is_dir():
            print(
                f"pgt recv: error: cannot write {out}: {out.parent} is not a directory",
                file=sys.stderr,
            )
            return EXIT_SETUP
    if args.npz is not None and np is None:
        print(
            "pgt recv: error: --npz needs numpy (pip install -r requirements.txt)", file=sys.stderr
        )
        return EXIT_SETUP
    try:
        opts = options_from(args)
        pgt = load_module(args.wasm)
    except (PgError, FileNotFoundError, RuntimeError) as e:
        print(f"pgt recv: error: {e}", file=sys.stderr)
        return EXIT_SETUP
    pg = None
    try:
        pg = TcpGroup.join(opts, log=log.debug)
        rec = receive_checkpoint(
            pg, pgt, args.src, args.expect_step, args.timeout, log, memory_budget=args.memory_budget
        )
    except PgtError as e:
        print(
            f"pgt recv: error: receiving from rank {args.src}: pgt error {e.name}: {e.message}",
            file=sys.stderr,
        )
        return EXIT_PROTOCOL
    except PgError as e:
        what = (
            f"rank {opts.rank} could not join the job at {opts.master_addr}:{opts.master_port}"
            if pg is None
            else f"receiving from rank {args.src}"
        )
        print(f"pgt recv: error: {what}: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_GROUP
    except (wasmtime.Trap, wasmtime.WasmtimeError, RuntimeError) as e:
        # a trap is a guest bug or the memory cap; a RuntimeError an order this host cannot follow
        print(
            f"pgt recv: error: receiving from rank {args.src}: {type(e).__name__}: {e}",
            file=sys.stderr,
        )
        return EXIT_PROTOCOL
    finally:
        if pg is not None:
            pg.close()
    try:
        tensors, metadata = tensors_of(rec)
        if args.out is not None:
            write_safetensors(args.out, tensors, metadata)
        if args.npz is not None:
            write_npz(args.npz, tensors, metadata)
    except (ValueError, OSError) as e:
        print(f"pgt recv: error: writing the checkpoint: {e}", file=sys.stderr)
        return EXIT_SETUP
    step = rec.result["step"]
    outs = " and ".join(str(p) for p in (args.out, args.npz) if p is not None)
    log.info(
        f"received {outs} from rank {args.src} (step {'none' if step is None else step}): {rec.nbytes} bytes, "
        f"{len(tensors)} tensors, {rec.seconds:.3f} s, {rec.nbytes / max(rec.seconds, 1e-9) / 1e9:.2f} GB/s"
    )
    return 0
