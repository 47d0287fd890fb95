"""GPU tests of the Hopper cluster variant (``pytest -m gpu``; benchmarks/gpu_run.sh phase 6).

Skipped without a CUDA GPU of compute capability 9.0+, or without the extension.  Runs the
cuda backend with ``RNNREG_CUDA_VARIANT=cluster`` (cluster forward and cluster backward) and
NaN-poisoned outputs against the float64 reference: float32 tightly (IEEE fp32 products),
bfloat16 within 4x the error of the naive PyTorch path in bfloat16; the cluster forward and
backward are bitwise deterministic and agree with the persistent kernels.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from rnnreg_kernels import cuda, reference

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cuda_build import PEN_ALL, make_case, rel_errors, run_backend  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.fixture(autouse=True)
def _cluster_backend(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the cluster variant needs compute capability 9.0+ (thread-block clusters)")
    why = cuda.unavailable_reason(torch.device(DEV))
    if why is not None:
        pytest.skip(f"cuda backend unavailable: {why}")
    try:
        ext = cuda.load_extension()
    except RuntimeError as e:
        pytest.skip(f"cuda extension unavailable: {e}")
    if not hasattr(ext, "cluster_forward") or not hasattr(ext, "cluster_backward"):
        pytest.skip("the loaded extension has no cluster variant (built from older sources)")
    for k, v in (("RNNREG_CUDA_VARIANT", "cluster"), ("RNNREG_CUDA_POISON", "1"),
                 ("RNNREG_CUDA_UNITS", ""), ("RNNREG_CUDA_CLUSTER_UNITS", ""),
                 ("RNNREG_CUDA_CLUSTER_SIZE", "")):
        monkeypatch.setenv(k, v)
    torch.backends.cuda.matmul.allow_tf32 = False


F32_CASES = [  # cell, T, B, H, penalties, lengths, reverse, cluster units (0 = default)
    ("lstm", 7, 3, 5, PEN_ALL, None, False, 0),
    ("lstm", 6, 3, 50, {"ns": 0.8}, [6, 2, 5], True, 8),
    ("relu", 7, 3, 50, PEN_ALL, [3, 7, 1], False, 8),
    ("tanh", 1, 3, 20, {"ar": 0.6, "mask": True}, None, True, 8),
    ("trec", 6, 5, 130, PEN_ALL, None, False, 0),
]


@pytest.mark.parametrize("case", F32_CASES, ids=lambda c: f"{c[0]}-T{c[1]}B{c[2]}H{c[3]}u{c[7]}")
def test_cluster_float32_matches_reference(case, monkeypatch):
    cell, T, B, H, pen, lengths, reverse, units = case
    monkeypatch.setenv("RNNREG_CUDA_CLUSTER_UNITS", str(units) if units else "")
    spec, inp, mask, L, grads = make_case(cell, T, B, H, pen, lengths, reverse, seed=T + H)
    ref = run_backend(reference, spec, inp, mask, L, grads, torch.float64, DEV)
    got = run_backend(cuda, spec, inp, mask, L, grads, torch.float32, DEV)
    errs = rel_errors(got, ref)
    assert all(e < 2e-5 for e in errs.values()), (case, errs)


@pytest.mark.parametrize("cell,H", [("relu", 1024), ("lstm", 512)])
def test_cluster_bf16_at_the_benchmark_shapes(cell, H):
    dtype = torch.bfloat16
    spec, inp, mask, L, grads = make_case(cell, 20, 32, H, PEN_ALL, None, False, seed=H)
    rounded = {k: None if v is None else v.to(dtype).double() for k, v in inp.items()}
    mask_r = mask.to(dtype).double()
    ref = run_backend(reference, spec, rounded, mask_r, L, grads, torch.float64, DEV)
    got = rel_errors(run_backend(cuda, spec, rounded, mask_r, L, grads, dtype, DEV), ref)
    naive = rel_errors(run_backend(reference, spec, rounded, mask_r, L, grads, dtype, DEV), ref)
    for k in got:
        assert got[k] <= 4 * naive[k] + torch.finfo(dtype).eps / 4, (k, got[k], naive[k])


def test_cluster_forward_is_deterministic_and_agrees_with_persistent(monkeypatch):
    spec, inp, mask, L, _ = make_case("lstm", 10, 16, 256, PEN_ALL, None, False, seed=4)
    args = [None if v is None else v.to(DEV, torch.bfloat16) for v in
            (inp["x"], inp["w"], inp["h0"], inp["c0"], mask)]
    a = cuda.forward(spec, *args, None)
    b = cuda.forward(spec, *args, None)
    for x, y in zip(a[:5], b[:5]):
        if x is not None:
            assert torch.equal(x, y)
    monkeypatch.setenv("RNNREG_CUDA_VARIANT", "")
    p = cuda.forward(spec, *args, None)
    assert (a[0].float() - p[0].float()).abs().max().item() < 2e-2
    assert (a[4] - p[4]).abs().max().item() < 1e-2 * p[4].abs().max().item()


BWD_CASES = [  # the cluster backward with grad_norms (radial terms), 4+ CTAs per cluster
    ("relu", 6, 5, 29, PEN_ALL, [6, 1, 3, 6, 2], False, 8),
    ("lstm", 5, 3, 27, {"ns": 0.6, "incl": True}, [5, 2, 4], True, 8),
    ("tanh", 1, 3, 40, {"tar": 0.8, "ar": 0.4, "mask": True}, None, False, 0),
]


@pytest.mark.parametrize("case", BWD_CASES, ids=lambda c: f"{c[0]}-T{c[1]}B{c[2]}H{c[3]}")
def test_cluster_backward_radial_terms_match_reference(case, monkeypatch):
    cell, T, B, H, pen, lengths, reverse, units = case
    monkeypatch.setenv("RNNREG_CUDA_CLUSTER_UNITS", str(units) if units else "")
    spec, inp, mask, L, grads = make_case(cell, T, B, H, pen, lengths, reverse, seed=T * H,
                                          radial=True)
    ref = run_backend(reference, spec, inp, mask, L, grads, torch.float64, DEV)
    got = run_backend(cuda, spec, inp, mask, L, grads, torch.float32, DEV)
    errs = rel_errors(got, ref)
    assert all(e < 2e-5 for e in errs.values()), (case, errs)


def test_cluster_backward_is_deterministic_and_agrees_with_persistent(monkeypatch):
    spec, inp, mask, L, grads = make_case("lstm", 10, 16, 256, PEN_ALL, None, False, seed=5,
                                          radial=True)
    dt = torch.bfloat16

    def cv(t, d=dt):
        return None if t is None else t.to(DEV, d).contiguous()

    def both():
        fwd = cuda.forward(spec, cv(inp["x"]), cv(inp["w"]), cv(inp["h0"]), cv(inp["c0"]),
                           cv(mask), None)
        out, _, _, terms, norms, cnorms, saved = fwd
        return cuda.backward(spec, None, cv(inp["w"]), cv(inp["h0"]), cv(inp["c0"]), cv(mask),
                             None, None, out, norms, cnorms, saved, cv(grads["go"]),
                             cv(grads["ghn"]), cv(grads["gcn"]), cv(grads["gt"], torch.float32),
                             cv(grads["gn"], torch.float32))

    a, b = both(), both()
    for x, y in zip(a, b):
        if x is not None:
            assert torch.equal(x, y)
    monkeypatch.setenv("RNNREG_CUDA_VARIANT", "")
    p = both()
    for name, x, y in zip(("grad_x_proj", "grad_w_hh", "grad_h0", "grad_c0"), a[:4], p[:4]):
        err = (x.float() - y.float()).abs().max().item() / y.float().abs().max().item()
        assert err < 2e-2, (name, err)


@pytest.mark.parametrize("cell,H", [("relu", 1024), ("lstm", 512)])
def test_cluster_backward_plan_at_the_benchmark_shapes(cell, H):
    """The backward plan of the profile (docs/cuda.md): 8 clusters of 16 CTAs at B=32 bf16, or
    the driver's reason (e.g. fewer co-resident 16-CTA clusters than the 132 SMs suggest)."""
    ext = cuda.load_extension()
    why = ext.cluster_bwd_plan(cuda._CELL_CODE[cell], 1, 32, H, torch.cuda.current_device())
    assert why == "", why
