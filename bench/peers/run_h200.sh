#!/usr/bin/env bash
# The peer harness on an H200 machine WITHOUT network (this workplace's device tool), from the
# root of a checkout that carries .devpy and .whl as prepare_h200.sh made them:
#   bash .devpy/peers/run_h200.sh [OUT_DIR] [peers.py options...]
# OUT_DIR defaults to $OUT (the device tool's output folder), else bench/results.
# With network, none of this is needed: pip install mamba-ssm==2.3.2.post1 tilelang==0.1.8 and
# this package with its cuda lane, then python bench/peers/peers.py --mode gpu.
set -euo pipefail
out=${1:-${OUT:-bench/results}}
shift || true
site=/tmp/peers-site

# Autotuning timings of an earlier run on the same card and software (.whl/triton-autotune.tar.xz,
# written by PEERS_SAVE_AUTOTUNE=1 below: a few KB of JSON) spare this run the benchmarking of
# every configuration; without them the official autotuners tune here, as they do for a user.
# tilelang 0.1.8 and the dependencies the image lacks, as one archive (mtimes kept: TileLang's
# kernel-cache key includes its library's size and mtime).
rm -rf /tmp/peers-tlcache /tmp/peers-triton && mkdir -p /tmp/peers-tlcache /tmp/peers-triton
python3 - <<'EOF'
import os, tarfile
for src, dst in ((".whl/tilelang-site.tar.xz", "/tmp/peers-site"),
                 (".whl/tlcache.tar.xz", "/tmp/peers-tlcache"),
                 (".whl/triton-autotune.tar.xz", "/tmp/peers-triton")):
    if os.path.exists(src):
        with tarfile.open(src) as t:
            t.extractall(dst)
EOF
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
  .whl/mamba_ssm-*.whl

export PYTHONPATH="$site:$PWD/.devpy${PYTHONPATH:+:$PYTHONPATH}"
export TILELANG_CACHE_DIR=/tmp/peers-tlcache TILELANG_TARGET="cuda -arch=sm_90a"
export TRITON_CACHE_DIR=/tmp/peers-triton TRITON_CACHE_AUTOTUNING=1
if [[ -f /tmp/peers-triton/ORIGIN.txt ]]; then
  export PEERS_AUTOTUNE_FROM="carried from an earlier run ($(cat /tmp/peers-triton/ORIGIN.txt)) where it had them, tuned in this run otherwise"
fi
export PYTHONUNBUFFERED=1
export PEERS_COMMIT=${PEERS_COMMIT:-$(cat .devpy/COMMIT 2>/dev/null || echo unknown)}
export PEERS_COMMAND=${PEERS_COMMAND:-"bash bench/peers/run_h200.sh (python bench/peers/peers.py --mode gpu $*)"}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader || true
# The torch ops on CUDA tensors first (a few seconds); their result is in the log, the run goes on.
if [[ -f .devpy/tests/test_cuda.py ]]; then
  timeout 120 python3 -m pytest -q -p no:cacheprovider -rs .devpy/tests/test_cuda.py || true
fi
# The harness stops starting rows at its --budget-s; this hard limit (below the device tool's
# 600 s) covers a call that hangs. The JSON is rewritten after every row, so the report is then
# rendered from it, with the rows never reached marked as such.
rc=0
timeout -k 5 "${PEERS_HARD_LIMIT_S:-560}" python3 .devpy/peers/peers.py --mode gpu --out "$out" "$@" || rc=$?
if [[ $rc -ne 0 ]]; then
  echo "[run_h200] peers.py exited with $rc; rendering the report from its JSON"
  for j in "$out"/peers-*.json; do python3 .devpy/peers/peers.py --render "$j"; done
fi
if [[ ${PEERS_SAVE_AUTOTUNE:-0} == 1 ]]; then
  # ORIGIN.txt says which runs (date, card, triton) made the timings; a run that added some
  # appends its date.
  (cd /tmp/peers-triton && now=$(date -u +%Y-%m-%dT%H:%MZ) && if [[ ! -f ORIGIN.txt ]]; then
      echo "$now, $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), triton $(python3 -c \
        'import triton; print(triton.__version__)')" >ORIGIN.txt
    elif [[ -n $(find . -name '*.autotune.json' -newer ORIGIN.txt | head -1) ]]; then
      echo "$(head -1 ORIGIN.txt); more added $now" >ORIGIN.txt
    fi && find . -name '*.autotune.json' -o -name ORIGIN.txt | tar -cJf "$out/triton-autotune.tar.xz" -T -) &&
    ls -la "$out/triton-autotune.tar.xz"
fi
exit $rc
