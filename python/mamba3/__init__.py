"""mamba3: the Mamba-3 state-space layer for PyTorch, over the mamba3 C++ kernel library.

- ops: torch.ops.mamba3.fwd / bwd / step (torch.library custom ops, compile- and
  autograd-ready); low-level Python entry points mamba3.combined and mamba3.step.
- drop-in functions with the official mamba-ssm 2.3.2 signatures: siso_combined, mimo_combined,
  siso_step, mimo_step.
- Mamba3: the layer, state-dict compatible with mamba_ssm.modules.mamba3.Mamba3.
"""

from ._build_info import mamba3_version as __version__
from ._ops import combined, release_cached_memory, step
from .functional import mimo_combined, mimo_step, siso_combined, siso_step
from .module import InferenceParams, Mamba3

__all__ = [
    "combined",
    "step",
    "siso_combined",
    "mimo_combined",
    "siso_step",
    "mimo_step",
    "Mamba3",
    "InferenceParams",
    "release_cached_memory",
]
