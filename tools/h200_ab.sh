#!/usr/bin/env bash
# Same-run A/B of two builds of the CLI on the lent H200: runs `mamba3 bench` of binary A, then
# B, alternating for ROUNDS rounds per shape, and prints their forward/backward lines side by
# side. Carry the second binary beside the first (e.g. .devbin/mamba3_prev, built from the
# previous commit with tools/h200_build.sh and stripped; the two need different file names).
#   usage: [ROUNDS=2 WHAT=fwd,bwd ITERS=5 LANE=cuda DTYPE=bf16 EXTRA="--rank 4"] bash
#          tools/h200_ab.sh BIN_A BIN_B [SHAPE ...]   (default shapes: train megacpp)
# A wrapper script that sets an environment variable and execs the CLI beside it serves as the
# second binary for an A/B of a gate.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[[ $# -ge 2 ]] || { sed -n '2,9p' "$0" >&2; exit 2; }
a=$1 b=$2
shift 2
shapes=${*:-train megacpp}
export LD_LIBRARY_PATH="$PWD/.devbin/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
for bin in "$a" "$b"; do [[ -x $bin ]] || { echo "h200_ab: $bin is not an executable" >&2; exit 2; }; done
for bin in "$a" "$b"; do  # the source each binary was built from (cmake/build_commit.cmake)
  echo "$(basename "$bin"): $("$bin" info 2>/dev/null | grep -m1 -o 'commit=.*')"
done
fail=0
for shape in $shapes; do
  for ((i = 1; i <= ${ROUNDS:-2}; ++i)); do
    for bin in "$a" "$b"; do
      out=$("$bin" bench --lane "${LANE:-cuda}" --shape "$shape" --dtype "${DTYPE:-bf16}" --what "${WHAT:-fwd,bwd}" \
        --warmup 1 --iters "${ITERS:-5}" ${EXTRA:-} 2>&1) ||
        { fail=1; echo "h200_ab: $bin failed at $shape" >&2; echo "$out" | tail -5 >&2; }
      echo "$out" | grep -E "^  (fwd|bwd|step)(-recompute)? " | sed "s#^#$shape round $i $(basename "$bin"): #"
    done
  done
done
exit $fail
