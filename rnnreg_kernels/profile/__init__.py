"""Static profile of the kernels a plan launches, compiled for sm_90 without a GPU.

``python -m rnnreg_kernels profile --backend triton|cuda --cell C --hidden H --batch B
--dtype D [--sm-count 132] [--tf32] [--json FILE] [--save-cubin DIR] [--measure]``

For each kernel (forward and backward) the plan would launch, the profile compiles it for
sm_90 (Triton: ``triton.compile`` with a ``GPUTarget``; CUDA: ``nvcc -cubin``), reads its SASS
(``nvdisasm``, ``cuobjdump``) and reports per time step: instructions per warp, tensor-core
and FMA instructions, global-load bytes, barriers, the longest dependent tensor-core chain,
and an *estimate* of µs per step from :mod:`.model`.  The JSON (``--json``) has the per-kernel
records under ``kernels``, the counting rules under ``counting`` and the estimate's formula and
constants (with sources) under ``model``.  ``--measure`` (CUDA GPU only) adds measured µs per
step beside the estimate.

Exit status: 0 success, 1 a kernel failed to compile or analyze, 2 bad arguments (or
``--measure`` without a GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

from . import model, sass

BACKENDS = ("triton", "cuda")
from ..contract import CELLS  # noqa: E402  (every cell of the op, normprop included)
DTYPES = ("bf16", "fp16", "fp32", "fp64")
VARIANTS = ("persistent", "cluster")  # cuda: the cooperative kernels, the Hopper cluster forward
TARGET = "sm_90 (H100/H200)"


def kernel_record(*, name: str, direction: str, plan: dict, cubin: bytes, warps: int,
                  shared_dynamic: int, programs: int, trip_of=None, time_loop: str = "auto",
                  launches_per_step: float = 0.0, function: Optional[str] = None,
                  extra: Optional[dict] = None, sass_text: Optional[str] = None,
                  sm_count: int = 132) -> dict:
    """Analyze one compiled kernel: the record that goes under ``kernels`` in the JSON."""
    text = sass_text if sass_text is not None else sass.disassemble(cubin)
    res = sass.resources(cubin)
    funcs = sass.split_functions(text)
    fname = function or name
    if fname not in funcs:
        matches = [f for f in funcs if fname in f]
        if len(matches) != 1:
            raise ValueError(f"kernel {fname!r} not found in the cubin (functions: "
                             f"{', '.join(funcs)})")
        fname = matches[0]
    fn = sass.Function(fname, funcs[fname])
    r = sass.analyze(fn, trip_of, time_loop=time_loop, warps=warps)
    c = r["counts"]
    rr = res.get(fname) or (next(iter(res.values())) if len(res) == 1 else {})
    shared = shared_dynamic + (rr.get("shared", 0) or 0)
    traffic = (c.shared_load_bytes_per_warp + c.shared_store_bytes_per_warp
               + c.tensor_core_shared_bytes_per_warp) * warps
    # in a kernel with cluster barriers the generic stores (ST) are the DSMEM stores
    dsmem = c.generic_store_bytes_per_warp * warps if c.cluster_barriers else 0.0
    est = model.estimate(c.instructions, warps, r["dependent_tensor_core_chain"],
                         r["exchange_round_trips"], c.grid_barriers, c.bar_sync,
                         launches_per_step, programs=programs, sm_count=sm_count,
                         registers=rr.get("registers"), shared_bytes=shared,
                         global_load_bytes=c.global_load_bytes_per_warp * warps,
                         shared_traffic_bytes=traffic, cluster_barriers=c.cluster_barriers,
                         dsmem_bytes=dsmem)
    rec = {
        "name": name,
        "direction": direction,
        "plan": plan,
        "registers": rr.get("registers"),
        "spill_bytes": (rr.get("stack", 0) or 0) + (rr.get("local", 0) or 0),
        "shared_bytes": shared,
        "tensor_core_ops_per_step": round(c.tensor_core, 2),
        "fma_ops_per_step": round(c.fma, 2),
        "instructions_per_warp_per_step": round(c.instructions, 2),
        "global_load_bytes_per_step": round(c.global_load_bytes_per_warp * warps, 1),
        "estimated_us_per_step": est["estimated_us_per_step"],
        # extras
        "function": fname,
        "warps": warps,
        "programs": programs,
        "stack_bytes": rr.get("stack"),
        "local_bytes": rr.get("local"),
        "spill_instructions_per_step": round(c.spill_instructions, 2),
        "global_loads_per_step": round(c.global_loads, 2),
        "global_load_widths_per_step": {k: round(v, 2) for k, v in sorted(c.load_widths.items())},
        "global_stores_per_step": round(c.global_stores, 2),
        "shared_loads_per_step": round(c.shared_loads, 2),
        "shared_load_bytes_per_step": round(c.shared_load_bytes_per_warp * warps, 1),
        "shared_store_bytes_per_step": round(c.shared_store_bytes_per_warp * warps, 1),
        "tensor_core_shared_bytes_per_step": round(c.tensor_core_shared_bytes_per_warp * warps,
                                                   1),
        "bar_sync_per_step": round(c.bar_sync, 2),
        "atomics_per_step": round(c.atomics, 2),
        "grid_barriers_per_step": round(c.grid_barriers, 2),
        "cluster_barriers_per_step": round(c.cluster_barriers, 2),
        "dsmem_store_bytes_per_step": round(dsmem, 1),
        "dependent_tensor_core_chain": round(r["dependent_tensor_core_chain"], 2),
        "exchange_round_trips": round(r["exchange_round_trips"], 2),
        "estimate": est,
        "time_loop": r["time_loop"],
        "time_loop_rule": r["time_loop_rule"],
        "loops": r["loops"],
        "unweighted_loops": r["unweighted_loops"],
        "opcodes_per_step": {k: round(v, 2) for k, v in
                             sorted(c.opcodes.items(), key=lambda kv: -kv[1])},
    }
    if extra:
        rec.update(extra)
    return rec, text


def profile(backend: str, cell: str, hidden: int, batch: int, dtype: str,
            sm_count: int = 132, tf32: bool = False, save_cubin: Optional[str] = None,
            workers: int = 2, variant: str = "persistent") -> dict:
    """The profile as a dict (what ``--json`` writes).  ``variant="cluster"`` (cuda only):
    the Hopper cluster forward and backward (csrc/cluster.cu, cluster_backward.cu, sm_90a)."""
    _check(backend, cell, hidden, batch, dtype, sm_count)
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {', '.join(VARIANTS)}, got {variant!r}")
    if variant != "persistent" and backend != "cuda":
        raise ValueError(f"variant: {variant!r} exists for --backend cuda only")
    t0 = time.time()
    if backend == "triton":
        from . import triton as half
    else:
        from . import cuda as half
    kernels, errors, artifacts = [], [], []
    extra = {"variant": variant} if variant != "persistent" else {}
    for item in half.kernels(cell, hidden, batch, dtype, tf32, sm_count, workers=workers,
                             **extra):
        if "error" in item:
            errors.append(item)
            continue
        rec, text = kernel_record(**item["record_args"], sm_count=sm_count)
        kernels.append(rec)
        artifacts.append((rec, item["record_args"]["cubin"], text))
    if save_cubin:
        os.makedirs(save_cubin, exist_ok=True)
        for rec, cubin, text in artifacts:
            stem = os.path.join(save_cubin, f"{backend}_{rec['name']}_{cell}_{dtype}_B{batch}"
                                            f"_H{hidden}")
            with open(stem + ".cubin", "wb") as f:
                f.write(cubin)
            with open(stem + ".sass", "w") as f:
                f.write(text)
            rec["cubin_file"] = stem + ".cubin"
    return {
        "what": "static SASS profile; every time is an ESTIMATE (not measured on a GPU) "
                "unless a field says measured",
        "backend": backend,
        "shape": {"cell": cell, "hidden": hidden, "batch": batch, "dtype": dtype,
                  "tf32": tf32, "sm_count": sm_count, **extra},
        "target": TARGET,
        "versions": half.versions(),
        "counting": sass.COUNTING,
        "model": model.describe(),
        "kernels": kernels,
        "errors": errors,
        "seconds": round(time.time() - t0, 1),
    }


def _check(backend, cell, hidden, batch, dtype, sm_count):
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if cell not in CELLS:
        raise ValueError(f"cell: expected one of {', '.join(CELLS)}, got {cell!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    for name, v in (("hidden", hidden), ("batch", batch), ("sm_count", sm_count)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")


def table(result: dict) -> str:
    """The per-kernel table (text)."""
    measured = any("measured_us_per_step" in k for k in result["kernels"])
    head = ["kernel", "dir", "variant", "regs", "spill B", "smem KB", "TC ops/step",
            "FMA/step", "instr/warp/step", "gload KB/step", "TC chain", "barriers",
            "est. us/step (estimate)"]
    if measured:
        head.append("measured us/step")
    rows = []
    for k in result["kernels"]:
        row = [k["name"], k["direction"][:3], str(k["plan"].get("variant", "-")),
               str(k["registers"]), str(k["spill_bytes"]), f"{k['shared_bytes'] / 1024:.1f}",
               f"{k['tensor_core_ops_per_step']:g}", f"{k['fma_ops_per_step']:g}",
               f"{k['instructions_per_warp_per_step']:g}",
               f"{k['global_load_bytes_per_step'] / 1024:.1f}",
               f"{k['dependent_tensor_core_chain']:g}", f"{k['grid_barriers_per_step']:g}",
               f"{k['estimated_us_per_step']:.2f}"]
        if measured:
            m = k.get("measured_us_per_step")
            row.append(f"{m:.2f}" if isinstance(m, (int, float)) else "-")
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(head)]
    s = result["shape"]
    lines = [f"static profile, {result['backend']} backend, {s['cell']} H={s['hidden']} "
             f"B={s['batch']} {s['dtype']}{' tf32' if s['tf32'] else ''}, {TARGET}, "
             f"{s['sm_count']} SMs. 'est. us/step' is an ESTIMATE from static SASS counts "
             f"(not measured on a GPU; formula and sourced constants under `model` in --json)",
             "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    for e in result.get("errors", []):
        lines.append(f"ERROR {e.get('direction')}: {e['error']}")
    for k in result["kernels"]:
        for u in k["unweighted_loops"]:
            lines.append(f"note: {k['name']}: loop at {u.get('source')} has no known trip "
                         f"count (counted once)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=BACKENDS, default="triton")
    p.add_argument("--cell", choices=CELLS, required=True)
    p.add_argument("--hidden", type=_positive("--hidden"), required=True)
    p.add_argument("--batch", type=_positive("--batch"), required=True)
    p.add_argument("--dtype", choices=DTYPES, required=True)
    p.add_argument("--sm-count", type=_positive("--sm-count"), default=132,
                   help="plan for a GPU with this many SMs (default 132: H100/H200 SXM)")
    p.add_argument("--tf32", action="store_true", help="fp32 with TF32 tensor cores")
    p.add_argument("--json", metavar="FILE", help="write the profile as JSON")
    p.add_argument("--save-cubin", metavar="DIR", help="write each kernel's cubin and SASS")
    p.add_argument("--measure", action="store_true",
                   help="on a CUDA GPU: also time the op (T=100 vs T=200) for measured us/step")
    p.add_argument("--workers", type=_positive("--workers"), default=2,
                   help="compile processes (default 2)")
    p.add_argument("--variant", choices=VARIANTS, default="persistent",
                   help="cuda only: 'cluster' profiles the Hopper cluster forward and backward "
                        "(sm_90a, opt-in variant)")


def _positive(name):
    """argparse type: a positive int (argparse prefixes the message with ``argument NAME:``)."""
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive integer, got "
                                             f"{text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
        return v
    parse.__name__ = name
    return parse


def main(args) -> int:
    if args.measure:
        from .measure import gpu_problem
        why = gpu_problem(args.backend)
        if why is not None:
            print(f"profile --measure: {why}; --measure times the kernels on a CUDA GPU (run "
                  f"without --measure for the static profile)", file=sys.stderr)
            return 2
    try:
        result = profile(args.backend, args.cell, args.hidden, args.batch, args.dtype,
                         args.sm_count, args.tf32, args.save_cubin, args.workers,
                         variant=getattr(args, "variant", "persistent"))
    except ValueError as e:          # a shape or dtype this backend does not take
        print(f"profile: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, RuntimeError) as e:   # missing tool, failed compile
        print(f"profile: {e}", file=sys.stderr)
        return 1
    result["command"] = (f"python -m rnnreg_kernels profile --backend {args.backend} --cell "
                         f"{args.cell} --hidden {args.hidden} --batch {args.batch} --dtype "
                         f"{args.dtype} --sm-count {args.sm_count}"
                         + (" --tf32" if args.tf32 else "") + (" --measure" if args.measure
                                                               else "")
                         + (f" --variant {args.variant}"
                            if getattr(args, "variant", "persistent") != "persistent" else ""))
    if args.measure:
        from .measure import measure
        if getattr(args, "variant", "persistent") == "cluster":
            os.environ["RNNREG_CUDA_VARIANT"] = "cluster"  # the op then runs the cluster kernels
        measure(result, args.backend, args.cell, args.hidden, args.batch, args.dtype, args.tf32)
    print(table(result))
    if args.json:
        d = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(d, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 1 if result["errors"] else 0
