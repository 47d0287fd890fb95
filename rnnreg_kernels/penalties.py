"""Penalty configuration and the post-hoc penalty math.

``Penalties`` is what users pass to :func:`rnnreg_kernels.recurrence`.  The functions below
compute the same penalties *after* a recurrence, from its output sequence, in eager PyTorch:
they are the ``naive`` backend's penalties, the benchmark baseline (cuDNN + post-hoc), and a
direct transcription of the definitions in DESIGN.md section 2.

:func:`norm_terms` computes the two terms that depend only on the norms (the memory-cell
norm-stabilizer and ``norm_target``) from the differentiable ``norms`` / ``cell_norms`` of a
recurrence: ``ops`` uses it for every backend but ``naive``, so their gradients reach the
kernels as the radial terms of the contract (``grad_norms`` / ``grad_cell_norms``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

TERM_NAMES = ("norm_stabilizer", "tar", "ar", "cell_norm_stabilizer", "norm_target")

# The norm-stabilizer paper's table of alternative costs (Krueger & Memisevic, Table 3) lists
# (||h||_2 - 5)^2: 5 is the one target value the paper reports, so it is the default.
DEFAULT_NORM_TARGET = 5.0

_COEFFICIENTS = ("norm_stabilizer", "tar", "ar", "cell_norm_stabilizer", "norm_target")


@dataclass(frozen=True)
class Penalties:
    """Activation regularizers computed together with the recurrence.

    Args:
        norm_stabilizer: beta of the norm-stabilizer (Krueger & Memisevic); 0 = off.
        tar: beta of temporal activation regularization (Merity et al.); 0 = off.
        ar: alpha of activation regularization (Merity et al.); 0 = off.
        ns_include_initial: also penalize the step h_0 -> h_1 (the paper's formula); the
            default excludes it (the seed code: mean over (T-1)*B).
        ns_eps: epsilon inside the norm, n_t = sqrt(sum_i (h_ti^2 + eps)).
        ar_mask: optional ``[B, H]`` mask applied to h before AR (a locked-dropout mask with
            the 1/(1-p) scale inside).
        cell_norm_stabilizer: beta of the norm-stabilizer on the memory cell c of an LSTM-type
            cell ("lstm", "normprop"): the same formula, S, ``ns_include_initial``, ``ns_eps``
            and lengths, on m_t = sqrt(sum_i (c_ti^2 + eps)); 0 = off.
        norm_target: alpha of the fixed-norm cost alpha / (sum_b L_b) *
            sum_b sum_{t=1..L_b} (n_t - r)^2 (the paper's (||h|| - 5)^2 row); 0 = off.
        norm_target_value: r, the target hidden-state norm (default 5.0, the value of the
            norm-stabilizer paper's table of alternative costs).
    """

    norm_stabilizer: float = 0.0
    tar: float = 0.0
    ar: float = 0.0
    ns_include_initial: bool = False
    ns_eps: float = 1e-9
    ar_mask: Optional[torch.Tensor] = None
    cell_norm_stabilizer: float = 0.0
    norm_target: float = 0.0
    norm_target_value: float = DEFAULT_NORM_TARGET

    def __post_init__(self):
        for name in _COEFFICIENTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"Penalties.{name}: expected a non-negative finite number, "
                                 f"got {value!r} ({type(value).__name__})")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"Penalties.{name}: expected a non-negative finite number, "
                                 f"got {value!r}")
        eps = self.ns_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) \
                or eps < 0:
            raise ValueError(f"Penalties.ns_eps: expected a non-negative finite number, got {eps!r}")
        r = self.norm_target_value
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
            raise ValueError(f"Penalties.norm_target_value: expected a finite number, got {r!r}"
                             f" ({type(r).__name__})")
        if not isinstance(self.ns_include_initial, bool):
            raise ValueError("Penalties.ns_include_initial: expected a bool, "
                             f"got {self.ns_include_initial!r}")
        m = self.ar_mask
        if m is not None:
            if not isinstance(m, torch.Tensor):
                raise ValueError(f"Penalties.ar_mask: expected a [B, H] tensor or None, "
                                 f"got {type(m).__name__}")
            if m.dim() != 2:
                raise ValueError(f"Penalties.ar_mask: expected a [B, H] tensor, got shape "
                                 f"{tuple(m.shape)}")
            if not m.is_floating_point():
                raise ValueError(f"Penalties.ar_mask: expected a floating tensor, got {m.dtype}")

    @property
    def active(self) -> bool:
        return any(getattr(self, name) > 0 for name in _COEFFICIENTS)

    @property
    def needs_cell_norms(self) -> bool:
        """True when a term needs the memory-cell norms (LSTM-type cells only)."""
        return self.cell_norm_stabilizer > 0

    def check_mask(self, batch: int, hidden: int, device: Optional[torch.device] = None,
                   of: str = "") -> None:
        """Raise ``ValueError`` when ``ar_mask`` does not match ``[batch, hidden]`` (or, with
        ``device``, is on another device than the tensor named ``of``)."""
        m = self.ar_mask
        if m is not None and tuple(m.shape) != (batch, hidden):
            raise ValueError(f"Penalties.ar_mask: expected shape [B, H] = [{batch}, {hidden}], "
                             f"got {list(m.shape)}")
        if m is not None and device is not None and m.device != device:
            raise ValueError(f"Penalties.ar_mask: expected device {device} (the device of "
                             f"{of}), got {m.device}")


def as_penalties(penalties: Optional["Penalties"]) -> "Penalties":
    """``penalties``, or all off for None; ``TypeError`` for anything else."""
    if penalties is None:
        return Penalties()
    if not isinstance(penalties, Penalties):
        raise TypeError(f"penalties: expected rnnreg_kernels.Penalties or None, got "
                        f"{type(penalties).__name__}")
    return penalties


class Weights(NamedTuple):
    """Penalty coefficients divided by their counts (see ``contract.Spec``)."""

    ns: float
    tar: float
    ar: float
    cell_ns: float = 0.0
    norm_target: float = 0.0


def penalty_weights(pen: Penalties, steps: int, batch: int, hidden: int,
                    lengths: Optional[torch.Tensor] = None) -> Weights:
    """beta / |S|, beta / (#pairs * H), alpha / (#steps * H), beta_c / |S|, alpha_n / #steps,
    each 0 when off or empty.

    ``lengths`` (CPU or device, int) counts only each row's valid steps; None means all ``steps``.
    """
    if lengths is None:
        total = steps * batch
    else:
        total = int(lengths.sum().item())
    pairs = total - batch  # sum_b (L_b - 1)
    ns_count = total if pen.ns_include_initial else pairs
    ns = pen.norm_stabilizer / ns_count if pen.norm_stabilizer > 0 and ns_count > 0 else 0.0
    tar = pen.tar / (pairs * hidden) if pen.tar > 0 and pairs > 0 else 0.0
    ar = pen.ar / (total * hidden) if pen.ar > 0 and total > 0 else 0.0
    cns = pen.cell_norm_stabilizer / ns_count \
        if pen.cell_norm_stabilizer > 0 and ns_count > 0 else 0.0
    nt = pen.norm_target / total if pen.norm_target > 0 and total > 0 else 0.0
    return Weights(float(ns), float(tar), float(ar), float(cns), float(nt))


def step_mask(steps: int, lengths: Optional[torch.Tensor], batch: int,
              device=None) -> torch.Tensor:
    """``[T, B]`` bool, True where processing step k (row index k-1) is valid for row b
    (all True when ``lengths`` is None)."""
    if lengths is None:
        return torch.ones(steps, batch, dtype=torch.bool, device=device)
    k = torch.arange(1, steps + 1, device=device).unsqueeze(1)
    return k <= lengths.to(device).view(1, batch)


def hidden_norms(states: torch.Tensor, eps: float) -> torch.Tensor:
    """``[K, B, H] -> [K, B]``: sqrt(sum_i (h_i^2 + eps)), in at least float32.

    Differentiable; a zero norm (possible only with eps = 0) has gradient 0, not NaN (the
    contract's convention for the radial terms)."""
    s = states.to(torch.promote_types(states.dtype, torch.float32))
    sq = (s * s).sum(-1) + s.shape[-1] * eps
    pos = sq > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, sq, torch.ones_like(sq))),
                       torch.zeros_like(sq))


def posthoc_terms(h0: torch.Tensor, states: torch.Tensor, pen: Penalties,
                  lengths: Optional[torch.Tensor] = None,
                  weights: Optional[Weights] = None, c0: Optional[torch.Tensor] = None,
                  cell_states: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The five weighted terms ``[5]`` (:data:`TERM_NAMES` order) from the states in
    *processing order*.

    Args:
        h0: ``[B, H]`` initial state.
        states: ``[T, B, H]`` h_1..h_T in processing order (for a reverse recurrence, flip
            each row first); entries past a row's length are ignored.
        pen: the penalty configuration.
        lengths: ``[B]`` valid steps per row, or None.
        weights: the divided coefficients (:func:`penalty_weights`) when already known;
            then ``pen``'s coefficients are not read (only its options and ``ar_mask``).
        c0, cell_states: ``[B, H]`` and ``[T, B, H]`` (processing order) memory cells of an
            LSTM-type cell; needed only when the cell norm-stabilizer is on.
    Returns:
        ``[5]`` tensor (norm_stabilizer, tar, ar, cell_norm_stabilizer, norm_target) in
        float32 (float64 for float64 states), differentiable with respect to ``h0``,
        ``states``, ``c0`` and ``cell_states``.
    """
    T, B, H = states.shape
    acc = torch.promote_types(states.dtype, torch.float32)
    w = penalty_weights(pen, T, B, H, lengths) if weights is None else weights
    hs = torch.cat([h0.unsqueeze(0), states], 0).to(acc)  # [T+1, B, H]
    valid = step_mask(T, lengths, B, states.device)
    zero = hs[:0].sum()  # 0, but in the graph like the active terms
    sel = valid.clone()  # the norm-stabilizers' S_b (index k-1 for step k)
    if not pen.ns_include_initial:
        sel[0] = False
    terms = []
    if w.ns:
        n = hidden_norms(hs, pen.ns_eps)
        d2 = (n[1:] - n[:-1]) ** 2  # [T, B], step k = 1..T
        terms.append(w.ns * torch.where(sel, d2, zero).sum())
    else:
        terms.append(zero)
    if w.tar:
        diff = ((hs[2:] - hs[1:-1]) ** 2).sum(-1)  # [T-1, B], step k = 2..T
        terms.append(w.tar * torch.where(valid[1:], diff, zero).sum())
    else:
        terms.append(zero)
    if w.ar:
        h = hs[1:]
        if pen.ar_mask is not None:
            h = h * pen.ar_mask.to(acc)
        terms.append(w.ar * torch.where(valid, (h * h).sum(-1), zero).sum())
    else:
        terms.append(zero)
    if w.cell_ns:
        if c0 is None or cell_states is None:
            raise ValueError("posthoc_terms: the cell norm-stabilizer needs c0 and cell_states "
                             "(the memory cells of an lstm / normprop cell), got None")
        cs = torch.cat([c0.unsqueeze(0), cell_states], 0).to(acc)
        m = hidden_norms(cs, pen.ns_eps)
        terms.append(w.cell_ns * torch.where(sel, (m[1:] - m[:-1]) ** 2, zero).sum())
    else:
        terms.append(zero)
    if w.norm_target:
        n = hidden_norms(hs[1:], pen.ns_eps)
        dev2 = (n - float(pen.norm_target_value)) ** 2
        terms.append(w.norm_target * torch.where(valid, dev2, zero).sum())
    else:
        terms.append(zero)
    return torch.stack(terms)


def norm_terms(norms: torch.Tensor, cell_norms: Optional[torch.Tensor], pen: Penalties,
               lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[2]``: the cell norm-stabilizer and ``norm_target`` terms from the norms alone.

    Args:
        norms: ``[T+1, B]`` hidden-state norms of a recurrence (processing order, k = 0 is
            h0, entries past a row's length ignored), in the autograd graph.
        cell_norms: ``[T+1, B]`` memory-cell norms (same layout), or None (then the cell
            norm-stabilizer must be off).
        pen: the penalty configuration (its coefficients, ``ns_include_initial`` and
            ``norm_target_value``).
        lengths: ``[B]`` valid steps per row, or None.
    Returns:
        ``[2]`` in the dtype of ``norms``, differentiable with respect to both norms.  The
        divisors (|S| and sum_b L_b) are computed from tensors, so a traced graph keeps no
        value that depends on T.
    """
    T = norms.shape[0] - 1
    B = norms.shape[1]
    zero = norms[:0].sum()
    if pen.cell_norm_stabilizer <= 0 and pen.norm_target <= 0:
        return torch.stack([zero, zero])
    valid = step_mask(T, lengths, B, norms.device)
    sel = valid.clone()
    if not pen.ns_include_initial:
        sel[0] = False
    out = [zero, zero]
    if pen.cell_norm_stabilizer > 0:
        if cell_norms is None:
            raise ValueError("norm_terms: the cell norm-stabilizer needs cell_norms, got None")
        d2 = (cell_norms[1:] - cell_norms[:-1]) ** 2
        count = sel.sum().clamp(min=1).to(norms.dtype)  # an empty S has a zero sum
        out[0] = pen.cell_norm_stabilizer * torch.where(sel, d2, zero).sum() / count
    if pen.norm_target > 0:
        dev2 = (norms[1:] - float(pen.norm_target_value)) ** 2
        count = valid.sum().to(norms.dtype)  # >= B >= 1
        out[1] = pen.norm_target * torch.where(valid, dev2, zero).sum() / count
    return torch.stack(out)


def to_processing_order(output: torch.Tensor, lengths: Optional[torch.Tensor],
                        reverse: bool) -> torch.Tensor:
    """Reorder a ``[T, B, H]`` output from time positions to processing steps.

    Forward: unchanged.  Reverse: step k of row b is position L_b - k; positions past a
    row's length map to zeros.
    """
    if not reverse:
        return output
    T, B = output.shape[:2]
    if lengths is None:
        return output.flip(0)
    L = lengths.to(output.device).view(1, B)
    k = torch.arange(1, T + 1, device=output.device).view(T, 1)
    pos = (L - k).clamp(min=0)  # [T, B]
    gathered = output.gather(0, pos.unsqueeze(-1).expand(T, B, output.shape[2]))
    return torch.where((k <= L).unsqueeze(-1), gathered, torch.zeros_like(gathered))


def fold_radial(grad_norms: Optional[torch.Tensor], grad_output: torch.Tensor,
                output: torch.Tensor, h0: torch.Tensor, norms: torch.Tensor,
                lengths: Optional[torch.Tensor], reverse: bool):
    """The hidden radial term of the contract as a change of ``grad_output``.

    ``dL/dh_k += grad_norms[k] * h_k / n_k`` for k = 1..L_b is exactly the same as adding
    it to ``grad_output`` at step k's time position (h_k is that position of ``output``);
    ``grad_norms[0] * h0 / n0`` belongs to ``grad_h0`` after the backward.  Zero norms and
    entries past a row's length contribute 0.  For backends whose kernels do not take
    ``grad_norms`` themselves.

    Returns ``(grad_output', extra_grad_h0 [B, H] in acc dtype or None)``; with
    ``grad_norms`` None, ``(grad_output, None)`` unchanged.
    """
    if grad_norms is None:
        return grad_output, None
    T, B, _ = output.shape
    acc = norms.dtype
    n = norms
    ok = n > 0
    ok[1:] &= step_mask(T, lengths, B, n.device)
    r = torch.where(ok, grad_norms.to(acc) / torch.where(ok, n, torch.ones_like(n)),
                    torch.zeros_like(n))
    # steps -> time positions (the map is its own inverse on the valid part; 0 elsewhere)
    r_pos = to_processing_order(r[1:].unsqueeze(-1), lengths, reverse)
    grad = (grad_output.to(acc) + r_pos * output.to(acc)).to(grad_output.dtype)
    return grad.contiguous(), r[0].unsqueeze(-1) * h0.to(acc)
