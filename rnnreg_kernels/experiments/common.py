"""Shared pieces of the experiments: argument types, progress bars, a process pool of
single-threaded workers, the machine description and JSON output."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Callable, Iterable, List, Optional, Sequence


# ----------------------------------------------------------------------------- arguments

def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def float_above(lower: float, inclusive: bool):
    """argparse type: a finite float > lower (>= lower when ``inclusive``)."""
    bound = f"{'>=' if inclusive else '>'} {lower:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < lower or (value == lower and not inclusive):
            raise argparse.ArgumentTypeError(f"expected a finite number {bound}, got {text!r}")
        return value

    return parse


non_negative_float = float_above(0.0, inclusive=True)
positive_float = float_above(0.0, inclusive=False)


def int_list(text: str) -> list:
    """argparse type: comma-separated positive integers, sorted, duplicates dropped."""
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers such as 1,2,5,10, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers such as 1,2,5,10, got {text!r}")
    return values


def default_workers() -> int:
    """Worker processes for a CPU run: one per core, at most 2 (the runs are sized for 2)."""
    return max(1, min(2, os.cpu_count() or 1))


def add_run_arguments(parser: argparse.ArgumentParser, out_default: str) -> None:
    """The options every experiment has: device, backend, threads, workers, out, progress."""
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--backend", default="auto",
                        help="recurrence backend of the rnnreg_kernels modules (default auto: "
                             "the fastest that can run the case)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch threads per worker process (default 1: the per-step "
                             "products are small and run fastest single-threaded)")
    parser.add_argument("--workers", type=positive_int, default=None,
                        help="worker processes training models side by side (default: one "
                             "per CPU core, at most 2, on the CPU; 1 on a GPU)")
    parser.add_argument("--out", default=out_default,
                        help=f"output folder (default ./{out_default})")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (they are drawn only when stderr is a terminal)")


def check_run_arguments(name: str, args: argparse.Namespace):
    """Resolve ``--device`` and ``--workers`` and create ``--out``; returns the device, or
    prints what is wrong and returns None (the caller exits with status 2)."""
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        print(f"{name}: --device {args.device!r} is not usable here: {exc}", file=sys.stderr)
        return None
    if args.workers is None:
        args.workers = default_workers() if device.type == "cpu" else 1
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        print(f"{name}: --out {args.out!r}: cannot create the output folder: {exc}",
              file=sys.stderr)
        return None
    return device


# ----------------------------------------------------------------------------- progress

def show_progress(no_progress: bool) -> bool:
    """Progress bars are drawn only on a terminal and never with ``--no-progress``."""
    return not no_progress and sys.stderr.isatty()


def progress(total: int, desc: str, enabled: bool, position: int = 0):
    """A tqdm bar on stderr (a no-op object when disabled)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, disable=not enabled,
                leave=False, position=position, dynamic_ncols=True)


# ----------------------------------------------------------------------------- workers

def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_jobs(fn: Callable, jobs: Sequence, workers: int, threads: int) -> List:
    """``[fn(job) for job in jobs]``, in ``workers`` spawned processes of ``threads`` torch
    threads each when ``workers > 1`` (``fn`` must be a module-level function)."""
    if workers <= 1 or len(jobs) <= 1:
        return [fn(job) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx,
                             initializer=_init_worker, initargs=(threads,)) as pool:
        return list(pool.map(fn, jobs))


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# ----------------------------------------------------------------------------- results

def environment(device) -> dict:
    """Machine, versions and load (``rnnreg_kernels.bench.env``), plus the package version."""
    import rnnreg_kernels
    from rnnreg_kernels.bench.env import environment as bench_env

    info = bench_env(device)
    info["rnnreg_kernels"] = rnnreg_kernels.__version__
    return info


def finish_environment(info: dict) -> dict:
    from rnnreg_kernels.bench.env import loadavg

    info["loadavg_end"] = loadavg()
    return info


def command_line() -> str:
    from rnnreg_kernels.bench.env import command_line as cmd

    return cmd()


def now_utc() -> str:
    from rnnreg_kernels.bench.env import now_utc as now

    return now().strftime("%Y-%m-%dT%H:%M:%SZ")


def jsonable(obj, digits: Optional[int] = None):
    """Non-finite floats become None; dict keys become strings; floats optionally rounded to
    ``digits`` significant digits (for long curves)."""
    if isinstance(obj, float):
        if not math.isfinite(obj):
            return None
        return float(f"{obj:.{digits}g}") if digits else obj
    if isinstance(obj, dict):
        return {str(k): jsonable(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, digits) for v in obj]
    return obj


def write_json(path: str, doc: dict) -> None:
    with open(path, "w") as f:
        json.dump(jsonable(doc), f, indent=1, allow_nan=False)
        f.write("\n")


def spread(values: Iterable[float]) -> dict:
    """Median, quartiles, min and max of ``values`` (inf allowed: an overflowed run), with the
    count; quartiles by linear interpolation."""
    v = sorted(float("inf") if (x is None or math.isnan(x)) else float(x) for x in values)
    if not v:
        return {"n": 0, "median": None, "q25": None, "q75": None, "min": None, "max": None}

    def q(p: float) -> float:
        pos = p * (len(v) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        if lo == hi or v[lo] == v[hi]:
            return v[lo]
        if math.isinf(v[hi]):
            return float("inf")
        return v[lo] + (v[hi] - v[lo]) * (pos - lo)

    return {"n": len(v), "median": q(0.5), "q25": q(0.25), "q75": q(0.75), "min": v[0],
            "max": v[-1]}


class Timer:
    """Wall and CPU seconds since construction."""

    def __init__(self):
        self.wall0, self.cpu0 = time.perf_counter(), cpu_seconds()

    def wall(self) -> float:
        return time.perf_counter() - self.wall0

    def cpu(self) -> float:
        return cpu_seconds() - self.cpu0


def backend_used(module, cell: str) -> str:
    """The backend a module's recurrence runs on (``auto`` resolved), for the report."""
    from rnnreg_kernels import ops
    from rnnreg_kernels.contract import Spec

    w = module.weight_hh_l0
    try:
        spec = Spec(cell=cell, theta=float(getattr(module, "theta", 1.0)), w_ns=1.0, w_tar=0.0,
                    w_ar=0.0, ns_include_initial=False, ns_eps=1e-9, reverse=False,
                    cell_norms=bool(getattr(module, "needs_cell_norms", False)))
        return ops.resolve_backend(module.backend, spec, w.new_zeros(1, 1, w.shape[0]), w)
    except (TypeError, ValueError, RuntimeError) as exc:
        return f"{module.backend} (not resolved: {exc})"
