#!/usr/bin/env bash
# Runs every test of pgt and installs what the tests need first (a fresh Debian machine with rustup passes).
# Usage: ./scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# Build cache outside the clone, so CI's fresh clones reuse compiled dependencies.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pgt/target}"
export CARGO_TERM_COLOR=never
mkdir -p "$CARGO_TARGET_DIR"

START=$(date +%s)
# Each step's line carries the seconds since the start (scripts/fresh-check.sh reports them).
step() { printf '\n==> [+%ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }

step "toolchain"
rustup component add rustfmt clippy >/dev/null 2>&1 || true
cargo --version

# wasm32: rustup's target if it can be had, else Debian's matching toolchain with build-std.
WASM_ROUTE=rustup
if ! rustup target list --installed 2>/dev/null | grep -q '^wasm32-unknown-unknown$'; then
  if ! timeout 120 rustup target add wasm32-unknown-unknown; then
    WASM_ROUTE=debian
    step "wasm32 via Debian's rustc-web"
    command -v /usr/bin/rustc >/dev/null 2>&1 && [ -d /usr/lib/rustlib/src ] || {
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rustc-web cargo-web rust-web-src lld-22
    }
  fi
fi
export WASM_ROUTE

# cargo build for wasm32-unknown-unknown, by whichever route is available. Extra args go to cargo build.
wasm_build() {
  if [ "$WASM_ROUTE" = rustup ]; then
    cargo build --target wasm32-unknown-unknown "$@"
  else
    RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR="$CARGO_TARGET_DIR/debian-wasm" \
      /usr/bin/cargo build --target wasm32-unknown-unknown -Z build-std=core,alloc "$@"
  fi
}

# The wasm modules first: pgt-host embeds the raw-ABI module at build time (host/build.rs), and the
# native-vs-wasm tests must compare today's core with a module built from it.
step "wasm modules: raw ABI + Node package"
PGT_WASM_ROUTE="$WASM_ROUTE" scripts/build-wasm.sh

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
# What a library user builds (`default-features = false`: no wasmtime, no CLI).
cargo clippy -p pgt-host --no-default-features --lib -- -D warnings

step "cargo doc (broken and private links are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps -q

step "pgt-core for wasm32-unknown-unknown (no std there: proves no_std)"
wasm_build -p pgt-core

step "cargo test"
cargo test --workspace

step "fuzz targets: build, then run each once over its seeds and regressions (not a campaign)"
# cargo-fuzz on stable via RUSTC_BOOTSTRAP (no nightly needed). Installing it (`cargo install
# cargo-fuzz`, without --locked) took 634 s on 2 cores shared with other builds (load ~9); with a
# throwaway HOME that cost comes back on every run.
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz
# An unoptimized build without a sanitizer (coverage instrumentation only): enough to prove the
# targets build and run, at a fraction of the cost of the campaign's `-O` build with ASan (which
# builds wasmtime with codegen-units=1). In a target dir of its own: the flags differ, and sharing
# would rebuild the main cache. The wasm target embeds the module build-wasm.sh made above.
(
  cd fuzz
  export PGT_WASM_MODULE="$CARGO_TARGET_DIR/pgt-wasm/pgt_wasm.wasm"
  export CARGO_TARGET_DIR="$CARGO_TARGET_DIR/fuzz-smoke"
  export RUSTC_BOOTSTRAP=1
  cargo fuzz build --dev -s none
  # Given files (not a directory), libFuzzer runs each once and writes nothing.
  for target in $(cargo fuzz list); do
    cargo fuzz run --dev -s none "$target" seeds/"$target"/*.bin \
      $(ls regressions/"$target"/*.bin 2>/dev/null)
  done
)

step "node: the JS build against the golden vectors; the Node receiver against pgt send"
npm ci --prefix examples/node --no-audit --no-fund --loglevel=error
node --test tests/node/

step "python: the pgt package (pip install ./python), ruff, then its tests"
PYENV_DIR="$HOME/.cache/pgt/pyenv"
[ -x "$PYENV_DIR/bin/python" ] || python3 -m venv "$PYENV_DIR"
"$PYENV_DIR/bin/pip" install -q -r tests/python/requirements.txt
# The one install command a user runs (the package carries the module build-wasm.sh copied into it).
"$PYENV_DIR/bin/pip" install -q --force-reinstall --no-deps ./python
"$PYENV_DIR/bin/ruff" format --check .
"$PYENV_DIR/bin/ruff" check .

# pgt.torch's tests need torch (tests/python/requirements-torch.txt): PyPI's wheel is the CUDA build,
# ~5.5 GB the first time (a no-op once installed); PGT_TORCH_INDEX points pip at another index (the
# CPU wheels) where one is reachable.
step "python: torch for pgt.torch's tests (cached in $PYENV_DIR)"
"$PYENV_DIR/bin/pip" install -q ${PGT_TORCH_INDEX:+--extra-index-url "$PGT_TORCH_INDEX"} \
  -r tests/python/requirements-torch.txt
"$PYENV_DIR/bin/python" -c 'import torch; print("torch", torch.__version__)'

step "python: pytest (pgt.torch over gloo: 4 rank processes)"
"$PYENV_DIR/bin/python" -m pytest -q tests/python

step "mpi: the MPI process group and pgt --pg mpi under mpirun"
dpkg -s libopenmpi-dev openmpi-bin libclang-dev >/dev/null 2>&1 || {
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenmpi-dev openmpi-bin libclang-dev
}
cargo clippy -p pgt-host --features mpi --all-targets -- -D warnings
# host/tests/mpi.rs runs examples/mpi_check with 3 and 4 ranks (built here: `cargo test --test`
# builds no examples), and `pgt send : pgt recv` in one job.
cargo build -p pgt-host --features mpi --example mpi_check
cargo test -p pgt-host --features mpi --test mpi
step "done: every test passed"
