"""The Mamba3 module against the official mamba_ssm 2.3.2.post1 module: state_dict in both
directions, the same forward (official code run on CPU with its kernels replaced by ours),
decode with the cache, torch.utils.checkpoint and torch.compile(fullgraph=True)."""

import sys
import types

import pytest
import torch

import mamba3
from conftest import rel_l2

CONFIGS = {
    "siso": dict(),
    "siso_norm_gqa": dict(is_outproj_norm=True, ngroups=2, rope_fraction=1.0),
    "mimo": dict(is_mimo=True, mimo_rank=2, chunk_size=16),
    "mimo_norm": dict(is_mimo=True, mimo_rank=4, is_outproj_norm=True, ngroups=2, chunk_size=8),
}
DIMS = dict(d_model=32, d_state=16, headdim=8)


@pytest.fixture(scope="module")
def official():
    """mamba_ssm.modules.mamba3 importable on CPU: the package's __init__ imports its CUDA
    extension (not built with MAMBA_SKIP_CUDA_BUILD), which the Mamba3 module never uses."""
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    import mamba_ssm.modules.mamba3 as off

    return off


def _perturb(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return module


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_round_trip(official, name):
    cfg = CONFIGS[name]
    theirs = _perturb(official.Mamba3(**DIMS, **cfg), 1)
    ours = mamba3.Mamba3(**DIMS, **cfg)
    sd = theirs.state_dict()
    assert list(ours.state_dict()) == list(sd)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    ours.load_state_dict(sd, strict=True)
    back = official.Mamba3(**DIMS, **cfg)
    back.load_state_dict(_perturb(ours, 2).state_dict(), strict=True)
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


@pytest.fixture
def official_on_cpu(official, monkeypatch):
    """The official module's forward with its GPU kernels replaced by our drop-ins and its
    gated RMSNorm (a Triton kernel) by the same formula in plain torch."""
    from mamba_ssm.ops.triton import layernorm_gated as lg

    def rmsnorm_ref(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
        # The formula of the official rms_norm_ref, kept in float64 (that one computes in
        # float32, which would hide differences below 1e-7).
        assert bias is None and norm_before_gate
        xg = x.unflatten(-1, (-1, group_size or x.shape[-1]))
        y = (xg * torch.rsqrt(xg.square().mean(-1, keepdim=True) + eps)).flatten(-2) * weight
        return y * torch.nn.functional.silu(z) if z is not None else y

    monkeypatch.setattr(lg, "rmsnorm_fn", rmsnorm_ref)
    monkeypatch.setattr(official, "mamba3_siso_combined", mamba3.siso_combined)
    monkeypatch.setattr(official, "mamba3_mimo_combined", mamba3.mimo_combined)
    return official


@pytest.mark.parametrize("varlen", [False, True], ids=["batch", "varlen"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_backward_match_official(official_on_cpu, name, varlen):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    theirs = _perturb(official_on_cpu.Mamba3(**DIMS, **cfg), 3).double()
    ours = mamba3.Mamba3(**DIMS, **cfg).double()
    ours.load_state_dict(theirs.state_dict())
    if varlen:
        u = torch.randn(1, 40, 32, dtype=torch.float64)
        kw = dict(cu_seqlens=torch.tensor([0, 7, 25, 40], dtype=torch.int32))
    else:
        u = torch.randn(2, 21, 32, dtype=torch.float64)
        kw = {}
    y_ref = theirs(u, **kw)
    y = ours(u, **kw)
    # The official MIMO output-norm path rounds y and z to float32 (`.float()`) before its
    # norm; everything else stays in float64.
    tol = 1e-6 if name == "mimo_norm" else 1e-12
    assert rel_l2(y, y_ref) < tol
    w = torch.randn_like(y)
    (y_ref * w).sum().backward()
    (y * w).sum().backward()
    for (k, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert rel_l2(a.grad, b.grad) < 1e3 * tol, k


@pytest.mark.parametrize("activation", ["softplus", "heavy_tail"])
def test_A_activation(activation):
    m = mamba3.Mamba3(**DIMS, A_activation=activation).double()
    x = torch.linspace(-5, 5, 101, dtype=torch.float64, requires_grad=True)
    A = m._A(x)
    f = torch.nn.functional.softplus(x) if activation == "softplus" else \
        torch.where(x >= 0, x + 1, 1 / (1 - x))
    assert A.dtype == torch.float32  # as the official module: A is computed in float32
    assert torch.allclose(A, torch.clamp(-f, max=-m.A_floor).float())
    A.sum().backward()
    assert torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="A_activation"):
        mamba3.Mamba3(**DIMS, A_activation="exp")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_with_cache_equals_prefill(name, dtype):
    """Prefill into the cache, decode (B, 1, D) tokens, continue with a chunk: all equal one
    prefill over the whole sequence."""
    torch.manual_seed(1)
    m = _perturb(mamba3.Mamba3(**DIMS, **CONFIGS[name], layer_idx=3), 4).to(dtype)
    u = torch.randn(2, 20, 32, dtype=dtype)
    with torch.no_grad():
        full = m(u)
        ip = mamba3.InferenceParams(max_seqlen=20, max_batch_size=2)
        parts = [m(u[:, :8], inference_params=ip)]
        ip.seqlen_offset = 8
        for t in range(8, 12):
            parts.append(m(u[:, t:t + 1], inference_params=ip))
            ip.seqlen_offset += 1
        parts.append(m(u[:, 12:], inference_params=ip))
        # step() directly, with a (B, D) token and the cache tuple.
        states = ip.key_value_memory_dict[3]
        out, *new = m.step(u[:, -1], *tuple(s.clone() for s in states))
    assert rel_l2(torch.cat(parts, 1), full) < (1e-12 if dtype == torch.float64 else 2e-6)
    assert out.shape == (2, 32)
    assert all(s.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
               for s in states)


def test_varlen_prefill_fills_cache_per_sequence():
    m = _perturb(mamba3.Mamba3(**DIMS, layer_idx=0), 5).double()
    u = torch.randn(1, 15, 32, dtype=torch.float64)
    cu = torch.tensor([0, 6, 15], dtype=torch.int32)
    ip = mamba3.InferenceParams(max_seqlen=16, max_batch_size=2)
    with torch.no_grad():
        m(u, cu_seqlens=cu, inference_params=ip)
        ip.seqlen_offset = 1
        ip2 = mamba3.InferenceParams(max_seqlen=16, max_batch_size=1)
        m(u[:, 6:], inference_params=ip2)
    assert rel_l2(ip.key_value_memory_dict[0][1][1:], ip2.key_value_memory_dict[0][1]) < 1e-12


def test_checkpoint():
    torch.manual_seed(2)
    m = _perturb(mamba3.Mamba3(**DIMS, **CONFIGS["mimo_norm"]), 6)
    u = torch.randn(2, 33, 32, requires_grad=True)
    y = m(u)
    g = torch.autograd.grad(y.square().sum(), [u, *m.parameters()])
    y_c = torch.utils.checkpoint.checkpoint(m, u, use_reentrant=False)
    g_c = torch.autograd.grad(y_c.square().sum(), [u, *m.parameters()])
    assert torch.equal(y, y_c)
    for a, b in zip(g, g_c):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["siso", "mimo_norm"])
def test_compile_fullgraph(name):
    """One compiled graph: a training forward (backward compiled by AOTAutograd) and a decode
    step on a cache, with no graph break; results equal eager."""
    torch._dynamo.reset()
    torch.manual_seed(3)
    m = _perturb(mamba3.Mamba3(**DIMS, **CONFIGS[name]), 7)
    u = torch.randn(2, 24, 32)
    tok = torch.randn(2, 1, 32)

    def train_and_decode(u, tok, states):
        loss = m(u).square().mean()
        with torch.no_grad():
            out, *_ = m.step(tok, *states)
        return loss, out

    compiled = torch.compile(train_and_decode, fullgraph=True)
    s_eager = m.allocate_inference_cache(2, 0)
    s_comp = m.allocate_inference_cache(2, 0)
    for s in (*s_eager, *s_comp):
        torch.nn.init.normal_(s) if s.dim() > 0 else None
    for a, b in zip(s_comp, s_eager):
        a.copy_(b)
    loss_e, out_e = train_and_decode(u, tok, s_eager)
    g_e = torch.autograd.grad(loss_e, list(m.parameters()))
    loss_c, out_c = compiled(u, tok, s_comp)
    g_c = torch.autograd.grad(loss_c, list(m.parameters()))
    assert rel_l2(loss_c, loss_e) < 1e-6
    assert rel_l2(out_c, out_e) < 1e-6
    for a, b in zip(s_comp, s_eager):  # the step's in-place state update survives compilation
        assert rel_l2(a, b) < 1e-6
    for a, b in zip(g_c, g_e):
        assert rel_l2(a, b) < 1e-5
