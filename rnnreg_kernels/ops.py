"""``recurrence``: the one functional op, its argument checks, backend choice and autograd.

Everything above (modules, benchmarks, tests) calls :func:`recurrence`; everything below
(reference, Triton, CUDA) implements the contract of :mod:`rnnreg_kernels.contract`.
"""
from __future__ import annotations

import functools
import importlib
import math
import os
from typing import NamedTuple, Optional, Sequence, Union

import torch

from . import auto_rule, library  # noqa: F401  (library registers the rnnreg:: custom ops)
from .contract import CELLS, LSTM_CELLS, Spec, acc_dtype_of, gates_of, has_cell_state
from .library import RawSpec
from .penalties import Penalties, as_penalties, norm_terms, penalty_weights

BACKENDS = ("auto", "reference", "naive", "triton", "cuda", "native")
# auto's choice where no measurement picks a fused backend (CUDA: rnnreg_kernels.auto_rule) and
# on the CPU: PyTorch's own recurrence where it runs the case (every cell but trec and normprop,
# no cell norms), else the reference loop.  Measured on the CPU: docs/native.md.
_FALLBACK = ("native", "reference")
_MODULES = {"reference": "rnnreg_kernels.reference", "triton": "rnnreg_kernels.triton",
            "cuda": "rnnreg_kernels.cuda", "native": "rnnreg_kernels.native"}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Terms(NamedTuple):
    """The five weighted penalty terms (0-dim tensors, each in the autograd graph), in the
    order of :data:`rnnreg_kernels.penalties.TERM_NAMES`."""

    norm_stabilizer: torch.Tensor
    tar: torch.Tensor
    ar: torch.Tensor
    cell_norm_stabilizer: torch.Tensor
    norm_target: torch.Tensor


class RecurrenceOutput(NamedTuple):
    """What :func:`recurrence` returns (see its docstring for shapes)."""

    output: torch.Tensor
    h_n: torch.Tensor
    c_n: Optional[torch.Tensor]
    penalty: torch.Tensor
    terms: Terms
    norms: torch.Tensor
    cell_norms: Optional[torch.Tensor] = None


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


@functools.lru_cache(maxsize=None)
def _gpu_name_of(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _gpu_name(device: torch.device) -> str:
    return _gpu_name_of(device.index if device.index is not None
                        else torch.cuda.current_device())


def resolve_backend(backend: str, spec: Spec, x_proj: torch.Tensor, w_hh: torch.Tensor) -> str:
    """The backend that will run: ``backend`` itself, or auto's choice.

    ``auto`` honours the environment variable ``RNNREG_BACKEND``; then CUDA tensors use a
    fused backend (``triton``, ``cuda``) only where a committed GPU measurement found it faster
    than ``native`` and ``nn.LSTM`` + eager post-hoc penalties (:mod:`rnnreg_kernels.auto_rule`;
    none is committed yet), and every case ``native`` (PyTorch's own recurrence + the fused
    penalty pass; measured faster than ``reference`` on the CPU, docs/native.md) where it runs
    the cell, else ``reference`` (``trec``, ``normprop``, cell norms, and under torch.func
    transforms, which PyTorch's RNN kernels do not support).
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
        cand = auto_rule.fused_choice(_gpu_name(x_proj.device), spec.cell, x_proj.dtype,
                                      w_hh.shape[1], x_proj.shape[1])
        if cand is not None and backend_problem(cand, spec, x_proj, w_hh) is None:
            return cand
    for cand in _FALLBACK:
        if cand == "native" and torch._C._are_functorch_transforms_active():
            continue  # PyTorch's RNN kernels have no vmap rule; the reference's Function has
        if backend_problem(cand, spec, x_proj, w_hh) is None:
            return cand
    return "reference"


# ----------------------------------------------------------------------------- autograd
#
# Two autograd.Functions in the setup_context style (so torch.func transforms accept them),
# each with a vmap rule that runs the backend once per vmapped slice:
#
# * _Recurrence: forward = a backend's forward; its outputs are (output, h_n, c_n, terms,
#   norms, cell_norms, *saved) with the backend's saved tensors returned as non-differentiable
#   outputs (a None encoded as a 1-D empty tensor), so that setup_context can keep them.
#   norms and cell_norms are differentiable: their gradients go to the backend's backward as
#   grad_norms / grad_cell_norms (the radial terms); cell_scale (normprop) is a differentiable
#   input.  The terms that depend only on the norms (cell norm-stabilizer, norm_target) are
#   torch ops on these outputs in recurrence() (penalties.norm_terms), outside the Function.
# * _RecurrenceBackward: forward = the backend's backward; called by _Recurrence.backward, so
#   that the first backward is itself a recorded op.  Its backward (the double backward) is
#   the vector-Jacobian product of the first backward, computed by recomputing the recurrence
#   through the differentiable naive loop (reference.naive_from_spec) with torch.func.vjp
#   twice.  That needs x_proj: the reference backend always keeps it (by reference, no copy);
#   a backend with SAVE_X_PROJ = False (triton, cuda) keeps it only inside
#   `with higher_order_grads():`, as cuDNN needs cuDNN disabled for double backward.

_HIGHER_ORDER = [0]


class higher_order_grads:
    """Context manager: forwards run inside keep ``x_proj`` on every backend, so that
    ``create_graph=True`` / double backward / ``gradgradcheck`` work through them.

    The reference backend always keeps it; the fused backends (``triton``, ``cuda``) do not
    by default, since it is a ``[T, B, G*H]`` buffer beyond what their backward needs.
    Re-entrant; only the forward needs to run inside.
    """

    def __enter__(self):
        _HIGHER_ORDER[0] += 1
        return self

    def __exit__(self, *exc):
        _HIGHER_ORDER[0] -= 1
        return False


_ALWAYS_KEEP_X = ("reference",)


@torch.compiler.assume_constant_result
def _saves_x_proj(name: str) -> bool:
    return bool(getattr(backend_module(name), "SAVE_X_PROJ", False))


def _keeps_x_proj(name: str) -> bool:
    return name in _ALWAYS_KEEP_X or _HIGHER_ORDER[0] > 0 or _saves_x_proj(name)


def _spec_of(raw, x_proj_shape, H, lengths) -> Spec:
    from .library import make_spec
    T, B = x_proj_shape[0], x_proj_shape[1]
    return make_spec(raw.cell, raw.theta, raw.norm_stabilizer, raw.tar, raw.ar,
                     raw.ns_include_initial, raw.ns_eps, raw.reverse, raw.allow_tf32, T, B, H,
                     lengths, raw.h_scale, raw.cell_norms)


def _encode(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if t is None else t


def _slices(info, in_dims, args) -> list:
    """The per-sample argument lists of a vmapped call (unbatched args repeated)."""
    cols = []
    for a, d in zip(args, in_dims):
        if d is None or not isinstance(a, torch.Tensor):
            cols.append([a] * info.batch_size)
        else:
            cols.append(list(a.movedim(d, 0).unbind(0)))
    return [list(row) for row in zip(*cols)]


def _stack(results) -> tuple:
    """Per-sample output tuples -> (stacked outputs, out_dims of zeros)."""
    outs = tuple(torch.stack(list(col)) for col in zip(*results))
    return outs, (0,) * len(outs)


# _Recurrence's outputs before the backend's saved tensors:
# output, h_n, c_n, terms, norms, cell_norms
_N_OUT = 6


class _Recurrence(torch.autograd.Function):
    """Autograd wrapper around one backend's forward/backward (no kernels here).

    Differentiable inputs: x_proj, w_hh, h0, c0, cell_scale.  Differentiable outputs:
    output, h_n, c_n, terms, norms and cell_norms (their gradients reach the backend's
    backward as grad_norms / grad_cell_norms, None where autograd had none)."""

    @staticmethod
    def forward(raw, x_proj, w_hh, h0, c0, ar_mask, lengths, cell_scale):
        # the custom op returns (output, h_n, c_n, terms, norms, cell_norms, *saved), encoded
        # and with no aliasing (rnnreg_kernels.library)
        return tuple(torch.ops.rnnreg.recurrence_fwd(x_proj, w_hh, h0, c0, ar_mask, lengths,
                                                     cell_scale, *raw.args()))

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        raw, x_proj, w_hh, h0, c0, ar_mask, lengths, cell_scale = inputs
        output, norms, cell_norms = outputs[0], outputs[4], outputs[5]
        saved = outputs[_N_OUT:]
        ctx.raw = raw
        ctx.keep_x = _keeps_x_proj(raw.backend)
        keep = x_proj if ctx.keep_x else None
        ctx.save_for_backward(keep, w_hh, h0, c0, ar_mask, lengths, cell_scale, output, norms,
                              cell_norms, *saved)
        if not (has_cell_state(raw.cell) and raw.cell_norms):
            ctx.mark_non_differentiable(cell_norms)  # the empty placeholder
        ctx.mark_non_differentiable(*saved)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, g_out, g_hn, g_cn, g_terms, g_norms, g_cell_norms, *_unused):
        (x_proj, w_hh, h0, c0, ar_mask, lengths, cell_scale, output, norms, cell_norms,
         *saved) = ctx.saved_tensors
        raw = ctx.raw
        lstm = has_cell_state(raw.cell)
        normprop = raw.cell == "normprop"
        g_out = torch.zeros_like(output) if g_out is None else g_out.contiguous()
        g_hn = torch.zeros_like(h0) if g_hn is None else g_hn.contiguous()
        g_cn = (torch.zeros_like(h0) if g_cn is None else g_cn.contiguous()) if lstm \
            else h0.new_empty(0)
        acc = norms.dtype
        g_terms = torch.zeros(3, dtype=acc, device=h0.device) if g_terms is None \
            else g_terms.contiguous()
        g_norms = None if g_norms is None else g_norms.to(acc).contiguous()
        cell_norms_on = lstm and raw.cell_norms
        g_cell_norms = None if g_cell_norms is None or not cell_norms_on \
            else g_cell_norms.to(acc).contiguous()
        if not cell_norms_on:
            cell_norms = None
        if torch.compiler.is_compiling():  # traced by AOTAutograd: the op, nothing else
            gx, gw, gh0, gc0, gcs = torch.ops.rnnreg.recurrence_bwd(
                x_proj, w_hh, h0, c0, ar_mask, lengths, cell_scale, output, norms, cell_norms,
                list(saved), g_out, g_hn, g_cn if lstm else None, g_terms, g_norms,
                g_cell_norms, *raw.args())
        elif _legacy_batched(g_out, g_hn, g_cn, g_terms, g_norms, g_cell_norms):
            # autograd.grad(is_grads_batched=True) (gradcheck's check_batched_grad) batches
            # the grads without a torch.func transform, so no vmap rule runs: go through the
            # batchable naive recompute.
            _need_x(x_proj, raw.backend)
            spec = _spec_of(raw, output.shape, h0.shape[1], lengths)
            gx, gw, gh0, gc0, gcs = _naive_vjp(spec, x_proj, w_hh, h0, c0, ar_mask, lengths,
                                               cell_scale, g_out, g_hn, g_cn, g_terms,
                                               g_norms, g_cell_norms)
        else:
            gx, gw, gh0, gc0, gcs = _RecurrenceBackward.apply(
                raw, ctx.keep_x, x_proj, w_hh, h0, c0, ar_mask, lengths, cell_scale, output,
                norms, cell_norms, g_out, g_hn, g_cn, g_terms, g_norms, g_cell_norms, *saved)
        return (None, gx, gw, gh0, gc0 if lstm else None, None, None,
                gcs if normprop else None)

    @staticmethod
    def vmap(info, in_dims, *args):
        return _stack([_Recurrence.apply(*row) for row in _slices(info, in_dims, args)])


# _RecurrenceBackward's inputs: raw, keep_x, then these tensors, then *saved
_BWD_TENSORS = ("x_proj", "w_hh", "h0", "c0", "ar_mask", "lengths", "cell_scale", "output",
                "norms", "cell_norms", "g_out", "g_hn", "g_cn", "g_terms", "g_norms",
                "g_cell_norms")
_N_BWD = 2 + len(_BWD_TENSORS)


class _RecurrenceBackward(torch.autograd.Function):
    """A backend's backward as a recorded op; its own backward recomputes (see above)."""

    @staticmethod
    def forward(raw, keep_x, x_proj, w_hh, h0, c0, ar_mask, lengths, cell_scale, output,
                norms, cell_norms, g_out, g_hn, g_cn, g_terms, g_norms, g_cell_norms, *saved):
        lstm = has_cell_state(raw.cell)
        return tuple(torch.ops.rnnreg.recurrence_bwd(
            x_proj, w_hh, h0, c0, ar_mask, lengths, cell_scale, output, norms, cell_norms,
            list(saved), g_out, g_hn, g_cn if lstm else None, g_terms, g_norms, g_cell_norms,
            *raw.args()))

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        t = dict(zip(_BWD_TENSORS, inputs[2:_N_BWD]))
        ctx.raw, ctx.keep_x = inputs[0], inputs[1]
        ctx.n_inputs = len(inputs)
        ctx.has_g_norms = t["g_norms"] is not None
        ctx.has_g_cell_norms = t["g_cell_norms"] is not None
        ctx.save_for_backward(*(t[n] for n in ("x_proj", "w_hh", "h0", "c0", "ar_mask",
                                               "lengths", "cell_scale", "g_out", "g_hn",
                                               "g_cn", "g_terms", "g_norms", "g_cell_norms")))

    @staticmethod
    def backward(ctx, v_x, v_w, v_h0, v_c0, v_cs):
        (x_proj, w_hh, h0, c0, ar_mask, lengths, cell_scale, g_out, g_hn, g_cn, g_terms,
         g_norms, g_cell_norms) = ctx.saved_tensors
        _need_x(x_proj, ctx.raw.backend)
        lstm = has_cell_state(ctx.raw.cell)
        normprop = ctx.raw.cell == "normprop"
        spec = _spec_of(ctx.raw, g_out.shape, h0.shape[1], lengths)
        grads = _double_backward(spec, x_proj, w_hh, h0, c0, ar_mask, lengths, cell_scale,
                                 g_out, g_hn, g_cn, g_terms, g_norms, g_cell_norms,
                                 (v_x, v_w, v_h0, v_c0, v_cs))
        gx, gw, gh0, gc0, gcs, gg_out, gg_hn, gg_cn, gg_terms, gg_n, gg_cn_norms = grads
        head = (None, None, gx, gw, gh0, gc0 if lstm else None, None, None,
                gcs if normprop else None, None, None, None)
        tail = (gg_out, gg_hn, gg_cn if lstm else None, gg_terms,
                gg_n if ctx.has_g_norms else None,
                gg_cn_norms if ctx.has_g_cell_norms else None)
        return head + tail + (None,) * (ctx.n_inputs - _N_BWD)

    @staticmethod
    def vmap(info, in_dims, *args):
        return _stack([_RecurrenceBackward.apply(*row) for row in _slices(info, in_dims, args)])


def _legacy_batched(*ts) -> bool:
    is_legacy = getattr(torch._C._functorch, "is_legacy_batchedtensor", None)
    return is_legacy is not None and any(t is not None and is_legacy(t) for t in ts)


def _need_x(x_proj, name: str) -> None:
    if x_proj is None:
        raise RuntimeError(
            f"a higher-order or batched gradient through recurrence(backend={name!r}) needs "
            f"x_proj, which this backend does not keep by default (a [T, B, G*H] buffer): "
            f"run the forward inside `with rnnreg_kernels.higher_order_grads():`, or use "
            f"backend='reference'")


def _naive_first(spec, ar_mask, lengths):
    """(x, w, h0, c, a, g_out, g_hn, g_cn, g_terms, g_norms, g_cell_norms) -> first-order
    grads (x, w, h0, c, a), by torch.func.vjp of the naive loop.  Placeholders (empty
    tensors) stand for what a case does not have: c and g_cn for plain RNN cells, a for cells
    other than normprop, the cell norms and their gradient without spec.cell_norms."""
    from torch.func import vjp

    from .reference import naive_from_spec
    lstm = spec.has_cell_state
    normprop = spec.cell == "normprop"
    with_cn = lstm and spec.cell_norms

    def forward(x, w, h, c, a):
        output, h_n, c_n, terms, norms, cnorms = naive_from_spec(
            spec, x, w, h, c if lstm else None, ar_mask, lengths, a if normprop else None)
        return (output, h_n, (c_n if lstm else c), terms, norms,
                cnorms if with_cn else norms.new_zeros(0))

    def first(x, w, h, c, a, go, ghn, gcn, gt, gn, gm):
        _, pull = vjp(forward, x, w, h, c, a)
        return pull((go, ghn, gcn if lstm else torch.zeros_like(c), gt, gn,
                     gm if with_cn else gn.new_zeros(0)))
    return first


def _placeholders(spec, x_proj, h0, c0, cell_scale, g_out, g_cn, g_terms, g_norms,
                  g_cell_norms) -> tuple:
    """(c, a, g_cn, g_norms, g_cell_norms) with empty / zero tensors for the missing ones."""
    T, B = g_out.shape[0], g_out.shape[1]
    acc = g_terms.dtype
    lstm = spec.has_cell_state
    c = c0 if lstm else h0.new_zeros(0)
    a = cell_scale if spec.cell == "normprop" else h0.new_zeros(0, dtype=acc)
    gcn = g_cn if lstm else h0.new_zeros(0)
    zeros_n = torch.zeros(T + 1, B, dtype=acc, device=h0.device)
    gn = zeros_n if g_norms is None else g_norms
    gm = (zeros_n if g_cell_norms is None else g_cell_norms) if lstm and spec.cell_norms \
        else zeros_n.new_zeros(0)
    return c, a, gcn, gn, gm


def _naive_vjp(spec, x_proj, w_hh, h0, c0, ar_mask, lengths, cell_scale, g_out, g_hn, g_cn,
               g_terms, g_norms, g_cell_norms):
    """First-order grads (x, w, h0, c0 or None, cell_scale or None) by the naive recompute."""
    first = _naive_first(spec, ar_mask, lengths)
    c, a, gcn, gn, gm = _placeholders(spec, x_proj, h0, c0, cell_scale, g_out, g_cn, g_terms,
                                      g_norms, g_cell_norms)
    gx, gw, gh0, gc0, ga = first(x_proj, w_hh, h0, c, a, g_out, g_hn, gcn, g_terms, gn, gm)
    return (gx, gw, gh0, gc0 if spec.has_cell_state else None,
            ga if spec.cell == "normprop" else None)


def _double_backward(spec, x_proj, w_hh, h0, c0, ar_mask, lengths, cell_scale, g_out, g_hn,
                     g_cn, g_terms, g_norms, g_cell_norms, vs):
    """VJP of (x, w, h0, c0, cell_scale, upstream grads) -> first-order grads, by
    recomputation through the naive loop; returns grads for x, w, h0, c0, cell_scale, g_out,
    g_hn, g_cn, g_terms, g_norms, g_cell_norms (placeholder entries are meaningless)."""
    from torch.func import vjp

    first = _naive_first(spec, ar_mask, lengths)
    c, a, gcn, gn, gm = _placeholders(spec, x_proj, h0, c0, cell_scale, g_out, g_cn, g_terms,
                                      g_norms, g_cell_norms)
    prims = (x_proj, w_hh, h0, c, a)
    vs = [torch.zeros_like(p) if v is None or p.numel() == 0 else v
          for v, p in zip(vs, prims)]
    _, pull2 = vjp(first, x_proj, w_hh, h0, c, a, g_out, g_hn, gcn, g_terms, gn, gm)
    return list(pull2(tuple(vs)))


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


def _check_cell_scale(cell: str, cell_scale, h_scale, H: int, device) -> None:
    """The normprop arguments: ``cell_scale [H]`` and ``h_scale > 0`` for normprop, None and
    1.0 for every other cell."""
    if isinstance(h_scale, bool) or not isinstance(h_scale, (int, float)):
        raise TypeError(f"h_scale: expected a positive finite number, got "
                        f"{type(h_scale).__name__}")
    if cell != "normprop":
        if cell_scale is not None:
            raise ValueError(f"cell_scale: only the normprop cell takes a cell scale; expected "
                             f"None for cell {cell!r}, got a tensor")
        if h_scale != 1.0:
            raise ValueError(f"h_scale: only the normprop cell takes an output scale; expected "
                             f"1.0 for cell {cell!r}, got {h_scale!r}")
        return
    if not math.isfinite(h_scale) or h_scale <= 0:
        raise ValueError(f"h_scale: expected a positive finite number (1 / sigma_h), got "
                         f"{h_scale!r}")
    if cell_scale is None:
        raise ValueError("cell_scale: the normprop cell needs its per-unit scale [H] "
                         "(gamma_c / sigma_c), got None")
    if not isinstance(cell_scale, torch.Tensor):
        raise TypeError(f"cell_scale: expected a [H] = [{H}] floating tensor, got "
                        f"{type(cell_scale).__name__}")
    if tuple(cell_scale.shape) != (H,):
        raise ValueError(f"cell_scale: expected shape [H] = [{H}], got "
                         f"{list(cell_scale.shape)}")
    if cell_scale.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"cell_scale: expected a floating dtype (float16, bfloat16, float32, "
                        f"float64), got {cell_scale.dtype}")
    if cell_scale.device != device:
        raise ValueError(f"cell_scale: expected device {device} (the device of x_proj), got "
                         f"{cell_scale.device}")


def recurrence(x_proj: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor,
               c0: Optional[torch.Tensor] = None, *, cell: str,
               penalties: Optional[Penalties] = None,
               lengths: Union[torch.Tensor, Sequence[int], None] = None, reverse: bool = False,
               backend: str = "auto", theta: float = 1.0,
               cell_scale: Optional[torch.Tensor] = None, h_scale: float = 1.0,
               cell_norms: bool = False) -> RecurrenceOutput:
    """One RNN layer in one direction, with the penalties computed alongside.

    Args:
        x_proj: ``[T, B, G*H]`` input projection with both biases added
            (``x @ W_ih^T + b_ih + b_hh``); G = 4 for the LSTM-type cells (gates i, f, g, o),
            else 1.  float16, bfloat16, float32 or float64.
        w_hh: ``[G*H, H]`` recurrent weight (PyTorch layout), same dtype and device.
        h0: ``[B, H]`` initial hidden state.
        c0: ``[B, H]`` initial cell state, LSTM-type cells only (required there).
        cell: ``"lstm"``, ``"normprop"`` (the LSTM with h = o * tanh(cell_scale * c) *
            h_scale), ``"relu"`` (IRNN), ``"tanh"`` or ``"trec"`` (z * [z > theta]).
        penalties: :class:`Penalties` (None = all off).
        lengths: ``[B]`` valid steps per row, each in 1..T, or None (all T).
        reverse: run time backwards (each row from its own last valid position).
        backend: ``"auto"``, ``"reference"``, ``"naive"``, ``"triton"``, ``"cuda"`` or
            ``"native"`` (PyTorch's own RNN kernels + the fused penalty pass; no ``trec``, no
            ``normprop``, no cell norms).
        theta: threshold of the ``trec`` cell.
        cell_scale: normprop only (required there): ``[H]`` floating tensor on x_proj's
            device (any float dtype), gamma_c / sigma_c; it gets a gradient.
        h_scale: normprop only: the positive constant 1 / sigma_h (1.0 for every other cell).
        cell_norms: also return the memory-cell norms (LSTM-type cells only); implied by
            ``penalties.cell_norm_stabilizer > 0``.

    Returns:
        :class:`RecurrenceOutput` ``(output [T, B, H], h_n [B, H], c_n [B, H] or None,
        penalty (0-dim), terms (Terms of 0-dim), norms [T+1, B], cell_norms [T+1, B] or
        None)``.  ``norms[k]`` is sqrt(sum h^2 + H*eps) of the state after k processing steps
        (0 past a row's length), ``cell_norms[k]`` the same of the cell state; both float32
        (float64 for float64 input) and in the autograd graph: a differentiable function of
        them is a penalty whose gradient reaches the backend's backward.  penalty (the sum of
        the five terms) and terms are float32 (float64 likewise).
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
    penalties = as_penalties(penalties)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta):
        raise ValueError(f"theta: expected a finite number, got {theta!r}")
    if not isinstance(cell_norms, bool):
        raise TypeError(f"cell_norms: expected a bool, got {type(cell_norms).__name__}")
    lstm = has_cell_state(cell)
    if cell_norms and not lstm:
        raise ValueError(f"cell_norms: only the cells with a cell state "
                         f"({', '.join(LSTM_CELLS)}) have cell norms; expected False for cell "
                         f"{cell!r}, got True")
    if penalties.cell_norm_stabilizer > 0 and not lstm:
        raise ValueError(f"penalties.cell_norm_stabilizer: only the cells with a cell state "
                         f"({', '.join(LSTM_CELLS)}) have one; expected 0 for cell {cell!r}, "
                         f"got {penalties.cell_norm_stabilizer!r}")
    want_cn = lstm and (cell_norms or penalties.needs_cell_norms)
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
    if lstm:
        if c0 is None:
            raise ValueError(f"c0: the {cell} cell needs an initial cell state [B, H], got None")
        _check_tensor("c0", c0, (B, H), "[B, H]")
    elif c0 is not None:
        raise ValueError(f"c0: only the cells with a cell state ({', '.join(LSTM_CELLS)}) "
                         f"take c0; expected None for cell {cell!r}, got a tensor")
    for name, t in (("w_hh", w_hh), ("h0", h0), ("c0", c0)):
        if t is None:
            continue
        if t.dtype != x_proj.dtype:
            raise TypeError(f"{name}: expected dtype {x_proj.dtype} (the dtype of x_proj), "
                            f"got {t.dtype}")
        if t.device != x_proj.device:
            raise ValueError(f"{name}: expected device {x_proj.device} (the device of x_proj), "
                             f"got {t.device}")
    _check_cell_scale(cell, cell_scale, h_scale, H, x_proj.device)
    h_scale = float(h_scale)
    penalties.check_mask(B, H, x_proj.device, "x_proj")
    ar_mask = penalties.ar_mask
    if ar_mask is not None:
        ar_mask = ar_mask.detach().to(x_proj.dtype).contiguous()
    lengths = _check_lengths(lengths, T, B, x_proj.device)
    if lengths is not None and int(lengths.min()) == T:
        lengths = None  # every row is full: the plain path computes the same thing
    acc = acc_dtype_of(x_proj.dtype)
    if cell_scale is not None:
        # the backends take it in acc dtype; autograd casts its gradient back
        cell_scale = cell_scale.to(acc).contiguous()
    tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
    if torch.compiler.is_compiling():
        # no value that depends on T may become a constant of the graph: the custom op
        # divides the coefficients itself, and the backend is chosen once per compile
        name = _compile_time_backend(backend, x_proj.device.type, x_proj.dtype, cell, H,
                                     bool(reverse), tf32, h_scale, want_cn)
    else:
        w = penalty_weights(penalties, T, B, H, lengths)
        spec = Spec(cell=cell, theta=float(theta), w_ns=w.ns, w_tar=w.tar, w_ar=w.ar,
                    ns_include_initial=penalties.ns_include_initial,
                    ns_eps=float(penalties.ns_eps), reverse=bool(reverse), allow_tf32=tf32,
                    h_scale=h_scale, cell_norms=want_cn)
        name = resolve_backend(backend, spec, x_proj, w_hh)
    x_proj, w_hh, h0 = x_proj.contiguous(), w_hh.contiguous(), h0.contiguous()
    c0 = c0.contiguous() if c0 is not None else None
    if name == "naive":
        from .reference import naive
        output, h_n, c_n, terms, norms, cnorms = naive(
            x_proj, w_hh, h0, c0, cell=cell, theta=float(theta), penalties=penalties,
            lengths=lengths, reverse=bool(reverse), cell_scale=cell_scale, h_scale=h_scale,
            cell_norms=want_cn)
    elif name == "native":
        from .native import recurrence as _native
        output, h_n, c_n, terms, norms = _native(x_proj, w_hh, h0, c0, spec, penalties,
                                                 lengths)
        cnorms = None
    else:
        raw = RawSpec(backend=name, cell=cell, theta=float(theta),
                      norm_stabilizer=float(penalties.norm_stabilizer),
                      tar=float(penalties.tar), ar=float(penalties.ar),
                      ns_include_initial=penalties.ns_include_initial,
                      ns_eps=float(penalties.ns_eps), reverse=bool(reverse), allow_tf32=tf32,
                      h_scale=h_scale, cell_norms=want_cn)
        output, h_n, c_n, terms3, norms, cnorms = _Recurrence.apply(
            raw, x_proj, w_hh, h0, c0, ar_mask, lengths, cell_scale)[:_N_OUT]
        if not lstm:
            c_n = None
        if not want_cn:
            cnorms = None
        terms = torch.cat([terms3, norm_terms(norms, cnorms, penalties, lengths)])
    t = Terms(*terms.unbind(0))
    return RecurrenceOutput(output, h_n, c_n, terms.sum(), t, norms, cnorms)


@torch.compiler.assume_constant_result
def _compile_time_backend(backend: str, device_type: str, dtype: torch.dtype, cell: str,
                          H: int, reverse: bool, tf32: bool, h_scale: float = 1.0,
                          cell_norms: bool = False) -> str:
    """:func:`resolve_backend` for a traced call, from what stays constant in the graph
    (a two-step probe stands in for the sequence; the backends decide on cell, dtype,
    device and H)."""
    G = gates_of(cell)
    dev = torch.device(device_type)
    x = torch.zeros(2, 1, G * H, dtype=dtype, device=dev)
    w = torch.zeros(G * H, H, dtype=dtype, device=dev)
    spec = Spec(cell=cell, theta=1.0, w_ns=0.0, w_tar=0.0, w_ar=0.0,
                ns_include_initial=False, ns_eps=1e-9, reverse=reverse, allow_tf32=tf32,
                h_scale=h_scale, cell_norms=cell_norms)
    name = resolve_backend(backend, spec, x, w)
    # native's recurrence() path computes the penalty divisors from T in Python, which a
    # traced graph would freeze; under torch.compile auto takes the reference custom ops
    # instead (the modules' native whole-layer path compiles on its own, docs/integration.md)
    if name == "native" and backend == "auto":
        name = "reference"
    if name == "native":
        raise BackendUnavailableError(
            "backend 'native': recurrence() under torch.compile is not supported with the "
            "native backend (its penalty divisors depend on T); use backend='reference' or "
            "'auto' there, or call the modules")
    return name
