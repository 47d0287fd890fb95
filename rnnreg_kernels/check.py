"""``python -m rnnreg_kernels check``: gradient checks of every backend that can run here.

For every backend available on this machine, every cell (the normprop LSTM included, with a
trainable ``cell_scale`` and an ``h_scale`` that is not 1) and a covering set of penalty
configurations (each term alone, all three, ``ns_include_initial``, ``ar_mask``, ``lengths``,
``reverse``, the memory-cell norm-stabilizer and ``norm_target``) at awkward tiny sizes (T in
1, 2, 7; B = 3; H = 5), in float64:

1. ``torch.autograd.gradcheck`` of ``recurrence(..., backend=b)`` with respect to
   ``x_proj``, ``w_hh``, ``h0`` (``c0`` for the LSTM-type cells, ``cell_scale`` for normprop),
   all outputs (``output``, ``h_n``, ``c_n``, the five terms, ``penalty``, the differentiable
   ``norms`` and, where computed, ``cell_norms``) reduced to one scalar with random weights on
   every element, so every gradient path (the radial terms of the norms included) is checked
   (fast mode by default: a random directional derivative; ``--full`` for the whole Jacobian,
   slower);
2. the same directional derivative by central differences against the analytical one: the
   ``fd err`` column (a number; gradcheck only says yes or no);
3. values (all outputs, ``norms`` included) and gradients under random upstream gradients
   compared with the ``naive`` backend (plain autograd): the ``vs naive`` column.

relu / trec are not differentiable at z = 0 / z = theta; inputs are drawn from a seeded
generator and redrawn until every pre-activation a row actually computes is at least
``KINK_MARGIN`` away from the kink (and every state norm is well away from 0), so finite
differences never cross a kink and the check is deterministic, not flaky.

The ``native`` backend (PyTorch's own RNN kernels + the fused penalty pass) runs every cell
but ``trec`` and ``normprop`` (no PyTorch kernel) and no memory-cell norms (cuDNN / ATen do not
expose c_t), which the plan leaves out for it.  On plain RNN cells the configurations with the
memory-cell norm-stabilizer keep only their other terms.  A case that a fused backend does not
run at all (``unsupported_reason`` in float32 too) is listed as skipped, with the reason.  The fused penalty op
itself (``activation_penalties``, and the in-place reverse route the native backend uses) is
checked as backend ``penalty-op`` (cell ``-``): gradcheck and finite differences of its three
terms with respect to the states and h0, and values, norms and gradients against the
published post-hoc formulas (``penalties.posthoc_terms``), with its CPU code and, where Triton
runs (a GPU, or ``--interpret``), with its Triton kernels (``penalty-op:triton``).

Fused backends that do not take float64 for a case (``unsupported_reason``) are compared
with the float64 naive backend in float32 instead (no gradcheck; tolerance ``FP32_TOL``).
The Triton backend runs on CPU tensors only under ``TRITON_INTERPRET=1`` (``--interpret``),
which must be set before triton is imported; ``python -m rnnreg_kernels check --interpret``
takes care of that.  The interpreter is slow (seconds per case): combine it with ``--quick``
and ``--cell``.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.autograd.gradcheck import GradcheckError

from rnnreg_kernels import contract
from rnnreg_kernels.penalties import TERM_NAMES, Penalties, penalty_weights

B, H = 3, 5
THETA = 0.75                  # trec threshold used by the check (not the default, on purpose)
KINK_MARGIN = 1e-3            # min |z| (relu) / |z - theta| (trec) over all computed steps
MIN_NORM = 0.05               # min ||h_k|| over all states (norm-stabilizer is sqrt-based)
FD_EPS = 1e-6
FD_TOL = 1e-6                 # directional derivative, float64
NAIVE_TOL = 1e-9              # float64 values / grads vs the naive backend
FP32_TOL = 1e-4               # float32 fused backend vs float64 naive
COEF = dict(norm_stabilizer=0.7, tar=0.9, ar=1.3)
NORM_COEF = dict(cell_norm_stabilizer=1.1, norm_target=0.6, norm_target_value=1.2)
H_SCALE = 1.3                 # normprop's 1 / sigma_h in the check (not 1, on purpose)
FUSED = ("triton", "cuda")

# name -> (Penalties kwargs, use ar_mask, use lengths, reverse)
CONFIGS = {
    "none": ({}, False, False, False),
    "ns": ({"norm_stabilizer": COEF["norm_stabilizer"]}, False, False, False),
    "tar": ({"tar": COEF["tar"]}, False, False, False),
    "ar": ({"ar": COEF["ar"]}, False, False, False),
    "ns+tar+ar": (dict(COEF), False, False, False),
    "ns(initial)": ({"norm_stabilizer": COEF["norm_stabilizer"], "ns_include_initial": True},
                    False, False, False),
    "ar(mask)": ({"ar": COEF["ar"]}, True, False, False),
    "all+lengths": (dict(COEF), False, True, False),
    "all+reverse": (dict(COEF), False, False, True),
    "all+initial+mask+lengths+reverse": (dict(COEF, ns_include_initial=True), True, True, True),
    "cellns+target": (dict(NORM_COEF), False, False, False),
    "all5+initial+mask+lengths+reverse": (dict(COEF, **NORM_COEF, ns_include_initial=True),
                                          True, True, True),
}
FULL_PLAN = [(7, name) for name in CONFIGS] + [
    (t, name) for t in (1, 2) for name in ("none", "ns+tar+ar", "all+initial+mask+lengths+reverse",
                                           "all5+initial+mask+lengths+reverse")]
QUICK_PLAN = [(7, "ns+tar+ar"), (7, "all5+initial+mask+lengths+reverse"),
              (2, "all+lengths"), (1, "all5+initial+mask+lengths+reverse")]


def config_penalties(cell: str, config: str) -> dict:
    """The Penalties kwargs of ``config`` for ``cell``: the memory-cell norm-stabilizer only
    for the cells that have a memory cell."""
    kwargs = dict(CONFIGS[config][0])
    if not contract.has_cell_state(cell):
        kwargs.pop("cell_norm_stabilizer", None)
    return kwargs


def uses_cell_norms(cell: str, config: str) -> bool:
    """True when the case computes cell norms (an LSTM-type cell with the cell NS on)."""
    return config_penalties(cell, config).get("cell_norm_stabilizer", 0.0) > 0


@dataclass
class Case:
    """One row of the table: a backend on a device, a cell, a length and a penalty config."""

    backend: str
    device: str
    cell: str
    steps: int
    config: str
    gradcheck: str = "-"        # "ok", "FAIL", "skip (float32)", "skip" or "-" (not run)
    fd_err: float = float("nan")
    naive_err: float = float("nan")
    dtype: str = "float64"
    error: Optional[str] = None
    notes: list = field(default_factory=list)
    skipped: bool = False       # the backend does not run this case at all (notes say why)

    @property
    def passed(self) -> bool:
        if self.skipped and self.error is None:
            return True
        if self.error is not None or self.gradcheck == "FAIL":
            return False
        tol = NAIVE_TOL if self.dtype == "float64" else FP32_TOL
        fd_ok = math.isnan(self.fd_err) and self.dtype != "float64" or self.fd_err <= FD_TOL
        return fd_ok and self.naive_err <= tol


# ----------------------------------------------------------------------------- inputs

def recurrence(*args, **kwargs):
    """``rnnreg_kernels.ops.recurrence``, imported on first use (so that importing this
    module never imports triton before ``--interpret`` has set ``TRITON_INTERPRET``)."""
    from rnnreg_kernels.ops import recurrence as op
    return op(*args, **kwargs)


def _processing_positions(steps: int, length: int, reverse: bool) -> list:
    return [length - k for k in range(1, length + 1)] if reverse else list(range(length))


def _preactivations(cell, x_proj, w_hh, h0, lengths, reverse):
    """All pre-activations z and states h a plain loop computes (relu / trec only).

    Returns (z list of [H] tensors, state list of [H] tensors incl. h0), per the contract's
    processing order; used only to keep inputs away from the kinks.
    """
    T = x_proj.shape[0]
    zs, states = [], []
    for b in range(x_proj.shape[1]):
        length = T if lengths is None else int(lengths[b])
        h = h0[b]
        states.append(h)
        for pos in _processing_positions(T, length, reverse):
            z = x_proj[pos, b] + w_hh @ h
            h = torch.relu(z) if cell == "relu" else z * (z > THETA)
            zs.append(z)
            states.append(h)
    return zs, states


def make_inputs(cell: str, steps: int, config: str, device: torch.device, seed: int):
    """Seeded float64 inputs for one case, redrawn until away from kinks and zero norms.

    Returns (x_proj [T, B, G*H], w_hh [G*H, H], h0 [B, H], c0 [B, H] or None,
    penalties, lengths [B] int64 or None, reverse); normprop's ``cell_scale`` comes from
    :func:`make_cell_scale`.
    """
    _, use_mask, use_lengths, reverse = CONFIGS[config]
    kwargs = config_penalties(cell, config)
    G = contract.gates_of(cell)
    mean = {"lstm": 0.0, "normprop": 0.0, "tanh": 0.0, "relu": 0.2, "trec": 1.0}[cell]
    lengths = None
    if use_lengths:
        lengths = torch.tensor([max(1, (steps + 1) // 2), steps, 1], dtype=torch.int64)
    for attempt in range(200):
        g = torch.Generator().manual_seed(seed * 1000 + attempt)
        dt = torch.float64
        x_proj = torch.randn(steps, B, G * H, generator=g, dtype=dt) + mean
        w_hh = torch.randn(G * H, H, generator=g, dtype=dt) * (0.6 / math.sqrt(H))
        h0 = torch.randn(B, H, generator=g, dtype=dt) * 0.5
        if cell in ("relu", "trec"):
            h0 = h0.abs() + 0.1
        c0 = torch.randn(B, H, generator=g, dtype=dt) * 0.5 \
            if contract.has_cell_state(cell) else None
        mask = None
        if use_mask:
            mask = (torch.rand(B, H, generator=g, dtype=dt) < 0.7).to(dt) / 0.7
        if cell in ("relu", "trec"):
            zs, states = _preactivations(cell, x_proj, w_hh, h0, lengths, reverse)
            kink = 0.0 if cell == "relu" else THETA
            margin = min(float((z - kink).abs().min()) for z in zs)
            smallest = min(float(s.norm()) for s in states)
            if margin <= KINK_MARGIN or smallest <= MIN_NORM:
                continue
        to = dict(device=device)
        pen = Penalties(**kwargs, ar_mask=None if mask is None else mask.to(**to))
        return (x_proj.to(**to), w_hh.to(**to), h0.to(**to),
                None if c0 is None else c0.to(**to), pen,
                None if lengths is None else lengths.to(**to), reverse)
    raise RuntimeError(f"check: no kink-free inputs for cell={cell}, T={steps}, {config} "
                       "after 200 draws; widen the input distribution")


def make_cell_scale(cell: str, device: torch.device, seed: int) -> Optional[torch.Tensor]:
    """normprop's seeded float64 ``cell_scale [H]`` in 0.5..1.5 (None for other cells)."""
    if cell != "normprop":
        return None
    g = torch.Generator().manual_seed(seed * 1000 + 999)
    return (torch.rand(H, generator=g, dtype=torch.float64) + 0.5).to(device)


# ----------------------------------------------------------------------------- checks

def _call(backend, cell, pen, lengths, reverse):
    """f(x_proj, w_hh, h0[, c0[, cell_scale]]) -> the full RecurrenceOutput for one backend."""
    extra = {"theta": THETA} if cell == "trec" else {}

    def run(x_proj, w_hh, h0, c0=None, cell_scale=None):
        more = dict(cell_scale=cell_scale, h_scale=H_SCALE) if cell == "normprop" else {}
        return recurrence(x_proj, w_hh, h0, c0, cell=cell, penalties=pen, lengths=lengths,
                          reverse=reverse, backend=backend, **extra, **more)
    return run


def _outputs(res, cell) -> list:
    """Every output that autograd can differentiate: output, h_n, c_n, the five terms,
    penalty, norms and (when computed) cell_norms."""
    outs = [res.output, res.h_n]
    if contract.has_cell_state(cell):
        outs.append(res.c_n)
    outs += list(res.terms) + [res.penalty, res.norms]
    if res.cell_norms is not None:
        outs.append(res.cell_norms)
    return outs


def _values(res, cell) -> list:
    """Everything to compare with naive."""
    return _outputs(res, cell)


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (floored), in float64; inf on shape or NaN mismatch."""
    if got is None and ref is None:
        return 0.0
    if got is None or ref is None or tuple(got.shape) != tuple(ref.shape):
        return float("inf")
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(got).all():
        return float("inf")
    diff = float((got - ref).abs().max()) if got.numel() else 0.0
    return diff / max(float(ref.abs().max()) if ref.numel() else 0.0, 1e-8)


def _upstream(cell: str, steps: int, gen, cell_norms: bool = False) -> list:
    """Random float64 weights for every differentiable output (see :func:`_outputs`)."""
    shapes = [(steps, B, H), (B, H)] + ([(B, H)] if contract.has_cell_state(cell) else [])
    shapes += [()] * (len(TERM_NAMES) + 1) + [(steps + 1, B)]
    if cell_norms:
        shapes.append((steps + 1, B))
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


def _combine(outs: list, upstream: list) -> torch.Tensor:
    """sum_i <upstream_i, outs_i>: one scalar through which every output's gradient flows."""
    return sum((o.double() * u.to(o.device)).sum() for o, u in zip(outs, upstream))


def _grads(f, inputs, cell, upstream):
    """Outputs of f and d(sum <upstream, outputs>)/d inputs (zeros where unused)."""
    ins = [t.detach().clone().requires_grad_(True) for t in inputs]
    res = f(*ins)
    outs = _outputs(res, cell)
    pairs = [(o, u) for o, u in zip(outs, upstream) if o.requires_grad]
    loss = _combine([o for o, _ in pairs], [u for _, u in pairs])
    gs = torch.autograd.grad(loss, ins, allow_unused=True)
    return res, [torch.zeros_like(i) if gi is None else gi for i, gi in zip(ins, gs)]


def _fd_err(f, inputs, cell, upstream, grads, gen) -> float:
    """|numerical - analytical| / ||grad|| of the directional derivative of
    sum <upstream, outputs> along one random unit direction over all inputs."""
    dirs = [torch.randn(i.shape, generator=gen, dtype=torch.float64).to(i.device)
            for i in inputs]
    scale = math.sqrt(sum(float((d * d).sum()) for d in dirs))
    dirs = [d / scale for d in dirs]

    def weighted(sign):
        with torch.no_grad():
            res = f(*[i + sign * FD_EPS * d for i, d in zip(inputs, dirs)])
            return float(_combine(_outputs(res, cell), upstream))

    numerical = (weighted(1.0) - weighted(-1.0)) / (2 * FD_EPS)
    analytical = sum(float((g.double() * d).sum()) for g, d in zip(grads, dirs))
    gnorm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    return abs(numerical - analytical) / max(gnorm, 1e-12)


def _gradcheck(f, inputs, cell, upstream, full: bool) -> Optional[str]:
    """None when torch.autograd.gradcheck of sum <upstream, outputs> passes, else the first
    line of its complaint.  Random weights on every element of every output make one
    scalar whose gradient contains every gradient path."""
    ins = tuple(t.detach().clone().requires_grad_(True) for t in inputs)

    def fn(*args):
        return _combine(_outputs(f(*args), cell), upstream)
    try:
        torch.autograd.gradcheck(fn, ins, eps=FD_EPS, atol=1e-7, rtol=1e-5,
                                 fast_mode=not full)
    except GradcheckError as exc:
        return str(exc).strip().splitlines()[0]
    return None


def _unsupported(backend, cell, pen, x_proj, w_hh, lengths, reverse) -> Optional[str]:
    """The fused backend's own reason for not taking this case in x_proj's dtype, or None."""
    if backend not in FUSED:
        return None
    mod = importlib.import_module(f"rnnreg_kernels.{backend}")
    T, Bn, _ = x_proj.shape
    w = penalty_weights(pen, T, Bn, H, lengths)
    spec = contract.Spec(cell=cell, theta=THETA if cell == "trec" else 1.0, w_ns=w.ns,
                         w_tar=w.tar, w_ar=w.ar, ns_include_initial=pen.ns_include_initial,
                         ns_eps=pen.ns_eps, reverse=reverse,
                         h_scale=H_SCALE if cell == "normprop" else 1.0,
                         cell_norms=contract.has_cell_state(cell)
                         and pen.cell_norm_stabilizer > 0)
    return mod.unsupported_reason(spec, x_proj, w_hh)


def _penalty_op(impl: str, pen, lengths, reverse):
    """f(states, h0) -> (terms [3], norms) of the fused penalty pass with implementation
    ``impl`` ("torch" or "triton"); the public ``activation_penalties`` when not reverse."""
    from rnnreg_kernels import native

    def run(states, h0):
        old, native.FORCE_IMPL = native.FORCE_IMPL, impl
        try:
            if not reverse:
                _, terms, norms = native.activation_penalties(states, pen, h0, lengths)
                return torch.stack(list(terms)), norms
            return native.penalty_pass(states, h0, pen, lengths, reverse=True)
        finally:
            native.FORCE_IMPL = old
    return run


def _posthoc(pen, lengths, reverse):
    """The published formulas: f(states, h0) -> (terms [5], norms [T+1, B]), both
    differentiable."""
    from rnnreg_kernels.penalties import hidden_norms, posthoc_terms, step_mask, \
        to_processing_order

    def run(states, h0):
        proc = to_processing_order(states, lengths, reverse)
        terms = posthoc_terms(h0, proc, pen, lengths)
        n = hidden_norms(torch.cat([h0.unsqueeze(0), proc], 0), pen.ns_eps)
        valid = step_mask(states.shape[0], lengths, states.shape[1], states.device)
        n = torch.cat([n[:1], torch.where(valid, n[1:], torch.zeros_like(n[1:]))], 0)
        return terms, n
    return run


def run_penalty_case(case: Case, seed: int, full: bool) -> Case:
    """``penalty-op`` rows: the fused penalty pass against the post-hoc formulas."""
    dev = torch.device(case.device)
    # the op sees hidden states only: the configs' memory-cell norm-stabilizer stays off
    _, _, _, _, pen, lengths, reverse = make_inputs("tanh", case.steps, case.config, dev,
                                                    seed)
    g = torch.Generator().manual_seed(seed + 7)
    states = torch.randn(case.steps, B, H, generator=g, dtype=torch.float64).to(dev)
    h0 = (torch.randn(B, H, generator=g, dtype=torch.float64) * 0.5).to(dev)
    upstream = torch.randn(len(TERM_NAMES), generator=g, dtype=torch.float64).to(dev)
    up_norms = torch.randn(case.steps + 1, B, generator=g, dtype=torch.float64).to(dev)
    impl = case.backend.split(":", 1)[1] if ":" in case.backend else "torch"
    f = _penalty_op(impl, pen, lengths, reverse)
    oracle = _posthoc(pen, lengths, reverse)

    def weigh(terms, norms):
        return (terms.double() * upstream).sum() + (norms.double() * up_norms).sum()

    def scalar(fn, *args):
        return weigh(*fn(*args))

    try:
        ins = [states.clone().requires_grad_(True), h0.clone().requires_grad_(True)]
        terms, norms = f(*ins)
        grads = torch.autograd.grad(weigh(terms, norms), ins, allow_unused=True)
        grads = [torch.zeros_like(i) if gr is None else gr for i, gr in zip(ins, grads)]
        ins_o = [states.clone().requires_grad_(True), h0.clone().requires_grad_(True)]
        terms_o, norms_o = oracle(*ins_o)
        grads_o = torch.autograd.grad(weigh(terms_o, norms_o), ins_o)
        errs = [_rel_err(terms, terms_o), _rel_err(norms, norms_o)]
        errs += [_rel_err(a, b) for a, b in zip(grads, grads_o)]
        case.naive_err = max(errs)
        dirs = [torch.randn(i.shape, generator=g, dtype=torch.float64).to(dev) for i in ins]
        scale = math.sqrt(sum(float((d * d).sum()) for d in dirs))
        with torch.no_grad():
            plus = float(scalar(f, *[i + FD_EPS * d / scale for i, d in zip(ins, dirs)]))
            minus = float(scalar(f, *[i - FD_EPS * d / scale for i, d in zip(ins, dirs)]))
        analytical = sum(float((gr * d).sum()) / scale for gr, d in zip(grads, dirs))
        gnorm = math.sqrt(sum(float((gr ** 2).sum()) for gr in grads))
        case.fd_err = abs((plus - minus) / (2 * FD_EPS) - analytical) / max(gnorm, 1e-12)
        try:
            torch.autograd.gradcheck(lambda a, b: scalar(f, a, b),
                                     tuple(i.detach().clone().requires_grad_(True)
                                           for i in ins),
                                     eps=FD_EPS, atol=1e-7, rtol=1e-5, fast_mode=not full)
            case.gradcheck = "ok"
        except GradcheckError as exc:
            case.gradcheck = "FAIL"
            case.notes.append(str(exc).strip().splitlines()[0])
    except Exception as exc:  # a crash is a failed case, reported in the table
        case.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
    return case


def run_case(case: Case, seed: int, full: bool) -> Case:
    """Fill in ``case`` (gradcheck, fd_err, naive_err, error) by running it."""
    if case.backend.startswith("penalty-op"):
        return run_penalty_case(case, seed, full)
    dev = torch.device(case.device)
    x_proj, w_hh, h0, c0, pen, lengths, reverse = make_inputs(
        case.cell, case.steps, case.config, dev, seed)
    scale = make_cell_scale(case.cell, dev, seed)
    inputs = [x_proj, w_hh, h0] + ([c0] if c0 is not None else []) \
        + ([scale] if scale is not None else [])
    gen = torch.Generator().manual_seed(seed)
    upstream = _upstream(case.cell, case.steps, gen, uses_cell_norms(case.cell, case.config))
    naive = _call("naive", case.cell, pen, lengths, reverse)
    f = _call(case.backend, case.cell, pen, lengths, reverse)
    try:
        reason = _unsupported(case.backend, case.cell, pen, x_proj, w_hh, lengths, reverse)
        if reason is not None:
            pen32 = dataclasses.replace(pen, ar_mask=None if pen.ar_mask is None
                                        else pen.ar_mask.float())
            why32 = _unsupported(case.backend, case.cell, pen32, x_proj.float(),
                                 w_hh.float(), lengths, reverse)
            if why32 is not None:
                case.skipped, case.dtype, case.gradcheck = True, "-", "skip"
                case.notes.append(f"unsupported: {why32}")
                return case
            case.dtype, case.gradcheck = "float32", "skip (float32)"
            case.notes.append(f"float64 unsupported: {reason}")
            f = _call(case.backend, case.cell, pen32, lengths, reverse)
            res_b, grads_b = _grads(f, [t.float() for t in inputs], case.cell, upstream)
        else:
            res_b, grads_b = _grads(f, inputs, case.cell, upstream)
            case.fd_err = _fd_err(f, inputs, case.cell, upstream, grads_b, gen)
            bad = _gradcheck(f, inputs, case.cell, upstream, full)
            case.gradcheck = "ok" if bad is None else "FAIL"
            if bad is not None:
                case.notes.append(bad)
        if case.backend == "naive":
            case.naive_err = 0.0  # it is the oracle
            return case
        res_n, grads_n = _grads(naive, inputs, case.cell, upstream)
        errs = [_rel_err(a, b) for a, b in zip(_values(res_b, case.cell),
                                                _values(res_n, case.cell))]
        errs += [_rel_err(a, b) for a, b in zip(grads_b, grads_n)]
        case.naive_err = max(errs)
    except Exception as exc:  # a crash in a backend is a failed case, reported in the table
        case.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
    return case


# ----------------------------------------------------------------------------- backends

def _fused_reason(name: str, device: torch.device) -> Optional[str]:
    try:
        mod = importlib.import_module(f"rnnreg_kernels.{name}")
    except ImportError as exc:
        return f"rnnreg_kernels.{name} cannot be imported ({exc})"
    return mod.unavailable_reason(device)


def available_backends(only: Optional[list] = None) -> tuple:
    """([(backend, device)], [skip messages]) for this machine, optionally filtered."""
    runs, skipped = [], []
    cpu = torch.device("cpu")
    for name in ("reference", "naive", "native", "penalty-op"):
        runs.append((name, "cpu"))
    reason = _fused_reason("triton", cpu)
    if reason is None:
        runs.append(("triton", "cpu"))
        runs.append(("penalty-op:triton", "cpu"))
    else:
        skipped.append(f"triton on cpu: {reason} (on CPU it runs only under "
                       "TRITON_INTERPRET=1: pass --interpret)")
    gpu = torch.device("cuda")
    if torch.cuda.is_available():
        runs.append(("native", "cuda"))
    for name in FUSED:  # each fused backend's GPU status, with its own reason when it cannot
        reason = _fused_reason(name, gpu)
        if reason is None and not torch.cuda.is_available():
            reason = "no CUDA GPU is visible here (torch.cuda.is_available() is False)"
        if reason is None:
            runs.append((name, "cuda"))
        else:
            skipped.append(f"{name} on cuda: {reason}")
    if torch.cuda.is_available() and _fused_reason("triton", gpu) is None:
        runs.append(("penalty-op:triton", "cuda"))
    if only:
        runs = [r for r in runs if r[0] in only or r[0].split(":")[0] in only]
        skipped = [s for s in skipped if s.split()[0] in only]
    return runs, skipped


# ----------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", action="append",
                        choices=("reference", "naive", "native", "triton", "cuda",
                                 "penalty-op"),
                        help="check only this backend (repeatable; 'penalty-op' = the fused "
                             "penalty op, CPU code and Triton kernels); default: all that can "
                             "run")
    parser.add_argument("--cell", action="append", choices=contract.CELLS,
                        help="check only this cell (repeatable); default: all")
    parser.add_argument("--quick", action="store_true",
                        help="a smaller covering set (4 cases per cell and backend)")
    parser.add_argument("--full", action="store_true",
                        help="gradcheck whole Jacobians instead of fast mode (slower)")
    parser.add_argument("--interpret", action="store_true",
                        help="run the triton backend on CPU with TRITON_INTERPRET=1, set "
                             "before triton is imported (slow: seconds per case; combine "
                             "with --quick and --cell)")
    parser.add_argument("--seed", type=int, default=0, help="input seed (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def plan(backends: list, cells, quick: bool) -> list:
    """All cases to run, in table order."""
    steps_configs = QUICK_PLAN if quick else FULL_PLAN
    cases = []
    for b, d in backends:
        if b.startswith("penalty-op"):
            cases += [Case(b, d, "-", t, cfg) for t, cfg in steps_configs]
            continue
        cases += [Case(b, d, cell, t, cfg) for cell in cells for t, cfg in steps_configs
                  if not (b == "native" and (cell in ("trec", "normprop")
                                             or uses_cell_norms(cell, cfg)))]
    return cases


def case_seed(seed: int, case: Case) -> int:
    """Same inputs for a (cell, T, config) on every backend; different across them."""
    cell = contract.CELLS.index(case.cell) if case.cell in contract.CELLS else 0
    return (seed * 100003 + cell * 10007 + case.steps * 101
            + list(CONFIGS).index(case.config) + 1)


def format_table(cases: list) -> str:
    """The result table as text."""
    head = ("backend", "device", "cell", "T", "penalties", "dtype", "gradcheck", "fd err",
            "vs naive", "result")
    rows = [head]
    for c in cases:
        rows.append((c.backend, c.device, c.cell, str(c.steps), c.config, c.dtype, c.gradcheck,
                     "-" if math.isnan(c.fd_err) else f"{c.fd_err:.1e}",
                     "oracle" if c.backend == "naive" and c.error is None else
                     "-" if c.skipped else
                     "-" if math.isnan(c.naive_err) else f"{c.naive_err:.1e}",
                     "SKIP" if c.skipped and c.error is None else
                     "PASS" if c.passed else "FAIL"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Run the check; print the table and a summary; 0 when every case passes, else 1."""
    from tqdm import tqdm

    runs, skipped = available_backends(args.backend)
    if args.backend:
        missing = [b for b in args.backend if b not in {r[0] for r in runs}]
        if missing:
            for s in skipped:
                print(f"check: cannot run {s}", file=sys.stderr)
            print(f"check: requested backend(s) {', '.join(missing)} cannot run here",
                  file=sys.stderr)
            return 1
    cells = args.cell or list(contract.CELLS)
    cases = plan(runs, cells, args.quick)
    print(f"check: float64 gradcheck ({'full' if args.full else 'fast'} mode) + finite "
          f"differences + comparison with the naive backend; B={B}, H={H}, "
          f"{len(cases)} cases; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')}")
    for s in skipped:
        print(f"  skipped: {s}")
    t0 = time.perf_counter()
    # a progress bar only on a terminal (a CI log would get one line per update)
    bar = tqdm(cases, desc="check", unit="case", file=sys.stderr,
               disable=args.no_progress or not sys.stderr.isatty())
    for case in bar:
        bar.set_postfix_str(f"{case.backend} {case.cell} T={case.steps} {case.config}")
        run_case(case, seed=case_seed(args.seed, case), full=args.full)
    bar.close()
    print(format_table(cases))
    failed = [c for c in cases if not c.passed]
    skipped_cases = [c for c in cases if c.skipped and c.passed]
    ran = len(cases) - len(skipped_cases)
    for c in failed:
        why = c.error or "; ".join(c.notes) or (
            f"fd err {c.fd_err:.1e} (tol {FD_TOL:.0e}), vs naive {c.naive_err:.1e} (tol "
            f"{NAIVE_TOL if c.dtype == 'float64' else FP32_TOL:.0e})")
        print(f"FAIL {c.backend}/{c.device} {c.cell} T={c.steps} {c.config}: {why}")
    notes = {}
    for c in cases:
        if c.passed and c.notes:
            notes.setdefault((f"{c.backend}/{c.device}", c.notes[0]), []).append(c)
    for (where, note), which in notes.items():
        print(f"note {where} ({len(which)} case{'s' if len(which) > 1 else ''}): {note}")
    backends = ", ".join(sorted({f"{c.backend}/{c.device}" for c in cases}))
    print(f"check: {ran - len(failed)}/{ran} passed, {len(failed)} failed, "
          f"{len(skipped_cases)} skipped (unsupported there, see the notes) "
          f"({backends}; {time.perf_counter() - t0:.1f} s)")
    return 1 if failed else 0
