#!/usr/bin/env python3
"""Side-by-side benchmark and parity harness (issue 6): mamba3 through its torch ops against the
official mamba-ssm 2.3.2.post1 kernels, in one run, on the same inputs.

  python bench/peers/peers.py --mode gpu      # the H200: DESIGN.md §6 shapes
  python bench/peers/peers.py --mode cpu      # no GPU: small shapes (CI runs this)

Writes peers-<device>-<date>.md, .json and .png into --out (default bench/results).

GPU mode, per row: ours (mamba3.siso_combined / mimo_combined / siso_step / mimo_step on CUDA
tensors) and the official functions (Triton SISO combined and step; TileLang MIMO), with the
Mamba-2 SSD kernels (mamba_chunk_scan_combined) and PyTorch's scaled_dot_product_attention at
the same d_inner as context, and the same run's ceilings (device-to-device copy bandwidth, bf16
matmul rate). CPU mode compares our CPU lane with the official package's pure-PyTorch decode
reference (apply_rotary_qk_inference_reference + selective_state_update_fused_ref_v2), iterated
over the tokens for prefill; the package has no pure-PyTorch Mamba-3 prefill.

Every row is measured or says "not run: <reason>" (an exception of the op, a missing package,
the run's time budget). Times are medians after warm-up: CUDA events around each call with the
L2 cache flushed before it (GPU), perf_counter (CPU). Parity: relative L2 error against our
float64 reference lane (the torch op on CPU float64 tensors) on identical bf16-exact inputs, for
the output, every final state and every gradient, plus ours against the official directly.

The official package is imported without running its __init__ (which needs its CUDA extension);
nothing of it is copied here. Peer code is imported from the installed package only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import types
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

OFFICIAL_VERSION = "2.3.2.post1"

# ---------------------------------------------------------------------------------------------
# Rows: measured or not run


class NotRun(Exception):
    """A row that cannot run here; the message is the reason."""


def not_run_reason(exc: BaseException) -> str:
    """'not run: <why>' from an exception. An op's own "not supported" answer, a missing package
    or the time budget is a plain reason; anything else is marked as an error (and its traceback
    goes to the log)."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    first = first[:400]
    if isinstance(exc, (NotRun, ImportError)) or "not supported" in first.lower():
        return f"not run: {first}"
    print("".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=8)),
          file=sys.stderr, flush=True)
    return f"not run: error: {type(exc).__name__}: {first}"


class Budget:
    """The run's wall-clock budget: a row that would start past it is not run."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def check(self, reserve: float = 0.0) -> None:
        if self.elapsed() + reserve > self.seconds:
            raise NotRun(f"time budget of this run ({self.seconds:.0f} s) exhausted")


def log(msg: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Shapes (DESIGN.md §6: B, L, H, G, N, P, R); NA = N / 4 (rope_fraction 0.5, the module default)


@dataclass(frozen=True)
class Shape:
    name: str
    B: int
    L: int
    H: int
    G: int
    N: int
    P: int
    R: int = 1

    @property
    def NA(self) -> int:
        return self.N // 4

    def label(self) -> str:
        return (f"{self.name} (B={self.B}, L={self.L}, H={self.H}, G={self.G}, N={self.N}, "
                f"P={self.P}, R={self.R})")

    def with_(self, **kw) -> "Shape":
        d = asdict(self)
        d.update(kw)
        return Shape(**d)


def gpu_config():
    train, long, wide = (Shape("train", 4, 4096, 64, 1, 128, 64), Shape("long", 1, 65536, 64, 1, 128, 64),
                         Shape("wide", 8, 8192, 32, 1, 128, 64))
    return dict(
        siso=[train, long, wide],
        mimo=[train.with_(R=4), long.with_(R=4), wide.with_(R=4),
              Shape("megacpp", 8, 8192, 16, 1, 64, 64, 4)],
        decode=[Shape(f"decode-R{r}-b{b}", b, 1, 64, 1, 128, 64, r) for r in (1, 4)
                for b in (1, 16, 128, 512)],
        # B·L = 32768 with B in {8, 4, 2, 1}: the batch sizes of the timed shapes, so the
        # official Triton kernels need no other integer specializations (compiles).
        sweep=[Shape(f"sweep-L{L}", 32768 // L, L, 64, 1, 128, 64) for L in
               (4096, 8192, 16384, 32768)],
        parity_siso=Shape("parity", 2, 512, 8, 1, 128, 64),
        parity_mimo=Shape("parity", 2, 512, 8, 1, 128, 64, 4),
        parity_decode=Shape("parity-decode", 4, 16, 4, 1, 128, 64),  # L = decode steps
        attn_head_dim=128,
        decode_layers=8,
    )


def cpu_config():
    base = Shape("cpu", 2, 64, 8, 1, 32, 16)
    return dict(
        siso=[base],
        mimo=[base.with_(R=4)],
        decode=[Shape(f"decode-R{r}-b{b}", b, 1, 8, 1, 32, 16, r) for r in (1, 4) for b in (1, 8)],
        sweep=[Shape(f"sweep-L{L}", 128 // L, L, 8, 1, 32, 16) for L in (32, 64, 128)],
        # Odd length (a partial chunk), GQA, initial states: the cases that catch plumbing bugs.
        parity_siso=Shape("parity", 2, 67, 4, 2, 16, 8),
        parity_mimo=Shape("parity", 2, 67, 4, 2, 16, 8, 4),
        parity_decode=Shape("parity-decode", 3, 9, 4, 2, 16, 8),
        attn_head_dim=128,
        decode_layers=4,
    )


# ---------------------------------------------------------------------------------------------
# Inputs (core layout, DESIGN.md §2.1). Activations bf16; parameters fp32. Values that the
# official SISO function rounds to bf16 (Trap, Angles) are bf16-exact, so every implementation
# computes on the same numbers.


def _bf16_exact(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def make_inputs(s: Shape, device: str, seed: int, *, states: bool = False,
                mimo: Optional[bool] = None) -> Dict[str, Optional[torch.Tensor]]:
    g = torch.Generator(device=device).manual_seed(seed)
    mimo = s.R > 1 if mimo is None else mimo
    bf = torch.bfloat16

    def randn(*shape, dtype=torch.float32, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, device=device) * scale + shift).to(dtype)

    def rand(*shape):
        return torch.rand(*shape, generator=g, device=device)

    B, L, H, G, N, P, R, NA = s.B, s.L, s.H, s.G, s.N, s.P, s.R, s.NA
    qk = (B, L, R, G, N) if mimo else (B, L, G, N)
    bias = (H, R, N) if mimo else (H, N)
    # dt from the module's init distribution (log-uniform in [1e-3, 1e-1]); A in [-16, -1].
    dt = torch.exp(rand(B, H, L) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    A = -(1.0 + 15.0 * rand(H))
    x = dict(
        q=randn(*qk, dtype=bf), k=randn(*qk, dtype=bf), v=randn(B, L, H, P, dtype=bf),
        adt=(A[None, :, None] * dt).contiguous(), dt=dt,
        trap=randn(B, H, L, dtype=bf),
        q_bias=randn(*bias, scale=0.1, shift=1.0), k_bias=randn(*bias, scale=0.1, shift=1.0),
        angles=_bf16_exact(randn(B, L, H, NA)),
        d=randn(H), z=randn(B, L, H, P, dtype=bf),
        mimo_v=None, mimo_z=None, mimo_o=None,
        init=None,
    )
    if mimo:
        x["mimo_v"] = randn(H, R, P, scale=0.1, shift=1.0 / R)
        x["mimo_z"] = randn(H, R, P, scale=0.1, shift=1.0)
        x["mimo_o"] = randn(H, R, P, scale=0.1, shift=1.0 / R)
    if states:
        x["init"] = (rand(B, H, NA) * 2 * math.pi, randn(B, H, P, N, scale=0.1),
                     randn(B, R, H, N) if mimo else randn(B, H, N), randn(B, H, P))
    return x


def make_step_inputs(s: Shape, device: str, seed: int) -> Dict[str, torch.Tensor]:
    """One decode token: Q, K (B, G, N) or (B, R, G, N); V, Z (B, H, P); ADT, DT, Trap (B, H);
    Angles (B, H, NA); states (angle, ssm, k, v)."""
    p = make_inputs(s.with_(L=1), device, seed, states=True, mimo=s.R > 1)
    out = {k: (v[:, 0] if v is not None and k in ("q", "k", "v", "z", "angles") else v)
           for k, v in p.items() if k != "init"}
    for k in ("adt", "dt", "trap"):
        out[k] = p[k][:, :, 0].contiguous()
    out["init"] = p["init"]
    return out


def tensor_bytes(*ts) -> int:
    n = 0
    for t in ts:
        if isinstance(t, (tuple, list)):
            n += tensor_bytes(*t)
        elif isinstance(t, torch.Tensor):
            n += t.numel() * t.element_size()
    return n


def input_bytes(x) -> int:
    return tensor_bytes(*[v for k, v in x.items() if k != "init"], x.get("init"))


def mamba3_flops(s: Shape) -> float:
    """The project-wide useful-FLOP count of one forward (NOTES.md, cpu lane)."""
    return 2.0 * s.B * s.L * s.H * s.R * (64 * (s.N + s.P) + 2 * s.N * s.P)


# ---------------------------------------------------------------------------------------------
# Implementations


def official_light_import() -> None:
    """Registers mamba_ssm as a bare package so that its kernel modules import without its
    __init__ (which loads the CUDA extension a source build without CUDA lacks, and the model
    classes with their extra dependencies)."""
    if "mamba_ssm" in sys.modules:
        return
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(f"mamba_ssm is not installed (pip install mamba-ssm=={OFFICIAL_VERSION})")
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__file__ = spec.origin
    sys.modules["mamba_ssm"] = pkg


_OFFICIAL: Dict[str, object] = {}


def official(name: str):
    """An official function by short name, imported on first use; NotRun if unavailable."""
    where = {
        "siso_combined": ("mamba_ssm.ops.triton.mamba3.mamba3_siso_combined", "mamba3_siso_combined"),
        "siso_step": ("mamba_ssm.ops.triton.mamba3.mamba3_siso_step", "mamba3_siso_step"),
        "mimo_combined": ("mamba_ssm.ops.tilelang.mamba3.mamba3_mimo", "mamba3_mimo"),
        "mimo_step": ("mamba_ssm.ops.cute.mamba3.mamba3_step_fn", "mamba3_step_fn"),
        "ssd_combined": ("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined"),
        "ssd_ref": ("mamba_ssm.ops.triton.ssd_combined", "ssd_chunk_scan_combined_ref"),
        "rotary_ref": ("mamba_ssm.ops.triton.mamba3.mamba3_mimo_rotary_step",
                       "apply_rotary_qk_inference_reference"),
        "step_ref": ("mamba_ssm.ops.cute.mamba3.mamba3_step_fn", "selective_state_update_fused_ref_v2"),
    }[name]
    if name not in _OFFICIAL:
        try:
            official_light_import()
            mod = __import__(where[0], fromlist=[where[1]])
            _OFFICIAL[name] = getattr(mod, where[1])
        except Exception as e:  # noqa: BLE001 - any import failure is the row's reason
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if isinstance(e, ImportError) and getattr(e, "name", "") == "cutlass":
                why += (" (CuTe DSL: its CUDA 13 library wheel, 92 MB, is more than a device "
                    "run here carries, and the machine has no network)")
            _OFFICIAL[name] = NotRun(f"official {where[0]}.{where[1]} unavailable: {why}")
    f = _OFFICIAL[name]
    if isinstance(f, NotRun):
        raise f
    return f


def ours():
    import mamba3

    return mamba3


def call_ours(x, *, final_states=False):
    m = ours()
    if x["mimo_v"] is not None or x["q"].dim() == 5:
        r = m.mimo_combined(x["q"], x["k"], x["v"], x["adt"], x["dt"], x["trap"], x["q_bias"],
                            x["k_bias"], x["mimo_v"], x["mimo_z"], x["mimo_o"], x["angles"],
                            D=x["d"], Z=x["z"], chunk_size=16, rotary_dim_divisor=4,
                            dtype=x["v"].dtype, return_state=final_states, Input_States=x["init"])
    else:
        r = m.siso_combined(x["q"], x["k"], x["v"], x["adt"], x["dt"], x["trap"], x["q_bias"],
                            x["k_bias"], x["angles"], D=x["d"], Z=x["z"], Input_States=x["init"],
                            chunk_size=64, return_final_states=final_states)
    return r if final_states else (r,)


def call_official(x, *, final_states=False):
    if x["mimo_v"] is not None:
        if x["init"] is not None:
            raise NotRun("the official MIMO function takes no initial states")
        f = official("mimo_combined")
        r = f(x["q"], x["k"], x["v"], x["adt"], x["dt"], x["trap"], x["q_bias"], x["k_bias"],
              x["mimo_v"], x["mimo_z"], x["mimo_o"], x["angles"], x["d"], x["z"], 16, 4,
              x["v"].dtype, return_state=final_states)
    else:
        f = official("siso_combined")
        r = f(x["q"], x["k"], x["v"], x["adt"], x["dt"], x["trap"], x["q_bias"], x["k_bias"],
              x["angles"], D=x["d"], Z=x["z"], Input_States=x["init"], chunk_size=64,
              return_final_states=final_states)
    return tuple(r) if final_states else (r,)


def official_ref_prefill(x, *, final_states=False):
    """The official pure-PyTorch decode reference (rotary + fused state update), token by token:
    the package's only pure-PyTorch path of the Mamba-3 recurrence. Differentiable."""
    rot = official("rotary_ref")
    upd = official("step_ref")
    q, k, v = x["q"], x["k"], x["v"]
    mimo = x["mimo_v"] is not None
    if not mimo:
        q, k = q.unsqueeze(2), k.unsqueeze(2)  # (B, L, 1, G, N)
    B, L, R, G, N = q.shape
    H, P = v.shape[2], v.shape[3]
    NA = x["angles"].shape[-1]
    heads = torch.arange(H, device=v.device) // (H // G)
    qb = x["q_bias"] if mimo else x["q_bias"].unsqueeze(1)  # (H, R, N)
    kb = x["k_bias"] if mimo else x["k_bias"].unsqueeze(1)
    ones = torch.ones(R, H, P, dtype=torch.float32, device=v.device)
    psi = x["mimo_v"].transpose(0, 1) if mimo else ones  # (R, H, P)
    zeta = x["mimo_z"].transpose(0, 1) if mimo else ones
    phi = x["mimo_o"].transpose(0, 1) if mimo else ones
    if x["init"] is not None:
        ang, ssm, ks, vs = x["init"]
        ks = ks if mimo else ks.unsqueeze(1)
        vs = vs.float()
    else:
        ang = torch.zeros(B, H, NA, device=v.device)
        ssm = torch.zeros(B, H, P, N, device=v.device)
        ks = torch.zeros(B, R, H, N, device=v.device)
        vs = torch.zeros(B, H, P, device=v.device)
    outs = []
    for t in range(L):
        qt = q[:, t].index_select(2, heads)  # (B, R, H, N)
        kt = k[:, t].index_select(2, heads)
        dt_t = x["dt"][:, :, t]
        qr, kr, ang = rot(qt, kt, ang, x["angles"][:, t], dt_t, bias_q=qb.transpose(0, 1),
                          bias_k=kb.transpose(0, 1), rotate_pairwise=not mimo)
        o, ssm = upd(ssm, x["adt"][:, :, t] / dt_t, kr, qr, psi, v[:, t], zeta, x["z"][:, t],
                     dt_t, ks, vs, torch.sigmoid(x["trap"][:, :, t].float()), x["d"], phi)
        ks, vs = kr, v[:, t].float()
        outs.append(o)
    out = torch.stack(outs, dim=1).to(v.dtype)
    if not final_states:
        return (out,)
    return (out, ang, ssm, ks if mimo else ks[:, 0], vs)


# ---------------------------------------------------------------------------------------------
# Timing


class Timer:
    """Median of `iters` timed calls after `warmup` calls; GPU: CUDA events, L2 flushed (a 256 MB
    write) before each call; CPU: perf_counter."""

    def __init__(self, gpu: bool, budget: Budget, target_s: float, max_iters: int,
                 min_iters: int = 3):
        self.gpu = gpu
        self.min_iters = min_iters
        self.budget = budget
        self.target_s = target_s
        self.max_iters = max_iters
        self.flush_buf = torch.empty(256 << 20, dtype=torch.uint8, device="cuda") if gpu else None

    def _once(self, fn) -> float:
        if not self.gpu:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        self.flush_buf.zero_()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def measure(self, fn, warmup: int = 2) -> Dict[str, float]:
        self.budget.check()
        min_iters = self.min_iters
        for _ in range(max(warmup - 1, 0)):
            fn()
        est = self._once(fn)  # the last warm-up, timed: sizes the run
        n = int(max(min_iters, min(self.max_iters, self.target_s * 1e3 / max(est, 1e-3))))
        # Leave the budget room: never plan a row past it.
        left_ms = (self.budget.seconds - self.budget.elapsed()) * 1e3
        n = max(1, min(n, int(left_ms / max(est, 1e-3) / 2)))
        ts = [self._once(fn) for _ in range(n)]
        return dict(ms=statistics.median(ts), min_ms=min(ts), iters=n, warmup=warmup)


def grad_fn(call, x, names, seed):
    """(fn, leaves): fn() runs forward + backward of `call` w.r.t. the tensors `names` of x."""
    leaves = {}
    y = dict(x)
    for n in names:
        if y.get(n) is not None:
            leaves[n] = y[n].detach().clone().requires_grad_(True)
            y[n] = leaves[n]
    outs = call(y)
    g = torch.Generator(device=outs[0].device).manual_seed(seed)
    cot = torch.randn(outs[0].shape, generator=g, device=outs[0].device).to(outs[0].dtype)
    del outs
    lv = list(leaves.values())

    def fn():
        out = call(y)[0]
        return torch.autograd.grad(out, lv, cot, allow_unused=True)

    return fn


def graph_replay(build: Callable[[], Callable]) -> Callable:
    """The callable build() returns, captured in one CUDA graph after two warm-up calls on a
    side stream; returns the graph's replay (which keeps the graph and its memory alive)."""
    f = build()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            f()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        f()
    return g.replay


GRAD_NAMES = ("q", "k", "v", "adt", "dt", "trap", "q_bias", "k_bias", "angles", "d", "z",
              "mimo_v", "mimo_z", "mimo_o")


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class Run:
    mode: str
    out_dir: str
    budget: Budget
    device_tag: str = ""
    meta: Dict[str, object] = field(default_factory=dict)
    ceilings: List[Dict[str, object]] = field(default_factory=list)
    timing: List[Dict[str, object]] = field(default_factory=list)
    parity: List[Dict[str, object]] = field(default_factory=list)
    # Compile pass (GPU): every row's callable runs once, nothing is recorded.
    dry: bool = False
    current: str = ""  # the row in progress (shown if the run is stopped from outside)

    @property
    def gpu(self) -> bool:
        return self.mode == "gpu"

    @property
    def device(self) -> str:
        return "cuda" if self.gpu else "cpu"

    def record(self, row: Dict[str, object]) -> None:
        if not self.dry:
            self.timing.append(row)
            write_json(self)

    def ceiling(self, name: str) -> Optional[float]:
        for c in self.ceilings:
            if c["name"] == name and c["status"] == "measured":
                return float(c["value"])
        return None

    def add_time(self, section: str, shape: Shape, op: str, impl: str, fn: Callable[[], Callable],
                 *, flops: float = 0.0, nbytes: float = 0.0, per: int = 1, timer: "Timer",
                 note: str = "") -> Dict[str, object]:
        """Measures fn()() (fn builds the callable, untimed). per: calls per timed call (decode
        steps per graph replay), the reported time is per call."""
        row = dict(section=section, shape=shape.name, dims=asdict(shape), op=op, impl=impl,
                   note=note)
        self.current = f"{section} {shape.name} {op} {impl}"
        if self.dry:  # compile pass: only the peers' JIT-compiled kernels need it
            if not op.endswith("-graph") and impl not in ("ours", "sdpa"):
                self.dry_call(fn)
            return row
        write_json(self)
        try:
            self.budget.check()
            f = fn()
            r = timer.measure(f)
            ms = r["ms"] / per
            row.update(status="measured", ms=ms, min_ms=r["min_ms"] / per, iters=r["iters"],
                       warmup=r["warmup"])
            if flops:
                row["tflops"] = flops / (ms * 1e-3) / 1e12
            if nbytes:
                row["tbps"] = nbytes / (ms * 1e-3) / 1e12
        except Exception as e:  # noqa: BLE001 - the reason is the row
            row["status"] = not_run_reason(e)
            if "error:" in row["status"]:
                row["traceback"] = traceback.format_exc(limit=6)
        finally:
            if self.gpu:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        self.record(row)
        shown = f"{row['ms']:.4g} ms" if row["status"] == "measured" else row["status"]
        log(f"{section:8s} {shape.name:14s} {op:9s} {impl:9s} {shown}")
        return row

    def dry_call(self, build: Callable[[], Callable]) -> None:
        """Compile pass: build and call once; failures are the real pass's business."""
        try:
            self.budget.check()
            build()()
        except Exception as e:  # noqa: BLE001
            log(f"compile pass: {self.current}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        finally:
            if self.gpu:
                torch.cuda.synchronize()


# ----- ceilings


def measure_ceilings(run: Run) -> None:
    def add(name, unit, f, how):
        row = dict(name=name, unit=unit, how=how)
        try:
            run.budget.check()
            row.update(status="measured", value=f())
        except Exception as e:  # noqa: BLE001
            row["status"] = not_run_reason(e)
        run.ceilings.append(row)
        log(f"ceiling {name}: {row.get('value', row['status'])}")

    if run.gpu:
        def copy_bw():
            n = 2 << 30
            a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
            b = torch.empty_like(a)
            for _ in range(3):
                b.copy_(a)
            ts = []
            for _ in range(10):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                b.copy_(a)
                e.record()
                e.synchronize()
                ts.append(s.elapsed_time(e))
            return 2 * n / (statistics.median(ts) * 1e-3) / 1e12

        def matmul():
            n = 8192
            a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
            for _ in range(3):
                a @ b
            ts = []
            for _ in range(10):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                a @ b
                e.record()
                e.synchronize()
                ts.append(s.elapsed_time(e))
            return 2 * n ** 3 / (statistics.median(ts) * 1e-3) / 1e12

        add("copy", "TB/s", copy_bw, "device-to-device copy of 2 GiB (bytes read + written), median of 10")
        add("matmul", "TFLOP/s", matmul, "bf16 8192^3 torch.matmul on random data, median of 10")
    else:
        def copy_bw():
            a = torch.rand(64 << 20)
            b = torch.empty_like(a)
            ts = []
            for _ in range(7):
                t0 = time.perf_counter()
                b.copy_(a)
                ts.append(time.perf_counter() - t0)
            return 2 * a.numel() * 4 / statistics.median(ts) / 1e12

        def matmul():
            n = 1024
            a, b = torch.randn(n, n), torch.randn(n, n)
            a @ b
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                a @ b
                ts.append(time.perf_counter() - t0)
            return 2 * n ** 3 / statistics.median(ts) / 1e12

        add("copy", "TB/s", copy_bw, "CPU copy of 256 MB (bytes read + written), median of 7")
        add("matmul", "TFLOP/s", matmul,
            f"fp32 1024^3 torch.matmul, {torch.get_num_threads()} threads, median of 5")


# ----- prefill rows (Mamba-3 SISO / MIMO)


def prefill_rows(run: Run, shapes: Sequence[Shape], kind: str, timer: Timer) -> None:
    official_impl = call_official if run.gpu else official_ref_prefill
    official_name = "official" if run.gpu else "official-ref"
    for s in shapes:
        x = None
        try:
            run.budget.check()
            x = make_inputs(s, run.device, seed=1)
        except Exception as e:  # noqa: BLE001
            for op in ("fwd", "fwd+bwd"):
                for impl in ("ours", official_name):
                    run.record(dict(section=kind, shape=s.name, dims=asdict(s), op=op,
                                    impl=impl, status=not_run_reason(e)))
            continue
        fl = mamba3_flops(s)
        nb = input_bytes(x) + tensor_bytes(x["v"])  # inputs read, out written (out as V)

        # forward + backward: gradients of every input; floor: inputs read twice, out written,
        # d_out read, gradients (as large as the inputs) written.
        nb_grad = 3 * input_bytes(x) + 2 * tensor_bytes(x["v"])
        impls = (("ours", call_ours), (official_name, official_impl))

        def forward_only(call):
            def f():
                with torch.no_grad():
                    call(x)
            return f

        def with_grads(call):
            return grad_fn(call, x, GRAD_NAMES, seed=2)

        for impl, call in impls:
            run.add_time(kind, s, "fwd", impl, lambda call=call: forward_only(call), flops=fl,
                         nbytes=nb, timer=timer)
        for impl, call in impls:
            run.add_time(kind, s, "fwd+bwd", impl, lambda call=call: with_grads(call),
                         flops=4 * fl, nbytes=nb_grad, timer=timer)
        # The same calls captured in one CUDA graph and replayed: device time without the
        # host's per-call work (launches, JIT-cache lookups), which the rows above include.
        if run.gpu:
            for impl, call in impls:
                run.add_time(kind, s, "fwd-graph", impl,
                             lambda call=call: graph_replay(lambda: forward_only(call)),
                             flops=fl, nbytes=nb, timer=timer, note="one CUDA graph replay")
                run.add_time(kind, s, "fwd+bwd-graph", impl,
                             lambda call=call: graph_replay(lambda: with_grads(call)),
                             flops=4 * fl, nbytes=nb_grad, timer=timer,
                             note="one CUDA graph replay")
        x = None
        if run.gpu:
            torch.cuda.empty_cache()


# ----- context rows: Mamba-2 SSD and attention at the same d_inner


def mamba2_chunk(gpu: bool) -> int:
    return 256 if gpu else 32  # the Mamba2 module's default; small CPU shapes use 32


def mamba2_inputs(s: Shape, device: str):
    """The Mamba2 module's call at d_inner = H·P: x (B, L, H, P), dt (B, L, H) raw (softplus(dt +
    dt_bias) inside), A (H,), B, C (B, L, G, N), D (H,)."""
    g = torch.Generator(device=device).manual_seed(3)
    bf = torch.bfloat16

    def r(*sh):
        return torch.randn(*sh, generator=g, device=device)
    dt0 = torch.exp(torch.rand(s.H, generator=g, device=device) * (math.log(0.1) - math.log(1e-3))
                    + math.log(1e-3))
    return dict(x=r(s.B, s.L, s.H, s.P).to(bf), dt=r(s.B, s.L, s.H).to(bf),
                A=-(1 + 15 * torch.rand(s.H, generator=g, device=device)),
                Bm=r(s.B, s.L, s.G, s.N).to(bf), Cm=r(s.B, s.L, s.G, s.N).to(bf),
                D=r(s.H), dt_bias=dt0 + torch.log(-torch.expm1(-dt0)))


def mamba2_call(y, gpu: bool):
    f = official("ssd_combined" if gpu else "ssd_ref")
    return (f(y["x"], y["dt"], y["A"], y["Bm"], y["Cm"], mamba2_chunk(gpu), D=y["D"],
              dt_bias=y["dt_bias"], dt_softplus=True),)


def sdpa_inputs(s: Shape, device: str, head_dim: int):
    """q, k, v (B, h, L, d) bf16 with h·d = H·P (d = head_dim where H·P allows)."""
    nh = max(1, s.H * s.P // head_dim)
    dh = s.H * s.P // nh
    g = torch.Generator(device=device).manual_seed(4)
    return {n: torch.randn(s.B, nh, s.L, dh, generator=g, device=device).to(torch.bfloat16)
            for n in ("q", "k", "v")}


def sdpa_call(y):
    return (torch.nn.functional.scaled_dot_product_attention(y["q"], y["k"], y["v"],
                                                             is_causal=True),)


M2_GRADS = ("x", "dt", "A", "Bm", "Cm", "D", "dt_bias")


def context_rows(run: Run, shapes: Sequence[Shape], timer: Timer, ops=("fwd", "fwd+bwd"),
                 section: str = "context") -> None:
    hd = run_cfg(run)["attn_head_dim"]
    for s in shapes:
        d_inner = s.H * s.P
        nh = max(1, d_inner // hd)
        dh = d_inner // nh
        m2_inputs = lambda: mamba2_inputs(s, run.device)  # noqa: E731
        m2_call = lambda y: mamba2_call(y, run.gpu)  # noqa: E731
        attn_inputs = lambda: sdpa_inputs(s, run.device, hd)  # noqa: E731
        attn_call = sdpa_call
        attn_flops = 2.0 * s.B * nh * s.L * s.L * dh  # causal: half of 4·B·h·L²·d
        for impl, mk, call, grads, fl in (
                ("mamba2", m2_inputs, m2_call, M2_GRADS, 0.0),
                ("sdpa", attn_inputs, attn_call, ("q", "k", "v"), attn_flops)):
            note = (f"mamba_chunk_scan_combined, H={s.H}, P={s.P}, N={s.N}, G={s.G}, chunk "
                    f"{mamba2_chunk(True)}" if impl == "mamba2" else f"causal, {nh} heads of {dh}")
            if impl == "mamba2" and not run.gpu:
                note = f"ssd_chunk_scan_combined_ref (pure PyTorch), chunk {mamba2_chunk(False)}"
            holder = {}

            def inputs(mk=mk):
                if "x" not in holder:
                    holder["x"] = mk()
                return holder["x"]

            if "fwd" in ops:
                def build(call=call, inputs=inputs):
                    y = inputs()

                    def f():
                        with torch.no_grad():
                            call(y)
                    return f
                run.add_time(section, s, "fwd", impl, build, flops=fl, timer=timer, note=note)
            if "fwd+bwd" in ops:
                run.add_time(section, s, "fwd+bwd", impl,
                             lambda call=call, inputs=inputs, grads=grads:
                             grad_fn(call, inputs(), grads, seed=5),
                             flops=3.5 * fl, timer=timer, note=note)
            holder.clear()
            if run.gpu:
                torch.cuda.empty_cache()


def sweep_rows(run: Run, s: Shape, timer: Timer) -> None:
    """Time vs L at fixed B·L: ours, official, Mamba-2 and attention, forward and fwd+bwd."""
    x = None
    try:
        run.budget.check()
        x = make_inputs(s, run.device, seed=1)
    except Exception:  # noqa: BLE001 - the rows below say why
        pass
    official_impl = call_official if run.gpu else official_ref_prefill
    for impl, call in (("ours", call_ours),
                       ("official" if run.gpu else "official-ref", official_impl)):
        def build(call=call):
            if x is None:
                raise NotRun("inputs could not be made")

            def f():
                with torch.no_grad():
                    call(x)
            return f

        def build_grad(call=call):
            if x is None:
                raise NotRun("inputs could not be made")
            return grad_fn(call, x, GRAD_NAMES, seed=2)
        run.add_time("sweep", s, "fwd", impl, build, flops=mamba3_flops(s), timer=timer)
        run.add_time("sweep", s, "fwd+bwd", impl, build_grad, flops=4 * mamba3_flops(s),
                     timer=timer)
    x = None
    context_rows(run, [s], timer, section="sweep")


# ----- decode rows


def decode_rows(run: Run, shapes: Sequence[Shape], timer: Timer) -> None:
    layers = run_cfg(run)["decode_layers"]
    for s in shapes:
        mimo = s.R > 1
        try:
            run.budget.check()
            xs = [make_step_inputs(s, run.device, seed=10 + i) for i in range(layers)]
        except Exception as e:  # noqa: BLE001
            for impl in ("ours", "official" if run.gpu else "official-ref"):
                for op in ("step", "step-graph") if run.gpu else ("step",):
                    run.record(dict(section="decode", shape=s.name, dims=asdict(s), op=op,
                                    impl=impl, status=not_run_reason(e)))
            continue
        x0 = xs[0]
        out_shape = x0["v"].shape
        outs = [torch.empty(out_shape, dtype=x0["v"].dtype, device=run.device) for _ in xs]
        # Per step: the four states read and written, the token's inputs read, out written.
        nb = (2 * tensor_bytes(x0["init"]) + tensor_bytes(*[v for k, v in x0.items() if k != "init"])
              + tensor_bytes(outs[0]))
        m = ours()

        def ours_step_all():
            for x, o in zip(xs, outs):
                if mimo:
                    m.mimo_step(x["q"], x["k"], x["v"], x["adt"], x["dt"], x["trap"], x["q_bias"],
                                x["k_bias"], x["mimo_v"], x["mimo_z"], x["mimo_o"], x["angles"],
                                D=x["d"], Z=x["z"], Input_States=x["init"], out=o)
                else:
                    m.siso_step(x["q"], x["k"], x["v"], x["adt"], x["dt"], x["trap"], x["q_bias"],
                                x["k_bias"], x["angles"], D=x["d"], Z=x["z"],
                                Input_States=x["init"], out=o)

        def official_step_all_builder():
            if mimo:
                if run.gpu:
                    official("mimo_step")  # NotRun with the import failure when absent
                    raise NotRun("official MIMO decode (CuTe DSL, mamba3_step_fn) is not wired "
                                 "into this harness")
                ref_step = official_decode_ref_step
            elif run.gpu:
                f = official("siso_step")

                def ref_step(x):
                    return f(x["q"], x["k"], x["v"], x["adt"], x["dt"], x["trap"], x["q_bias"],
                             x["k_bias"], x["angles"], D=x["d"], Z=x["z"], Input_States=x["init"])
            else:
                ref_step = official_decode_ref_step

            def step_all():
                # Out of place: each layer's new states are the next call's input, as a serving
                # loop would keep them.
                for x in xs:
                    r = ref_step(x)
                    x["init"] = tuple(r[1])
            return step_all

        impls = [("ours", lambda: ours_step_all), ("official" if run.gpu else "official-ref",
                                                    official_step_all_builder)]
        for impl, builder in impls:
            note = f"{layers} layers per timed call, per-step time"
            run.add_time("decode", s, "step", impl, builder, nbytes=nb, per=layers, timer=timer,
                         note=note + (", eager (Python loop)" if run.gpu else ""))
            if run.gpu:
                run.add_time("decode", s, "step-graph", impl, lambda b=builder: graph_replay(b),
                             nbytes=nb, per=layers, timer=timer,
                             note=note + ", one CUDA graph replay")
        xs = outs = None
        if run.gpu:
            torch.cuda.empty_cache()


def official_decode_ref_step(x):
    """One token through the official pure-PyTorch decode reference: (out, (angle, ssm, k, v))."""
    y = {k: (v.unsqueeze(1) if k in ("q", "k", "v", "z", "angles") and v is not None else v)
         for k, v in x.items() if k != "init"}
    for k in ("adt", "dt", "trap"):
        y[k] = x[k].unsqueeze(-1)
    y["init"] = x["init"]
    r = official_ref_prefill(y, final_states=True)
    return r[0][:, 0], r[1:]


# ----- parity


def rel_l2(a: torch.Tensor, ref: torch.Tensor, angle: bool = False) -> float:
    a = a.detach().double().cpu()
    ref = ref.detach().double().cpu()
    if a.shape != ref.shape:
        a = a.reshape(ref.shape)
    d = a - ref
    if angle:  # compared on the circle
        d = torch.remainder(d + math.pi, 2 * math.pi) - math.pi
    den = ref.norm().item()
    return d.norm().item() / (den if den > 0 else 1.0)


STATE_NAMES = ("final.angle", "final.ssm", "final.k", "final.v")
INIT_NAMES = ("initial.angle", "initial.ssm", "initial.k", "initial.v")


def evaluate(call, x, leaves_names, cots, final_states, allow_state_cot=True):
    """Runs call on a copy of x with grad leaves; returns ({tensor name: value}, reasons)."""
    y = dict(x)
    leaves = {}
    for n in leaves_names:
        if y.get(n) is not None:
            leaves[n] = y[n].detach().clone().requires_grad_(True)
            y[n] = leaves[n]
    if x.get("init") is not None:
        init = []
        for n, t in zip(INIT_NAMES, x["init"]):
            leaves[n] = t.detach().clone().requires_grad_(True)
            init.append(leaves[n])
        y["init"] = tuple(init)
    res: Dict[str, object] = {}
    outs = call(y, final_states=final_states)
    res["out"] = outs[0].detach()
    if final_states:
        for n, t in zip(STATE_NAMES, outs[1:]):
            res[n] = t.detach()
    try:
        used = [outs[0]]
        grads = [cots["out"].to(outs[0].device, outs[0].dtype)]
        if final_states and allow_state_cot:
            for n, t in zip(STATE_NAMES, outs[1:]):
                used.append(t)
                grads.append(cots[n].to(t.device, t.dtype).reshape(t.shape))
        names = list(leaves)
        gs = torch.autograd.grad(used, [leaves[n] for n in names], grads, allow_unused=True)
        for n, g in zip(names, gs):
            res["grad." + n] = g.detach() if g is not None else NotRun("no gradient returned")
    except Exception as e:  # noqa: BLE001
        reason = not_run_reason(e)
        for n in leaves:
            res["grad." + n] = NotRun(reason[len("not run: "):])
    return res


def to_ref(x):
    """The same values as float64 CPU tensors (the reference lane)."""
    y = {}
    for k, v in x.items():
        if k == "init":
            y[k] = tuple(t.detach().double().cpu() for t in v) if v is not None else None
        else:
            y[k] = v.detach().double().cpu() if v is not None else None
    return y


def parity_prefill(run: Run, s: Shape, kind: str) -> None:
    mimo = s.R > 1
    # Initial states only in CPU mode (the official path there is our loop over its decode
    # reference, which takes them). On the GPU the official MIMO function takes none, and for
    # SISO they would double the Triton compile work of the run (other constexpr variants of
    # every forward and backward kernel) for one more set of gradients, which CPU mode checks.
    with_states = not run.gpu
    case = f"{kind} {s.label()}" + (", initial states" if with_states else "")
    try:
        run.budget.check()
        x = make_inputs(s, run.device, seed=7, states=with_states)
        g = torch.Generator().manual_seed(8)
        S = s.B
        cots = {"out": torch.randn(s.B, s.L, s.H, s.P, generator=g),
                "final.angle": torch.randn(S, s.H, s.NA, generator=g),
                "final.ssm": torch.randn(S, s.H, s.P, s.N, generator=g),
                "final.k": torch.randn(S, s.R, s.H, s.N, generator=g),
                "final.v": torch.randn(S, s.H, s.P, generator=g)}
        cots["out"] = cots["out"].to(torch.bfloat16).float()
        # Cotangents for the final states only where the official function differentiates them.
        state_cot = not (mimo and run.gpu)
        official_impl = call_official if run.gpu else official_ref_prefill
        if run.dry:  # compile pass: the official call exactly as below, nothing recorded
            run.current = f"parity {kind} official"
            run.dry_call(lambda: lambda: evaluate(official_impl, x, GRAD_NAMES, cots, True,
                                                  state_cot))
            return
        results = {}
        run.current = f"parity {kind}"
        for impl, call, inp in (("reference", call_ours, to_ref(x)), ("ours", call_ours, x),
                                ("official", official_impl, x)):
            run.budget.check()
            t0 = time.time()
            try:
                results[impl] = evaluate(call, inp, GRAD_NAMES, cots, True, state_cot)
            except Exception as e:  # noqa: BLE001
                results[impl] = NotRun(not_run_reason(e)[len("not run: "):])
            log(f"parity {kind} {impl}: {time.time() - t0:.1f} s")
    except Exception as e:  # noqa: BLE001
        if not run.dry:
            run.parity.append(dict(case=case, tensor="*", status=not_run_reason(e)))
        return
    add_parity(run, case, results, cot_note="" if state_cot else
               "cotangent on out only (the official MIMO final states are not differentiable)")


def add_parity(run: Run, case: str, results, cot_note: str = "") -> None:
    add_parity_rows(run, case, results, cot_note)
    write_json(run)


def add_parity_rows(run: Run, case: str, results, cot_note: str = "") -> None:
    ref = results["reference"]
    if isinstance(ref, NotRun):
        run.parity.append(dict(case=case, tensor="*", status=f"not run: reference: {ref}"))
        return
    for name, rv in ref.items():
        if isinstance(rv, NotRun):
            continue
        row = dict(case=case, tensor=name, dtype=str(rv.dtype).replace("torch.", ""),
                   note=cot_note if name.startswith("grad.") else "")
        vals = {}
        angle = name.endswith("angle") and not name.startswith("grad.")
        for impl in ("ours", "official"):
            r = results[impl]
            v = r if isinstance(r, NotRun) else r.get(name, NotRun("not produced"))
            if isinstance(v, NotRun):
                row[impl] = f"not run: {v}"
            else:
                vals[impl] = v
                row[impl] = rel_l2(v, rv, angle)
                row[impl + "_dtype"] = str(v.dtype).replace("torch.", "")
        if len(vals) == 2:
            row["ours_vs_official"] = rel_l2(vals["ours"], vals["official"], angle)
        else:
            row["ours_vs_official"] = "not run: needs both"
        run.parity.append(row)


def parity_decode(run: Run, s: Shape) -> None:
    """s.L consecutive decode steps from random states: every step's out and the final states."""
    for R in (1, 4):
        sh = s.with_(R=R)
        case = f"decode {sh.label()}, {s.L} steps"
        try:
            run.budget.check()
            steps = [make_step_inputs(sh.with_(L=1), run.device, seed=20 + t) for t in range(s.L)]
            init = steps[0]["init"]

            def run_impl(impl):
                states = [t.detach().clone() for t in init]
                if impl == "reference":
                    states = [t.double().cpu() for t in states]
                outs = []
                m = ours()
                for x in steps:
                    if impl == "reference":
                        x = to_ref({k: v for k, v in x.items() if k != "init"} | {"init": None})
                    if impl in ("ours", "reference"):
                        if R > 1:
                            o = m.mimo_step(x["q"], x["k"], x["v"], x["adt"], x["dt"], x["trap"],
                                            x["q_bias"], x["k_bias"], x["mimo_v"], x["mimo_z"],
                                            x["mimo_o"], x["angles"], D=x["d"], Z=x["z"],
                                            Input_States=tuple(states))[0]
                        else:
                            o = m.siso_step(x["q"], x["k"], x["v"], x["adt"], x["dt"], x["trap"],
                                            x["q_bias"], x["k_bias"], x["angles"], D=x["d"],
                                            Z=x["z"], Input_States=tuple(states))[0]
                    else:
                        y = dict(x)
                        y["init"] = tuple(states)
                        if run.gpu and R == 1:
                            f = official("siso_step")
                            o, st = f(y["q"], y["k"], y["v"], y["adt"], y["dt"], y["trap"],
                                      y["q_bias"], y["k_bias"], y["angles"], D=y["d"], Z=y["z"],
                                      Input_States=y["init"])
                        elif run.gpu:
                            official("mimo_step")
                            raise NotRun("official MIMO decode (CuTe DSL) is not wired into this "
                                         "harness")
                        else:
                            o, st = official_decode_ref_step(y)
                        states = [t.detach() for t in st]
                    outs.append(o.detach())
                return {"out": torch.stack(outs, 1), **dict(zip(STATE_NAMES, states))}

            if run.dry:
                run.current = f"parity decode R={R} official"
                run.dry_call(lambda: lambda: run_impl("official"))
                continue
            results = {}
            run.current = f"parity decode R={R}"
            for impl in ("reference", "ours", "official"):
                try:
                    results[impl] = run_impl(impl)
                except Exception as e:  # noqa: BLE001
                    results[impl] = NotRun(not_run_reason(e)[len("not run: "):])
            # The official SISO step returns the K state as (B, H, N); ours (B, H, N) too.
            add_parity(run, case, results)
        except Exception as e:  # noqa: BLE001
            if not run.dry:
                run.parity.append(dict(case=case, tensor="*", status=not_run_reason(e)))


# ---------------------------------------------------------------------------------------------
# Report


def run_cfg(run: Run):
    return gpu_config() if run.gpu else cpu_config()


def fmt_ms(row) -> str:
    if row is None:
        return "—"
    if row["status"] != "measured":
        return row["status"]
    ms = row["ms"]
    return f"{ms * 1e3:.1f} µs" if ms < 1 else f"{ms:.3f} ms"


def pct(row, run: Run) -> str:
    if row is None or row["status"] != "measured":
        return ""
    parts = []
    mm, cp = run.ceiling("matmul"), run.ceiling("copy")
    if row.get("tflops") and mm:
        parts.append(f"{100 * row['tflops'] / mm:.1f}% mm")
    if row.get("tbps") and cp:
        parts.append(f"{100 * row['tbps'] / cp:.1f}% bw")
    return ", ".join(parts)


def find(run: Run, section, shape, op, impl):
    for r in run.timing:
        if (r["section"], r["shape"], r["op"], r["impl"]) == (section, shape, op, impl):
            return r
    return None


def ratio(a, b) -> str:
    """b / a: how many times faster `a` is than `b` (> 1: a is faster)."""
    if a is None or b is None or a["status"] != "measured" or b["status"] != "measured":
        return "—"
    return f"{b['ms'] / a['ms']:.2f}×"


def report_stem(run: Run) -> str:
    return os.path.join(run.out_dir, f"peers-{run.device_tag}-{run.meta['date']}")


def write_json(run: Run) -> str:
    """The run's data so far (rewritten after every row, so a run stopped from outside can still
    be rendered: --render)."""
    if run.dry or not run.out_dir:
        return ""
    os.makedirs(run.out_dir, exist_ok=True)
    path = report_stem(run) + ".json"
    if not run.meta.get("rendered"):
        run.meta["elapsed_s"] = round(run.budget.elapsed(), 1)
        run.meta["current"] = run.current
    data = dict(meta=run.meta, ceilings=run.ceilings, timing=run.timing, parity=run.parity)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(path + ".tmp", path)
    return path


def planned_rows(run: Run):
    """Every (section, shape, op, impl) a full run of this mode records, in report order."""
    cfg = run_cfg(run)
    off = "official" if run.gpu else "official-ref"
    rows = []
    for section in ("siso", "decode", "mimo"):
        for s in cfg[section]:
            ops = (("step", "step-graph") if run.gpu else ("step",)) if section == "decode" \
                else (("fwd", "fwd+bwd", "fwd-graph", "fwd+bwd-graph") if run.gpu
                      else ("fwd", "fwd+bwd"))
            rows += [(section, s, op, impl) for op in ops for impl in ("ours", off)]
    for s in cfg["siso"] + [m for m in cfg["mimo"] if m.name == "megacpp"]:
        rows += [("context", s, op, impl) for op in ("fwd", "fwd+bwd")
                 for impl in ("mamba2", "sdpa")]
    for s in cfg["sweep"]:
        rows += [("sweep", s, op, impl) for impl in ("ours", off, "mamba2", "sdpa")
                 for op in ("fwd", "fwd+bwd")]
    return rows


def fill_missing(run: Run, reason: str, selected: Optional[Sequence[str]] = None) -> int:
    """Adds every planned row the run did not reach, with `reason`; returns how many. Rows of a
    section outside `selected` (the run's --sections) say so instead."""
    have = {(r["section"], r["shape"], r["op"], r["impl"]) for r in run.timing}

    def why(section: str) -> str:
        if selected is not None and section not in selected:
            return f"not run: section '{section}' not selected in this run (--sections)"
        return f"not run: {reason}"

    n = 0
    for section, s, op, impl in planned_rows(run):
        if (section, s.name, op, impl) not in have:
            run.timing.append(dict(section=section, shape=s.name, dims=asdict(s), op=op,
                                   impl=impl, status=why(section)))
            n += 1
    cases = {p["case"].split()[0] + (" R=4" if "R=4" in p["case"] else "") for p in run.parity}
    for case in ("siso", "decode", "decode R=4", "mimo"):
        if case not in cases and not (case == "mimo" and "mimo R=4" in cases):
            run.parity.append(dict(case=case, tensor="*", status=why("parity")))
            n += 1
    return n


def write_report(run: Run) -> Dict[str, str]:
    stem = report_stem(run)
    write_json(run)
    png = make_plot(run, stem + ".png")
    official_name = "official" if run.gpu else "official-ref"
    L: List[str] = []
    m = run.meta
    L.append(f"# Peers: mamba3 vs mamba-ssm {m.get('mamba_ssm')} ({run.mode} mode, {m['date']})")
    L.append("")
    L.append(f"Command: `{m['command']}`  ")
    L.append(f"Device: {m['device']}; torch {m['torch']}, triton {m.get('triton')}, tilelang "
             f"{m.get('tilelang')}, mamba3 {m.get('mamba3')} (commit {m.get('commit')}); "
             f"{m['elapsed_s']} s wall." + (" Environment: " + ", ".join(
                 f"`{k}={v}`" for k, v in m["env"].items()) + "." if m.get("env") else ""))
    L.append("")
    provenance = "numbers from this one run" + (
        "; the official autotuners' choices " + ("were made in this run" if m.get(
            "autotune_cache", "tuned in this run") == "tuned in this run" else
            "come from on-disk timings " + m["autotune_cache"]) if run.gpu else "")
    L.append(f"Generated by `bench/peers/peers.py` ({provenance}). "
             + ("Times: median of CUDA-event-timed calls after warm-up, L2 flushed before each "
                "call." if run.gpu else "Times: median of perf_counter-timed calls after "
                "warm-up.") + " `A/B` columns give how many times faster ours is (> 1: ours "
             "faster). `% mm`: useful FLOP rate over the measured matmul ceiling (Mamba-3: "
             "2·B·L·H·R·(64·(N+P)+2·N·P) per forward, 4× that for forward+backward; attention: "
             "2·B·h·L²·d causal forward, 3.5× for forward+backward); `% bw`: the bytes every "
             "input and output must move at least (forward: inputs + out; forward+backward: "
             "3 × inputs + 2 × out; decode: states read and written + the token's inputs and "
             "out) over the measured copy bandwidth.")
    L.append("")
    if not run.gpu:
        L.append("CPU mode: `official-ref` is the official package's pure-PyTorch decode "
                 "reference (`apply_rotary_qk_inference_reference` + "
                 "`selective_state_update_fused_ref_v2`) applied token by token; mamba-ssm "
                 "has no pure-PyTorch Mamba-3 prefill. Ours is the float32 CPU lane. Context: "
                 "`ssd_chunk_scan_combined_ref` (pure PyTorch) and SDPA on CPU.")
        L.append("")
    L.append("## Ceilings (same run)")
    L.append("")
    L.append("| ceiling | value | how |")
    L.append("|---|---|---|")
    for c in run.ceilings:
        v = f"{c['value']:.3f} {c['unit']}" if c["status"] == "measured" else c["status"]
        L.append(f"| {c['name']} | {v} | {c['how']} |")
    L.append("")
    L.append("## Mamba-3: ours vs official")
    L.append("")
    L.append(f"| kind | shape | op | ours | {official_name} | ours vs {official_name} | ours: "
             f"% of ceiling | {official_name}: % of ceiling |")
    L.append("|---|---|---|---|---|---|---|---|")
    for section in ("siso", "mimo", "decode"):
        seen = []
        for r in run.timing:
            if r["section"] != section:
                continue
            key = (r["shape"], r["op"])
            if key in seen:
                continue
            seen.append(key)
            o = find(run, section, r["shape"], r["op"], "ours")
            p = find(run, section, r["shape"], r["op"], official_name)
            d = r["dims"]
            dims = (f"B={d['B']} H={d['H']} N={d['N']} P={d['P']} R={d['R']}" if section == "decode"
                    else f"{r['shape']} B={d['B']} L={d['L']} H={d['H']} N={d['N']} R={d['R']}")
            L.append(f"| {section} | {dims} | {r['op']} | {fmt_ms(o)} | {fmt_ms(p)} | "
                     f"{ratio(o, p)} | {pct(o, run)} | {pct(p, run)} |")
    L.append("")
    L.append("## Context: Mamba-2 SSD and attention at the same d_inner (H·P)")
    L.append("")
    L.append(f"| shape | op | ours | {official_name} | Mamba-2 SSD | SDPA | ours vs Mamba-2 | "
             "ours vs SDPA | SDPA: % of ceiling |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for section, ours_section in (("context", "siso"), ("sweep", "sweep")):
        seen = []
        for r in run.timing:
            if r["section"] != section or (r["shape"], r["op"]) in seen:
                continue
            seen.append((r["shape"], r["op"]))
            o = (find(run, ours_section, r["shape"], r["op"], "ours")
                 or find(run, "mimo", r["shape"], r["op"], "ours"))
            po = (find(run, ours_section, r["shape"], r["op"], official_name)
                  or find(run, "mimo", r["shape"], r["op"], official_name))
            m2 = find(run, section, r["shape"], r["op"], "mamba2")
            at = find(run, section, r["shape"], r["op"], "sdpa")
            d = r["dims"]
            kind = "" if o is None else f" R={o['dims']['R']}"
            L.append(f"| {r['shape']} B={d['B']} L={d['L']} H={d['H']}{kind} | {r['op']} | "
                     f"{fmt_ms(o)} | {fmt_ms(po)} | {fmt_ms(m2)} | {fmt_ms(at)} | "
                     f"{ratio(o, m2)} | {ratio(o, at)} | {pct(at, run)} |")
    L.append("")
    if png:
        L.append(f"Plot: `{os.path.basename(png)}` (time vs sequence length at fixed B·L).")
    else:
        L.append(f"Plot: not made: {run.meta.get('plot', 'unknown reason')}.")
    L.append("")
    L.append("## Parity: relative L2 error against the float64 reference (same bf16-exact inputs)")
    L.append("")
    L.append(f"| case | tensor | dtype | ours | {official_name} | ours vs {official_name} | note |")
    L.append("|---|---|---|---|---|---|---|")
    for p in run.parity:
        if p.get("status"):
            L.append(f"| {p['case']} | {p['tensor']} | | {p['status']} | | | |")
            continue

        def cell(v):
            return f"{v:.2e}" if isinstance(v, float) else str(v)
        L.append(f"| {p['case']} | {p['tensor']} | {p.get('ours_dtype', p['dtype'])} | "
                 f"{cell(p['ours'])} | {cell(p['official'])} | {cell(p['ours_vs_official'])} | "
                 f"{p.get('note', '')} |")
    L.append("")
    L.append("## Notes")
    L.append("")
    for n in run.meta.get("notes", []):
        L.append(f"- {n}")
    if run.gpu:
        L.append(f"- Compilation and autotuning are never inside a timed call. Compile-and-tune "
                 f"pass: {run.meta.get('compile_pass', 'not run')}, "
                 f"{run.meta.get('compile_pass_s', '-')} s (the official Triton autotuners, "
                 f"unmodified, benchmark their full configuration lists after every "
                 f"configuration is compiled in parallel; kernels it did not reach are tuned "
                 f"on first use, before their timed calls). Autotuning timings: "
                 f"{run.meta.get('autotune_cache', 'tuned in this run')}. TileLang kernels "
                 f"(official MIMO): {run.meta.get('tilelang_prewarm', 'compiled on first use')}.")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(L) + "\n")
    return dict(md=stem + ".md", json=stem + ".json", png=png or "")


def make_plot(run: Run, path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        run.meta["plot"] = f"matplotlib unavailable ({type(e).__name__}: {e})"
        return None
    official_name = "official" if run.gpu else "official-ref"
    series = (("ours", "sweep", "ours"), (official_name, "sweep", official_name),
              ("Mamba-2 SSD", "sweep", "mamba2"), ("SDPA (causal)", "sweep", "sdpa"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    any_point = False
    for ax, op in zip(axes, ("fwd", "fwd+bwd")):
        for label, section, impl in series:
            pts = [(r["dims"]["L"], r["ms"]) for r in run.timing
                   if r["section"] == section and r["impl"] == impl and r["op"] == op
                   and r["status"] == "measured"]
            if pts:
                any_point = True
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L (B·L fixed)")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{op}")
        ax.grid(True, which="both", alpha=0.3)
    rows = [r for r in run.timing if r["section"] == "sweep"]
    if any_point:
        for ax in axes:
            if ax.get_lines():
                ax.legend(fontsize=8)
    if rows:
        d = rows[0]["dims"]
        fig.suptitle(f"{run.meta['device']}: B·L = {d['B'] * d['L']}, H={d['H']}, N={d['N']}, "
                     f"P={d['P']} (d_inner {d['H'] * d['P']}), {run.meta['date']}", fontsize=9)
    fig.tight_layout()
    if not any_point:
        plt.close(fig)
        run.meta["plot"] = "no sweep row was measured"
        return None
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Compile-and-tune pass (GPU mode). The official Triton kernels autotune over many
# configurations (the Mamba-3 SISO forward and backward alone: 216), each compiled on first use,
# one after another, then benchmarked: tens of minutes on a fresh machine. Before anything is
# timed, a child process runs every row's peer callable once, with each autotuner first asked to
# compile all its configurations at once in a thread pool (Triton's AsyncCompileMode; its passes
# release the GIL) and then left to run unmodified: it benchmarks its full configuration list and
# keeps the fastest, in memory and (TRITON_CACHE_AUTOTUNING=1) in Triton's cache directory. The
# timed pass then finds every binary compiled and every choice made. run_h200.sh can carry those
# timings (JSON, a few KB) from one device run to the next on the same card and software; the
# report says where its choices came from. Compilation and tuning are never inside a timed call.


class _NoCachedTiming(Exception):
    pass


def _cached_best(tuner, args, kwargs):
    """The configuration a Triton autotuner would take from its on-disk timings (written with
    TRITON_CACHE_AUTOTUNING=1 by an earlier tuning of the same kernel, key, software and card),
    or None. Uses the autotuner's own key and cache lookup (Autotuner.run, check_disk_cache)."""
    if not getattr(tuner, "cache_results", False) or len(tuner.configs) <= 1:
        return None
    tuner.nargs = dict(zip(tuner.arg_names, args))
    try:
        all_args = {**tuner.nargs, **kwargs}
        named = {k: v for k, v in all_args.items() if k in tuner.arg_names}
        key = [named[k] for k in tuner.keys if k in named]
        key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
        key = tuple(key)
        if key in tuner.cache:
            return tuner.cache[key]

        def miss():
            raise _NoCachedTiming()

        try:
            if tuner.check_disk_cache(key, tuner.prune_configs(kwargs), miss):
                return tuner.cache[key]
        except _NoCachedTiming:
            return None
        return None
    finally:
        tuner.nargs = None


@contextlib.contextmanager
def compile_all_configs(threads: int):
    """Inside: a Triton autotuner first submits every configuration it will benchmark for
    compilation on `threads` threads (AsyncCompileMode), then runs unmodified: it benchmarks them
    and keeps the fastest (on disk too, with TRITON_CACHE_AUTOTUNING=1). When on-disk timings
    already name the fastest, only that one is compiled."""
    from concurrent.futures import ThreadPoolExecutor

    from triton.runtime._async_compile import AsyncCompileMode
    from triton.runtime.autotuner import Autotuner

    original = Autotuner.run

    def run_compiling_all(self, *args, **kwargs):
        plain = {k: v for k, v in kwargs.items() if k != "warmup"}
        every = self.configs
        try:
            best = _cached_best(self, args, plain)
            if best is not None:
                self.configs = [best]
            self.warmup(*args, **plain)  # submits the configurations for compilation
        except Exception:  # noqa: BLE001 - a configuration that cannot compile: the run says
            pass
        finally:
            self.configs = every
        return original(self, *args, **kwargs)

    Autotuner.run = run_compiling_all
    pool = ThreadPoolExecutor(max_workers=threads)
    try:
        with AsyncCompileMode(pool, ignore_errors=True):
            yield
    finally:
        Autotuner.run = original
        pool.shutdown(wait=True)


def compile_pass(run: Run, sections: str, cap_s: float) -> None:
    """Compiles and tunes the official Triton kernels before anything is timed, in a child
    process (this file with --compile-only) that is stopped, compile threads and all, when cap_s
    runs out: a hard cap. The child compiles every autotuning configuration in parallel, then the
    unmodified autotuners benchmark them; the kernels land in Triton's on-disk cache and, with
    TRITON_CACHE_AUTOTUNING=1 (run_h200.sh sets it), the autotuners' timings too, where this
    run's autotuners find them. Kernels the child did not reach are compiled and tuned on first
    use in the timed pass (as warm-up, outside the timed calls): a short cap costs time, never
    results."""
    t0 = time.monotonic()
    cap_s = max(0.0, cap_s)
    proc = _spawn([sys.executable, os.path.abspath(__file__), "--mode", "gpu", "--compile-only",
                   "--sections", sections, "--budget-s", str(max(cap_s, 1.0))], "compile")
    try:
        proc.wait(timeout=cap_s)
        how = f"finished (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        _stop(proc)
        how = f"stopped at its cap of {cap_s:.0f} s; kernels it did not reach compile on first use"
    for ln in _log_tail(proc, 6, "[peers") + _log_tail(proc, 3, "Traceback"):
        log(f"  {ln}")
    run.meta["compile_pass_s"] = round(time.monotonic() - t0, 1)
    run.meta["compile_pass"] = how
    log(f"compile pass: {how}, {run.meta['compile_pass_s']} s")


def start_tilelang_prewarm() -> Optional[subprocess.Popen]:
    """TileLang (official MIMO) kernels compile on the CPU alone, so this one may run on while
    other rows are timed; with a warm TILELANG_CACHE_DIR it finds every kernel there at once."""
    tl = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tilelang_precompile.py")
    if not (os.path.exists(tl) and os.environ.get("TILELANG_TARGET")
            and os.environ.get("TILELANG_CACHE_DIR")):
        return None
    jobs = max(1, min(4, (os.cpu_count() or 4) // 4))
    return _spawn(["nice", "-n", "10", sys.executable, tl, "--jobs", str(jobs)], "tilelang")


def _spawn(cmd: List[str], name: str) -> subprocess.Popen:
    """A child whose output goes to a file (a pipe nobody reads would block it)."""
    import tempfile

    fd, path = tempfile.mkstemp(prefix=f"peers-{name}-", suffix=".log")
    # Its own process group, so that stopping it also stops the compile processes it spawns.
    p = subprocess.Popen(cmd, stdout=fd, stderr=subprocess.STDOUT, start_new_session=True)
    os.close(fd)
    p.logpath = path  # type: ignore[attr-defined]
    return p


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, 9)
        except OSError:
            p.kill()
    p.wait()


def _log_tail(p: subprocess.Popen, n: int, prefix: str = "") -> List[str]:
    try:
        with open(p.logpath) as f:  # type: ignore[attr-defined]
            lines = [ln.rstrip() for ln in f if ln.strip() and ln.startswith(prefix)]
        return lines[-n:]
    except OSError:
        return []


def wait_tilelang(proc: subprocess.Popen, run: Run, cap_s: float) -> None:
    t0 = time.monotonic()
    left = max(0.0, min(cap_s, run.budget.seconds - run.budget.elapsed() - 30.0))
    try:
        proc.wait(timeout=left)
        run.meta["tilelang_prewarm"] = (f"exit {proc.returncode}, waited "
                                        f"{time.monotonic() - t0:.0f} s")
    except subprocess.TimeoutExpired:
        _stop(proc)
        run.meta["tilelang_prewarm"] = (f"compile process stopped after {left:.0f} s of "
                                        "waiting; unfinished kernels compiled on first use")
    for ln in _log_tail(proc, 10, "[precompile]") + _log_tail(proc, 3, "Traceback"):
        log(f"  {ln}")
    log(f"TileLang compile process: {run.meta['tilelang_prewarm']}")


# ---------------------------------------------------------------------------------------------
# Main


def collect_meta(run: Run, argv: Sequence[str]) -> None:
    def ver(pkg):
        try:
            return importlib.metadata.version(pkg)
        except Exception:  # noqa: BLE001
            return "not installed"

    m = run.meta
    m["command"] = os.environ.get("PEERS_COMMAND") or " ".join(["python", "bench/peers/peers.py",
                                                                  *argv])
    m["date"] = os.environ.get("PEERS_DATE") or _dt.date.today().isoformat()
    m["torch"] = torch.__version__
    m["triton"] = ver("triton")
    m["tilelang"] = ver("tilelang")
    m["mamba_ssm"] = ver("mamba-ssm") if ver("mamba-ssm") != "not installed" else ver("mamba_ssm")
    try:
        m["mamba3"] = ours().__version__
    except Exception as e:  # noqa: BLE001
        m["mamba3"] = f"import failed: {e}"
    m["commit"] = os.environ.get("PEERS_COMMIT") or _git_commit()
    m["python"] = platform.python_version()
    if run.gpu:
        p = torch.cuda.get_device_properties(0)
        m["device"] = f"{p.name} ({p.multi_processor_count} SMs, {p.total_memory >> 30} GiB)"
        run.device_tag = "h200" if "H200" in p.name else p.name.lower().replace(" ", "-")
    else:
        m["device"] = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        run.device_tag = "cpu"
    m["notes"] = []
    if run.gpu:
        m["autotune_cache"] = os.environ.get("PEERS_AUTOTUNE_FROM") or "tuned in this run"
    # Our tuning variables change what runs: a report names every one that was set.
    m["env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("MAMBA3_")}


def _git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        r = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"],
                           capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return r.stdout.strip() + ("-dirty" if dirty else "") if r.returncode == 0 else "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


def render(path: str) -> int:
    """Re-renders the report of a run from its JSON; planned rows the run never reached (it was
    stopped from outside, e.g. by a wall-clock limit) are added as not run, naming the row that
    was in progress."""
    with open(path) as f:
        data = json.load(f)
    meta = data["meta"]
    mode = meta.get("mode", "gpu")
    run = Run(mode=mode, out_dir=os.path.dirname(os.path.abspath(path)),
              budget=Budget(float(meta.get("budget_s", 0) or 0)))
    run.meta, run.ceilings, run.timing, run.parity = meta, data["ceilings"], data["timing"], data["parity"]
    run.device_tag = os.path.basename(path)[len("peers-"):-len("-" + meta["date"] + ".json")]
    current = meta.get("current") or "unknown"
    n = fill_missing(run, f"the run was stopped from outside after {meta.get('elapsed_s')} s "
                          f"(its wall-clock limit) while running: {current}")
    meta["rendered"] = True
    meta.setdefault("notes", []).append(
        f"This report was rendered from the run's JSON after the run was stopped from outside "
        f"while running `{current}`; {n} planned rows were not reached.")
    files = write_report(run)
    log(f"rendered {files['md']}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description="mamba3 vs the official mamba-ssm kernels")
    ap.add_argument("--mode", choices=("gpu", "cpu"), default="gpu" if torch.cuda.is_available()
                    else "cpu")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "..", "results"))
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget; rows past it are 'not run' (gpu 540, cpu 300)")
    ap.add_argument("--sections", default="ceilings,parity,siso,decode,context,mimo,sweep")
    ap.add_argument("--no-compile-pass", action="store_true",
                    help="GPU: let each official kernel compile on first use (serially)")
    ap.add_argument("--compile-cap", type=float, default=0.6,
                    help="GPU: the compile-and-tune pass stops at this fraction of the budget")
    ap.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--render", metavar="JSON", help="re-render a run's report from its JSON")
    args = ap.parse_args(argv)
    if args.render:
        return render(args.render)
    if args.mode == "gpu" and not torch.cuda.is_available():
        print("--mode gpu needs a CUDA device; use --mode cpu", file=sys.stderr)
        return 2
    budget = Budget(args.budget_s or (540.0 if args.mode == "gpu" else 300.0))
    run = Run(mode=args.mode, out_dir=os.path.abspath(args.out), budget=budget)
    collect_meta(run, argv)
    run.meta["mode"] = run.mode
    run.meta["budget_s"] = budget.seconds
    cfg = run_cfg(run)
    sections = args.sections.split(",")
    torch.manual_seed(0)
    log(f"{run.mode} mode on {run.meta['device']}, budget {budget.seconds:.0f} s")
    if run.gpu:
        run.meta["notes"].append(
            "Inputs: bf16 activations (Q, K, V, Z, Trap), fp32 ADT, DT, Angles (bf16-exact), "
            "biases, D and MIMO projections; NA = N/4; chunk 64 (SISO) and 16 (MIMO, R=4), as "
            "the official module's defaults. Both implementations get the same tensors.")
        run.meta["notes"].append(
            "Decode: each timed call steps 8 layers (8 independent state sets), the time is per "
            "step; `step` launches from Python (CUDA events, so host launch gaps count), "
            "`step-graph` replays one CUDA graph of the 8 steps. Ours updates states in place; "
            "the official step returns new state tensors.")
        run.meta["notes"].append(
            "Prefill: `fwd` and `fwd+bwd` time each call as launched from Python, so the host's "
            "per-call work counts where the GPU waits for it; `fwd-graph` and `fwd+bwd-graph` "
            "replay the same call captured once in a CUDA graph: device time only. The official "
            "MIMO function goes through TileLang's JIT front end on every call (it logs \"Found "
            "kernel ... in memory cache\" each time): that host work counts in its eager rows, "
            "not in its graph rows.")
    timer = Timer(run.gpu, budget, target_s=0.25 if run.gpu else 0.3,
                  max_iters=40 if run.gpu else 5, min_iters=3 if run.gpu else 2)
    tl_proc: Optional[subprocess.Popen] = None

    def section(name, fn):
        """Runs one section; a failure outside its rows is logged and noted, the next runs."""
        if name not in sections:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            if not run.dry:
                run.meta["notes"].append(f"section {name} stopped: {not_run_reason(e)}")
            log(f"section {name} stopped: {e}")
        if not run.dry:
            write_report(run)  # after every section: a run cut short still leaves its report

    def parity():
        parity_prefill(run, cfg["parity_siso"], "siso")
        parity_decode(run, cfg["parity_decode"])
        parity_prefill(run, cfg["parity_mimo"], "mimo")  # last: TileLang may still compile

    def mimo():
        nonlocal tl_proc
        if tl_proc is not None:
            wait_tilelang(tl_proc, run, cap_s=150.0)
            tl_proc = None
        prefill_rows(run, cfg["mimo"], "mimo", timer)

    def context():
        context_rows(run, cfg["siso"] + [s for s in cfg["mimo"] if s.name == "megacpp"], timer)

    def sweep():
        for s in cfg["sweep"]:
            sweep_rows(run, s, timer)

    passes = [("parity", parity), ("siso", lambda: prefill_rows(run, cfg["siso"], "siso", timer)),
              ("decode", lambda: decode_rows(run, cfg["decode"], timer)), ("context", context),
              ("sweep", sweep), ("mimo", mimo)]
    if args.compile_only:  # the child of compile_pass(): dry calls only, no report
        run.dry = True
        threads = os.cpu_count() or 8
        log(f"compile pass: every autotuning configuration of the peers' kernels, "
            f"{threads} threads")
        with compile_all_configs(threads):
            for name, fn in passes:  # MIMO last: the TileLang prewarm compiles meanwhile
                section(name, fn)
        return 0
    try:
        section("ceilings", lambda: measure_ceilings(run))
        if run.gpu and any(s in sections for s in ("mimo", "parity")):
            tl_proc = start_tilelang_prewarm()
        if run.gpu and not args.no_compile_pass:
            compile_pass(run, args.sections,
                         cap_s=args.compile_cap * budget.seconds - budget.elapsed())
        for name, fn in [passes[0], passes[1], passes[2], passes[3], passes[5], passes[4]]:
            section(name, fn)
    finally:
        if tl_proc is not None:
            _stop(tl_proc)
        fill_missing(run, "its section stopped before this row (see the notes)", sections)
        files = write_report(run)
    log(f"wrote {files['md']}, {files['json']}" + (f", {files['png']}" if files["png"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
