"""GPU tests of the cuda backend (``pytest -m gpu``, run by benchmarks/gpu_run.sh).

Skipped without a CUDA GPU or without the extension (prebuilt or JIT-buildable).  Every run
sets ``RNNREG_CUDA_POISON=1`` so outputs start as NaN and an unwritten element fails.
float32 is compared with the float64 reference tightly (IEEE fp32 products, no TF32; one test
runs the TF32 tensor-core path of Spec.allow_tf32);
bfloat16/float16 against the error of the naive PyTorch path in the same dtype.
compute-sanitizer (when on PATH) checks a tiny case clean, and catches a planted race and a
planted out-of-bounds write in a build with -DRNNREG_PLANT_BUG.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rnnreg_kernels import cuda, ops, reference
from rnnreg_kernels.penalties import Penalties

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cuda_build import PEN_ALL, make_case, rel_errors, run_backend  # noqa: E402

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]
DEV = "cuda"
PENS = [{}, {"ns": 0.8}, {"ns": 0.8, "incl": True}, {"tar": 1.1}, {"ar": 0.6},
        {"ar": 0.6, "mask": True}, PEN_ALL]
OPTIONS = {  # T, B, H, lengths, reverse, units
    "plain": (7, 3, 5, None, False, 0),
    "lengths-reverse": (7, 3, 50, [7, 2, 5], True, 0),
    "lengths-multiblock": (6, 3, 50, [1, 6, 4], False, 7),
    "T1": (1, 3, 5, None, True, 0),
}


@pytest.fixture(autouse=True)
def _cuda_backend(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    why = cuda.unavailable_reason(torch.device(DEV))
    if why is not None:
        pytest.skip(f"cuda backend unavailable: {why}")
    try:
        cuda.load_extension()
    except RuntimeError as e:
        pytest.skip(f"cuda extension unavailable: {e}")
    monkeypatch.setenv("RNNREG_CUDA_POISON", "1")
    monkeypatch.setenv("RNNREG_CUDA_UNITS", "")
    torch.backends.cuda.matmul.allow_tf32 = False


def _check_f32(case, seed=0, tol=2e-5):
    cell, pen, (T, B, H, lengths, reverse, units) = case
    os.environ["RNNREG_CUDA_UNITS"] = str(units) if units else ""
    spec, inp, mask, L, grads = make_case(cell, T, B, H, pen, lengths, reverse, seed=seed)
    ref = run_backend(reference, spec, inp, mask, L, grads, torch.float64, DEV)
    got = run_backend(cuda, spec, inp, mask, L, grads, torch.float32, DEV)
    errs = rel_errors(got, ref)
    assert all(e < tol for e in errs.values()), (case, errs)
    return got


@pytest.mark.parametrize("opt", sorted(OPTIONS))
@pytest.mark.parametrize("pen", PENS, ids=lambda p: "-".join(sorted(p)) or "none")
@pytest.mark.parametrize("cell", ["lstm", "relu", "tanh", "trec"])
def test_float32_matches_reference(cell, pen, opt):
    _check_f32((cell, pen, OPTIONS[opt]), seed=len(opt))


@pytest.mark.parametrize("opt", ["plain", "lengths-reverse", "lengths-multiblock", "T1"])
@pytest.mark.parametrize("cell", ["normprop", "lstm", "relu"])
def test_float32_contract_v2_matches_reference(cell, opt):
    """Contract v2 (issue 12): normprop with grad_cell_scale, cell norms (LSTM-type cells) and
    random grad_norms / grad_cell_norms (the radial terms), against the float64 reference."""
    T, B, H, lengths, reverse, units = OPTIONS[opt]
    os.environ["RNNREG_CUDA_UNITS"] = str(units) if units else ""
    cn = cell != "relu"
    spec, inp, mask, L, grads = make_case(cell, T, B, H, PEN_ALL, lengths, reverse, seed=2,
                                          cell_norms=cn, radial=True)
    ref = run_backend(reference, spec, inp, mask, L, grads, torch.float64, DEV)
    errs = rel_errors(run_backend(cuda, spec, inp, mask, L, grads, torch.float32, DEV), ref)
    assert ("cell_norms" in errs) == cn and ("grad_cell_scale" in errs) == (cell == "normprop")
    assert all(e < 2e-5 for e in errs.values()), errs


@pytest.mark.parametrize("cell,T,B,H,dtype", [
    ("lstm", 20, 32, 1000, torch.float32),
    ("relu", 30, 8, 1024, torch.float32),
    ("tanh", 16, 5, 777, torch.float32),
])
def test_float32_large_hidden_multiblock(cell, T, B, H, dtype):
    spec, *_ = make_case(cell, 1, 1, 5, {})
    why = cuda.unsupported_reason(spec, torch.empty(1, B, 4 * H if cell == "lstm" else H,
                                                    device=DEV), torch.empty(1, H, device=DEV))
    if why is not None:
        pytest.skip(f"does not fit this GPU: {why}")
    lengths = [T - (b % 4) for b in range(B)]
    _check_f32((cell, PEN_ALL, (T, B, H, lengths, True, 0)), tol=1e-4)


@pytest.mark.parametrize("cell", ["lstm", "relu"])
def test_float32_tf32_tensor_cores(cell):
    """Spec.allow_tf32: the fp32 step product on TF32 mma (within TF32 accuracy, and not the
    strict FFMA path's result)."""
    import dataclasses
    spec, inp, mask, L, grads = make_case(cell, 12, 32, 256, PEN_ALL, None, False, seed=4)
    ref = run_backend(reference, spec, inp, mask, L, grads, torch.float64, DEV)
    tf = rel_errors(run_backend(cuda, dataclasses.replace(spec, allow_tf32=True), inp, mask, L,
                                grads, torch.float32, DEV), ref)
    assert all(e < 5e-3 for e in tf.values()), tf
    assert max(tf["output"], tf["grad_x_proj"]) > 1e-5, tf


def _naive(cell, pen, inp, mask, L, grads, dtype, spec):
    """Plain autograd through reference.naive in ``dtype`` (the naive PyTorch path)."""
    leaves = {k: None if v is None else v.to(DEV, dtype).requires_grad_() for k, v in inp.items()}
    p = Penalties(norm_stabilizer=pen.get("ns", 0.0), tar=pen.get("tar", 0.0),
                  ar=pen.get("ar", 0.0), ns_include_initial=pen.get("incl", False),
                  ar_mask=None if mask is None else mask.to(DEV, dtype))
    out, h_n, c_n, terms, norms, _ = reference.naive(
        leaves["x"], leaves["w"], leaves["h0"], leaves["c0"], cell=cell, theta=spec.theta,
        penalties=p, lengths=None if L is None else L.to(DEV), reverse=spec.reverse)
    terms, norms = terms[:3], norms.detach()  # the contract's three terms
    loss = (out.double() * grads["go"].to(DEV)).sum() + (h_n.double() * grads["ghn"].to(DEV)).sum()
    loss = loss + (terms.double() * grads["gt"].to(DEV)).sum()
    if c_n is not None:
        loss = loss + (c_n.double() * grads["gcn"].to(DEV)).sum()
    wrt = [leaves[k] for k in ("x", "w", "h0", "c0") if leaves[k] is not None]
    gs = torch.autograd.grad(loss, wrt)
    gc0 = gs[3] if cell == "lstm" else None
    return [out, h_n, c_n, terms, norms, gs[0], gs[1], gs[2], gc0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cell", ["lstm", "relu", "tanh", "trec"])
@pytest.mark.parametrize("H", [5, 50, 640])
def test_half_within_naive_error(cell, dtype, H):
    T, B = 9, 3
    spec, inp, mask, L, grads = make_case(cell, T, B, H, PEN_ALL, [9, 4, 7], True, seed=H)
    rounded = {k: None if v is None else v.to(dtype).double() for k, v in inp.items()}
    mask = mask.to(dtype).double()
    ref = run_backend(reference, spec, rounded, mask, L, grads, torch.float64, DEV)
    got = rel_errors(run_backend(cuda, spec, rounded, mask, L, grads, dtype, DEV), ref)
    naive = rel_errors(_naive(cell, PEN_ALL, rounded, mask, L, grads, dtype, spec), ref)
    eps = torch.finfo(dtype).eps
    for k in got:
        assert got[k] <= 4 * naive[k] + eps / 4, (k, got[k], naive[k])


@pytest.mark.parametrize("cell", ["lstm", "relu"])
def test_through_ops_autograd(cell):
    T, B, H = 5, 3, 50
    G = 4 if cell == "lstm" else 1
    g = torch.Generator(device="cpu").manual_seed(1)
    x = (torch.randn(T, B, G * H, generator=g, dtype=torch.float64) * 0.5).to(DEV)
    w = (torch.randn(G * H, H, generator=g, dtype=torch.float64) * 0.1).to(DEV)
    h0 = torch.randn(B, H, generator=g, dtype=torch.float64).to(DEV) * 0.5
    c0 = h0.clone() if cell == "lstm" else None
    pen = Penalties(norm_stabilizer=0.5, tar=0.3, ar=0.2)
    results = []
    for backend, dtype in (("reference", torch.float64), ("cuda", torch.float32)):
        inputs = (x, w, h0) if c0 is None else (x, w, h0, c0)
        leaves = [t.to(dtype).requires_grad_() for t in inputs]
        r = ops.recurrence(*leaves[:3], leaves[3] if cell == "lstm" else None, cell=cell,
                           penalties=pen, lengths=[5, 2, 4], reverse=True, backend=backend)
        loss = r.output.double().square().sum() + r.penalty.double() + r.h_n.double().sum()
        results.append([r.output, r.penalty, *torch.autograd.grad(loss, leaves)])
    for a, b in zip(*results[::-1]):
        assert (a.double() - b).abs().max() <= 2e-5 * b.abs().max().clamp_min(1e-6)


def test_deterministic():
    spec, inp, mask, L, grads = make_case("lstm", 8, 5, 300, PEN_ALL, [8, 3, 8, 1, 6], False)
    a = run_backend(cuda, spec, inp, mask, L, grads, torch.bfloat16, DEV)
    b = run_backend(cuda, spec, inp, mask, L, grads, torch.bfloat16, DEV)
    for x, y in zip(a, b):
        assert (x is None and y is None) or torch.equal(x, y)


def test_too_large_hidden_says_what_fits():
    x = torch.empty(2, 3, 4 * 8192, device=DEV)
    w_shape_only = torch.empty(1, 8192, device=DEV)
    spec, *_ = make_case("lstm", 2, 3, 5, {})
    why = cuda.unsupported_reason(spec, x, w_shape_only)
    assert why is not None and "H=8192" in why and "fit H <=" in why, why
    hmax = cuda.load_extension().max_hidden(0, 0, torch.cuda.current_device())
    assert 64 <= hmax < 8192, hmax
    fits = cuda.unsupported_reason(spec, x[..., :4 * hmax], torch.empty(1, hmax, device=DEV))
    assert fits is None, fits


# ----------------------------------------------------------------------------- sanitizer

_SCRIPT = r"""
import os, sys, torch
sys.path[:0] = [{root!r}, {tests!r}]
from rnnreg_kernels import cuda
from test_cuda_build import make_case
mode, plant = sys.argv[1], int(sys.argv[2])
if mode == "planted":
    from torch.utils.cpp_extension import load
    cuda._ext = load(**{load_kwargs})
os.environ["RNNREG_CUDA_UNITS"] = "64"
spec, inp, mask, L, grads = make_case("relu", 3, 3, 64, {{"ns": 0.5, "tar": 0.5, "ar": 0.5}})
c = lambda t: None if t is None else t.to("cuda", torch.float32).contiguous()
fwd = cuda.forward(spec, c(inp["x"]), c(inp["w"]), c(inp["h0"]), None, None, None, None,
                   plant=plant)
if plant == 0:
    cuda.backward(spec, None, c(inp["w"]), c(inp["h0"]), None, None, None, None, fwd[0], fwd[4],
                  fwd[5], fwd[6], c(grads["go"]), c(grads["ghn"]), None,
                  grads["gt"].float().cuda(), None, None)
torch.cuda.synchronize()
print("script done")
"""


def _planted_load_kwargs():
    src = cuda.sources_dir()
    digest = hashlib.sha256(b"".join((src / f).read_bytes() for f in cuda._SOURCES + cuda._HEADERS))
    build = cuda.cache_dir() / f"planted_{digest.hexdigest()[:16]}"
    build.mkdir(parents=True, exist_ok=True)
    return dict(name="rnnreg_kernels_planted", sources=[str(src / f) for f in cuda._SOURCES],
                extra_include_paths=[str(src)], build_directory=str(build),
                extra_cflags=["-O3", "-DRNNREG_PLANT_BUG"],
                extra_cuda_cflags=["-O3", "-lineinfo", "-DRNNREG_PLANT_BUG"])


def _sanitize(tmp_path, tool, mode, plant):
    exe = shutil.which("compute-sanitizer")
    if exe is None:
        pytest.skip("compute-sanitizer is not on PATH")
    script = tmp_path / "case.py"
    script.write_text(_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"),
                                     load_kwargs=_planted_load_kwargs()))
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1", "RNNREG_CUDA_POISON": "1"}
    res = subprocess.run([exe, "--tool", tool, sys.executable, str(script), mode, str(plant)],
                         capture_output=True, text=True, env=env, timeout=900)
    return res.stdout + res.stderr


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_sanitizer_clean(tmp_path, tool):
    log = _sanitize(tmp_path, tool, "real", 0)
    assert "script done" in log and "ERROR SUMMARY: 0 errors" in log, log[-4000:]


@pytest.fixture(scope="module")
def planted_build():
    if shutil.which("compute-sanitizer") is None:
        pytest.skip("compute-sanitizer is not on PATH")
    from torch.utils.cpp_extension import load
    ext = load(**_planted_load_kwargs())
    assert ext.PLANTED


def test_sanitizer_finds_planted_race(tmp_path, planted_build):
    log = _sanitize(tmp_path, "racecheck", "planted", 1)
    assert "hazard" in log.lower() and "ERROR SUMMARY: 0 errors" not in log, log[-4000:]


def test_sanitizer_finds_planted_out_of_bounds(tmp_path, planted_build):
    log = _sanitize(tmp_path, "memcheck", "planted", 2)
    assert "Invalid __global__ write" in log, log[-4000:]
