#!/usr/bin/env bash
# Runs every benchmark and prints one JSON line each (the README's table comes from this).
# Usage: ./scripts/bench.sh   (release builds; ~6 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p pgt-host --bin pgt --example decode_bench
cargo build --release -q -p pgt-core --example metabench
T="${CARGO_TARGET_DIR:-target}/release"
run() { echo "# pgt bench $*" >&2; "$T/pgt" bench --json --repeat 5 "$@"; }
run --scenario large
run --scenario large --no-digests
run --scenario large-pooled
run --scenario large-inplace
run --scenario large-inplace --no-digests
run --scenario fanout
run --scenario fanout --fanout direct
run --scenario small
run --scenario small-inplace
run --scenario small --core wasm
run --scenario small-inplace --core wasm
echo "# metabench" >&2; "$T/examples/metabench"
echo "# decode_bench" >&2; "$T/examples/decode_bench"
