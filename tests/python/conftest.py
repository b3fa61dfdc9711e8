"""Shared helpers for the mamba3 PyTorch tests (golden files, error metrics, random problems)."""

import json
import math
import os
import pathlib

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[2]
GOLDEN_DIR = pathlib.Path(os.environ.get("MAMBA3_GOLDEN_DIR", REPO / "tests" / "data" / "golden"))
GOLDEN_FILES = ("golden_public_siso.safetensors", "golden_public_mimo.safetensors")


def load_golden():
    """[(case name, config, {"in": {...}, "out": {...}, "cot": {...}, "grad": {...}})]."""
    from safetensors import safe_open

    cases = []
    for fname in GOLDEN_FILES:
        path = GOLDEN_DIR / fname
        with safe_open(str(path), framework="pt") as f:
            configs = json.loads(f.metadata()["cases"])
            for name, cfg in configs.items():
                roles = {"in": {}, "out": {}, "cot": {}, "grad": {}}
                for key in f.keys():
                    case, role, tensor = key.split(".", 2)
                    if case == name:
                        roles[role][tensor] = f.get_tensor(key)
                cases.append((name, cfg, roles))
    return cases


def rel_l2(got, ref):
    got = got.detach().double()
    ref = ref.detach().double()
    den = ref.norm().item()
    num = (got - ref).norm().item()
    return num / den if den > 0 else num


def angle_rel_l2(got, ref):
    """Relative L2 of angles compared on the circle."""
    d = torch.remainder(got.detach().double() - ref.double() + math.pi, 2 * math.pi) - math.pi
    den = ref.double().norm().item()
    return d.norm().item() / (den if den > 0 else 1.0)


def worst(got, ref):
    d = (got.detach().double() - ref.double()).abs()
    i = int(d.argmax())
    return f"max |err| {d.max().item():.3e} at flat index {i}"


def random_problem(B=2, L=19, H=4, G=2, N=8, P=4, R=1, NA=2, dtype=torch.float64, states=True,
                   z=True, mimo_o=True, norm=False, varlen=None, seed=0):
    """Small random inputs in the core's layout (DESIGN.md §2.1), as a dict of tensors."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dt)

    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    S = B if varlen is None else len(varlen) - 1
    qk_shape = (B, L, G, N) if R == 1 else (B, L, R, G, N)
    bias_shape = (H, N) if R == 1 else (H, R, N)
    p = dict(
        q=rnd(*qk_shape), k=rnd(*qk_shape), v=rnd(B, L, H, P),
        adt=-(torch.rand(B, H, L, generator=g, dtype=torch.float64) * 0.5 + 0.05).to(pdt),
        dt=(torch.rand(B, H, L, generator=g, dtype=torch.float64) * 0.5 + 0.05).to(pdt),
        trap=rnd(B, H, L), q_bias=rnd(*bias_shape, scale=0.3, dt=pdt),
        k_bias=rnd(*bias_shape, scale=0.3, dt=pdt), angles=rnd(B, L, H, NA, dt=pdt),
        d=rnd(H, dt=pdt), z=rnd(B, L, H, P) if z else None,
    )
    if R > 1:
        p.update(mimo_v=rnd(H, R, P, dt=pdt), mimo_z=rnd(H, R, P, dt=pdt),
                 mimo_o=rnd(H, R, P, dt=pdt) if mimo_o else None)
    if norm:
        p["norm_weight"] = (1 + rnd(H, P, scale=0.2, dt=pdt))
    if states:
        p["initial_states"] = (
            (torch.rand(S, H, NA, generator=g, dtype=torch.float64) * 6).to(pdt),
            rnd(S, H, P, N, scale=0.5, dt=pdt),
            rnd(S, H, N, dt=pdt) if R == 1 else rnd(S, R, H, N, dt=pdt),
            rnd(S, H, P, dt=pdt))
    if varlen is not None:
        p["cu_seqlens"] = torch.tensor(varlen, dtype=torch.int32)
    return p


@pytest.fixture(scope="session")
def golden_cases():
    return load_golden()
