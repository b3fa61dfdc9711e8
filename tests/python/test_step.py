"""Decode: N steps equal one prefill, in place, no allocation with `out` given; the drop-in
siso_step / mimo_step."""

import pytest
import torch

import mamba3
from conftest import random_problem, rel_l2


def _step_inputs(p, t):
    z = p.get("z")
    return dict(q=p["q"][:, t], k=p["k"][:, t], v=p["v"][:, t], adt=p["adt"][..., t],
                dt=p["dt"][..., t], trap=p["trap"][..., t], angles=p["angles"][:, t],
                q_bias=p["q_bias"], k_bias=p["k_bias"], d=p.get("d"),
                z=z[:, t] if z is not None else None, mimo_v=p.get("mimo_v"),
                mimo_z=p.get("mimo_z"), mimo_o=p.get("mimo_o"),
                norm_weight=p.get("norm_weight"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cfg", [dict(R=1), dict(R=2, norm=True), dict(R=4, mimo_o=False)],
                         ids=["siso", "mimo_norm", "mimo_per_rank"])
def test_steps_equal_prefill(cfg, dtype):
    L = 9
    p = random_problem(L=L, dtype=dtype, **cfg)
    halved = cfg["R"] > 1
    kw = {k: p.get(k) for k in ("d", "z", "mimo_v", "mimo_z", "mimo_o", "norm_weight")}
    ref, rfin = mamba3.combined(p["q"], p["k"], p["v"], p["adt"], p["dt"], p["trap"],
                                p["q_bias"], p["k_bias"], p["angles"], **kw,
                                initial_states=p["initial_states"], halved_rope=halved,
                                return_final_states=True)
    states = tuple(s.clone() for s in p["initial_states"])
    ptrs = [s.data_ptr() for s in states]
    outs = []
    for t in range(L):
        outs.append(mamba3.step(states=states, halved_rope=halved, **_step_inputs(p, t)))
    assert [s.data_ptr() for s in states] == ptrs
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert rel_l2(torch.stack(outs, 1), ref) < tol
    for s, r in zip(states[1:], rfin[1:]):
        assert rel_l2(s.reshape(r.shape), r) < tol


def test_siso_step_in_place_no_allocation():
    """With float32 parameters and `out` given, the step writes only into the given tensors."""
    p = random_problem(R=1, L=1, dtype=torch.float32)
    i = _step_inputs(p, 0)
    states = tuple(s.clone() for s in p["initial_states"])
    out = torch.empty_like(i["v"])
    before = [s.clone() for s in states]
    res = mamba3.siso_step(i["q"], i["k"], i["v"], i["adt"], i["dt"], i["trap"], i["q_bias"],
                           i["k_bias"], i["angles"], i["d"], i["z"], states, out=out)
    assert res[0] is out
    assert all(a is b for a, b in zip(res[1:], states))
    assert not torch.equal(before[1], states[1])
    # The same token through the prefill path.
    ref, *fin = mamba3.siso_combined(p["q"], p["k"], p["v"], p["adt"], p["dt"], p["trap"],
                                    p["q_bias"], p["k_bias"], p["angles"], p["d"], p["z"],
                                    Input_States=before, return_final_states=True)
    assert rel_l2(out, ref[:, 0]) < 1e-6
    assert rel_l2(states[1], fin[1]) < 1e-6
    # No allocation on the call path: the profiler records no aten::empty inside the op.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                acc_events=True) as prof:
        torch.ops.mamba3.step(i["q"], i["k"], i["v"], i["adt"], i["dt"], i["trap"], i["angles"],
                              i["q_bias"], i["k_bias"], i["d"], i["z"], None, None, None, None,
                              *states, out, False, 1e-5)
    names = {e.name for e in prof.events()}
    assert "mamba3::step" in names
    assert not any(n in names for n in ("aten::empty", "aten::empty_strided", "aten::copy_"))


def test_mimo_step_matches_mimo_combined():
    p = random_problem(R=2, L=6, dtype=torch.float32)
    states = tuple(s.clone() for s in p["initial_states"])
    ref = mamba3.mimo_combined(p["q"], p["k"], p["v"], p["adt"], p["dt"], p["trap"],
                               p["q_bias"], p["k_bias"], p["mimo_v"], p["mimo_z"], p["mimo_o"],
                               p["angles"], p["d"], p["z"], Input_States=p["initial_states"])
    out = torch.empty(p["v"].shape[0], *p["v"].shape[2:])
    for t in range(6):
        i = _step_inputs(p, t)
        o, *_ = mamba3.mimo_step(i["q"], i["k"], i["v"], i["adt"], i["dt"], i["trap"],
                                 i["q_bias"], i["k_bias"], i["mimo_v"], i["mimo_z"], i["mimo_o"],
                                 i["angles"], i["d"], i["z"], states, out=out)
        assert o is out
        assert rel_l2(out, ref[:, t]) < 2e-6
