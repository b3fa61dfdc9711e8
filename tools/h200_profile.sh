#!/usr/bin/env bash
# Nsight Compute profiles of the cuda lane's hot kernels on the lent H200 (no clock control):
# the full section set of one launch each, and the SASS instructions that collect the most
# warp-stall samples (source counters). Binaries from .devbin/ (tools/h200_build.sh).
#   usage: [BIN=.devbin/mamba3] bash tools/h200_profile.sh \
#            [step|bwd|grad|out|state|tokg|fwd|fwd_inf|fwd_mimo ...]
#   (default: step bwd fwd; grad, out, state, tokg: chunk_grad_tc, chunk_out_tc, chunk_state_tc
#   or token_grads alone, at train and megacpp; fwd: the training forward at train; fwd_inf:
#   the inference forward there; fwd_mimo: the inference forward's output and state passes at
#   megacpp)
# Writes $OUT/<name>.txt (details), $OUT/<name>-hot.txt (hot instructions) and
# $OUT/<name>-sass.csv.gz (the per-instruction table: with binaries built with
# -DCMAKE_CUDA_FLAGS=-lineinfo, `tools/ncu_lines.py` turns it into totals per source line), and
# the .ncu-rep files in $OUT/profiles.tgz.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-bench/results/raw}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$PWD/.devbin/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
bin=${BIN:-.devbin/mamba3}  # BIN: another build, e.g. one with -lineinfo
targets=${*:-step bwd fwd}

profile() {  # profile NAME KERNEL_REGEX SKIP BENCH_ARGS...
  local name=$1 regex=$2 skip=$3
  shift 3
  echo "[profile] $name ($regex) ..." >&2
  timeout 240 ncu --clock-control none --set full --import-source no -k "regex:$regex" \
    -s "$skip" -c 1 -f -o "$OUT/$name" "$bin" bench --lane cuda "$@" >"$OUT/$name.log" 2>&1 ||
    { echo "[profile] $name: ncu failed"; tail -5 "$OUT/$name.log"; return 0; }
  ncu -i "$OUT/$name.ncu-rep" --page details >"$OUT/$name.txt" 2>&1
  ncu -i "$OUT/$name.ncu-rep" --page source --csv --print-source sass >"$OUT/$name-sass.csv" 2>&1
  python3 tools/ncu_hot.py "$OUT/$name-sass.csv" 40 >"$OUT/$name-hot.txt" 2>&1
  gzip -f "$OUT/$name-sass.csv"  # per-source-line totals: tools/ncu_lines.py (see there)
}

for t in $targets; do
  case $t in
    step) profile step_b128 '^step_' 4 --shape train -B 128 -L 1 --dtype bf16 --what step \
            --warmup 0 --iters 1 ;;
    bwd) profile bwd_chunk_grad 'bwd_chunk_grad_tc' 0 --shape train --dtype bf16 --what bwd \
           --warmup 0 --iters 1
         profile bwd_chunk_out 'bwd_chunk_out_tc' 0 --shape train --dtype bf16 --what bwd \
           --warmup 0 --iters 1
         profile bwd_chunk_state 'bwd_chunk_state_tc' 0 --shape train --dtype bf16 --what bwd \
           --warmup 0 --iters 1 ;;
    grad) profile bwd_chunk_grad 'bwd_chunk_grad_tc' 0 --shape train --dtype bf16 --what bwd \
            --warmup 0 --iters 1
          profile bwd_chunk_grad_megacpp 'bwd_chunk_grad_tc' 0 --shape megacpp --dtype bf16 \
            --what bwd --warmup 0 --iters 1 ;;
    out) profile bwd_chunk_out 'bwd_chunk_out_tc' 0 --shape train --dtype bf16 --what bwd \
           --warmup 0 --iters 1
         profile bwd_chunk_out_megacpp 'bwd_chunk_out_tc' 0 --shape megacpp --dtype bf16 \
           --what bwd --warmup 0 --iters 1 ;;
    state) profile bwd_chunk_state 'bwd_chunk_state_tc' 0 --shape train --dtype bf16 --what bwd \
             --warmup 0 --iters 1
           profile bwd_chunk_state_megacpp 'bwd_chunk_state_tc' 0 --shape megacpp --dtype bf16 \
             --what bwd --warmup 0 --iters 1 ;;
    tokg) profile bwd_token_grads 'bwd_token_grads' 0 --shape train --dtype bf16 --what bwd \
            --warmup 0 --iters 1
          profile bwd_token_grads_megacpp 'bwd_token_grads' 0 --shape megacpp --dtype bf16 \
            --what bwd --warmup 0 --iters 1 ;;
    fwd) profile fwd_train 'fwd_tc_kernel' 0 --shape train --dtype bf16 --what fwd --warmup 0 \
           --iters 1 ;;
    fwd_inf) profile fwd_train_inference 'fwd_tc_kernel' 0 --shape train --dtype bf16 --what fwd \
               --recompute --warmup 0 --iters 1 ;;
    # megacpp runs the sequence split: skip its first fwd_tc_kernel launch (the state pass).
    fwd_mimo) profile fwd_megacpp 'fwd_tc_kernel' 1 --shape megacpp --dtype bf16 --what fwd \
                --recompute --warmup 0 --iters 1
              profile fwd_megacpp_states 'fwd_tc_kernel' 0 --shape megacpp --dtype bf16 \
                --what fwd --recompute --warmup 0 --iters 1 ;;
    *) echo "unknown target $t" >&2 ;;
  esac
done
for f in "$OUT"/*-hot.txt; do
  n=${f%-hot.txt}
  echo "== $(basename "$n")"
  grep -E "^ +(Duration|DRAM Throughput|Compute \(SM\) Throughput|Registers Per Thread|Achieved Occupancy|Warp Cycles Per Issued Instruction|Issued Ipc Active|Block Limit (Registers|Shared Mem))" "$n.txt" | head -12
  sed -n '3,14p' "$f"
done
# The device returns at most 8 files: reports in one archive, text in another.
(cd "$OUT" && tar czf profiles.tgz ./*.ncu-rep 2>/dev/null; rm -f ./*.ncu-rep
 tar czf profile-text.tgz ./*.txt ./*.log && rm -f ./*.txt ./*.log)
