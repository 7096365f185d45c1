#!/usr/bin/env bash
# Builds pgt's two wasm modules from crate pgt-wasm (wasm/), reproducibly, into known places:
#
#   $CARGO_TARGET_DIR/pgt-wasm/pgt_wasm.wasm   the raw ABI (wasm/ABI.md): no_std, imports nothing. pgt-host's
#                                              build.rs embeds it for WasmEngine; a copy goes to
#                                              python/src/pgt/, the Python package's own.
#   wasm/pkg-node/                             the JS build (feature "js"), packaged by
#                                              `wasm-bindgen --target nodejs`: pgt_wasm.js, pgt_wasm.d.ts,
#                                              pgt_wasm_bg.wasm, package.json. tests/node uses it.
#
# Both are built with the size-tuned profile `wasm-release` (root Cargo.toml) for wasm32-unknown-unknown:
# by rustup's target when it is (or can be) installed, else by Debian's rustc-web with -Z build-std.
# Installs wasm-bindgen-cli at the version pinned by the wasm-bindgen crate when it is missing.
# CARGO_TARGET_DIR defaults to ./target. Prints the module sizes at the end.
#
# Usage: scripts/build-wasm.sh [--raw-only]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$CARGO_TARGET_DIR" in /*) ;; *) CARGO_TARGET_DIR="$ROOT/$CARGO_TARGET_DIR" ;; esac
RAW_ONLY=0
[ "${1:-}" = "--raw-only" ] && RAW_ONLY=1

WASM_BINDGEN_VERSION=0.2.130   # = the `wasm-bindgen = "=…"` pin in Cargo.toml
TARGET=wasm32-unknown-unknown
PROFILE=wasm-release
OUT_RAW="$CARGO_TARGET_DIR/pgt-wasm"
OUT_NODE="$ROOT/wasm/pkg-node"

# Paths baked into panic locations: make them machine-independent (workspace paths are relative already).
CARGO_HOME_DIR="${CARGO_HOME:-$HOME/.cargo}"
REMAP="--remap-path-prefix=$CARGO_HOME_DIR=/cargo --remap-path-prefix=$ROOT=."

# PGT_WASM_ROUTE=debian forces the fallback (to test it where rustup's target is installed).
route="${PGT_WASM_ROUTE:-rustup}"
if [ "$route" = debian ]; then
  :
elif ! command -v rustup >/dev/null 2>&1; then
  route=debian
elif ! rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
  timeout 180 rustup target add "$TARGET" || route=debian
fi
if [ "$route" = debian ] && ! { [ -x /usr/bin/rustc ] && [ -d /usr/lib/rustlib/src ]; }; then
  echo "build-wasm: rustup target $TARGET unavailable; installing Debian's rustc-web" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rustc-web cargo-web rust-web-src lld-22
fi

# wasm_build STD_CRATES cargo-args…: one cargo build of pgt-wasm for wasm32 by the chosen route.
wasm_build() {
  local std_crates="$1"; shift
  if [ "$route" = rustup ]; then
    RUSTFLAGS="$REMAP" cargo build -p pgt-wasm --target "$TARGET" --profile "$PROFILE" "$@"
  else
    # A target dir of its own: another rustc, and std built from source.
    RUSTFLAGS="$REMAP" RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR="$WASM_TARGET_DIR" \
      /usr/bin/cargo build -p pgt-wasm --target "$TARGET" --profile "$PROFILE" \
      -Z build-std="$std_crates" "$@"
  fi
}
WASM_TARGET_DIR="$CARGO_TARGET_DIR"
[ "$route" = debian ] && WASM_TARGET_DIR="$CARGO_TARGET_DIR/debian-wasm"
BUILT="$WASM_TARGET_DIR/$TARGET/$PROFILE/pgt_wasm.wasm"

# 1. The JS build first: both builds write $BUILT, and the raw one must be the one left there.
if [ "$RAW_ONLY" = 0 ]; then
  echo "==> pgt-wasm (feature js) for $TARGET via $route"
  # strip = "debuginfo" (not "symbols"): wasm-bindgen reads the target_features section that full
  # stripping removes.
  CARGO_PROFILE_WASM_RELEASE_STRIP=debuginfo wasm_build std,panic_abort --features js
  if [ "$(wasm-bindgen --version 2>/dev/null | awk '{print $2}')" != "$WASM_BINDGEN_VERSION" ]; then
    # The CLI's own lock file first; when the registry lacks a version it pins (here: webpki-roots
    # 1.0.11), resolve afresh at the same CLI version. Either way the CLI matches the crate's pin.
    echo "==> cargo install wasm-bindgen-cli $WASM_BINDGEN_VERSION"
    cargo install wasm-bindgen-cli --version "=$WASM_BINDGEN_VERSION" --locked ||
      { echo "==> --locked failed; installing wasm-bindgen-cli $WASM_BINDGEN_VERSION without it"
        cargo install wasm-bindgen-cli --version "=$WASM_BINDGEN_VERSION"; }
    [ "$(wasm-bindgen --version | awk '{print $2}')" = "$WASM_BINDGEN_VERSION" ] ||
      { echo "build-wasm: wasm-bindgen on PATH is not $WASM_BINDGEN_VERSION" >&2; exit 1; }
  fi
  rm -rf "$OUT_NODE"
  wasm-bindgen --target nodejs --out-dir "$OUT_NODE" --out-name pgt_wasm \
    --remove-name-section --remove-producers-section "$BUILT"
  # wasm-bindgen writes no package.json for --target nodejs: a minimal one so `require("…/pkg-node")` works.
  cat > "$OUT_NODE/package.json" <<JSON
{
  "name": "pgt-wasm",
  "version": "0.1.0",
  "description": "pgt's protocol core (decode, validate, plan, sender and receiver state machines) as wasm",
  "main": "pgt_wasm.js",
  "types": "pgt_wasm.d.ts",
  "files": ["pgt_wasm.js", "pgt_wasm.d.ts", "pgt_wasm_bg.wasm", "pgt_wasm_bg.wasm.d.ts"]
}
JSON
fi

# 2. The raw ABI (no_std: core + alloc only).
echo "==> pgt-wasm (raw ABI) for $TARGET via $route"
wasm_build core,alloc
mkdir -p "$OUT_RAW"
# Copy only when changed, so pgt-host's build.rs (which watches this file) does not rebuild needlessly.
cmp -s "$BUILT" "$OUT_RAW/pgt_wasm.wasm" 2>/dev/null || cp "$BUILT" "$OUT_RAW/pgt_wasm.wasm"
# The Python package carries the module (`pip install ./python` after this script).
cmp -s "$BUILT" "$ROOT/python/src/pgt/pgt_wasm.wasm" 2>/dev/null || cp "$BUILT" "$ROOT/python/src/pgt/pgt_wasm.wasm"

size() { wc -c <"$1" | tr -d ' '; }
echo "==> modules"
echo "raw ABI: $OUT_RAW/pgt_wasm.wasm ($(size "$OUT_RAW/pgt_wasm.wasm") bytes; also in python/src/pgt/)"
if [ "$RAW_ONLY" = 0 ]; then
  echo "JS:      $OUT_NODE/pgt_wasm_bg.wasm ($(size "$OUT_NODE/pgt_wasm_bg.wasm") bytes)"
fi
