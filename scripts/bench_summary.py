"""Median table of scripts/bench-compare.sh's JSON lines: seconds and ratio to raw, old vs new."""

import collections
import json
import statistics as st
import sys

rows = collections.defaultdict(lambda: collections.defaultdict(list))
for line in open(sys.argv[1]):
    d = json.loads(line)
    o = d["out"]
    if not o:
        continue
    r = rows[d["case"]][d["which"]]
    r.append((o["seconds"], o["ratio"], o["raw_gbps"], o.get("verified"), float(d["load"])))
print("| scenario | old s | new s | new/old s | old ratio | new ratio | runs | verified | load |")
print("|---|---|---|---|---|---|---|---|---|")
for case, w in rows.items():
    o, n = w["old"], w["new"]
    if not o or not n:
        continue
    ms = lambda xs, i: st.median(x[i] for x in xs)
    print(
        f"| `{case}` | {ms(o, 0):.3f} | {ms(n, 0):.3f} | {ms(n, 0) / ms(o, 0):.2f} | {ms(o, 1):.3f} | {ms(n, 1):.3f} | {len(o)}/{len(n)} | {all(x[3] for x in o + n)} | {min(x[4] for x in o + n):.1f}–{max(x[4] for x in o + n):.1f} |"
    )
