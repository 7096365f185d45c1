"""Median table of scripts/bench-compare.sh's JSON lines, old vs new: seconds, CPU seconds (all ranks,
the primary figure on a loaded machine, then receiver and sender), ratio to the floor and to raw."""

import collections
import json
import statistics
import sys

FIELDS = [
    ("seconds", "s"),
    ("total_cpu_seconds", "CPU s"),
    ("receiver_cpu_seconds", "recv CPU s"),
    ("sender_cpu_seconds", "send CPU s"),
    ("ratio_to_floor", "ratio to floor"),
    ("ratio", "ratio to raw"),
]

rows: dict = collections.defaultdict(lambda: collections.defaultdict(list))
for line in open(sys.argv[1]):
    d = json.loads(line)
    o = d["out"]
    if o:
        o["load"] = float(d["load"])
        rows[d["case"]][d["which"]].append(o)


def med(runs: list, field: str) -> float:
    values = [r[field] for r in runs if r.get(field) is not None]
    return statistics.median(values) if values else float("nan")


head = " | ".join(f"old {n} | new {n}" for _, n in FIELDS)
print(f"| scenario | {head} | new/old CPU | runs | verified | load |")
print("|---|" + "---|" * (2 * len(FIELDS) + 4))
for case, w in rows.items():
    old, new = w["old"], w["new"]
    if not old or not new:
        continue
    loads = [r["load"] for r in old + new]
    cells = " | ".join(f"{med(old, f):.3f} | {med(new, f):.3f}" for f, _ in FIELDS)
    cpu = med(new, "total_cpu_seconds") / med(old, "total_cpu_seconds")
    print(
        f"| `{case}` | {cells} | {cpu:.2f} | {len(old)}/{len(new)} | "
        f"{all(r.get('verified') for r in old + new)} | {min(loads):.1f}–{max(loads):.1f} |"
    )
