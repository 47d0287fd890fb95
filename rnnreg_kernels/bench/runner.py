"""The benchmark loop: cases -> correctness gate -> interleaved timing -> rows -> JSON.

For each (shape, dtype): one :class:`~.contenders.Problem` and one float64 oracle run.  For each
mode (``forward``: inference under ``torch.no_grad()``; ``train``: forward + backward of
loss + penalty) every contender is built, checked against the oracle (:mod:`.check`), and
the ones that pass are timed together round-robin (:mod:`.timing`).  Speedup is the
baseline's median over the contender's median, both from the same rounds.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from ..penalties import Penalties
from . import env as envmod
from .check import evaluate, gate, oracle
from .contenders import BASELINE, COMPILED, DTYPES, FUSED_POSTHOC, Problem, Unavailable, \
    build
from .shapes import Shape, ShapeSet
from .timing import cuda_step_peak, profile_step, rss_peak_mb_process, summarize, \
    time_interleaved

SCHEMA = "rnnreg_kernels.bench/1"
MODES = ("forward", "train")


@dataclass
class Options:
    """Resolved command-line options (see ``rnnreg_kernels.bench.add_arguments``)."""

    sets: List[ShapeSet]
    device: torch.device
    dtypes: Optional[List[str]] = None
    modes: Optional[List[str]] = None
    contenders: Optional[List[str]] = None
    backends: List[str] = field(default_factory=list)
    warmup: Optional[int] = None
    reps: Optional[int] = None
    penalties: Penalties = field(default_factory=Penalties)
    tf32: bool = False
    shape_filter: Optional[str] = None
    time_budget: Optional[float] = None
    factor: float = 4.0
    floor_eps: float = 8.0
    seed: int = 0
    progress: bool = True

    def contenders_of(self, s: ShapeSet) -> List[str]:
        """Baseline first, then the others of the set (or of --contenders), expanded."""
        wanted = self.contenders or list(s.contenders)
        names = [BASELINE]
        for c in wanted:
            if c == "compile":
                names.append(COMPILED)
            elif c == "fused":
                names.append(FUSED_POSTHOC)
            elif c == "ours":
                names.extend(f"ours:{b}" for b in self.backends)
        return list(dict.fromkeys(names))


@dataclass
class Task:
    set_name: str
    shape: Shape
    dtype: str
    mode: str
    contender: str
    warmup: int
    reps: int


def plan(opts: Options) -> List[Task]:
    """Every (shape, dtype, mode, contender) to run, without repeats across sets."""
    tasks, seen = [], set()
    for s in opts.sets:
        for shape in s.shapes:
            if opts.shape_filter and opts.shape_filter not in shape.name:
                continue
            for dtype in opts.dtypes or s.dtypes:
                for mode in opts.modes or s.modes:
                    for c in opts.contenders_of(s):
                        key = (shape, dtype, mode, c)
                        if key in seen:
                            continue
                        seen.add(key)
                        tasks.append(Task(s.name, shape, dtype, mode, c,
                                          s.warmup if opts.warmup is None else opts.warmup,
                                          s.reps if opts.reps is None else opts.reps))
    return tasks


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:500]


def _g(v: Optional[float]) -> str:
    return "non-finite/missing" if v is None else f"{v:.3g}"


def _tf32(opts: Options, contender: str, dtype: str) -> Optional[Dict[str, bool]]:
    """Whether TF32 was allowed on this contender's fp32 matmuls (None: not a CUDA fp32 row)."""
    if opts.device.type != "cuda" or dtype != "fp32":
        return None
    flags = {"matmul": bool(torch.backends.cuda.matmul.allow_tf32)}
    if not contender.startswith("ours:"):
        flags["cudnn"] = bool(torch.backends.cudnn.allow_tf32)
    return flags


def _step_fn(inst, problem: Problem, mode: str):
    """The timed callable: inference forward, or forward + backward with fresh grads."""
    if mode == "forward":
        x = problem.x

        def fwd():
            with torch.no_grad():
                inst.run(problem, x)
        return fwd
    x = problem.x.detach().clone().requires_grad_(True)
    params = list(inst.module.parameters())

    def train():
        for p in params:
            p.grad = None
        x.grad = None
        inst.run(problem, x)["loss"].backward()
    return train


class _NoBar:
    """Stands in for tqdm when it is missing or the bar is off."""

    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    """A tqdm bar on stderr over the cases (a silent stand-in without tqdm)."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, file=sys.stderr, unit="case", dynamic_ncols=True)


class Runner:
    """Runs a plan and keeps the result document up to date (and on disk after each case)."""

    def __init__(self, opts: Options, out_path: Optional[str], command: str,
                 env_info: Optional[dict] = None, args: Optional[dict] = None):
        self.opts = opts
        self.out_path = out_path
        self.t0 = time.perf_counter()
        pen = opts.penalties
        self.doc = {
            "schema": SCHEMA,
            "created_utc": envmod.now_utc().isoformat(timespec="seconds"),
            "command": command,
            "argv": list(sys.argv),
            "args": args,
            "sets": [s.name for s in opts.sets],
            "options": {
                "device": str(opts.device), "dtypes": opts.dtypes, "modes": opts.modes,
                "contenders": opts.contenders, "backends": opts.backends,
                "warmup": opts.warmup, "reps": opts.reps, "tf32": opts.tf32,
                "shape_filter": opts.shape_filter, "time_budget_s": opts.time_budget,
                "tolerance_factor": opts.factor, "tolerance_floor_eps": opts.floor_eps,
                "seed": opts.seed},
            "penalties": {"norm_stabilizer": pen.norm_stabilizer, "tar": pen.tar, "ar": pen.ar,
                          "ns_include_initial": pen.ns_include_initial, "ns_eps": pen.ns_eps,
                          "penalized_layer": "last"},
            "protocol": {
                "loss": "sum(output * R) / (T*B*H) + penalty (R fixed random)",
                "forward": "inference: torch.no_grad() forward incl. the penalty value",
                "train": "forward + backward of the loss (grads of every parameter and x)",
                "timing": ("CUDA events, L2 flushed, round-robin" if opts.device.type == "cuda"
                           else "time.perf_counter_ns, round-robin"),
                "correctness": ("err = max|q - q64| / max|q64| vs a float64 run of the "
                                "baseline; pass if err <= factor * baseline_err + floor"),
                "speedup": "baseline median / contender median, same run",
                "speedup_paired": "median over rounds of baseline time / contender time "
                                  "(the same round-robin round; robust to machine drift)"},
            "env": env_info or envmod.environment(opts.device),
            "rows": [],
            "complete": False,
        }

    # ------------------------------------------------------------------ output

    def save(self) -> None:
        self.doc["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        if self.out_path is None:
            return
        tmp = self.out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.doc, f, indent=1, allow_nan=False)
        os.replace(tmp, self.out_path)

    def _row(self, task: Task, status: str, **extra) -> dict:
        s = task.shape
        row = {"set": task.set_name, "shape": s.as_dict(), "dtype": task.dtype,
               "mode": task.mode, "contender": task.contender,
               "backend": task.contender.split(":", 1)[1] if ":" in task.contender else None,
               "status": status, "correct": None, "reason": None, "check": None,
               "time_ms": None, "us_per_step": None, "tokens_per_s": None, "speedup": None,
               "memory": None, "ops": None,
               "tf32": _tf32(self.opts, task.contender, task.dtype)}
        row.update(extra)
        self.doc["rows"].append(row)
        return row

    # ------------------------------------------------------------------ running

    def run(self, tasks: List[Task]) -> dict:
        groups: Dict[tuple, List[Task]] = {}
        for t in tasks:
            groups.setdefault((t.shape, t.dtype), []).append(t)
        bar = _progress(len(tasks), self.opts.progress)
        try:
            for k, ((shape, dtype), group) in enumerate(groups.items(), 1):
                before = len(self.doc["rows"])
                self._run_group(shape, dtype, group, bar)
                self.save()
                if not self.opts.progress:  # one log line per case instead of the bar
                    counts: Dict[str, int] = {}
                    for r in self.doc["rows"][before:]:
                        counts[r["status"]] = counts.get(r["status"], 0) + 1
                    print(f"[{k}/{len(groups)}] {shape.name} {dtype}: "
                          + ", ".join(f"{n} {st}" for st, n in sorted(counts.items()))
                          + f" ({time.perf_counter() - self.t0:.0f} s)", file=sys.stderr,
                          flush=True)
        finally:
            bar.close()
        self.doc["complete"] = True
        self.doc["env"]["loadavg_end"] = envmod.loadavg()
        self.doc["env"]["rss_peak_mb_process"] = rss_peak_mb_process()
        self.save()
        return self.doc

    def _over_budget(self) -> bool:
        b = self.opts.time_budget
        return b is not None and time.perf_counter() - self.t0 > b

    def _run_group(self, shape: Shape, dtype: str, group: List[Task], bar) -> None:
        if self._over_budget():
            for t in group:
                self._row(t, "skipped", reason="time budget exhausted")
                bar.update(1)
            return
        bar.set_description(f"{shape.name} {dtype} setup")
        try:
            problem = Problem(shape, dtype, self.opts.device, self.opts.penalties,
                              self.opts.seed)
            reference = oracle(problem)
        except Exception as e:  # noqa: BLE001 - record and go on with the next case
            for t in group:
                self._row(t, "error", reason="setup/oracle failed: " + _reason(e))
                bar.update(1)
            self._free()
            return
        instances: Dict[str, object] = {}
        unavailable: Dict[str, str] = {}
        for mode in MODES:
            tasks = [t for t in group if t.mode == mode]
            if tasks:
                self._run_mode(problem, reference, tasks, instances, unavailable, bar)
        self._free()

    def _free(self) -> None:
        if self.opts.device.type == "cuda":
            torch.cuda.empty_cache()

    def _run_mode(self, problem: Problem, reference, tasks: List[Task], instances: dict,
                  unavailable: Dict[str, str], bar) -> None:
        from ..ops import BackendUnavailableError

        grad = tasks[0].mode == "train"
        opts = self.opts
        rows: Dict[str, dict] = {}
        ready: Dict[str, object] = {}
        base_vals = None
        for t in sorted(tasks, key=lambda t: t.contender != BASELINE):
            bar.set_description(f"{t.shape.name} {t.dtype} {t.mode} {t.contender} check")
            if self._over_budget():
                rows[t.contender] = self._row(t, "skipped", reason="time budget exhausted")
                bar.update(1)
                continue
            if t.contender in unavailable:
                rows[t.contender] = self._row(t, "unavailable", reason=unavailable[t.contender])
                bar.update(1)
                continue
            try:
                inst = instances.get(t.contender) or build(t.contender, problem)
                instances[t.contender] = inst
                vals = evaluate(inst, problem, grad)
            except (Unavailable, BackendUnavailableError) as e:
                unavailable[t.contender] = str(e)
                rows[t.contender] = self._row(t, "unavailable", reason=str(e))
                bar.update(1)
                continue
            except Exception as e:  # noqa: BLE001 - a crash is a result too
                rows[t.contender] = self._row(t, "error", reason=_reason(e))
                bar.update(1)
                continue
            if t.contender == BASELINE:
                base_vals = vals
            if base_vals is None:
                rows[t.contender] = self._row(t, "error", reason="baseline did not run")
                bar.update(1)
                continue
            verdict = gate(vals, base_vals, reference, DTYPES[t.dtype], grad, opts.factor,
                           opts.floor_eps)
            if t.contender == BASELINE:  # the baseline defines the scale; record its errors
                verdict["correct"] = all(e["err"] is not None for e in verdict["errors"].values())
            reason = None
            if not verdict["correct"]:
                worst = verdict["errors"][verdict["worst"]]
                reason = (f"{verdict['worst']}: error {_g(worst['err'])} > allowed "
                          f"{_g(worst['allowed'])} (baseline error {_g(worst['baseline_err'])})")
            rows[t.contender] = self._row(t, "pending" if verdict["correct"] else "wrong",
                                          correct=verdict["correct"], check=verdict,
                                          reason=reason)
            if verdict["correct"]:
                ready[t.contender] = inst
            else:
                bar.update(1)
        del base_vals
        if ready:
            self._time(problem, tasks, ready, rows, bar)

    def _time(self, problem: Problem, tasks: List[Task], ready: dict, rows: Dict[str, dict],
              bar) -> None:
        t = tasks[0]
        shape, mode = t.shape, t.mode
        dev = self.opts.device
        bar.set_description(f"{shape.name} {t.dtype} {mode} timing {len(ready)}")
        fns = {name: _step_fn(inst, problem, mode) for name, inst in ready.items()}
        try:
            samples = time_interleaved(fns, t.warmup, t.reps, dev)
        except Exception as e:  # noqa: BLE001
            for name in ready:
                rows[name].update(status="error", reason="timing failed: " + _reason(e))
            bar.update(len(ready))
            return
        for name, fn in fns.items():
            row = rows[name]
            try:
                prof = profile_step(fn)
                if dev.type == "cuda":
                    mem = cuda_step_peak(fn, dev)
                else:
                    mem = {"step_peak_mb": prof["cpu_step_peak_mb"],
                           "rss_peak_mb_process": rss_peak_mb_process()}
                row["ops"] = prof["ops"]
                row["memory"] = mem
            except Exception as e:  # noqa: BLE001 - memory is secondary; keep the timing
                row["memory"] = {"error": _reason(e)}
            stats = summarize(samples[name])
            row.update(status="ok", time_ms=stats, samples_ms=samples[name],
                       us_per_step=stats["median"] * 1e3 / shape.steps,
                       tokens_per_s=shape.tokens / (stats["median"] / 1e3))
            bar.update(1)
        base = rows.get(BASELINE)
        if base is not None and base["status"] == "ok":
            for row in rows.values():
                if row["status"] == "ok":
                    row["speedup"] = base["time_ms"]["median"] / row["time_ms"]["median"]
                    pairs = [b / c for b, c in zip(base["samples_ms"], row["samples_ms"])]
                    row["speedup_paired"] = statistics.median(pairs)
