#!/usr/bin/env bash
# Runs every benchmark and prints one JSON line each (the README's table comes from this): every
# `pgt bench` line has pgt's seconds, its scenario's floor (`floor_seconds`, `ratio_to_floor`), with
# digests on its digest floor (`digest_floor_seconds`, `ratio_to_digest_floor`: the floor's loop
# hashing every byte once per rank) and raw loopback TCP (`raw_*`), medians of 5; with `mpirun` on the
# PATH, also the `--pg mpi` rows.
# Usage: ./scripts/bench.sh > docs/bench/DATE.jsonl   (release builds; ~15 minutes on 2 cores)
# Progress and the load average before each row go to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
features=()
if command -v mpirun >/dev/null; then features=(--features mpi); fi
cargo build --release -q -p pgt-host "${features[@]}" --bin pgt --example decode_bench
cargo build --release -q -p pgt-core --example metabench
T="${CARGO_TARGET_DIR:-target}/release"
run() { echo "# pgt bench $* (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2; "$T/pgt" bench --json --repeat 5 "$@"; }
run --scenario large
run --scenario large --no-digests
run --scenario large-pooled
run --scenario large-inplace
run --scenario large-inplace --no-digests
run --scenario fanout
run --scenario fanout --fanout direct
run --scenario small
run --scenario small-inplace
# A long-lived sender's and receiver's steady state: each pgt run's processes transfer once untimed first.
run --scenario small --warmup 1
run --scenario small-inplace --warmup 1
run --scenario small --core wasm
run --scenario small-inplace --core wasm
if [ ${#features[@]} -gt 0 ]; then
  # Open MPI refuses root and more ranks than cores unless told.
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
  mpi() {
    local n=$1
    shift
    echo "# mpirun -n $n pgt bench --pg mpi $* (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
    mpirun -n "$n" "$T/pgt" bench --pg mpi --json --repeat 5 "$@"
  }
  mpi 2 --scenario large
  mpi 2 --scenario large-inplace
  mpi 3 --scenario fanout
fi
echo "# metabench" >&2; "$T/examples/metabench"
echo "# decode_bench" >&2; "$T/examples/decode_bench"
