#!/usr/bin/env bash
# One device call on the lent H200: GPU tests, sanitizers, golden check and benchmarks of the
# cuda lane, logs and JSON under $OUT (default bench/results/raw). Binaries come prebuilt in
# .devbin/ (built here by tools/h200_build.sh) or, when absent, from build/release.
#   usage: bash tools/h200_run.sh [all|tests|bench]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mode=${1:-all}
OUT=${OUT:-bench/results/raw}
mkdir -p "$OUT"
bin=.devbin
[[ -x $bin/mamba3 ]] || bin=build/release
export LD_LIBRARY_PATH="$PWD/.devbin/lib:/usr/local/cuda/lib64:/usr/local/cuda/lib:${LD_LIBRARY_PATH:-}"
export MAMBA3_GOLDEN_DIR="$PWD/tests/data/golden"
summary="$OUT/summary.txt"
: >"$summary"
note() { printf '%s\n' "$*" | tee -a "$summary"; }
step() {  # step NAME TIMEOUT CMD...: runs CMD, logs to $OUT/NAME.log, records pass/fail
  local name=$1 t=$2
  shift 2
  echo "[h200] $name ..." >&2
  timeout "$t" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  note "$(printf '%-28s rc=%s' "$name" "$rc")"
  return 0
}

note "date: $(date -u +%Y-%m-%dT%H:%MZ)"
note "gpu: $(nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader 2>&1)"
step info 60 "$bin/mamba3" info

if [[ $mode == all || $mode == tests ]]; then
  step gpu_tests 400 "$bin/mamba3_gpu_tests"
  step golden_cuda 180 "$bin/mamba3" check --lane cuda
  grep -E "PASSED|FAILED|SKIPPED|ERROR SUMMARY|passed, " "$OUT"/gpu_tests.log "$OUT"/golden_cuda.log | tail -20 | tee -a "$summary"
  grep -A14 "Failure" "$OUT"/gpu_tests.log | head -60 | tee -a "$summary"
fi

if [[ $mode == all || $mode == bench ]]; then
  for shape in ${SHAPES-train wide megacpp long}; do
    step "bench_fwd_$shape" 240 "$bin/mamba3" bench --lane cuda --shape "$shape" --dtype bf16 \
      --what fwd --warmup 1 --iters 3 --json "$OUT/bench_fwd_$shape.json"
  done
  for shape in ${BWD_SHAPES-train}; do
    step "bench_bwd_$shape" 240 "$bin/mamba3" bench --lane cuda --shape "$shape" --dtype bf16 \
      --what fwd,bwd --warmup 1 --iters 3 --json "$OUT/bench_bwd_$shape.json"
  done
  for R in ${STEP_RANKS-1 4}; do
    for B in 1 16 128 512; do
      step "bench_step_R${R}_B${B}" 120 "$bin/mamba3" bench --lane cuda --shape train -B "$B" -L 1 \
        -R "$R" --dtype bf16 --what step --warmup 2 --iters 10 --json "$OUT/bench_step_R${R}_B${B}.json"
    done
  done
  for f in "$OUT"/bench_*.log; do
    printf '%s: ' "$(basename "$f" .log)" >>"$summary"
    grep -hE "^  (fwd|bwd|step)(-recompute)? " "$f" | head -2 >>"$summary"
    grep -hE "floor|of copy|L2 cache" "$f" >>"$summary"
  done
fi
# Optional: per-kernel times of the backward (NCU_BWD=1) at the shapes in NCU_BWD_SHAPES (default
# train), no clock control.
if [[ ${NCU_BWD:-0} == 1 ]]; then
  for shape in ${NCU_BWD_SHAPES:-train}; do
    step "ncu_bwd_$shape" 120 ncu --clock-control none -k regex:bwd_ --section SpeedOfLight \
      "$bin/mamba3" bench --lane cuda --shape "$shape" --dtype bf16 --what bwd --warmup 0 --iters 1
    echo "ncu_bwd_$shape: kernel, launches, total duration (us), in launch order" >>"$summary"
    python3 tools/ncu_durations.py "$OUT/ncu_bwd_$shape.log" "(BwdParams" >>"$summary"
  done
fi
# Sanitizers last (the slowest part; SAN_TIMEOUT bounds each), on small shapes.
if [[ $mode == all || $mode == tests ]]; then
  step memcheck "${SAN_TIMEOUT:-300}" compute-sanitizer --tool memcheck --error-exitcode 9 \
    "$bin/mamba3_gpu_tests" --gtest_filter='*CudaVsReference*siso_L65*:*CudaVsReference*mimo_r4_gqa*:*CudaVsReference*varlen*:*CudaVsReference*tc_*:*CudaSegmented*mimo*:CudaStep.*:*CudaBackwardVsReference*siso_L63*:*CudaBackwardVsReference*mimo_r2*:*CudaBackwardVsReference*varlen*:*CudaBackwardVsReference*mimo_r4_per_rank*:*CudaBackwardVsReference*tc_mimo_r8*:*CudaBackwardVsReference*varlen_mimo*'
  step racecheck "${SAN_TIMEOUT:-300}" compute-sanitizer --tool racecheck --error-exitcode 9 \
    "$bin/mamba3_gpu_tests" --gtest_filter='*CudaVsReference*mimo_r2*:*CudaVsReference*siso_L63*:*CudaVsReference*tc_*:*CudaSegmented*siso_states*:CudaStep.StepsEqualPrefill:*CudaBackwardVsReference*siso_L1:*CudaBackwardVsReference*mimo_r4_per_rank*:*CudaBackwardVsReference*tc_siso_n64_halved:*CudaBackwardVsReference*tc_n128_p128_norm:*CudaBackwardVsReference*tc_mimo_r8*:*CudaBackwardVsReference*tc_mimo_r4_per_rank*'
  grep -E "PASSED|FAILED|ERROR SUMMARY" "$OUT"/memcheck.log "$OUT"/racecheck.log | tail -8 | tee -a "$summary"
fi
# Optional: Nsight Compute of the forward kernels at `train` (NCU=1), no clock control.
if [[ ${NCU:-0} == 1 ]]; then
  step ncu_fwd_train 240 ncu --clock-control none -k regex:fwd_tc -c 2 --section SpeedOfLight \
    --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
    "$bin/mamba3" bench --lane cuda --shape train --dtype bf16 --what fwd --warmup 0 --iters 1
  grep -E "Duration|Throughput|Registers|Achieved Occupancy|Theoretical Occupancy|Block Limit|Stall|Warp Cycles" \
    "$OUT/ncu_fwd_train.log" | head -60 >>"$summary"
fi
# Optional: Nsight Compute of the decode step kernel at batch 1 and 128 (NCU_STEP=1).
if [[ ${NCU_STEP:-0} == 1 ]]; then
  for B in 1 128; do
    step "ncu_step_B$B" 180 ncu --clock-control none -k regex:"^step_" -s 4 -c 1 --set full \
      "$bin/mamba3" bench --lane cuda --shape train -B "$B" -L 1 --dtype bf16 --what step \
      --warmup 0 --iters 1
    grep -E "Duration|Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit|Stall|Warp Cycles|Dynamic Shared|L2 Hit|Mem Busy|Max Bandwidth|Elapsed Cycles|Issued Ipc|No Eligible" \
      "$OUT/ncu_step_B$B.log" | head -60 | sed "s/^/[B=$B] /" >>"$summary"
  done
fi
# Everything but the summary in one archive (the device returns at most 8 files).
(cd "$OUT" && tar czf logs.tgz --exclude=logs.tgz --exclude=summary.txt ./* && \
  find . -maxdepth 1 -type f ! -name logs.tgz ! -name summary.txt -delete)
tail -110 "$summary"
