"""Forward kernels: batch-tiled, persistent, one launch per step (all use ``step.fwd_step``).

Common arguments (pointers first): ``x [T, B, G*H]``, ``w [G*H, H]``, ``h0``, ``c0 [B, H]``,
``lens [B]`` int64 (read when ``has_len``), ``mask [B, H]`` (read when ``has_mask``);
outputs ``out [T, B, H]``, ``hn``, ``cn [B, H]``, ``act [T, B, G*H]`` and ``cs [T, B, H]``
(LSTM, ACC dtype, saved for backward), ``norms [T+1, B]``, ``tpart [P, 3]`` (weighted
per-program penalty sums; the launcher adds them up).  ``heps = H * ns_eps``.
"""
import triton
import triton.language as tl

from .step import (dot_acc, fwd_penalty, fwd_step, gate_cols, grid_barrier, load_h_op,
                   load_state, ns_step, tile_rows, wide)

_NO_SPEC = ["T", "B", "H", "has_len", "has_mask", "rev", "ns_init", "k"]


@triton.jit
def _mask_tile(mask_ptr, rows, row_ok, units, unit_ok, H, has_mask, ACC: tl.constexpr):
    m = tl.load(mask_ptr + rows[:, None] * H + units[None, :],
                mask=(row_ok[:, None] & unit_ok[None, :]) & (has_mask != 0), other=1.0)
    return tl.where(has_mask != 0, m.to(ACC), 1.0)


@triton.jit(do_not_specialize=_NO_SPEC)
def fwd_tiled(x_ptr, w_ptr, h0_ptr, c0_ptr, len_ptr, mask_ptr,
              out_ptr, hn_ptr, cn_ptr, act_ptr, cs_ptr, norms_ptr, tpart_ptr,
              T, B, H, has_len, has_mask, rev, ns_init, theta, theta_lo, heps, w_ns, w_ns_lo,
              w_tar, w_tar_lo, w_ar, w_ar_lo, CELL: tl.constexpr, G: tl.constexpr,
              BB: tl.constexpr, BH: tl.constexpr, ACC: tl.constexpr, ACC_F64: tl.constexpr,
              TF32: tl.constexpr):
    """One program per batch tile holds all of W_hh and the state; the time loop runs inside.

    Grid ``(cdiv(B, BB),)``; needs ``BH >= H``.
    """
    theta = wide(theta, theta_lo, ACC)
    w_ns = wide(w_ns, w_ns_lo, ACC)
    w_tar = wide(w_tar, w_tar_lo, ACC)
    w_ar = wide(w_ar, w_ar_lo, ACC)
    pid = tl.program_id(0)
    rows, row_ok, L = tile_rows(pid * BB, B, T, len_ptr, has_len, BB)
    units = tl.arange(0, BH)
    unit_ok = units < H
    xcols, col_ok = gate_cols(0, H, G, BH)
    # W_hh^T tile [BH (k), G*BH (gate columns)]
    w = tl.load(w_ptr + xcols[None, :] * H + units[:, None],
                mask=unit_ok[:, None] & col_ok[None, :], other=0.0)
    um = row_ok[:, None] & unit_ok[None, :]
    noff = rows[:, None] * H + units[None, :]
    h = tl.load(h0_ptr + noff, mask=um, other=0.0).to(ACC)
    if CELL == 0:
        c = tl.load(c0_ptr + noff, mask=um, other=0.0).to(ACC)
    else:
        c = h
    m = _mask_tile(mask_ptr, rows, row_ok, units, unit_ok, H, has_mask, ACC)
    n_prev = tl.sqrt(tl.sum(h * h, axis=1) + heps)
    tl.store(norms_ptr + rows, n_prev, mask=row_ok)
    acc_ns = tl.zeros([BB], ACC)
    acc_tar = tl.zeros([BB], ACC)
    acc_ar = tl.zeros([BB], ACC)
    for k in range(1, T + 1):
        hw = dot_acc(h.to(w.dtype), w, tl.zeros([BB, G * BH], ACC), ACC_F64, TF32)
        h_new, c = fwd_step(k, hw, h, c, rows, row_ok, L, units, unit_ok, xcols, col_ok,
                            x_ptr, out_ptr, act_ptr, cs_ptr, hn_ptr, cn_ptr, B, H, rev, theta,
                            CELL, G, BB, BH, ACC)
        sq, tar, ar = fwd_penalty(k, h_new, h, m, row_ok, L)
        n_k, ns = ns_step(k, tl.sqrt(sq + heps), n_prev, row_ok, L, ns_init)
        tl.store(norms_ptr + k * B + rows, n_k, mask=row_ok)
        n_prev = tl.where(row_ok & (k <= L), n_k, n_prev)
        acc_ns += ns
        acc_tar += tar
        acc_ar += ar
        h = h_new
    tl.store(tpart_ptr + pid * 3, w_ns * tl.sum(acc_ns, axis=0))
    tl.store(tpart_ptr + pid * 3 + 1, w_tar * tl.sum(acc_tar, axis=0))
    tl.store(tpart_ptr + pid * 3 + 2, w_ar * tl.sum(acc_ar, axis=0))


@triton.jit
def _fwd_tile(k, w_sl, rows, row_ok, L, units, unit_ok, xcols, col_ok, m,
              x_ptr, w_ptr, h0_ptr, out_ptr, act_ptr, cs_ptr, c0_ptr, hn_ptr, cn_ptr,
              B, H, rev, theta, CELL: tl.constexpr, G: tl.constexpr, BB: tl.constexpr,
              BH: tl.constexpr, BK: tl.constexpr, HOLD: tl.constexpr, ACC: tl.constexpr,
              ACC_F64: tl.constexpr, TF32: tl.constexpr):
    """Step k of one (batch tile, hidden slice) with the state read from global memory.

    ``HOLD``: ``w_sl [BK, G*BH]`` is the slice's whole W_hh^T (persistent, BK >= H); else W is
    streamed in BK-chunks.  Returns the per-row (sum h^2 over the slice, TAR, AR) sums.
    """
    idx = tl.minimum(k - 1, L)
    if HOLD:
        kk = tl.arange(0, BK)
        a = load_h_op(idx, L, rows, row_ok, kk, kk < H, h0_ptr, out_ptr, B, H, rev)
        hw = dot_acc(a, w_sl, tl.zeros([BB, G * BH], ACC), ACC_F64, TF32)
    else:
        hw = tl.zeros([BB, G * BH], ACC)
        for k0 in range(0, H, BK):
            kk = k0 + tl.arange(0, BK)
            kok = kk < H
            a = load_h_op(idx, L, rows, row_ok, kk, kok, h0_ptr, out_ptr, B, H, rev)
            wc = tl.load(w_ptr + xcols[None, :] * H + kk[:, None],
                         mask=kok[:, None] & col_ok[None, :], other=0.0)
            hw = dot_acc(a, wc, hw, ACC_F64, TF32)
    h_prev = load_state(idx, L, rows, row_ok, units, unit_ok, h0_ptr, out_ptr, B, H, rev,
                         row_ok, ACC)
    if CELL == 0:
        c_prev = load_state(idx, L, rows, row_ok, units, unit_ok, c0_ptr, cs_ptr, B, H, rev,
                             row_ok, ACC)
    else:
        c_prev = h_prev
    h, c = fwd_step(k, hw, h_prev, c_prev, rows, row_ok, L, units, unit_ok, xcols, col_ok,
                    x_ptr, out_ptr, act_ptr, cs_ptr, hn_ptr, cn_ptr, B, H, rev, theta,
                    CELL, G, BB, BH, ACC)
    return fwd_penalty(k, h, h_prev, m, row_ok, L)


@triton.jit
def _h0_sq(rows, row_ok, units, unit_ok, h0_ptr, H, ACC: tl.constexpr):
    h = tl.load(h0_ptr + rows[:, None] * H + units[None, :],
                mask=row_ok[:, None] & unit_ok[None, :], other=0.0).to(ACC)
    return tl.sum(h * h, axis=1)


@triton.jit
def _finalize(k, rows, row_ok, L, part_ptr, norms_ptr, NH, B, heps, ns_init, on,
              NP: tl.constexpr):
    """Reduce the slices' sums of squares of step k: store norms[k], return NS per row."""
    p = tl.arange(0, NP)
    ok = tl.where(on, row_ok, False)
    s = tl.load(part_ptr + ((k % 2) * NH + p[:, None]) * B + rows[None, :],
                mask=(p[:, None] < NH) & ok[None, :], other=0.0, cache_modifier=".cg")
    n_k = tl.sqrt(tl.sum(s, axis=0) + heps)
    n_prev = tl.load(norms_ptr + (k - 1) * B + rows, mask=ok & (k >= 1), other=0.0)
    n_store, ns = ns_step(k, n_k, n_prev, row_ok, L, ns_init)
    tl.store(norms_ptr + k * B + rows, n_store, mask=ok)
    return tl.where(ok, ns, 0.0)


@triton.jit(do_not_specialize=_NO_SPEC)
def fwd_persistent(x_ptr, w_ptr, h0_ptr, c0_ptr, len_ptr, mask_ptr,
                   out_ptr, hn_ptr, cn_ptr, act_ptr, cs_ptr, norms_ptr, tpart_ptr,
                   part_ptr, bar_ptr,
                   T, B, H, has_len, has_mask, rev, ns_init, theta, theta_lo, heps, w_ns,
                   w_ns_lo, w_tar, w_tar_lo, w_ar, w_ar_lo,
                   CELL: tl.constexpr, G: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr,
                   BK: tl.constexpr, NP: tl.constexpr, HOLD: tl.constexpr, ACC: tl.constexpr,
                   ACC_F64: tl.constexpr, TF32: tl.constexpr):
    """One launch for the whole sequence.  Grid ``(NH, NB)``: program (p, q) owns units
    ``p*BH ..`` and the batch tiles q, q+NB, ...; the NH programs of a group meet at the
    barrier ``bar[q]`` after each step (they must be co-resident).  ``HOLD``: the slice of
    W_hh^T ``[BK >= H, G*BH]`` stays in registers for all steps; else it is re-read in
    BK-chunks (from L1/L2) each step.  ``part [2, NH, B]`` holds the slices' sums of squares.
    """
    theta = wide(theta, theta_lo, ACC)
    w_ns = wide(w_ns, w_ns_lo, ACC)
    w_tar = wide(w_tar, w_tar_lo, ACC)
    w_ar = wide(w_ar, w_ar_lo, ACC)
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
        kk = tl.arange(0, BK)
        w_sl = tl.load(w_ptr + xcols[None, :] * H + kk[:, None],
                       mask=(kk < H)[:, None] & col_ok[None, :], other=0.0)
    else:
        w_sl = w_ptr
    first = pid == 0
    for b0 in range(pid_b * BB, B, stride):
        rows, row_ok, L = tile_rows(b0, B, T, len_ptr, has_len, BB)
        sq = _h0_sq(rows, row_ok, units, unit_ok, h0_ptr, H, ACC)
        tl.store(part_ptr + pid * B + rows, sq, mask=row_ok)
    grid_barrier(bar, NH)
    for b0 in range(pid_b * BB, B, stride):
        rows, row_ok, L = tile_rows(b0, B, T, len_ptr, has_len, BB)
        _finalize(0, rows, row_ok, L, part_ptr, norms_ptr, NH, B, heps, ns_init, first, NP)
    acc_ns = tl.zeros([BB], ACC)
    acc_tar = tl.zeros([BB], ACC)
    acc_ar = tl.zeros([BB], ACC)
    for k in range(1, T + 1):
        for b0 in range(pid_b * BB, B, stride):
            rows, row_ok, L = tile_rows(b0, B, T, len_ptr, has_len, BB)
            m = _mask_tile(mask_ptr, rows, row_ok, units, unit_ok, H, has_mask, ACC)
            sq, tar, ar = _fwd_tile(k, w_sl, rows, row_ok, L, units, unit_ok, xcols, col_ok, m,
                                    x_ptr, w_ptr, h0_ptr, out_ptr, act_ptr, cs_ptr, c0_ptr,
                                    hn_ptr, cn_ptr, B, H, rev, theta, CELL, G, BB, BH, BK,
                                    HOLD, ACC, ACC_F64, TF32)
            tl.store(part_ptr + ((k % 2) * NH + pid) * B + rows, sq, mask=row_ok)
            acc_tar += tar
            acc_ar += ar
        grid_barrier(bar, (k + 1) * NH)
        for b0 in range(pid_b * BB, B, stride):
            rows, row_ok, L = tile_rows(b0, B, T, len_ptr, has_len, BB)
            acc_ns += _finalize(k, rows, row_ok, L, part_ptr, norms_ptr, NH, B, heps, ns_init,
                                first, NP)
    slot = tpart_ptr + (pid_b * NH + pid) * 3
    tl.store(slot, w_ns * tl.sum(acc_ns, axis=0))
    tl.store(slot + 1, w_tar * tl.sum(acc_tar, axis=0))
    tl.store(slot + 2, w_ar * tl.sum(acc_ar, axis=0))


@triton.jit(do_not_specialize=_NO_SPEC)
def fwd_step_launch(x_ptr, w_ptr, h0_ptr, c0_ptr, len_ptr, mask_ptr,
                    out_ptr, hn_ptr, cn_ptr, act_ptr, cs_ptr, norms_ptr, tpart_ptr, part_ptr,
                    k, T, B, H, has_len, has_mask, rev, ns_init, theta, theta_lo, heps, w_ns,
                    w_ns_lo, w_tar, w_tar_lo, w_ar, w_ar_lo, CELL: tl.constexpr,
                    G: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
                    NP: tl.constexpr, ACC: tl.constexpr, ACC_F64: tl.constexpr,
                    TF32: tl.constexpr):
    """Launch ``k`` of ``0 .. T+1``: step k (1 <= k <= T; k = 0 sums h0) and, in the first
    hidden slice, the norm and NS of step k-1.  Grid ``(cdiv(H, BH), cdiv(B, BB))``; W is
    streamed in BK-chunks.  ``tpart`` (zero-initialized) accumulates across launches.
    """
    theta = wide(theta, theta_lo, ACC)
    w_ns = wide(w_ns, w_ns_lo, ACC)
    w_tar = wide(w_tar, w_tar_lo, ACC)
    w_ar = wide(w_ar, w_ar_lo, ACC)
    pid_h = tl.program_id(0)
    pid_b = tl.program_id(1)
    NH = tl.num_programs(0)
    u0 = pid_h * BH
    units = u0 + tl.arange(0, BH)
    unit_ok = units < H
    xcols, col_ok = gate_cols(u0, H, G, BH)
    rows, row_ok, L = tile_rows(pid_b * BB, B, T, len_ptr, has_len, BB)
    slot = tpart_ptr + (pid_b * NH + pid_h) * 3
    if k == 0:
        sq = _h0_sq(rows, row_ok, units, unit_ok, h0_ptr, H, ACC)
        tl.store(part_ptr + pid_h * B + rows, sq, mask=row_ok)
    if k >= 1:
        if k <= T:
            m = _mask_tile(mask_ptr, rows, row_ok, units, unit_ok, H, has_mask, ACC)
            sq, tar, ar = _fwd_tile(k, w_ptr, rows, row_ok, L, units, unit_ok, xcols, col_ok, m,
                                    x_ptr, w_ptr, h0_ptr, out_ptr, act_ptr, cs_ptr, c0_ptr,
                                    hn_ptr, cn_ptr, B, H, rev, theta, CELL, G, BB, BH, BK,
                                    False, ACC, ACC_F64, TF32)
            tl.store(part_ptr + ((k % 2) * NH + pid_h) * B + rows, sq, mask=row_ok)
            tl.store(slot + 1, tl.load(slot + 1) + w_tar * tl.sum(tar, axis=0))
            tl.store(slot + 2, tl.load(slot + 2) + w_ar * tl.sum(ar, axis=0))
        ns = _finalize(k - 1, rows, row_ok, L, part_ptr, norms_ptr, NH, B, heps, ns_init,
                       pid_h == 0, NP)
        tl.store(slot, tl.load(slot) + w_ns * tl.sum(ns, axis=0))
