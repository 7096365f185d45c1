"""``python -m pgt send FILE --dst 1,2``: send a safetensors file to receiving ranks, as ``pgt send``.

    MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 RANK=0 WORLD_SIZE=3 PGT_TOKEN=… \\
        python -m pgt send model.safetensors --dst 1,2 [--fanout chain|direct] [--step N]

The file is memory-mapped and read as pgt's Rust ``safetensors_io::load`` reads it
(``pgt.safetensors_io``): its bytes go to the wire without a copy, named as ``pgt recv`` will name
them. The receivers may be Rust (``pgt recv``, ``Transport``) or Python (``python -m pgt recv``,
``pgt.numpy.recv_checkpoint``) ranks.

Exit status: 0 sent; 1 pgt protocol error (the module's named error); 2 usage, setup or file error;
3 process-group error (authentication, rendezvous, timeout, peer closed).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import wasmtime

from .abi import PgtError
from .metadata import encode
from .recv import (
    EXIT_GROUP,
    EXIT_PROTOCOL,
    EXIT_SETUP,
    Log,
    add_group_args,
    load_module,
    options_from,
)
from .safetensors_io import SafetensorsError, load
from .send import DestinationsFailed, TcpSendHost, send
from .tcp import PgError, TcpGroup

UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
}


def parse_size(s: str) -> int:
    """A byte size as ``pgt``'s flags take it: ``1048576``, ``64KiB``, ``16MiB``, ``1.5GB``."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", s)
    if not m or m.group(2).lower() not in UNITS:
        raise argparse.ArgumentTypeError(f"{s!r} is not a size")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def parse_ranks(s: str) -> list[int]:
    try:
        ranks = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of ranks") from None
    if any(r < 0 for r in ranks):
        raise argparse.ArgumentTypeError(f"{s!r}: ranks are non-negative")
    return ranks


def human(n: int) -> str:
    v, units = float(n), ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    u = 0
    while v >= 1024 and u + 1 < len(units):
        v /= 1024
        u += 1
    return f"{n} B" if u == 0 else f"{v:.1f} {units[u]}"


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m pgt send",
        description="Send a safetensors file to receiving ranks (pgt's wasm module runs the protocol).",
        epilog="Flags default to the torch-style environment: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, "
        "PGT_TOKEN, PGT_TIMEOUT_SECS (setup timeout), PGT_LISTEN_HOST, PGT_WASM_MODULE.",
    )
    p.add_argument("file", type=Path, help="the safetensors file to send (memory-mapped)")
    p.add_argument(
        "--dst",
        type=parse_ranks,
        help="receiving ranks, comma-separated (e.g. 1,2); in chain fan-out also the relay order. "
        "Default: every other rank of the job, in rank order",
    )
    p.add_argument(
        "--step", type=int, help="training step to send (default: the file's pgt.step entry)"
    )
    p.add_argument("--fanout", choices=["chain", "direct"], default="chain", help="default chain")
    p.add_argument(
        "--bucket-size",
        type=parse_size,
        default=1 << 20,
        help="storages up to this size are coalesced into buckets of this size (default 1MiB)",
    )
    p.add_argument(
        "--chunk-size",
        type=parse_size,
        default=4 << 20,
        help="larger storages travel in chunks of this size (a multiple of 64, at most 1GiB; default 4MiB)",
    )
    p.add_argument("--no-digests", action="store_true", help="skip the per-tensor digests")
    p.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="per-operation timeout in seconds (default 120)",
    )
    add_group_args(p)
    args = p.parse_args(argv)
    if args.step is not None and not 0 <= args.step < 1 << 64:
        p.error(f"--step {args.step} is not a u64")
    if not args.timeout > 0:
        p.error("--timeout must be a positive number")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    log = Log(args.verbose, args.quiet)

    def fail(code: int, msg: str) -> int:
        print(f"pgt send: error: {msg}", file=sys.stderr)
        return code

    plan = {
        "fanout": args.fanout.capitalize(),
        "bucket_size": args.bucket_size,
        "chunk_size": args.chunk_size,
    }
    try:
        opts = options_from(args)
        pgt = load_module(args.wasm)
        # Bad flags fail before joining: the module checks the plan on an empty checkpoint.
        pgt.encode(encode(None, 0, [1], plan, [{"dict": []}], []), True, 0)
    except PgtError as e:
        return fail(EXIT_SETUP, f"invalid --bucket-size/--chunk-size: {e.name}: {e.message}")
    except (PgError, FileNotFoundError, RuntimeError) as e:
        return fail(EXIT_SETUP, str(e))
    pg = None
    what = f"sending {args.file}"
    try:
        pg = TcpGroup.join(opts, log=log.debug)
        # Joined, then loaded: a bad file fails the job at once (peers see the connection close)
        # instead of leaving them waiting at the rendezvous.
        dst = args.dst if args.dst else [r for r in range(pg.size) if r != pg.rank]
        if not dst:
            return fail(EXIT_SETUP, "a job of one rank has nobody to send to")
        f = load(args.file)
        step = args.step if args.step is not None else f.step
        what = f"sending {args.file} to rank(s) {','.join(map(str, dst))}"
        metadata = encode(step, pg.rank, dst, plan, f.tree, f.leaves)
        start = time.monotonic()
        send(
            pgt,
            TcpSendHost(pg, args.timeout),
            metadata,
            f.storages,
            digests=not args.no_digests,
        )
        seconds = time.monotonic() - start
    except SafetensorsError as e:
        return fail(EXIT_SETUP, str(e))
    except PgtError as e:
        return fail(EXIT_PROTOCOL, f"{what}: pgt error {e.name}: {e.message}")
    except PgError as e:
        if pg is None:
            where = (
                f"rank {opts.rank} could not join the job at {opts.master_addr}:{opts.master_port}"
            )
        else:
            where = what
        return fail(EXIT_GROUP, f"{where}: {type(e).__name__}: {e}")
    except DestinationsFailed as e:
        return fail(EXIT_GROUP, f"{what}: {e}")
    except (wasmtime.Trap, wasmtime.WasmtimeError, RuntimeError, ValueError) as e:
        return fail(EXIT_PROTOCOL, f"{what}: {type(e).__name__}: {e}")
    finally:
        if pg is not None:
            pg.close()
    total = sum(len(s) for s in f.storages)
    if not args.quiet:
        print(
            f"sent {args.file} to rank(s) {','.join(map(str, dst))}: {total} bytes ({human(total)}), "
            f"{len(f.storages)} tensors, {seconds:.3f} s, {total / max(seconds, 1e-9) / 1e9:.2f} GB/s"
        )
    return 0
