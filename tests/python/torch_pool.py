"""A pool of torch.distributed ranks for the pgt.torch tests: WORLD processes (spawned once per test
session, gloo over a FileStore) that run the same function of ``torch_cases`` at each ``run``, as
PyTorch's MultiProcContinousTest does. A case that hangs past its timeout takes the pool down; the
next test gets a fresh one."""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import traceback
from datetime import timedelta


def _worker(rank: int, world: int, store: str, jobs, results, path: list):
    sys.path[:0] = [p for p in path if p not in sys.path]
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    cases = importlib.import_module("torch_cases")
    while True:
        job = jobs.get()
        if job is None:
            break
        name, args = job
        try:
            results.put((rank, True, getattr(cases, name)(rank, world, *args)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class Pool:
    def __init__(self, world: int):
        ctx = mp.get_context("spawn")
        self.world = world
        fd, self.store = tempfile.mkstemp(prefix="pgt-torch-store-")
        os.close(fd)
        os.unlink(self.store)
        here = os.path.dirname(os.path.abspath(__file__))
        self.results = ctx.Queue()
        self.jobs = [ctx.Queue() for _ in range(world)]
        self.procs = [
            ctx.Process(
                target=_worker,
                args=(r, world, self.store, self.jobs[r], self.results, [here]),
                daemon=True,
            )
            for r in range(world)
        ]
        for p in self.procs:
            p.start()
        self.broken = False

    def run(self, name: str, *args, timeout: float = 120.0) -> list:
        """Runs ``torch_cases.name(rank, world, *args)`` on every rank; its return values by rank.
        Fails with every failing rank's traceback."""
        for q in self.jobs:
            q.put((name, args))
        out, errors = [None] * self.world, []
        for _ in range(self.world):
            try:
                rank, ok, value = self.results.get(timeout=timeout)
            except queue.Empty:
                self.broken = True
                self.close()
                raise AssertionError(f"{name}: a rank did not finish within {timeout} s") from None
            if ok:
                out[rank] = value
            else:
                errors.append(f"--- rank {rank} ---\n{value}")
        if errors:
            raise AssertionError(f"{name} failed:\n" + "\n".join(sorted(errors)))
        return out

    def close(self):
        if not self.broken:
            for q in self.jobs:
                q.put(None)
            for p in self.procs:
                p.join(timeout=20)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join()
        with_store = self.store
        if os.path.exists(with_store):
            os.unlink(with_store)
