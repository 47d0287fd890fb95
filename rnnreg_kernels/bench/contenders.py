"""The problem every contender solves, and the contenders themselves.

A :class:`Problem` is one (shape, dtype, device) case: the weights of a ``torch.nn.LSTM`` /
``nn.RNN`` built from a seed, the inputs ``x [T, B, I]``, ``h0`` (and ``c0``) ``[L, B, H]``, the
penalty configuration and a fixed random ``R [T, B, H]``.  Every contender computes

    output, h_n(, c_n) = rnn(x, hx)
    loss = sum(output * R) / (T*B*H) + penalty(last layer's h0, output)

with the same weights and inputs.  Contenders:

* ``nn+eager`` (the baseline): ``torch.nn.LSTM`` / ``nn.RNN`` (cuDNN on GPU, ATen/oneDNN on
  CPU) and :func:`rnnreg_kernels.penalties.posthoc_terms` in eager PyTorch;
* ``nn+compile``: the same with the post-hoc penalty under ``torch.compile``;
* ``nn+fused-posthoc``: the same RNN followed by :func:`rnnreg_kernels.activation_penalties`
  (one fused pass over the output forward and one backward): the strongest alternative to
  fusing the penalties into the recurrence;
* ``ours:<backend>``: :class:`rnnreg_kernels.LSTM` / ``RNN`` with the penalties fused, on the
  named backend (``reference``, ``triton``, ``cuda``, ...), loaded from the same state_dict.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
from torch import nn

from ..penalties import Penalties, posthoc_terms
from .shapes import Shape

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}
BASELINE = "nn+eager"
COMPILED = "nn+compile"
FUSED_POSTHOC = "nn+fused-posthoc"


class Unavailable(Exception):
    """A contender cannot run this case here; the message says why."""


def _seeded(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def _torch_rnn(shape: Shape) -> nn.Module:
    if shape.cell == "lstm":
        return nn.LSTM(shape.inputs, shape.hidden, shape.layers)
    return nn.RNN(shape.inputs, shape.hidden, shape.layers, nonlinearity=shape.cell)


@dataclass
class Problem:
    """Weights and inputs of one case, shared by every contender (see the module docstring).

    Weights and inputs are drawn in float32 on the CPU from ``seed`` (so every device and dtype
    starts from the same numbers), then rounded to ``dtype``; the float64 oracle uses the
    rounded values, so it measures only the arithmetic error of a contender.
    """

    shape: Shape
    dtype_name: str
    device: torch.device
    penalties: Penalties
    seed: int = 0
    state: Dict[str, torch.Tensor] = field(init=False)
    x: torch.Tensor = field(init=False)
    h0: torch.Tensor = field(init=False)
    c0: Optional[torch.Tensor] = field(init=False)
    R: torch.Tensor = field(init=False)

    def __post_init__(self):
        s = self.shape
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            base = _torch_rnn(s)
        if s.cell == "relu":  # IRNN initialization (Le, Jaitly & Hinton 2015)
            with torch.no_grad():
                for name, p in base.named_parameters():
                    if name.startswith("weight_hh"):
                        p.copy_(torch.eye(s.hidden))
                    elif name.startswith("weight_ih"):
                        p.normal_(0.0, 0.001)
                    else:
                        p.zero_()
        dt, dev = self.dtype, self.device
        self.state = {k: v.to(dev, dt) for k, v in base.state_dict().items()}
        g = _seeded(self.seed + 1)
        T, B, H, L = s.steps, s.batch, s.hidden, s.layers
        self.x = torch.randn(T, B, s.inputs, generator=g).to(dev, dt)
        self.h0 = (0.1 * torch.randn(L, B, H, generator=g)).to(dev, dt)
        self.c0 = (0.1 * torch.randn(L, B, H, generator=g)).to(dev, dt) \
            if s.cell == "lstm" else None
        self.R = torch.randn(T, B, H, generator=g).to(dev, dt)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def hx(self):
        return (self.h0, self.c0) if self.c0 is not None else self.h0

    def cast(self, dtype: torch.dtype, device: Optional[torch.device] = None) -> "Problem":
        """A copy with every tensor converted (the float64 oracle's problem)."""
        other = copy.copy(self)
        dev = device or self.device
        other.state = {k: v.to(dev, dtype) for k, v in self.state.items()}
        for name in ("x", "h0", "c0", "R"):
            t = getattr(self, name)
            setattr(other, name, None if t is None else t.to(dev, dtype))
        other.device = torch.device(dev)
        other.dtype_name = next(k for k, v in DTYPES.items() if v == dtype)
        return other


def _eager_penalty(pen: Penalties) -> Callable:
    def penalty(h0_last: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return posthoc_terms(h0_last, output, pen).sum()
    return penalty


def _fused_posthoc_penalty(pen: Penalties) -> Callable:
    from ..native import activation_penalties

    def penalty(h0_last: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return activation_penalties(output, pen, h0_last)[0]
    return penalty


_COMPILED_CACHE: Dict[Penalties, Callable] = {}


def _compiled_penalty(pen: Penalties) -> Callable:
    """One ``torch.compile``d post-hoc penalty per configuration (recompiles per shape/dtype)."""
    fn = _COMPILED_CACHE.get(pen)
    if fn is None:
        import torch._dynamo.config as dyn

        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(dyn, knob):
                setattr(dyn, knob, max(getattr(dyn, knob), 256))
        fn = torch.compile(_eager_penalty(pen), dynamic=False)
        _COMPILED_CACHE[pen] = fn
    return fn


@dataclass
class Instance:
    """A contender ready to run one :class:`Problem`."""

    name: str
    module: nn.Module
    penalty_fn: Optional[Callable]  # None: the module computes ``module.penalty`` itself
    backend: Optional[str] = None
    fused: bool = False

    def run(self, problem: Problem, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Forward + loss; returns output, h_n, (c_n), penalty and loss (in the graph)."""
        out, hidden = self.module(x, problem.hx)
        res = {"output": out}
        if isinstance(hidden, tuple):
            res["h_n"], res["c_n"] = hidden
        else:
            res["h_n"] = hidden
        if self.fused:
            penalty = self.module.penalty
        elif self.penalty_fn is not None:
            penalty = self.penalty_fn(problem.h0[-1], out)
        else:
            penalty = None
        main = (out * problem.R).sum(dtype=torch.float32 if out.dtype != torch.float64
                                     else torch.float64) / problem.R.numel()
        res["penalty"] = penalty if penalty is not None else torch.zeros_like(main)
        res["loss"] = main + res["penalty"] if penalty is not None else main
        return res


def build(contender: str, problem: Problem) -> Instance:
    """Make contender ``"nn+eager"``, ``"nn+compile"``, ``"nn+fused-posthoc"`` or
    ``"ours:<backend>"`` for ``problem``.

    Raises :class:`Unavailable` (with the reason) when it cannot run here.
    """
    pen = problem.penalties
    if contender in (BASELINE, COMPILED, FUSED_POSTHOC):
        mod = _torch_rnn(problem.shape).to(problem.device, problem.dtype)
        mod.load_state_dict(problem.state)
        if contender == BASELINE:
            return Instance(contender, mod, _eager_penalty(pen) if pen.active else None)
        if contender == FUSED_POSTHOC:
            if not pen.active:
                raise Unavailable("no penalty is active: nothing to fuse")
            return Instance(contender, mod, _fused_posthoc_penalty(pen))
        if not pen.active:
            raise Unavailable("no penalty is active: nothing to compile")
        fn = _compiled_penalty(pen)
        try:  # compile now (grad and no-grad graphs), so compile time is never timed
            out = torch.zeros(problem.shape.steps, problem.shape.batch, problem.shape.hidden,
                              device=problem.device, dtype=problem.dtype, requires_grad=True)
            fn(problem.h0[-1], out).backward()
            with torch.no_grad():
                fn(problem.h0[-1], out)
        except Exception as e:  # noqa: BLE001 - any compiler failure means "unavailable here"
            raise Unavailable(f"torch.compile failed: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}")
        return Instance(contender, mod, fn)
    if not contender.startswith("ours:"):
        raise ValueError(f"contender: expected 'nn+eager', 'nn+compile', 'nn+fused-posthoc' "
                         f"or 'ours:<backend>', got {contender!r}")
    backend = contender.split(":", 1)[1]
    try:
        import rnnreg_kernels as rk
        from rnnreg_kernels.ops import BACKENDS, backend_problem
    except ImportError as e:
        raise Unavailable(f"rnnreg_kernels modules not importable: {e}")
    if not hasattr(rk, "LSTM"):
        raise Unavailable("rnnreg_kernels.LSTM is not available (rnnreg_kernels/nn missing)")
    if backend not in BACKENDS:
        raise ValueError(f"--backends: expected names from {', '.join(BACKENDS)}, "
                         f"got {backend!r}")
    if backend not in ("auto", "naive"):
        probe = torch.empty(0, device=problem.device, dtype=problem.dtype)
        why = backend_problem(backend, None, probe, probe)
        if why is not None:
            raise Unavailable(why)
    s = problem.shape
    extras = dict(norm_stabilizer=pen.norm_stabilizer, tar=pen.tar, ar=pen.ar,
                  ns_include_initial=pen.ns_include_initial, ns_eps=pen.ns_eps,
                  backend=backend)
    if s.cell == "lstm":
        mod = rk.LSTM(s.inputs, s.hidden, s.layers, device=problem.device,
                      dtype=problem.dtype, **extras)
    else:
        mod = rk.RNN(s.inputs, s.hidden, s.layers, nonlinearity=s.cell,
                     device=problem.device, dtype=problem.dtype, **extras)
    mod.load_state_dict(problem.state)
    return Instance(contender, mod, None, backend=backend, fused=True)
