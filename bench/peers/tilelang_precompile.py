#!/usr/bin/env python3
"""JIT-compiles the official MIMO TileLang kernels (mamba-ssm 2.3.2.post1) into TileLang's own
kernel cache, ahead of a device run, on a machine without a GPU.

Why: the H200 time of a session is short and compiling these kernels takes minutes there. The
kernels are built by the official package's own `tilelang.jit` functions with exactly the
arguments its wrappers pass (mamba3_mimo_fwd.mamba_mimo_forward, mamba3_mimo_bwd.
mamba_mimo_bwd_combined), for the target the device resolves to (sm_90a). The cache key covers
the kernel source, the arguments, the target, the TileLang version and its library's size and
mtime, so a device run with the same TileLang build, TILELANG_TARGET and TILELANG_CACHE_DIR
loads them instead of compiling; anything else misses and compiles there (slower, same result).
Compile time is never part of a timed region either way.

Usage: TILELANG_TARGET="cuda -arch=sm_90a" TILELANG_CACHE_DIR=DIR python tilelang_precompile.py
       [--configs 128x64x4,64x64x4] [--jobs 2]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib.util
import os
import sys
import time
import types


def official_light():
    """Registers mamba_ssm as a bare namespace so its submodules import without running the
    package __init__ (which needs the CUDA extension that a source build without CUDA lacks)."""
    if "mamba_ssm" in sys.modules:
        return
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None:
        raise ImportError("mamba_ssm is not installed")
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["mamba_ssm"] = pkg


def compile_one(job):
    """job = (kind, N, P, R, flag). Returns (job, seconds)."""
    official_light()
    import tilelang.language as T

    kind, N, P, R, flag = job
    t0 = time.time()
    dyn = (T.dynamic("B"), T.dynamic("S"), T.dynamic("H"), T.dynamic("G"))
    # hasZ, hasD, reduceO: the harness passes Z, D and MIMO_Out; chunk 16, rotary divisor 4, bf16.
    if kind == "fwd":
        from mamba_ssm.ops.tilelang.mamba3.mamba3_mimo_fwd import mamba_mimo_fwd

        mamba_mimo_fwd(*dyn, N, P, R, True, True, True, return_final_state=flag, chunk_size=16,
                       rotary_dim_divisor=4, dtype="bfloat16", threads=128, num_stages=0)
    elif kind == "bwd_fwd":
        from mamba_ssm.ops.tilelang.mamba3.mamba3_mimo_bwd import mamba_mimo_bwd_fwd

        mamba_mimo_bwd_fwd(*dyn, N, P, R, True, True, True, 16, 4, "bfloat16", 128, 0)
    elif kind == "bwd_bwd":
        from mamba_ssm.ops.tilelang.mamba3.mamba3_mimo_bwd import mamba_mimo_bwd_bwd

        mamba_mimo_bwd_bwd(*dyn, N, P, R, True, True, True, 16, 4, "bfloat16", 256, 0)
    else:
        raise ValueError(kind)
    return job, time.time() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="128x64x4,64x64x4", help="NxPxR list")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    for var in ("TILELANG_TARGET", "TILELANG_CACHE_DIR"):
        if not os.environ.get(var):
            sys.exit(f"{var} must be set (see the docstring)")
    jobs = []
    for i, cfg in enumerate(args.configs.split(",")):
        N, P, R = (int(x) for x in cfg.split("x"))
        jobs += [("fwd", N, P, R, False), ("bwd_fwd", N, P, R, None), ("bwd_bwd", N, P, R, None)]
        if i == 0:  # the parity run asks for final states at the first configuration
            jobs.append(("fwd", N, P, R, True))
    t0 = time.time()
    with cf.ProcessPoolExecutor(max_workers=args.jobs) as ex:
        for job, sec in ex.map(compile_one, jobs):
            print(f"[precompile] {job}: {sec:.1f} s", flush=True)
    print(f"[precompile] {len(jobs)} kernels in {time.time() - t0:.0f} s into "
          f"{os.environ['TILELANG_CACHE_DIR']}")


if __name__ == "__main__":
    main()
