#!/usr/bin/env bash
# Builds the cuda lane for the lent H200 on this (GPU-less) machine and stages what a device
# call carries in the git-ignored .devbin/: the CLI, the GPU test binary and the two Debian
# libraries the H200 image lacks (libfmt, libgomp). Portable CPU code (-mavx2 -mfma, no
# -march=native: the H200 host is a different CPU). Then, on the device:
#   run(command="bash tools/h200_run.sh all", carry=[".devbin"])
# PACK=1 also packs .devbin (with whatever else was put there, e.g. a previous build as
# .devbin/mamba3_prev for tools/h200_ab.sh) into .devx/devbin.tar.xz: ~5-12 MB instead of
# ~30-60 MB, for when the carry would pass 64 MiB:
#   run(command="tar xJf .devx/devbin.tar.xz && bash tools/h200_run.sh all", carry=[".devx"])
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
build=${H200_BUILD_DIR:-build/h200}
if [[ ! -f $build/CMakeCache.txt ]]; then
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMAMBA3_NATIVE=OFF \
    "-DCMAKE_CXX_FLAGS=-mavx2 -mfma" -DMAMBA3_BUILD_BENCH=OFF -DMAMBA3_ENABLE_CUDA=ON
fi
cmake --build "$build" --target mamba3_cli mamba3_gpu_tests
python3 tools/check_spills.py "$build"
mkdir -p .devbin/lib
cp "$build/mamba3" "$build/mamba3_gpu_tests" .devbin/
strip .devbin/mamba3 .devbin/mamba3_gpu_tests
for lib in libfmt.so.9 libgomp.so.1; do
  cp -L "$(ldd "$build/mamba3" | awk -v l="$lib" '$1 == l {print $3}')" .devbin/lib/
done
grep -qx '/.devbin/' .git/info/exclude 2>/dev/null || echo '/.devbin/' >>.git/info/exclude
du -sh .devbin
if [[ ${PACK:-0} == 1 ]]; then
  mkdir -p .devx
  grep -qx '/.devx/' .git/info/exclude 2>/dev/null || echo '/.devx/' >>.git/info/exclude
  tar cJf .devx/devbin.tar.xz .devbin
  du -sh .devx/devbin.tar.xz
fi
