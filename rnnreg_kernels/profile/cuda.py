"""CUDA half of the static profile: the ``csrc/`` kernels compiled for sm_90 with nvcc, no GPU.

The kernel sources are torch-free, so ``nvcc -arch=sm_90 -cubin -O3 -lineinfo`` compiles
``forward.cu`` and ``backward.cu`` as they are (the cubin holds the float32, float16 and
bfloat16 instantiations; the profile picks the dtype's).  The plan is the one
``csrc/plan.cu`` makes, replicated here for a device with ``sm_count`` SMs and the H100's
227 KiB of opt-in shared memory per block (``SMEM_OPTIN``): units per block
``max(ceil(H / SMs), ceil(kRG / G))``, blocks ``ceil(H / units)``, and the largest batch tile
whose shared-memory layout (``fwd_layout`` / ``bwd_layout`` of ``common.cuh``: rows of
``srow(K) = round16(K) + 8`` elements for bf16/fp16, ``+ 4`` for fp32, and the reduction
scratch of the tensor-core product) fits.  The occupancy check (one block per SM) is not
repeated: it needs the driver.  Constants (``kThreads``, ``kVec``, ``kRG``, ``kBG``,
``kAccTiles``) are read from ``common.cuh``.

Loop trip counts inside the time loop come from each loop's ``for (...)`` header (found through
the SASS line information), evaluated with the plan's values for thread 0 / warp 0 / block 0
(the thread with the most iterations); the locals of ``stage_rows`` (which of its three copy
loops runs), ``block_mma`` (bf16/fp16: which tile-group loop runs, K steps per warp) and
``block_matvec`` (strict fp32) are derived from the arguments each kernel passes.  Loops of a
path not taken have a bound of 0 in the source, so they weigh nothing here.  The cell is a
template parameter of the kernels (one instantiation for the 4-gate cells lstm / normprop, one
for the RNN cells relu / tanh / trec, whose activation is a run-time branch): the profile reads
the instantiation of the profiled cell (:func:`template_args`), so only its code is counted.

This file is the CUDA backend's only coupling to the profile: when ``csrc/`` changes, adapt
:func:`plan`, :func:`_namespace` and :data:`KERNELS` here.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from typing import Dict, List, Optional

from ..contract import gates_of, has_cell_state
from . import sass

SMEM_OPTIN = 232448          # bytes: cudaDevAttrMaxSharedMemoryPerBlockOptin of H100 / H200
DTYPE_CODE = {"fp32": 0, "bf16": 1, "fp16": 2}
DTYPE_SIZE = {"fp32": 4, "bf16": 2, "fp16": 2}
TEMPLATE_ARG = {"fp32": "IfE", "fp16": "I6__halfE", "bf16": "I13__nv_bfloat16E"}


def template_args(dtype: str, cell: str, *ints: int) -> str:
    """The mangled template-argument list of the kernel instantiation for (dtype, cell):
    ``<T, ints..., Gated>`` (``Gated``: the 4-gate cells, lstm and normprop; the host dispatch
    of forward_kernel_ptr / backward_kernel_ptr / cluster_forward_kernel_ptr)."""
    return (TEMPLATE_ARG[dtype][:-1] + "".join(f"Li{i}E" for i in ints)
            + f"Lb{int(has_cell_state(cell))}E" + "E")
KERNELS = {"forward": ("forward.cu", "forward_kernel"),
           "backward": ("backward.cu", "backward_kernel")}
NVCC_FLAGS = ["-arch=sm_90", "-cubin", "-O3", "-lineinfo"]


def csrc_dir() -> str:
    from ..cuda import sources_dir
    d = sources_dir()
    if d is None:
        raise FileNotFoundError("the csrc/ kernel sources are not found next to the package")
    return str(d)


@functools.lru_cache(maxsize=None)
def constants() -> Dict[str, int]:
    """kThreads, kWarps, kVec, kRG, kBG, kRedFloats as ``common.cuh`` defines them."""
    text = open(os.path.join(csrc_dir(), "common.cuh")).read()
    def grab(pattern, default=None):
        m = re.search(pattern, text)
        if m is None:
            if default is None:
                raise ValueError(f"common.cuh: {pattern!r} not found (adapt "
                                 f"rnnreg_kernels/profile/cuda.py to the new kernels)")
            return default
        return int(m.group(1))
    c = {"kThreads": grab(r"#define RNNREG_THREADS (\d+)"),
         "kVec": grab(r"constexpr int kVec = (\d+);"),
         "kRG": grab(r"constexpr int kRG = (\d+);"),
         "kBG": grab(r"constexpr int kBG = (\d+);"),
         "kAccTiles": grab(r"constexpr int kAccTiles = (\d+);")}
    c["kWarps"] = c["kThreads"] // 32
    c["kRedFloats"] = c["kWarps"] * c["kRG"] * c["kBG"]
    c["kMmaRedFloats"] = c["kWarps"] * c["kAccTiles"] * 128
    return c


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _align16(x: int) -> int:
    return (x + 15) // 16 * 16


def xrow(K: int) -> int:
    """Exchange row length (elements) of common.cuh's ``xrow``."""
    return _round_up(K, 16)


def srow(K: int, es: int) -> int:
    """Shared-memory row stride (elements) of common.cuh's ``srow``."""
    return xrow(K) + (8 if es == 2 else 4)


def _layout_total(direction: str, G: int, H: int, units: int, bs: int, es: int) -> int:
    k = constants()
    red_floats = max(k["kMmaRedFloats"], k["kRedFloats"])
    if direction == "forward":
        ld, R = srow(H, es), G * units
        a = _align16(R * ld * es)
        z = _align16(a + bs * ld * es)
        hn = _align16(z + bs * R * 4)
        red = _align16(hn + bs * units * 4)
    else:
        ld = srow(G * H, es)
        a = _align16(units * ld * es)
        z = _align16(a + bs * ld * es)
        red = _align16(z + bs * units * 4)
    return _align16(red + red_floats * 4)


def _largest_tile(direction, G, H, units, B, es, limit) -> int:
    if _layout_total(direction, G, H, units, 1, es) > limit:
        return 0
    bs = B
    while bs > 1 and _layout_total(direction, G, H, units, bs, es) > limit:
        bs -= 1
    return bs


def plan(cell: str, B: int, H: int, dtype: str, sm_count: int) -> dict:
    """The plan ``csrc/plan.cu`` would make on an H100/H200-like device with ``sm_count`` SMs."""
    if dtype not in DTYPE_CODE:
        raise ValueError(f"dtype: the cuda backend supports fp32, bf16 and fp16, got {dtype!r}")
    G = gates_of(cell)
    k = constants()
    units = max(-(-H // sm_count), -(-k["kRG"] // G))
    units = min(units, H)
    blocks = -(-H // units)
    es = DTYPE_SIZE[dtype]
    bs_f = _largest_tile("forward", G, H, units, B, es, SMEM_OPTIN)
    bs_b = _largest_tile("backward", G, H, units, B, es, SMEM_OPTIN)
    if bs_f == 0 or bs_b == 0:
        raise ValueError(f"the cuda backend cannot keep w_hh on chip for cell={cell}, H={H}, "
                         f"dtype={dtype}: a {units}-unit slice needs more than "
                         f"{SMEM_OPTIN // 1024} KiB of shared memory per block")
    return {"variant": "persistent-cooperative", "units": units, "blocks": blocks,
            "bs_fwd": bs_f, "bs_bwd": bs_b,
            "smem_fwd": _layout_total("forward", G, H, units, bs_f, es),
            "smem_bwd": _layout_total("backward", G, H, units, bs_b, es),
            "threads": k["kThreads"]}


# ----------------------------------------------------------------------------- compile

_CACHE: Dict[str, bytes] = {}


def compile_cubins(directions=("forward", "backward")) -> Dict[str, bytes]:
    """``{direction: cubin}``, compiled in parallel (cached per source content)."""
    src = csrc_dir()
    nvcc = _nvcc()
    digest = hashlib.sha256()
    for name in sorted(os.listdir(src)):
        if name.endswith((".cu", ".cuh", ".h")):
            with open(os.path.join(src, name), "rb") as f:
                digest.update(name.encode() + f.read())
    key = digest.hexdigest()[:16]
    todo = [d for d in directions if f"{key}:{d}" not in _CACHE]
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for d in todo:
            out = os.path.join(tmp, d + ".cubin")
            cmd = [nvcc, *NVCC_FLAGS, "-I", src, "-o", out, os.path.join(src, KERNELS[d][0])]
            procs.append((d, out, cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                        stderr=subprocess.PIPE, text=True)))
        for d, out, cmd, p in procs:
            _, err = p.communicate(timeout=900)
            if p.returncode != 0:
                raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{err[-3000:]}")
            with open(out, "rb") as f:
                _CACHE[f"{key}:{d}"] = f.read()
    return {d: _CACHE[f"{key}:{d}"] for d in directions}


def _nvcc() -> str:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    cand = os.path.join(home, "bin", "nvcc")
    if os.path.exists(cand):
        return cand
    found = shutil.which("nvcc")
    if found is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME to a CUDA toolkit)")
    return found


def _nvcc_version() -> Optional[str]:
    try:
        out = subprocess.run([_nvcc(), "--version"], capture_output=True, text=True).stdout
    except (OSError, FileNotFoundError):
        return None
    m = re.search(r"release ([\d.]+)", out)
    return m.group(1) if m else None


# ----------------------------------------------------------------------------- trip counts

def _matvec(R: int, NB: int, Kp: int) -> Dict[str, int]:
    k = constants()
    rgroups, bgroups = -(-R // k["kRG"]), -(-NB // k["kBG"])
    items = rgroups * bgroups
    nchunks = Kp // k["kVec"]
    ksplit = max(1, k["kWarps"] // items)
    ksplit = min(ksplit, -(-nchunks // 32))
    return {"R": R, "NB": NB, "Kp": Kp, "rgroups": rgroups, "bgroups": bgroups,
            "items": items, "nchunks": nchunks, "ksplit": ksplit, "work": items * ksplit,
            "ks": 0}


def _staging(nb: int, cpr: int) -> Dict[str, int]:
    """stage_rows' locals for thread 0: which of its three copy loops runs."""
    k = constants()
    dbl = k["kThreads"] // cpr
    dc = k["kThreads"] - dbl * cpr
    return {"cpr": cpr, "dbl": dbl, "dc": dc, "rows_fixed": nb if dc == 0 else 0,
            "rows_wide": nb if dc != 0 and cpr % k["kThreads"] == 0 else 0,
            "chunks_any": nb * cpr if dc != 0 and cpr % k["kThreads"] != 0 else 0}


def _mma(M: int, N: int, Kx: int, ks_per_mma: int) -> Dict[str, int]:
    """block_mma's locals for warp 0 (bf16/fp16: 16-wide K steps)."""
    k = constants()
    ksteps = Kx // ks_per_mma
    nw = min(ksteps, k["kWarps"])
    MT, NT = -(-M // 16), -(-N // 8)
    ntg = 4 if NT >= 4 else 1
    return {"M": M, "N": N, "Kp": Kx, "MT": MT, "NT": NT, "ksteps": ksteps, "nw": nw,
            "mtg": 2, "ntg": ntg, "kr": 1 if ntg == 4 else 4, "tiles": 2 * ntg,
            "ks_wide": ksteps if ntg == 4 else 0, "ks_tall": ksteps if ntg == 1 else 0}


def _namespace(direction: str, cell: str, B: int, H: int, p: dict,
               dtype: str = "bf16") -> Dict[str, Dict]:
    """Values for the loop headers, per source file (stage_rows' / block_mma's /
    block_matvec's locals in common.cuh)."""
    k = constants()
    G = gates_of(cell)
    es = DTYPE_SIZE[dtype]
    units = p["units"]
    bs = p["bs_fwd"] if direction == "forward" else p["bs_bwd"]
    nb = min(bs, B)
    nu = min(units, H)
    base = dict(k, B=B, H=H, G=G, GH=G * H, units=units, bs=bs, nb=nb, nu=nu, blk=0,
                nblk=p["blocks"], j0=0, tid=0, warp=0, lane=0, b0=0, T_=None, k=None)
    base["threadIdx.x"] = 0
    K = H if direction == "forward" else G * H
    Kx, ld = xrow(K), srow(K, es)
    N = G * units if direction == "forward" else nu
    seg = nb * nu <= k["kThreads"] and nu <= 32 and (nu & (nu - 1)) == 0
    base.update(Hx=Kx, Kx=Kx, ld=ld, R=G * units, nb_slow=0 if seg else nb,
                Hp=_round_up(H, k["kVec"]))  # (the padded row of the earlier kernels)
    if es == 2:
        prod = _mma(nb, N, Kx, 16)
    else:  # strict fp32: block_matvec (the profile runs fp32 without TF32)
        prod = _matvec(N, nb, ld)
    kernel = dict(base)
    common = dict(base, **_staging(nb, Kx * es // 16), **prod)
    return {"forward.cu": kernel, "backward.cu": kernel, "common.cuh": common}


_FOR = re.compile(r"for\s*\(\s*(?:const\s+)?(?:int|long long|size_t|unsigned)?\s*(\w+)\s*=\s*"
                  r"([^;]*);\s*([^;]*);\s*([^)]*)\)")


def _c_eval(expr: str, env: dict) -> int:
    e = expr.strip()
    e = re.sub(r"\((?:size_t|int|long long|unsigned)\)", "", e)
    e = e.replace("threadIdx.x", "threadIdx_x").replace("&&", " and ").replace("||", " or ")
    e = re.sub(r"(?<![/])/(?![/])", "//", e)
    names = {k.replace(".", "_"): v for k, v in env.items()}
    for tok in re.findall(r"[A-Za-z_]\w*", e):
        if tok in ("min", "max", "and", "or"):
            continue
        if tok not in names or names[tok] is None:
            raise KeyError(tok)
    return int(eval(e, {"__builtins__": {}, "min": min, "max": max}, names))  # noqa: S307


def trip_rule(direction: str, cell: str, B: int, H: int, p: dict, dtype: str = "bf16",
              spaces: Optional[Dict[str, Dict]] = None):
    if spaces is None:
        spaces = _namespace(direction, cell, B, H, p, dtype)

    def trip_of(fn, loop):
        st = sass.loop_statement(fn, loop)
        if st is None:
            return None, "no for/while statement found in the line information"
        path, line, text = st
        where = f"{os.path.basename(path)}:{line} `{text}`"
        m = _FOR.search(text)
        if m is None:
            return None, f"{where}: not a counted for loop"
        var, init, cond, inc = (g.strip() for g in m.groups())
        env = spaces.get(os.path.basename(path), spaces["forward.cu"])
        cm = re.match(rf"{var}\s*(<=|<|>=|>)\s*(.+)$", cond)
        if not cond or cm is None:
            return None, f"{where}: the exit is not a simple bound"
        if re.match(rf"(\+\+{var}|{var}\+\+)$", inc):
            step = 1
        elif re.match(rf"(--{var}|{var}--)$", inc):
            step = -1
        else:
            im = re.match(rf"{var}\s*(\+=|-=)\s*(.+)$", inc)
            if im is None:
                return None, f"{where}: the increment is not simple"
            try:
                step = _c_eval(im.group(2), env) * (1 if im.group(1) == "+=" else -1)
            except (KeyError, SyntaxError, ZeroDivisionError) as e:
                return None, f"{where}: {e} is not known from the plan"
        try:
            start = _c_eval(init, env)
            bound = _c_eval(cm.group(2), env)
        except (KeyError, SyntaxError, ZeroDivisionError) as e:
            return None, f"{where}: {e} is not known from the plan"
        op = cm.group(1)
        if step > 0 and op in ("<", "<="):
            span = bound - start + (1 if op == "<=" else 0)
            n = max(0, -(-span // step))
        elif step < 0 and op in (">", ">="):
            span = start - bound + (1 if op == ">=" else 0)
            n = max(0, -(-span // -step))
        else:
            return None, f"{where}: the loop does not move toward its bound"
        return n, f"{where} for thread 0 with the plan's values: {n} iterations"
    return trip_of


# ----------------------------------------------------------------------------- kernels

def kernels(cell: str, H: int, B: int, dtype: str, tf32: bool, sm_count: int,
            workers: int = 2, variant: str = "persistent") -> List[dict]:
    """The forward and backward kernels of the plan: items for ``kernel_record``."""
    if variant == "cluster":
        return cluster_kernels(cell, H, B, dtype, sm_count)
    p = plan(cell, B, H, dtype, sm_count)
    cubins = compile_cubins()
    k = constants()
    out = []
    for direction, (_, kname) in KERNELS.items():
        cubin = cubins[direction]
        text = sass.disassemble(cubin)
        wanted = template_args(dtype, cell)
        names = [f for f in sass.split_functions(text) if kname in f and wanted in f]
        if len(names) != 1:
            out.append({"direction": direction,
                        "error": f"{kname}<{dtype}, gated={has_cell_state(cell)}> not found "
                                 f"in the cubin ({wanted})"})
            continue
        smem = p["smem_fwd"] if direction == "forward" else p["smem_bwd"]
        out.append({"record_args": dict(
            name=kname, direction=direction, plan=dict(p), cubin=cubin,
            warps=k["kWarps"], shared_dynamic=smem, programs=p["blocks"],
            trip_of=trip_rule(direction, cell, B, H, p, dtype), function=names[0],
            sass_text=text,
            extra={"grid": [p["blocks"]],
                   "instantiation": names[0],
                   "note": "the instantiation of this cell (4-gate lstm/normprop or the RNN "
                           "cells relu/tanh/trec, activation picked at run time)"})})
    return out


def versions() -> dict:
    import torch
    v = {"torch": torch.__version__, "nvcc": _nvcc_version(),
         "compile": "nvcc " + " ".join(NVCC_FLAGS)}
    try:
        v["nvdisasm"] = sass.tool("nvdisasm")
    except FileNotFoundError:
        pass
    return v


# ----------------------------------------------------------------------------- cluster variant
# The Hopper cluster forward (csrc/cluster.cu, opt-in: RNNREG_CUDA_VARIANT=cluster) compiled
# for sm_90a (its backward, cluster_backward.cu, is below).  Its plan is the one cluster.cu makes:
# units per CTA round8(ceil(H / 16)), csize = ceil(H / units) CTAs per cluster (up to 16, the
# non-portable maximum), CLUSTERS_PER_GPU(csize) clusters at once (one CTA per SM; the driver's
# cudaOccupancyMaxActiveClusters may be lower where GPC boundaries cut SMs off), batch slices of
# ceil(B / clusters) rows, shrunk until cluster_layout fits SMEM_OPTIN.

CLUSTER_NVCC_FLAGS = ["-gencode=arch=compute_90a,code=sm_90a", "-cubin", "-O3", "-lineinfo"]
CLUSTER_MAX = 16


def _cluster_layout_total(G: int, H: int, units: int, bs: int, es: int) -> int:
    """cluster_layout(...).total of csrc/cluster.cu."""
    k = constants()
    ld, R, u = srow(H, es), G * units, units
    hx = _align16(R * ld * es)
    z = _align16(hx + 2 * bs * ld * es)
    hl = _align16(z + bs * R * 4)
    hf = _align16(hl + bs * u * es)
    cf = _align16(hf + bs * u * 4)
    gs = _align16(cf + (bs * u * 4 if G == 4 else 0))
    sq = _align16(gs + (bs * 4 * u * 4 if G == 4 else 0))
    red = _align16(sq + 3 * bs * 4)
    return _align16(red + max(k["kWarps"] * 2 * 128, k["kRedFloats"]) * 4)


def cluster_plan(cell: str, B: int, H: int, dtype: str, sm_count: int,
                 csize_max: int = CLUSTER_MAX) -> dict:
    """The plan csrc/cluster.cu would make on an H100/H200-like device with ``sm_count`` SMs."""
    return _cluster_plan_of(_cluster_layout_total, "", cell, B, H, dtype, sm_count, csize_max)


def _cluster_plan_of(layout, whose: str, cell: str, B: int, H: int, dtype: str,
                     sm_count: int, csize_max: int) -> dict:
    """The cluster planner of cluster.cuh for one direction: ``layout`` is that kernel's
    shared-memory total (``_cluster_layout_total`` / ``_cluster_bwd_layout_total``), ``whose``
    names it in the error ("" or "'s backward"); the backward's plan also gives ``Hp``."""
    if dtype not in DTYPE_CODE:
        raise ValueError(f"dtype: the cuda backend supports fp32, bf16 and fp16, got {dtype!r}")
    G, es = gates_of(cell), DTYPE_SIZE[dtype]
    units = _round_up(-(-H // csize_max), 8)
    csize = -(-H // units)
    one = layout(G, H, units, 1, es)
    if one > SMEM_OPTIN:
        raise ValueError(f"the cuda cluster variant{whose} cannot keep w_hh in one cluster "
                         f"for cell={cell}, H={H}, dtype={dtype}: a {units}-unit slice needs "
                         f"{one // 1024} KiB of shared memory per CTA, more than "
                         f"{SMEM_OPTIN // 1024} KiB")
    active = max(1, sm_count // csize)
    bs = -(-B // active)
    while bs > 1 and layout(G, H, units, bs, es) > SMEM_OPTIN:
        bs -= 1
    clusters = -(-B // bs)
    plan = {"variant": "cluster", "units": units, "csize": csize, "clusters": clusters,
            "bs": bs, "blocks": csize * clusters}
    if whose:
        plan["Hp"] = csize * units
    plan.update(smem=layout(G, H, units, bs, es), threads=constants()["kThreads"],
                assumed_clusters_at_once=active)
    return plan


def cluster_ntg(bs: int) -> int:
    """n8 tiles of batch rows per pass of cluster_product (cluster.cu's ``cluster_ntg``)."""
    return 2 if bs > 8 else 1


def _compile_sm90a(source: str) -> bytes:
    """``csrc/<source>`` compiled for sm_90a (cached per content of every csrc source)."""
    src = csrc_dir()
    digest = hashlib.sha256()
    for name in sorted(os.listdir(src)):
        if name.endswith((".cu", ".cuh", ".h")):
            with open(os.path.join(src, name), "rb") as f:
                digest.update(name.encode() + f.read())
    key = f"{digest.hexdigest()[:16]}:{source}"
    if key not in _CACHE:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, source.replace(".cu", ".cubin"))
            cmd = [_nvcc(), *CLUSTER_NVCC_FLAGS, "-I", src, "-o", out,
                   os.path.join(src, source)]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if res.returncode != 0:
                raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{res.stderr[-3000:]}")
            with open(out, "rb") as f:
                _CACHE[key] = f.read()
    return _CACHE[key]


def compile_cluster_cubin() -> bytes:
    """cluster.cu for sm_90a (cached per source content)."""
    return _compile_sm90a("cluster.cu")


def _cluster_namespace(cell: str, B: int, H: int, p: dict, dtype: str) -> Dict[str, Dict]:
    """Values for the loop headers of cluster.cu (CTA of rank 0 of cluster 0, thread 0) and of
    the step product in common.cuh."""
    k = constants()
    G, es = gates_of(cell), DTYPE_SIZE[dtype]
    u, C, bs = p["units"], p["csize"], p["bs"]
    nu, nbv = min(u, H), min(bs, B)
    E = 16 // es
    cpn = -(-nu // E)
    Hx, ld = xrow(H), srow(H, es)
    base = dict(k, B=B, H=H, G=G, GH=G * H, u=u, C=C, bs=bs, nu=nu, nbv=nbv, items=nbv * nu,
                E=E, cpn=cpn, per_rank=nbv * cpn, Hx=Hx, ld=ld, R=G * u, rank=0, cid=0, j0=0,
                cb0=0, tid=0, warp=0, lane=0, T_=None, k=None)
    base["threadIdx.x"] = 0
    # cluster_product's locals for warp 0 (bf16/fp16 K steps of 16; fp32 counts its TF32
    # loops with K steps of 8 next to block_matvec: all paths are counted)
    MT, NT = -(-(G * u) // 16), -(-nbv // 8)
    KP = 1 if MT >= k["kWarps"] else k["kWarps"] // MT
    ntg = cluster_ntg(bs)
    base.update(M=nbv, N=G * u, MT=MT, NT=NT, KS=Hx // (16 if es == 2 else 8), KP=KP,
                work=MT * KP, NTG=ntg, ntg=ntg, red_n=MT * ntg * 32 if KP > 1 else 0, item=0,
                kp=0, nt0=0)
    KS = base["KS"]
    base["nmain"] = -(-(KS - 3 * KP) // (4 * KP)) if KS - 3 * KP > 0 else 0
    prod = _mma(nbv, G * u, Hx, 16) if es == 2 else _matvec(G * u, nbv, ld)
    return {"cluster.cu": base, "cluster.cuh": base, "common.cuh": dict(base, **prod),
            "forward.cu": base}


def cluster_kernels(cell: str, H: int, B: int, dtype: str, sm_count: int) -> List[dict]:
    """The cluster forward and the cluster backward: items for ``kernel_record``."""
    cp = cluster_plan(cell, B, H, dtype, sm_count)
    out = []
    cubin = compile_cluster_cubin()
    text = sass.disassemble(cubin)
    wanted = template_args(dtype, cell, cluster_ntg(cp["bs"]))  # <T, NTG, Gated>
    names = [f for f in sass.split_functions(text)
             if "cluster_forward_kernel" in f and wanted in f]
    k = constants()
    if len(names) != 1:
        out.append({"direction": "forward",
                    "error": f"cluster_forward_kernel<{dtype}> not found in the cubin "
                             f"({wanted})"})
    else:
        spaces = _cluster_namespace(cell, B, H, cp, dtype)
        out.append({"record_args": dict(
            name="cluster_forward_kernel", direction="forward", plan=dict(cp), cubin=cubin,
            warps=k["kWarps"], shared_dynamic=cp["smem"], programs=cp["blocks"],
            trip_of=trip_rule("forward", cell, B, H, cp, dtype, spaces=spaces),
            function=names[0], sass_text=text,
            extra={"grid": [cp["blocks"]], "cluster": [cp["csize"], 1, 1],
                   "instantiation": names[0],
                   "note": "opt-in Hopper cluster variant (sm_90a); the instantiation of this "
                           "cell (lstm, or relu/tanh/trec with the activation picked at run "
                           "time)"})})
    out.append(cluster_backward_item(cell, H, B, dtype, sm_count))
    return out


# ----------------------------------------------------------------------------- cluster backward
# The cluster variant's backward (csrc/cluster_backward.cu), compiled for sm_90a.  Same split
# as the forward; CTA r keeps the W^T slice [units][srow(G*Hp)] (Hp = csize * units, the gate
# segment of the gathered dz rows), the cluster's dz double-buffered [2][bs][srow(G*Hp)];
# batch slices as the forward's planner, shrunk until cluster_bwd_layout fits SMEM_OPTIN.


def _cluster_bwd_layout_total(G: int, H: int, units: int, bs: int, es: int) -> int:
    """cluster_bwd_layout(...).total of csrc/cluster_backward.cu."""
    k = constants()
    hp = -(-H // units) * units
    ld, u = srow(G * hp, es), units
    dx = _align16(u * ld * es)
    dl = _align16(dx + 2 * bs * ld * es)
    df = _align16(dl + bs * G * u * es)
    dh = _align16(df + bs * G * u * 4)
    hc = _align16(dh + bs * u * 4)
    cc = _align16(hc + bs * u * 4)
    red = _align16(cc + (bs * u * 4 if G == 4 else 0))
    return _align16(red + max(k["kWarps"] * 2 * 128, k["kRedFloats"]) * 4)


def cluster_bwd_plan(cell: str, B: int, H: int, dtype: str, sm_count: int,
                     csize_max: int = CLUSTER_MAX) -> dict:
    """The plan csrc/cluster_backward.cu would make on an H100/H200-like device."""
    return _cluster_plan_of(_cluster_bwd_layout_total, "'s backward", cell, B, H, dtype,
                            sm_count, csize_max)


def compile_cluster_bwd_cubin() -> bytes:
    """cluster_backward.cu for sm_90a (cached per source content)."""
    return _compile_sm90a("cluster_backward.cu")


def _cluster_bwd_namespace(cell: str, B: int, H: int, p: dict, dtype: str) -> Dict[str, Dict]:
    """Values for the loop headers of cluster_backward.cu (CTA of rank 0 of cluster 0,
    thread 0) and of the step product (cluster_product in cluster.cuh; block_matvec of
    common.cuh for strict fp32)."""
    k = constants()
    G, es = gates_of(cell), DTYPE_SIZE[dtype]
    u, C, bs = p["units"], p["csize"], p["bs"]
    nu, nbv = min(u, H), min(bs, B)
    E = 16 // es
    cpn = -(-nu // E)
    hp = C * u
    Kx, ld = xrow(G * hp), srow(G * hp, es)
    rows = nbv * G
    base = dict(k, B=B, H=H, G=G, u=u, C=C, bs=bs, nu=nu, nbv=nbv, items=nbv * nu, E=E,
                cpn=cpn, rows=rows, per_rank=rows * cpn, Hp=hp, Kx=Kx, ld=ld, rank=0, cid=0,
                j0=0, cb0=0, tid=0, warp=0, lane=0, T_=None, k=None)
    base["threadIdx.x"] = 0
    MT, NT = -(-u // 16), -(-nbv // 8)
    KP = 1 if MT >= k["kWarps"] else k["kWarps"] // MT
    ntg = cluster_ntg(bs)
    base.update(M=nbv, N=u, MT=MT, NT=NT, KS=Kx // (16 if es == 2 else 8), KP=KP,
                work=MT * KP, NTG=ntg, ntg=ntg, red_n=MT * ntg * 32 if KP > 1 else 0, item=0,
                kp=0, nt0=0)
    KS = base["KS"]
    base["nmain"] = -(-(KS - 3 * KP) // (4 * KP)) if KS - 3 * KP > 0 else 0
    prod = _mma(nbv, u, Kx, 16) if es == 2 else _matvec(u, nbv, ld)
    return {"cluster_backward.cu": base, "cluster.cuh": base,
            "common.cuh": dict(base, **prod), "forward.cu": base}


def cluster_backward_item(cell: str, H: int, B: int, dtype: str, sm_count: int) -> dict:
    """The cluster backward as an item for ``kernel_record`` (or an error item)."""
    bp = cluster_bwd_plan(cell, B, H, dtype, sm_count)
    cubin = compile_cluster_bwd_cubin()
    text = sass.disassemble(cubin)
    wanted = template_args(dtype, cell, cluster_ntg(bp["bs"]))
    names = [f for f in sass.split_functions(text)
             if "cluster_backward_kernel" in f and wanted in f]
    if len(names) != 1:
        return {"direction": "backward",
                "error": f"cluster_backward_kernel<{dtype}> not found in the cubin ({wanted})"}
    spaces = _cluster_bwd_namespace(cell, B, H, bp, dtype)
    return {"record_args": dict(
        name="cluster_backward_kernel", direction="backward", plan=dict(bp), cubin=cubin,
        warps=constants()["kWarps"], shared_dynamic=bp["smem"], programs=bp["blocks"],
        trip_of=trip_rule("backward", cell, B, H, bp, dtype, spaces=spaces),
        function=names[0], sass_text=text,
        extra={"grid": [bp["blocks"]], "cluster": [bp["csize"], 1, 1],
               "instantiation": names[0],
               "note": "opt-in Hopper cluster variant's backward (sm_90a); the instantiation "
                       "of this cell (lstm, or relu/tanh/trec)"})}
