"""The CI gate's shapes and its committed baseline (``tests/profile_baseline.json``).

``python -m rnnreg_kernels.profile.baseline`` profiles every gate shape (all Triton compiles in
one process pool, the CUDA kernels with nvcc when it is there) and prints the comparison with
the baseline; ``--update`` rewrites the baseline's section for the running Triton version
(commit it together with the kernel change that moved the numbers, with the reason in the
commit message); ``--json FILE`` writes the collected records (the test reads them).

The baseline holds, per Triton ``major.minor`` (Triton kernels) and per nvcc version (CUDA
kernels), each kernel's ``instructions_per_warp_per_step`` plus, for information, the other
headline numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASELINE = os.path.join(ROOT, "tests", "profile_baseline.json")
TOLERANCE = 0.10   # instructions per warp per step may grow by at most 10 %

# (backend, cell, hidden, batch, dtype)
GATE_SHAPES = [
    ("triton", "lstm", 1024, 32, "bf16"),
    ("triton", "relu", 1024, 32, "bf16"),
    ("triton", "lstm", 64, 32, "bf16"),      # the tiled variant (small H)
    ("cuda", "lstm", 1024, 32, "bf16"),
]
SM_COUNT = 132
KEPT = ("name", "registers", "spill_bytes", "tensor_core_ops_per_step", "fma_ops_per_step",
        "instructions_per_warp_per_step", "global_load_bytes_per_step",
        "dependent_tensor_core_chain", "estimated_us_per_step")


def key(backend: str, cell: str, hidden: int, batch: int, dtype: str, direction: str) -> str:
    return f"{backend}:{cell}:H{hidden}:B{batch}:{dtype}:{direction}"


def version_section(backend: str, versions: dict) -> str:
    if backend == "triton":
        return "triton " + ".".join(versions["triton"].split(".")[:2])
    return f"nvcc {versions.get('nvcc')}"


def collect(shapes=None, workers: int = 2) -> dict:
    """Profile the gate shapes: ``{"records": [...], "skipped": [...], "sections": {...}}``."""
    from . import cuda as cuda_half
    from . import kernel_record
    from . import triton as triton_half
    shapes = GATE_SHAPES if shapes is None else shapes
    records, skipped, sections = [], [], {}
    t0 = time.time()
    tri = [s for s in shapes if s[0] == "triton"]
    jobs = [dict(cell=c, B=b, H=h, dtype=d, tf32=False, sm_count=SM_COUNT, direction=dr)
            for _, c, h, b, d in tri for dr in ("forward", "backward")]
    compiled = triton_half.compile_jobs(jobs, workers) if jobs else []
    for r in compiled:
        shape = ("triton", r["cell"], r["H"], r["B"], r["dtype"])
        if not r.get("ok"):
            records.append(dict(shape=list(shape), direction=r["direction"], error=r["error"]))
            continue
        items = triton_half.kernels_from_results([r], r["B"], r["H"])
        rec, _ = kernel_record(**items[0]["record_args"], sm_count=SM_COUNT)
        records.append(dict(rec, shape=list(shape)))
    if tri:
        sections["triton"] = version_section("triton", triton_half.versions())
    for shape in (s for s in shapes if s[0] == "cuda"):
        _, c, h, b, d = shape
        try:
            items = cuda_half.kernels(c, h, b, d, False, SM_COUNT)
        except FileNotFoundError as e:
            skipped.append(dict(shape=list(shape), reason=str(e)))
            continue
        for it in items:
            if "error" in it:
                records.append(dict(shape=list(shape), direction=it["direction"],
                                    error=it["error"]))
                continue
            rec, _ = kernel_record(**it["record_args"], sm_count=SM_COUNT)
            records.append(dict(rec, shape=list(shape)))
        sections["cuda"] = version_section("cuda", cuda_half.versions())
    return {"records": records, "skipped": skipped, "sections": sections,
            "seconds": round(time.time() - t0, 1)}


def load(path: str = BASELINE) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def compare(result: dict, base: dict) -> List[dict]:
    """One row per kernel: baseline vs now, and whether it is within the tolerance."""
    rows = []
    for r in result["records"]:
        if "error" in r:
            continue
        backend = r["shape"][0]
        sec = result["sections"].get(backend)
        k = key(*r["shape"], r["direction"])
        old = base.get(sec, {}).get(k)
        now = r["instructions_per_warp_per_step"]
        limit = None if old is None else old["instructions_per_warp_per_step"] * (1 + TOLERANCE)
        rows.append({"key": k, "section": sec, "baseline": None if old is None else
                     old["instructions_per_warp_per_step"], "now": now, "limit": limit,
                     "ok": limit is not None and now <= limit})
    return rows


def update(result: dict, path: str = BASELINE) -> dict:
    base = load(path)
    base["about"] = ("instructions per warp per time step of each gate kernel, sm_90, "
                     "written by `python -m rnnreg_kernels.profile.baseline --update`; "
                     "tests/test_profile.py fails when a kernel exceeds its entry by more "
                     f"than {int(TOLERANCE * 100)} %; one section per Triton version / nvcc "
                     "version")
    for r in result["records"]:
        if "error" in r:
            continue
        sec = result["sections"][r["shape"][0]]
        base.setdefault(sec, {})[key(*r["shape"], r["direction"])] = {
            f: r[f] for f in KEPT}
    with open(path, "w") as f:
        json.dump(base, f, indent=1, sort_keys=True)
        f.write("\n")
    return base


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rnnreg_kernels.profile.baseline",
                                 description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--update", action="store_true",
                    help="rewrite the baseline section of the running Triton / nvcc version")
    ap.add_argument("--json", metavar="FILE", help="write the collected records as JSON")
    ap.add_argument("--baseline", default=BASELINE, help=f"default {BASELINE}")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", choices=("triton", "cuda"),
                    help="profile only this backend's gate shapes")
    args = ap.parse_args(argv)
    shapes = [s for s in GATE_SHAPES if args.only in (None, s[0])]
    result = collect(shapes, args.workers)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    base = load(args.baseline)
    for row in compare(result, base):
        print(f"{row['key']:45s} [{row['section']}] baseline {row['baseline']} now "
              f"{row['now']} {'ok' if row['ok'] else 'OVER' if row['baseline'] else 'NEW'}")
    for r in result["records"]:
        if "error" in r:
            print(f"ERROR {r['shape']} {r['direction']}: {r['error']}", file=sys.stderr)
    for s in result["skipped"]:
        print(f"skipped {s['shape']}: {s['reason']}")
    if args.update:
        update(result, args.baseline)
        print(f"updated {args.baseline}")
    print(f"{result['seconds']} s")
    return 1 if any("error" in r for r in result["records"]) else 0


if __name__ == "__main__":
    sys.exit(main())
