#!/usr/bin/env bash
# Two builds of `pgt` side by side: every scenario of scripts/bench.sh, both binaries per repetition,
# the order alternating, each run paired with its own raw loopback measurement by `pgt bench`. Prints
# the median table (scripts/bench_summary.py); the JSON lines go to $OUT (default bench-compare.jsonl).
#
# Usage: OLD=path/to/old/pgt NEW=path/to/new/pgt [REPS=5] [OUT=file] scripts/bench-compare.sh [SCENARIO…]
#   (build each with `cargo build --release -p pgt-host --bin pgt`, the old one in a worktree of its commit)
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OLD:?path of the old pgt binary}" "${NEW:?path of the new pgt binary}"
REPS=${REPS:-5}
OUT=${OUT:-bench-compare.jsonl}
if [ $# -gt 0 ]; then scen=("$@"); else
  scen=("large" "large --no-digests" "large-pooled" "large-inplace" "fanout"
        "small" "small-inplace" "small --core wasm" "small-inplace --core wasm")
fi
: >"$OUT"
for s in "${scen[@]}"; do
  for r in $(seq 1 "$REPS"); do
    if [ $((r % 2)) = 1 ]; then order="old new"; else order="new old"; fi
    for which in $order; do
      bin=$OLD; [ "$which" = new ] && bin=$NEW
      # shellcheck disable=SC2086 # a scenario is words: "small --core wasm"
      line=$("$bin" bench --json --repeat 1 --scenario $s 2>/dev/null | tail -1)
      echo "{\"which\":\"$which\",\"case\":\"$s\",\"rep\":$r,\"load\":\"$(cut -d' ' -f1 /proc/loadavg)\",\"out\":${line:-null}}" >>"$OUT"
    done
  done
done
python3 scripts/bench_summary.py "$OUT"
