"""pgt.bench: ``pgt.torch.PGTransport`` against torch's own ``PGTransport``, side by side in one run.

    python -m pgt.bench --json [--scenario S …] [--repeat N] [--bytes B] [--pgt-bin PATH]

Spawns the ranks of a gloo process group itself (``torch.multiprocessing``, a FileStore), then for
each scenario runs, N times (default 5), interleaved on that one group (the order rotates from one
repetition to the next): pgt's transport, torch's, and the **floor** — the same bytes through the same
group by plain ``send``/``recv`` of preallocated, touched tensors (messages of at most 64 MiB, every
receive posted ahead) — and, for the scenarios received into fresh memory (``large``, ``small``,
``fanout``), the **fresh floor**: the same sends received into fresh ``torch.empty`` tensors, mapped
ahead by pgt.torch's own prefaulter (``madvise(MADV_POPULATE_WRITE)`` in a thread, the same window),
what landing the bytes in new memory costs here. Figures are medians; ``speedup`` = torch / pgt. A
floor bounds every transport, so ``max_speedup`` = torch / floor (and ``max_speedup_fresh`` = torch /
fresh floor) is the largest speedup this machine allows in that run: ``target_reachable`` says whether
the target is below it (for fresh scenarios, below ``max_speedup_fresh``); a target above it needs pgt
faster than the floor. Timing: every rank leaves a
barrier, then a receiver's clock runs until its ``recv_checkpoint`` returned (metadata checked, every
storage landed and, for pgt, its digest checked); the slowest receiver counts. Off the clock each
receiver compares every received tensor byte for byte with the sender's (regenerated from the same
seed) and, in place, checks that it landed in the target's storage: ``verified``.

Scenarios (PROTOCOL.md's benchmark shapes, as ``pgt bench`` has them):

- ``large``: 16 float32 tensors totalling ``--bytes`` (1 GiB), received into fresh memory;
- ``large-inplace``: the same into preallocated, touched tensors (``state_dict=``);
- ``small``: the 10,220-leaf reference dict of pgt-core (``pgt_core::reference``: 10 × 10 × 100 nested
  dicts of 10,000 float32/bfloat16/int64 tensors of 1–64 KiB, plus 220 values), fresh;
- ``small-inplace``: the same in place;
- ``fanout``: ``large`` to two receivers (each transport's default plan: pgt relays along a chain,
  torch sends to each in turn); the floor sends to both directly;
- ``large-inplace-tcp``: a Python rank receiving ``large`` in place from the Rust ``pgt send`` over
  pgt's TCP group (``pgt.numpy.recv_checkpoint`` into numpy views of torch tensors; ``pgt.torch``
  over a ``TcpGroup`` lands the same way), against the Rust receiver's rate measured by
  ``pgt bench --scenario large-inplace`` in the same run (Rust to Rust, in place); its floor is that
  run's raw loopback TCP figure, ``ratio`` = rust / pgt (``max_ratio`` = rust / floor).

One JSON line per scenario with ``--json``: ``scenario``, ``pgt_seconds``, ``torch_seconds``,
``floor_seconds``, ``speedup``, ``verified`` (the issue's fields), then ``floor_fresh_seconds`` (null in
place), ``max_speedup``, ``max_speedup_fresh``, ``target_reachable``, ``pgt_vs_floor`` (floor / pgt),
``pgt_vs_floor_fresh``, ``target``, sizes and every run's figures; a table otherwise.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing as mp
import os
import queue
import secrets
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

SCENARIOS = ["large", "large-inplace", "small", "small-inplace", "fanout", "large-inplace-tcp"]
# The targets: speedup (torch / pgt) per scenario; for large-inplace-tcp, rust / pgt.
TARGETS = {
    "large": 2.5,
    "large-inplace": 1.5,
    "small": 20.0,
    "small-inplace": 8.0,
    "fanout": 1.5,
    "large-inplace-tcp": 0.5,
}
FLOOR_MESSAGE = 64 << 20
FLOOR_TAG = 1 << 20
TIMEOUT = 600.0

# ---- the checkpoints ----

_M64 = (1 << 64) - 1
ELEMENT = {"float32": 4, "bfloat16": 2, "int64": 8}


def _xorshift():
    """pgt_core::reference's generator (xorshift64*), as a Python iterator of u64."""
    s = 0x9E3779B97F4A7C15
    while True:
        s ^= s >> 12
        s ^= (s << 25) & _M64
        s ^= s >> 27
        yield (s * 0x2545F4914F6CDD1D) & _M64


def reference_spec(tensors: int = 10_000, values: int = 220) -> list:
    """The leaves of pgt-core's reference dict (``pgt_core::reference::reference_metadata``), in
    order: ``(path, ("tensor", dtype, shape))`` or ``(path, ("value", v))``. The full dict is 10,000
    tensors under model.layer{0-9}.block{0-9}.p{0-99} and 220 values under meta.v{0-219}; fewer
    ``tensors`` keep the first ones (the same draws)."""
    rng = _xorshift()
    out = []
    for i in range(10):
        for j in range(10):
            for k in range(100):
                if len(out) == tensors:
                    break
                dtype = ("float32", "bfloat16", "int64")[next(rng) % 3]
                nbytes = 1024 + next(rng) % (63 * 1024 + 1)
                numel = max(nbytes // ELEMENT[dtype], 1)
                shape = [numel // 64, 64] if numel % 64 == 0 and next(rng) % 2 == 0 else [numel]
                out.append((("model", f"layer{i}", f"block{j}", f"p{k}"), ("tensor", dtype, shape)))
    for v in range(values):
        r = next(rng)
        if v % 3 == 0:
            val = ((r ^ (1 << 63)) - (1 << 63)) >> 20  # (next() as i64) >> 20
        elif v % 3 == 1:
            val = (r % 1_000_000) / 7.0
        else:
            val = f"setting-{r % 10_000}"
        out.append((("meta", f"v{v}"), ("value", val)))
    return out


def large_spec(total: int, count: int = 16) -> list:
    """``count`` float32 tensors totalling about ``total`` bytes (pgt_host::synthetic::large)."""
    per = max(total // count // 4, 1)
    return [((f"w{i:02}",), ("tensor", "float32", [per])) for i in range(count)]


def spec_of(scenario: str, opts: dict) -> list:
    if scenario.startswith("small"):
        return reference_spec(opts["small_tensors"])
    return large_spec(opts["bytes"])


def tensor_bytes(spec: list) -> int:
    return sum(ELEMENT[x[1]] * math.prod(x[2]) for _, x in spec if x[0] == "tensor")


class Pattern:
    """Deterministic tensor bytes: tensor i is a window of a seeded random block repeated (the block's
    odd length shifts every repetition, so no two chunks of a tensor or two tensors agree)."""

    BLOCK = (1 << 20) + 4099

    def __init__(self):
        import torch

        g = torch.Generator().manual_seed(20240614)
        self.block = torch.randint(0, 256, (self.BLOCK,), dtype=torch.uint8, generator=g)
        self.long = self.block

    def bytes(self, i: int, n: int):
        start = (i * 7919) % self.BLOCK
        if start + n > len(self.long):
            self.long = self.block.repeat((start + n) // self.BLOCK + 1)
        return self.long[start : start + n]

    def tensor(self, i: int, dtype: str, shape: list):
        import torch

        n = ELEMENT[dtype] * math.prod(shape)
        return self.bytes(i, n).clone().view(getattr(torch, dtype)).reshape(shape)


def build(spec: list, leaf) -> dict:
    """The nested dict of ``spec`` with ``leaf(index, path, form)`` at each leaf."""
    root: dict = {}
    for i, (path, form) in enumerate(spec):
        d = root
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = leaf(i, path, form)
    return root


def get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def sender_dict(spec: list, pat: Pattern) -> dict:
    return build(
        spec,
        lambda i, _p, f: pat.tensor(i, f[1], f[2]) if f[0] == "tensor" else f[1],
    )


def target_dict(spec: list) -> dict:
    import torch

    return build(
        spec,
        lambda _i, _p, f: (
            torch.zeros(f[2], dtype=getattr(torch, f[1])) if f[0] == "tensor" else f[1]
        ),
    )


def verify(spec: list, got, pat: Pattern, targets=None) -> bool:
    """Every leaf of ``got`` equals the sender's, byte for byte; in place, in the target's memory."""
    import torch

    for i, (path, form) in enumerate(spec):
        try:
            x = get(got, path)
        except (KeyError, TypeError):
            return False
        if form[0] == "value":
            if type(x) is not type(form[1]) or x != form[1]:
                return False
            continue
        _, dtype, shape = form
        if not isinstance(x, torch.Tensor) or x.dtype != getattr(torch, dtype):
            return False
        if list(x.shape) != list(shape) or not x.is_contiguous():
            return False
        if targets is not None and x.data_ptr() != get(targets, path).data_ptr():
            return False
        n = ELEMENT[dtype] * math.prod(shape)
        if not torch.equal(x.reshape(-1).view(torch.uint8), pat.bytes(i, n)):
            return False
    return True


# ---- the ranks ----


class _Rank:
    """One rank's state: the scenario's checkpoint (sender), targets and floor buffers (receivers)."""

    def __init__(self, rank: int, world: int):
        import torch
        import torch.distributed as dist

        self.torch, self.dist = torch, dist
        self.rank, self.world = rank, world
        self.pg = dist.group.WORLD
        self.pat = Pattern()
        self.key = None

    def prepare(self, scenario: str, opts: dict):
        if self.key == (scenario, json.dumps(opts, sort_keys=True)):
            return
        self.key = (scenario, json.dumps(opts, sort_keys=True))
        self.sd = self.targets = self.bufs = None
        gc.collect()
        torch = self.torch
        self.spec = spec_of(scenario, opts)
        self.inplace = "inplace" in scenario
        self.dsts = [1, 2] if scenario == "fanout" else [1]
        total = tensor_bytes(self.spec)
        sizes = [min(FLOOR_MESSAGE, total - a) for a in range(0, total, FLOOR_MESSAGE)]
        if self.rank == 0:
            self.sd = sender_dict(self.spec, self.pat)
        if self.rank == 0 or self.rank in self.dsts:
            self.bufs = [torch.empty(n, dtype=torch.uint8).fill_(self.rank + 1) for n in sizes]
        if self.rank in self.dsts and self.inplace:
            self.targets = target_dict(self.spec)

    def _zero_targets(self):
        for _, x in _leaves(self.targets):
            if isinstance(x, self.torch.Tensor):
                x.zero_()

    def _transport(self, impl: str, receiving: bool):
        torch = self.torch
        if impl == "pgt":
            from pgt.torch import PGTransport
        else:
            from torch.distributed.checkpoint._pg_transport import PGTransport
        sd = (lambda: self.targets) if receiving and self.inplace else None
        return PGTransport(self.pg, timedelta(seconds=TIMEOUT), torch.device("cpu"), state_dict=sd)

    def _floor(self, fresh: bool = False):
        """The floor: the checkpoint's bytes by plain sends of the sender's touched buffers, received
        into touched buffers, or (``fresh``) into new ``torch.empty`` ones that pgt.torch's prefaulter
        maps ahead of the data as it does for a fresh receive (a receiver's new memory, not the
        sender's, is what a fresh scenario adds)."""
        works, bufs, prefault = [], self.bufs, None
        if self.rank == 0:
            for i, b in enumerate(bufs):
                works += [self.pg.send([b], d, FLOOR_TAG + i) for d in self.dsts]
        elif self.rank in self.dsts:
            if fresh:
                from pgt.torch import _madvise, _Prefault

                bufs = [self.torch.empty(b.numel(), dtype=self.torch.uint8) for b in bufs]
                prefault = _Prefault(bufs) if _madvise() else None
            works = [self.pg.recv([b], 0, FLOOR_TAG + i) for i, b in enumerate(bufs)]
        try:
            for i, w in enumerate(works):
                w.wait(timedelta(seconds=TIMEOUT))
                if prefault is not None:  # (a receiver: works[i] lands in bufs[i])
                    prefault.advance(bufs[i].numel())
        finally:
            if prefault is not None:
                prefault.stop()

    def run(self, scenario: str, impl: str, opts: dict) -> dict:
        self.prepare(scenario, opts)
        torch = self.torch
        receiving = self.rank in self.dsts
        if self.targets is not None:
            self._zero_targets()
        gc.collect()
        prof = None
        if opts.get("profile") and impl == "pgt":
            import cProfile

            prof = cProfile.Profile()
        self.dist.barrier()
        t0 = time.perf_counter()
        if prof is not None:
            prof.enable()
        got = None
        if impl in ("floor", "floor_fresh"):
            self._floor(fresh=impl == "floor_fresh")
        elif self.rank == 0:
            self._transport(impl, False).send_checkpoint(self.dsts, self.sd)
        elif receiving:
            got = self._transport(impl, True).recv_checkpoint(0)
        seconds = time.perf_counter() - t0
        if prof is not None:
            prof.disable()
            prof.dump_stats(os.path.join(opts["profile"], f"{scenario}-rank{self.rank}.prof"))
        out = {"rank": self.rank, "seconds": seconds if receiving else None}
        if receiving and not impl.startswith("floor"):
            out["verified"] = verify(self.spec, got, self.pat, self.targets)
        del got
        gc.collect()
        del torch
        return out

    def tcp_recv(self, port: int, token: str, opts: dict) -> dict:
        """Rank 1 of a TCP job whose rank 0 is ``pgt send``: receives ``large`` in place."""
        from pgt.numpy import recv_checkpoint
        from pgt.tcp import TcpGroup, TcpOptions

        self.prepare("large-inplace", opts)
        self._zero_targets()
        arrays = build(self.spec, lambda _i, p, _f: get(self.targets, p).numpy())
        pg = TcpGroup.join(
            TcpOptions("127.0.0.1", port, 1, 2, token.encode(), timeout=TIMEOUT), lambda m: None
        )
        try:
            t0 = time.perf_counter()
            got = recv_checkpoint(pg, 0, state_dict=arrays, timeout=TIMEOUT)
            seconds = time.perf_counter() - t0
        finally:
            pg.close()
        ok = all(get(got, p) is get(arrays, p) for p, _ in self.spec)
        ok = ok and verify(self.spec, self.targets, self.pat, self.targets)
        return {"rank": 1, "seconds": seconds, "verified": ok}


def _leaves(tree, path=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, (*path, k))
    else:
        yield path, tree


def _worker(rank: int, world: int, store: str, jobs, results):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=TIMEOUT),
    )
    state = _Rank(rank, world)
    while True:
        job = jobs.get()
        if job is None:
            break
        name, args = job
        try:
            results.put((rank, True, getattr(state, name)(*args)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class Ranks:
    """``world`` gloo ranks, each running the same job of ``_Rank`` at each ``run``."""

    def __init__(self, world: int):
        ctx = mp.get_context("spawn")
        self.world = world
        self.dir = tempfile.mkdtemp(prefix="pgt-bench-")
        store = os.path.join(self.dir, "store")
        self.results = ctx.Queue()
        self.jobs = [ctx.Queue() for _ in range(world)]
        self.procs = [
            ctx.Process(
                target=_worker, args=(r, world, store, self.jobs[r], self.results), daemon=True
            )
            for r in range(world)
        ]
        for p in self.procs:
            p.start()
        self.broken = False

    def run(self, name: str, *args, ranks=None) -> list:
        ranks = list(range(self.world)) if ranks is None else ranks
        for r in ranks:
            self.jobs[r].put((name, args))
        out = [None] * self.world
        for _ in ranks:
            try:
                rank, ok, value = self.results.get(timeout=TIMEOUT + 60)
            except queue.Empty:
                self.broken = True
                raise RuntimeError(f"{name}: a rank did not finish in time") from None
            if not ok:  # the other ranks may wait for it forever: give up on the group
                self.broken = True
                raise RuntimeError(f"{name} failed on rank {rank}:\n{value}")
            out[rank] = value
        return out

    def close(self):
        for q in self.jobs:
            q.put(None)
        for p in self.procs:
            p.join(timeout=1 if self.broken else 30)
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---- the driver ----


def _median(xs):
    return statistics.median(xs) if xs else None


def _slowest(reports: list) -> float:
    return max(r["seconds"] for r in reports if r and r["seconds"] is not None)


def _ratio(a, b):
    return None if a is None or b is None else round(a / b, 3)


def gloo_scenario(ranks: Ranks, scenario: str, repeat: int, opts: dict) -> dict:
    fresh = "inplace" not in scenario
    impls = ["pgt", "torch", "floor"] + (["floor_fresh"] if fresh else [])
    runs: dict = {i: [] for i in impls}
    verified = True
    for rep in range(repeat):
        k = rep % len(impls)
        for impl in impls[k:] + impls[:k]:
            reports = ranks.run("run", scenario, impl, opts)
            runs[impl].append(_slowest(reports))
            verified &= all(r.get("verified", True) for r in reports if r)
    spec = spec_of(scenario, opts)
    pgt, tor, floor = (_median(runs[i]) for i in impls[:3])
    floor_fresh = _median(runs["floor_fresh"]) if fresh else None
    # The largest speedup the floor leaves room for (fresh scenarios: the fresh floor).
    bound = _ratio(tor, floor_fresh if fresh else floor)
    return {
        "scenario": scenario,
        "pgt_seconds": round(pgt, 4),
        "torch_seconds": round(tor, 4),
        "floor_seconds": round(floor, 4),
        "speedup": round(tor / pgt, 3),
        "verified": verified,
        "floor_fresh_seconds": None if floor_fresh is None else round(floor_fresh, 4),
        "max_speedup": _ratio(tor, floor),
        "max_speedup_fresh": _ratio(tor, floor_fresh),
        "target_reachable": TARGETS[scenario] <= bound,
        "pgt_vs_floor": round(floor / pgt, 3),
        "pgt_vs_floor_fresh": _ratio(floor_fresh, pgt),
        "target": TARGETS[scenario],
        "bytes": tensor_bytes(spec),
        "leaves": len(spec),
        "repeat": repeat,
        "runs": {i: [round(x, 4) for x in runs[i]] for i in impls},
    }


def _free_port() -> int:
    """A free TCP port below the ephemeral range (32768-60999)."""
    for _ in range(200):
        port = 20000 + secrets.randbelow(12000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def write_safetensors(path: Path, spec: list, pat: Pattern):
    """``spec``'s tensors (float32, flat names) as a safetensors file, the sender's bytes."""
    header, at = {}, 0
    for i, (p, (_, dtype, shape)) in enumerate(spec):
        n = ELEMENT[dtype] * math.prod(shape)
        header[".".join(p)] = {"dtype": "F32", "shape": shape, "data_offsets": [at, at + n]}
        at += n
        del i
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for i, (_, (_, dtype, shape)) in enumerate(spec):
            f.write(pat.bytes(i, ELEMENT[dtype] * math.prod(shape)).numpy().tobytes())


def tcp_scenario(ranks: Ranks, repeat: int, opts: dict, pgt_bin: str) -> dict:
    spec = spec_of("large-inplace", opts)
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    path = shm / f"pgt-bench-{os.getpid()}.safetensors"
    write_safetensors(path, spec, Pattern())
    py_runs, rust_runs, raw, verified = [], [], [], True
    try:
        for rep in range(repeat):
            for which in ("python", "rust") if rep % 2 == 0 else ("rust", "python"):
                if which == "rust":
                    cmd = [pgt_bin, "bench", "--scenario", "large-inplace", "--json"]
                    cmd += ["--bytes", str(opts["bytes"]), "--repeat", "1"]
                    out = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
                    if out.returncode != 0:
                        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr}")
                    line = json.loads(out.stdout.strip().splitlines()[-1])
                    rust_runs.append(line["seconds"])
                    raw.append(line["bytes"] / (line["raw_gbps"] * 1e9))
                    verified &= bool(line["verified"])
                    continue
                port, token = _free_port(), secrets.token_hex(16)
                env = dict(os.environ, RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
                env.update(MASTER_PORT=str(port), PGT_TOKEN=token)
                sender = subprocess.Popen(
                    [pgt_bin, "send", str(path), "--dst", "1", "--quiet"],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                try:
                    rep_out = ranks.run("tcp_recv", port, token, opts, ranks=[1])[1]
                finally:
                    _, err = sender.communicate(timeout=TIMEOUT)
                if sender.returncode != 0:
                    raise RuntimeError(f"pgt send failed:\n{err}")
                py_runs.append(rep_out["seconds"])
                verified &= rep_out["verified"]
    finally:
        path.unlink(missing_ok=True)
    pgt, rust, floor = _median(py_runs), _median(rust_runs), _median(raw)
    return {
        "scenario": "large-inplace-tcp",
        "pgt_seconds": round(pgt, 4),
        "torch_seconds": None,
        "floor_seconds": round(floor, 4),
        "speedup": None,
        "verified": verified,
        "floor_fresh_seconds": None,
        "max_speedup": None,
        "max_speedup_fresh": None,
        "rust_seconds": round(rust, 4),
        "ratio": round(rust / pgt, 3),
        "max_ratio": _ratio(rust, floor),
        "target_reachable": TARGETS["large-inplace-tcp"] <= _ratio(rust, floor),
        "pgt_vs_floor": round(floor / pgt, 3),
        "target": TARGETS["large-inplace-tcp"],
        "bytes": tensor_bytes(spec),
        "leaves": len(spec),
        "repeat": repeat,
        "pgt_bin": pgt_bin,
        "runs": {"pgt": [round(x, 4) for x in py_runs], "rust": rust_runs},
    }


def parse_size(s: str) -> int:
    units = {"": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30}
    units["gib"] = 1 << 30
    s = s.strip().lower()
    num = s.rstrip("kmgib")
    return int(float(num) * units[s[len(num) :]])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pgt.bench", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="one JSON line per scenario")
    p.add_argument("--scenario", action="append", choices=SCENARIOS, help="default: all")
    p.add_argument("--repeat", type=int, default=5, help="runs of each transport (medians)")
    p.add_argument("--bytes", type=parse_size, default=1 << 30, help="large/fanout size (1GiB)")
    p.add_argument(
        "--small-tensors", type=int, default=10_000, help="tensors of the reference dict (10000)"
    )
    p.add_argument("--pgt-bin", default=os.environ.get("PGT_BIN"), help="the Rust pgt ($PGT_BIN)")
    p.add_argument("--profile", metavar="DIR", help=argparse.SUPPRESS)  # cProfile pgt's runs
    args = p.parse_args(argv)
    scenarios = args.scenario or SCENARIOS
    if "large-inplace-tcp" in scenarios and not args.pgt_bin:
        if args.scenario:
            p.error("large-inplace-tcp needs the Rust pgt binary: --pgt-bin or $PGT_BIN")
        scenarios = [s for s in scenarios if s != "large-inplace-tcp"]
    opts = {"bytes": args.bytes, "small_tensors": args.small_tensors}
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        opts["profile"] = os.path.abspath(args.profile)
    ranks = Ranks(3 if "fanout" in scenarios else 2)
    lines = []
    try:
        for s in scenarios:
            if s == "large-inplace-tcp":
                line = tcp_scenario(ranks, args.repeat, opts, args.pgt_bin)
            else:
                line = gloo_scenario(ranks, s, args.repeat, opts)
            line["load"] = round(os.getloadavg()[0], 2)
            lines.append(line)
            if args.json:
                print(json.dumps(line), flush=True)
    finally:
        ranks.close()
    if not args.json:
        print(
            f"{'scenario':<18} {'pgt s':>8} {'torch s':>10} {'floor s':>8} {'fresh s':>8} "
            f"{'speedup':>8} {'max':>7} {'target':>7} {'pgt/floor':>9}  verified"
        )
        for x in lines:
            if x["torch_seconds"] is None:
                torch_s, speed = f"rust {x['rust_seconds']:.3f}", f"{x['ratio']:.2f}x"
                best = x["max_ratio"]
            else:
                torch_s, speed = f"{x['torch_seconds']:.3f}", f"{x['speedup']:.2f}x"
                best = x["max_speedup_fresh"] or x["max_speedup"]
            fresh = x["floor_fresh_seconds"]
            print(
                f"{x['scenario']:<18} {x['pgt_seconds']:>8.3f} {torch_s:>10} "
                f"{x['floor_seconds']:>8.3f} {'-' if fresh is None else f'{fresh:.3f}':>8} "
                f"{speed:>8} {best:>6.2f}x {x['target']:>6}x "
                f"{x['floor_seconds'] / x['pgt_seconds']:>9.2f}  {x['verified']}"
            )
    return 0 if all(x["verified"] for x in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
