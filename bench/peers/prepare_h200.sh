#!/usr/bin/env bash
# Prepares what a device run of the peer harness carries (run_h200.sh runs it there):
#   ROOT/.devpy  the mamba3 package with its cuda lane, built here for the H200's CPU (AVX2+FMA,
#                no -march=native), this harness, the CUDA tests of the torch ops
#                (tests/python/test_cuda.py) and COMMIT (the commit it was built from)
#   ROOT/.whl    mamba_ssm-2.3.2.post1 as a pure-Python wheel (its CUDA extension is never used),
#                tilelang-site.tar.xz (tilelang 0.1.8 + apache-tvm-ffi, torch-c-dlpack-ext and
#                z3-solver for cp312, the packages the device image lacks; tilelang's AMD-only
#                composable_kernel headers left out to fit the 64 MiB carry limit) and
#                tlcache.tar.xz (the official MIMO kernels compiled ahead into TileLang's cache)
# Usage: bash bench/peers/prepare_h200.sh ROOT PYTHON
#   ROOT: the checkout the device tool sends; PYTHON: a python 3.12 with torch 2.11 (cu130) and
#   mamba-ssm's build needs (setuptools, wheel, packaging, ninja, einops), used for the builds
#   (a fresh one: python3.12 -m venv V && V/bin/pip install "torch==2.11.*" numpy packaging
#   setuptools wheel ninja einops "scikit-build-core>=0.10"); the script adds tilelang's
#   pure-Python dependencies to it. Slow: nvcc for the extension, and TileLang compiles seven
#   kernels (minutes each on 2 cores).
set -euo pipefail
root=$(realpath "$1")
py=${2:-python3}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
build=$here/build/devpy
work=$(mktemp -d /tmp/peers-prepare.XXXXXX)
stamp=@1764400000  # fixed mtime of libtilelang.so on both sides (part of TileLang's cache key)
plat=(--python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

echo "[prepare] extension with the cuda lane -> $root/.devpy"
cmake -S "$here" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMAMBA3_BUILD_TORCH=ON \
  -DMAMBA3_BUILD_TESTS=OFF -DMAMBA3_BUILD_CLI=OFF -DMAMBA3_BUILD_BENCH=OFF \
  -DMAMBA3_ENABLE_CUDA=ON -DMAMBA3_NATIVE=OFF "-DCMAKE_CXX_FLAGS=-mavx2 -mfma" \
  "-DPython_EXECUTABLE=$(command -v "$py")" >/dev/null
cmake --build "$build" --target mamba3_torch
rm -rf "$root/.devpy" && mkdir -p "$root/.devpy/mamba3" "$root/.devpy/peers"
cp "$here"/python/mamba3/*.py "$build/python/_C.so" "$build/python/_build_info.py" "$root/.devpy/mamba3/"
cp "$here"/bench/peers/*.py "$here"/bench/peers/*.sh "$root/.devpy/peers/"
mkdir -p "$root/.devpy/tests" && cp "$here"/tests/python/{conftest,test_cuda}.py "$root/.devpy/tests/"
git -C "$here" rev-parse --short HEAD >"$root/.devpy/COMMIT"

echo "[prepare] wheels -> $root/.whl"
rm -rf "$root/.whl" && mkdir -p "$root/.whl"
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE "$py" -m pip wheel -q --no-deps \
  --no-build-isolation -w "$root/.whl" mamba-ssm==2.3.2.post1
"$py" -m pip download -q --no-deps "${plat[@]}" -d "$work/dl" tilelang==0.1.8 \
  apache-tvm-ffi==0.1.9 torch-c-dlpack-ext==0.1.5 z3-solver==4.15.4.0
"$py" -m pip install -q --no-deps --no-compile "${plat[@]}" --target "$work/site312" "$work"/dl/*.whl
rm -rf "$work/site312/tilelang/3rdparty/composable_kernel"
# Command-line tools (the z3 and tvm-ffi executables) are never run; leaving them out keeps the
# carried archive inside a device call's 64 MiB.
rm -rf "$work/site312/bin"
touch -d "$stamp" "$work/site312/tilelang/lib/libtilelang.so"
tar -C "$work/site312" --sort=name -cf - . | xz -T0 -9 >"$root/.whl/tilelang-site.tar.xz"

echo "[prepare] TileLang kernels -> $root/.whl/tlcache.tar.xz"
# tilelang and its tvm-ffi / z3 from the site just archived (the same files and library mtime the
# device unpacks, so the cache keys match), the official kernels' source from the wheel built
# above (PYTHON need not have mamba-ssm installed), and tilelang's pure-Python dependencies,
# which the device image already has, installed into PYTHON.
"$py" -m pip install -q cloudpickle ml-dtypes psutil tqdm typing-extensions
"$py" -m pip install -q --no-deps --no-compile --target "$work/ms" "$root"/.whl/mamba_ssm-*.whl
PYTHONPATH="$work/site312:$work/ms" TILELANG_TARGET="cuda -arch=sm_90a" TILELANG_CACHE_DIR="$work/tlcache" \
  "$py" "$here/bench/peers/tilelang_precompile.py" --jobs "$(nproc)"
rm -rf "$work/tlcache/tmp"
tar -C "$work/tlcache" -cf - . | xz -T0 -9 >"$root/.whl/tlcache.tar.xz"
du -sh "$root/.devpy" "$root/.whl"/*
rm -rf "$work"
