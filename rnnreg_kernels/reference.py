"""The ``reference`` and ``naive`` backends: PyTorch time loops, any device, any float dtype.

``forward`` / ``backward`` implement the backend contract of :mod:`rnnreg_kernels.contract`
with a backward written by hand in the kernels' order (reverse loop, penalty gradients added to
dL/dh_k before the cell backward, one GEMM for ``grad_w_hh`` after the loop).  They are the
CPU default and the oracle for the fused kernels.

``naive`` runs plain autograd through a time loop and computes the penalties post hoc from the
returned sequence (:func:`rnnreg_kernels.penalties.posthoc_terms`); it shares no gradient code
with ``forward``/``backward`` and is their oracle.
"""
from __future__ import annotations

from typing import Optional

import torch

from .contract import Spec, acc_dtype_of, has_cell_state
from .penalties import (Penalties, Weights, hidden_norms, posthoc_terms, step_mask,
                        to_processing_order)

SAVE_X_PROJ = False


def unavailable_reason(device: torch.device) -> Optional[str]:
    """The reference backend runs on every device."""
    return None


def unsupported_reason(spec: Spec, x_proj: torch.Tensor, w_hh: torch.Tensor) -> Optional[str]:
    """The reference backend runs every case."""
    return None


def _activate_rnn(cell: str, z: torch.Tensor, theta: float) -> torch.Tensor:
    if cell == "relu":
        return torch.relu(z)
    if cell == "tanh":
        return torch.tanh(z)
    return z * (z > theta).to(z.dtype)  # trec


def _valid_steps(T: int, B: int, lengths: Optional[torch.Tensor], device) -> torch.Tensor:
    """``[T, B, 1]`` bool: step k (index k-1) is valid for row b."""
    return step_mask(T, lengths, B, device).unsqueeze(-1)


def _masked_norms(first: torch.Tensor, states: torch.Tensor, eps: float,
                  valid: torch.Tensor) -> torch.Tensor:
    """``[T+1, B]``: the norms of ``first [B, H]`` and ``states [T, B, H]``, 0 past a row's
    length."""
    n = torch.cat([hidden_norms(first.unsqueeze(0), eps), hidden_norms(states, eps)], 0)
    n[1:] = torch.where(valid[..., 0], n[1:], 0.0)
    return n


def forward(spec: Spec, x_proj: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor,
            c0: Optional[torch.Tensor], ar_mask: Optional[torch.Tensor],
            lengths: Optional[torch.Tensor], cell_scale: Optional[torch.Tensor] = None):
    """Forward of the contract; see :mod:`rnnreg_kernels.contract`.

    Returns ``(output, h_n, c_n, terms, norms, cell_norms, saved)`` with
    ``saved = (hs, gates, cs)``: ``hs [T, B, H]`` the states in processing order (acc dtype;
    zero past a row's length), and for the LSTM-type cells ``gates [T, B, 4H]`` (activated
    i, f, g, o) and ``cs [T, B, H]`` (the cell state after each step, carried past a row's
    length).  ``cell_norms`` is ``[T+1, B]`` when ``spec.cell_norms``, else None.
    """
    T, B, GH = x_proj.shape
    H = w_hh.shape[1]
    acc = acc_dtype_of(x_proj.dtype)
    lstm = spec.has_cell_state
    a = cell_scale.to(acc) if spec.cell == "normprop" else None
    s = float(spec.h_scale)
    xk = to_processing_order(x_proj, lengths, spec.reverse).to(acc)
    w_t = w_hh.to(acc).t()
    valid = _valid_steps(T, B, lengths, x_proj.device)
    full = lengths is None  # every row valid at every step: no masking needed
    h = h0.to(acc)
    c = c0.to(acc) if lstm else None
    hs = torch.empty(T, B, H, dtype=acc, device=x_proj.device)
    gates = torch.empty(T, B, GH, dtype=acc, device=x_proj.device) if lstm else None
    cs = torch.empty(T, B, H, dtype=acc, device=x_proj.device) if lstm else None
    for k in range(T):
        z = torch.addmm(xk[k], h, w_t)
        v = valid[k]
        if lstm:
            ifo = torch.sigmoid(z)
            g = torch.tanh(z[:, 2 * H:3 * H])
            ifo[:, 2 * H:3 * H] = g
            i, f, o = ifo[:, :H], ifo[:, H:2 * H], ifo[:, 3 * H:]
            c_new = f * c + i * g
            if a is None:
                h_new = o * torch.tanh(c_new)
            else:
                h_new = o * torch.tanh(a * c_new) * s
            gates[k] = ifo
            c = c_new if full else torch.where(v, c_new, c)
            cs[k] = c
        else:
            h_new = _activate_rnn(spec.cell, z, spec.theta)
        if full:
            h = hs[k] = h_new
        else:
            h = torch.where(v, h_new, h)
            hs[k] = torch.where(v, h_new, 0.0)
    norms = _masked_norms(h0.to(acc), hs, spec.ns_eps, valid)
    cell_norms = None
    if lstm and spec.cell_norms:
        cell_norms = _masked_norms(c0.to(acc), cs, spec.ns_eps, valid)
    terms = _terms(spec, h0.to(acc), hs, norms, ar_mask, valid)
    output = to_processing_order(hs, lengths, spec.reverse).to(x_proj.dtype)
    c_n = c.to(x_proj.dtype) if lstm else None
    return output, h.to(x_proj.dtype), c_n, terms, norms, cell_norms, (hs, gates, cs)


def _ns_diffs(spec: Spec, norms: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[T, B]``: d_k = n_k - n_{k-1} for k in S_b, else 0 (index k-1)."""
    d = norms[1:] - norms[:-1]
    sel = valid[..., 0].clone()
    if not spec.ns_include_initial:
        sel[0] = False
    return torch.where(sel, d, 0.0)


def _terms(spec: Spec, h0, hs, norms, ar_mask, valid) -> torch.Tensor:
    acc = hs.dtype
    out = torch.zeros(3, dtype=acc, device=hs.device)
    if spec.w_ns:
        out[0] = spec.w_ns * (_ns_diffs(spec, norms, valid) ** 2).sum()
    if spec.w_tar and hs.shape[0] > 1:
        diff = hs[1:] - hs[:-1]
        out[1] = spec.w_tar * torch.where(valid[1:], diff * diff, 0.0).sum()
    if spec.w_ar:
        m = hs if ar_mask is None else hs * ar_mask.to(acc)
        out[2] = spec.w_ar * (m * m).sum()
    return out


def _penalty_grads(spec: Spec, h0, hs, norms, ar_mask, valid, g_terms) -> tuple:
    """dPenalty/dh_k for all k (``[T, B, H]``, processing order) and the extra grad of h0."""
    T = hs.shape[0]
    grad = torch.zeros_like(hs)
    grad_h0 = None
    if spec.w_ns:
        d = _ns_diffs(spec, norms, valid)
        d_next = torch.cat([d[1:], torch.zeros_like(d[:1])], 0)
        n = norms[1:]
        scale = 2.0 * spec.w_ns * g_terms[0]
        coef = torch.where(n > 0, scale * (d - d_next) / torch.where(n > 0, n, 1.0), 0.0)
        grad += coef.unsqueeze(-1) * hs
        if spec.ns_include_initial:
            n0 = norms[0]
            c0 = torch.where(n0 > 0, -scale * d[0] / torch.where(n0 > 0, n0, 1.0), 0.0)
            grad_h0 = c0.unsqueeze(-1) * h0
    if spec.w_tar and T > 1:
        k = 2.0 * spec.w_tar * g_terms[1]
        diff = torch.where(valid[1:], hs[1:] - hs[:-1], 0.0)  # steps 2..T
        grad[1:] += k * diff
        grad[:-1] -= k * diff
    if spec.w_ar:
        m2 = 1.0 if ar_mask is None else ar_mask.to(hs.dtype) ** 2
        grad += (2.0 * spec.w_ar * g_terms[2]) * torch.where(valid, m2 * hs, 0.0)
    return grad, grad_h0


def _radial(grad_n: Optional[torch.Tensor], norms: torch.Tensor,
            valid: torch.Tensor) -> Optional[torch.Tensor]:
    """``[T+1, B, 1]``: grad_n[k] / n_k where step k is valid (k = 0 always) and n_k > 0, else
    0; None when there is no gradient."""
    if grad_n is None:
        return None
    n = norms
    ok = n > 0
    ok[1:] &= valid[..., 0]
    return torch.where(ok, grad_n.to(n.dtype) / torch.where(ok, n, 1.0), 0.0).unsqueeze(-1)


def backward(spec: Spec, x_proj, w_hh, h0, c0, ar_mask, lengths, cell_scale, output, norms,
             cell_norms, saved, grad_output, grad_h_n, grad_c_n, grad_terms,
             grad_norms=None, grad_cell_norms=None):
    """Backward of the contract; returns ``(grad_x_proj, grad_w_hh, grad_h0, grad_c0,
    grad_cell_scale)``."""
    hs, gates, cs = saved
    T, B, H = hs.shape
    acc = hs.dtype
    lstm = spec.has_cell_state
    normprop = spec.cell == "normprop"
    a = cell_scale.to(acc) if normprop else None
    s = float(spec.h_scale)
    if grad_cell_norms is not None and cell_norms is None:
        raise ValueError("grad_cell_norms: the forward computed no cell_norms "
                         "(spec.cell_norms is False)")
    dtype = output.dtype
    valid = _valid_steps(T, B, lengths, hs.device)
    full = lengths is None
    h0a = h0.to(acc)
    w = w_hh.to(acc)
    g_terms = grad_terms.to(acc)
    gk = to_processing_order(grad_output, lengths, spec.reverse).to(acc)
    pen, pen_h0 = _penalty_grads(spec, h0a, hs, norms, ar_mask, valid, g_terms)
    gk = gk + pen
    rad_h = _radial(grad_norms, norms, valid)
    if rad_h is not None:
        gk = gk + rad_h[1:] * hs
    rad_c = _radial(grad_cell_norms, cell_norms, valid) if lstm else None
    dh = grad_h_n.to(acc).clone()
    dc = grad_c_n.to(acc).clone() if lstm else None
    grad_a = torch.zeros(H, dtype=acc, device=hs.device) if normprop else None
    dZ = torch.empty(T, B, w.shape[0], dtype=acc, device=hs.device)
    for k in range(T - 1, -1, -1):
        v = valid[k]
        dh_k = dh + gk[k]
        h_prev = hs[k - 1] if k > 0 else h0a
        if lstm:
            gt = gates[k]
            i, f, g, o = gt[:, :H], gt[:, H:2 * H], gt[:, 2 * H:3 * H], gt[:, 3 * H:]
            c_prev = cs[k - 1] if k > 0 else c0.to(acc)
            if rad_c is not None:
                dc = dc + rad_c[k + 1] * cs[k]
            if normprop:
                tc = torch.tanh(a * cs[k])
                q = dh_k * o * (1 - tc * tc) * s  # dL/d(a*c_k)
                dc_k = dc + q * a
                grad_a += (torch.where(v, q * cs[k], 0.0) if not full else q * cs[k]).sum(0)
                tc = tc * s  # h = o * tc below
            else:
                tc = torch.tanh(cs[k])
                dc_k = dc + dh_k * o * (1 - tc * tc)
            dz = dZ[k]
            torch.mul(dc_k * g, i * (1 - i), out=dz[:, :H])
            torch.mul(dc_k * c_prev, f * (1 - f), out=dz[:, H:2 * H])
            torch.mul(dc_k * i, 1 - g * g, out=dz[:, 2 * H:3 * H])
            torch.mul(dh_k * tc, o * (1 - o), out=dz[:, 3 * H:])
            dc = dc_k * f if full else torch.where(v, dc_k * f, dc)
        else:
            hk = hs[k]
            dz = dZ[k]
            if spec.cell == "tanh":
                torch.mul(dh_k, 1 - hk * hk, out=dz)
            else:
                torch.mul(dh_k, (hk != 0).to(acc), out=dz)
        if full:
            dh = dz @ w
        else:
            dz.masked_fill_(~v, 0.0)
            dh = torch.where(v, dz @ w, dh)
    h_prev_all = torch.cat([h0a.unsqueeze(0), hs[:-1]], 0)
    grad_w = dZ.reshape(T * B, -1).t() @ h_prev_all.reshape(T * B, H)
    grad_x = to_processing_order(dZ, lengths, spec.reverse).to(dtype)
    if pen_h0 is not None:
        dh = dh + pen_h0
    if rad_h is not None:
        dh = dh + rad_h[0] * h0a
    if rad_c is not None:
        dc = dc + rad_c[0] * c0.to(acc)
    grad_c0 = dc.to(dtype) if lstm else None
    return grad_x, grad_w.to(w_hh.dtype), dh.to(h0.dtype), grad_c0, grad_a


def naive(x_proj: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor,
          c0: Optional[torch.Tensor], *, cell: str, theta: float, penalties: Penalties,
          lengths: Optional[torch.Tensor], reverse: bool, weights: Optional[Weights] = None,
          cell_scale: Optional[torch.Tensor] = None, h_scale: float = 1.0,
          cell_norms: bool = False):
    """Plain-autograd recurrence with post-hoc penalties (the oracle of ``forward``/``backward``).

    Returns ``(output, h_n, c_n, terms [5], norms [T+1, B], cell_norms [T+1, B] or None)``,
    differentiable by autograd to any order (``norms`` and ``cell_norms`` included) and
    composable with ``torch.func`` transforms.  ``terms`` are all five terms of
    :data:`~rnnreg_kernels.penalties.TERM_NAMES`, computed post hoc from the states and (for
    the cell norm-stabilizer) the memory cells.  ``weights`` (the divided coefficients)
    replaces the coefficients of ``penalties`` when given.  ``cell="normprop"``: ``cell_scale``
    ``[H]`` and ``h_scale`` give h = o * tanh(cell_scale * c) * h_scale.  ``cell_norms``: also
    return the memory-cell norms (LSTM-type cells).
    """
    T, B, _ = x_proj.shape
    acc = acc_dtype_of(x_proj.dtype)
    lstm = has_cell_state(cell)
    xk = to_processing_order(x_proj, lengths, reverse).to(acc)
    w = w_hh.to(acc)
    h = h0.to(acc)
    c = c0.to(acc) if lstm else None
    a = cell_scale.to(acc) if cell == "normprop" else None
    valid = _valid_steps(T, B, lengths, x_proj.device)
    states, cells = [], []
    for k in range(T):
        z = xk[k] + h @ w.t()
        if lstm:
            zi, zf, zg, zo = z.chunk(4, 1)
            c_new = torch.sigmoid(zf) * c + torch.sigmoid(zi) * torch.tanh(zg)
            if cell == "normprop":
                h_new = torch.sigmoid(zo) * torch.tanh(a * c_new) * h_scale
            else:
                h_new = torch.sigmoid(zo) * torch.tanh(c_new)
            c = torch.where(valid[k], c_new, c)
            cells.append(torch.where(valid[k], c_new, torch.zeros_like(c_new)))
        elif cell == "relu":
            h_new = torch.relu(z)
        elif cell == "tanh":
            h_new = torch.tanh(z)
        else:
            h_new = torch.where(z > theta, z, torch.zeros_like(z))
        h = torch.where(valid[k], h_new, h)
        states.append(torch.where(valid[k], h_new, torch.zeros_like(h_new)))
    hs = torch.stack(states, 0)
    cs = torch.stack(cells, 0) if lstm else None
    c0a = c0.to(acc) if lstm else None
    terms = posthoc_terms(h0.to(acc), hs, penalties, lengths, weights, c0=c0a, cell_states=cs)
    v = valid[..., 0]

    def _norms(first, seq):
        n = hidden_norms(torch.cat([first.unsqueeze(0), seq], 0), penalties.ns_eps)
        return torch.cat([n[:1], torch.where(v, n[1:], torch.zeros_like(n[1:]))], 0)

    norms = _norms(h0.to(acc), hs)
    cnorms = _norms(c0a, cs) if lstm and cell_norms else None
    output = to_processing_order(hs, lengths, reverse).to(x_proj.dtype)
    c_n = c.to(x_proj.dtype) if lstm else None
    return output, h.to(x_proj.dtype), c_n, terms, norms, cnorms


def naive_from_spec(spec: Spec, x_proj: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor,
                    c0: Optional[torch.Tensor], ar_mask: Optional[torch.Tensor],
                    lengths: Optional[torch.Tensor], cell_scale: Optional[torch.Tensor] = None):
    """:func:`naive` driven by a backend :class:`Spec` (the weights already divided).

    The differentiable twin of any backend's ``forward`` on the same arguments, used by
    ``ops`` to build higher-order graphs.  Returns ``(output, h_n, c_n, terms [3], norms,
    cell_norms or None)``: the backend-level outputs (the contract's three terms; the terms
    that depend only on the norms are computed by ``ops`` outside the backend).
    """
    pen = Penalties(ns_include_initial=spec.ns_include_initial, ns_eps=spec.ns_eps,
                    ar_mask=ar_mask)
    output, h_n, c_n, terms, norms, cnorms = naive(
        x_proj, w_hh, h0, c0, cell=spec.cell, theta=spec.theta, penalties=pen,
        lengths=lengths, reverse=spec.reverse, weights=Weights(spec.w_ns, spec.w_tar, spec.w_ar),
        cell_scale=cell_scale, h_scale=spec.h_scale, cell_norms=spec.cell_norms)
    return output, h_n, c_n, terms[:3], norms, cnorms
