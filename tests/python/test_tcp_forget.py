"""pgt.tcp.TcpGroup.forget_prefix (PROTOCOL.md §12, *Forgetting a failed transfer*): messages of a
forgotten transfer id are dropped from the stash at once and dropped as they arrive afterwards, so a
failed transfer's late data, however large, cannot fill the stash and block the next receive."""

from __future__ import annotations

import secrets
import socket
import threading

import pytest

import pgt.tcp
from pgt.tcp import PgError, PgTimeout, TcpGroup, TcpOptions

LIMIT = 1 << 20
DEAD, LIVE = (7).to_bytes(8, "little"), (9).to_bytes(8, "little")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pair():
    """Rank 0 and rank 1 of a two-rank group (rank 0 hosts the store)."""
    port, token = _free_port(), secrets.token_hex(16).encode()
    groups, errors = {}, []

    def join(rank):
        try:
            groups[rank] = TcpGroup.join(TcpOptions("127.0.0.1", port, rank, 2, token, timeout=30))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=join, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return groups[0], groups[1]


@pytest.fixture
def small_stash(monkeypatch):
    monkeypatch.setattr(pgt.tcp, "STASH_LIMIT", LIMIT)


def _late_data(pg, n_frames: int, size: int):
    """What a failed transfer still sends: data messages with tags 3… and the dead prefix (until the
    receiver closes the connection)."""
    try:
        for i in range(n_frames):
            pg.send(1, 3 + i, [DEAD, bytes([i % 251]) * (size - 8)], 30)
    except PgError:
        pass


def test_late_data_of_a_forgotten_transfer_are_dropped(small_stash):
    a, b = _pair()
    with a, b:
        b.forget_prefix(0, DEAD)

        def send():
            # 8 MiB of late data, 8 times the stash limit, then a live message and the next header.
            _late_data(a, 16, 512 << 10)
            a.send(1, 4, [LIVE, b"kept"], 30)
            a.send(1, 1, [b"the next header"], 30)

        sender = threading.Thread(target=send)
        sender.start()
        assert b.recv_bytes(0, 1, 64, 30) == b"the next header"
        sender.join()
        assert b.peers[0].stashed == len(LIVE) + 4 + 64, "only the live message is stashed"
        assert b.recv_bytes(0, 4, 64, 30) == LIVE + b"kept"
        assert b.peers[0].stashed == 0


def test_without_forgetting_the_stash_fills(small_stash):
    """The failure the forgetting prevents: the same late data block the next header."""
    a, b = _pair()
    with a, b:
        sender = threading.Thread(target=_late_data, args=(a, 16, 512 << 10))
        sender.start()
        with pytest.raises(PgError, match="does not fit the stash"):
            b.recv_bytes(0, 1, 64, 30)
        b.close()  # unblocks the sender
        sender.join()


def test_forgetting_drops_what_is_already_stashed(small_stash):
    a, b = _pair()
    with a, b:
        a.send(1, 3, [DEAD, b"x" * 100], 30)
        a.send(1, 3, [LIVE, b"y" * 10], 30)
        a.send(1, 5, [DEAD], 30)
        a.send(1, 1, [b"h"], 30)
        assert b.recv_bytes(0, 1, 64, 30) == b"h"
        assert len(b.peers[0].stash) == 2
        b.forget_prefix(0, DEAD)
        assert b.peers[0].stash == {3: [LIVE + b"y" * 10]}
        assert b.peers[0].stashed == 18 + 64
        assert b.recv_bytes(0, 3, 64, 30) == LIVE + b"y" * 10


class _FailingGroup:
    """A group that hands over a header, then times out; records what it is told to forget."""

    rank = 1

    def __init__(self):
        self.forgotten = []

    def recv_bytes(self, src, tag, max_len, timeout):
        if tag == 1:
            return bytes(32)
        raise PgTimeout(f"timed out waiting for tag {tag} from rank {src}")

    def forget_prefix(self, src, prefix):
        self.forgotten.append((src, bytes(prefix)))


class _Engine:
    """A receiver that asks for the header, then the metadata of transfer 0x07."""

    def __init__(self):
        op = {"type": "recv", "from": 0, "hash": False}
        self.ops = [
            {**op, "kind": "header", "message": 0, "tag": 1, "len": 32, "prefix": None},
            {**op, "kind": "metadata", "message": 1, "tag": 2, "len": 100, "prefix": "0x7"},
        ]

    def poll(self):
        return self.ops.pop(0)

    def handle_header(self, header):
        pass

    def handle_metadata(self, metadata):
        raise AssertionError("the metadata never arrives")

    def leftover(self):
        return None

    def drop(self):
        pass


def test_a_failed_receive_forgets_its_transfer():
    """pgt.recv.receive: a receive that fails after its header tells the group to forget the id."""
    from pgt.recv import ReceiveHost, receive

    pg = _FailingGroup()
    with pytest.raises(PgTimeout):
        receive(_Engine(), ReceiveHost(pg, 1.0))
    assert pg.forgotten == [(0, DEAD)]
