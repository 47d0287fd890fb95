"""Validation of a result JSON (used by tests/test_bench.py, CI and ``report.py --check``)."""
from __future__ import annotations

import math
from typing import List

from .runner import SCHEMA

STATUSES = ("ok", "wrong", "unavailable", "error", "skipped")
ENV_KEYS = ("device_name", "device_type", "cpu", "torch", "triton", "cudnn", "driver",
            "torch_threads", "python")
ROW_KEYS = ("set", "shape", "dtype", "mode", "contender", "status", "correct", "check",
            "time_ms", "us_per_step", "tokens_per_s", "speedup", "memory", "tf32")


def validate(doc: dict, strict: bool = False, rel_tol: float = 1e-9) -> List[str]:
    """Problems found in a result document (empty list = valid).

    Checks the top-level fields, every row's fields and status, that timed rows passed the
    correctness gate and have positive, ordered times, that throughput numbers follow from the
    median, that every speedup equals the same case's baseline median over the row's median,
    and that wrong rows were not timed.  ``strict`` also counts every ``wrong`` or ``error``
    row and an incomplete run as a problem (for CI on the smoke set).
    """
    problems: List[str] = []
    if doc.get("schema") != SCHEMA:
        problems.append(f"schema: expected {SCHEMA!r}, got {doc.get('schema')!r}")
    for key in ("created_utc", "command", "env", "rows", "options", "penalties", "complete"):
        if key not in doc:
            problems.append(f"missing top-level field {key!r}")
    env = doc.get("env", {})
    for key in ENV_KEYS:
        if key not in env:
            problems.append(f"env: missing {key!r}")
    rows = doc.get("rows", [])
    if strict and doc.get("complete") is not True:
        problems.append("complete: the run did not finish")
    if not rows:
        problems.append("rows: empty")
    baselines = {}
    for i, r in enumerate(rows):
        if r.get("contender") == "nn+eager" and r.get("status") == "ok":
            baselines[_case(r)] = r["time_ms"]["median"]
    for i, r in enumerate(rows):
        where = f"row {i} ({r.get('contender')} {r.get('shape', {}).get('name')} " \
                f"{r.get('dtype')} {r.get('mode')})"
        missing = [k for k in ROW_KEYS if k not in r]
        if missing:
            problems.append(f"{where}: missing {missing}")
            continue
        if r["status"] not in STATUSES:
            problems.append(f"{where}: unknown status {r['status']!r}")
        if strict and r["status"] in ("wrong", "error"):
            problems.append(f"{where}: status {r['status']}: {r.get('reason')}")
        if r["status"] == "wrong" and r["time_ms"] is not None:
            problems.append(f"{where}: a wrong contender was timed")
        if r["status"] != "ok":
            continue
        if r["correct"] is not True:
            problems.append(f"{where}: timed but correct = {r['correct']!r}")
        t = r["time_ms"]
        if not (t and 0 < t["min"] <= t["median"] <= t["max"]):
            problems.append(f"{where}: times not positive and ordered: {t}")
            continue
        s = r["shape"]
        _close(problems, where, "us_per_step", r["us_per_step"],
               t["median"] * 1e3 / s["steps"], rel_tol)
        _close(problems, where, "tokens_per_s", r["tokens_per_s"],
               s["batch"] * s["steps"] / (t["median"] / 1e3), rel_tol)
        base = baselines.get(_case(r))
        if base is None:
            if r["speedup"] is not None:
                problems.append(f"{where}: speedup without an ok baseline")
        else:
            _close(problems, where, "speedup", r["speedup"], base / t["median"], rel_tol)
    return problems


def _case(r: dict) -> tuple:
    return (r["shape"]["name"], r["dtype"], r["mode"])


def _close(problems: List[str], where: str, name: str, got, want: float, tol: float) -> None:
    if got is None or not math.isclose(got, want, rel_tol=tol):
        problems.append(f"{where}: {name} = {got!r}, expected {want!r}")
