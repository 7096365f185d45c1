"""The send loop (pgt-core's ``drive::send``): the module's sender decides, a host moves bytes.

    send(pgt, host, metadata, storages)     # storages[i]: the bytes of storage i (buffer protocol)

The module validates the metadata, plans the messages and says, one op at a time, which message goes
to which rank under which tag. This loop builds each message from the plan — header, metadata and
trailer are the module's bytes; a data message is the transfer id's 8-byte prefix then the segments'
storage bytes, as memoryview slices (no copy) — and hands it to ``host.send(op, parts)``. When the
op says so it hashes the segments with XXH3-64, one hasher per storage, and reports the digests of the
storages each message completes, once per message (the trailer carries them).

A host has ``send(op, parts)``, which sends one protocol message (``parts`` concatenated, ``op["len"]``
bytes in all) to ``op["to"]`` under ``op["tag"]``, and may have ``flush()``, called before the loop
returns, which waits until everything sent has left (a host that sends asynchronously).
"""

from __future__ import annotations

import contextlib
import secrets

import xxhash

from .abi import Pgt, PgtError, prefix_bytes


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
    bad metadata, a storage of the wrong size) before anything is sent, or the host's error."""
    transfer_id = secrets.randbits(64) if transfer_id is None else transfer_id
    views = storage_views(storages)
    sender = pgt.sender(metadata, digests=digests, transfer_id=transfer_id, limits=limits)
    try:
        _check_sizes(pgt, sender, views)
        hashers: dict[int, xxhash.xxh3_64] = {}
        while True:
            op = sender.poll()
            if op["type"] == "done":
                break
            if op["type"] != "send":  # wait_digests: every digest is reported as its message goes
                raise RuntimeError(f"the sender waits for digests it was given: {op}")
            if op["kind"] != "data":
                host.send(op, [sender.bytes(op["message"])])
                continue
            parts: list = [prefix_bytes(op["prefix"])]
            done = []
            for seg in sender.plan[op["message"]]["segments"]:
                st, off, n = seg["storage"], int(seg["offset"]), int(seg["len"])
                part = views[st][off : off + n]
                if op["hash"]:
                    h = hashers.get(st)
                    if h is None:
                        h = hashers[st] = xxhash.xxh3_64()
                    h.update(part)
                    if seg["completes"]:
                        done.append(hashers.pop(st).intdigest())
                parts.append(part)
            host.send(op, parts)
            if op["hash"]:
                sender.handle_digests(op["message"], done)
        flush = getattr(host, "flush", None)
        if flush is not None:
            flush()
    finally:
        with contextlib.suppress(PgtError):
            sender.drop()
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
