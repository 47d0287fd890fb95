"""Triton kernels of the fused penalty pass (``rnnreg_kernels.native``): no autograd here.

The pass reads a ``[T, B, H]`` sequence of hidden states in *time order* (any strides) once in
forward and once in backward.  One program per (time position p, tile of BB rows) loops over H
in chunks of BH.  Row b is valid at positions p < L_b (``len_ptr``; all T without lengths).

* forward (:func:`forward_partials`) writes three ``[T, B]`` partial sums in the accumulation
  dtype: ``sq[p, b] = sum_i h_{p,b,i}^2``, ``tar[p, b] = ||h_p - h_{p-1}||^2`` for valid pairs
  (p >= 1, p < L_b; else 0) and, with an AR mask, ``ar[p, b] = ||m_b * h_p||^2``; everything 0
  at invalid positions.  The O(T*B) rest (norms, norm-stabilizer differences, the sums) is done
  by the caller.
* backward (:func:`backward_grad`) writes the penalty gradient ``[T, B, H]``:
  ``coef[p, b] * h_p + k_tar * ((h_p - h_{p-1})[pair p] - (h_{p+1} - h_p)[pair p+1])
  + k_ar * m_b^2 * h_p`` (valid positions; 0 elsewhere), with ``coef`` the norm-stabilizer's
  radial coefficients and ``k = [k_tar, k_ar]`` a device tensor (no host sync for the
  upstream gradients).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

BB = 4     # rows per program
BH_MAX = 256


@triton.jit
def _row_lengths(len_ptr, rows, row_ok, T, HAS_LEN: tl.constexpr, BB: tl.constexpr):
    if HAS_LEN:
        L = tl.load(len_ptr + rows, mask=row_ok, other=0)
    else:
        L = tl.zeros([BB], tl.int64) + T
    return L


@triton.jit
def penalty_fwd_kernel(h_ptr, s_t, s_b, s_h, mask_ptr, sm_b, sm_h, len_ptr,
                       sq_ptr, tar_ptr, ar_ptr, T, B, H,
                       HAS_LEN: tl.constexpr, HAS_TAR: tl.constexpr, HAS_MASK: tl.constexpr,
                       BB: tl.constexpr, BH: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1).to(tl.int64) * BB + tl.arange(0, BB)
    row_ok = rows < B
    L = _row_lengths(len_ptr, rows, row_ok, T, HAS_LEN, BB)
    valid = row_ok & (p < L)
    pair = valid & (p >= 1)
    acc_ty = sq_ptr.dtype.element_ty
    sq = tl.zeros([BB], acc_ty)
    tar = tl.zeros([BB], acc_ty)
    ar = tl.zeros([BB], acc_ty)
    base = p * s_t + rows * s_b
    for c0 in range(0, H, BH):
        cols = c0 + tl.arange(0, BH)
        col_ok = cols < H
        ok = valid[:, None] & col_ok[None, :]
        off = base[:, None] + cols.to(tl.int64)[None, :] * s_h
        h = tl.load(h_ptr + off, mask=ok, other=0.0).to(acc_ty)
        sq += tl.sum(h * h, 1)
        if HAS_TAR:
            ok_p = pair[:, None] & col_ok[None, :]
            hp = tl.load(h_ptr + off - s_t, mask=ok_p, other=0.0).to(acc_ty)
            d = tl.where(ok_p, h - hp, 0.0)
            tar += tl.sum(d * d, 1)
        if HAS_MASK:
            m_off = rows[:, None] * sm_b + cols.to(tl.int64)[None, :] * sm_h
            m = tl.load(mask_ptr + m_off, mask=ok, other=0.0).to(acc_ty)
            mh = m * h
            ar += tl.sum(mh * mh, 1)
    out = p * B + rows
    tl.store(sq_ptr + out, sq, mask=row_ok)
    if HAS_TAR:
        tl.store(tar_ptr + out, tar, mask=row_ok)
    if HAS_MASK:
        tl.store(ar_ptr + out, ar, mask=row_ok)


@triton.jit
def penalty_bwd_kernel(h_ptr, s_t, s_b, s_h, mask_ptr, sm_b, sm_h, len_ptr, coef_ptr, k_ptr,
                       grad_ptr, T, B, H,
                       HAS_LEN: tl.constexpr, HAS_TAR: tl.constexpr, HAS_AR: tl.constexpr,
                       HAS_MASK: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1).to(tl.int64) * BB + tl.arange(0, BB)
    row_ok = rows < B
    L = _row_lengths(len_ptr, rows, row_ok, T, HAS_LEN, BB)
    valid = row_ok & (p < L)
    prev_ok = valid & (p >= 1)
    next_ok = row_ok & (p + 1 < L)
    acc_ty = coef_ptr.dtype.element_ty
    coef = tl.load(coef_ptr + p * B + rows, mask=valid, other=0.0)
    k_tar = tl.load(k_ptr)
    k_ar = tl.load(k_ptr + 1)
    base = p * s_t + rows * s_b
    for c0 in range(0, H, BH):
        cols = c0 + tl.arange(0, BH)
        col_ok = cols < H
        ok = valid[:, None] & col_ok[None, :]
        off = base[:, None] + cols.to(tl.int64)[None, :] * s_h
        h = tl.load(h_ptr + off, mask=ok, other=0.0).to(acc_ty)
        g = coef[:, None] * h
        if HAS_TAR:
            ok_p = prev_ok[:, None] & col_ok[None, :]
            ok_n = next_ok[:, None] & col_ok[None, :]
            hp = tl.load(h_ptr + off - s_t, mask=ok_p, other=0.0).to(acc_ty)
            hn = tl.load(h_ptr + off + s_t, mask=ok_n, other=0.0).to(acc_ty)
            g += k_tar * (tl.where(ok_p, h - hp, 0.0) - tl.where(ok_n, hn - h, 0.0))
        if HAS_AR:
            if HAS_MASK:
                m_off = rows[:, None] * sm_b + cols.to(tl.int64)[None, :] * sm_h
                m = tl.load(mask_ptr + m_off, mask=ok, other=0.0).to(acc_ty)
                g += k_ar * (m * m) * h
            else:
                g += k_ar * h
        g_off = (p * B + rows)[:, None] * H + cols.to(tl.int64)[None, :]
        tl.store(grad_ptr + g_off, g.to(grad_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


def _block_h(H: int) -> int:
    return min(BH_MAX, triton.next_power_of_2(max(H, 1)))


def forward_partials(states: torch.Tensor, ar_mask: Optional[torch.Tensor],
                     lengths: Optional[torch.Tensor], need_tar: bool, acc: torch.dtype):
    """``states [T, B, H]`` (time order) -> ``(sq, tar or None, ar or None)``, each ``[T, B]``
    of dtype ``acc`` (``ar`` only with ``ar_mask``); see the module docstring."""
    T, B, H = states.shape
    dev = states.device
    sq = torch.empty(T, B, dtype=acc, device=dev)
    tar = torch.empty(T, B, dtype=acc, device=dev) if need_tar else sq
    ar = torch.empty(T, B, dtype=acc, device=dev) if ar_mask is not None else sq
    mask = ar_mask if ar_mask is not None else sq
    lens = lengths if lengths is not None else sq
    sm = ar_mask.stride() if ar_mask is not None else (0, 0)
    grid = (T, triton.cdiv(B, BB))
    penalty_fwd_kernel[grid](states, *states.stride(), mask, *sm, lens, sq, tar, ar, T, B, H,
                             HAS_LEN=lengths is not None, HAS_TAR=need_tar,
                             HAS_MASK=ar_mask is not None, BB=BB, BH=_block_h(H))
    return sq, tar if need_tar else None, ar if ar_mask is not None else None


def backward_grad(states: torch.Tensor, coef: torch.Tensor, k: torch.Tensor,
                  ar_mask: Optional[torch.Tensor], lengths: Optional[torch.Tensor],
                  need_tar: bool, need_ar: bool) -> torch.Tensor:
    """The penalty gradient ``[T, B, H]`` (contiguous, dtype of ``states``).

    ``coef [T, B]`` (accumulation dtype, 0 at invalid positions), ``k [2] = (k_tar, k_ar)``
    in the accumulation dtype, already multiplied by the upstream gradients.
    """
    T, B, H = states.shape
    grad = torch.empty(T, B, H, dtype=states.dtype, device=states.device)
    mask = ar_mask if ar_mask is not None else coef
    lens = lengths if lengths is not None else coef
    sm = ar_mask.stride() if ar_mask is not None else (0, 0)
    grid = (T, triton.cdiv(B, BB))
    penalty_bwd_kernel[grid](states, *states.stride(), mask, *sm, lens, coef, k, grad, T, B, H,
                             HAS_LEN=lengths is not None, HAS_TAR=need_tar, HAS_AR=need_ar,
                             HAS_MASK=ar_mask is not None and need_ar, BB=BB,
                             BH=_block_h(H))
    return grad
