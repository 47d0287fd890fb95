"""Backward kernels: batch-tiled, persistent, one launch per step (all use ``step.bwd_step``).

Arguments as in :mod:`.fwd`, plus what forward produced (``out``, ``act``, ``cs``,
``norms``), the upstream gradients ``gout [T, B, H]``, ``ghn``, ``gcn [B, H]`` and
``gterms [3]`` (ACC), and the outputs ``gx [T, B, G*H]`` (= dz, also the exchange buffer
between steps), ``gh0``, ``gc0 [B, H]``.  ``grad_w_hh`` is one GEMM in the launcher.
"""
import triton
import triton.language as tl

from .step import (bwd_step, dot_acc, gate_cols, grid_barrier, ns_initial_grad, tile_rows,
                   wide)

_NO_SPEC = ["T", "B", "has_len", "has_mask", "rev", "ns_init", "k"]


@triton.jit
def _coefs(gterms_ptr, w_ns, w_ns_lo, w_tar, w_tar_lo, w_ar, w_ar_lo, ACC: tl.constexpr):
    """(2 w_ns g_ns, 2 w_tar g_tar, 2 w_ar g_ar)."""
    c_ns = 2.0 * wide(w_ns, w_ns_lo, ACC) * tl.load(gterms_ptr).to(ACC)
    c_tar = 2.0 * wide(w_tar, w_tar_lo, ACC) * tl.load(gterms_ptr + 1).to(ACC)
    c_ar = 2.0 * wide(w_ar, w_ar_lo, ACC) * tl.load(gterms_ptr + 2).to(ACC)
    return c_ns, c_tar, c_ar


@triton.jit
def _mask_sq(mask_ptr, rows, row_ok, units, unit_ok, H, has_mask, ACC: tl.constexpr):
    m = tl.load(mask_ptr + rows[:, None] * H + units[None, :],
                mask=tl.where(has_mask != 0, row_ok[:, None] & unit_ok[None, :], False), other=1.0)
    m = tl.where(has_mask != 0, m.to(ACC), 1.0)
    return m * m


@triton.jit
def _store_grad_h0(dh_rec, rows, row_ok, units, unit_ok, h0_ptr, norms_ptr, gh0_ptr, B, H,
                   ns_init, c_ns, ACC: tl.constexpr):
    """Store grad_h0 = the recurrent grad of step 1 + the NS-initial term."""
    um = row_ok[:, None] & unit_ok[None, :]
    noff = rows[:, None] * H + units[None, :]
    h0 = tl.load(h0_ptr + noff, mask=um, other=0.0).to(ACC)
    n0 = tl.load(norms_ptr + rows, mask=row_ok, other=1.0)
    n1 = tl.load(norms_ptr + B + rows, mask=row_ok, other=1.0)
    gh0 = ns_initial_grad(dh_rec, h0, n0, n1, c_ns, ns_init)
    tl.store(gh0_ptr + noff, gh0.to(gh0_ptr.dtype.element_ty), mask=um)


@triton.jit
def _grad_h0(dh_rec, rows, row_ok, units, unit_ok, h0_ptr, norms_ptr, dc_ptr, gh0_ptr, gc0_ptr,
             B, H, ns_init, c_ns, CELL: tl.constexpr, ACC: tl.constexpr):
    """Store grad_h0 and grad_c0 (``dc_ptr`` holds dc of step 1)."""
    _store_grad_h0(dh_rec, rows, row_ok, units, unit_ok, h0_ptr, norms_ptr, gh0_ptr, B, H,
                   ns_init, c_ns, ACC)
    if CELL == 0:
        um = row_ok[:, None] & unit_ok[None, :]
        noff = rows[:, None] * H + units[None, :]
        dc = tl.load(dc_ptr + noff, mask=um, other=0.0)
        tl.store(gc0_ptr + noff, dc.to(gc0_ptr.dtype.element_ty), mask=um)


@triton.jit(do_not_specialize=_NO_SPEC)
def bwd_tiled(out_ptr, w_ptr, h0_ptr, c0_ptr, len_ptr, mask_ptr, act_ptr, cs_ptr, norms_ptr,
              gout_ptr, ghn_ptr, gcn_ptr, gterms_ptr, gx_ptr, gh0_ptr, gc0_ptr,
              T, B, H, has_len, has_mask, rev, ns_init, w_ns, w_ns_lo, w_tar, w_tar_lo, w_ar,
              w_ar_lo, CELL: tl.constexpr, G: tl.constexpr, BB: tl.constexpr,
              BH: tl.constexpr, ACC: tl.constexpr, ACC_F64: tl.constexpr, TF32: tl.constexpr):
    """One program per batch tile holds all of W_hh and runs the reverse loop.

    Grid ``(cdiv(B, BB),)``; needs ``BH >= H``.
    """
    pid = tl.program_id(0)
    rows, row_ok, L = tile_rows(pid * BB, B, T, len_ptr, has_len, BB)
    units = tl.arange(0, BH)
    unit_ok = units < H
    xcols, col_ok = gate_cols(0, H, G, BH)
    # W_hh tile [G*BH (gate rows, interleaved), BH]
    wb = tl.load(w_ptr + xcols[:, None] * H + units[None, :],
                 mask=col_ok[:, None] & unit_ok[None, :], other=0.0)
    c_ns, c_tar, c_ar = _coefs(gterms_ptr, w_ns, w_ns_lo, w_tar, w_tar_lo, w_ar, w_ar_lo, ACC)
    m2 = _mask_sq(mask_ptr, rows, row_ok, units, unit_ok, H, has_mask, ACC)
    dh_rec = tl.zeros([BB, BH], ACC)
    dc = tl.zeros([BB, BH], ACC)
    for j in range(0, T):
        k = T - j
        dz, dc = bwd_step(k, dh_rec, dc, m2, rows, row_ok, L, units, unit_ok, xcols, col_ok,
                          out_ptr, h0_ptr, c0_ptr, act_ptr, cs_ptr, norms_ptr, gout_ptr,
                          ghn_ptr, gcn_ptr, gx_ptr, B, H, rev, ns_init, c_ns, c_tar, c_ar,
                          CELL, G, BB, BH, ACC)
        dh_rec = dot_acc(dz.to(wb.dtype), wb, tl.zeros([BB, BH], ACC), ACC_F64, TF32)
    _store_grad_h0(dh_rec, rows, row_ok, units, unit_ok, h0_ptr, norms_ptr, gh0_ptr, B, H,
                   ns_init, c_ns, ACC)
    if CELL == 0:
        noff = rows[:, None] * H + units[None, :]
        tl.store(gc0_ptr + noff, dc.to(gc0_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & unit_ok[None, :])


@triton.jit
def _dz_w(kn, rows, row_ok, L, units, unit_ok, gx_ptr, w_ptr, w0, w1, w2, w3, B, H, rev,
          G: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
          HOLD: tl.constexpr, ACC: tl.constexpr, ACC_F64: tl.constexpr, TF32: tl.constexpr):
    """``dz_{kn} @ W_hh[:, units]`` ``[BB, BH]`` (0 for rows where step kn is invalid).

    dz is read from ``gx`` at the position of step kn.  ``HOLD``: the slice's W_hh columns
    are held per gate in ``w0..w3 [BK, BH]`` (BK >= H); else streamed in BK-chunks.
    """
    ok = row_ok & (kn <= L)
    pos = tl.where(rev != 0, L - kn, kn - 1).to(tl.int64)
    base = gx_ptr + (pos * B + rows)[:, None] * (G * H)
    acc = tl.zeros([BB, BH], ACC)
    if HOLD:
        kk = tl.arange(0, BK)
        m = ok[:, None] & (kk < H)[None, :]
        a = tl.load(base + kk[None, :], mask=m, other=0.0, cache_modifier=".cg")
        acc = dot_acc(a, w0, acc, ACC_F64, TF32)
        if G == 4:
            a = tl.load(base + H + kk[None, :], mask=m, other=0.0, cache_modifier=".cg")
            acc = dot_acc(a, w1, acc, ACC_F64, TF32)
            a = tl.load(base + 2 * H + kk[None, :], mask=m, other=0.0, cache_modifier=".cg")
            acc = dot_acc(a, w2, acc, ACC_F64, TF32)
            a = tl.load(base + 3 * H + kk[None, :], mask=m, other=0.0, cache_modifier=".cg")
            acc = dot_acc(a, w3, acc, ACC_F64, TF32)
    else:
        for g in tl.static_range(G):
            for k0 in range(0, H, BK):
                kk = k0 + tl.arange(0, BK)
                kok = kk < H
                a = tl.load(base + g * H + kk[None, :], mask=ok[:, None] & kok[None, :],
                            other=0.0, cache_modifier=".cg")
                wc = tl.load(w_ptr + (g * H + kk)[:, None].to(tl.int64) * H + units[None, :],
                             mask=kok[:, None] & unit_ok[None, :], other=0.0)
                acc = dot_acc(a, wc, acc, ACC_F64, TF32)
    return acc


@triton.jit
def _w_cols(w_ptr, g, units, unit_ok, H, BK: tl.constexpr):
    kk = tl.arange(0, BK)
    return tl.load(w_ptr + (g * H + kk)[:, None].to(tl.int64) * H + units[None, :],
                   mask=(kk < H)[:, None] & unit_ok[None, :], other=0.0)


@triton.jit
def _bwd_tile(k, rows, row_ok, L, units, unit_ok, xcols, col_ok, m2, w0, w1, w2, w3,
              out_ptr, w_ptr, h0_ptr, c0_ptr, act_ptr, cs_ptr, norms_ptr, gout_ptr, ghn_ptr,
              gcn_ptr, gx_ptr, dc_ptr, B, H, rev, ns_init, c_ns, c_tar, c_ar,
              CELL: tl.constexpr, G: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr,
              BK: tl.constexpr, HOLD: tl.constexpr, ACC: tl.constexpr, ACC_F64: tl.constexpr,
              TF32: tl.constexpr):
    """Backward step k of one (batch tile, hidden slice); dc lives in ``dc_ptr [B, H]``."""
    dh_rec = _dz_w(k + 1, rows, row_ok, L, units, unit_ok, gx_ptr, w_ptr, w0, w1, w2, w3,
                   B, H, rev, G, BB, BH, BK, HOLD, ACC, ACC_F64, TF32)
    noff = rows[:, None] * H + units[None, :]
    um = row_ok[:, None] & unit_ok[None, :]
    if CELL == 0:
        dc = tl.load(dc_ptr + noff, mask=um, other=0.0)
    else:
        dc = dh_rec
    dz, dc = bwd_step(k, dh_rec, dc, m2, rows, row_ok, L, units, unit_ok, xcols, col_ok,
                      out_ptr, h0_ptr, c0_ptr, act_ptr, cs_ptr, norms_ptr, gout_ptr, ghn_ptr,
                      gcn_ptr, gx_ptr, B, H, rev, ns_init, c_ns, c_tar, c_ar, CELL, G, BB, BH,
                      ACC)
    if CELL == 0:
        tl.store(dc_ptr + noff, dc, mask=um)


@triton.jit(do_not_specialize=_NO_SPEC)
def bwd_persistent(out_ptr, w_ptr, h0_ptr, c0_ptr, len_ptr, mask_ptr, act_ptr, cs_ptr,
                   norms_ptr, gout_ptr, ghn_ptr, gcn_ptr, gterms_ptr, gx_ptr, gh0_ptr, gc0_ptr,
                   dc_ptr, bar_ptr,
                   T, B, H, has_len, has_mask, rev, ns_init, w_ns, w_ns_lo, w_tar, w_tar_lo,
                   w_ar, w_ar_lo, CELL: tl.constexpr, G: tl.constexpr, BB: tl.constexpr,
                   BH: tl.constexpr, BK: tl.constexpr, HOLD: tl.constexpr, ACC: tl.constexpr,
                   ACC_F64: tl.constexpr, TF32: tl.constexpr):
    """One launch for the reverse loop.  Grid ``(NH, NB)`` as in ``fwd_persistent``: program
    (p, q) owns units ``p*BH ..`` and the batch tiles q, q+NB, ...; ``HOLD`` keeps the
    columns ``W_hh[:, units]`` (per gate ``[BK, BH]``) in registers.  Programs exchange dz
    through ``gx`` and meet at the barrier ``bar[q]`` after each step.  ``dc [B, H]`` (ACC)
    carries the LSTM cell gradient.
    """
    pid = tl.program_id(0)
    pid_b = tl.program_id(1)
    NH = tl.num_programs(0)
    stride = tl.num_programs(1) * BB
    bar = bar_ptr + pid_b
    u0 = pid * BH
    units = u0 + tl.arange(0, BH)
    unit_ok = units < H
    xcols, col_ok = gate_cols(u0, H, G, BH)
    if HOLD:
        w0 = _w_cols(w_ptr, 0, units, unit_ok, H, BK)
        if G == 4:
            w1 = _w_cols(w_ptr, 1, units, unit_ok, H, BK)
            w2 = _w_cols(w_ptr, 2, units, unit_ok, H, BK)
            w3 = _w_cols(w_ptr, 3, units, unit_ok, H, BK)
        else:
            w1 = w0
            w2 = w0
            w3 = w0
    else:
        w0 = w_ptr
        w1 = w_ptr
        w2 = w_ptr
        w3 = w_ptr
    c_ns, c_tar, c_ar = _coefs(gterms_ptr, w_ns, w_ns_lo, w_tar, w_tar_lo, w_ar, w_ar_lo, ACC)
    for j in range(0, T):
        k = T - j
        for b0 in range(pid_b * BB, B, stride):
            rows, row_ok, L = tile_rows(b0, B, T, len_ptr, has_len, BB)
            m2 = _mask_sq(mask_ptr, rows, row_ok, units, unit_ok, H, has_mask, ACC)
            _bwd_tile(k, rows, row_ok, L, units, unit_ok, xcols, col_ok, m2, w0, w1, w2, w3,
                      out_ptr, w_ptr, h0_ptr, c0_ptr, act_ptr, cs_ptr, norms_ptr, gout_ptr,
                      ghn_ptr, gcn_ptr, gx_ptr, dc_ptr, B, H, rev, ns_init, c_ns, c_tar, c_ar,
                      CELL, G, BB, BH, BK, HOLD, ACC, ACC_F64, TF32)
        grid_barrier(bar, (j + 1) * NH)
    for b0 in range(pid_b * BB, B, stride):
        rows, row_ok, L = tile_rows(b0, B, T, len_ptr, has_len, BB)
        dh_rec = _dz_w(1, rows, row_ok, L, units, unit_ok, gx_ptr, w_ptr, w0, w1, w2, w3,
                       B, H, rev, G, BB, BH, BK, HOLD, ACC, ACC_F64, TF32)
        _grad_h0(dh_rec, rows, row_ok, units, unit_ok, h0_ptr, norms_ptr, dc_ptr, gh0_ptr,
                 gc0_ptr, B, H, ns_init, c_ns, CELL, ACC)


@triton.jit(do_not_specialize=_NO_SPEC)
def bwd_step_launch(out_ptr, w_ptr, h0_ptr, c0_ptr, len_ptr, mask_ptr, act_ptr, cs_ptr,
                    norms_ptr, gout_ptr, ghn_ptr, gcn_ptr, gterms_ptr, gx_ptr, gh0_ptr,
                    gc0_ptr, dc_ptr, k,
                    T, B, H, has_len, has_mask, rev, ns_init, w_ns, w_ns_lo, w_tar, w_tar_lo,
                    w_ar, w_ar_lo, CELL: tl.constexpr, G: tl.constexpr, BB: tl.constexpr,
                    BH: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr,
                    ACC_F64: tl.constexpr, TF32: tl.constexpr):
    """Launch ``k`` of ``T .. 0``: backward step k, or (k = 0) grad_h0 / grad_c0.

    Grid ``(cdiv(H, BH), cdiv(B, BB))``; W_hh columns are streamed in BK-chunks.
    """
    pid_h = tl.program_id(0)
    pid_b = tl.program_id(1)
    u0 = pid_h * BH
    units = u0 + tl.arange(0, BH)
    unit_ok = units < H
    xcols, col_ok = gate_cols(u0, H, G, BH)
    rows, row_ok, L = tile_rows(pid_b * BB, B, T, len_ptr, has_len, BB)
    c_ns, c_tar, c_ar = _coefs(gterms_ptr, w_ns, w_ns_lo, w_tar, w_tar_lo, w_ar, w_ar_lo, ACC)
    if k >= 1:
        m2 = _mask_sq(mask_ptr, rows, row_ok, units, unit_ok, H, has_mask, ACC)
        _bwd_tile(k, rows, row_ok, L, units, unit_ok, xcols, col_ok, m2, w_ptr, w_ptr, w_ptr,
                  w_ptr, out_ptr, w_ptr, h0_ptr, c0_ptr, act_ptr, cs_ptr, norms_ptr, gout_ptr,
                  ghn_ptr, gcn_ptr, gx_ptr, dc_ptr, B, H, rev, ns_init, c_ns, c_tar, c_ar,
                  CELL, G, BB, BH, BK, False, ACC, ACC_F64, TF32)
    else:
        dh_rec = _dz_w(1, rows, row_ok, L, units, unit_ok, gx_ptr, w_ptr, w_ptr, w_ptr, w_ptr,
                       w_ptr, B, H, rev, G, BB, BH, BK, False, ACC, ACC_F64, TF32)
        _grad_h0(dh_rec, rows, row_ok, units, unit_ok, h0_ptr, norms_ptr, dc_ptr, gh0_ptr,
                 gc0_ptr, B, H, ns_init, c_ns, CELL, ACC)
