"""The Hopper cluster variant of the cuda backend (csrc/cluster.cu forward,
csrc/cluster_backward.cu backward) without a GPU.

* ``cluster.cu`` and ``cluster_backward.cu`` compile for sm_90a with plain nvcc (torch's
  extension flags), no spills; their SASS has the tensor-core step product (HMMA), the cluster
  barrier (UCGABAR_ARV / _WAIT) and the 16-byte distributed-shared-memory stores; the sm_80
  pass of an "8.0;9.0" build compiles (the kernel bodies are sm_90-only);
  ``cluster_binding.cpp`` passes ``g++ -fsyntax-only``;
* both kernels run on the CPU emulation of clusters (csrc/emu/emu_cluster.h: one barrier per
  cluster, DSMEM as bounds-checked pointers into the other blocks' shared memory) through
  ``rnnreg_kernels.cuda.forward`` / ``backward`` with ``RNNREG_CUDA_VARIANT=cluster`` and are
  compared with the float64 reference (outputs, penalties, every gradient);
* a planted error in either DSMEM exchange fails; the plans, the refusals and the opt-in
  switch; the static profile of both kernels.
"""
from __future__ import annotations

import ctypes
import dataclasses
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from rnnreg_kernels import cuda, cuda_cluster, reference
from test_cuda_build import (CSRC, CUDA_HOME, PEN_ALL, TORCH_NVCC_FLAGS, EmulatedExtension,
                             _DT, _build_emu, _cuobjdump, _nan, _nvcc, _ptrs, make_case,
                             rel_errors, run_backend)

H100 = (132, 227 * 1024)  # SMs, opt-in shared memory per block


# ----------------------------------------------------------------------------- compile checks

def _cluster_sass(obj):
    tool = _cuobjdump()
    if tool is None:
        return None
    res = subprocess.run([tool, "-sass", "-arch", "sm_90a", str(obj)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    stats = {}
    kinds = {"I13__nv_bfloat16L": "bf16", "I6__halfL": "fp16", "IfL": "fp32"}
    for chunk in re.split(r"\n\s*Function : ", res.stdout)[1:]:
        mangled = chunk.split("\n", 1)[0].strip()
        ntg = re.search(r"Li(\d+)E", mangled)
        gated = re.search(r"Lb([01])E", mangled)  # the cell instantiation: 1 lstm, 0 RNN cells
        kind = next((v for k, v in kinds.items() if k in mangled), "?") + (
            f"/{ntg.group(1)}" if ntg else "") + (
            {"1": "/lstm", "0": "/rnn"}[gated.group(1)] if gated else "")
        ins = re.findall(r"/\*[0-9a-f]{4,}\*/\s+([^;]*);", chunk)
        stats[kind] = {
            "instructions": len(ins),
            "HMMA16816": sum("HMMA.16816.F32" in i for i in ins),
            "HMMA1688": sum("HMMA.1688.F32.TF32" in i for i in ins),
            "LDSM": sum(i.lstrip("@!P0123456789T ").startswith("LDSM") for i in ins),
            "UCGABAR_ARV": sum("UCGABAR_ARV" in i for i in ins),
            "UCGABAR_WAIT": sum("UCGABAR_WAIT" in i for i in ins),
            "ST.E.128": sum(re.match(r"(@!?P\d\s+)?ST\.E\.128\b", i.strip()) is not None
                            for i in ins),
        }
    return stats


@pytest.mark.parametrize("src", ["cluster.cu", "cluster_backward.cu"])
def test_cluster_compiles_for_sm90a_without_spills(src, tmp_path):
    """sm_90a (-gencode, as HOPPER.md advises) next to the sm_80 pass of torch's default
    "8.0;9.0" arch list, whose kernel body is empty (clusters need sm_90): the forward
    (cluster.cu) and the backward (cluster_backward.cu), 12 kernels each."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME); the sm_90a compile check needs it")
    cmd = [nvcc, "-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80",
           "-O3", "-std=c++17", "-Xptxas", "-v", *TORCH_NVCC_FLAGS, "-c",
           str(CSRC / src), "-o", str(tmp_path / "k.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    log = res.stdout + res.stderr
    assert res.returncode == 0, f"nvcc failed for {src}:\n{log[-4000:]}"
    # ptxas -v: "Compiling entry function 'NAME' for 'sm_90a'", then its spills and registers
    blocks = re.findall(r"Compiling entry function '(\S+)' for '(sm_\w+)'(.*?)(?=Compiling entry|$)",
                        log, re.S)
    hopper = [(name, body) for name, arch, body in blocks if arch == "sm_90a"]
    for name, body in hopper:
        regs = re.search(r"Used (\d+) registers", body)
        print(f"{src} sm_90a: {name}: {regs.group(1) if regs else '?'} registers; "
              + " ".join(re.findall(r"\d+ bytes (?:stack frame|spill \w+)", body)))
        assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", body), body
        assert re.search(r"\b0 bytes stack frame", body), body
    assert len(hopper) == 12, log[-2000:]
    assert len([b for b in blocks if b[1] == "sm_80"]) == 12, log[-2000:]
    stats = _cluster_sass(tmp_path / "k.o")
    if stats is None:
        pytest.skip("cuobjdump not found (it ships in the triton wheel); SASS checks skipped")
    assert set(stats) == {f"{d}/{n}/{c}" for d in ("bf16", "fp16", "fp32") for n in (1, 2)
                          for c in ("lstm", "rnn")}, stats
    for kind, st in sorted(stats.items()):
        print(kind, st)
        if kind.startswith("fp32"):
            assert st["HMMA1688"] > 0, (kind, "no TF32 tensor-core product", st)
        else:
            assert st["HMMA16816"] > 0 and st["LDSM"] > 0, (kind, "no tensor-core product", st)
        assert st["UCGABAR_ARV"] > 0 and st["UCGABAR_WAIT"] > 0, (kind, "no cluster barrier", st)
        assert st["ST.E.128"] > 0, (kind, "no 16-byte DSMEM stores", st)


def test_cluster_binding_passes_syntax_check(tmp_path):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found")
    if not (CUDA_HOME / "include" / "cuda_runtime_api.h").exists():
        pytest.skip(f"CUDA headers not found under {CUDA_HOME}/include (set CUDA_HOME)")
    from torch.utils.cpp_extension import include_paths
    incs = [*include_paths(), sysconfig.get_paths()["include"], str(CUDA_HOME / "include"),
            str(CSRC)]
    generated = "c10/cuda/impl/cuda_cmake_macros.h"
    if not any((Path(i) / generated).exists() for i in include_paths()):
        stub = tmp_path / generated
        stub.parent.mkdir(parents=True)
        stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        incs.append(str(tmp_path))
    cmd = [gxx, "-std=c++20", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_C",
           "-DTORCH_API_INCLUDE_EXTENSION_H", *[f"-I{i}" for i in incs],
           str(CSRC / "cluster_binding.cpp")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"cluster_binding.cpp syntax check failed:\n{res.stderr[-4000:]}"


# ----------------------------------------------------------------------------- CPU emulation

def _build(out_dir, *defines):
    return _build_emu(out_dir, *defines, driver="emu_cluster_driver.cpp",
                      entries=("emu_forward", "emu_backward", "emu_plan", "emu_cluster_plan",
                               "emu_cluster_forward", "emu_cluster_bwd_plan",
                               "emu_cluster_backward"), tf32=False)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("emu_cluster"))


class EmulatedClusterExtension(EmulatedExtension):
    """EmulatedExtension plus the cluster entry points of cluster_binding.cpp (same
    signatures; NaN-poisoned outputs; ``sms`` / ``smem`` describe the emulated device)."""

    def __init__(self, dll, sms=8, smem=H100[1], plant=0):
        super().__init__(dll, sms)
        self.smem, self.plant = smem, plant
        self.plans = []       # the cluster forward's plans, one per call
        self.bwd_plans = []   # the cluster backward's

    def cluster_plan_info(self, cell, dtype, B, H, units, csize, backward=False):
        out = (ctypes.c_longlong * 5)()
        fn = self.dll.emu_cluster_bwd_plan if backward else self.dll.emu_cluster_plan
        err = fn(cell, dtype, B, H, units, csize, self.sms, self.smem, out)
        return err.decode(), dict(zip(("units", "csize", "clusters", "bs", "smem"), out))

    def cluster_plan(self, cell, dtype, B, H, device, units=0, csize=0):
        return self.cluster_plan_info(cell, dtype, B, H, units, csize)[0]

    def cluster_bwd_plan(self, cell, dtype, B, H, device, units=0, csize=0):
        return self.cluster_plan_info(cell, dtype, B, H, units, csize, backward=True)[0]

    def backward(self, *args, **kw):
        raise AssertionError("the persistent backward ran under RNNREG_CUDA_VARIANT=cluster")

    def cluster_backward(self, w, h0, c0, mask, lengths, out, norms, hs, gates, cs, g_out, g_hn,
                         g_cn, g_terms, g_norms, cell, theta, w_ns, w_tar, w_ar, incl, eps, rev,
                         tf32, units, csize, poison):
        T, B, H = out.shape
        lstm = cell == 0
        G = 4 if lstm else 1
        err, p = self.cluster_plan_info(cell, _DT[out.dtype], B, H, units, csize, backward=True)
        assert not err, err
        self.bwd_plans.append(p)
        gx, gh0 = _nan(T, B, G * H, dtype=out.dtype), _nan(B, H, dtype=out.dtype)
        gc0 = _nan(B, H, dtype=out.dtype) if lstm else None
        dz = _nan(T, B, G * H) if out.dtype != torch.float32 else None
        ia = (ctypes.c_int * 12)(T, B, H, cell, int(incl), int(rev), units, self.sms,
                                 _DT[out.dtype], int(tf32), csize, self.plant)
        fa = (ctypes.c_float * 6)(theta, w_ns, w_tar, w_ar, H * eps, 1.0)
        err = self.dll.emu_cluster_backward(
            ia, fa, _ptrs(w, h0, c0, mask, lengths, out, norms, hs, gates, cs, g_out, g_hn, g_cn,
                          g_terms, g_norms, gx, dz, gh0, gc0))
        assert not err, err.decode()
        return [gx, gh0, gc0, dz]

    def plan(self, cell, dtype, B, H, device, units=0):
        out = (ctypes.c_int * 4)()
        return self.dll.emu_plan(cell, dtype, B, H, units, self.sms, self.smem, out).decode()

    def cluster_forward(self, x, w, h0, c0, mask, lengths, cell, theta, w_ns, w_tar, w_ar, incl,
                        eps, rev, tf32, units, csize, poison):
        T, B, _ = x.shape
        H = w.shape[1]
        lstm = cell == 0
        err, p = self.cluster_plan_info(cell, _DT[x.dtype], B, H, units, csize)
        assert not err, err
        self.plans.append(p)
        out, hn = _nan(T, B, H, dtype=x.dtype), _nan(B, H, dtype=x.dtype)
        cn = _nan(B, H, dtype=x.dtype) if lstm else None
        norms, sums = _nan(T + 1, B), _nan(3 * p["csize"] * p["clusters"])
        hs = _nan(T, B, H) if x.dtype != torch.float32 else None
        gates, cs = (_nan(T, B, 4 * H), _nan(T, B, H)) if lstm else (None, None)
        ia = (ctypes.c_int * 12)(T, B, H, cell, int(incl), int(rev), units, self.sms,
                                 _DT[x.dtype], int(tf32), csize, self.plant)
        fa = (ctypes.c_float * 6)(theta, w_ns, w_tar, w_ar, H * eps, 1.0)
        err = self.dll.emu_cluster_forward(ia, fa, _ptrs(x, w, h0, c0, mask, lengths, out, hn, cn,
                                                         norms, sums, hs, gates, cs))
        assert not err, err.decode()
        terms = sums.view(-1, 3).sum(0)
        return [out, hn, cn, terms, norms, hs, gates, cs]


def _use(monkeypatch, ext, units=0, csize=0):
    """Select the cluster variant (forward and backward) on the emulated extension."""
    monkeypatch.setattr(cuda, "_ext", ext)
    monkeypatch.setenv("RNNREG_CUDA_VARIANT", "cluster")
    monkeypatch.setenv("RNNREG_CUDA_CLUSTER_UNITS", str(units) if units else "")
    monkeypatch.setenv("RNNREG_CUDA_CLUSTER_SIZE", str(csize) if csize else "")
    monkeypatch.setenv("RNNREG_CUDA_UNITS", "")


def _ran(ext, n=1):
    """The cluster forward and the cluster backward both ran n times, with the same split."""
    assert len(ext.plans) == n, "the cluster forward did not run"
    assert len(ext.bwd_plans) == n, "the cluster backward did not run"
    for f, b in zip(ext.plans, ext.bwd_plans):
        assert (f["units"], f["csize"]) == (b["units"], b["csize"]), (f, b)


CLUSTER_CASES = [
    # cell, T, B, H, penalties, lengths, reverse, units per CTA (0 = default), emulated SMs
    ("lstm", 5, 3, 20, PEN_ALL, None, False, 8, 8),        # 2 clusters of 3 CTAs, bs 2 and 1
    ("lstm", 5, 3, 13, {"ns": 0.8}, [5, 2, 4], True, 8, 4),  # one cluster of 2, last CTA 5 units
    ("lstm", 1, 2, 12, {"tar": 1.0, "ar": 0.5, "mask": True}, None, True, 8, 4),  # T = 1
    ("relu", 7, 3, 5, PEN_ALL, [3, 7, 1], False, 0, 4),    # one CTA per cluster, 3 clusters
    ("relu", 4, 3, 40, {"tar": 1.1}, [1, 4, 3], True, 16, 8),  # 3 CTAs, last one 8 units
    ("tanh", 5, 5, 9, {"ar": 0.6, "mask": True}, None, True, 8, 4),
    ("tanh", 6, 3, 17, {"ns": 0.8, "incl": True}, [2, 6, 5], False, 8, 3),  # 3 CTAs, 1 unit
    ("trec", 4, 3, 24, PEN_ALL, None, False, 8, 6),
]
_IDS = [f"{c[0]}-T{c[1]}B{c[2]}H{c[3]}u{c[7]}" for c in CLUSTER_CASES]


@pytest.mark.parametrize("case", CLUSTER_CASES, ids=_IDS)
def test_emulated_cluster_matches_reference_float32(emu, case, monkeypatch):
    cell, T, B, H, pen, lengths, reverse, units, sms = case
    ext = EmulatedClusterExtension(emu, sms=sms)
    _use(monkeypatch, ext, units)
    spec, inp, mask, L, grads = make_case(cell, T, B, H, pen, lengths, reverse, seed=T * H + B)
    ref = run_backend(reference, spec, inp, mask, L, grads, torch.float64)
    got = run_backend(cuda, spec, inp, mask, L, grads, torch.float32)
    _ran(ext)
    errs = rel_errors(got, ref)
    print(case, ext.plans[0], ext.bwd_plans[0], {k: f"{v:.1e}" for k, v in errs.items()})
    assert all(e < 2e-5 for e in errs.values()), errs


def test_emulated_cluster_shapes_are_what_the_cases_claim(emu):
    """The cases above cover several CTAs per cluster, several clusters and short slices."""
    ext = EmulatedClusterExtension(emu, sms=8)
    err, p = ext.cluster_plan_info(0, 0, 3, 20, 8, 0)
    assert not err and (p["units"], p["csize"], p["clusters"], p["bs"]) == (8, 3, 2, 2), p
    ext.sms = 8
    err, p = ext.cluster_plan_info(1, 0, 3, 40, 16, 0)
    assert not err and (p["units"], p["csize"]) == (16, 3), p
    ext.sms = 4
    err, p = ext.cluster_plan_info(1, 0, 3, 5, 0, 0)
    assert not err and (p["units"], p["csize"], p["clusters"], p["bs"]) == (8, 1, 3, 1), p


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cell", ["lstm", "tanh"])
def test_emulated_cluster_half_within_naive_error(emu, cell, dtype, monkeypatch):
    ext = EmulatedClusterExtension(emu, sms=6)
    _use(monkeypatch, ext, units=8)
    spec, inp, mask, L, grads = make_case(cell, 6, 3, 19, PEN_ALL, [6, 2, 5], True, seed=3)
    rounded = {k: None if v is None else v.to(dtype).double() for k, v in inp.items()}
    mask_r = mask.to(dtype).double()
    ref = run_backend(reference, spec, rounded, mask_r, L, grads, torch.float64)
    got = rel_errors(run_backend(cuda, spec, rounded, mask_r, L, grads, dtype), ref)
    naive = rel_errors(run_backend(reference, spec, rounded, mask_r, L, grads, dtype), ref)
    _ran(ext)
    assert ext.plans[0]["csize"] == 3, ext.plans
    print(cell, dtype, {k: f"{got[k]:.1e}/{naive[k]:.1e}" for k in got})
    eps = torch.finfo(dtype).eps
    for k in got:
        assert got[k] <= 4 * naive[k] + eps / 4, (k, got[k], naive[k])


@pytest.mark.parametrize("cell,B,H", [("tanh", 20, 24), ("lstm", 18, 16)])
def test_emulated_cluster_half_wide_slice(emu, cell, B, H, monkeypatch):
    """bf16 with one cluster for the whole batch: three n8 tiles of batch rows (a pair, then
    an odd one), K split over the warps (tanh: one m16 tile of weights) or not (lstm: two)."""
    dtype = torch.bfloat16
    ext = EmulatedClusterExtension(emu, sms=-(-H // 8))
    _use(monkeypatch, ext, units=8)
    spec, inp, mask, L, grads = make_case(cell, 3, B, H, PEN_ALL, None, False, seed=B)
    rounded = {k: None if v is None else v.to(dtype).double() for k, v in inp.items()}
    mask_r = mask.to(dtype).double()
    ref = run_backend(reference, spec, rounded, mask_r, L, grads, torch.float64)
    got = rel_errors(run_backend(cuda, spec, rounded, mask_r, L, grads, dtype), ref)
    naive = rel_errors(run_backend(reference, spec, rounded, mask_r, L, grads, dtype), ref)
    _ran(ext)
    assert ext.plans[0]["clusters"] == 1 and ext.plans[0]["bs"] == B, ext.plans
    assert ext.bwd_plans[0]["clusters"] == 1 and ext.bwd_plans[0]["bs"] == B, ext.bwd_plans
    print(cell, {k: f"{got[k]:.1e}/{naive[k]:.1e}" for k in got})
    for k in got:
        assert got[k] <= 4 * naive[k] + torch.finfo(dtype).eps / 4, (k, got[k], naive[k])


def test_emulated_cluster_tf32(emu, monkeypatch):
    """float32 with Spec.allow_tf32: the cluster's step product runs on (emulated) TF32
    tensor cores: within TF32 accuracy, and measurably off the reference (the strict FFMA
    path is held to 2e-5 by test_emulated_cluster_matches_reference_float32)."""
    ext = EmulatedClusterExtension(emu, sms=6)
    _use(monkeypatch, ext, units=8)
    spec, inp, mask, L, grads = make_case("lstm", 3, 3, 16, PEN_ALL, [3, 1, 2], False, seed=9)
    ref = run_backend(reference, spec, inp, mask, L, grads, torch.float64)
    tf = rel_errors(run_backend(cuda, dataclasses.replace(spec, allow_tf32=True), inp, mask, L,
                                grads, torch.float32), ref)
    print(ext.plans, {k: f"{tf[k]:.1e}" for k in tf})
    _ran(ext)
    assert ext.plans[0]["csize"] == 2, ext.plans
    assert all(e < 5e-3 for e in tf.values()), tf
    assert tf["output"] > 1e-5, tf  # the TF32 path really ran


@pytest.fixture(scope="module")
def emu_planted(tmp_path_factory):
    """-DRNNREG_PLANT_CLUSTER: plant 1 drops each CTA's push of its own h slice into its own
    copy in the forward (the other CTAs still get it), plant 2 the same for dz in the
    backward."""
    return _build(tmp_path_factory.mktemp("emu_cluster_planted"), "RNNREG_PLANT_CLUSTER")


def _planted_errors(dll, plant, monkeypatch):
    ext = EmulatedClusterExtension(dll, sms=4, plant=plant)
    _use(monkeypatch, ext, units=8)
    spec, inp, mask, L, grads = make_case("relu", 4, 2, 16, {"tar": 0.5}, None, False, seed=1)
    ref = run_backend(reference, spec, inp, mask, L, grads, torch.float64)
    errs = rel_errors(run_backend(cuda, spec, inp, mask, L, grads, torch.float32), ref)
    _ran(ext)
    assert ext.plans[0]["csize"] == 2, ext.plans
    print(plant, errs)
    return errs


def test_planted_dsmem_error_fails_the_emulation(emu_planted, monkeypatch):
    errs = _planted_errors(emu_planted, 1, monkeypatch)
    assert errs["output"] > 1e-2 and errs["h_n"] > 1e-2, errs


def test_planted_backward_dsmem_error_fails_the_emulation(emu_planted, monkeypatch):
    """The planted backward exchange leaves the forward exact and breaks the gradients."""
    errs = _planted_errors(emu_planted, 2, monkeypatch)
    assert all(errs[k] < 2e-5 for k in ("output", "h_n", "terms", "norms")), errs
    assert errs["grad_x_proj"] > 1e-2 and errs["grad_h0"] > 1e-2, errs


# ----------------------------------------------------------------------------- backward

BWD_CASES = [
    # cell, T, B, H, penalties, lengths, reverse, units, emulated SMs: 4 CTAs per cluster (the
    # last with 5 / 3 units), grad_norms (the radial terms) on top of the penalties
    ("relu", 5, 3, 29, PEN_ALL, [5, 1, 3], False, 8, 8),      # 2 clusters, bs 2 and 1
    ("lstm", 4, 3, 27, {"ns": 0.6, "incl": True}, [4, 1, 3], True, 8, 4),  # one cluster
]


@pytest.mark.parametrize("case", BWD_CASES, ids=[f"{c[0]}-H{c[3]}" for c in BWD_CASES])
def test_emulated_cluster_backward_radial_terms_four_ctas(emu, case, monkeypatch):
    cell, T, B, H, pen, lengths, reverse, units, sms = case
    ext = EmulatedClusterExtension(emu, sms=sms)
    _use(monkeypatch, ext, units)
    spec, inp, mask, L, grads = make_case(cell, T, B, H, pen, lengths, reverse, seed=H,
                                          radial=True)
    assert grads["gn"] is not None
    ref = run_backend(reference, spec, inp, mask, L, grads, torch.float64)
    got = run_backend(cuda, spec, inp, mask, L, grads, torch.float32)
    _ran(ext)
    p = ext.bwd_plans[0]
    print(case, p, {k: f"{v:.1e}" for k, v in rel_errors(got, ref).items()})
    assert p["csize"] == 4 and p["clusters"] == (2 if cell == "relu" else 1), p
    errs = rel_errors(got, ref)
    assert all(e < 2e-5 for e in errs.values()), errs
    # grad_norms really entered: without it the gradients differ
    no_gn = dict(grads, gn=None)
    ref0 = run_backend(reference, spec, inp, mask, L, no_gn, torch.float64)
    assert rel_errors(ref0, ref)["grad_h0"] > 1e-3


def test_cluster_backward_refuses_what_the_variant_does_not_run(emu, monkeypatch):
    ext = EmulatedClusterExtension(emu, sms=4)
    _use(monkeypatch, ext, units=8)
    spec, inp, mask, L, grads = make_case("lstm", 2, 2, 8, {})
    z = torch.zeros(3, 2)
    args = [None] * 16
    for name, kw in (("cell_scale", dict(cell_scale=torch.ones(8))),
                     ("cell_norms", dict(cell_norms=z)),
                     ("grad_cell_norms", dict(grad_cell_norms=z))):
        call = dict(zip(("x_proj", "w_hh", "h0", "c0", "ar_mask", "lengths", "cell_scale",
                         "output", "norms", "cell_norms", "saved", "grad_output", "grad_h_n",
                         "grad_c_n", "grad_terms", "grad_norms"), args), **kw)
        with pytest.raises(ValueError, match=rf"{name}: expected None \(the cuda cluster "
                                             r"variant has no normprop cell"):
            cuda_cluster.backward(spec, **call)
    with pytest.raises(ValueError, match="cell: the cuda cluster variant runs the lstm, relu, "
                                         "tanh, trec cells, got 'normprop'"):
        cuda_cluster.backward(dataclasses.replace(spec, cell="normprop"), *args)
    assert not ext.bwd_plans  # nothing was launched


# ----------------------------------------------------------------------------- plan / switch

def test_emulated_cluster_plan_on_an_h100_like_device(emu):
    ext = EmulatedClusterExtension(emu, sms=H100[0], smem=H100[1])
    err, p = ext.cluster_plan_info(1, 1, 32, 1024, 0, 0)   # relu bf16 H=1024 B=32
    assert not err and (p["units"], p["csize"], p["clusters"], p["bs"]) == (64, 16, 8, 4), p
    err, p = ext.cluster_plan_info(0, 1, 32, 512, 0, 0)    # lstm bf16 H=512 B=32
    assert not err and (p["units"], p["csize"], p["clusters"], p["bs"]) == (32, 16, 8, 4), p
    err, p = ext.cluster_plan_info(1, 1, 32, 1024, 0, 8)   # portable clusters: 8 CTAs
    assert err and "H=1024" in err and "fit H <= " in err, err
    hmax = {}
    for cell, name in ((0, "lstm"), (1, "relu")):
        for dt, dname in ((1, "bf16"), (0, "fp32")):
            for cmax in (16, 8):
                hmax[name, dname, cmax] = emu.emu_cluster_max_hidden(cell, dt, 1, cmax, *H100)
    print("largest H per cluster (132 SMs, 227 KiB):", hmax)
    assert hmax["relu", "bf16", 16] >= 1024 and hmax["lstm", "bf16", 16] >= 512
    assert hmax["relu", "bf16", 8] < hmax["relu", "bf16", 16]
    assert hmax["lstm", "fp32", 16] < hmax["lstm", "bf16", 16]
    msg = ext.cluster_plan_info(0, 1, 32, 4096, 0, 0)[0]
    assert "H=4096" in msg and f"fit H <= {hmax['lstm', 'bf16', 16]}" in msg, msg


def test_emulated_cluster_backward_plan_on_an_h100_like_device(emu):
    """The backward keeps the forward's split (units, CTAs per cluster) and names the largest
    H its own layout fits when a case does not."""
    ext = EmulatedClusterExtension(emu, sms=H100[0], smem=H100[1])
    for cell, H in ((1, 1024), (0, 512)):
        err, p = ext.cluster_plan_info(cell, 1, 32, H, 0, 0, backward=True)
        assert not err and (p["units"], p["csize"], p["clusters"], p["bs"]) == (
            H // 16, 16, 8, 4), p
    hmax = {}
    for cell, name in ((0, "lstm"), (1, "relu")):
        for dt, dname in ((1, "bf16"), (0, "fp32")):
            for cmax in (16, 8):
                hmax[name, dname, cmax] = emu.emu_cluster_bwd_max_hidden(cell, dt, 1, cmax,
                                                                         *H100)
    print("largest H per cluster, backward (132 SMs, 227 KiB):", hmax)
    assert hmax["relu", "bf16", 16] >= 1024 and hmax["lstm", "bf16", 16] >= 512
    assert hmax["relu", "bf16", 8] < hmax["relu", "bf16", 16]
    assert hmax["lstm", "fp32", 16] < hmax["lstm", "bf16", 16]
    H = hmax["lstm", "bf16", 16] + 1
    msg = ext.cluster_plan_info(0, 1, 32, H, 0, 0, backward=True)[0]
    assert msg.startswith("the cluster variant's backward cannot keep w_hh in one cluster for "
                          f"cell=lstm, H={H}: "), msg
    assert f"fit H <= {hmax['lstm', 'bf16', 16]} in a cluster" in msg, msg


def test_variant_switch_is_opt_in_and_checked(emu, monkeypatch):
    ext = EmulatedClusterExtension(emu, sms=4)
    monkeypatch.setattr(cuda, "_ext", ext)
    monkeypatch.delenv("RNNREG_CUDA_VARIANT", raising=False)
    assert cuda_cluster.variant() == "persistent" and cuda._cluster() is None
    monkeypatch.setenv("RNNREG_CUDA_VARIANT", "clusterx")
    with pytest.raises(ValueError, match="RNNREG_CUDA_VARIANT: expected one of persistent, "
                                         "cluster, got 'clusterx'"):
        cuda_cluster.variant()
    _use(monkeypatch, ext)
    spec, inp, *_ = make_case("lstm", 3, 2, 16, PEN_ALL)
    x, w = inp["x"].float(), inp["w"].float()
    assert cuda.unsupported_reason(spec, x, w) is None
    big = torch.zeros(4 * 4096, 4096, dtype=torch.bfloat16)
    why = cuda.unsupported_reason(spec, torch.zeros(3, 2, 4 * 4096, dtype=torch.bfloat16), big)
    assert why and "cluster variant" in why and "H=4096" in why, why
    assert "normprop" in cuda_cluster.unsupported_reason(
        dataclasses.replace(spec, cell="normprop"), x, w)
    if "cell_norms" in {f.name for f in dataclasses.fields(spec)}:
        assert "cell_norms" in cuda.unsupported_reason(
            dataclasses.replace(spec, cell_norms=True), x, w)
    assert "float64" in cuda.unsupported_reason(spec, x.double(), w.double())
    # an H the forward fits and the backward does not (fp32 lstm on an H100-like device): the
    # backward's reason, with the largest H it fits
    ext.sms = H100[0]
    fmax = emu.emu_cluster_max_hidden(0, 0, 1, 16, *H100)
    bmax = emu.emu_cluster_bwd_max_hidden(0, 0, 1, 16, *H100)
    assert bmax < fmax, (bmax, fmax)
    H = bmax + 1
    why = cuda.unsupported_reason(spec, torch.zeros(3, 2, 4 * H), torch.zeros(4 * H, H))
    assert why.startswith(f"the cluster variant's backward cannot keep w_hh in one cluster for "
                          f"cell=lstm, H={H}: ") and f"fit H <= {bmax} in a cluster" in why, why
    ext.sms = 4
    monkeypatch.setenv("RNNREG_CUDA_CLUSTER_SIZE", "17")
    with pytest.raises(ValueError, match="RNNREG_CUDA_CLUSTER_SIZE: expected an integer in "
                                         "1..16, got '17'"):
        cuda.unsupported_reason(spec, x, w)


# ----------------------------------------------------------------------------- static profile

# instructions per warp per step of the cluster forward by the static profile (nvcc 13.0,
# sm_90a, 132 SMs, B=32 bf16; the instantiation of the cell: before the cell became a template
# parameter, every cell's code counted: relu 1478, lstm 1430): the gate allows +10 %.  Update
# with an intended kernel change.
CLUSTER_PROFILE_BASELINE = {("relu", 1024): 1247, ("lstm", 512): 1369}
# the same for the cluster backward (csrc/cluster_backward.cu)
CLUSTER_BWD_PROFILE_BASELINE = {("relu", 1024): 1410, ("lstm", 512): 1734}


@pytest.mark.parametrize("cell,H", sorted(CLUSTER_PROFILE_BASELINE))
def test_static_profile_of_the_cluster_kernels(cell, H):
    if _nvcc() is None or _cuobjdump() is None:
        pytest.skip("nvcc and cuobjdump / nvdisasm (triton wheel) are needed for the profile")
    from rnnreg_kernels import profile
    res = profile.profile("cuda", cell, H, 32, "bf16", variant="cluster")
    assert not res["errors"], res["errors"]
    fwd = next(k for k in res["kernels"] if k["direction"] == "forward")
    bwd = next(k for k in res["kernels"] if k["direction"] == "backward")
    assert fwd["name"] == "cluster_forward_kernel" and bwd["name"] == "cluster_backward_kernel"
    version = subprocess.run([_nvcc(), "--version"], capture_output=True, text=True).stdout
    for rec, baseline in ((fwd, CLUSTER_PROFILE_BASELINE), (bwd, CLUSTER_BWD_PROFILE_BASELINE)):
        print(cell, H, rec["name"], rec["plan"], rec["instructions_per_warp_per_step"],
              rec["estimated_us_per_step"], rec["estimate"]["cycles"])
        assert rec["plan"]["csize"] == 16 and rec["plan"]["clusters"] == 8, rec["plan"]
        assert rec["spill_bytes"] == 0 and rec["opcodes_per_step"].get("STL", 0) == 0
        assert rec["tensor_core_ops_per_step"] > 0, "no HMMA in the cluster step product"
        assert rec["cluster_barriers_per_step"] == 1 and rec["grid_barriers_per_step"] == 0
        assert rec["dsmem_store_bytes_per_step"] > 0
        assert rec["estimate"]["cycles"]["cluster_barriers"] > 0
        assert not rec["unweighted_loops"], rec["unweighted_loops"]  # every step loop counted
        if "release 13.0" in version:
            base = baseline[cell, H]
            assert rec["instructions_per_warp_per_step"] <= 1.1 * base, (
                rec["name"], rec["instructions_per_warp_per_step"], base)


def test_profile_variant_is_checked():
    from rnnreg_kernels import profile
    with pytest.raises(ValueError, match="variant: 'cluster' exists for --backend cuda only"):
        profile.profile("triton", "relu", 64, 4, "bf16", variant="cluster")
    with pytest.raises(ValueError, match="variant: expected one of persistent, cluster"):
        profile.profile("cuda", "relu", 64, 4, "bf16", variant="wgmma")
