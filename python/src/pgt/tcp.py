"""pgt's TCP process group, from Python: join a job of `pgt` ranks as one rank.

The TCP process group as ``TCP.md`` (repository root) specifies it, byte for byte as the Rust side
(``host/src/pg/``): rendezvous with the store that rank 0 hosts on ``MASTER_ADDR:MASTER_PORT``, a
mutual HMAC-SHA256 challenge–response keyed with the job token on every connection, one connection
per pair of ranks (each rank connects to every higher rank and accepts every lower one), then frames
``tag u64 LE | len u64 LE | payload`` in both directions.

This module only moves bytes. It knows nothing of pgt's wire protocol (that runs in the wasm module).

    pg = TcpGroup.join(TcpOptions.from_env())
    pg.recv_into(0, tag, [memoryview(buf)[0:64], ...], timeout=60)
    data = pg.recv_bytes(0, tag, max_len=24, timeout=60)
    pg.send(2, tag, [b"...", memoryview(buf)[64:128]], timeout=60)
    pg.close()

The wire format's pure pieces — :func:`hello`, :func:`parse_hello`, :func:`mac`,
:func:`frame_header`, :func:`encode_table`, :func:`decode_table` — and the handshake and registration
steps (:func:`client_handshake`, :func:`server_handshake` with an optional fixed ``nonce``,
:func:`exchange_registration`, :func:`read_registration`) are what ``tests/python`` checks against the
conformance transcripts in ``tests/vectors/tcp``.

Errors are :class:`PgError` subclasses: :class:`AuthFailed` (wrong token, not a pgt endpoint),
:class:`RendezvousError` (formation failed or timed out), :class:`PgTimeout`, :class:`PeerClosed`,
:class:`LengthMismatch`.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import hmac
import ipaddress
import os
import queue
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

# ---- constants (host/src/pg/auth.rs, rendezvous.rs, wire.rs) ----

AUTH_MAGIC = b"PGTAUTH1"
CLIENT_HELLO_LEN = 52
SERVER_HELLO_LEN = 84
MAC_LEN = 32
NONCE_LEN = 32
PURPOSE_STORE = 1
PURPOSE_PEER = 2
STORE_RANK = 0xFFFFFFFF
LABEL_SERVER = b"pgt/1 server"
LABEL_CLIENT = b"pgt/1 client"

VERDICT_ACCEPTED = 0
VERDICT_BAD_PROOF = 1
VERDICT_UNEXPECTED_RANK = 2
VERDICT_WORLD_MISMATCH = 3
VERDICT_WRONG_PURPOSE = 4

TAG_REGISTER = 1
TAG_TABLE = 2
MAX_ADDR_LEN = 256

FRAME_HEADER = struct.Struct("<QQ")  # tag, len
DEFAULT_SETUP_TIMEOUT = 300.0
HANDSHAKE_TIMEOUT = 10.0
#: Most bytes asked of one recv/send system call (as TcpTuning::chunk_size).
IO_CHUNK = 4 << 20
#: Cap on frames set aside while waiting for another tag, per peer (as DEFAULT_STASH_LIMIT's role).
STASH_LIMIT = 64 << 20
#: Forgotten prefixes remembered per peer (:meth:`TcpGroup.forget_prefix`; as FORGOTTEN_PREFIXES).
FORGOTTEN_PREFIXES = 64


# ---- errors ----


class PgError(Exception):
    """A process-group failure (not a pgt protocol error)."""


class AuthFailed(PgError):
    """The other side does not know the job token, refused ours, or is not a pgt endpoint."""


class RendezvousError(PgError):
    """Group formation failed: store unreachable, refused, timed out, malformed table…"""


class PgTimeout(PgError):
    """An operation did not finish within its timeout."""


class PgTimeoutMidMessage(PgTimeout):
    """A receive timed out part way through its message: the message is lost (the next receive from
    that rank reads its rest and drops it) and the connection stays usable."""


class PeerClosed(PgError):
    """The peer closed the connection (or it broke) before a message was complete."""


class LengthMismatch(PgError):
    """The next message with the wanted tag has another length than the receive buffers."""


class _Transport(Exception):
    """A handshake failure worth retrying (refused, reset, EOF, timeout) — client side only."""


# ---- options ----


@dataclass
class TcpOptions:
    master_addr: str
    master_port: int
    rank: int
    world_size: int
    token: bytes = field(repr=False)
    timeout: float = DEFAULT_SETUP_TIMEOUT  # the whole formation
    listen_host: str | None = None

    @classmethod
    def from_env(cls, env=os.environ) -> TcpOptions:
        """MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, PGT_TOKEN (required); PGT_TIMEOUT_SECS and
        PGT_LISTEN_HOST (optional), as ``TcpOptions::from_env`` in Rust."""

        def req(k):
            v = env.get(k, "")
            if not v:
                raise PgError(f"environment variable {k} is not set")
            return v

        def num(k, v, conv=int):
            try:
                return conv(v.strip())
            except ValueError:
                raise PgError(f"{k}={v!r} is not a valid number") from None

        timeout = env.get("PGT_TIMEOUT_SECS")
        return cls(
            master_addr=req("MASTER_ADDR"),
            master_port=num("MASTER_PORT", req("MASTER_PORT")),
            rank=num("RANK", req("RANK")),
            world_size=num("WORLD_SIZE", req("WORLD_SIZE")),
            token=req("PGT_TOKEN").encode(),
            timeout=num("PGT_TIMEOUT_SECS", timeout, float) if timeout else DEFAULT_SETUP_TIMEOUT,
            listen_host=env.get("PGT_LISTEN_HOST") or None,
        )


# ---- deadline-bounded socket I/O ----


def _left(deadline: float) -> float | None:
    """Seconds until ``deadline`` (at least 1 ms), or None once it has passed."""
    left = deadline - time.monotonic()
    return max(left, 0.001) if left > 0 else None


class _Closed(Exception):
    pass


class _TimedOut(Exception):
    pass


def _read_into(sock: socket.socket, view: memoryview, deadline: float, done: list | None = None):
    """Fills ``view`` (a byte memoryview) from ``sock`` by 4 MiB reads, giving up at ``deadline``."""
    off, n = 0, len(view)
    while off < n:
        left = _left(deadline)
        if left is None:
            raise _TimedOut()
        sock.settimeout(left)
        try:
            got = sock.recv_into(view[off : off + IO_CHUNK])
        except (TimeoutError, BlockingIOError, InterruptedError):
            continue
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as e:
            raise _Closed(str(e)) from None
        if got == 0:
            raise _Closed("connection closed")
        off += got
        if done is not None:
            done[0] += got


def _peek(sock: socket.socket, n: int, deadline: float) -> bytes:
    """The next ``n`` bytes of ``sock``, left unread (``MSG_PEEK``), giving up at ``deadline``."""
    while True:
        left = _left(deadline)
        if left is None:
            raise _TimedOut()
        sock.settimeout(left)
        try:
            got = sock.recv(n, socket.MSG_PEEK)
        except (TimeoutError, BlockingIOError, InterruptedError):
            continue
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as e:
            raise _Closed(str(e)) from None
        if not got:
            raise _Closed("connection closed")
        if len(got) >= n:
            return got
        time.sleep(0.0002)  # the rest of a split write is on its way


def _write_all(sock: socket.socket, parts, deadline: float):
    """Writes every buffer of ``parts`` in order (vectored ``sendmsg``), giving up at ``deadline``."""
    bufs = [memoryview(p).cast("B") for p in parts if len(p)]
    i = 0
    while i < len(bufs):
        left = _left(deadline)
        if left is None:
            raise _TimedOut()
        sock.settimeout(left)
        batch, budget = [], IO_CHUNK
        for b in bufs[i : i + 64]:
            take = b[:budget]
            batch.append(take)
            budget -= len(take)
            if budget == 0:
                break
        try:
            sent = sock.sendmsg(batch)
        except (TimeoutError, BlockingIOError, InterruptedError):
            continue
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as e:
            raise _Closed(str(e)) from None
        while sent:
            step = min(len(bufs[i]), sent)
            bufs[i] = bufs[i][step:]
            sent -= step
            if not len(bufs[i]):
                i += 1
    # (a zero-length frame is just its header, which is never empty)


def _read_exact(sock, n: int, deadline: float) -> bytes:
    b = bytearray(n)
    _read_into(sock, memoryview(b), deadline)
    return bytes(b)


def frame_header(tag: int, length: int) -> bytes:
    """A frame's 16-byte header: ``tag u64 LE | len u64 LE`` (the payload follows)."""
    return FRAME_HEADER.pack(tag, length)


def _write_frame(sock, tag: int, payload: bytes, deadline: float):
    _write_all(sock, [frame_header(tag, len(payload)), payload], deadline)


def _read_frame(sock, max_len: int, deadline: float) -> tuple[int, bytes]:
    tag, n = FRAME_HEADER.unpack(_read_exact(sock, FRAME_HEADER.size, deadline))
    if n > max_len:
        raise PgError(f"control frame of {n} bytes exceeds {max_len}")
    return tag, _read_exact(sock, n, deadline)


# ---- the handshake (host/src/pg/auth.rs) ----


def hello(purpose: int, rank: int, world: int, nonce: bytes) -> bytes:
    """A ClientHello, or a ServerHello's first 52 bytes."""
    return AUTH_MAGIC + bytes([purpose, 0, 0, 0]) + struct.pack("<II", rank, world) + nonce


def parse_hello(b: bytes):
    """(purpose, rank, world), or None if these are not a pgt hello's first 52 bytes."""
    if b[:8] != AUTH_MAGIC or b[9:12] != b"\0\0\0":
        return None
    rank, world = struct.unpack("<II", b[12:20])
    return b[8], rank, world


def mac(token: bytes, label: bytes, *pieces: bytes) -> bytes:
    """HMAC-SHA256 keyed with the job token over ``label`` and ``pieces``, concatenated."""
    m = hmac.new(token, label, hashlib.sha256)
    for p in pieces:
        m.update(p)
    return m.digest()


def _peer_name(sock) -> str:
    try:
        a = sock.getpeername()
        return f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"
    except OSError:
        return "<unknown>"


def client_handshake(
    sock,
    token: bytes,
    purpose: int,
    rank: int,
    world: int,
    deadline: float,
    what: str,
    nonce: bytes | None = None,
):
    """Client side; returns the server's (purpose, rank, world) once it accepted us. ``nonce``: fresh
    from the OS unless given (the conformance transcripts fix it)."""
    addr = _peer_name(sock)
    ch = hello(purpose, rank, world, nonce or os.urandom(NONCE_LEN))
    try:
        _write_all(sock, [ch], deadline)
        sh = _read_exact(sock, SERVER_HELLO_LEN, deadline)
    except (_Closed, _TimedOut, OSError) as e:
        raise _Transport(f"{addr}: {type(e).__name__} {e}") from None
    server = parse_hello(sh[:CLIENT_HELLO_LEN])
    if server is None:
        raise AuthFailed(
            f"authentication with {what} at {addr} failed: the other side is not a pgt endpoint"
        )
    if not hmac.compare_digest(
        mac(token, LABEL_SERVER, ch, sh[:CLIENT_HELLO_LEN]), sh[CLIENT_HELLO_LEN:]
    ):
        raise AuthFailed(
            f"authentication with {what} at {addr} failed: the other side does not know the job token "
            "(is PGT_TOKEN the same on every rank?)"
        )
    try:
        _write_all(sock, [mac(token, LABEL_CLIENT, ch, sh)], deadline)
        verdict = _read_exact(sock, 1, deadline)[0]
    except (_Closed, _TimedOut, OSError) as e:
        raise _Transport(f"{addr}: {type(e).__name__} {e}") from None
    if verdict == VERDICT_ACCEPTED:
        return server
    if verdict == VERDICT_BAD_PROOF:
        raise AuthFailed(f"authentication with {what} at {addr} failed: our proof was refused")
    if verdict == VERDICT_UNEXPECTED_RANK:
        raise RendezvousError(
            f"{what} at {addr} refused rank {rank} (not expected there, or already connected)"
        )
    if verdict == VERDICT_WORLD_MISMATCH:
        raise RendezvousError(f"{what} at {addr} runs a world of size {server[2]}, we have {world}")
    if verdict == VERDICT_WRONG_PURPOSE:
        raise RendezvousError(
            f"{addr} is not a {'rendezvous store' if purpose == PURPOSE_STORE else 'pgt rank'}"
        )
    raise AuthFailed(f"authentication with {what} at {addr} failed: invalid verdict byte {verdict}")


def server_handshake(
    sock,
    token: bytes,
    purpose: int,
    rank: int,
    world: int,
    deadline: float,
    admit,
    nonce: bytes | None = None,
):
    """Server side; ``admit(client_rank) -> bool`` after the client proved the token. Returns the
    client's rank once accepted; raises PgError otherwise (``_Closed``/``_TimedOut`` when the client
    goes away or stalls). ``nonce``: fresh from the OS unless given."""
    addr = _peer_name(sock)
    ch = _read_exact(sock, CLIENT_HELLO_LEN, deadline)
    client = parse_hello(ch)
    if client is None:
        raise AuthFailed(f"refused {addr}: garbage instead of a pgt hello")
    sh = hello(purpose, rank, world, nonce or os.urandom(NONCE_LEN))
    sh += mac(token, LABEL_SERVER, ch, sh)
    _write_all(sock, [sh], deadline)
    proof = _read_exact(sock, MAC_LEN, deadline)
    if not hmac.compare_digest(mac(token, LABEL_CLIENT, ch, sh), proof):
        with contextlib.suppress(_Closed, _TimedOut, OSError):
            _write_all(sock, [bytes([VERDICT_BAD_PROOF])], deadline)
        raise AuthFailed(f"refused {addr}: wrong job token")
    c_purpose, c_rank, c_world = client
    if c_purpose != purpose:
        verdict = VERDICT_WRONG_PURPOSE
    elif c_world != world:
        verdict = VERDICT_WORLD_MISMATCH
    else:
        verdict = VERDICT_ACCEPTED if admit(c_rank) else VERDICT_UNEXPECTED_RANK
    _write_all(sock, [bytes([verdict])], deadline)
    if verdict != VERDICT_ACCEPTED:
        raise RendezvousError(f"refused rank {c_rank} from {addr}: verdict {verdict}")
    return c_rank


# ---- formation helpers (host/src/pg/tcp.rs, rendezvous.rs) ----


def _resolve(host: str, port: int):
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise PgError(f"cannot resolve {host!r}: {e}") from None
    out = []
    for fam, _, _, _, sa in infos:
        if (fam, sa[:2]) not in [(f, s[:2]) for f, s in out]:
            out.append((fam, sa))
    if not out:
        raise PgError(f"{host!r} resolves to no address")
    return out


def _route_to(fam, sa) -> str:
    """The local IP the OS would use to reach ``sa`` (no packet is sent)."""
    u = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        u.connect(sa)
        return u.getsockname()[0]
    finally:
        u.close()


def _fmt_addr(host: str, port: int) -> str:
    """A socket address as Rust's ``SocketAddr`` parses it: ``1.2.3.4:5`` or ``[::1]:5``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_addr(s: str):
    host, _, port = s.rpartition(":")
    if host.startswith("["):
        return socket.AF_INET6, (host[1:-1], int(port))
    return socket.AF_INET, (host, int(port))


def canonical_addr(s: str) -> str | None:
    """``s`` as Rust's ``SocketAddr`` prints it, if it parses as one (``1.2.3.4:5`` or ``[::1]:5``: an IP
    literal, never a host name); else None."""
    host, sep, port = s.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or int(port) > 0xFFFF:
        return None
    try:
        if host.startswith("[") and host.endswith("]"):
            ip = ipaddress.IPv6Address(host[1:-1])
        else:
            ip = ipaddress.IPv4Address(host)
    except ValueError:
        return None
    return _fmt_addr(str(ip), int(port))


def encode_table(addrs: list[str]) -> bytes:
    """The TABLE payload: ``count u32 LE``, then per rank ``len u16 LE | address (UTF-8)``."""
    out = struct.pack("<I", len(addrs))
    for a in addrs:
        b = a.encode()
        out += struct.pack("<H", len(b)) + b
    return out


def decode_table(b: bytes, world: int):
    """The TABLE payload as ``[(family, sockaddr)]`` in rank order, or None if it is malformed or not
    ``world`` entries long."""
    if len(b) < 4 or struct.unpack_from("<I", b)[0] != world:
        return None
    off, out = 4, []
    for _ in range(world):
        if off + 2 > len(b):
            return None
        (n,) = struct.unpack_from("<H", b, off)
        off += 2
        if off + n > len(b):
            return None
        try:
            out.append(_parse_addr(b[off : off + n].decode()))
        except (UnicodeDecodeError, ValueError):
            return None
        off += n
    return out if off == len(b) else None


def read_registration(sock, rank: int, deadline: float) -> str:
    """The store's side of a registration, right after the handshake admitted ``rank``: reads the
    REGISTER frame and returns its address as Rust prints it. Raises PgError unless it is a REGISTER
    frame of at most MAX_ADDR_LEN bytes holding an IP socket address."""
    tag, payload = _read_frame(sock, MAX_ADDR_LEN, deadline)
    try:
        addr = canonical_addr(payload.decode()) if tag == TAG_REGISTER else None
    except UnicodeDecodeError:
        addr = None
    if addr is None:
        raise PgError(f"bad registration from rank {rank}")
    return addr


def exchange_registration(sock, rank: int, world: int, advertised: str, deadline: float):
    """A rank's side of a registration, right after the store accepted its handshake: sends the
    REGISTER frame and waits (until ``deadline``) for the TABLE; returns it as ``decode_table`` does."""
    try:
        _write_frame(sock, TAG_REGISTER, advertised.encode(), deadline)
        tag, payload = _read_frame(sock, 4 + world * (2 + MAX_ADDR_LEN), deadline)
    except _TimedOut:
        raise RendezvousError(
            f"rank {rank}: timed out waiting for all {world} ranks to register"
        ) from None
    except (_Closed, OSError) as e:
        raise RendezvousError(f"waiting for the address table: {e}") from None
    if tag != TAG_TABLE:
        raise RendezvousError(f"unexpected store message tag {tag}")
    table = decode_table(payload, world)
    if table is None:
        raise RendezvousError("malformed address table from the store")
    return table


def is_self_connected(sock: socket.socket) -> bool:
    """Whether ``sock`` is connected to itself (its own address is its peer's)."""
    try:
        return sock.getsockname() == sock.getpeername()
    except OSError:
        return False


def _reset(sock: socket.socket) -> None:
    """Closes with a reset (no TIME_WAIT left on the port)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _connect_authenticated(addrs, token, purpose, rank, world, deadline, what):
    """Connects to one of ``addrs`` and runs the client handshake, retrying transport failures (not up
    yet, reset…) until ``deadline``. Authentication failures and refusals are not retried."""
    backoff, last = 0.01, "no address to try"
    while True:
        for fam, sa in addrs:
            left = _left(deadline)
            if left is None:
                raise RendezvousError(f"could not reach {what} in time: {last}")
            sock = socket.socket(fam, socket.SOCK_STREAM)
            try:
                # So that a listener can still bind the port should this socket end up connected to
                # itself and linger in TIME_WAIT (TCP.md §3, as pgt-host).
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.settimeout(min(left, 5.0))
                sock.connect(sa)
                if is_self_connected(sock):
                    # A port in the ephemeral range with nothing listening yet: the kernel can pick
                    # it as our own source port (TCP simultaneous open). Reset, and retry.
                    last = f"{_fmt_addr(*sa[:2])}: connected to itself (nothing listening yet)"
                    _reset(sock)
                    continue
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                hs_deadline = min(deadline, time.monotonic() + HANDSHAKE_TIMEOUT)
                server = client_handshake(sock, token, purpose, rank, world, hs_deadline, what)
                return sock, server
            except _Transport as e:
                last = str(e)
            except OSError as e:
                last = f"{_fmt_addr(*sa[:2])}: {e}"
            except BaseException:
                sock.close()
                raise
            sock.close()
        left = _left(deadline)
        time.sleep(min(backoff, left or 0))
        backoff = min(backoff * 2, 0.2)


class _Acceptor(threading.Thread):
    """Accepts peer connections from lower ranks: each one authenticated (in its own thread, within the
    handshake timeout); strangers are dropped while the loop goes on (as ``spawn_acceptor``)."""

    def __init__(self, listener, token, rank, world, log):
        super().__init__(name=f"pgt-accept-{rank}", daemon=True)
        self.listener, self.token, self.rank, self.world, self.log = (
            listener,
            token,
            rank,
            world,
            log,
        )
        self.admitted: queue.Queue = queue.Queue()
        self.claimed: set[int] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def _admit(self, r: int) -> bool:
        with self.lock:
            if r < self.rank and r not in self.claimed:
                self.claimed.add(r)
                return True
            return False

    def _handshake(self, sock):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            deadline = time.monotonic() + HANDSHAKE_TIMEOUT
            r = server_handshake(
                sock,
                self.token,
                PURPOSE_PEER,
                self.rank,
                self.world,
                deadline,
                self._admit,
            )
            if self.stop.is_set():
                sock.close()
            else:
                self.admitted.put((r, sock))
        except (
            PgError,
            _Closed,
            _TimedOut,
            OSError,
        ) as e:  # a stranger or a broken attempt
            self.log(f"refused a connection from {_peer_name(sock)}: {type(e).__name__}: {e}")
            sock.close()

    def run(self):
        self.listener.settimeout(0.1)
        while not self.stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except (TimeoutError, InterruptedError):
                continue
            except OSError:
                if self.stop.is_set():
                    return
                time.sleep(0.01)
                continue
            sock.settimeout(None)
            threading.Thread(target=self._handshake, args=(sock,), daemon=True).start()


class _Store(threading.Thread):
    """The rendezvous store, hosted by rank 0 on MASTER_ADDR:MASTER_PORT (as ``rendezvous::Store``):
    every rank registers its listener address (frame tag 1) and gets the table of all of them (tag 2)
    once all have; then the store closes."""

    def __init__(self, master, token, world, deadline, log):
        super().__init__(name="pgt-store", daemon=True)
        fam, sa = master
        self.token, self.world, self.deadline, self.log = token, world, deadline, log
        self.error: PgError | None = None
        self.stop = threading.Event()
        self.regs: dict[int, tuple[socket.socket, str]] = {}
        self.lock = threading.Lock()
        self.cv = threading.Condition(self.lock)
        self.listener = socket.socket(fam, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        while True:  # the port may still be held (a previous job): retry until the deadline
            try:
                self.listener.bind(sa)
                break
            except OSError as e:
                if e.errno == errno.EADDRINUSE and _left(deadline) is not None:
                    time.sleep(0.1)
                    continue
                self.listener.close()
                raise RendezvousError(
                    f"cannot host the store on {_fmt_addr(*sa[:2])}: {e}"
                ) from None
        self.listener.listen(1024)
        self.claimed: set[int] = set()

    def _admit(self, r: int) -> bool:
        with self.lock:
            if r < self.world and r not in self.claimed:
                self.claimed.add(r)
                return True
            return False

    def _serve(self, sock):
        r = None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hs_deadline = time.monotonic() + HANDSHAKE_TIMEOUT
            r = server_handshake(
                sock,
                self.token,
                PURPOSE_STORE,
                STORE_RANK,
                self.world,
                hs_deadline,
                self._admit,
            )
            addr = read_registration(sock, r, hs_deadline)
            with self.cv:
                self.regs[r] = (sock, addr)
                self.cv.notify_all()
        except (PgError, _Closed, _TimedOut, OSError) as e:
            self.log(
                f"store: refused a connection from {_peer_name(sock)}: {type(e).__name__}: {e}"
            )
            if r is not None:
                with self.lock:
                    self.claimed.discard(r)  # let the rank try again
            sock.close()

    def run(self):
        self.listener.settimeout(0.1)
        try:
            while not self.stop.is_set():
                with self.lock:
                    if len(self.regs) == self.world:
                        break
                if _left(self.deadline) is None:
                    missing = [r for r in range(self.world) if r not in self.regs]
                    self.error = RendezvousError(
                        f"timed out waiting for registration from ranks {missing}"
                    )
                    return
                try:
                    sock, _ = self.listener.accept()
                except (TimeoutError, InterruptedError):
                    continue
                sock.settimeout(None)
                threading.Thread(target=self._serve, args=(sock,), daemon=True).start()
            if self.stop.is_set():
                return
            table = encode_table([self.regs[r][1] for r in range(self.world)])
            send_deadline = max(self.deadline, time.monotonic() + 5)
            for r in range(self.world):
                sock = self.regs[r][0]
                try:
                    _write_frame(sock, TAG_TABLE, table, send_deadline)
                except (_Closed, _TimedOut, OSError) as e:
                    self.error = RendezvousError(f"store: sending the table to rank {r}: {e}")
                    return
        finally:
            self.listener.close()
            for sock, _ in self.regs.values():
                sock.close()


# ---- the group ----


class _Partial:
    """A frame whose reading stopped part way at a timeout; the next receive finishes it first, so a
    timed-out receive never leaves the stream unparseable. ``kind`` is ``"header"`` (``buf`` is the
    frame header), ``"stash"`` (``buf`` is a frame with ``tag`` for the stash) or ``"drop"`` (``left``
    bytes nobody will take)."""

    __slots__ = ("kind", "tag", "buf", "filled", "left")

    def __init__(self, kind: str, tag: int = 0, buf: bytearray | None = None, left: int = 0):
        self.kind, self.tag, self.buf, self.filled, self.left = kind, tag, buf, 0, left


class _Peer:
    def __init__(self, rank: int, sock: socket.socket):
        self.rank, self.sock = rank, sock
        self.stash: dict[int, list[bytes]] = {}
        self.stashed = 0
        self.pending: tuple[int, int] | None = None  # a frame header read but not its payload
        self.partial: _Partial | None = None  # a frame left part way by a timeout
        self.poisoned = False
        # payload prefixes nobody will want (``forget_prefix``), the most recent last
        self.forgotten: collections.deque[bytes] = collections.deque(maxlen=FORGOTTEN_PREFIXES)


class TcpGroup:
    """One rank of a job's TCP process group. Not thread-safe: one operation at a time."""

    def __init__(self, rank: int, world: int, peers: dict[int, socket.socket]):
        self.rank, self.size = rank, world
        self.peers = {r: _Peer(r, s) for r, s in peers.items()}

    @classmethod
    def join(cls, opts: TcpOptions, log=lambda msg: None) -> TcpGroup:
        """Forms the group with the other ranks; blocks until every rank is connected or ``opts.timeout``."""
        rank, world, token = opts.rank, opts.world_size, opts.token
        if world <= 0 or not 0 <= rank < world:
            raise PgError(f"rank {rank} is outside world size {world}")
        if not token:
            raise PgError("the job token is empty")
        if world == 1:
            return cls(rank, 1, {})
        deadline = time.monotonic() + opts.timeout
        masters = _resolve(opts.master_addr, opts.master_port)

        # 1. Our peer listener, on the interface that routes to the master (or --listen-host).
        try:
            route = _route_to(*masters[0])
        except OSError as e:
            raise PgError(f"no route to MASTER_ADDR {opts.master_addr}: {e}") from None
        if opts.listen_host:
            fam, sa = _resolve(opts.listen_host, 0)[0]
        else:
            fam, sa = masters[0][0], (route, 0)
        listener = socket.socket(fam, socket.SOCK_STREAM)
        try:
            listener.bind(sa)
            listener.listen(1024)
        except OSError as e:
            listener.close()
            raise PgError(f"cannot listen on {_fmt_addr(*sa[:2])}: {e}") from None
        host, port = listener.getsockname()[:2]
        if host in ("0.0.0.0", "::"):
            host = route
        advertised = _fmt_addr(host, port)
        store = None
        if rank == 0:
            try:
                store = _Store(masters[0], token, world, deadline, log)
            except BaseException:
                listener.close()
                raise
            store.start()

        # 2. Accept lower ranks from now on (they connect as soon as they have the table).
        acceptor = _Acceptor(listener, token, rank, world, log)
        acceptor.start()
        socks: dict[int, socket.socket] = {}
        try:
            # 3. Register with the store and get the table.
            table = cls._register(masters, token, rank, world, advertised, deadline)
            log(f"rank {rank}: got the address table {table}")
            # 4. Connect to higher ranks.
            for peer in range(rank + 1, world):
                sock, server = _connect_authenticated(
                    [table[peer]],
                    token,
                    PURPOSE_PEER,
                    rank,
                    world,
                    deadline,
                    f"rank {peer}",
                )
                socks[peer] = sock
                if server[1] != peer:
                    raise RendezvousError(
                        f"{_fmt_addr(*table[peer][1][:2])} answered as rank {server[1]}, expected rank {peer}"
                    )
            # 5. Collect lower ranks.
            while len([r for r in socks if r < rank]) < rank:
                left = _left(deadline)
                missing = [r for r in range(rank) if r not in socks]
                if left is None:
                    raise RendezvousError(f"timed out waiting for connections from ranks {missing}")
                try:
                    r, sock = acceptor.admitted.get(timeout=left)
                except queue.Empty:
                    continue
                socks[r] = sock
            # 6. Rank 0: the store has sent every rank the table (or failed).
            if store is not None:
                store.join(max(_left(deadline) or 0, 5.0))
                if store.error:
                    raise store.error
        except BaseException:
            for s in socks.values():
                s.close()
            raise
        finally:
            acceptor.stop.set()
            acceptor.join(1.0)
            listener.close()
            if store is not None:
                store.stop.set()
        for s in socks.values():
            s.settimeout(None)
        log(f"rank {rank}: TCP process group of {world} formed")
        return cls(rank, world, socks)

    @staticmethod
    def _register(masters, token, rank, world, advertised, deadline):
        sock, _ = _connect_authenticated(
            masters, token, PURPOSE_STORE, rank, world, deadline, "the rendezvous store"
        )
        try:
            return exchange_registration(sock, rank, world, advertised, deadline)
        finally:
            sock.close()

    # ---- messaging ----

    def _peer(self, r: int) -> _Peer:
        p = self.peers.get(r)
        if p is None:
            raise PgError(
                f"rank {r} is not another rank of this group of {self.size} (we are rank {self.rank})"
            )
        if p.poisoned:
            raise PgError(
                f"connection to rank {r} is unusable after an earlier failure in the middle of a frame"
            )
        return p

    def send(self, dst: int, tag: int, parts, timeout: float):
        """Sends one message (the concatenation of ``parts``) with ``tag`` to ``dst``."""
        p = self._peer(dst)
        n = sum(len(memoryview(x).cast("B")) for x in parts)
        try:
            _write_all(p.sock, [frame_header(tag, n), *parts], time.monotonic() + timeout)
        except _TimedOut:
            p.poisoned = True
            raise PgTimeout(
                f"timed out after {timeout:g} s sending tag {tag} to rank {dst}"
            ) from None
        except (_Closed, OSError):
            p.poisoned = True
            raise PeerClosed(f"rank {dst} closed the connection") from None

    def _finish(self, p: _Peer, deadline: float):
        """Reads the rest of ``p.partial``; at a timeout its progress is kept for the next receive."""
        f = p.partial
        done = [0]
        try:
            if f.kind == "drop":
                scratch = memoryview(bytearray(min(f.left, IO_CHUNK)))
                while f.left:
                    k = min(f.left, len(scratch))
                    _read_into(p.sock, scratch[:k], deadline, done)
                    f.left -= k
                    done[0] = 0
            else:
                _read_into(p.sock, memoryview(f.buf)[f.filled :], deadline, done)
        finally:
            if f.kind == "drop":
                f.left -= done[0]
            else:
                f.filled += done[0]
        p.partial = None
        if f.kind == "header":
            p.pending = FRAME_HEADER.unpack(f.buf)
        elif f.kind == "stash" and bytes(f.buf[:8]) not in p.forgotten:
            p.stash.setdefault(f.tag, []).append(bytes(f.buf))
            p.stashed += len(f.buf) + 64

    def _next_frame(self, p: _Peer, tag: int, deadline: float) -> int | None:
        """Reads frames from ``p`` until one with ``tag`` is first in line (pending; its length is
        returned) or stashed (None), stashing other frames whole and dropping forgotten ones."""
        while True:
            if p.partial is not None:
                stashing = p.partial.tag if p.partial.kind == "stash" else None
                self._finish(p, deadline)
                if stashing == tag:
                    return None
                continue
            if p.pending is None:
                p.partial = _Partial("header", buf=bytearray(FRAME_HEADER.size))
                continue
            t, n = p.pending
            if t == tag:
                return n
            if p.forgotten and n >= 8 and _peek(p.sock, 8, deadline) in p.forgotten:
                # A forgotten prefix: read and dropped in bounded chunks, never stashed.
                p.pending, p.partial = None, _Partial("drop", left=n)
                continue
            if p.stashed + n + 64 > STASH_LIMIT:
                raise PgError(
                    f"receiving tag {tag} from rank {p.rank}: frame with tag {t} ({n} bytes) does not fit the stash"
                )
            p.pending, p.partial = None, _Partial("stash", t, bytearray(n))

    def forget_prefix(self, src: int, prefix: bytes):
        """Declares that no receive will want a message from ``src`` whose payload starts with the 8
        bytes ``prefix`` (as ``ProcessGroup::forget_prefix``): its stashed frames are dropped now, and
        later ones, when they arrive while another tag is awaited, are read and dropped in bounded
        chunks instead of being stashed. The last ``FORGOTTEN_PREFIXES`` are remembered."""
        p = self.peers.get(src)
        if p is None:
            return
        prefix = bytes(prefix)
        if prefix not in p.forgotten:
            p.forgotten.append(prefix)
        for t in list(p.stash):
            kept = [m for m in p.stash[t] if m[:8] != prefix]
            p.stashed -= sum(len(m) + 64 for m in p.stash[t] if m[:8] == prefix)
            if kept:
                p.stash[t] = kept
            else:
                del p.stash[t]

    @staticmethod
    def _take_stashed(p: _Peer, tag: int, take):
        data = p.stash[tag][0]
        out = take(len(data), None, data)
        p.stash[tag].pop(0)
        if not p.stash[tag]:
            del p.stash[tag]
        p.stashed -= len(data) + 64
        return out

    def _recv(self, src: int, tag: int, timeout: float, take):
        p = self._peer(src)
        if p.stash.get(tag):
            return self._take_stashed(p, tag, take)
        deadline = time.monotonic() + timeout
        done, n = [0], None
        try:
            n = self._next_frame(p, tag, deadline)
            if n is None:
                return self._take_stashed(p, tag, take)
            out = take(n, lambda view: _read_into(p.sock, view, deadline, done), None)
            p.pending = None
            return out
        except _TimedOut:
            if done[0]:
                # Part way through its own message: the message is lost, its rest dropped next.
                p.pending, p.partial = None, _Partial("drop", left=n - done[0])
                raise PgTimeoutMidMessage(
                    f"timed out after {timeout:g} s waiting for tag {tag} from rank {src}, "
                    f"{done[0]} of the message's {n} bytes in: the message is dropped"
                ) from None
            raise PgTimeout(
                f"timed out after {timeout:g} s waiting for tag {tag} from rank {src}"
            ) from None
        except (_Closed, OSError):
            p.poisoned = True
            raise PeerClosed(f"rank {src} closed the connection") from None

    def recv_into(self, src: int, tag: int, parts, timeout: float):
        """Receives the message with ``tag`` from ``src`` straight into ``parts`` (writable byte
        memoryviews, filled in order). Its length must equal theirs, else :class:`LengthMismatch` (the
        message stays first in line)."""
        parts = [memoryview(x).cast("B") for x in parts]
        want = sum(len(x) for x in parts)

        def take(n, read, data):
            if n != want:
                raise LengthMismatch(
                    f"message with tag {tag} from rank {src} has {n} bytes, expected {want}"
                )
            off = 0
            for x in parts:
                if data is None:
                    read(x)
                else:
                    x[:] = data[off : off + len(x)]
                off += len(x)

        self._recv(src, tag, timeout, take)

    def recv_bytes(self, src: int, tag: int, max_len: int, timeout: float) -> bytes:
        """Receives the message with ``tag`` from ``src`` whatever its length up to ``max_len``."""

        def take(n, read, data):
            if n > max_len:
                raise LengthMismatch(
                    f"message with tag {tag} from rank {src} has {n} bytes, more than the limit of {max_len}"
                )
            if data is not None:
                return data
            b = bytearray(n)
            read(memoryview(b))
            return bytes(b)

        return self._recv(src, tag, timeout, take)

    def close(self):
        for p in self.peers.values():
            try:
                p.sock.close()
            except OSError:
                pass
        self.peers = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
