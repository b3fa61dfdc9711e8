"""torch.library.opcheck on every op, gradcheck in float64, and the op-level contracts
(differentiable final states, split-and-continue, saved activations, non-contiguous inputs)."""

import pytest
import torch

import mamba3
from conftest import random_problem, rel_l2

fwd, bwd, step_op = torch.ops.mamba3.fwd, torch.ops.mamba3.bwd, torch.ops.mamba3.step

CONFIGS = {
    "siso": dict(R=1),
    "siso_varlen": dict(R=1, B=1, L=23, varlen=[0, 5, 5, 23]),
    "mimo": dict(R=2, L=11),
    "mimo_per_rank": dict(R=2, L=11, mimo_o=False, states=False),
    "mimo_norm": dict(R=3, L=9, norm=True),
}


def _fwd_args(p, dtype_out=None, halved=False, chunk=8, finals=True, save=True):
    init = p.get("initial_states") or (None,) * 4
    return (p["q"], p["k"], p["v"], p["adt"], p["dt"], p["trap"], p["q_bias"], p["k_bias"],
            p["angles"], p.get("d"), p.get("z"), p.get("mimo_v"), p.get("mimo_z"),
            p.get("mimo_o"), p.get("norm_weight"), *init, p.get("cu_seqlens"), halved, 1e-5,
            chunk, finals, save, dtype_out)


def _requires_grad(p):
    for key, t in p.items():
        if key == "initial_states":
            for s in t:
                s.requires_grad_(True)
        elif t is not None and t.is_floating_point():
            t.requires_grad_(True)
    return p


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_opcheck_fwd(name, dtype):
    p = _requires_grad(random_problem(dtype=dtype, **CONFIGS[name]))
    torch.library.opcheck(fwd, _fwd_args(p, halved=name.startswith("mimo")))
    torch.library.opcheck(fwd, _fwd_args(p, finals=False, save=False))
    if dtype == torch.float32:  # mimo_combined's `dtype`: the output's dtype
        torch.library.opcheck(fwd, _fwd_args(p, dtype_out=torch.bfloat16))


@pytest.mark.parametrize("name", ["siso", "mimo"])
def test_opcheck_bwd(name):
    p = random_problem(dtype=torch.float32, **CONFIGS[name])
    args = _fwd_args(p)
    out, fa, fs, fk, fv, saved = fwd(*args)
    tensors = args[:20]
    mask = [int(t is not None) for t in tensors[:19]]
    d_out = torch.randn_like(out)
    torch.library.opcheck(bwd, (d_out, None, torch.randn_like(fs), None, None, *tensors, saved,
                                False, 1e-5, 8, mask))
    # Nothing requested but the ssm state's gradient; no saved buffer (recompute).
    mask2 = [0] * 16 + [int(tensors[16] is not None), 0, 0]
    torch.library.opcheck(bwd, (d_out, torch.randn_like(fa), None, torch.randn_like(fk),
                                torch.randn_like(fv), *tensors, None, False, 1e-5, 8, mask2))


@pytest.mark.parametrize("name", ["siso", "mimo", "mimo_per_rank", "mimo_norm"])
def test_opcheck_step(name):
    cfg = dict(CONFIGS[name], L=1, states=True)
    p = random_problem(dtype=torch.float32, **cfg)
    q, k, v, z = p["q"][:, 0], p["k"][:, 0], p["v"][:, 0], p.get("z")
    z = z[:, 0] if z is not None else None
    R = 1 if q.dim() == 3 else q.shape[1]
    out_shape = (v.shape[0], R, *v.shape[1:]) if (R > 1 and p.get("mimo_o") is None) else v.shape
    out = torch.empty(out_shape)
    torch.library.opcheck(step_op, (q, k, v, p["adt"][..., 0], p["dt"][..., 0], p["trap"][..., 0],
                                    p["angles"][:, 0], p["q_bias"], p["k_bias"], p.get("d"), z,
                                    p.get("mimo_v"), p.get("mimo_z"), p.get("mimo_o"),
                                    p.get("norm_weight"), *p["initial_states"], out, R > 1, 1e-5))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradcheck(name):
    """float64 (reference lane): every input, initial states included, through the output and
    every final state."""
    cfg = dict(CONFIGS[name])
    cfg.update(L=min(cfg.get("L", 7), 7), B=1, H=2, G=1, N=4, P=2, NA=1)
    if cfg.get("varlen"):
        cfg.update(L=7, varlen=[0, 3, 3, 7])
    p = _requires_grad(random_problem(**cfg))
    names = [k for k, t in p.items() if k not in ("initial_states", "cu_seqlens") and t is not None]
    init = list(p.get("initial_states") or ())
    halved = cfg["R"] > 1

    def f(*xs):
        kw = dict(zip(names, xs[:len(names)]))
        st = tuple(xs[len(names):]) or None
        out, finals = mamba3.combined(**kw, initial_states=st, cu_seqlens=p.get("cu_seqlens"),
                                      halved_rope=halved, chunk_size=4, return_final_states=True)
        return (out, *finals)

    assert torch.autograd.gradcheck(f, [p[k] for k in names] + init, eps=1e-6, atol=1e-7,
                                     rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("R", [1, 3])
def test_split_and_continue(R, dtype):
    """Final states of a prefix, fed as initial states of the rest, reproduce the unsplit run,
    and gradients flow through the final states into the prefix."""
    p = _requires_grad(random_problem(R=R, L=30, states=False, dtype=dtype))
    kw = {k: p[k] for k in ("d", "z", "mimo_v", "mimo_z", "mimo_o") if p.get(k) is not None}
    seq = ("q", "k", "v", "angles", "z")
    tm = ("adt", "dt", "trap")

    def run(sl, init):
        a = {k: (p[k][:, sl] if k in seq else p[k][:, :, sl] if k in tm else p[k])
             for k in ("q", "k", "v", "adt", "dt", "trap", "q_bias", "k_bias", "angles")}
        kk = dict(kw)
        if "z" in kk:
            kk["z"] = p["z"][:, sl]
        return mamba3.combined(**a, **kk, initial_states=init, halved_rope=R > 1,
                               chunk_size=8, return_final_states=True)

    full, ffin = run(slice(0, 30), None)
    a, afin = run(slice(0, 13), None)
    b, bfin = run(slice(13, 30), afin)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert rel_l2(torch.cat([a, b], 1), full) < tol
    for x, y in zip(bfin[1:], ffin[1:]):
        assert rel_l2(x, y) < tol
    w = torch.randn_like(full)
    g_full = torch.autograd.grad((full * w).sum() + ffin[1].sum(), [p["q"], p["adt"], p["v"]])
    g_split = torch.autograd.grad((torch.cat([a, b], 1) * w).sum() + bfin[1].sum(),
                                  [p["q"], p["adt"], p["v"]])
    for x, y in zip(g_split, g_full):
        assert rel_l2(x, y) < (1e-11 if dtype == torch.float64 else 1e-5)


def test_saved_activations_match_recompute():
    """The cpu lane's saved buffer (training) gives the same gradients as recomputation."""
    p = random_problem(R=2, L=40, dtype=torch.float32)
    args = _fwd_args(p, halved=True)
    out, fa, fs, fk, fv, saved = fwd(*args)
    assert saved.numel() > 0 and saved.dtype == torch.float32
    tensors = args[:20]
    mask = [int(t is not None) for t in tensors[:19]]
    d_out = torch.randn_like(out)
    g1 = bwd(d_out, None, fs, None, None, *tensors, saved, True, 1e-5, 8, mask)
    g2 = bwd(d_out, None, fs, None, None, *tensors, None, True, 1e-5, 8, mask)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    # The reference lane (float64) saves nothing.
    p64 = random_problem(R=2, L=5)
    assert fwd(*_fwd_args(p64, halved=True))[5].numel() == 0


def test_non_contiguous_inputs():
    """Strided views go to the core without copies and give the same result."""
    p = random_problem(R=1, L=12, dtype=torch.float32, states=False)
    q_t = p["q"].transpose(0, 1).contiguous().transpose(0, 1)
    v_big = torch.randn(2, 12, 4, 8)
    v_big[..., ::2] = p["v"]
    v_nc = v_big[..., ::2]
    assert not q_t.is_contiguous() and not v_nc.is_contiguous()
    args = dict(q_bias=p["q_bias"], k_bias=p["k_bias"], angles=p["angles"], d=p["d"], z=p["z"],
                adt=p["adt"], dt=p["dt"], trap=p["trap"], k=p["k"])
    a, _ = mamba3.combined(q=p["q"], v=p["v"], **args)
    b, _ = mamba3.combined(q=q_t, v=v_nc, **args)
    assert torch.equal(a, b)


def test_bf16_inputs_run_on_cpu_lane():
    p = random_problem(R=1, L=20, dtype=torch.float32, states=False)
    ref, _ = mamba3.combined(**{k: v for k, v in p.items()})
    bp = {k: (v.bfloat16() if k in ("q", "k", "v", "z", "trap") else v) for k, v in p.items()}
    for t in bp.values():
        if t is not None and t.is_floating_point():
            t.requires_grad_(True)
    out, _ = mamba3.combined(**bp)
    assert out.dtype == torch.bfloat16
    assert rel_l2(out, ref) < 2e-2
    out.float().square().sum().backward()
    assert bp["q"].grad.dtype == torch.bfloat16 and torch.isfinite(bp["q"].grad.float()).all()


def test_meta_tensors():
    """The fake kernels also serve plain meta tensors (shape inference without data)."""
    m = mamba3.Mamba3(32, d_state=16, headdim=8, is_mimo=True, mimo_rank=2, device="meta")
    y = m(torch.empty(2, 5, 32, device="meta"))
    assert y.shape == (2, 5, 32) and y.device.type == "meta"
    y.sum().backward()
    assert m.mimo_x.grad.shape == m.mimo_x.shape


def test_release_cached_memory_is_idempotent():
    # Whatever ran before, a second release finds nothing cached (0 bytes, also without the
    # cuda lane).
    assert mamba3.release_cached_memory() >= 0
    assert mamba3.release_cached_memory() == 0
