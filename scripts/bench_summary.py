"""Median table of scripts/bench-compare.sh's JSON lines: seconds and ratio to raw, old vs new."""

import collections
import json
import statistics
import sys


def median(runs: list, field: int) -> float:
    return statistics.median(r[field] for r in runs)


rows: dict = collections.defaultdict(lambda: collections.defaultdict(list))
for line in open(sys.argv[1]):
    d = json.loads(line)
    o = d["out"]
    if o:
        rows[d["case"]][d["which"]].append(
            (o["seconds"], o["ratio"], o.get("verified"), float(d["load"]))
        )
print("| scenario | old s | new s | new/old s | old ratio | new ratio | runs | verified | load |")
print("|---|---|---|---|---|---|---|---|---|")
for case, w in rows.items():
    old, new = w["old"], w["new"]
    if not old or not new:
        continue
    loads = [r[3] for r in old + new]
    print(
        f"| `{case}` | {median(old, 0):.3f} | {median(new, 0):.3f} | "
        f"{median(new, 0) / median(old, 0):.2f} | {median(old, 1):.3f} | {median(new, 1):.3f} | "
        f"{len(old)}/{len(new)} | {all(r[2] for r in old + new)} | "
        f"{min(loads):.1f}–{max(loads):.1f} |"
    )
