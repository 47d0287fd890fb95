"""``recurrence``: the one functional op, its argument checks, backend choice and autograd.

Everything above (modules, benchmarks, tests) calls :func:`recurrence`; everything below
(reference, Triton, CUDA) implements the contract of :mod:`rnnreg_kernels.contract`.
"""
from __future__ import annotations

import importlib
import math
import os
from typing import NamedTuple, Optional, Sequence, Union

import torch

from .contract import CELLS, Spec, gates_of
from .penalties import Penalties, penalty_weights

BACKENDS = ("auto", "reference", "naive", "triton", "cuda", "native")
_FUSED = ("triton", "cuda")  # auto's order of preference on CUDA tensors
# auto's choice after the fused backends (CUDA) / on the CPU: PyTorch's own recurrence where it
# runs the case (every cell but trec), else the reference loop.  Measured: docs/native.md.
_FALLBACK = ("native", "reference")
_MODULES = {"reference": "rnnreg_kernels.reference", "triton": "rnnreg_kernels.triton",
            "cuda": "rnnreg_kernels.cuda", "native": "rnnreg_kernels.native"}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Terms(NamedTuple):
    """The three weighted penalty terms (0-dim tensors, each in the autograd graph)."""

    norm_stabilizer: torch.Tensor
    tar: torch.Tensor
    ar: torch.Tensor


class RecurrenceOutput(NamedTuple):
    """What :func:`recurrence` returns (see its docstring for shapes)."""

    output: torch.Tensor
    h_n: torch.Tensor
    c_n: Optional[torch.Tensor]
    penalty: torch.Tensor
    terms: Terms
    norms: torch.Tensor


class BackendUnavailableError(RuntimeError):
    """A named backend is known but cannot run here (or cannot run this case)."""


def backend_module(name: str):
    """Import the module implementing backend ``name`` (not for "naive" or "auto")."""
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as e:
        raise BackendUnavailableError(
            f"backend {name!r} could not be imported ({e}); install the package with its "
            f"dependencies (pip install rnnreg_kernels) or use backend='reference'") from e


def backend_problem(name: str, spec: Optional[Spec], x_proj: torch.Tensor,
                    w_hh: torch.Tensor) -> Optional[str]:
    """None when backend ``name`` can run this case here, else why not."""
    if name in ("reference", "naive"):
        return None
    try:
        mod = backend_module(name)
    except BackendUnavailableError as e:
        return str(e)
    why = mod.unavailable_reason(x_proj.device)
    if why is None and spec is not None:
        why = mod.unsupported_reason(spec, x_proj, w_hh)
    return why


def resolve_backend(backend: str, spec: Spec, x_proj: torch.Tensor, w_hh: torch.Tensor) -> str:
    """The backend that will run: ``backend`` itself, or auto's choice.

    ``auto`` honours the environment variable ``RNNREG_BACKEND``; then CUDA tensors use the
    first fused backend of ``("triton", "cuda")`` that supports the case (no GPU measurement
    is committed yet to say where ``native`` is faster), and every other case ``native``
    (PyTorch's own recurrence + the fused penalty pass; measured faster than ``reference`` on
    the CPU, docs/native.md) where it runs the cell, else ``reference`` (``trec``).
    """
    name = backend
    if name == "auto":
        env = os.environ.get("RNNREG_BACKEND", "auto") or "auto"
        if env not in BACKENDS:
            raise ValueError(f"environment variable RNNREG_BACKEND: expected one of "
                             f"{', '.join(BACKENDS)}, got {env!r}")
        name = env
    if name != "auto":
        why = backend_problem(name, spec, x_proj, w_hh)
        if why is not None:
            raise BackendUnavailableError(f"backend {name!r} cannot run this case: {why}")
        return name
    if x_proj.device.type == "cuda":
        for cand in _FUSED:
            if backend_problem(cand, spec, x_proj, w_hh) is None:
                return cand
    for cand in _FALLBACK:
        if backend_problem(cand, spec, x_proj, w_hh) is None:
            return cand
    return "reference"


class _Recurrence(torch.autograd.Function):
    """Autograd wrapper around one backend's forward/backward (no kernels here)."""

    @staticmethod
    def forward(ctx, mod, spec, x_proj, w_hh, h0, c0, ar_mask, lengths):
        output, h_n, c_n, terms, norms, saved = mod.forward(spec, x_proj, w_hh, h0, c0,
                                                            ar_mask, lengths)
        ctx.mod, ctx.spec = mod, spec
        ctx.n_saved = len(saved)
        ctx.has_saved = tuple(t is not None for t in saved)
        keep_x = x_proj if getattr(mod, "SAVE_X_PROJ", False) else None
        ctx.save_for_backward(keep_x, w_hh, h0, c0, ar_mask, lengths, output, norms,
                              *[t for t in saved if t is not None])
        ctx.mark_non_differentiable(norms)
        if c_n is None:
            c_n = h_n.new_empty(0)
        return output, h_n, c_n, terms, norms

    @staticmethod
    def backward(ctx, g_out, g_hn, g_cn, g_terms, _g_norms):
        x_proj, w_hh, h0, c0, ar_mask, lengths, output, norms, *rest = ctx.saved_tensors
        it = iter(rest)
        saved = tuple(next(it) if has else None for has in ctx.has_saved)
        lstm = ctx.spec.cell == "lstm"
        gx, gw, gh0, gc0 = ctx.mod.backward(
            ctx.spec, x_proj, w_hh, h0, c0, ar_mask, lengths, output, norms, saved,
            g_out.contiguous(), g_hn.contiguous(), g_cn.contiguous() if lstm else None,
            g_terms.contiguous())
        return None, None, gx, gw, gh0, gc0 if lstm else None, None, None


def _check_tensor(name: str, t, shape: Sequence[int], what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor {what}, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {what} = {list(shape)}, got {list(t.shape)}")


def _check_lengths(lengths, T: int, B: int, device) -> Optional[torch.Tensor]:
    if lengths is None:
        return None
    if not isinstance(lengths, torch.Tensor):
        try:
            lengths = torch.as_tensor(lengths)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"lengths: expected a [B] = [{B}] integer tensor or sequence, "
                             f"got {type(lengths).__name__}") from e
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise ValueError(f"lengths: expected an integer tensor, got dtype {lengths.dtype}")
    if tuple(lengths.shape) != (B,):
        raise ValueError(f"lengths: expected shape [B] = [{B}], got {list(lengths.shape)}")
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < 1 or hi > T:
        raise ValueError(f"lengths: every length must be in 1..T = 1..{T}, got values in "
                         f"{lo}..{hi}")
    return lengths.to(device=device, dtype=torch.int64).contiguous()


def recurrence(x_proj: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor,
               c0: Optional[torch.Tensor] = None, *, cell: str,
               penalties: Optional[Penalties] = None,
               lengths: Union[torch.Tensor, Sequence[int], None] = None, reverse: bool = False,
               backend: str = "auto", theta: float = 1.0) -> RecurrenceOutput:
    """One RNN layer in one direction, with the penalties computed alongside.

    Args:
        x_proj: ``[T, B, G*H]`` input projection with both biases added
            (``x @ W_ih^T + b_ih + b_hh``); G = 4 for LSTM (gates i, f, g, o), else 1.
            float16, bfloat16, float32 or float64.
        w_hh: ``[G*H, H]`` recurrent weight (PyTorch layout), same dtype and device.
        h0: ``[B, H]`` initial hidden state.
        c0: ``[B, H]`` initial cell state, LSTM only (required there).
        cell: ``"lstm"``, ``"relu"`` (IRNN), ``"tanh"`` or ``"trec"`` (z * [z > theta]).
        penalties: :class:`Penalties` (None = all off).
        lengths: ``[B]`` valid steps per row, each in 1..T, or None (all T).
        reverse: run time backwards (each row from its own last valid position).
        backend: ``"auto"``, ``"reference"``, ``"naive"``, ``"triton"``, ``"cuda"`` or
            ``"native"`` (PyTorch's own RNN kernels + the fused penalty pass; no ``trec``).
        theta: threshold of the ``trec`` cell.

    Returns:
        :class:`RecurrenceOutput` ``(output [T, B, H], h_n [B, H], c_n [B, H] or None,
        penalty (0-dim), terms (Terms of 0-dim), norms [T+1, B])``.  ``norms[k]`` is
        sqrt(sum h^2 + H*eps) of the state after k processing steps (0 past a row's length),
        float32 (float64 for float64 input); penalty and terms are float32 (float64 likewise).
    """
    if not isinstance(x_proj, torch.Tensor):
        raise TypeError(f"x_proj: expected a [T, B, G*H] tensor, got {type(x_proj).__name__}")
    if x_proj.dim() != 3:
        raise ValueError(f"x_proj: expected 3 dimensions [T, B, G*H], got shape "
                         f"{list(x_proj.shape)}")
    if x_proj.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x_proj: expected float16, bfloat16, float32 or float64, got "
                        f"{x_proj.dtype}")
    if not isinstance(cell, str) or cell not in CELLS:
        raise ValueError(f"cell: expected one of {', '.join(CELLS)}, got {cell!r}")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if penalties is None:
        penalties = Penalties()
    if not isinstance(penalties, Penalties):
        raise TypeError(f"penalties: expected rnnreg_kernels.Penalties or None, got "
                        f"{type(penalties).__name__}")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta):
        raise ValueError(f"theta: expected a finite number, got {theta!r}")
    T, B, GH = x_proj.shape
    G = gates_of(cell)
    if T < 1 or B < 1 or GH < 1:
        raise ValueError(f"x_proj: expected T, B, G*H >= 1, got shape {list(x_proj.shape)}")
    if not isinstance(w_hh, torch.Tensor) or w_hh.dim() != 2:
        raise ValueError(f"w_hh: expected a 2-D tensor [G*H, H], got "
                         f"{list(w_hh.shape) if isinstance(w_hh, torch.Tensor) else w_hh!r}")
    H = w_hh.shape[1]
    if GH != G * H:
        raise ValueError(f"x_proj: expected last dimension G*H = {G}*{H} = {G * H} for cell "
                         f"{cell!r} (H from w_hh), got {GH}")
    _check_tensor("w_hh", w_hh, (G * H, H), "[G*H, H]")
    _check_tensor("h0", h0, (B, H), "[B, H]")
    if cell == "lstm":
        if c0 is None:
            raise ValueError("c0: the lstm cell needs an initial cell state [B, H], got None")
        _check_tensor("c0", c0, (B, H), "[B, H]")
    elif c0 is not None:
        raise ValueError(f"c0: only the lstm cell has a cell state; expected None for cell "
                         f"{cell!r}, got a tensor")
    for name, t in (("w_hh", w_hh), ("h0", h0), ("c0", c0)):
        if t is None:
            continue
        if t.dtype != x_proj.dtype:
            raise TypeError(f"{name}: expected dtype {x_proj.dtype} (the dtype of x_proj), "
                            f"got {t.dtype}")
        if t.device != x_proj.device:
            raise ValueError(f"{name}: expected device {x_proj.device} (the device of x_proj), "
                             f"got {t.device}")
    penalties.check_mask(B, H)
    ar_mask = penalties.ar_mask
    if ar_mask is not None:
        if ar_mask.device != x_proj.device:
            raise ValueError(f"Penalties.ar_mask: expected device {x_proj.device} (the device "
                             f"of x_proj), got {ar_mask.device}")
        ar_mask = ar_mask.detach().to(x_proj.dtype).contiguous()
    lengths = _check_lengths(lengths, T, B, x_proj.device)
    if lengths is not None and int(lengths.min()) == T:
        lengths = None  # every row is full: the plain path computes the same thing
    w = penalty_weights(penalties, T, B, H, lengths)
    spec = Spec(cell=cell, theta=float(theta), w_ns=w.ns, w_tar=w.tar, w_ar=w.ar,
                ns_include_initial=penalties.ns_include_initial,
                ns_eps=float(penalties.ns_eps), reverse=bool(reverse),
                allow_tf32=bool(torch.backends.cuda.matmul.allow_tf32))
    name = resolve_backend(backend, spec, x_proj, w_hh)
    x_proj, w_hh, h0 = x_proj.contiguous(), w_hh.contiguous(), h0.contiguous()
    c0 = c0.contiguous() if c0 is not None else None
    if name == "naive":
        output, h_n, c_n, terms, norms = _naive(x_proj, w_hh, h0, c0, cell, spec, penalties,
                                                lengths)
    elif name == "native":
        from .native import recurrence as _native
        output, h_n, c_n, terms, norms = _native(x_proj, w_hh, h0, c0, spec, penalties,
                                                 lengths)
    else:
        output, h_n, c_n, terms, norms = _Recurrence.apply(
            backend_module(name), spec, x_proj, w_hh, h0, c0, ar_mask, lengths)
        if cell != "lstm":
            c_n = None
    t = Terms(*terms.unbind(0))
    return RecurrenceOutput(output, h_n, c_n, terms.sum(), t, norms)


def _naive(x_proj, w_hh, h0, c0, cell, spec, penalties, lengths):
    from .reference import naive
    return naive(x_proj, w_hh, h0, c0, cell=cell, theta=spec.theta, penalties=penalties,
                 lengths=lengths, reverse=spec.reverse)
