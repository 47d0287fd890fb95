"""Triton half of the static profile: compile the kernels a plan launches for sm_90, no GPU.

The plan is ``rnnreg_kernels.triton.launch.plan(..., sm_count=N)`` (for the forward kernel
passed through ``launch.forward_plan``, which applies the forward's own tiling, as
``launch.forward`` does); its variant names the (forward, backward) kernels in
``launch.KERNELS``.  Each kernel is compiled with
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90,
32), options={"num_warps": plan.num_warps, ...})``:

* signature: ``launch.ACC_PTRS`` point to the accumulation dtype (fp32, fp64 for float64),
  ``len_ptr`` to int64, ``bar_ptr`` to int32, every other ``*_ptr`` to the input dtype;
  ``launch.INT_ARGS`` are int32, every other scalar fp32;
* constexprs: ``CELL``, ``G``, ``ACC``, ``ACC_F64``, ``TF32`` from the call, and every other
  constexpr parameter from the Plan field of the same name (case-insensitive: ``HOLD`` is
  ``plan.hold``); a constexpr that is neither is an error naming it;
* attrs: 16-byte divisibility of every pointer, and of the int arguments the kernel does not
  exclude from specialization (``do_not_specialize``) when their value (B, H) is a multiple
  of 16, as the launcher would specialize them;
* options: ``num_warps`` of the plan and the launcher's own options for the plan
  (:func:`launch_options`: e.g. ``num_stages=1`` and a cooperative grid for persistent
  kernels), so the profile compiles what runs.

Compiles never run in the interpreter: when ``TRITON_INTERPRET=1`` is set they run in a
subprocess without it (``python -m rnnreg_kernels.profile.triton``, jobs as JSON on stdin).
Trip counts of loops inside the time loop are read off the kernel source: the loop's
``for x in range(a, b, c)`` statement (found through the SASS line information) is evaluated
with the plan's values (B, H, the tile sizes, ``tl.num_programs`` = the grid,
``tl.program_id`` = 0, i.e. the program with the most batch tiles).
"""
from __future__ import annotations

import ast
import base64
import functools
import json
import os
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

from . import sass

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}
_SIG = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32", "fp64": "fp64"}
CALL_CONSTEXPRS = ("CELL", "G", "ACC", "ACC_F64", "TF32")


def _plan(cell: str, B: int, H: int, dtype: str, tf32: bool, sm_count: int,
          variant: Optional[str] = None):
    import torch

    from ..triton import launch
    return launch.plan(cell, B, H, getattr(torch, DTYPES[dtype]), torch.device("cuda"), tf32,
                       variant=variant, sm_count=sm_count)


def plan_dict(p) -> dict:
    import dataclasses
    return dataclasses.asdict(p)


def grid_of(p, B: int) -> Tuple[int, ...]:
    """The launch grid of a plan (as ``launch.forward`` / ``backward`` launch it)."""
    if p.variant == "tiled":
        return (p.NB,)
    return (p.NH, p.NB)


def _constexprs(kern, p, cell: str, dtype: str, tf32: bool) -> Dict[str, object]:
    import dataclasses

    import triton.language as tl

    from ..contract import gates_of
    from ..triton import launch
    acc64 = dtype == "fp64"
    call = {"CELL": launch.CELL_CODE[cell], "G": gates_of(cell),
            "ACC": tl.float64 if acc64 else tl.float32, "ACC_F64": acc64,
            "TF32": bool(tf32 and dtype == "fp32")}
    fields = {f.name.upper(): getattr(p, f.name) for f in dataclasses.fields(p)}
    out = {}
    for prm in kern.params:
        if not prm.is_constexpr:
            continue
        if prm.name in call:
            out[prm.name] = call[prm.name]
        elif prm.name.upper() in fields:
            out[prm.name] = fields[prm.name.upper()]
        else:
            raise ValueError(f"kernel {kern.__name__}: constexpr {prm.name!r} is neither one of "
                             f"{', '.join(CALL_CONSTEXPRS)} nor a Plan field "
                             f"({', '.join(sorted(fields))}); add it to the Plan or to "
                             f"rnnreg_kernels/profile/triton.py")
    return out


def _signature(kern, dtype: str, const: dict) -> Dict[str, str]:
    from ..triton import launch
    acc = "*fp64" if dtype == "fp64" else "*fp32"
    sig = {}
    for n in kern.arg_names:
        if n in const:
            sig[n] = "constexpr"
        elif n == "len_ptr":
            sig[n] = "*i64"
        elif n == "bar_ptr":
            sig[n] = "*i32"
        elif n in launch.ACC_PTRS:
            sig[n] = acc
        elif n.endswith("_ptr"):
            sig[n] = "*" + _SIG[dtype]
        elif n in launch.INT_ARGS:
            sig[n] = "i32"
        else:
            sig[n] = "fp32"
    return sig


def launch_options(launch, p) -> dict:
    """The compile options the launcher passes for plan ``p`` (besides num_warps): the
    launcher's ``launch_options(plan)`` when it has one, else its ``_persist(plan)`` for the
    persistent variant (cooperative grid, ``num_stages=1``), else a cooperative grid for
    persistent grids of several programs.  The profile must compile what runs."""
    hook = getattr(launch, "launch_options", None)
    if callable(hook):
        return dict(hook(p))
    if p.variant == "persistent":
        persist = getattr(launch, "_persist", None)
        if callable(persist):
            return dict(persist(p))
        return {"launch_cooperative_grid": True} if p.NH > 1 else {}
    return {}


def _no_spec(kern) -> set:
    names = set()
    for prm in kern.params:
        if getattr(prm, "do_not_specialize", False):
            names.add(prm.name)
    for d in getattr(kern, "do_not_specialize", None) or ():
        names.add(kern.arg_names[d] if isinstance(d, int) else d)
    return names


def compile_one(job: dict) -> dict:
    """Compile one kernel for sm_90; ``job``: cell, B, H, dtype, tf32, sm_count, direction
    and optionally variant (forces the plan's variant, as ``launch.plan(variant=)``).

    Returns the job plus name, plan, grid, num_warps, shared (dynamic bytes), cubin (base64),
    or ``error``."""
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ..triton import bwd, fwd, launch
    t0 = time.time()
    try:
        p = _plan(job["cell"], job["B"], job["H"], job["dtype"], job["tf32"], job["sm_count"],
                  job.get("variant"))
        idx = 0 if job["direction"] == "forward" else 1
        if idx == 0:
            p = launch.forward_plan(p)   # the forward's own tiling, as launch.forward runs it
        name = launch.KERNELS[p.variant][idx]
        kern = getattr(fwd if idx == 0 else bwd, name)
        const = _constexprs(kern, p, job["cell"], job["dtype"], job["tf32"])
        values = {"B": job["B"], "H": job["H"]}
        nospec = _no_spec(kern)
        attrs = {}
        for i, n in enumerate(kern.arg_names):
            if n in const:
                continue
            if n.endswith("_ptr") or (n in values and n not in nospec and values[n] % 16 == 0):
                attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn=kern, signature=_signature(kern, job["dtype"], const),
                        constexprs=const, attrs=attrs)
        opts = dict(launch_options(launch, p), num_warps=p.num_warps)
        c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
        return dict(job, ok=True, name=name, variant=p.variant, plan=plan_dict(p),
                    grid=list(grid_of(p, job["B"])), num_warps=p.num_warps, options=opts,
                    shared=int(getattr(c.metadata, "shared", 0) or 0),
                    cubin=base64.b64encode(c.asm["cubin"]).decode(),
                    seconds=round(time.time() - t0, 2), triton=triton.__version__)
    except Exception as e:  # reported per kernel by the caller
        return dict(job, ok=False, error=f"{type(e).__name__}: {e}"[-4000:],
                    seconds=round(time.time() - t0, 2))


def compile_jobs(jobs: List[dict], workers: int = 2) -> List[dict]:
    """Compile ``jobs`` (a process pool of ``workers``), outside the Triton interpreter."""
    if os.environ.get("TRITON_INTERPRET") == "1" or _interpreter_active():
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run([sys.executable, "-m", "rnnreg_kernels.profile.triton",
                               "--workers", str(workers)],
                              input=json.dumps(jobs), env=env, capture_output=True, text=True,
                              timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"the compile subprocess failed:\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])
    return _pool(jobs, workers)


def _interpreter_active() -> bool:
    mod = sys.modules.get("rnnreg_kernels.triton.fwd")
    if mod is None:
        return False
    return type(getattr(mod, "fwd_tiled", None)).__name__ == "InterpretedFunction"


def _pool(jobs: List[dict], workers: int) -> List[dict]:
    if workers <= 1 or len(jobs) <= 1:
        return [compile_one(j) for j in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as ex:
        return list(ex.map(compile_one, jobs))


# ----------------------------------------------------------------------------- trip counts

@functools.lru_cache(maxsize=None)
def _tree(path: str):
    lines = sass.source_lines(path)
    return ast.parse("\n".join(lines)) if lines is not None else None


class _Unknown(Exception):
    pass


def _enclosing_function(tree, line: int):
    best = None
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.lineno <= line <= (node.end_lineno or 0):
            if best is None or node.lineno > best.lineno:
                best = node
    return best


def _evaluator(fn_node, line: int, env: dict):
    assigns: Dict[str, List[ast.Assign]] = {}
    for node in ast.walk(fn_node):
        if isinstance(node, ast.Assign) and node.lineno < line and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name):
            assigns.setdefault(node.targets[0].id, []).append(node)

    def ev(node, depth=0):
        if depth > 20:
            raise _Unknown("too deep")
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, bool)):
            return int(node.value)
        if isinstance(node, ast.Name):
            if node.id in env:
                if env[node.id] is None:
                    raise _Unknown(node.id)
                return env[node.id]
            if node.id in assigns:
                last = max(assigns[node.id], key=lambda a: a.lineno)
                return ev(last.value, depth + 1)
            raise _Unknown(node.id)
        if isinstance(node, ast.BinOp):
            a, b = ev(node.left, depth + 1), ev(node.right, depth + 1)
            ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
                   ast.FloorDiv: lambda: a // b, ast.Mod: lambda: a % b}
            if type(node.op) in ops:
                return ops[type(node.op)]()
            raise _Unknown(ast.dump(node.op))
        if isinstance(node, ast.Call):
            f = ast.unparse(node.func)
            args = node.args
            if f.endswith("num_programs"):
                return env["__grid__"][ev(args[0], depth + 1)]
            if f.endswith("program_id"):
                return 0
            if f.endswith("cdiv"):
                a, b = ev(args[0], depth + 1), ev(args[1], depth + 1)
                return -(-a // b)
            if f in ("min", "max", "tl.minimum", "tl.maximum"):
                vals = [ev(a, depth + 1) for a in args]
                return min(vals) if f.endswith(("min", "minimum")) else max(vals)
            raise _Unknown(f)
        raise _Unknown(type(node).__name__)
    return ev


def trip_rule(plan: dict, grid: Tuple[int, ...], B: int, H: int):
    """The ``trip_of`` callback of :func:`..sass.analyze` for a Triton plan (as a dict)."""
    env = dict(plan)
    env.update({k.upper(): v for k, v in plan.items()})
    env.update({"B": B, "H": H, "T": None, "k": None, "__grid__": tuple(grid)})

    def trip_of(fn, loop):
        st = sass.loop_statement(fn, loop)
        if st is None:
            return None, "no for/while statement found in the line information"
        path, line, text = st
        where = f"{os.path.basename(path)}:{line} `{text}`"
        tree = _tree(path)
        node = None
        for n in ast.walk(tree):
            if isinstance(n, (ast.For, ast.While)) and n.lineno == line:
                node = n
        if not isinstance(node, ast.For) or not isinstance(node.iter, ast.Call) or \
                ast.unparse(node.iter.func) not in ("range", "tl.range", "tl.static_range"):
            return None, f"{where}: not a range loop"
        ev = _evaluator(_enclosing_function(tree, line), line, env)
        try:
            args = [ev(a) for a in node.iter.args]
        except _Unknown as e:
            return None, f"{where}: {e} is not known from the plan"
        start, stop, step = (0, args[0], 1) if len(args) == 1 else \
            (args[0], args[1], args[2] if len(args) > 2 else 1)
        n = max(0, -(-(stop - start) // step))
        return n, f"{where} with the plan's values: range({start}, {stop}, {step}) = {n}"
    return trip_of


_VERSIONS: Dict[str, str] = {}


def kernels(cell: str, H: int, B: int, dtype: str, tf32: bool, sm_count: int,
            workers: int = 2) -> List[dict]:
    """The forward and backward kernels of the plan, compiled: items for
    :func:`..kernel_record` (``record_args``) or ``{"direction", "error"}``."""
    jobs = [dict(cell=cell, B=B, H=H, dtype=dtype, tf32=tf32, sm_count=sm_count,
                 direction=d) for d in ("forward", "backward")]
    return kernels_from_results(compile_jobs(jobs, workers), B, H)


def kernels_from_results(results: List[dict], B: int, H: int) -> List[dict]:
    """Items for :func:`..kernel_record` from :func:`compile_one` results."""
    out = []
    for r in results:
        if not r.get("ok"):
            out.append({"direction": r["direction"], "error": r["error"]})
            continue
        _VERSIONS["triton"] = r["triton"]
        step = r["variant"] == "step"
        grid = tuple(r["grid"])
        programs = 1
        for g in grid:
            programs *= g
        out.append({"record_args": dict(
            name=r["name"], direction=r["direction"], plan=dict(r["plan"]),
            cubin=base64.b64decode(r["cubin"]), warps=r["num_warps"],
            shared_dynamic=r["shared"], programs=programs,
            trip_of=trip_rule(r["plan"], grid, B, H),
            time_loop="none" if step else "auto", launches_per_step=1.0 if step else 0.0,
            extra={"grid": list(grid), "compile_options": r.get("options"),
                   "compile_seconds": r["seconds"]})})
    return out


def versions() -> dict:
    import torch
    v = {"torch": torch.__version__}
    if "triton" not in _VERSIONS:
        import triton
        _VERSIONS["triton"] = triton.__version__
    v["triton"] = _VERSIONS["triton"]
    v["compile"] = "triton.compile(ASTSource(...), target=GPUTarget('cuda', 90, 32))"
    return v


def _main(argv):
    workers = 2
    if "--workers" in argv:
        workers = int(argv[argv.index("--workers") + 1])
    jobs = json.loads(sys.stdin.read())
    print(json.dumps(_pool(jobs, workers)))


if __name__ == "__main__":
    _main(sys.argv[1:])
