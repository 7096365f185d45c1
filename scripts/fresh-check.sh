#!/usr/bin/env bash
# Runs the README's two commands as a newcomer would, so that nothing installed on this machine by an
# earlier session can hide a broken install step: a fresh clone of HEAD, with a throwaway HOME, CARGO_HOME
# (registry and installed binaries), CARGO_TARGET_DIR, RUSTUP_HOME (the machine's toolchain copied, minus
# the wasm32 target), npm cache, pip cache and venv. Reports what each step installed and how long it took.
#
# What it cannot make throwaway: Debian packages (apt installs system-wide). It reports which of the ones
# the scripts install were already present, so the reader knows which apt steps ran.
#
# Costs a cold build (~25 min on 2 cores) and a few GB under the scratch directory. Run it before
# resolving any change to an install step (scripts/test.sh, scripts/build-wasm.sh, requirements files).
#
# Usage: scripts/fresh-check.sh [--keep] [SCRATCH_DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
KEEP=0
[ "${1:-}" = "--keep" ] && { KEEP=1; shift; }
SCRATCH="${1:-$(mktemp -d /tmp/pgt-fresh.XXXXXX)}"
mkdir -p "$SCRATCH"
SCRATCH="$(cd "$SCRATCH" && pwd)"
REAL_RUSTUP_HOME="${RUSTUP_HOME:-$HOME/.rustup}"
REAL_CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
LOG="$SCRATCH/fresh-check.log"
: >"$LOG"
say() { printf '%s\n' "$*" | tee -a "$LOG"; }
now() { date +%s; }

say "fresh-check: scratch $SCRATCH (log: $LOG)"
say "commit: $(git -C "$ROOT" rev-parse --short HEAD) $(git -C "$ROOT" log -1 --format=%s | cut -c1-80)"
[ -z "$(git -C "$ROOT" status --porcelain)" ] || say "note: the working tree has uncommitted changes; only HEAD is checked"

# Debian packages the scripts install when missing: which were already here.
for p in rustc-web cargo-web rust-web-src lld-22 libopenmpi-dev openmpi-bin libclang-dev; do
  if dpkg -s "$p" >/dev/null 2>&1; then say "apt: $p already installed (its install step is not exercised)"
  else say "apt: $p missing (the scripts will install it)"; fi
done

git clone -q --no-local "$ROOT" "$SCRATCH/pgt"
mkdir -p "$SCRATCH/home" "$SCRATCH/cargo/bin"
# The machine's own client settings (registry certificates and the like), which a new machine has too.
for f in .npmrc .gitconfig .config/pip/pip.conf; do
  if [ -f "$HOME/$f" ]; then
    mkdir -p "$(dirname "$SCRATCH/home/$f")" && cp "$HOME/$f" "$SCRATCH/home/$f"
    say "machine setting kept: ~/$f"
  fi
done

# The machine's default toolchain (only it: others may be large), copied so that removing wasm32 from
# the copy makes `rustup target add` (or the Debian fallback) run as on a new machine.
mkdir -p "$SCRATCH/rustup/toolchains"
cp -a "$REAL_RUSTUP_HOME/settings.toml" "$SCRATCH/rustup/"
[ -d "$REAL_RUSTUP_HOME/update-hashes" ] && cp -a "$REAL_RUSTUP_HOME/update-hashes" "$SCRATCH/rustup/"
DEFAULT_TC=$(sed -n 's/^default_toolchain = "\(.*\)"/\1/p' "$REAL_RUSTUP_HOME/settings.toml")
cp -a "$(readlink -f "$REAL_RUSTUP_HOME/toolchains/$DEFAULT_TC")" "$SCRATCH/rustup/toolchains/$DEFAULT_TC"
# Toolchain aliases (e.g. 1.95.0 -> stable) that point at the default one.
for link in "$REAL_RUSTUP_HOME"/toolchains/*; do
  [ -L "$link" ] && [ "$(readlink -f "$link")" = "$(readlink -f "$REAL_RUSTUP_HOME/toolchains/$DEFAULT_TC")" ] &&
    ln -s "$SCRATCH/rustup/toolchains/$DEFAULT_TC" "$SCRATCH/rustup/toolchains/$(basename "$link")"
done
say "toolchain: $DEFAULT_TC (copied; wasm32 target removed from the copy)"
RUSTUP_HOME="$SCRATCH/rustup" "$REAL_CARGO_BIN/rustup" target remove wasm32-unknown-unknown >/dev/null 2>&1 || true
# rustup's proxies dispatch on their name; link only those, so nothing else in ~/.cargo/bin is on PATH.
for t in rustup cargo rustc rustdoc rustfmt cargo-fmt cargo-clippy clippy-driver; do
  [ -e "$REAL_CARGO_BIN/$t" ] && ln -s "$REAL_CARGO_BIN/$t" "$SCRATCH/cargo/bin/$t"
done

# The machine's environment (registry certificates, proxies: CI keeps it too), but every variable that
# points at state an earlier session could have left replaced by a throwaway one.
fresh_env=(
  env
  -u CARGO_TARGET_DIR -u RUSTC -u RUSTC_WRAPPER -u RUSTFLAGS -u VIRTUAL_ENV -u PGT_WASM_MODULE
  -u PGT_BIN -u PGT_WASM_ROUTE
  HOME="$SCRATCH/home"
  CARGO_HOME="$SCRATCH/cargo"
  RUSTUP_HOME="$SCRATCH/rustup"
  CARGO_TARGET_DIR="$SCRATCH/target"
  npm_config_cache="$SCRATCH/npm-cache"
  PIP_CACHE_DIR="$SCRATCH/pip-cache"
  XDG_CACHE_HOME="$SCRATCH/home/.cache"
  PYENV_ROOT="${PYENV_ROOT:-/root/.pyenv}"
  PATH="$SCRATCH/cargo/bin:${PYENV_ROOT:-/root/.pyenv}/shims:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  CI=true
)

run_timed() { # name, command...
  local name="$1"; shift
  local t0 rc
  t0=$(now)
  say "==> $name"
  set +e
  (cd "$SCRATCH/pgt" && "${fresh_env[@]}" "$@") >>"$LOG" 2>&1 </dev/null
  rc=$?
  set -e
  say "<== $name: exit $rc in $(( $(now) - t0 )) s"
  return $rc
}

status=0
run_timed "README command 1: cargo run --release -- demo" cargo run --release -- demo || status=1
run_timed "README command 2: ./scripts/test.sh" ./scripts/test.sh || status=1

say ""
say "== step times of scripts/test.sh (from its [+Ns] marks)"
grep -E '^==> \[\+[0-9]+s\]' "$LOG" | while read -r line; do say "  $line"; done
say "== installed into the throwaway dirs"
for f in "$SCRATCH"/cargo/bin/*; do
  [ -L "$f" ] && continue
  say "  cargo bin: $(basename "$f") ($("$f" --version 2>/dev/null | head -1))"
done
venv="$SCRATCH/home/.cache/pgt/pyenv"
[ -x "$venv/bin/pip" ] && say "  venv: $("$venv/bin/pip" list --format=freeze 2>/dev/null | wc -l) packages ($("$venv/bin/pip" list --format=freeze 2>/dev/null | tr '\n' ' ' | cut -c1-300))"
for d in cargo/registry target npm-cache pip-cache home/.cache; do
  [ -d "$SCRATCH/$d" ] && say "  $d: $(du -sh "$SCRATCH/$d" 2>/dev/null | cut -f1)"
done
say "== result: $([ $status = 0 ] && echo PASS || echo FAIL)"
if [ "$KEEP" = 0 ] && [ $status = 0 ]; then
  cp "$LOG" "/tmp/pgt-fresh-check-$(date +%Y%m%d-%H%M%S).log"
  rm -rf "$SCRATCH"
  echo "(scratch removed; log kept in /tmp/pgt-fresh-check-*.log)"
fi
exit $status
