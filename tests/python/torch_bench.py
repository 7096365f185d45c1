"""The measurement behind pgt.torch's framing (run by hand, 2 gloo ranks):

    python tests/python/torch_bench.py [N SIZE]

receives N float32 tensors of SIZE bytes each (default 10,000 of 8 KiB: as many leaves as the
10,220-leaf reference dict) with every small segment a part of its own (STAGE_MIN = 1) and with runs of
small segments staged (STAGE_MIN = 64 KiB), then with torch's own PGTransport; median of 3 each."""

import statistics
import sys

from torch_pool import Pool

if __name__ == "__main__":
    n, size = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (10_000, 8192)
    pool = Pool(2)
    try:
        for label, case, args in [
            ("pgt, one part per segment", "many_small_tensors", (n, size, 1)),
            ("pgt, small segments staged", "many_small_tensors", (n, size, 64 << 10)),
            ("torch PGTransport", "torch_many_small_tensors", (n, size)),
        ]:
            runs = [pool.run(case, *args, timeout=600)[1] for _ in range(3)]
            med = statistics.median(runs)
            print(
                f"{label}: {med:.3f} s ({n * size / med / 1e6:.0f} MB/s; runs "
                + ", ".join(f"{r:.3f}" for r in runs)
                + ")",
                flush=True,
            )
    finally:
        pool.close()
