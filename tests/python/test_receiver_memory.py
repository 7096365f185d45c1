"""`python -m pgt recv` against metadata that announces far more than is ever sent (issue 10 #3, for
the Python receiver): memory follows the data — the announced storages are not committed up front —
and a checkpoint over the receiver's memory budget is refused (MemoryBudget) before anything is
allocated."""

from __future__ import annotations

import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

from test_python_receiver import free_port, job_env

from pgt.abi import Pgt
from pgt.metadata import encode
from pgt.tcp import TcpGroup, TcpOptions

ROOT = Path(__file__).resolve().parents[2]
HALF_GIB = 512 << 20


def _announce_and_stall(port: int, token: str, metadata: bytes, stall: float, errors: list):
    """Rank 0: sends the header and the metadata, then nothing, for ``stall`` seconds."""
    try:
        s = Pgt.load().sender(metadata, digests=True, transfer_id=secrets.randbits(64))
        with TcpGroup.join(TcpOptions("127.0.0.1", port, 0, 2, token.encode(), timeout=30)) as pg:
            for _ in range(2):
                op = s.poll()
                pg.send(op["to"], op["tag"], [s.bytes(op["message"])], 30)
            time.sleep(stall)
    except Exception as e:  # reported by the test
        errors.append(e)


def _vm_kib(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _run(tmp_path, *extra, timeout: float = 3.0):
    """Two fresh float32 storages of 512 MiB announced, no data: the receiver's exit code, stderr and
    peak RSS (VmHWM, read while it waits for the data)."""
    layout = {"dtype": "float32", "shape": [HALF_GIB // 4], "stride": [1], "storage_offset": 0}
    leaf = {"kind": "tensor", "layout": {**layout, "nbytes": HALF_GIB}}
    # pgt's default plan: 4 MiB chunks, 256 data messages.
    metadata = encode(
        1, 0, [1], {"fanout": "Direct"}, [{"dict": ["a", "b"]}, "leaf", "leaf"], [leaf] * 2
    )
    port, token, errors = free_port(), secrets.token_hex(16), []
    sender = threading.Thread(
        target=_announce_and_stall, args=(port, token, metadata, timeout + 5, errors), daemon=True
    )
    sender.start()
    out = tmp_path / "out.safetensors"
    argv = [sys.executable, "-m", "pgt", "recv", "--out", out, "--timeout", str(timeout), *extra]
    env = dict(job_env(port, 2, token), RANK="1")
    p = subprocess.Popen(
        [str(a) for a in argv], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    peak = 0
    deadline = time.monotonic() + timeout + 30
    while p.poll() is None and time.monotonic() < deadline:
        peak = max(peak, _vm_kib(p.pid, "VmHWM") or 0)
        time.sleep(0.05)
    if p.poll() is None:
        p.kill()
    _, err = p.communicate()
    assert not errors, errors
    assert not list(tmp_path.iterdir()), "a failed receive leaves no file"
    return p.returncode, err, peak << 10


def test_announced_storages_are_not_committed(tmp_path):
    code, err, peak = _run(tmp_path)
    assert code == 3 and "PgTimeout" in err, err  # the data never comes
    # 1 GiB announced; the receiver (Python, numpy, wasmtime) stays near its own size.
    assert 0 < peak < 192 << 20, f"peak RSS {peak >> 20} MiB with 1 GiB announced and none sent"


def test_a_checkpoint_over_the_memory_budget_is_refused(tmp_path):
    code, err, _ = _run(tmp_path, "--memory-budget", "768MiB")
    assert code == 1, err
    assert f"MemoryBudget: receiving needs {2 * HALF_GIB} bytes" in err, err
    assert f"memory budget of {768 << 20} bytes" in err, err


def test_a_socket_connected_to_itself_is_recognised():
    # What the kernel can do to a rank retrying the store's port before the store listens: the same
    # address on both ends (TCP simultaneous open). The rendezvous resets such a socket and retries.
    import socket

    from pgt.tcp import is_self_connected

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.connect(s.getsockname())
        assert is_self_connected(s)
    with socket.socket() as server, socket.socket() as c:
        server.bind(("127.0.0.1", 0))
        server.listen()
        c.connect(server.getsockname())
        assert not is_self_connected(c)


def test_a_plan_of_a_million_messages_is_refused_from_a_few_bytes(tmp_path):
    # 1 GiB in 1 KiB chunks: 2^20 data messages, within the module's default limit, but a Python
    # receiver decodes the plan into objects — it refuses plans over HOST_MAX_MESSAGES instead.
    from pgt.abi import HOST_MAX_MESSAGES

    leaf = {
        "kind": "tensor",
        "layout": {"dtype": "uint8", "shape": [1 << 30], "stride": [1], "storage_offset": 0},
    }
    leaf["layout"]["nbytes"] = 1 << 30
    metadata = encode(None, 0, [1], {"bucket_size": 0, "chunk_size": 1024}, ["leaf"], [leaf])
    header, message = Pgt.load().encode(metadata, True, secrets.randbits(64))
    port, token, errors = free_port(), secrets.token_hex(16), []

    def rank0():
        try:
            with TcpGroup.join(
                TcpOptions("127.0.0.1", port, 0, 2, token.encode(), timeout=30)
            ) as pg:
                pg.send(1, 1, [header], 30)
                pg.send(1, 2, [message], 30)
                time.sleep(8)
        except Exception as e:
            errors.append(e)

    threading.Thread(target=rank0, daemon=True).start()
    argv = [sys.executable, "-m", "pgt", "recv", "--out", tmp_path / "o.safetensors"]
    env = dict(job_env(port, 2, token), RANK="1")
    started = time.monotonic()
    p = subprocess.run(
        [str(a) for a in argv], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 1, p.stderr
    assert "TooManyMessages" in p.stderr and str(HOST_MAX_MESSAGES) in p.stderr, p.stderr
    assert time.monotonic() - started < 8, "refused from the metadata, not after a timeout"
    assert not list(tmp_path.iterdir())
