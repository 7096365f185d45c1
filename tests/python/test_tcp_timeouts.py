"""pgt.tcp.TcpGroup receives that time out part way through a frame (PROTOCOL.md §12): the frame is
finished by the next receive — stashed, dropped, or, for the receive's own message, dropped and
reported as PgTimeoutMidMessage — so the connection stays usable. A peer that closes in the middle of
a frame still makes the connection unusable."""

from __future__ import annotations

import socket

import pytest

import pgt.tcp
from pgt.tcp import PeerClosed, PgError, PgTimeout, PgTimeoutMidMessage, TcpGroup, frame_header

T = 10.0
SHORT = 0.2


@pytest.fixture
def conn():
    """Rank 1's group with rank 0 on the raw other end of a socket pair."""
    raw, ours = socket.socketpair()
    g = TcpGroup(1, 2, {0: ours})
    yield g, raw
    g.close()
    raw.close()


def frame(tag: int, payload: bytes) -> bytes:
    return bytes(frame_header(tag, len(payload))) + payload


def test_a_timeout_in_the_own_payload_drops_the_message_and_keeps_the_connection(conn):
    g, raw = conn
    f = frame(5, bytes([9]) * 100)
    raw.sendall(f[:50])
    with pytest.raises(PgTimeoutMidMessage, match=f"{50 - 16} of the message's 100 bytes"):
        g.recv_bytes(0, 5, 100, SHORT)
    raw.sendall(f[50:] + frame(5, b"next"))
    assert g.recv_bytes(0, 5, 100, T) == b"next"
    g.send(0, 5, [b"x"], T)
    assert raw.recv(64) == bytes(frame_header(5, 1)) + b"x"


def test_a_timeout_in_a_frame_header_keeps_the_frame(conn):
    g, raw = conn
    f = frame(6, b"abc")
    raw.sendall(f[:7])
    with pytest.raises(PgTimeout) as e:
        g.recv_bytes(0, 6, 3, SHORT)
    assert not isinstance(e.value, PgTimeoutMidMessage)
    raw.sendall(f[7:])
    assert g.recv_bytes(0, 6, 3, T) == b"abc"


def test_a_frame_being_stashed_at_a_timeout_is_finished_by_the_next_receive(conn):
    g, raw = conn
    other = frame(2, bytes([2]) * 1000)
    raw.sendall(other[:300])
    with pytest.raises(PgTimeout) as e:
        g.recv_bytes(0, 1, 9, SHORT)
    assert not isinstance(e.value, PgTimeoutMidMessage)
    raw.sendall(other[300:] + frame(1, b"one"))
    assert g.recv_bytes(0, 2, 1000, T) == bytes([2]) * 1000
    assert g.recv_bytes(0, 1, 9, T) == b"one"
    assert g.peers[0].stashed == 0


def test_a_forgotten_frame_being_dropped_at_a_timeout_is_dropped_by_the_next_receive(
    conn, monkeypatch
):
    monkeypatch.setattr(pgt.tcp, "STASH_LIMIT", 1 << 10)
    g, raw = conn
    prefix = b"deadbeef"
    g.forget_prefix(0, prefix)
    # Far above the stash limit it is never stashed; half of it fits a socket pair's buffer.
    late = frame(3, prefix + bytes([7]) * (128 << 10))
    raw.sendall(late[: 64 << 10])
    for _ in range(2):
        with pytest.raises(PgTimeout):
            g.recv_bytes(0, 1, 9, SHORT)
    raw.sendall(late[64 << 10 :] + frame(1, b"one"))
    assert g.recv_bytes(0, 1, 9, T) == b"one"
    assert g.peers[0].stashed == 0


def test_a_peer_closing_in_the_middle_of_a_frame_makes_the_connection_unusable(conn):
    g, raw = conn
    raw.sendall(frame(2, b"ab")[:17])
    raw.close()
    with pytest.raises(PeerClosed):
        g.recv_bytes(0, 2, 2, T)
    with pytest.raises(PgError, match="unusable"):
        g.recv_bytes(0, 2, 2, T)
