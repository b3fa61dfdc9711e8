#!/usr/bin/env bash
# Fresh-machine setup: installs the Debian packages the build needs (only those missing), then
# configures and builds the `release` preset (build/release). Idempotent; safe to re-run.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '[bootstrap] %s\n' "$*"; }
die() { printf '[bootstrap] ERROR: %s\n' "$*" >&2; exit 1; }

packages=(cmake ninja-build g++ libgtest-dev libgmock-dev libbenchmark-dev libcli11-dev
          nlohmann-json3-dev libfmt-dev libeigen3-dev)

missing=()
for pkg in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$pkg")
  fi
done

if ((${#missing[@]})); then
  log "installing missing packages: ${missing[*]}"
  command -v apt-get >/dev/null || die "apt-get not found; install by hand: ${missing[*]}"
  sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || die "not root and no sudo; install by hand: ${missing[*]}"
    sudo=(sudo)
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt=("${sudo[@]}" apt-get -o Acquire::Retries=3)  # a dropped download is retried, not fatal
  log "apt-get update"
  "${apt[@]}" update -q || die "apt-get update failed"
  log "apt-get install -y ${missing[*]}"
  "${apt[@]}" install -y -q --no-install-recommends "${missing[@]}" ||
    die "apt-get install failed"
else
  log "all packages present: ${packages[*]}"
fi

if command -v nvcc >/dev/null; then
  log "nvcc found ($(command -v nvcc)): the CUDA lane is built (MAMBA3_ENABLE_CUDA=ON)"
else
  log "no nvcc on PATH: building without the CUDA lane"
fi

jobs=$(nproc)
log "cmake --preset release"
cmake --preset release || die "configure failed"
log "cmake --build --preset release -j ${jobs}"
cmake --build --preset release -j "${jobs}" || die "build failed"
log "done: build/release/mamba3 is ready (try: build/release/mamba3 info)"
