"""The ``native`` backend: PyTorch's own recurrence plus one fused penalty pass.

Two parts:

* :func:`activation_penalties` (public) and :func:`penalty_pass`: the norm-stabilizer, TAR and
  AR terms and the norms of any ``[T, B, H]`` sequence of hidden states, in **one** pass over
  the states forward and **one** pass backward (a custom ``autograd.Function`` whose backward
  writes dPenalty/dh directly; autograd adds it to the gradient the recurrence receives).  CPU
  tensors: vectorized torch code; CUDA tensors: the Triton kernels of
  :mod:`rnnreg_kernels.triton.penalty`.
* :func:`recurrence`: the ``backend="native"`` case of :func:`rnnreg_kernels.recurrence`, one
  layer and direction through ``torch._VF.lstm`` / ``rnn_relu`` / ``rnn_tanh`` (cuDNN on CUDA,
  ATen/oneDNN on the CPU) with autograd's own backward, then the penalty pass.  Because the op
  receives ``x_proj`` (the input projection already applied), the layer is called with an
  identity input weight: exact, but it costs a ``[G*H, G*H]`` GEMM per step block, so the
  modules do not use this path: they call ``_VF`` with their own weights for a whole layer or
  stack (:mod:`rnnreg_kernels.nn.native_path`).

Definitions are those of :mod:`rnnreg_kernels.contract` (DESIGN.md section 2).  The pass works
on states in **time order** and knows the processing order only through ``reverse``: every
pair of adjacent valid positions contributes the same squared difference in either order, and
only the norm-stabilizer's initial pair (``ns_include_initial``: h0 with the first processed
position, 0 forward or L_b - 1 reverse) and the returned ``norms`` (``[T+1, B]`` in processing
order) depend on it, so a reverse direction is never copied or flipped.

Precision: the penalty sums and norms accumulate in float32 (float64 for float64 input).  The
recurrence is PyTorch's: in float16 / bfloat16 its cell state is what ``nn.LSTM`` keeps (not
the float32 of the fused kernels).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import _VF
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .contract import Spec, acc_dtype_of
from .penalties import (Penalties, Weights, as_penalties, hidden_norms, norm_terms,
                        penalty_weights, posthoc_terms, step_mask, to_processing_order)

SAVE_X_PROJ = False
CELL_FUNCTIONS = {"lstm": "lstm", "relu": "rnn_relu", "tanh": "rnn_tanh"}

# Which implementation of the pass runs: None = by device (CUDA -> "triton", else "torch");
# tests set "triton" to run the Triton kernels in the interpreter on CPU tensors.
FORCE_IMPL: Optional[str] = None


def unavailable_reason(device: torch.device) -> Optional[str]:
    """PyTorch's RNNs run on every device PyTorch runs on."""
    return None


def unsupported_reason(spec: Spec, x_proj: torch.Tensor, w_hh: torch.Tensor) -> Optional[str]:
    """None unless the cell has no PyTorch kernel (``trec``, ``normprop``) or the case needs
    the memory cells (``spec.cell_norms``)."""
    if spec.cell == "normprop":
        return ("cell 'normprop' has no PyTorch RNN kernel (cuDNN / ATen compute only "
                "h = o * tanh(c), and do not expose the cell states c_t to rescale them); "
                "use backend='reference' (CPU) or 'triton'/'cuda' (GPU)")
    if spec.cell_norms:
        return ("the cell norms (cell_norms=True or a cell norm-stabilizer) need the cell "
                "state c_t of every step, which cuDNN / ATen RNN kernels do not expose (they "
                "return only c_n); use backend='reference' (CPU) or 'triton'/'cuda' (GPU)")
    if spec.cell not in CELL_FUNCTIONS:
        return (f"cell {spec.cell!r} has no PyTorch RNN kernel (torch has lstm, relu and tanh "
                f"RNNs); use backend='reference' (CPU) or 'triton'/'cuda' (GPU)")
    return None


# ----------------------------------------------------------------------------- the pass

class _Pass(NamedTuple):
    """What the pass needs besides tensors (weights already divided by their counts)."""

    w_ns: float
    w_tar: float
    w_ar: float
    ns_include_initial: bool
    ns_eps: float
    reverse: bool
    penalties: Penalties  # the configuration (for the differentiable recompute)


def _impl(t: torch.Tensor) -> str:
    if FORCE_IMPL is not None:
        return FORCE_IMPL
    return "triton" if t.device.type == "cuda" else "torch"


def _valid(T: int, B: int, lengths: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    """``[T, B]`` bool (position p valid for row b), or None when every row is full."""
    if lengths is None:
        return None
    return torch.arange(T, device=device).unsqueeze(1) < lengths.to(device).view(1, -1)


def _partials_torch(states, ar_mask, valid, need_tar: bool, acc):
    s = states.to(acc)
    if valid is not None:
        s = s.masked_fill(~valid.unsqueeze(-1), 0.0)
    sq = torch.linalg.vecdot(s, s)
    tar = None
    if need_tar:
        tar = torch.zeros_like(sq)
        diff = s[1:] - s[:-1]
        tar[1:] = torch.linalg.vecdot(diff, diff)
        if valid is not None:
            tar[1:].masked_fill_(~valid[1:], 0.0)
    ar = None
    if ar_mask is not None:
        ms = s * ar_mask.to(acc)
        ar = torch.linalg.vecdot(ms, ms)
    return sq, tar, ar


def _forward(states, h0, ar_mask, lengths, cfg: _Pass):
    """Terms ``[3]``, norms ``[T+1, B]`` (processing order) and what backward needs."""
    T, B, H = states.shape
    acc = acc_dtype_of(states.dtype)
    valid = _valid(T, B, lengths, states.device)
    need_tar = cfg.w_tar != 0.0 and T > 1
    mask = ar_mask if cfg.w_ar != 0.0 else None
    if _impl(states) == "triton":
        from .triton import penalty as kern
        sq, tarp, arp = kern.forward_partials(
            states, None if mask is None else mask.to(states.dtype).contiguous(), lengths,
            need_tar, acc)
    else:
        sq, tarp, arp = _partials_torch(states, mask, valid, need_tar, acc)
    eps_h = H * cfg.ns_eps
    nt = torch.sqrt(sq + eps_h)  # [T, B] norms at time positions
    if valid is not None:
        nt = nt.masked_fill(~valid, 0.0)
    h0a = h0.to(acc)
    n0 = torch.sqrt(torch.linalg.vecdot(h0a, h0a) + eps_h)
    zero = torch.zeros((), dtype=acc, device=states.device)
    t_ns = t_tar = t_ar = zero
    dp = d0 = None
    first = None
    if cfg.w_ns:
        dp = torch.zeros_like(nt)
        dp[1:] = nt[1:] - nt[:-1]
        if valid is not None:
            dp[1:].masked_fill_(~valid[1:], 0.0)
        ns = (dp * dp).sum()
        if cfg.ns_include_initial:
            first = _first_positions(T, B, lengths, cfg.reverse, states.device)
            d0 = nt.gather(0, first.view(1, B)).squeeze(0) - n0
            ns = ns + (d0 * d0).sum()
        t_ns = cfg.w_ns * ns
    if need_tar:
        t_tar = cfg.w_tar * tarp.sum()
    if cfg.w_ar:
        t_ar = cfg.w_ar * (arp if arp is not None else sq).sum()
    terms = torch.stack([t.to(acc) for t in (t_ns, t_tar, t_ar)])  # no in-place: vmap-safe
    norms = torch.cat([n0.unsqueeze(0), _to_steps(nt, lengths, cfg.reverse)], 0)
    return terms, norms, (nt, dp, d0, n0, first)


def _first_positions(T, B, lengths, reverse, device) -> torch.Tensor:
    """``[B]`` int64: the time position each row processes first."""
    if not reverse:
        return torch.zeros(B, dtype=torch.int64, device=device)
    if lengths is None:
        return torch.full((B,), T - 1, dtype=torch.int64, device=device)
    return lengths.to(device=device, dtype=torch.int64) - 1


def _to_steps(nt: torch.Tensor, lengths, reverse: bool) -> torch.Tensor:
    """``[T, B]`` values at time positions -> processing steps 1..T (0 past a row's length)."""
    if not reverse:
        return nt
    return to_processing_order(nt.unsqueeze(-1), lengths, True).squeeze(-1)


def _grad_torch(states, coef, k_tar, k_ar, ar_mask, valid, need_tar, need_ar, acc):
    s = states.to(acc)
    if valid is not None:
        s = s.masked_fill(~valid.unsqueeze(-1), 0.0)
    scale = coef
    if need_ar and ar_mask is None:
        scale = coef + k_ar * (1.0 if valid is None else valid.to(acc))
    grad = s * scale.unsqueeze(-1)
    if need_ar and ar_mask is not None:
        m = ar_mask.to(acc)
        grad += s * (k_ar * m * m)
    if need_tar:
        diff = s[1:] - s[:-1]
        if valid is not None:
            diff = diff.masked_fill(~valid[1:].unsqueeze(-1), 0.0)
        diff = diff * k_tar
        grad[1:] += diff
        grad[:-1] -= diff
    return grad.to(states.dtype)


def _backward(states, h0, ar_mask, lengths, saved, g_terms, g_norms, cfg: _Pass):
    """(grad_states ``[T, B, H]``, grad_h0 ``[B, H]`` or None): one pass over the states.

    ``g_norms`` (``[T+1, B]`` processing order, or None) adds the radial term
    g_norms[k] * h_k / n_k (and g_norms[0] * h0 / n0 into grad_h0), 0 where a norm is 0."""
    nt, dp, d0, n0, first = saved
    T, B, H = states.shape
    acc = nt.dtype
    g = g_terms.to(acc)
    coef = torch.zeros_like(nt)
    grad_h0 = None
    if g_norms is not None:
        gn = g_norms.to(acc)
        gt = _to_steps(gn[1:], lengths, cfg.reverse)  # the involution: steps -> positions
        safe = torch.where(nt > 0, nt, torch.ones_like(nt))
        coef = torch.where(nt > 0, gt / safe, torch.zeros_like(nt))
        r0 = torch.where(n0 > 0, gn[0] / torch.where(n0 > 0, n0, torch.ones_like(n0)),
                         torch.zeros_like(n0))
        grad_h0 = r0.unsqueeze(-1) * h0.to(acc)
    if cfg.w_ns:
        s_ns = 2.0 * cfg.w_ns * g[0]
        dnext = torch.zeros_like(dp)
        dnext[:-1] = dp[1:]
        num = dp - dnext
        if d0 is not None:
            num = num.scatter_add(0, first.view(1, B), d0.view(1, B))
            c0 = torch.where(n0 > 0, -s_ns * d0 / torch.where(n0 > 0, n0, 1.0), 0.0)
            g0 = c0.unsqueeze(-1) * h0.to(acc)
            grad_h0 = g0 if grad_h0 is None else grad_h0 + g0
        safe = torch.where(nt > 0, nt, torch.ones_like(nt))
        coef = coef + torch.where(nt > 0, s_ns * num / safe, torch.zeros_like(nt))
    need_tar = cfg.w_tar != 0.0 and T > 1
    need_ar = cfg.w_ar != 0.0
    k = torch.stack([2.0 * cfg.w_tar * g[1], 2.0 * cfg.w_ar * g[2]])
    mask = ar_mask if need_ar else None
    if _impl(states) == "triton":
        from .triton import penalty as kern
        grad = kern.backward_grad(states, coef.contiguous(), k.contiguous(),
                                  None if mask is None else mask.to(states.dtype).contiguous(),
                                  lengths, need_tar, need_ar)
    else:
        grad = _grad_torch(states, coef, k[0], k[1], mask,
                           _valid(T, B, lengths, states.device), need_tar, need_ar, acc)
    return grad, None if grad_h0 is None else grad_h0.to(h0.dtype)


def _saved_of(rest, cfg: _Pass) -> tuple:
    """``_forward``'s saved tuple ``(nt, dp, d0, n0, first)`` from the tensors that were not
    None (which ones are None follows from ``cfg``)."""
    it = iter(rest)
    ns, init = bool(cfg.w_ns), bool(cfg.w_ns) and cfg.ns_include_initial
    nt = next(it)
    dp = next(it) if ns else None
    d0 = next(it) if init else None
    n0 = next(it)
    first = next(it) if init else None
    return nt, dp, d0, n0, first


class _PenaltyPass(torch.autograd.Function):
    """terms ``[3]`` and norms of ``states`` (time order); hand-written one-pass backward.
    Both outputs are differentiable (the norms' gradient is the radial term).

    ``setup_context`` style with a generated vmap rule (forward and backward are plain torch
    ops on the CPU), so torch.func transforms (grad, vmap, jacrev) accept it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(states, h0, ar_mask, lengths, cfg):
        terms, norms, saved = _forward(states, h0, ar_mask, lengths, cfg)
        return terms, norms, *[t for t in saved if t is not None]

    @staticmethod
    def setup_context(ctx, inputs, output):
        states, h0, ar_mask, lengths, cfg = inputs
        terms, norms, *saved = output
        ctx.cfg = cfg
        ctx.n_saved = len(saved)
        ctx.save_for_backward(states, h0, ar_mask, lengths, *saved)
        ctx.mark_non_differentiable(*saved)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, g_terms, g_norms, *_g_saved):
        states, h0, ar_mask, lengths, *rest = ctx.saved_tensors
        cfg = ctx.cfg
        if not (cfg.w_ns or cfg.w_tar or cfg.w_ar):
            g_terms = None
        if g_terms is None and g_norms is None:
            return None, None, None, None, None
        if g_terms is None:
            g_terms = torch.zeros(3, dtype=rest[0].dtype, device=states.device)
        if torch.is_grad_enabled():  # create_graph: differentiate the post-hoc formulas
            return _differentiable_grads(states, h0, lengths, g_terms, g_norms, cfg)
        grad, grad_h0 = _backward(states, h0, ar_mask, lengths, _saved_of(rest, cfg), g_terms,
                                  g_norms, cfg)
        return grad, grad_h0, None, None, None


def _differentiable_grads(states, h0, lengths, g_terms, g_norms, cfg: _Pass):
    """The pass's gradients through plain autograd (used when a higher-order graph is built)."""
    T, B, _ = states.shape
    proc = to_processing_order(states, lengths, cfg.reverse)
    terms = posthoc_terms(h0, proc, cfg.penalties, lengths,
                          weights=Weights(cfg.w_ns, cfg.w_tar, cfg.w_ar))[:3]
    loss = (terms * g_terms.to(terms.dtype)).sum()
    if g_norms is not None:
        n = hidden_norms(torch.cat([h0.unsqueeze(0), proc], 0), cfg.ns_eps)
        valid = step_mask(T, lengths, B, states.device)
        n = torch.cat([n[:1], torch.where(valid, n[1:], torch.zeros_like(n[1:]))], 0)
        loss = loss + (n * g_norms.to(n.dtype)).sum()
    inputs = [t for t in (states, h0) if t.requires_grad]
    grads = torch.autograd.grad(loss, inputs, create_graph=True, allow_unused=True)
    it = iter(grads)
    g_states = next(it) if states.requires_grad else None
    g_h0 = next(it) if h0.requires_grad else None
    return g_states, g_h0, None, None, None


def penalty_pass(states: torch.Tensor, h0: torch.Tensor, penalties: Penalties,
                 lengths: Optional[torch.Tensor] = None, reverse: bool = False
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(terms [5], norms [T+1, B])`` of ``states [T, B, H]`` (time order, contiguous in H
    or not) for a recurrence run forward or ``reverse``; arguments already checked.

    ``lengths`` (int64, the states' device, values 1..T, or None) marks positions p < L_b
    valid; ``norms`` are in processing order (the contract's), entries past a length 0, and
    differentiable.  ``terms`` follow :data:`~rnnreg_kernels.penalties.TERM_NAMES`: the
    norm-stabilizer, TAR and AR from the pass, the cell norm-stabilizer 0 (hidden states
    carry no memory cells: ``ValueError`` when it is asked for) and ``norm_target`` from the
    differentiable norms (:func:`~rnnreg_kernels.penalties.norm_terms`).
    """
    if penalties.cell_norm_stabilizer > 0:
        raise ValueError("penalties.cell_norm_stabilizer: the fused penalty pass sees only "
                         "hidden states, not the memory cells c_t; expected 0, got "
                         f"{penalties.cell_norm_stabilizer!r} (use recurrence(cell='lstm') on "
                         "a backend other than native, or the LSTM modules)")
    T, B, H = states.shape
    w = penalty_weights(penalties, T, B, H, lengths)
    cfg = _Pass(w.ns, w.tar, w.ar, penalties.ns_include_initial, float(penalties.ns_eps),
                bool(reverse), penalties)
    mask = penalties.ar_mask
    if mask is not None:
        mask = mask.detach().to(device=states.device)
    # the pass accumulates in acc_dtype itself; autocast must not lower its sums
    with torch.autocast(device_type=states.device.type, enabled=False):
        terms, norms = _PenaltyPass.apply(states, h0, mask, lengths, cfg)[:2]
        terms = torch.cat([terms, norm_terms(norms, None, penalties, lengths)])
    return terms, norms


def activation_penalties(output: torch.Tensor, penalties: Optional[Penalties],
                         h0: Optional[torch.Tensor] = None, lengths=None):
    """The penalties of any RNN's hidden states, one pass forward and backward.

    Norm-stabilizer, TAR, AR and ``norm_target`` (the memory-cell norm-stabilizer needs the
    cell states, which an RNN's output does not carry: ``ValueError`` when it is asked for).

    Args:
        output: ``[T, B, H]`` time-major hidden states h_1..h_T in time order (e.g. the output
            of ``nn.LSTM``/``nn.GRU`` for one direction; float16, bfloat16, float32, float64;
            any strides).
        penalties: :class:`~rnnreg_kernels.Penalties` (None = all off); its ``ar_mask`` is
            ``[B, H]``.
        h0: ``[B, H]`` initial state (None = zeros, PyTorch's default); it enters only the
            norm-stabilizer with ``ns_include_initial`` and ``norms[0]``.
        lengths: ``[B]`` valid steps per row (each in 1..T) or None: row b's states are
            ``output[:L_b, b]``; positions past its length are ignored (their gradient is 0).
    Returns:
        ``(penalty, terms, norms)``: ``penalty`` the 0-dim sum of the weighted terms,
        ``terms`` a :class:`~rnnreg_kernels.Terms` of 0-dim tensors (``cell_norm_stabilizer``
        0), ``norms [T+1, B]`` (``norms[0] = ||h0||``, ``norms[k] = ||h_k||``, 0 past a row's
        length; differentiable: its gradient enters the backward pass as the radial term),
        all float32 (float64 for float64 input).  The definitions, counts and
        ``ns_eps`` are those of :func:`rnnreg_kernels.recurrence` (DESIGN.md section 2): the
        norm-stabilizer differences are between consecutive valid steps of a row.
    """
    from .ops import Terms, _check_lengths

    if not isinstance(output, torch.Tensor):
        raise TypeError(f"output: expected a [T, B, H] tensor, got {type(output).__name__}")
    if output.dim() != 3:
        raise ValueError(f"output: expected 3 dimensions [T, B, H] (time-major), got shape "
                         f"{list(output.shape)}")
    if output.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"output: expected float16, bfloat16, float32 or float64, got "
                        f"{output.dtype}")
    T, B, H = output.shape
    if T < 1 or B < 1 or H < 1:
        raise ValueError(f"output: expected T, B, H >= 1, got shape {list(output.shape)}")
    penalties = as_penalties(penalties)
    penalties.check_mask(B, H, output.device, "output")
    if h0 is None:
        h0 = output.new_zeros(B, H)
    else:
        if not isinstance(h0, torch.Tensor) or tuple(h0.shape) != (B, H):
            got = list(h0.shape) if isinstance(h0, torch.Tensor) else type(h0).__name__
            raise ValueError(f"h0: expected shape [B, H] = [{B}, {H}], got {got}")
        if h0.dtype != output.dtype or h0.device != output.device:
            raise TypeError(f"h0: expected dtype {output.dtype} on {output.device} (those of "
                            f"output), got {h0.dtype} on {h0.device}")
    lengths = _check_lengths(lengths, T, B, output.device)
    if lengths is not None and int(lengths.min()) == T:
        lengths = None
    terms, norms = penalty_pass(output, h0, penalties, lengths, reverse=False)
    return terms.sum(), Terms(*terms.unbind(0)), norms


# ----------------------------------------------------------------------------- recurrence

def vf_call(cell: str, x: torch.Tensor, hx, params, has_biases: bool, num_layers: int,
            dropout: float, train: bool, bidirectional: bool,
            lengths: Optional[torch.Tensor]):
    """One ``torch._VF`` RNN call on time-major padded ``x [T, B, F]``.

    ``hx``: ``(h0, c0)`` for LSTM, else ``h0``, each ``[num_layers * D, B, H]``; ``params`` in
    ``nn.LSTM``'s ``_flat_weights`` order; ``lengths`` ([B] int, any order) runs the packed
    kernels (each row stops at its length, a reverse direction starts at its last step).
    Returns ``(output [T, B, D*H] zero past each length, h_n, c_n or None)``.
    """
    fn = getattr(_VF, CELL_FUNCTIONS[cell])
    lstm = cell == "lstm"
    if lengths is None:
        res = fn(x, hx, params, has_biases, num_layers, dropout, train, bidirectional, False)
        return res[0], res[1], res[2] if lstm else None
    packed = pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
    idx, back = packed.sorted_indices, packed.unsorted_indices
    hx = tuple(h.index_select(1, idx) for h in hx) if lstm else hx.index_select(1, idx)
    res = fn(packed.data, packed.batch_sizes, hx, params, has_biases, num_layers, dropout,
             train, bidirectional)
    out, _ = pad_packed_sequence(PackedSequence(res[0], packed.batch_sizes, idx, back),
                                 total_length=x.shape[0])
    return out, res[1].index_select(1, back), res[2].index_select(1, back) if lstm else None


def recurrence(x_proj, w_hh, h0, c0, spec: Spec, penalties: Penalties,
               lengths: Optional[torch.Tensor]):
    """``backend="native"`` of :func:`rnnreg_kernels.recurrence` (arguments already checked).

    Returns ``(output, h_n, c_n, terms [5], norms [T+1, B])`` in the autograd graph.
    """
    why = unsupported_reason(spec, x_proj, w_hh)
    if why is not None:
        from .ops import BackendUnavailableError
        raise BackendUnavailableError(f"backend 'native' cannot run this case: {why}")
    GH = x_proj.shape[2]
    eye = torch.eye(GH, dtype=x_proj.dtype, device=x_proj.device)
    x = to_processing_order(x_proj, lengths, True) if spec.reverse else x_proj
    lstm = spec.cell == "lstm"
    hx = (h0.unsqueeze(0), c0.unsqueeze(0)) if lstm else h0.unsqueeze(0)
    states, h_n, c_n = vf_call(spec.cell, x, hx, [eye, w_hh], False, 1, 0.0, False, False,
                               lengths)
    terms, norms = penalty_pass(states, h0, penalties, lengths, reverse=False)
    output = to_processing_order(states, lengths, True) if spec.reverse else states
    return output, h_n[0], c_n[0] if lstm else None, terms, norms
