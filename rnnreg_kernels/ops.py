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

from . import library  # noqa: F401  (registers the rnnreg:: custom ops)
from .contract import CELLS, Spec, gates_of
from .library import RawSpec
from .penalties import Penalties, as_penalties, penalty_weights

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
    the CPU, docs/native.md) where it runs the cell, else ``reference`` (``trec``, and under
    torch.func transforms, which PyTorch's RNN kernels do not support).
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
#   norms, *saved) with the backend's saved tensors returned as non-differentiable outputs (a
#   None encoded as a 1-D empty tensor), so that setup_context can keep them.
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
                     lengths)


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


class _Recurrence(torch.autograd.Function):
    """Autograd wrapper around one backend's forward/backward (no kernels here)."""

    @staticmethod
    def forward(raw, x_proj, w_hh, h0, c0, ar_mask, lengths):
        # the custom op returns (output, h_n, c_n, terms, norms, *saved), encoded and with
        # no aliasing (rnnreg_kernels.library)
        return tuple(torch.ops.rnnreg.recurrence_fwd(x_proj, w_hh, h0, c0, ar_mask, lengths,
                                                     *raw.args()))

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        raw, x_proj, w_hh, h0, c0, ar_mask, lengths = inputs
        output, norms, saved = outputs[0], outputs[4], outputs[5:]
        ctx.raw = raw
        ctx.keep_x = _keeps_x_proj(raw.backend)
        keep = x_proj if ctx.keep_x else None
        ctx.save_for_backward(keep, w_hh, h0, c0, ar_mask, lengths, output, norms, *saved)
        ctx.mark_non_differentiable(norms, *saved)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, g_out, g_hn, g_cn, g_terms, *_unused):
        x_proj, w_hh, h0, c0, ar_mask, lengths, output, norms, *saved = ctx.saved_tensors
        raw = ctx.raw
        lstm = raw.cell == "lstm"
        g_out = torch.zeros_like(output) if g_out is None else g_out.contiguous()
        g_hn = torch.zeros_like(h0) if g_hn is None else g_hn.contiguous()
        g_cn = (torch.zeros_like(h0) if g_cn is None else g_cn.contiguous()) if lstm \
            else h0.new_empty(0)
        acc = norms.dtype
        g_terms = torch.zeros(3, dtype=acc, device=h0.device) if g_terms is None \
            else g_terms.contiguous()
        if torch.compiler.is_compiling():  # traced by AOTAutograd: the op, nothing else
            gx, gw, gh0, gc0 = torch.ops.rnnreg.recurrence_bwd(
                x_proj, w_hh, h0, c0, ar_mask, lengths, output, norms, list(saved), g_out,
                g_hn, g_cn if lstm else None, g_terms, *raw.args())
        elif _legacy_batched(g_out, g_hn, g_cn, g_terms):
            # autograd.grad(is_grads_batched=True) (gradcheck's check_batched_grad) batches
            # the grads without a torch.func transform, so no vmap rule runs: go through the
            # batchable naive recompute.
            _need_x(x_proj, raw.backend)
            spec = _spec_of(raw, output.shape, h0.shape[1], lengths)
            gx, gw, gh0, gc0 = _naive_vjp(spec, lstm, x_proj, w_hh, h0, c0, ar_mask,
                                          lengths, g_out, g_hn, g_cn, g_terms)
        else:
            gx, gw, gh0, gc0 = _RecurrenceBackward.apply(
                raw, ctx.keep_x, x_proj, w_hh, h0, c0, ar_mask, lengths, output, norms, g_out,
                g_hn, g_cn, g_terms, *saved)
        return None, gx, gw, gh0, gc0 if lstm else None, None, None

    @staticmethod
    def vmap(info, in_dims, *args):
        return _stack([_Recurrence.apply(*row) for row in _slices(info, in_dims, args)])


class _RecurrenceBackward(torch.autograd.Function):
    """A backend's backward as a recorded op; its own backward recomputes (see above)."""

    @staticmethod
    def forward(raw, keep_x, x_proj, w_hh, h0, c0, ar_mask, lengths, output, norms,
                g_out, g_hn, g_cn, g_terms, *saved):
        lstm = raw.cell == "lstm"
        return tuple(torch.ops.rnnreg.recurrence_bwd(
            x_proj, w_hh, h0, c0, ar_mask, lengths, output, norms, list(saved), g_out, g_hn,
            g_cn if lstm else None, g_terms, *raw.args()))

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        raw, keep_x, x_proj, w_hh, h0, c0, ar_mask, lengths = inputs[:8]
        g_out, g_hn, g_cn, g_terms = inputs[10:14]
        ctx.raw, ctx.keep_x = raw, keep_x
        ctx.n_inputs = len(inputs)
        ctx.save_for_backward(x_proj, w_hh, h0, c0, ar_mask, lengths, g_out, g_hn, g_cn,
                              g_terms)

    @staticmethod
    def backward(ctx, v_x, v_w, v_h0, v_c0):
        x_proj, w_hh, h0, c0, ar_mask, lengths, g_out, g_hn, g_cn, g_terms = ctx.saved_tensors
        _need_x(x_proj, ctx.raw.backend)
        lstm = ctx.raw.cell == "lstm"
        spec = _spec_of(ctx.raw, g_out.shape, h0.shape[1], lengths)
        grads = _double_backward(spec, lstm, x_proj, w_hh, h0, c0, ar_mask, lengths,
                                 g_out, g_hn, g_cn, g_terms, v_x, v_w, v_h0, v_c0)
        gx, gw, gh0, gc0, gg_out, gg_hn, gg_cn, gg_terms = grads
        head = (None, None, gx, gw, gh0, gc0, None, None, None, None)
        tail = (gg_out, gg_hn, gg_cn if lstm else None, gg_terms)
        return head + tail + (None,) * (ctx.n_inputs - 14)

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


def _naive_first(spec, lstm, ar_mask, lengths):
    """(x, w, h0, c, g_out, g_hn, g_cn, g_terms) -> first-order grads (x, w, h0, c), by
    torch.func.vjp of the naive loop (c and g_cn are empty tensors for plain RNN cells)."""
    from torch.func import vjp

    from .reference import naive_from_spec

    def forward(x, w, h, c):
        output, h_n, c_n, terms = naive_from_spec(spec, x, w, h, c if lstm else None,
                                                  ar_mask, lengths)
        return output, h_n, (c_n if lstm else c), terms

    def first(x, w, h, c, go, ghn, gcn, gt):
        _, pull = vjp(forward, x, w, h, c)
        return pull((go, ghn, gcn if lstm else torch.zeros_like(c), gt))
    return first


def _naive_vjp(spec, lstm, x_proj, w_hh, h0, c0, ar_mask, lengths, g_out, g_hn, g_cn,
               g_terms):
    """First-order grads (x, w, h0, c0 or None) by the naive recompute."""
    first = _naive_first(spec, lstm, ar_mask, lengths)
    c = c0 if lstm else h0.new_zeros(0)
    gcn = g_cn if lstm else h0.new_zeros(0)
    gx, gw, gh0, gc0 = first(x_proj, w_hh, h0, c, g_out, g_hn, gcn, g_terms)
    return gx, gw, gh0, gc0 if lstm else None


def _double_backward(spec, lstm, x_proj, w_hh, h0, c0, ar_mask, lengths, g_out, g_hn, g_cn,
                     g_terms, v_x, v_w, v_h0, v_c0):
    """VJP of (x, w, h0, c0, upstream grads) -> first-order grads, by recomputation through
    the naive loop; returns grads for x, w, h0, c0 (None for RNN), g_out, g_hn, g_cn, g_terms."""
    from torch.func import vjp

    first = _naive_first(spec, lstm, ar_mask, lengths)

    c = c0 if lstm else h0.new_zeros(0)
    gcn = g_cn if lstm else h0.new_zeros(0)
    zeros = [torch.zeros_like(t) for t in (x_proj, w_hh, h0, c)]
    vs = [z if v is None else v for v, z in zip((v_x, v_w, v_h0, v_c0), zeros)]
    if not lstm:
        vs[3] = zeros[3]
    _, pull2 = vjp(first, x_proj, w_hh, h0, c, g_out, g_hn, gcn, g_terms)
    out = list(pull2(tuple(vs)))
    if not lstm:
        out[3] = None
    return out


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
    penalties = as_penalties(penalties)
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
    penalties.check_mask(B, H, x_proj.device, "x_proj")
    ar_mask = penalties.ar_mask
    if ar_mask is not None:
        ar_mask = ar_mask.detach().to(x_proj.dtype).contiguous()
    lengths = _check_lengths(lengths, T, B, x_proj.device)
    if lengths is not None and int(lengths.min()) == T:
        lengths = None  # every row is full: the plain path computes the same thing
    tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
    if torch.compiler.is_compiling():
        # no value that depends on T may become a constant of the graph: the custom op
        # divides the coefficients itself, and the backend is chosen once per compile
        name = _compile_time_backend(backend, x_proj.device.type, x_proj.dtype, cell, H,
                                     bool(reverse), tf32)
    else:
        w = penalty_weights(penalties, T, B, H, lengths)
        spec = Spec(cell=cell, theta=float(theta), w_ns=w.ns, w_tar=w.tar, w_ar=w.ar,
                    ns_include_initial=penalties.ns_include_initial,
                    ns_eps=float(penalties.ns_eps), reverse=bool(reverse), allow_tf32=tf32)
        name = resolve_backend(backend, spec, x_proj, w_hh)
    x_proj, w_hh, h0 = x_proj.contiguous(), w_hh.contiguous(), h0.contiguous()
    c0 = c0.contiguous() if c0 is not None else None
    if name == "naive":
        from .reference import naive
        output, h_n, c_n, terms, norms = naive(
            x_proj, w_hh, h0, c0, cell=cell, theta=float(theta), penalties=penalties,
            lengths=lengths, reverse=bool(reverse))
    elif name == "native":
        from .native import recurrence as _native
        output, h_n, c_n, terms, norms = _native(x_proj, w_hh, h0, c0, spec, penalties,
                                                 lengths)
    else:
        raw = RawSpec(backend=name, cell=cell, theta=float(theta),
                      norm_stabilizer=float(penalties.norm_stabilizer),
                      tar=float(penalties.tar), ar=float(penalties.ar),
                      ns_include_initial=penalties.ns_include_initial,
                      ns_eps=float(penalties.ns_eps), reverse=bool(reverse), allow_tf32=tf32)
        output, h_n, c_n, terms, norms = _Recurrence.apply(
            raw, x_proj, w_hh, h0, c0, ar_mask, lengths)[:5]
        if cell != "lstm":
            c_n = None
    t = Terms(*terms.unbind(0))
    return RecurrenceOutput(output, h_n, c_n, terms.sum(), t, norms)


@torch.compiler.assume_constant_result
def _compile_time_backend(backend: str, device_type: str, dtype: torch.dtype, cell: str,
                          H: int, reverse: bool, tf32: bool) -> str:
    """:func:`resolve_backend` for a traced call, from what stays constant in the graph
    (a two-step probe stands in for the sequence; the backends decide on cell, dtype,
    device and H)."""
    G = gates_of(cell)
    dev = torch.device(device_type)
    x = torch.zeros(2, 1, G * H, dtype=dtype, device=dev)
    w = torch.zeros(G * H, H, dtype=dtype, device=dev)
    spec = Spec(cell=cell, theta=1.0, w_ns=0.0, w_tar=0.0, w_ar=0.0,
                ns_include_initial=False, ns_eps=1e-9, reverse=reverse, allow_tf32=tf32)
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
