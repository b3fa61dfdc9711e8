"""The torch.library ops of the C++ core: loading, fake (meta) kernels and autograd.

Schemas and the CPU/CUDA kernels are C++ (python/csrc/ops.cpp); this module adds what
torch.compile and autograd need, and the two low-level entry points the public functions use:
`combined` (prefill forward, differentiable) and `step` (decode, in place).

Lanes: CUDA tensors run on the cuda lane (on torch's current stream of their device; the build
must have it, see pyproject.toml); on CPU, float64 activations run on the float64 reference lane
(so gradcheck works) and float32/bfloat16/float16 on the fast cpu lane. All tensors of a call
must be on one device. On CUDA, when grad is needed, fwd saves the tile records, chunk-start
states, decays and the pre-output y of the tensor-core path (about 1.4 KB per token per head at
N = 128, P = 64, R = 1; `MAMBA3_CUDA_SAVE_Y=0` leaves y out, 256 B less there;
`MAMBA3_CUDA_SAVE_TILES=0` or any configuration off the tensor cores: an empty `saved` output)
and bwd reads them instead of recomputing.

Dtype policy (DESIGN.md §2.6): parameters (ADT, DT, Angles, biases, D, MIMO projections, norm
weight, states) must be float32 or float64: other float dtypes are cast to float32 here (a
differentiable cast). Outputs take V's dtype, final states are float32 (float64 when V is
float64).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import torch

from . import _build_info

_LIB_PATH = os.path.join(os.path.dirname(__file__), "_C.so")


def _load() -> None:
    built = _build_info.torch_version.split("+")[0].split(".")[:2]
    running = torch.__version__.split("+")[0].split(".")[:2]
    if built != running:
        raise ImportError(
            f"mamba3 was built against torch {_build_info.torch_version} but torch "
            f"{torch.__version__} is running; reinstall mamba3 against this torch with "
            "`pip install --no-build-isolation .`")
    try:
        torch.ops.load_library(_LIB_PATH)
    except OSError as e:  # pragma: no cover - broken install
        raise ImportError(f"mamba3: cannot load the extension {_LIB_PATH}: {e}") from e


_load()

_fwd = torch.ops.mamba3.fwd.default
_bwd = torch.ops.mamba3.bwd.default
_step = torch.ops.mamba3.step.default

NUM_GRADS = 19  # q k v adt dt trap q_bias k_bias angles d z mimo_v mimo_z mimo_o norm_weight + 4 states


def _state_dtype(v: torch.Tensor) -> torch.dtype:
    return torch.float64 if v.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Fake kernels: shapes only (used by torch.compile, meta tensors and opcheck).


def _saved_size():
    """Size of fwd's `saved` buffer: lane-specific (and dependent on cu_seqlens values), so a
    data-dependent size for FakeTensors. Plain meta tensors cannot express one; they get 0 (meta
    outputs are never computed on)."""
    try:
        ctx = torch.library.get_ctx()
    except RuntimeError:
        return 0
    return ctx.new_dynamic_size()


@torch.library.register_fake("mamba3::fwd")
def _fwd_fake(q, k, v, adt, dt, trap, q_bias, k_bias, angles, d, z, mimo_v, mimo_z, mimo_o,
              norm_weight, init_angle, init_ssm, init_k, init_v, cu_seqlens, halved_rope,
              norm_eps, chunk_size, return_final_states, save_for_backward, out_dtype=None):
    torch._check(q.dim() in (4, 5), lambda: f"q: expected 4 or 5 dims, got {q.dim()}")
    torch._check(v.dim() == 4, lambda: f"v: expected 4 dims (B, L, H, P), got {v.dim()}")
    torch._check(angles.dim() == 4, lambda: f"angles: expected 4 dims, got {angles.dim()}")
    siso_qk = q.dim() == 4
    B, L = q.shape[0], q.shape[1]
    R = 1 if siso_qk else q.shape[2]
    N = q.shape[-1]
    H, P = v.shape[2], v.shape[3]
    NA = angles.shape[3]
    S = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else B
    per_rank = (not siso_qk) and mimo_o is None and R != 1
    odt = out_dtype if out_dtype is not None else v.dtype
    out = v.new_empty((B, L, R, H, P) if per_rank else (B, L, H, P), dtype=odt)
    sdt = _state_dtype(v)
    if return_final_states:
        states = (v.new_empty((S, H, NA), dtype=sdt), v.new_empty((S, H, P, N), dtype=sdt),
                  v.new_empty((S, H, N) if siso_qk else (S, R, H, N), dtype=sdt),
                  v.new_empty((S, H, P), dtype=sdt))
    else:
        states = tuple(v.new_empty((0,), dtype=sdt) for _ in range(4))
    n = _saved_size() if save_for_backward and v.dtype != torch.float64 else 0
    saved = v.new_empty((n,), dtype=torch.float32)
    return (out, *states, saved)


@torch.library.register_fake("mamba3::bwd")
def _bwd_fake(d_out, d_final_angle, d_final_ssm, d_final_k, d_final_v, q, k, v, adt, dt, trap,
              q_bias, k_bias, angles, d, z, mimo_v, mimo_z, mimo_o, norm_weight, init_angle,
              init_ssm, init_k, init_v, cu_seqlens, saved, halved_rope, norm_eps, chunk_size,
              grad_mask):
    inputs = (q, k, v, adt, dt, trap, q_bias, k_bias, angles, d, z, mimo_v, mimo_z, mimo_o,
              norm_weight, init_angle, init_ssm, init_k, init_v)
    torch._check(len(grad_mask) == NUM_GRADS, lambda: "grad_mask: expected 19 entries")
    grads = []
    for t, m in zip(inputs, grad_mask):
        if t is not None and m:
            grads.append(t.new_empty(t.shape))
        else:
            grads.append((t if t is not None else v).new_empty((0,)))
    return grads


@torch.library.register_fake("mamba3::step")
def _step_fake(q, k, v, adt, dt, trap, angles, q_bias, k_bias, d, z, mimo_v, mimo_z, mimo_o,
               norm_weight, state_angle, state_ssm, state_k, state_v, out, halved_rope,
               norm_eps):
    return None


# ---------------------------------------------------------------------------------------------
# Autograd of fwd. The final states are differentiable outputs; `saved` is not.

# Positions in fwd's schema.
_N_TENSOR_ARGS = 20  # q .. cu_seqlens
_CU_SEQLENS = 19


def _fwd_setup_context(ctx, inputs, output):
    tensors = inputs[:_N_TENSOR_ARGS]
    halved_rope, norm_eps, chunk_size, return_final_states = inputs[20:24]
    ctx.halved_rope = halved_rope
    ctx.norm_eps = norm_eps
    ctx.chunk_size = chunk_size
    ctx.return_final_states = return_final_states
    ctx.present = tuple(t is not None for t in tensors)
    saved = output[5]
    ctx.mark_non_differentiable(saved)
    # Outputs without a cotangent stay None (bwd takes absent final-state cotangents as zero):
    # materialized, the saved buffer alone (1.3 KB per token-head on CUDA) cost a 0.29 ms fill
    # per backward at `train` on the H200.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*[t for t in tensors if t is not None], saved)
    ctx.out_shape = output[0].shape
    ctx.out_dtype = output[0].dtype


def _fwd_backward(ctx, d_out, d_angle, d_ssm, d_k, d_v, _d_saved):
    saved_tensors = list(ctx.saved_tensors)
    saved = saved_tensors.pop()
    it = iter(saved_tensors)
    tensors = [next(it) if p else None for p in ctx.present]
    v = tensors[2]
    if d_out is None:
        d_out = v.new_zeros(ctx.out_shape, dtype=ctx.out_dtype)
    finals = [d_angle, d_ssm, d_k, d_v] if ctx.return_final_states else [None] * 4
    mask = [1 if (tensors[i] is not None and ctx.needs_input_grad[i]) else 0
            for i in range(NUM_GRADS)]
    if not any(mask):
        return (None,) * 26
    grads = _bwd(d_out, *finals, *tensors, saved, ctx.halved_rope, ctx.norm_eps,
                 ctx.chunk_size, mask)
    result = [g if m else None for g, m in zip(grads, mask)]
    # cu_seqlens and the five non-tensor arguments get no gradient.
    return (*result, None, None, None, None, None, None, None)


torch.library.register_autograd("mamba3::fwd", _fwd_backward, setup_context=_fwd_setup_context)


# ---------------------------------------------------------------------------------------------
# Low-level entry points.

_PARAM_DTYPES = (torch.float32, torch.float64)


def _param(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """float32/float64 parameters pass through; other float dtypes become float32."""
    if t is None or t.dtype in _PARAM_DTYPES or not t.is_floating_point():
        return t
    return t.float()


def _needs_grad(tensors: Sequence[Optional[torch.Tensor]]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def combined(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, adt: torch.Tensor, dt: torch.Tensor,
    trap: torch.Tensor, q_bias: torch.Tensor, k_bias: torch.Tensor, angles: torch.Tensor,
    d: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
    mimo_v: Optional[torch.Tensor] = None, mimo_z: Optional[torch.Tensor] = None,
    mimo_o: Optional[torch.Tensor] = None, norm_weight: Optional[torch.Tensor] = None,
    initial_states: Optional[Sequence[torch.Tensor]] = None,
    cu_seqlens: Optional[torch.Tensor] = None, *, halved_rope: bool = False,
    norm_eps: float = 1e-5, chunk_size: int = 64, return_final_states: bool = False,
    out_dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Prefill forward in the core's names (DESIGN.md §2.1). Returns (out, final_states or None).

    initial_states: (angle, ssm, k, v) or None. Differentiable in every tensor argument but
    cu_seqlens, and through the returned final states.
    """
    if initial_states is None:
        initial_states = (None, None, None, None)
    if len(initial_states) != 4:
        raise ValueError("initial states: expected a tuple (angle, ssm, k, v) of 4 tensors, got "
                         f"{len(initial_states)} entries")
    adt, dt, angles, q_bias, k_bias, d, mimo_v, mimo_z, mimo_o, norm_weight = (
        _param(t) for t in (adt, dt, angles, q_bias, k_bias, d, mimo_v, mimo_z, mimo_o,
                            norm_weight))
    init = tuple(_param(t) for t in initial_states)
    if cu_seqlens is not None and cu_seqlens.dtype != torch.int32:
        cu_seqlens = cu_seqlens.to(torch.int32)
    tensors = (q, k, v, adt, dt, trap, q_bias, k_bias, angles, d, z, mimo_v, mimo_z, mimo_o,
               norm_weight, *init)
    out, fa, fs, fk, fv, _ = _fwd(*tensors, cu_seqlens, bool(halved_rope), float(norm_eps),
                                  int(chunk_size), bool(return_final_states),
                                  _needs_grad(tensors), out_dtype)
    return out, ((fa, fs, fk, fv) if return_final_states else None)


def step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, adt: torch.Tensor, dt: torch.Tensor,
    trap: torch.Tensor, angles: torch.Tensor, q_bias: torch.Tensor, k_bias: torch.Tensor,
    states: Sequence[torch.Tensor], d: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None, mimo_v: Optional[torch.Tensor] = None,
    mimo_z: Optional[torch.Tensor] = None, mimo_o: Optional[torch.Tensor] = None,
    norm_weight: Optional[torch.Tensor] = None, *, out: Optional[torch.Tensor] = None,
    halved_rope: bool = False, norm_eps: float = 1e-5,
) -> torch.Tensor:
    """One decode token (DESIGN.md §2.4); `states` (angle, ssm, k, v) are updated in place.

    Returns `out` ((B, H, P), or (B, R, H, P) for R > 1 without mimo_o), allocated unless
    given. Float32 parameters and outputs allocate nothing.
    """
    if states is None or len(states) != 4 or any(s is None for s in states):
        raise ValueError("states: the decode step needs the tuple (angle, ssm, k, v) of 4 "
                         "tensors, updated in place")
    adt, dt, angles, q_bias, k_bias, d, mimo_v, mimo_z, mimo_o, norm_weight = (
        _param(t) for t in (adt, dt, angles, q_bias, k_bias, d, mimo_v, mimo_z, mimo_o,
                            norm_weight))
    if out is None:
        if v.dim() != 3:
            raise ValueError(f"V: expected 3 dims (B, H, P), got shape {tuple(v.shape)}")
        R = q.shape[1] if q.dim() == 4 else 1
        shape = (v.shape[0], R, v.shape[1], v.shape[2]) if (R > 1 and mimo_o is None) \
            else tuple(v.shape)
        out = v.new_empty(shape)
    _step(q, k, v, adt, dt, trap, angles, q_bias, k_bias, d, z, mimo_v, mimo_z, mimo_o,
          norm_weight, states[0], states[1], states[2], states[3], out, bool(halved_rope),
          float(norm_eps))
    return out


def release_cached_memory() -> int:
    """Returns the cuda lane's cached workspace memory to the driver; the bytes released.

    The cuda forward (sequence split) and backward draw their workspace from a memory pool of
    the library's own, one per device, that keeps freed memory for the next call, as PyTorch's
    caching allocator does (torch.cuda.memory_allocated does not count it). A no-op returning 0
    without the cuda lane or before its first call.
    """
    return int(torch.ops.mamba3.release_cached_memory())
