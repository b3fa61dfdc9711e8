"""The torch ops on CUDA tensors (the cuda lane): skipped without a GPU or without the cuda lane
in this build. Forward and decode against the cpu lane on the same inputs, torch's current
stream, one device per call, the saved-activation path, and the backward (issue 5: "not
supported" until the cuda backward exists, then compared like the forward)."""

import pytest
import torch

import mamba3
from mamba3 import _build_info
from conftest import random_problem, rel_l2

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or getattr(_build_info, "cuda_lane", "OFF") != "ON",
    reason="needs a CUDA device and a build with the cuda lane")


def _problem(R=1, L=70, dtype=torch.bfloat16):
    p = random_problem(B=2, L=L, H=4, G=2, N=64, P=64, R=R, NA=16, dtype=torch.float32, seed=3)
    for k in ("q", "k", "v", "z"):
        p[k] = p[k].to(dtype)
    return p


def _to(p, device):
    out = {}
    for k, v in p.items():
        if isinstance(v, tuple):
            out[k] = tuple(t.to(device) for t in v)
        elif isinstance(v, torch.Tensor):
            out[k] = v.to(device)
        else:
            out[k] = v
    return out


def _combined(p, **kw):
    mimo = p["q"].dim() == 5
    return mamba3.combined(p["q"], p["k"], p["v"], p["adt"], p["dt"], p["trap"], p["q_bias"],
                           p["k_bias"], p["angles"], p["d"], p["z"], p.get("mimo_v"),
                           p.get("mimo_z"), p.get("mimo_o"), None, p["initial_states"],
                           halved_rope=mimo, return_final_states=True, **kw)


@pytest.mark.parametrize("R", [1, 4])
def test_forward_matches_cpu_lane(R):
    p = _problem(R)
    out_cpu, st_cpu = _combined(p)
    out_gpu, st_gpu = _combined(_to(p, "cuda"))
    assert out_gpu.device.type == "cuda" and out_gpu.dtype == out_cpu.dtype
    assert rel_l2(out_gpu.cpu(), out_cpu) < 5e-3  # the cuda lane's bf16 tensor-core bar
    for a, b in zip(st_gpu, st_cpu):
        assert rel_l2(a.cpu(), b) < 5e-3


def test_runs_on_the_current_stream():
    p = _to(_problem(), "cuda")
    ref, _ = _combined(p)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out, _ = _combined(p)
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(out, ref)


def test_mixed_devices_name_the_argument():
    p = _to(_problem(), "cuda")
    p["adt"] = p["adt"].cpu()
    with pytest.raises(RuntimeError, match=r"adt: expected device cuda:0"):
        _combined(p)


def test_step_matches_cpu_lane():
    p = _problem(L=1)
    states_cpu = tuple(t.clone() for t in p["initial_states"])
    states_gpu = tuple(t.cuda() for t in p["initial_states"])
    args = [p[k][:, 0] for k in ("q", "k", "v")] + [p[k][..., 0] for k in ("adt", "dt", "trap")]
    args += [p["angles"][:, 0], p["q_bias"], p["k_bias"]]
    o_cpu = mamba3.step(*args, states_cpu, p["d"], p["z"][:, 0])
    o_gpu = mamba3.step(*[a.cuda() for a in args], states_gpu, p["d"].cuda(), p["z"][:, 0].cuda())
    assert rel_l2(o_gpu.cpu(), o_cpu) < 5e-3
    for a, b in zip(states_gpu, states_cpu):
        assert rel_l2(a.cpu(), b) < 1e-4


def test_backward_is_computed_or_not_supported():
    p = _to(_problem(), "cuda")
    v = p["v"].detach().requires_grad_(True)
    p["v"] = v
    out, _ = _combined(p)  # saves no activations on CUDA: must not fail here
    try:
        (g,) = torch.autograd.grad(out.float().sum(), [v])
    except RuntimeError as e:
        assert "not supported" in str(e) and "backward" in str(e), str(e)
        return
    pc = _problem()
    vc = pc["v"].detach().requires_grad_(True)
    pc["v"] = vc
    oc, _ = _combined(pc)
    (gc,) = torch.autograd.grad(oc.float().sum(), [vc])
    assert rel_l2(g.cpu(), gc) < 1e-2


def test_workspace_is_cached_until_released():
    # The backward's workspace stays in the lane's pool after the call; releasing returns it
    # (bytes > 0), a second release finds nothing, and the next backward allocates again.
    def grad_v():
        p = _to(_problem(), "cuda")
        v = p["v"].detach().requires_grad_(True)
        p["v"] = v
        out, _ = _combined(p)
        (g,) = torch.autograd.grad(out.float().sum(), [v])
        torch.cuda.synchronize()
        return g

    mamba3.release_cached_memory()
    g1 = grad_v()
    assert mamba3.release_cached_memory() > 0
    assert mamba3.release_cached_memory() == 0
    assert torch.equal(grad_v(), g1)


def test_psiv_cache_gate_gives_the_same_gradients(monkeypatch):
    # MAMBA3_PSIV_CACHE on the tensor-core path (MIMO with psi): 1 keeps v psi in the saved
    # records, 0 rebuilds it from v in the backward, unset caches where psi is given. The same
    # bits either way; a backward run under another setting than its forward is refused, naming
    # the gate (the saved buffer's size differs).
    def grads(forward_gate, backward_gate=None):
        p = _to(_problem(R=4), "cuda")
        leaves = [p[k].detach().requires_grad_(True) for k in ("q", "v", "mimo_v")]
        p["q"], p["v"], p["mimo_v"] = leaves
        if forward_gate is None:
            monkeypatch.delenv("MAMBA3_PSIV_CACHE", raising=False)
        else:
            monkeypatch.setenv("MAMBA3_PSIV_CACHE", forward_gate)
        out, _ = _combined(p)
        if backward_gate is not None:
            monkeypatch.setenv("MAMBA3_PSIV_CACHE", backward_gate)
        return torch.autograd.grad(out.float().sum(), leaves)

    base = grads("0")
    for gate in ("1", None):
        for a, b in zip(grads(gate), base):
            assert torch.equal(a, b), gate
    with pytest.raises(RuntimeError, match=r"MAMBA3_PSIV_CACHE"):
        grads("1", backward_gate="0")
