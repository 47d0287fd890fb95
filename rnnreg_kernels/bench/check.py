"""The correctness gate every contender passes before it is timed.

For each quantity q (output, h_n, c_n, penalty, loss and, in a training step, the gradient
of every parameter and of x) the error of a run is its relative max error against a float64
run of the baseline (``nn.LSTM``/``nn.RNN`` + eager post-hoc penalties) on the same rounded
weights and inputs:

    err(q) = max |q - q64| / max |q64|

A contender passes when, for every q, ``err_contender(q) <= factor * err_baseline(q) + floor``
with ``floor = floor_eps * eps(float32)`` (8 eps ~ 1e-6 by default; ``eps(float64)`` for float64
runs): it may be a few times less accurate than the baseline in the same dtype, never more.  The
floor only matters where the baseline happens to be nearly exact (e.g. a penalty whose fp32
sums round favourably); it is tied to float32, where all penalties and states accumulate, not to
the input dtype, so it stays far below bf16/fp16 rounding and never loosens those checks.
This is the same rule on CPU and GPU and for every dtype, and the row records every error so a
reader can judge the margin.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from .contenders import BASELINE, Instance, Problem, build

FORWARD_KEYS = ("output", "h_n", "c_n", "penalty", "loss")


def evaluate(inst: Instance, problem: Problem, grad: bool) -> Dict[str, torch.Tensor]:
    """One forward (and backward when ``grad``) of ``inst``; every compared quantity, detached.

    Raises ``RuntimeError`` naming the parameter when a gradient is missing.
    """
    x = problem.x.detach().clone().requires_grad_(grad)
    params = dict(inst.module.named_parameters())
    for p in params.values():
        p.grad = None
    with torch.set_grad_enabled(grad):
        res = inst.run(problem, x)
        if grad:
            res["loss"].backward()
    out = {k: v.detach() for k, v in res.items()}
    if grad:
        for name, p in params.items():
            if p.grad is None:
                raise RuntimeError(f"{inst.name}: no gradient reached parameter {name!r}")
            out["grad." + name] = p.grad.detach().clone()
            p.grad = None
        out["grad.x"] = x.grad.detach()
    return out


def oracle(problem: Problem) -> Dict[str, torch.Tensor]:
    """The float64 baseline on ``problem``'s rounded values (same device; the CPU if the
    device cannot run float64 RNNs), with gradients."""
    try:
        return evaluate(*_oracle_args(problem, problem.device), grad=True)
    except (RuntimeError, NotImplementedError):
        if problem.device.type == "cpu":
            raise
        return evaluate(*_oracle_args(problem, torch.device("cpu")), grad=True)


def _oracle_args(problem: Problem, device: torch.device):
    p64 = problem.cast(torch.float64, device)
    return build(BASELINE, p64), p64


def rel_err(value: torch.Tensor, ref: torch.Tensor) -> float:
    """max |value - ref| / max |ref| in float64 (inf for a shape mismatch or non-finite)."""
    if tuple(value.shape) != tuple(ref.shape):
        return math.inf
    v = value.detach().to(ref.device, torch.float64)
    diff = (v - ref).abs().max().item() if ref.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    if not math.isfinite(diff):
        return math.inf
    if scale == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / scale


def gate(candidate: Dict[str, torch.Tensor], baseline: Dict[str, torch.Tensor],
         reference: Dict[str, torch.Tensor], dtype: torch.dtype, grad: bool,
         factor: float, floor_eps: float) -> Dict[str, object]:
    """Compare ``candidate`` with ``reference`` (float64), scaled by ``baseline``'s error.

    Returns ``{"correct": bool, "worst": key, "worst_ratio": err / allowed, "factor",
    "floor", "errors": {key: {"err", "baseline_err", "allowed"}}}``; a missing or
    non-finite quantity fails.
    """
    floor = floor_eps * torch.finfo(torch.float64 if dtype == torch.float64
                                    else torch.float32).eps
    keys = [k for k in reference if grad or k in FORWARD_KEYS]
    errors: Dict[str, Dict[str, float]] = {}
    correct, worst, worst_ratio = True, None, 0.0
    for key in keys:
        if key not in baseline:
            continue
        eb = rel_err(baseline[key], reference[key])
        ec = rel_err(candidate[key], reference[key]) if key in candidate else math.inf
        allowed = factor * eb + floor if math.isfinite(eb) else math.inf
        ratio = ec / allowed if allowed > 0 else (0.0 if ec == 0 else math.inf)
        errors[key] = {"err": _num(ec), "baseline_err": _num(eb), "allowed": _num(allowed)}
        if not ec <= allowed:
            correct = False
        if worst is None or ratio > worst_ratio:
            worst, worst_ratio = key, ratio
    return {"correct": correct, "worst": worst, "worst_ratio": _num(worst_ratio),
            "factor": factor, "floor": floor, "errors": errors}


def _num(v: float) -> Optional[float]:
    """JSON-safe float: None for inf/nan."""
    return v if math.isfinite(v) else None
