"""The TCP process group's conformance transcripts (tests/vectors/tcp, specified in TCP.md) against
the Python implementation, python/src/pgt/tcp.py.

For every transcript: each message is rebuilt from the inputs with pgt_tcp's own functions (hello,
mac, frame_header, encode_table) and the MACs are checked with hashlib as well; then the transcript is
replayed over a real socket against pgt_tcp's client and its server (the handshake with the
transcript's nonce, then the registration or the frames through TcpGroup), and what they send must
be the recorded bytes, ending the way the transcript says.

Run: pytest tests/python/test_tcp_transcripts.py
"""

import hashlib
import hmac
import json
import socket
import threading
import time
from pathlib import Path

import pytest

from pgt import tcp as pgt_tcp

TCP = Path(__file__).resolve().parents[1] / "vectors" / "tcp"
TRANSCRIPTS = sorted(TCP.glob("*.json"))
TIMEOUT = 10.0


def load(path):
    return json.loads(path.read_text())


@pytest.fixture(params=TRANSCRIPTS, ids=[p.stem for p in TRANSCRIPTS])
def t(request):
    return load(request.param)


def raw(m) -> bytes:
    return bytes.fromhex(m["hex"])


def of(t, kind):
    return [m for m in t["messages"] if m["message"] == kind]


def token(party) -> bytes:
    return party["token"].encode()


def expected_verdict(t) -> int:
    """The verdict TCP.md's server rules give for the transcript's inputs."""
    c, s = t["client"], t["server"]
    if "forged_proof" in c or c["token"] != s["token"]:
        return pgt_tcp.VERDICT_BAD_PROOF
    if c["purpose"] != s["purpose"]:
        return pgt_tcp.VERDICT_WRONG_PURPOSE
    if c["world"] != s["world"]:
        return pgt_tcp.VERDICT_WORLD_MISMATCH
    if not s["admits"]:
        return pgt_tcp.VERDICT_UNEXPECTED_RANK
    return pgt_tcp.VERDICT_ACCEPTED


def test_there_are_transcripts():
    names = {p.stem for p in TRANSCRIPTS}
    assert {"peer_exchange", "store_registration", "not_a_hello", "bad_proof"} <= names


def test_every_message_from_the_inputs(t):
    c, s = t["client"], t["server"]
    ms = t["messages"]
    ch = raw(ms[0])
    if "forged_hello" in c:  # not a hello: the server answers nothing
        assert ch == bytes.fromhex(c["forged_hello"])
        assert pgt_tcp.parse_hello(ch) is None
        assert len(ms) == 1
        return
    cn, sn = bytes.fromhex(c["nonce"]), bytes.fromhex(s["nonce"])
    assert ch == pgt_tcp.hello(c["purpose"], c["rank"], c["world"], cn)
    assert pgt_tcp.parse_hello(ch) == (c["purpose"], c["rank"], c["world"])
    sh = raw(ms[1])
    assert sh[:52] == pgt_tcp.hello(s["purpose"], s["rank"], s["world"], sn)
    assert pgt_tcp.parse_hello(sh[:52]) == (s["purpose"], s["rank"], s["world"])
    mac_s = pgt_tcp.mac(token(s), pgt_tcp.LABEL_SERVER, ch, sh[:52])
    assert sh[52:] == mac_s
    independent = hmac.new(token(s), b"pgt/1 server" + ch + sh[:52], hashlib.sha256)
    assert sh[52:] == independent.digest()
    # The client checks mac_s under its own token: it verifies exactly when the tokens agree.
    client_view = pgt_tcp.mac(token(c), pgt_tcp.LABEL_SERVER, ch, sh[:52])
    assert (client_view == sh[52:]) == (c["token"] == s["token"])
    proofs = of(t, "ClientProof")
    if c["token"] != s["token"]:
        assert proofs == []  # the client gave up before proving anything
        assert len(ms) == 2
        return
    (proof,) = proofs
    mac_c = pgt_tcp.mac(token(c), pgt_tcp.LABEL_CLIENT, ch, sh)
    independent = hmac.new(token(c), b"pgt/1 client" + ch + sh, hashlib.sha256)
    assert mac_c == independent.digest()
    if "forged_proof" in c:
        assert raw(proof) == bytes.fromhex(c["forged_proof"]) != mac_c
    else:
        assert raw(proof) == mac_c
    (verdict,) = of(t, "Verdict")
    assert raw(verdict) == bytes([expected_verdict(t)]) == bytes([verdict["verdict"]])
    for m in of(t, "Frame"):
        payload = bytes.fromhex(m["payload"])
        assert raw(m) == pgt_tcp.frame_header(int(m["tag"]), len(payload)) + payload
    for m in of(t, "Register"):
        addr = m["address"].encode()
        assert raw(m) == pgt_tcp.frame_header(pgt_tcp.TAG_REGISTER, len(addr)) + addr
    for m in of(t, "Table"):
        payload = pgt_tcp.encode_table(m["addresses"])
        assert raw(m) == pgt_tcp.frame_header(pgt_tcp.TAG_TABLE, len(payload)) + payload
        assert pgt_tcp.decode_table(payload, c["world"]) is not None
        assert pgt_tcp.decode_table(payload, c["world"] + 1) is None
    for m in ms:
        assert "".join(h for _, h in m["fields"]) == m["hex"]


# ---- replay over a socket ----


def socket_pair():
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname()[:2])
        b, _ = srv.accept()
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b


def recv_exact(sock, n) -> bytes:
    b = b""
    while len(b) < n:
        chunk = sock.recv(n - len(b))
        if not chunk:
            break
        b += chunk
    return b


def play(sock, t, side, problems):
    """Plays ``side`` of transcript ``t`` from the recorded bytes: writes that side's messages, reads
    the other side's and compares them, in order; then closes its sending half and expects nothing
    more before the other side closes."""
    sock.settimeout(TIMEOUT)
    try:
        for i, m in enumerate(t["messages"]):
            if m["from"] == side:
                sock.sendall(raw(m))
                continue
            got = recv_exact(sock, len(raw(m)))
            if got != raw(m):
                problems.append(f"message {i} {m['message']}: {got.hex()}")
                return
        sock.shutdown(socket.SHUT_WR)
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
        if rest:
            problems.append(f"{len(rest)} bytes after the transcript: {rest.hex()}")
    except OSError as e:
        problems.append(f"{type(e).__name__}: {e}")
    finally:
        sock.close()


def outcome(e: BaseException | None) -> str:
    if e is None:
        return "accepted"
    if isinstance(e, pgt_tcp.AuthFailed):
        return "auth_failed"
    if isinstance(e, pgt_tcp.RendezvousError):
        return "refused"
    if isinstance(e, (pgt_tcp._Closed, pgt_tcp._Transport, pgt_tcp.PeerClosed)):
        return "closed"
    return f"unexpected {type(e).__name__}: {e}"


def exchange(sock, t, me, peer_rank, my_rank, world):
    """Our end's frames through TcpGroup: send ours in order, then receive in the transcript's
    order, each payload as recorded."""
    pg = pgt_tcp.TcpGroup(my_rank, world, {peer_rank: sock})
    frames = of(t, "Frame")
    for f in frames:
        if f["from"] == me:
            pg.send(peer_rank, int(f["tag"]), [bytes.fromhex(f["payload"])], TIMEOUT)
    incoming = [f for f in frames if f["from"] != me]
    for tag in map(int, t["receive_order"][me]):
        want = next(f for f in incoming if int(f["tag"]) == tag)
        incoming.remove(want)
        got = pg.recv_bytes(peer_rank, tag, 1 << 20, TIMEOUT)
        assert got == bytes.fromhex(want["payload"]), f"tag {tag}"
    assert incoming == []


def run_against(t, me, ours):
    """Runs ``ours(sock)`` (our implementation as ``me``) against the transcript's other side."""
    mine, theirs = socket_pair()
    other = "server" if me == "client" else "client"
    problems = []
    player = threading.Thread(target=play, args=(theirs, t, other, problems))
    player.start()
    error = None
    try:
        ours(mine)
    except (pgt_tcp.PgError, pgt_tcp._Closed, pgt_tcp._Transport) as e:
        error = e
    finally:
        mine.close()
    player.join(TIMEOUT)
    assert not player.is_alive()
    assert problems == []
    assert outcome(error) == t["outcome"][me]


def test_our_client_replays_the_transcript(t):
    c = t["client"]
    if "forged_hello" in c or "forged_proof" in c:
        pytest.skip("the client of this transcript is a forger, not pgt's client")

    def client(sock):
        deadline = time.monotonic() + TIMEOUT
        nonce = bytes.fromhex(c["nonce"])
        args = (token(c), c["purpose"], c["rank"], c["world"], deadline, "the server")
        _, server_rank, _ = pgt_tcp.client_handshake(sock, *args, nonce=nonce)
        if of(t, "Register"):
            (reg,) = of(t, "Register")
            table = pgt_tcp.exchange_registration(
                sock, c["rank"], c["world"], reg["address"], deadline
            )
            (tab,) = of(t, "Table")
            want = [pgt_tcp._parse_addr(a) for a in tab["addresses"]]
            assert table == want
        elif "receive_order" in t:
            exchange(sock, t, "client", server_rank, c["rank"], c["world"])

    run_against(t, "client", client)


def test_our_server_replays_the_transcript(t):
    s = t["server"]

    def server(sock):
        deadline = time.monotonic() + TIMEOUT
        nonce = bytes.fromhex(s["nonce"])
        admitted = []

        def admit(rank):
            admitted.append(rank)
            return s["admits"]

        args = (token(s), s["purpose"], s["rank"], s["world"], deadline, admit)
        client_rank = pgt_tcp.server_handshake(sock, *args, nonce=nonce)
        assert admitted == [t["client"]["rank"]]
        if of(t, "Register"):
            (reg,) = of(t, "Register")
            got = pgt_tcp.read_registration(sock, client_rank, deadline)
            assert got == reg["address"]
            (tab,) = of(t, "Table")
            table = pgt_tcp.encode_table(tab["addresses"])
            pgt_tcp._write_frame(sock, pgt_tcp.TAG_TABLE, table, deadline)
        elif "receive_order" in t:
            exchange(sock, t, "server", client_rank, s["rank"], s["world"])

    run_against(t, "server", server)


# ---- the store refuses registrations Rust's store refuses ----


@pytest.mark.parametrize(
    ("tag", "payload", "accepted"),
    [
        (pgt_tcp.TAG_REGISTER, b"192.0.2.7:40001", "192.0.2.7:40001"),
        (pgt_tcp.TAG_REGISTER, b"[2001:DB8:0:0::5]:29500", "[2001:db8::5]:29500"),
        (pgt_tcp.TAG_TABLE, b"192.0.2.7:40001", None),  # not a REGISTER frame
        (pgt_tcp.TAG_REGISTER, b"localhost:40001", None),  # a name, not an IP
        (pgt_tcp.TAG_REGISTER, b"192.0.2.7", None),  # no port
        (pgt_tcp.TAG_REGISTER, b"192.0.2.7:65536", None),  # port out of range
        (pgt_tcp.TAG_REGISTER, b"2001:db8::5:29500", None),  # IPv6 without brackets
        (pgt_tcp.TAG_REGISTER, b"\xff:1", None),  # not UTF-8
        (pgt_tcp.TAG_REGISTER, b"1" * 257, None),  # longer than MAX_ADDR_LEN
    ],
)
def test_read_registration(tag, payload, accepted):
    a, b = socket_pair()
    with a, b:
        a.sendall(pgt_tcp.frame_header(tag, len(payload)) + payload)
        deadline = time.monotonic() + TIMEOUT
        if accepted is None:
            with pytest.raises(pgt_tcp.PgError):
                pgt_tcp.read_registration(b, 1, deadline)
        else:
            assert pgt_tcp.read_registration(b, 1, deadline) == accepted
