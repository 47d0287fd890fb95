"""The Hopper cluster variant of the cuda forward (csrc/cluster.cu) without a GPU.

* ``cluster.cu`` compiles for sm_90a with plain nvcc (torch's extension flags), no spills; its
  SASS has the tensor-core step product (HMMA), the cluster barrier (UCGABAR_ARV / _WAIT) and
  the 16-byte distributed-shared-memory stores; the sm_80 pass of an "8.0;9.0" build compiles
  (the kernel body is sm_90-only); ``cluster_binding.cpp`` passes ``g++ -fsyntax-only``;
* the kernel runs on the CPU emulation of clusters (csrc/emu/emu_cluster.h: one barrier per
  cluster, DSMEM as bounds-checked pointers into the other blocks' shared memory) through
  ``rnnreg_kernels.cuda.forward`` with ``RNNREG_CUDA_VARIANT=cluster`` and is compared with the
  float64 reference, forward and (through the persistent backward it feeds) backward;
* a planted error in the DSMEM exchange fails; the plan and the opt-in switch.
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


def test_cluster_compiles_for_sm90a_without_spills(tmp_path):
    """sm_90a (-gencode, as HOPPER.md advises) next to the sm_80 pass of torch's default
    "8.0;9.0" arch list, whose kernel body is empty (clusters need sm_90)."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME); the sm_90a compile check needs it")
    cmd = [nvcc, "-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80",
           "-O3", "-std=c++17", "-Xptxas", "-v", *TORCH_NVCC_FLAGS, "-c",
           str(CSRC / "cluster.cu"), "-o", str(tmp_path / "k.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    log = res.stdout + res.stderr
    assert res.returncode == 0, f"nvcc failed for cluster.cu:\n{log[-4000:]}"
    # ptxas -v: "Compiling entry function 'NAME' for 'sm_90a'", then its spills and registers
    blocks = re.findall(r"Compiling entry function '(\S+)' for '(sm_\w+)'(.*?)(?=Compiling entry|$)",
                        log, re.S)
    hopper = [(name, body) for name, arch, body in blocks if arch == "sm_90a"]
    for name, body in hopper:
        regs = re.search(r"Used (\d+) registers", body)
        print(f"cluster.cu sm_90a: {name}: {regs.group(1) if regs else '?'} registers; "
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
                               "emu_cluster_forward"), tf32=False)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("emu_cluster"))


class EmulatedClusterExtension(EmulatedExtension):
    """EmulatedExtension plus the cluster entry points of cluster_binding.cpp (same
    signatures; NaN-poisoned outputs; ``sms`` / ``smem`` describe the emulated device)."""

    def __init__(self, dll, sms=8, smem=H100[1]):
        super().__init__(dll, sms)
        self.smem = smem
        self.plans = []

    def cluster_plan_info(self, cell, dtype, B, H, units, csize):
        out = (ctypes.c_longlong * 5)()
        err = self.dll.emu_cluster_plan(cell, dtype, B, H, units, csize, self.sms, self.smem, out)
        return err.decode(), dict(zip(("units", "csize", "clusters", "bs", "smem"), out))

    def cluster_plan(self, cell, dtype, B, H, device, units=0, csize=0):
        return self.cluster_plan_info(cell, dtype, B, H, units, csize)[0]

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
        ia = (ctypes.c_int * 11)(T, B, H, cell, int(incl), int(rev), units, self.sms,
                                 _DT[x.dtype], int(tf32), csize)
        fa = (ctypes.c_float * 5)(theta, w_ns, w_tar, w_ar, H * eps)
        err = self.dll.emu_cluster_forward(ia, fa, _ptrs(x, w, h0, c0, mask, lengths, out, hn, cn,
                                                         norms, sums, hs, gates, cs))
        assert not err, err.decode()
        terms = sums.view(-1, 3).sum(0)
        return [out, hn, cn, terms, norms, hs, gates, cs]


def _use(monkeypatch, ext, units=0, csize=0, bwd_units=0):
    """Select the cluster variant on the emulated extension; ``bwd_units`` splits the
    persistent backward that follows (its own tests cover its splits: fewer emulated blocks
    here keep the test cheap)."""
    monkeypatch.setattr(cuda, "_ext", ext)
    monkeypatch.setenv("RNNREG_CUDA_VARIANT", "cluster")
    monkeypatch.setenv("RNNREG_CUDA_CLUSTER_UNITS", str(units) if units else "")
    monkeypatch.setenv("RNNREG_CUDA_CLUSTER_SIZE", str(csize) if csize else "")
    monkeypatch.setenv("RNNREG_CUDA_UNITS", str(bwd_units) if bwd_units else "")


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
    _use(monkeypatch, ext, units, bwd_units=-(-H // 2))
    spec, inp, mask, L, grads = make_case(cell, T, B, H, pen, lengths, reverse, seed=T * H + B)
    ref = run_backend(reference, spec, inp, mask, L, grads, torch.float64)
    got = run_backend(cuda, spec, inp, mask, L, grads, torch.float32)
    assert len(ext.plans) == 1, "the cluster forward did not run"
    errs = rel_errors(got, ref)
    print(case, ext.plans[0], {k: f"{v:.1e}" for k, v in errs.items()})
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
    _use(monkeypatch, ext, units=8, bwd_units=10)
    spec, inp, mask, L, grads = make_case(cell, 6, 3, 19, PEN_ALL, [6, 2, 5], True, seed=3)
    rounded = {k: None if v is None else v.to(dtype).double() for k, v in inp.items()}
    mask_r = mask.to(dtype).double()
    ref = run_backend(reference, spec, rounded, mask_r, L, grads, torch.float64)
    got = rel_errors(run_backend(cuda, spec, rounded, mask_r, L, grads, dtype), ref)
    naive = rel_errors(run_backend(reference, spec, rounded, mask_r, L, grads, dtype), ref)
    assert ext.plans and ext.plans[0]["csize"] == 3, ext.plans
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
    _use(monkeypatch, ext, units=8, bwd_units=H)
    spec, inp, mask, L, grads = make_case(cell, 3, B, H, PEN_ALL, None, False, seed=B)
    rounded = {k: None if v is None else v.to(dtype).double() for k, v in inp.items()}
    mask_r = mask.to(dtype).double()
    ref = run_backend(reference, spec, rounded, mask_r, L, grads, torch.float64)
    got = rel_errors(run_backend(cuda, spec, rounded, mask_r, L, grads, dtype), ref)
    naive = rel_errors(run_backend(reference, spec, rounded, mask_r, L, grads, dtype), ref)
    assert ext.plans[0]["clusters"] == 1 and ext.plans[0]["bs"] == B, ext.plans
    print(cell, {k: f"{got[k]:.1e}/{naive[k]:.1e}" for k in got})
    for k in got:
        assert got[k] <= 4 * naive[k] + torch.finfo(dtype).eps / 4, (k, got[k], naive[k])


def test_emulated_cluster_tf32(emu, monkeypatch):
    """float32 with Spec.allow_tf32: the cluster's step product runs on (emulated) TF32
    tensor cores: within TF32 accuracy, and measurably off the reference (the strict FFMA
    path is held to 2e-5 by test_emulated_cluster_matches_reference_float32)."""
    ext = EmulatedClusterExtension(emu, sms=6)
    _use(monkeypatch, ext, units=8, bwd_units=8)
    spec, inp, mask, L, grads = make_case("lstm", 3, 3, 16, PEN_ALL, [3, 1, 2], False, seed=9)
    ref = run_backend(reference, spec, inp, mask, L, grads, torch.float64)
    tf = rel_errors(run_backend(cuda, dataclasses.replace(spec, allow_tf32=True), inp, mask, L,
                                grads, torch.float32), ref)
    print(ext.plans, {k: f"{tf[k]:.1e}" for k in tf})
    assert ext.plans and ext.plans[0]["csize"] == 2, ext.plans
    assert all(e < 5e-3 for e in tf.values()), tf
    assert tf["output"] > 1e-5, tf  # the TF32 path really ran


def test_planted_dsmem_error_fails_the_emulation(tmp_path, monkeypatch):
    """-DRNNREG_PLANT_CLUSTER drops each CTA's push of its own h slice into its own copy (the
    other CTAs still get it): the float32 comparison must fail on the output."""
    dll = _build(tmp_path, "RNNREG_PLANT_CLUSTER")
    ext = EmulatedClusterExtension(dll, sms=4)
    _use(monkeypatch, ext, units=8, bwd_units=16)
    spec, inp, mask, L, grads = make_case("relu", 4, 2, 16, {"tar": 0.5}, None, False, seed=1)
    ref = run_backend(reference, spec, inp, mask, L, grads, torch.float64)
    errs = rel_errors(run_backend(cuda, spec, inp, mask, L, grads, torch.float32), ref)
    print(errs)
    assert errs["output"] > 1e-2 and errs["h_n"] > 1e-2, errs


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


@pytest.mark.parametrize("cell,H", sorted(CLUSTER_PROFILE_BASELINE))
def test_static_profile_of_the_cluster_forward(cell, H):
    if _nvcc() is None or _cuobjdump() is None:
        pytest.skip("nvcc and cuobjdump / nvdisasm (triton wheel) are needed for the profile")
    from rnnreg_kernels import profile
    res = profile.profile("cuda", cell, H, 32, "bf16", variant="cluster")
    assert not res["errors"], res["errors"]
    fwd = next(k for k in res["kernels"] if k["direction"] == "forward")
    bwd = next(k for k in res["kernels"] if k["direction"] == "backward")
    print(cell, H, fwd["plan"], fwd["instructions_per_warp_per_step"],
          fwd["estimated_us_per_step"], fwd["estimate"]["cycles"])
    assert fwd["name"] == "cluster_forward_kernel" and bwd["name"] == "backward_kernel"
    assert fwd["plan"]["csize"] == 16 and fwd["plan"]["clusters"] == 8, fwd["plan"]
    assert fwd["spill_bytes"] == 0 and fwd["opcodes_per_step"].get("STL", 0) == 0
    assert fwd["tensor_core_ops_per_step"] > 0, "no HMMA in the cluster step product"
    assert fwd["cluster_barriers_per_step"] == 1 and fwd["grid_barriers_per_step"] == 0
    assert fwd["dsmem_store_bytes_per_step"] > 0
    assert fwd["estimate"]["cycles"]["cluster_barriers"] > 0
    assert not fwd["unweighted_loops"], fwd["unweighted_loops"]  # every step loop has a count
    version = subprocess.run([_nvcc(), "--version"], capture_output=True, text=True).stdout
    if "release 13.0" in version:
        base = CLUSTER_PROFILE_BASELINE[cell, H]
        assert fwd["instructions_per_warp_per_step"] <= 1.1 * base, (
            fwd["instructions_per_warp_per_step"], base)


def test_profile_variant_is_checked():
    from rnnreg_kernels import profile
    with pytest.raises(ValueError, match="variant: 'cluster' exists for --backend cuda only"):
        profile.profile("triton", "relu", 64, 4, "bf16", variant="cluster")
    with pytest.raises(ValueError, match="variant: expected one of persistent, cluster"):
        profile.profile("cuda", "relu", 64, 4, "bf16", variant="wgmma")
