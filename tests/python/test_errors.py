"""Bad input raises RuntimeError (from the core's Status) or ValueError (checked in Python),
and the message names the argument."""

import pytest
import torch

import mamba3
from conftest import random_problem


def _siso(**over):
    p = random_problem(R=1, L=6, dtype=torch.float32, states=False)
    a = dict(Q=p["q"], K=p["k"], V=p["v"], ADT=p["adt"], DT=p["dt"], Trap=p["trap"],
             Q_bias=p["q_bias"], K_bias=p["k_bias"], Angles=p["angles"], D=p["d"], Z=p["z"])
    a.update(over)
    return a


def _states(S=2, H=4, NA=2, P=4, N=8, dtype=torch.float32):
    return (torch.zeros(S, H, NA, dtype=dtype), torch.zeros(S, H, P, N, dtype=dtype),
            torch.zeros(S, H, N, dtype=dtype), torch.zeros(S, H, P, dtype=dtype))


@pytest.mark.parametrize("over, exc, pattern", [
    (dict(ADT=torch.zeros(2, 4, 5)), RuntimeError, r"adt: expected shape \(2, 4, 6\)"),
    (dict(DT=torch.full((2, 4, 6), float("nan"))), RuntimeError, r"dt: non-finite"),
    (dict(V=torch.zeros(2, 6, 4, 4, dtype=torch.int64)), RuntimeError, r"v: unsupported dtype"),
    (dict(Q_bias=torch.zeros(4, 7)), RuntimeError, r"q_bias: expected shape"),
    (dict(Z=torch.zeros(2, 6, 4, 3)), RuntimeError, r"z: expected shape"),
    (dict(D=torch.zeros(4, dtype=torch.int32)), RuntimeError, r"d: expected dtype"),
    (dict(Q=torch.zeros(2, 6, 8)), ValueError, r"Q: expected \(B, L, G, N\)"),
    (dict(Angles=torch.zeros(2, 6, 4, 5)), RuntimeError, r"angles: NA = 5 must be <= N/2"),
    (dict(Input_States=_states()[:3]), ValueError, r"Input_States: expected a tuple"),
    (dict(Input_States=(None, *_states()[1:])), ValueError, r"Input_States: give all four"),
    (dict(Input_States=_states(S=3)), RuntimeError, r"initial.angle: expected shape"),
    (dict(cu_seqlens=torch.tensor([0, 6], dtype=torch.int32)), ValueError,
     r"cu_seqlens: packed sequences need batch 1"),
    (dict(chunk_size=0), RuntimeError, r"chunk_size"),
])
def test_siso_combined_bad_input(over, exc, pattern):
    with pytest.raises(exc, match=pattern):
        mamba3.siso_combined(**_siso(**over))


def test_varlen_bad_cu_seqlens():
    p = random_problem(R=1, B=1, L=6, dtype=torch.float32, states=False)
    args = (p["q"], p["k"], p["v"], p["adt"], p["dt"], p["trap"], p["q_bias"], p["k_bias"],
            p["angles"])
    with pytest.raises(RuntimeError, match=r"cu_seqlens: must end at L = 6"):
        mamba3.siso_combined(*args, cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"cu_seqlens: must be non-decreasing"):
        mamba3.siso_combined(*args, cu_seqlens=torch.tensor([0, 4, 2, 6], dtype=torch.int32))


def test_mimo_bad_input():
    p = random_problem(R=2, L=5, dtype=torch.float32, states=False)
    args = [p["q"], p["k"], p["v"], p["adt"], p["dt"], p["trap"], p["q_bias"], p["k_bias"],
            p["mimo_v"], p["mimo_z"], p["mimo_o"], p["angles"]]
    with pytest.raises(ValueError, match=r"rotary_dim_divisor: Angles has 2 angles"):
        mamba3.mimo_combined(*args, rotary_dim_divisor=2)
    with pytest.raises(ValueError, match=r"rope_pairing"):
        mamba3.mimo_combined(*args, rope_pairing="split")
    bad = list(args)
    bad[8] = torch.zeros(4, 3, 4)
    with pytest.raises(RuntimeError, match=r"mimo_v: expected shape \(4, 2, 4\)"):
        mamba3.mimo_combined(*bad)


def test_step_bad_input():
    p = random_problem(R=1, L=1, dtype=torch.float32)
    a = (p["q"][:, 0], p["k"][:, 0], p["v"][:, 0], p["adt"][..., 0], p["dt"][..., 0],
         p["trap"][..., 0], p["q_bias"], p["k_bias"], p["angles"][:, 0])
    with pytest.raises(ValueError, match=r"Input_States: the decode step needs"):
        mamba3.siso_step(*a)
    bf16 = tuple(s.clone() for s in p["initial_states"])
    bf16 = (bf16[0], bf16[1], bf16[2].bfloat16(), bf16[3])
    with pytest.raises(RuntimeError, match=r"state.k: expected dtype float32"):
        mamba3.siso_step(*a, Input_States=bf16)
    with pytest.raises(RuntimeError, match=r"out: expected shape"):
        mamba3.siso_step(*a, Input_States=p["initial_states"], out=torch.empty(2, 4, 5))


def test_psiv_gate_fails_closed(monkeypatch):
    p = random_problem(R=2, L=5, dtype=torch.float32, states=False)
    monkeypatch.setenv("MAMBA3_PSIV_CACHE", "1")
    with pytest.raises(RuntimeError, match=r"MAMBA3_PSIV_CACHE"):
        mamba3.mimo_combined(p["q"], p["k"], p["v"], p["adt"], p["dt"], p["trap"], p["q_bias"],
                             p["k_bias"], p["mimo_v"], p["mimo_z"], p["mimo_o"], p["angles"])


def test_module_bad_input():
    with pytest.raises(ValueError, match=r"rope_fraction"):
        mamba3.Mamba3(32, d_state=16, headdim=8, rope_fraction=0.25)
    with pytest.raises(ValueError, match=r"headdim"):
        mamba3.Mamba3(30, d_state=16, headdim=8)
    m = mamba3.Mamba3(32, d_state=16, headdim=8)
    with pytest.raises(ValueError, match=r"seq_idx"):
        m(torch.randn(1, 4, 32), seq_idx=torch.zeros(1, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"u: expected"):
        m(torch.randn(4, 32))
    with pytest.raises(ValueError, match=r"layer_idx"):
        m(torch.randn(1, 4, 32), inference_params=mamba3.InferenceParams(4, 1))
