#!/usr/bin/env bash
# Every test on a fresh machine (the README's second line; CI runs it verbatim):
#   1. tools/bootstrap.sh: Debian packages + the C++ release build
#   2. ctest (C++ suite)
#   3. a virtual environment (.venv, or $MAMBA3_VENV) with the Python test dependencies,
#      installed by name from PyPI: torch 2.11, pytest, numpy, safetensors, einops and the
#      official mamba-ssm 2.3.2.post1 (source build without its CUDA kernels) to compare against
#   4. pip install . (the package as a user installs it, against the environment's torch)
#   5. pytest tests/python
# Idempotent: a second run reuses .venv and pip's cache. Exits non-zero on the first failure.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '[test] %s\n' "$*"; }
die() { printf '[test] FAILED: %s\n' "$*" >&2; exit 1; }
stage() { printf '\n[test] ===== %s =====\n' "$*"; }
# A dropped connection in the middle of a multi-GB download (torch and its CUDA wheels) is not a
# test failure: pip gets three tries, each resuming from pip's cache where it can.
pip_retry() {
  local try
  for try in 1 2 3; do
    "${pip[@]}" "$@" && return 0
    ((try < 3)) && log "pip $* failed (try $try of 3); retrying in 20 s" && sleep 20
  done
  return 1
}

TORCH_SPEC="torch==2.11.*"
MAMBA_SSM_SPEC="mamba-ssm==2.3.2.post1"
VENV=${MAMBA3_VENV:-.venv}
start=$SECONDS

stage "1/5 C++ build (tools/bootstrap.sh)"
bash tools/bootstrap.sh || die "tools/bootstrap.sh"

stage "2/5 C++ tests (ctest --preset release)"
ctest --preset release --output-on-failure || die "ctest"

stage "3/5 Python environment ($VENV)"
if [[ ! -x $VENV/bin/python ]]; then
  log "python3 -m venv $VENV ($(python3 --version 2>&1))"
  if ! python3 -m venv "$VENV"; then
    log "venv module missing: apt-get install python3-venv"
    rm -rf "$VENV"
    apt-get -o Acquire::Retries=3 install -y -q --no-install-recommends python3-venv || die "apt-get install python3-venv"
    python3 -m venv "$VENV" || die "python3 -m venv $VENV"
  fi
fi
py="$PWD/$VENV/bin/python"
pip=("$py" -m pip --disable-pip-version-check)
pip_retry install -q --upgrade pip || die "pip upgrade"
log "pip install $TORCH_SPEC pytest numpy safetensors einops (+ build tools for mamba-ssm)"
pip_retry install --progress-bar off "$TORCH_SPEC" pytest numpy safetensors einops packaging \
  setuptools wheel ninja "scikit-build-core>=0.10" || die "pip install of the test dependencies"
# The official package is an sdist that compiles CUDA unless told not to; it needs torch in the
# same environment (no build isolation). MAMBA_FORCE_BUILD skips its attempt to download a
# prebuilt wheel from outside PyPI.
log "pip install $MAMBA_SSM_SPEC (MAMBA_SKIP_CUDA_BUILD=TRUE)"
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
  pip_retry install --progress-bar off --no-build-isolation "$MAMBA_SSM_SPEC" ||
  die "pip install $MAMBA_SSM_SPEC"
"$py" -c "import torch; print('[test] torch', torch.__version__)" || die "import torch"

stage "4/5 pip install . (scikit-build-core: core library + torch extension)"
# Without build isolation: the build requirements (pyproject.toml: scikit-build-core, torch 2.11)
# are already in the environment, and an isolated build would download torch and its CUDA wheels
# (about 3 GB) a second time. The extension is built against the torch it is tested with.
pip_retry install --progress-bar off --no-build-isolation . || die "pip install ."
"$py" -c "import mamba3, torch; print('[test] mamba3', mamba3.__version__, 'from', mamba3.__file__)" ||
  die "import mamba3"

stage "5/5 Python tests (pytest tests/python)"
set +e
"$py" -m pytest tests/python -ra -p no:cacheprovider --durations=10
rc=$?
set -e
case $rc in
  0) ;;
  5) die "pytest collected no tests (exit code 5)" ;;
  *) die "pytest exit code $rc" ;;
esac

log "all tests passed in $((SECONDS - start)) s"
