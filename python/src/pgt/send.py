"""The send loop (pgt-core's ``drive::send``): the module's sender decides, a host moves bytes.

    send(pgt, host, metadata, storages)     # storages[i]: the bytes of storage i (buffer protocol)

The module validates the metadata, plans the messages and says, one op at a time, which message goes
to which rank under which tag. This loop builds each message from the plan — header, metadata and
trailer are the module's bytes; a data message is the transfer id's 8-byte prefix then the segments'
storage bytes, as memoryview slices (no copy) — and hands it to ``host.send(op, parts)``. When the
op says so it hashes the segments with XXH3-64, one hasher per storage, in a thread while the host
sends (xxhash releases the GIL), and reports the digests of the storages each message completes, once
per message, before the trailer (which carries them).

A host has ``send(op, parts)``, which sends one protocol message (``parts`` concatenated, ``op["len"]``
bytes in all) to ``op["to"]`` under ``op["tag"]``, and may have ``flush()``, called before the loop
returns, which waits until everything sent has left (a host that sends asynchronously).

A host whose sends to one rank fail independently of the others (pgt's TCP group: a connection per
peer) names the errors that mean "this destination is gone" in ``isolable`` (a tuple of exception
types). Given the ``destinations``, a failed destination then stops only its own stream, as in
pgt-host (PROTOCOL.md §3, *When a destination fails*): the others run to the end and the send raises
``DestinationsFailed``; in chain fan-out the destinations after a failed one are cut off with it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import secrets

import xxhash

from .abi import Pgt, PgtError, prefix_bytes
from .tcp import PgError, TcpGroup

# A data message of at least this many bytes is hashed in a thread while it is sent; a shorter one at
# once (each turn of a thread at the GIL costs more than hashing a few small segments).
HASH_THREAD_MIN = 4 << 20


class DestinationsFailed(RuntimeError):
    """Some destinations of a send failed and the rest completed (pgt-host's
    ``Error::Destinations``). ``completed``: the ranks sent everything the sender sends them;
    ``failed``: {rank: the error}, in the order they failed; ``cut_off``: chain fan-out, the ranks
    downstream of a failed one (their data would have come through it; their receives fail)."""

    def __init__(self, completed: list[int], failed: dict, cut_off: list[int]):
        self.completed, self.failed, self.cut_off = list(completed), dict(failed), list(cut_off)
        why = "; ".join(f"rank {r}: {e}" for r, e in self.failed.items())
        super().__init__(
            f"pgt: send: {len(self.failed)} destination(s) failed ({why}); "
            f"cut off: {self.cut_off}; completed: {self.completed}"
        )


class _Outcomes:
    """Which destinations failed, and where that leaves the send (pgt-core's policy, asked of the
    module: ``Sender.destination_outcome``)."""

    def __init__(self, sender):
        self.sender = sender
        self.failed: dict = {}
        self.outcome = sender.destination_outcome([])

    def fail(self, rank: int, error: BaseException):
        """Records ``rank``'s failure; re-raises the first failure when no destination is left."""
        self.failed[rank] = error
        self.outcome = self.sender.destination_outcome(list(self.failed))
        if not self.outcome["live"]:
            raise next(iter(self.failed.values()))

    def error(self) -> DestinationsFailed | None:
        if not self.failed:
            return None
        return DestinationsFailed(self.outcome["live"], self.failed, self.outcome["cut_off"])


class TcpSendHost:
    """``send``'s host over pgt's ``TcpGroup``: each protocol message is one frame (TCP.md). A
    connection per peer, so a peer's failure (closed, timed out) stops only its own stream."""

    isolable = (PgError,)

    def __init__(self, pg: TcpGroup, timeout: float):
        self.pg, self.timeout = pg, timeout

    def send(self, op: dict, parts: list):
        self.pg.send(op["to"], op["tag"], parts, self.timeout)


def storage_views(storages) -> list[memoryview]:
    """Each storage as a flat byte memoryview (no copy)."""
    out = []
    for s in storages:
        m = s if isinstance(s, memoryview) else memoryview(s)
        out.append(m.cast("B") if m.format != "B" or m.ndim != 1 else m)
    return out


def send(
    pgt: Pgt,
    host,
    metadata: bytes,
    storages,
    *,
    digests: bool = True,
    transfer_id: int | None = None,
    limits: dict | None = None,
) -> int:
    """Sends one checkpoint: ``metadata`` (postcard ``Metadata``, ``pgt.metadata.encode``) and the bytes
    of its storages, in storage order (``pgt.abi.Pgt.decode(...)["storages"]``: each tensor leaf's
    storage, each local shard's). Returns the transfer id. Raises PgtError (the module's named error:
    bad metadata, a storage of the wrong size) before anything is sent, or the host's error; with a
    host whose ``isolable`` errors stop one destination's stream only, ``DestinationsFailed`` when
    some destinations failed and the others completed."""
    transfer_id = secrets.randbits(64) if transfer_id is None else transfer_id
    views = storage_views(storages)
    sender = pgt.sender(metadata, digests=digests, transfer_id=transfer_id, limits=limits)
    hashers: dict[int, xxhash.xxh3_64] = {}
    pending: collections.deque = collections.deque()  # (message, future of its digests)

    def hash_message(segments: list) -> list:
        # In the hashing thread (xxhash lets go of the GIL): the digests of the storages completed.
        done = []
        for seg in segments:
            st, off, n = seg["storage"], int(seg["offset"]), int(seg["len"])
            if off == 0 and seg["completes"]:  # a whole storage: hashed in one call
                done.append(xxhash.xxh3_64_intdigest(views[st][:n]))
                continue
            h = hashers.get(st)
            if h is None:
                h = hashers[st] = xxhash.xxh3_64()
            h.update(views[st][off : off + n])
            if seg["completes"]:
                done.append(hashers.pop(st).intdigest())
        return done

    def report(block: bool):
        while pending and (block or pending[0][1].done()):
            m, job = pending.popleft()
            sender.handle_digests(m, job.result())

    isolable = getattr(host, "isolable", ())
    outcomes = _Outcomes(sender) if isolable else None

    def deliver(op: dict, parts: list):
        if outcomes is None:
            host.send(op, parts)
            return
        if op["to"] in outcomes.failed:
            return  # that stream stopped; the digests are still taken for the others' trailers
        try:
            host.send(op, parts)
        except isolable as e:
            outcomes.fail(op["to"], e)

    pool = None
    try:
        _check_sizes(pgt, sender, views)
        while True:
            report(False)
            op = sender.poll()
            if op["type"] == "done":
                break
            if op["type"] != "send":  # wait_digests: the trailer is next
                if not pending:
                    raise RuntimeError(f"the sender waits for digests it was given: {op}")
                report(True)
                continue
            if op["kind"] != "data":
                deliver(op, [sender.bytes(op["message"])])
                continue
            segments = sender.plan[op["message"]]["segments"]
            parts: list = [prefix_bytes(op["prefix"])]
            for seg in segments:
                off = int(seg["offset"])
                parts.append(views[seg["storage"]][off : off + int(seg["len"])])
            if op["hash"] and (pending or int(op["len"]) >= HASH_THREAD_MIN):
                if pool is None:  # hashed while the host sends
                    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pgt-hash")
                pending.append((op["message"], pool.submit(hash_message, segments)))
            elif op["hash"]:
                sender.handle_digests(op["message"], hash_message(segments))
            deliver(op, parts)
        flush = getattr(host, "flush", None)
        if flush is not None:
            flush()
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        with contextlib.suppress(PgtError):
            sender.drop()
    failure = outcomes.error() if outcomes is not None else None
    if failure is not None:
        raise failure
    return transfer_id


def _check_sizes(pgt: Pgt, sender, views: list[memoryview]) -> None:
    """Every storage the plan reads has exactly its announced size: the plan's segments cover each
    storage from 0 to its end, so the largest segment end is its size."""
    ends: dict[int, int] = {}
    for m in sender.plan:
        for seg in m["segments"]:
            st = seg["storage"]
            ends[st] = max(ends.get(st, 0), int(seg["offset"]) + int(seg["len"]))
    for st, end in ends.items():
        if st >= len(views):
            raise ValueError(f"the metadata has storage {st}, but {len(views)} storages were given")
        if len(views[st]) != end:
            raise ValueError(f"storage {st} has {len(views[st])} bytes; the metadata says {end}")
