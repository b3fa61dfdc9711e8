"""The peer harness (bench/peers/peers.py) in CPU mode, as CI runs it: one subprocess run on small
shapes, then checks on its report: every row measured or "not run: <reason>" (no errors), our rows
all measured, and the parity numbers of ours and of the official pure-PyTorch reference path
within tolerance of the float64 reference and of each other."""

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
HARNESS = REPO / "bench" / "peers" / "peers.py"

# Relative L2 bounds against the float64 reference on bf16-exact inputs. bf16 tensors (out and
# the gradients of bf16 inputs) carry the final rounding to bf16 (relative L2 ~1.6e-3 measured);
# float32 ones (states, parameter gradients) measured <= 1e-6 for both implementations.
TOL = {"bfloat16": 8e-3, "float32": 1e-5}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("peers")
    proc = subprocess.run([sys.executable, str(HARNESS), "--mode", "cpu", "--out", str(out),
                           "--budget-s", "1200"], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    jsons = list(out.glob("peers-cpu-*.json"))
    mds = list(out.glob("peers-cpu-*.md"))
    assert len(jsons) == 1 and len(mds) == 1, sorted(p.name for p in out.iterdir())
    return json.loads(jsons[0].read_text()), mds[0].read_text()


def _status_ok(status):
    return status == "measured" or (status.startswith("not run: ") and "error:" not in status)


def test_every_row_measured_or_not_run(report):
    data, md = report
    assert data["ceilings"] and all(c["status"] == "measured" for c in data["ceilings"])
    assert data["timing"] and data["parity"]
    bad = [(r["section"], r["shape"], r["op"], r["impl"], r["status"]) for r in data["timing"]
           if not _status_ok(r["status"])]
    assert not bad, bad
    # The markdown shows every row of the JSON as the harness formats it.
    sys.path.insert(0, str(HARNESS.parent))
    try:
        import peers
    finally:
        sys.path.pop(0)
    for r in data["timing"]:
        if r["status"] == "measured":
            assert r["ms"] > 0 and r["iters"] >= 1
        assert peers.fmt_ms(r) in md, r


def test_every_section_and_impl_present(report):
    data, _ = report
    seen = {(r["section"], r["impl"]) for r in data["timing"]}
    for section in ("siso", "mimo", "decode", "sweep"):
        assert (section, "ours") in seen and (section, "official-ref") in seen, section
    for impl in ("mamba2", "sdpa"):
        assert ("context", impl) in seen and ("sweep", impl) in seen, impl


def test_our_rows_are_measured(report):
    data, _ = report
    ours = [r for r in data["timing"] if r["impl"] == "ours"]
    assert ours and all(r["status"] == "measured" for r in ours), \
        [(r["section"], r["shape"], r["op"], r["status"]) for r in ours if r["status"] != "measured"]


def test_parity_within_tolerance(report):
    data, _ = report
    cases = {p["case"].split()[0] for p in data["parity"]}
    assert cases == {"siso", "mimo", "decode"}, cases
    tensors = set()
    for p in data["parity"]:
        assert "status" not in p, p
        tensors.add(p["tensor"])
        tol = TOL[p["ours_dtype"]]
        for col in ("ours", "official", "ours_vs_official"):
            v = p[col]
            assert isinstance(v, float), (p["case"], p["tensor"], col, v)
            assert v <= tol, (p["case"], p["tensor"], col, v, tol)
    # Every output, final state and gradient is compared, initial states included.
    want = {"out", "final.angle", "final.ssm", "final.k", "final.v"} | {
        "grad." + n for n in ("q", "k", "v", "adt", "dt", "trap", "q_bias", "k_bias", "angles",
                              "d", "z", "mimo_v", "mimo_z", "mimo_o", "initial.angle",
                              "initial.ssm", "initial.k", "initial.v")}
    assert want <= tensors, want - tensors
