"""The Mamba-3 layer, state-dict compatible with mamba_ssm.modules.mamba3.Mamba3 (2.3.2.post1).

Same constructor arguments, parameter names and shapes, in_proj split order
[z, x, B, C, dd_dt, dd_A, trap, angles] (DESIGN.md §2.2), the same forward/step/
allocate_inference_cache conventions. Differences:

- `A_activation`: "softplus" (mamba-ssm 2.3.2, default) or "heavy_tail" (newer code:
  f(x) = x + 1 for x >= 0, 1 / (1 - x) for x < 0); A = min(-f(dd_A), -A_floor).
- the output norm (is_outproj_norm) is fused into the core op (into the MIMO rank reduction).
- decode with a cache accepts the (B, 1, D) input the official module passes to step, and an
  L > 1 input at seqlen_offset > 0 continues the prefill from the cached states.
- the cache's k and v states are float32 (float64 for a float64 module), like the ssm state.
- seq_idx is rejected (the official module ignores it): pack sequences with cu_seqlens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _ops


class RMSNorm(nn.Module):
    """RMSNorm with the parameter layout of mamba_ssm's gated RMSNorm (a `weight`, no bias).

    Used ungated for B and C (over N); the output norm's weight is handed to the core op.
    """

    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True,
                 device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # float32 math for 16-bit x
        y = xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + self.eps)
        return (y * self.weight.to(xf.dtype)).to(x.dtype)


@dataclass
class InferenceParams:
    """Decode cache holder, field-compatible with mamba_ssm.utils.generation.InferenceParams."""

    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: dict = field(default_factory=dict)
    lengths_per_sample: Optional[torch.Tensor] = None

    def reset(self, max_seqlen, max_batch_size):
        self.max_seqlen = max_seqlen
        self.max_batch_size = max_batch_size
        self.seqlen_offset = 0
        if self.lengths_per_sample is not None:
            self.lengths_per_sample.zero_()


_A_ACTIVATIONS = ("softplus", "heavy_tail")


class Mamba3(nn.Module):
    def __init__(
        self,
        d_model,
        d_state=128,
        expand=2,
        headdim=64,
        ngroups=1,
        rope_fraction=0.5,
        dt_min=0.001,
        dt_max=0.1,
        dt_init_floor=1e-4,
        A_floor=1e-4,
        is_outproj_norm=False,
        is_mimo=False,
        mimo_rank=4,
        chunk_size=64,
        dropout=0.0,
        layer_idx=None,
        n_layer=None,
        device=None,
        dtype=None,
        A_activation="softplus",
        **kwargs,
    ):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        if A_activation not in _A_ACTIVATIONS:
            raise ValueError(f"A_activation: expected one of {_A_ACTIVATIONS}, got {A_activation!r}")
        if rope_fraction not in (0.5, 1.0):
            raise ValueError(f"rope_fraction: expected 0.5 or 1.0, got {rope_fraction}")
        self.d_model = d_model
        self.d_state = d_state
        self.expand = expand
        self.headdim = headdim
        self.chunk_size = chunk_size
        self.layer_idx = layer_idx
        self.A_floor = A_floor
        self.A_activation = A_activation
        self.is_outproj_norm = is_outproj_norm
        self.is_mimo = is_mimo
        self.mimo_rank = mimo_rank if is_mimo else 1

        self.d_inner = int(self.expand * self.d_model)
        if self.d_inner % self.headdim != 0:
            raise ValueError(f"headdim: expand * d_model = {self.d_inner} is not a multiple of "
                             f"headdim = {headdim}")
        self.nheads = self.d_inner // self.headdim
        self.num_bc_heads = ngroups
        if self.nheads % ngroups != 0:
            raise ValueError(f"ngroups: nheads = {self.nheads} is not a multiple of ngroups = {ngroups}")

        self.rotary_dim_divisor = int(2 / rope_fraction)
        self.split_tensor_size = int(d_state * rope_fraction)
        if self.split_tensor_size % 2 != 0:
            self.split_tensor_size -= 1
        self.num_rope_angles = self.split_tensor_size // 2
        if self.num_rope_angles <= 0:
            raise ValueError(f"d_state: {d_state} * rope_fraction {rope_fraction} leaves no rope angle")

        # Order: [z, x, B, C, dd_dt, dd_A, trap, angle]
        self._split = [
            self.d_inner, self.d_inner,
            self.d_state * self.num_bc_heads * self.mimo_rank,
            self.d_state * self.num_bc_heads * self.mimo_rank,
            self.nheads, self.nheads, self.nheads, self.num_rope_angles,
        ]
        self.in_proj = nn.Linear(self.d_model, sum(self._split), bias=False, **factory_kwargs)

        # dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max].
        dt = torch.exp(torch.rand(self.nheads, device=device, dtype=torch.float32)
                       * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = torch.clamp(dt, min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.dt_bias._no_weight_decay = True

        self.B_bias = nn.Parameter(torch.ones(self.nheads, self.mimo_rank, self.d_state,
                                              dtype=torch.float32, device=device))
        self.C_bias = nn.Parameter(torch.ones(self.nheads, self.mimo_rank, self.d_state,
                                              dtype=torch.float32, device=device))
        self.B_norm = RMSNorm(self.d_state, eps=1e-5, **factory_kwargs)
        self.C_norm = RMSNorm(self.d_state, eps=1e-5, **factory_kwargs)

        if self.is_mimo:
            shape = (self.nheads, self.mimo_rank, self.headdim)
            self.mimo_x = nn.Parameter(torch.full(shape, 1.0 / self.mimo_rank, device=device))
            self.mimo_z = nn.Parameter(torch.ones(shape, device=device))
            self.mimo_o = nn.Parameter(torch.full(shape, 1.0 / self.mimo_rank, device=device))

        self.D = nn.Parameter(torch.ones(self.nheads, device=device))
        self.D._no_weight_decay = True

        if self.is_outproj_norm:
            self.norm = RMSNorm(self.d_inner, eps=1e-5, norm_before_gate=True,
                                group_size=self.headdim, **factory_kwargs)

        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=False, **factory_kwargs)

    # -----------------------------------------------------------------------------------------

    def _A(self, dd_A):
        a = dd_A.float()
        if self.A_activation == "softplus":
            f = F.softplus(a)
        else:
            # Both branches stay finite everywhere, so where() has clean gradients.
            f = torch.where(a >= 0, a.clamp(min=0) + 1, 1 / (1 - a.clamp(max=0)))
        return torch.clamp(-f, max=-self.A_floor)

    def _core_params(self):
        """Per-layer tensors handed to the core op."""
        H, P = self.nheads, self.headdim
        return dict(
            d=self.D,
            mimo_v=self.mimo_x if self.is_mimo else None,
            mimo_z=self.mimo_z if self.is_mimo else None,
            mimo_o=self.mimo_o if self.is_mimo else None,
            norm_weight=self.norm.weight.view(H, P) if self.is_outproj_norm else None,
        )

    def _project(self, u):
        """in_proj and the elementwise preprocessing, on (..., D) input (any leading dims)."""
        lead = u.shape[:-1]
        z, x, B, C, dd_dt, dd_A, trap, angles = torch.split(self.in_proj(u), self._split, dim=-1)
        z = z.unflatten(-1, (self.nheads, self.headdim))
        x = x.unflatten(-1, (self.nheads, self.headdim))
        B = self.B_norm(B.unflatten(-1, (self.mimo_rank, self.num_bc_heads, self.d_state)))
        C = self.C_norm(C.unflatten(-1, (self.mimo_rank, self.num_bc_heads, self.d_state)))
        DT = F.softplus(dd_dt + self.dt_bias)
        ADT = self._A(dd_A) * DT
        angles = angles.unsqueeze(-2).expand(*lead, self.nheads, self.num_rope_angles)
        return z, x, B, C, DT, ADT, trap, angles.to(torch.float32)

    def forward(self, u, seq_idx=None, cu_seqlens=None, inference_params=None):
        """u: (batch, seqlen, d_model) -> (batch, seqlen, d_model).

        With inference_params: at seqlen_offset == 0 a prefill that stores its final states in
        the cache; later, a (B, 1, D) input is one decode step and a longer one continues the
        prefill from the cached states.
        """
        if seq_idx is not None:
            raise ValueError("seq_idx: not supported; pack sequences with cu_seqlens")
        if u.dim() != 3:
            raise ValueError(f"u: expected (batch, seqlen, d_model), got shape {tuple(u.shape)}")
        batch, seqlen, _ = u.shape

        cache, initial = None, None
        if inference_params is not None:
            nseq = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else batch
            cache = self._get_states_from_cache(inference_params, nseq)
            if inference_params.seqlen_offset > 0:
                if seqlen == 1 and cu_seqlens is None:
                    out, *_ = self.step(u, *cache)
                    return out
                initial = cache

        z, x, B, C, DT, ADT, trap, angles = self._project(u)
        siso = not self.is_mimo
        y, finals = _ops.combined(
            C.squeeze(2) if siso else C, B.squeeze(2) if siso else B, x,
            ADT.transpose(1, 2), DT.transpose(1, 2), trap.transpose(1, 2),
            self.C_bias.squeeze(1) if siso else self.C_bias,
            self.B_bias.squeeze(1) if siso else self.B_bias,
            angles, z=z, initial_states=initial, cu_seqlens=cu_seqlens,
            halved_rope=self.is_mimo, chunk_size=self.chunk_size,
            return_final_states=cache is not None, **self._core_params())
        if cache is not None:
            with torch.no_grad():
                for dst, src in zip(cache, finals):
                    dst.copy_(src.reshape(dst.shape))
        return self.out_proj(y.flatten(-2).to(x.dtype))

    def step(self, u, angle_state, ssm_state, k_state, v_state, **kwargs):
        """One decode token. u: (batch, d_model) or (batch, 1, d_model).

        The states (allocate_inference_cache) are updated in place and returned:
        (out, angle_state, ssm_state, k_state, v_state), out shaped like u.
        """
        squeeze = u.dim() == 3
        if squeeze:
            if u.shape[1] != 1:
                raise ValueError(f"u: step takes one token, got shape {tuple(u.shape)}")
            u = u[:, 0]
        if u.dim() != 2:
            raise ValueError(f"u: expected (batch, d_model) or (batch, 1, d_model), got {tuple(u.shape)}")
        z, x, B, C, DT, ADT, trap, angles = self._project(u)
        siso = not self.is_mimo
        y = _ops.step(
            C.squeeze(1) if siso else C, B.squeeze(1) if siso else B, x, ADT, DT, trap, angles,
            self.C_bias.squeeze(1) if siso else self.C_bias,
            self.B_bias.squeeze(1) if siso else self.B_bias,
            (angle_state, ssm_state, k_state, v_state), z=z, halved_rope=self.is_mimo,
            **self._core_params())
        out = self.out_proj(y.flatten(-2).to(x.dtype))
        if squeeze:
            out = out.unsqueeze(1)
        return out, angle_state, ssm_state, k_state, v_state

    def _state_dtype(self):
        return torch.float64 if self.in_proj.weight.dtype == torch.float64 else torch.float32

    def allocate_inference_cache(self, batch_size, max_seqlen, device=None, dtype=None, **kwargs):
        """(angle (B, H, NA), ssm (B, H, P, N), k (B, R, H, N), v (B, H, P)), zeroed; float32
        (float64 for a float64 module)."""
        device = self.in_proj.weight.device if device is None else device
        sdt = self._state_dtype()
        H, P, N, R = self.nheads, self.headdim, self.d_state, self.mimo_rank
        return (torch.zeros(batch_size, H, self.num_rope_angles, device=device, dtype=sdt),
                torch.zeros(batch_size, H, P, N, device=device, dtype=sdt),
                torch.zeros(batch_size, R, H, N, device=device, dtype=sdt),
                torch.zeros(batch_size, H, P, device=device, dtype=sdt))

    def _get_states_from_cache(self, inference_params, batch_size, initialize_states=False):
        if self.layer_idx is None:
            raise ValueError("layer_idx: decoding with inference_params needs the module's "
                             "layer_idx (Mamba3(..., layer_idx=i))")
        memory = inference_params.key_value_memory_dict
        if self.layer_idx not in memory:
            memory[self.layer_idx] = self.allocate_inference_cache(batch_size, 0)
        states = memory[self.layer_idx]
        if initialize_states:
            for s in states:
                s.zero_()
        return states
