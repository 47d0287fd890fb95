"""``python -m rnnreg_kernels bench``: the benchmark harness (DESIGN.md section 6).

Contenders (same weights, inputs and loss; each checked against a float64 run before it is
timed): ``nn+eager`` = ``torch.nn.LSTM``/``nn.RNN`` + post-hoc penalties in eager PyTorch (the
baseline), ``nn+compile`` = the same with the post-hoc penalties under ``torch.compile``,
``nn+fused-posthoc`` = the same RNN + :func:`rnnreg_kernels.activation_penalties` (the fused
one-pass penalty op), and ``ours:<backend>`` = :class:`rnnreg_kernels.LSTM`/``RNN`` with fused
penalties.

Usage::

    python -m rnnreg_kernels bench --set smoke --out /tmp/bench
    python -m rnnreg_kernels bench --set cpu --out benchmarks/results/
    python -m rnnreg_kernels bench --set char,word --dtypes fp32,bf16 --out results/
    python -m rnnreg_kernels bench --list

:func:`add_arguments` fills an ``argparse`` parser; :func:`main` runs the parsed arguments and
returns the exit status (0, or 1 when a contender was wrong or crashed).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

__all__ = ["add_arguments", "main"]

_DEFAULT_PENALTIES = "ns=1,tar=1,ar=2"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the benchmark's options to ``parser`` and return it."""
    from .shapes import SETS

    p = parser
    p.add_argument("--set", default="smoke",
                   help=f"comma-separated shape sets: {', '.join(SETS)}; 'gpu' = every GPU "
                        "set (default: smoke)")
    p.add_argument("--list", action="store_true", help="list the shape sets and exit")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to run (default: the sets' device)")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated fp32, bf16, fp16, fp64 (default: the set's)")
    p.add_argument("--modes", default=None,
                   help="comma-separated forward (inference), train (forward + backward); "
                        "default: both")
    p.add_argument("--contenders", default=None,
                   help="comma-separated eager, compile, fused (nn + activation_penalties), "
                        "ours (the nn+eager baseline always "
                        "runs); default: the set's")
    p.add_argument("--backends", default=None,
                   help="backends for 'ours': reference, naive, triton, cuda, native, auto "
                        "(default: native,reference on CPU, where auto = native for lstm, "
                        "relu, tanh; triton,cuda,native on GPU)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per contender")
    p.add_argument("--reps", type=int, default=None, help="timed calls per contender")
    p.add_argument("--penalties", default=_DEFAULT_PENALTIES,
                   help="coefficients 'ns=B,tar=B,ar=A' (0 or absent = off) or 'none' "
                        f"(default: {_DEFAULT_PENALTIES})")
    p.add_argument("--tf32", action="store_true",
                   help="allow TF32 for fp32 on both sides (cuDNN and matmul); default off")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    p.add_argument("--shapes", default=None, metavar="SUBSTRING",
                   help="only shapes whose name contains this (e.g. 'h1024-b16')")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no new case after this many seconds (rows marked skipped)")
    p.add_argument("--tol-factor", type=float, default=4.0,
                   help="a contender may have this many times the baseline's error (4)")
    p.add_argument("--tol-floor-eps", type=float, default=8.0,
                   help="plus this many float32 epsilons (8, i.e. ~1e-6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, metavar="DIR", help="write the result JSON here")
    p.add_argument("--name", default=None,
                   help="JSON file stem (default: <device>_<UTC date-time>_<sets>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _split(value: Optional[str]) -> Optional[List[str]]:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    return items or None


def parse_penalties(text: str):
    """``"ns=1,tar=1,ar=2"`` or ``"none"`` -> :class:`~rnnreg_kernels.Penalties`."""
    from ..penalties import Penalties

    if text.strip().lower() in ("none", "off", ""):
        return Penalties()
    names = {"ns": "norm_stabilizer", "norm_stabilizer": "norm_stabilizer", "tar": "tar",
             "ar": "ar"}
    kwargs = {}
    for part in text.split(","):
        key, sep, val = part.partition("=")
        key = key.strip()
        if not sep or key not in names:
            raise ValueError(f"--penalties: expected 'ns=B,tar=B,ar=A' or 'none', got "
                             f"{text!r} (bad item {part!r})")
        try:
            kwargs[names[key]] = float(val)
        except ValueError:
            raise ValueError(f"--penalties: {key} expected a number, got {val!r}") from None
    return Penalties(**kwargs)


def _check_choice(flag: str, values, allowed) -> None:
    for v in values or ():
        if v not in allowed:
            raise ValueError(f"{flag}: expected names from {', '.join(allowed)}, got {v!r}")


def _options(args):
    import torch

    from .contenders import DTYPES
    from .runner import MODES, Options
    from .shapes import resolve_sets

    sets = resolve_sets(args.set)
    devices = {s.device for s in sets}
    if args.device != "auto":
        device = args.device
    elif len(devices) > 1:
        raise ValueError(f"--set: mixes CPU and GPU sets ({args.set}); pass --device cpu or "
                         "--device cuda")
    else:
        device = devices.pop()
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--set {args.set}: needs a CUDA GPU and none is visible; run a CPU "
                         "set (smoke, cpu) or pass --device cpu to force these shapes on the "
                         "CPU")
    dtypes, modes = _split(args.dtypes), _split(args.modes)
    contenders, backends = _split(args.contenders), _split(args.backends)
    _check_choice("--dtypes", dtypes, tuple(DTYPES))
    _check_choice("--modes", modes, MODES)
    _check_choice("--contenders", contenders, ("eager", "compile", "fused", "ours"))
    _check_choice("--backends", backends,
                  ("reference", "naive", "triton", "cuda", "native", "auto"))
    for flag, v in (("--warmup", args.warmup), ("--reps", args.reps)):
        if v is not None and v < (0 if flag == "--warmup" else 1):
            raise ValueError(f"{flag}: expected a count >= {0 if flag == '--warmup' else 1}, "
                             f"got {v}")
    if backends is None:
        backends = ["native", "reference"] if device == "cpu" else ["triton", "cuda", "native"]
    return Options(sets=sets, device=torch.device(device), dtypes=dtypes, modes=modes,
                   contenders=contenders, backends=backends, warmup=args.warmup,
                   reps=args.reps, penalties=parse_penalties(args.penalties), tf32=args.tf32,
                   shape_filter=args.shapes, time_budget=args.time_budget,
                   factor=args.tol_factor, floor_eps=args.tol_floor_eps, seed=args.seed,
                   progress=not args.no_progress)


def main(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args``; print the table; return the exit status."""
    import torch

    from . import env as envmod
    from .runner import Runner, plan
    from .shapes import describe_sets
    from .table import text_table

    if args.list:
        print(describe_sets())
        return 0
    try:
        opts = _options(args)
    except ValueError as e:
        print(f"rnnreg_kernels bench: {e}", file=sys.stderr)
        return 2
    tasks = plan(opts)
    if not tasks:
        print(f"rnnreg_kernels bench: no case matches --set {args.set} --shapes {args.shapes}",
              file=sys.stderr)
        return 2
    saved = (torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    threads = args.threads or next((s.threads for s in opts.sets if s.threads), None)
    if threads:
        torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = opts.tf32
    torch.backends.cudnn.allow_tf32 = opts.tf32
    try:
        out_path = None
        info = envmod.environment(opts.device)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            stem = args.name or "_".join([envmod.device_slug(info),
                                          envmod.now_utc().strftime("%Y%m%d-%H%M%S"),
                                          "-".join(s.name for s in opts.sets)])
            out_path = os.path.join(args.out, stem + ".json")
        runner = Runner(opts, out_path, envmod.command_line(), info, dict(vars(args)))
        doc = runner.run(tasks)
    finally:
        torch.set_num_threads(saved[0])
        torch.backends.cuda.matmul.allow_tf32 = saved[1]
        torch.backends.cudnn.allow_tf32 = saved[2]
    print(f"# {doc['env']['device_name']} | torch {doc['env']['torch']} | "
          f"{len(doc['rows'])} rows in {doc['elapsed_s']} s", flush=True)
    print(text_table(doc["rows"]), flush=True)
    if out_path:
        print(f"results: {out_path}", file=sys.stderr)
    bad = [r for r in doc["rows"] if r["status"] in ("wrong", "error")]
    return 1 if bad else 0
