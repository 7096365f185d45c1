#!/usr/bin/env bash
# Runs the receive-memory tests (host/src/memory.rs: Buffer, Buffer::zeroed_many, BufferPool,
# ReceiveMemory and its Touch prefaulter) under Miri, once with Stacked Borrows (Miri's default) and
# once with Tree Borrows. What that checks and what it cannot: docs/miri.md.
#
# Installs nothing. Miri needs the nightly toolchain with its `miri` and `rust-src` components
# (`rustup toolchain install nightly --component miri,rust-src`); where they are missing this says so
# and exits 0, so that it can be called from CI or on a machine without nightly. A test that fails
# or undefined behaviour that Miri finds exits non-zero.
#
# Without wasmtime (--no-default-features): Miri builds the dependencies it needs itself.
# About a minute on 2 cores (two runs of the 21 tests, 25-45 s each) after a first build of ~1.5 min.
#
# Usage: scripts/miri.sh [TEST_FILTER]        (default: memory::)
#   MIRIFLAGS are passed on, e.g. MIRIFLAGS=-Zmiri-many-seeds=0..8 to try 8 schedules per test.
set -euo pipefail
cd "$(dirname "$0")/.."

FILTER="${1:-memory::}"

skip() {
  echo "miri.sh: $*; skipping the Miri run (nothing installed)."
  exit 0
}
command -v rustup >/dev/null 2>&1 || skip "no rustup"
# Ask rustup only about what is installed: never let `+nightly` install a toolchain.
rustup toolchain list 2>/dev/null | grep -q '^nightly' || skip "no nightly toolchain"
installed="$(rustup +nightly component list --installed 2>/dev/null || true)"
for c in miri rust-src; do
  grep -q "^$c" <<<"$installed" || skip "the nightly toolchain has no '$c' component"
done
RUSTUP_AUTO_INSTALL=0 cargo +nightly miri --version >/dev/null 2>&1 ||
  skip "'cargo +nightly miri' does not run"

# Miri's own build cache, apart from the stable one (scripts/test.sh) and from other work trees.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pgt/target-miri}"
export CARGO_TERM_COLOR=never
mkdir -p "$CARGO_TARGET_DIR"
echo "miri.sh: $(cargo +nightly miri --version), target dir $CARGO_TARGET_DIR"

run() {
  local name="$1" flags="$2"
  echo
  echo "==> Miri, $name: MIRIFLAGS='$flags'"
  local start=$SECONDS
  MIRIFLAGS="$flags" cargo +nightly miri test -p pgt-host --lib \
    --no-default-features --features testing "$FILTER"
  echo "==> Miri, $name: passed in $((SECONDS - start)) s"
}

# Strict provenance: no pointer comes from an integer, so Miri tracks every slice's borrow exactly
# (memory.rs keeps its regions as pointers for that; an integer-to-pointer cast would now fail here).
run "Stacked Borrows" "-Zmiri-strict-provenance ${MIRIFLAGS:-}"
run "Tree Borrows" "-Zmiri-tree-borrows -Zmiri-strict-provenance ${MIRIFLAGS:-}"
