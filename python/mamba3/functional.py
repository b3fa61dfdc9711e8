"""Drop-in replacements for the official Mamba-3 functions (mamba-ssm 2.3.2.post1).

Same signatures, argument order, Input_States order (angle, ssm, k, v) and return values as
`mamba_ssm.ops.triton.mamba3.mamba3_siso_combined.mamba3_siso_combined`,
`mamba_ssm.ops.tilelang.mamba3.mamba3_mimo.mamba3_mimo` and
`mamba_ssm.ops.triton.mamba3.mamba3_siso_step.mamba3_siso_step`, with these differences:

- computation follows DESIGN.md §2.6: inputs are used in their own dtype (the official SISO
  function rounds Q, K, V, Z, Trap and Angles to bfloat16 first), outputs take V's dtype;
- returned final states are differentiable (the official MIMO marks them non-differentiable);
- mimo_combined also takes initial states (Input_States), and both *_combined functions and the
  steps take a few keyword-only extras (norm_weight for the fused output norm, rope_pairing);
- the steps update Input_States in place and return (out, *states); `out=` avoids allocation.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _ops

_PAIRINGS = ("interleaved", "halved")

States = Tuple[Tensor, Tensor, Tensor, Tensor]


def _halved(rope_pairing: str) -> bool:
    if rope_pairing not in _PAIRINGS:
        raise ValueError(f"rope_pairing: expected 'interleaved' or 'halved', got {rope_pairing!r}")
    return rope_pairing == "halved"


def _check_dims(name: str, t: Optional[Tensor], dims: Sequence[int], layout: str) -> None:
    if t is None:
        raise ValueError(f"{name}: required, got None")
    if not isinstance(t, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in dims:
        raise ValueError(f"{name}: expected {layout}, got shape {tuple(t.shape)}")


def _check_states(name: str, states) -> None:
    if states is None:
        return
    if not isinstance(states, (tuple, list)) or len(states) != 4:
        raise ValueError(f"{name}: expected a tuple (angle, ssm, k, v) of 4 tensors, got "
                         f"{type(states).__name__} of length {len(states) if hasattr(states, '__len__') else '?'}")
    present = [s is not None for s in states]
    if any(present) and not all(present):
        raise ValueError(f"{name}: give all four states (angle, ssm, k, v) or none")


def _check_varlen(q: Tensor, cu_seqlens: Optional[Tensor]) -> None:
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"cu_seqlens: packed sequences need batch 1, got Q batch {q.shape[0]}")


def siso_combined(
    Q: Tensor,
    K: Tensor,
    V: Tensor,
    ADT: Tensor,
    DT: Tensor,
    Trap: Tensor,
    Q_bias: Tensor,
    K_bias: Tensor,
    Angles: Tensor,
    D: Optional[Tensor] = None,
    Z: Optional[Tensor] = None,
    Input_States: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]] = None,
    chunk_size: int = 64,
    return_final_states: bool = False,
    cu_seqlens: Optional[Tensor] = None,
    *,
    norm_weight: Optional[Tensor] = None,
    norm_eps: float = 1e-5,
    rope_pairing: str = "interleaved",
) -> Union[Tensor, Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]:
    """Mamba-3 SISO prefill: forward with autograd.

    Q, K (B, L, G, N); V (B, L, H, P); ADT, DT, Trap (B, H, L), Trap pre-sigmoid; Q_bias,
    K_bias (H, N); Angles (B, L, H, NA); D (H,); Z (B, L, H, P); Input_States (angle (S, H, NA),
    ssm (S, H, P, N), k (S, H, N), v (S, H, P)); cu_seqlens (S + 1,) int32 with B == 1.
    norm_weight (H, P): RMSNorm of y per head before the gate (keyword-only extra).

    Returns out (B, L, H, P), or (out, angle, ssm, k, v) with return_final_states.
    """
    _check_dims("Q", Q, (4,), "(B, L, G, N)")
    _check_dims("K", K, (4,), "(B, L, G, N)")
    _check_dims("V", V, (4,), "(B, L, H, P)")
    _check_dims("Angles", Angles, (4,), "(B, L, H, NA)")
    _check_states("Input_States", Input_States)
    _check_varlen(Q, cu_seqlens)
    out, finals = _ops.combined(
        Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, None, None, None, norm_weight,
        Input_States, cu_seqlens, halved_rope=_halved(rope_pairing), norm_eps=norm_eps,
        chunk_size=chunk_size, return_final_states=return_final_states)
    if return_final_states:
        return (out, *finals)
    return out


def mimo_combined(
    Q: Tensor,
    K: Tensor,
    V: Tensor,
    ADT: Tensor,
    DT: Tensor,
    Trap: Tensor,
    Q_bias: Tensor,
    K_bias: Tensor,
    MIMO_V: Optional[Tensor],
    MIMO_Z: Optional[Tensor],
    MIMO_Out: Optional[Tensor],
    Angles: Tensor,
    D: Optional[Tensor] = None,
    Z: Optional[Tensor] = None,
    chunk_size: int = 16,
    rotary_dim_divisor: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
    return_state: bool = False,
    cu_seqlens: Optional[Tensor] = None,
    Input_States: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]] = None,
    *,
    norm_weight: Optional[Tensor] = None,
    norm_eps: float = 1e-5,
    rope_pairing: str = "halved",
) -> Union[Tensor, Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]:
    """Mamba-3 MIMO prefill (the official `mamba3_mimo`), plus optional initial states.

    Q, K (B, L, R, G, N); V (B, L, H, P); ADT, DT, Trap (B, H, L); Q_bias, K_bias (H, R, N);
    MIMO_V, MIMO_Z, MIMO_Out (H, R, P) (None: 1; MIMO_Out None: per-rank output);
    Angles (B, L, H, N // rotary_dim_divisor); D (H,); Z (B, L, H, P).
    dtype: dtype of the output (default V's); the inputs are used in their own dtype.
    Input_States (extra): (angle (S, H, NA), ssm (S, H, P, N), k (S, R, H, N), v (S, H, P)).
    norm_weight (H, P) (keyword-only extra): output RMSNorm per head and rank, fused into the
    rank reduction.

    Returns out (B, L, H, P) or (B, L, R, H, P) without MIMO_Out; with return_state,
    (out, angle, ssm, k, v).
    """
    _check_dims("Q", Q, (5,), "(B, L, R, G, N)")
    _check_dims("K", K, (5,), "(B, L, R, G, N)")
    _check_dims("V", V, (4,), "(B, L, H, P)")
    _check_dims("Angles", Angles, (4,), "(B, L, H, NA)")
    if rotary_dim_divisor is not None:
        if rotary_dim_divisor not in (2, 4):
            raise ValueError(f"rotary_dim_divisor: expected 2 or 4, got {rotary_dim_divisor}")
        if Angles.shape[-1] != Q.shape[-1] // rotary_dim_divisor:
            raise ValueError(
                f"rotary_dim_divisor: Angles has {Angles.shape[-1]} angles but N // "
                f"rotary_dim_divisor = {Q.shape[-1]} // {rotary_dim_divisor} = "
                f"{Q.shape[-1] // rotary_dim_divisor}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")
    _check_states("Input_States", Input_States)
    _check_varlen(Q, cu_seqlens)
    out, finals = _ops.combined(
        Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, MIMO_V, MIMO_Z, MIMO_Out,
        norm_weight, Input_States, cu_seqlens, halved_rope=_halved(rope_pairing),
        norm_eps=norm_eps, chunk_size=chunk_size, return_final_states=return_state,
        out_dtype=dtype)
    if return_state:
        return (out, *finals)
    return out


def siso_step(
    Q: Tensor,
    K: Tensor,
    V: Tensor,
    ADT: Tensor,
    DT: Tensor,
    Trap: Tensor,
    Q_bias: Tensor,
    K_bias: Tensor,
    Angles: Tensor,
    D: Optional[Tensor] = None,
    Z: Optional[Tensor] = None,
    Input_States: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]] = None,
    *,
    out: Optional[Tensor] = None,
    norm_weight: Optional[Tensor] = None,
    norm_eps: float = 1e-5,
    rope_pairing: str = "interleaved",
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One SISO decode token, in place on Input_States (required).

    Q, K (B, G, N); V (B, H, P); ADT, DT, Trap (B, H); Angles (B, H, NA); Q_bias, K_bias (H, N);
    D (H,); Z (B, H, P); Input_States (angle (B, H, NA), ssm (B, H, P, N), k (B, H, N) or
    (B, 1, H, N), v (B, H, P)), float32 (float64 with float64 V).
    Returns (out (B, H, P), angle, ssm, k, v): the states are the Input_States tensors.
    """
    _check_dims("Q", Q, (3,), "(B, G, N)")
    _check_dims("V", V, (3,), "(B, H, P)")
    if Input_States is None:
        raise ValueError("Input_States: the decode step needs (angle, ssm, k, v); they are "
                         "updated in place")
    _check_states("Input_States", Input_States)
    o = _ops.step(Q, K, V, ADT, DT, Trap, Angles, Q_bias, K_bias, Input_States, D, Z, None, None,
                  None, norm_weight, out=out, halved_rope=_halved(rope_pairing),
                  norm_eps=norm_eps)
    return (o, *Input_States)


def mimo_step(
    Q: Tensor,
    K: Tensor,
    V: Tensor,
    ADT: Tensor,
    DT: Tensor,
    Trap: Tensor,
    Q_bias: Tensor,
    K_bias: Tensor,
    MIMO_V: Optional[Tensor],
    MIMO_Z: Optional[Tensor],
    MIMO_Out: Optional[Tensor],
    Angles: Tensor,
    D: Optional[Tensor] = None,
    Z: Optional[Tensor] = None,
    Input_States: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]] = None,
    *,
    out: Optional[Tensor] = None,
    norm_weight: Optional[Tensor] = None,
    norm_eps: float = 1e-5,
    rope_pairing: str = "halved",
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One MIMO decode token, in place on Input_States (required); arguments as mimo_combined
    without the sequence axis: Q, K (B, R, G, N); V, Z (B, H, P); ADT, DT, Trap (B, H);
    Angles (B, H, NA); states (angle (B, H, NA), ssm (B, H, P, N), k (B, R, H, N), v (B, H, P)).
    Returns (out, angle, ssm, k, v); out is (B, H, P), or (B, R, H, P) without MIMO_Out.
    """
    _check_dims("Q", Q, (4,), "(B, R, G, N)")
    _check_dims("V", V, (3,), "(B, H, P)")
    if Input_States is None:
        raise ValueError("Input_States: the decode step needs (angle, ssm, k, v); they are "
                         "updated in place")
    _check_states("Input_States", Input_States)
    o = _ops.step(Q, K, V, ADT, DT, Trap, Angles, Q_bias, K_bias, Input_States, D, Z, MIMO_V,
                  MIMO_Z, MIMO_Out, norm_weight, out=out, halved_rope=_halved(rope_pairing),
                  norm_eps=norm_eps)
    return (o, *Input_States)
