"""Forward kernels: batch-tiled, persistent, one launch per step (all use ``step.fwd_step``).

Common arguments (pointers first): ``x [T, B, G*H]``, ``w [G*H, H]``, ``h0``, ``c0 [B, H]``,
``lens [B]`` int64 (read when ``has_len``), ``mask [B, H]`` (read when ``has_mask``),
``scale [H]`` (ACC, normprop's cell scale a; ``hs`` is its h scale s);
outputs ``out [T, B, H]``, ``hn``, ``cn [B, H]``, ``act [T, B, G*H]`` and ``cs [T, B, H]``
(LSTM-type cells, ACC dtype, saved for backward), ``norms [T+1, B]``, ``cnorms [T+1, B]``
(the cell norms, written when the constexpr ``CELL_NORMS`` is set), ``tpart [P, 3]``
(weighted per-program penalty sums; the launcher adds them up).  ``heps = H * ns_eps``.
CELL: 0 lstm, 1 relu, 2 tanh, 3 trec, 4 normprop; ``G == 4`` means a cell state.
"""
import triton
import triton.language as tl

from .step import (act_cols, cell_scale, dot_acc, fwd_penalty, fwd_step, gate_cols, grid_barrier,
                   load_h_op, load_state, load_x, ns_step, tile_rows, wide)

_NO_SPEC = ["T", "B", "has_len", "has_mask", "rev", "ns_init", "k"]


@triton.jit
def _mask_tile(mask_ptr, rows, row_ok, units, unit_ok, H, has_mask, ACC: tl.constexpr):
    m = tl.load(mask_ptr + rows[:, None] * H + units[None, :],
                mask=tl.where(has_mask != 0, row_ok[:, None] & unit_ok[None, :], False), other=1.0)
    return tl.where(has_mask != 0, m.to(ACC), 1.0)


@triton.jit(do_not_specialize=_NO_SPEC)
def fwd_tiled(x_ptr, w_ptr, h0_ptr, c0_ptr, len_ptr, mask_ptr, scale_ptr,
              out_ptr, hn_ptr, cn_ptr, act_ptr, cs_ptr, norms_ptr, cnorms_ptr, tpart_ptr,
              T, B, H, has_len, has_mask, rev, ns_init, theta, theta_lo, hs, hs_lo, heps, w_ns,
              w_ns_lo, w_tar, w_tar_lo, w_ar, w_ar_lo, CELL: tl.constexpr, G: tl.constexpr,
              BB: tl.constexpr, BH: tl.constexpr, ACC: tl.constexpr, ACC_F64: tl.constexpr,
              TF32: tl.constexpr, CELL_NORMS: tl.constexpr):
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
    acols = act_cols(0, G, BH)
    # W_hh^T tile [BH (k), G*BH (gate columns)]
    w = tl.load(w_ptr + xcols[None, :] * H + units[:, None],
                mask=unit_ok[:, None] & col_ok[None, :], other=0.0)
    um = row_ok[:, None] & unit_ok[None, :]
    noff = rows[:, None] * H + units[None, :]
    h = tl.load(h0_ptr + noff, mask=um, other=0.0).to(ACC)
    if G == 4:
        c = tl.load(c0_ptr + noff, mask=um, other=0.0).to(ACC)
    else:
        c = h
    if CELL_NORMS:
        tl.store(cnorms_ptr + rows, tl.sqrt(tl.sum(c * c, axis=1) + heps), mask=row_ok)
    a = cell_scale(scale_ptr, units, unit_ok, CELL, BH, ACC)
    s = wide(hs, hs_lo, ACC)
    m = _mask_tile(mask_ptr, rows, row_ok, units, unit_ok, H, has_mask, ACC)
    n_prev = tl.sqrt(tl.sum(h * h, axis=1) + heps)
    tl.store(norms_ptr + rows, n_prev, mask=row_ok)
    acc_ns = tl.zeros([BB], ACC)
    acc_tar = tl.zeros([BB], ACC)
    acc_ar = tl.zeros([BB], ACC)
    for k in range(1, T + 1):
        hw = dot_acc(h.to(w.dtype), w, tl.zeros([BB, G * BH], ACC), ACC_F64, TF32)
        x = load_x(k, rows, row_ok, L, xcols, col_ok, x_ptr, B, H, rev, G)
        h_new, c = fwd_step(k, x, hw, h, c, rows, row_ok, L, units, unit_ok, acols, col_ok,
                            out_ptr, act_ptr, cs_ptr, hn_ptr, cn_ptr, B, H, rev, theta, a, s,
                            CELL, G, BB, BH, ACC)
        if CELL_NORMS:
            m_k = tl.sqrt(tl.sum(c * c, axis=1) + heps)
            tl.store(cnorms_ptr + k * B + rows, tl.where(k <= L, m_k, 0.0), mask=row_ok)
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
def _fwd_tile(k, rows, row_ok, L, units, unit_ok, xcols, acols, col_ok, m,
              x_ptr, w_ptr, h0_ptr, out_ptr, act_ptr, cs_ptr, c0_ptr, hn_ptr, cn_ptr,
              B, H, rev, theta, a, s, CELL: tl.constexpr, G: tl.constexpr, BB: tl.constexpr,
              BH: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr,
              ACC_F64: tl.constexpr, TF32: tl.constexpr):
    """Step k of one (batch tile, hidden slice) with the state read from global memory and
    W streamed in BK-chunks.  Returns the per-row (sum h^2 over the slice, TAR, AR) sums
    and the new cell state ``[BB, BH]``.
    """
    idx = tl.minimum(k - 1, L)
    hw = tl.zeros([BB, G * BH], ACC)
    for k0 in range(0, H, BK):
        kk = k0 + tl.arange(0, BK)
        kok = kk < H
        hk = load_h_op(idx, L, rows, row_ok, kk, kok, h0_ptr, out_ptr, B, H, rev)
        wc = tl.load(w_ptr + xcols[None, :] * H + kk[:, None],
                     mask=kok[:, None] & col_ok[None, :], other=0.0)
        hw = dot_acc(hk, wc, hw, ACC_F64, TF32)
    h_prev = load_state(idx, L, rows, row_ok, units, unit_ok, h0_ptr, out_ptr, B, H, rev,
                         row_ok, ACC)
    if G == 4:
        c_prev = load_state(idx, L, rows, row_ok, units, unit_ok, c0_ptr, cs_ptr, B, H, rev,
                             row_ok, ACC)
    else:
        c_prev = h_prev
    x = load_x(k, rows, row_ok, L, xcols, col_ok, x_ptr, B, H, rev, G)
    h, c = fwd_step(k, x, hw, h_prev, c_prev, rows, row_ok, L, units, unit_ok, acols, col_ok,
                    out_ptr, act_ptr, cs_ptr, hn_ptr, cn_ptr, B, H, rev, theta, a, s,
                    CELL, G, BB, BH, ACC)
    sq, tar, ar = fwd_penalty(k, h, h_prev, m, row_ok, L)
    return sq, tar, ar, c


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
    n_prev = tl.load(norms_ptr + (k - 1) * B + rows, mask=tl.where(k >= 1, ok, False),
                     other=0.0)
    n_store, ns = ns_step(k, n_k, n_prev, row_ok, L, ns_init)
    tl.store(norms_ptr + k * B + rows, n_store, mask=ok)
    return tl.where(ok, ns, 0.0)


@triton.jit
def _part_rows(part_ptr, k, rows, ok, NH, B, NP: tl.constexpr):
    """Sum over the NH hidden slices of the partial sums ``part [2, NH, B]`` (slot k % 2)
    of rows ``rows`` (0 where not ``ok``)."""
    p = tl.arange(0, NP)
    v = tl.load(part_ptr + ((k % 2) * NH + p[:, None]) * B + rows[None, :],
                mask=(p[:, None] < NH) & ok[None, :], other=0.0, cache_modifier=".cg")
    return tl.sum(v, axis=0)


@triton.jit
def _state_rows(state_ptr, k, nrows, n_ok, nL, B, H, rev, HF: tl.constexpr, ACC: tl.constexpr):
    """Sum of squares of whole rows ``nrows [NR]`` of a state after k steps: ``state`` is the
    initial state ``[B, H]`` for k = 0, else the saved sequence ``[T, B, H]``, read at the
    position of step k (0 where the step is invalid)."""
    ok = n_ok & (k <= nL)
    pos = tl.where(k == 0, 0, tl.where(rev != 0, nL - k, k - 1)).to(tl.int64)
    kk = tl.arange(0, HF)
    v = tl.load(state_ptr + (pos * B + nrows)[:, None] * H + kk[None, :],
                mask=ok[:, None] & (kk < H)[None, :], other=0.0, cache_modifier=".cg").to(ACC)
    return tl.sum(v * v, axis=1)


@triton.jit
def _row_norms(hbuf_ptr, nrows, n_ok, HF: tl.constexpr, ACC: tl.constexpr):
    """Sum of squares of whole rows ``nrows [NR]`` of one exchange slot ``[B, HF]``."""
    kk = tl.arange(0, HF)
    v = tl.load(hbuf_ptr + nrows[:, None] * HF + kk[None, :], mask=n_ok[:, None], other=0.0,
                cache_modifier=".cg").to(ACC)
    return tl.sum(v * v, axis=1)


@triton.jit
def _grid_barrier(bar_ptr, target):
    """Grid-wide barrier of a co-resident grid, ``target`` = (barrier number) * (programs):
    ``step.grid_barrier`` with two thread-block barriers fewer.  The poll is a do-while (no
    poll before the loop), and there is no thread-block barrier after it: the poll's
    acquire is one thread's, and the thread-block barrier with which Triton hands its
    result to the other threads orders their later loads after it."""
    tl.debug_barrier()
    tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")
    seen = tl.zeros([], tl.int32)
    while seen < target:
        seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")


@triton.jit
def _stacked_w(wt_ptr, pid, MR: tl.constexpr, KC: tl.constexpr, HF: tl.constexpr):
    """The program's W slice (``wt`` rows ``pid*MR ..``) as the operand of
    :func:`_stacked_product`, its two K-halves stacked along M: ``W' [2*MR, KC]``, row
    ``i*MR + r`` = columns ``i*KC .. (i+1)*KC`` of slice row r."""
    sr = tl.arange(0, 2 * MR)
    sc = tl.arange(0, KC)
    return tl.load(wt_ptr + (pid * MR + sr % MR)[:, None].to(tl.int64) * HF
                   + ((sr // MR) * KC)[:, None] + sc[None, :])


@triton.jit
def _stacked_product(w_s, hslot_ptr, b0, B, ACC_F64: tl.constexpr, TF32: tl.constexpr,
                     MR: tl.constexpr, KC: tl.constexpr, BB: tl.constexpr, HF: tl.constexpr,
                     ACC: tl.constexpr):
    """``W_sl^T @ h^T`` ``[MR, BB]`` for the rows ``b0 ..`` of the exchange slot ``hslot [B,
    HF]``, with K = 2*KC in two halves stacked along M: ``W' [2*MR, KC] @ h' [KC, 2*BB]``
    (``w_s`` from :func:`_stacked_w`; column ``j*BB + b`` of h' is K-half j of row b0 + b).
    Block (i, j) of the product is K-half i of W times K-half j of h; the result is block
    (0, 0) + block (1, 1), the other two are discarded.

    Why: with 2*MR = 128 rows the two warpgroups of 8 warps split M, so each reads its own
    K-half of W once per step (with 64 rows they split N and both read all of W), and each
    accumulator chain is KC/16 MMAs deep.  The column halves of a row are held by one thread
    in the MMA layout (the first split is in registers); the sum of the two row halves is
    the one exchange between the warpgroups."""
    sr = tl.arange(0, 2 * MR)
    sc = tl.arange(0, KC)
    sj = tl.arange(0, 2 * BB)
    srow = b0 + sj % BB
    h_s = tl.load(hslot_ptr + srow[None, :] * HF + ((sj // BB) * KC)[None, :] + sc[:, None],
                  mask=(srow < B)[None, :], other=0.0, cache_modifier=".cg")
    acc = dot_acc(w_s, h_s, tl.zeros([2 * MR, 2 * BB], ACC), ACC_F64, TF32)
    c0, c1 = tl.split(tl.permute(tl.reshape(acc, [2 * MR, 2, BB]), (0, 2, 1)))
    d = tl.where((sr < MR)[:, None], c0, c1)     # K-half i of W keeps K-half i of h
    top, bottom = tl.split(tl.permute(tl.reshape(d, [2, MR, BB]), (1, 2, 0)))
    return top + bottom


@triton.jit(do_not_specialize=_NO_SPEC)
def fwd_persistent(x_ptr, wt_ptr, h0_ptr, c0_ptr, len_ptr, mask_ptr, scale_ptr,
                   out_ptr, hn_ptr, cn_ptr, act_ptr, cs_ptr, norms_ptr, cnorms_ptr, tpart_ptr,
                   hbuf_ptr, bar_ptr,
                   T, B, H, has_len, has_mask, rev, ns_init, theta, theta_lo, hs, hs_lo, heps,
                   w_ns, w_ns_lo, w_tar, w_tar_lo, w_ar, w_ar_lo,
                   CELL: tl.constexpr, G: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr,
                   BK: tl.constexpr, HF: tl.constexpr, NR: tl.constexpr, HOLD: tl.constexpr,
                   KH: tl.constexpr, ACC: tl.constexpr, ACC_F64: tl.constexpr,
                   TF32: tl.constexpr, CELL_NORMS: tl.constexpr):
    """One launch for the whole sequence.  Grid ``(NH, NB)``: program (p, q) owns the hidden
    units ``p*BH ..`` (all G gates) of batch tile q and keeps their state (h, c) in
    registers; the NH programs of tile q meet at the barrier ``bar[q]`` after each step.

    The step product is transposed, ``(h_{k-1} W^T)^T = W_sl^T [G*BH, H] @ h_{k-1}^T [H, BB]``,
    so the gate rows fill the MMA's M (64 rows: Hopper's warpgroup MMA) and the batch tile
    its N.  ``wt [NH*G*BH, HF]`` is W_hh with its rows in the kernels' interleaved gate order
    (row ``u*G + g`` = gate g of unit u), zero-padded to NH*BH units and HF = pow2(H)
    columns (``launch.interleave_w``), so that every W load is an unmasked full-width vector
    load.  ``HOLD``: the slice ``[G*BH, BK = HF]`` stays on chip for all steps; else it is
    streamed in BK-chunks.  ``KH`` = 2 (held slices only; 1: off): the product's K is split
    into two halves stacked along M (``_stacked_product``; ``launch.plan`` sets it for the
    one-gate cells).  The grid barrier is ``_grid_barrier``.  h is exchanged through ``hbuf [2, B, HF]`` (input dtype, row
    stride HF = pow2(H) >= BK, zero padding columns), slot k % 2 holding h_k in processing
    order, so every step reads one slot with full-width vector loads whatever the lengths
    and direction.  Norms: after barrier k each program reduces whole rows of h_k, the rows
    ``pid + NH*i`` of its tile (at most NR), so the reduction is spread over the programs;
    TAR and AR are separable and summed over the program's own units.  Cell norms
    (``CELL_NORMS``): after barrier k each program also reduces the same rows of c_k, read
    from the saved cell states ``cs`` (written before the barrier; no extra buffer).
    """
    theta = wide(theta, theta_lo, ACC)
    w_ns = wide(w_ns, w_ns_lo, ACC)
    w_tar = wide(w_tar, w_tar_lo, ACC)
    w_ar = wide(w_ar, w_ar_lo, ACC)
    pid = tl.program_id(0)
    q = tl.program_id(1)
    NH = tl.num_programs(0)
    bar = bar_ptr + q
    u0 = pid * BH
    units = u0 + tl.arange(0, BH)
    unit_ok = units < H
    xcols, col_ok = gate_cols(u0, H, G, BH)
    acols = act_cols(u0, G, BH)
    rows, row_ok, L = tile_rows(q * BB, B, T, len_ptr, has_len, BB)
    kk = tl.arange(0, BK)
    w_rows = wt_ptr + (pid * G * BH + tl.arange(0, G * BH))[:, None].to(tl.int64) * HF
    tl.static_assert(KH == 1 or KH == 2)
    if HOLD:
        if KH == 2:
            w_t = _stacked_w(wt_ptr, pid, G * BH, BK // 2, HF)
        else:
            w_t = tl.load(w_rows + kk[None, :])
    um = row_ok[:, None] & unit_ok[None, :]
    noff = rows[:, None] * H + units[None, :]
    h = tl.load(h0_ptr + noff, mask=um, other=0.0).to(ACC)
    if G == 4:
        c = tl.load(c0_ptr + noff, mask=um, other=0.0).to(ACC)
    else:
        c = h
    a = cell_scale(scale_ptr, units, unit_ok, CELL, BH, ACC)
    s = wide(hs, hs_lo, ACC)
    m = _mask_tile(mask_ptr, rows, row_ok, units, unit_ok, H, has_mask, ACC)
    slot = rows[:, None] * HF + units[None, :]
    SLOT = B * HF
    tl.store(hbuf_ptr + slot, h.to(hbuf_ptr.dtype.element_ty), mask=um)
    # the rows whose norms this program reduces
    li = pid + NH * tl.arange(0, NR)
    nrows = (q * BB + li).to(tl.int64)
    n_ok = (li < BB) & (nrows < B)
    nL = tl.load(len_ptr + nrows, mask=tl.where(has_len != 0, n_ok, False), other=T)
    nL = tl.where(has_len != 0, nL, T).to(tl.int64)
    x = load_x(1, rows, row_ok, L, xcols, col_ok, x_ptr, B, H, rev, G)
    _grid_barrier(bar, NH)
    n_prev = tl.sqrt(_row_norms(hbuf_ptr, nrows, n_ok, HF, ACC) + heps)
    tl.store(norms_ptr + nrows, n_prev, mask=n_ok)
    if CELL_NORMS:
        tl.store(cnorms_ptr + nrows,
                 tl.sqrt(_state_rows(c0_ptr, 0, nrows, n_ok, nL, B, H, rev, HF, ACC) + heps),
                 mask=n_ok)
    acc_ns = tl.zeros([NR], ACC)
    acc_tar = tl.zeros([BB], ACC)
    acc_ar = tl.zeros([BB], ACC)
    for k in range(1, T + 1):
        src = hbuf_ptr + ((k - 1) % 2) * SLOT + rows[None, :] * HF
        if HOLD and KH == 2:
            acc = _stacked_product(w_t, hbuf_ptr + ((k - 1) % 2) * SLOT, q * BB, B, ACC_F64,
                                   TF32, G * BH, BK // 2, BB, HF, ACC)
        elif HOLD:
            h_t = tl.load(src + kk[:, None], mask=row_ok[None, :], other=0.0,
                          cache_modifier=".cg")
            acc = dot_acc(w_t, h_t, tl.zeros([G * BH, BB], ACC), ACC_F64, TF32)
        else:
            acc = tl.zeros([G * BH, BB], ACC)
            for k0 in range(0, H, BK):
                h_t = tl.load(src + (k0 + kk)[:, None], mask=row_ok[None, :], other=0.0,
                              cache_modifier=".cg")
                w_c = tl.load(w_rows + (k0 + kk)[None, :])
                acc = dot_acc(w_c, h_t, acc, ACC_F64, TF32)
        h_new, c = fwd_step(k, x, tl.trans(acc), h, c, rows, row_ok, L, units, unit_ok, acols,
                            col_ok, out_ptr, act_ptr, cs_ptr, hn_ptr, cn_ptr, B, H, rev, theta,
                            a, s, CELL, G, BB, BH, ACC)
        tl.store(hbuf_ptr + (k % 2) * SLOT + slot, h_new.to(hbuf_ptr.dtype.element_ty),
                 mask=um)
        sq, tar, ar = fwd_penalty(k, h_new, h, m, row_ok, L)
        acc_tar += tar
        acc_ar += ar
        h = h_new
        x = load_x(k + 1, rows, row_ok, L, xcols, col_ok, x_ptr, B, H, rev, G)
        _grid_barrier(bar, (k + 1) * NH)
        n_k = tl.sqrt(_row_norms(hbuf_ptr + (k % 2) * SLOT, nrows, n_ok, HF, ACC) + heps)
        n_store, ns = ns_step(k, n_k, n_prev, n_ok, nL, ns_init)
        tl.store(norms_ptr + k * B + nrows, n_store, mask=n_ok)
        n_prev = tl.where(n_ok & (k <= nL), n_k, n_prev)
        acc_ns += ns
        if CELL_NORMS:
            m_k = tl.sqrt(_state_rows(cs_ptr, k, nrows, n_ok, nL, B, H, rev, HF, ACC) + heps)
            tl.store(cnorms_ptr + k * B + nrows, tl.where(k <= nL, m_k, 0.0), mask=n_ok)
    out = tpart_ptr + (q * NH + pid) * 3
    tl.store(out, w_ns * tl.sum(acc_ns, axis=0))
    tl.store(out + 1, w_tar * tl.sum(acc_tar, axis=0))
    tl.store(out + 2, w_ar * tl.sum(acc_ar, axis=0))


@triton.jit(do_not_specialize=_NO_SPEC)
def fwd_step_launch(x_ptr, w_ptr, h0_ptr, c0_ptr, len_ptr, mask_ptr, scale_ptr,
                    out_ptr, hn_ptr, cn_ptr, act_ptr, cs_ptr, norms_ptr, cnorms_ptr, tpart_ptr,
                    part_ptr, cpart_ptr, k, T, B, H, has_len, has_mask, rev, ns_init, theta,
                    theta_lo, hs, hs_lo, heps, w_ns, w_ns_lo, w_tar, w_tar_lo, w_ar, w_ar_lo,
                    CELL: tl.constexpr, G: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr,
                    BK: tl.constexpr, NP: tl.constexpr, ACC: tl.constexpr,
                    ACC_F64: tl.constexpr, TF32: tl.constexpr, CELL_NORMS: tl.constexpr):
    """Launch ``k`` of ``0 .. T+1``: step k (1 <= k <= T; k = 0 sums h0) and, in the first
    hidden slice, the norm and NS of step k-1 (and its cell norm, from the slices' sums of
    c^2 in ``cpart [2, NH, B]``, with ``CELL_NORMS``).  Grid ``(cdiv(H, BH), cdiv(B, BB))``;
    W is streamed in BK-chunks.  ``tpart`` (zero-initialized) accumulates across launches.
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
        if CELL_NORMS:
            tl.store(cpart_ptr + pid_h * B + rows,
                     _h0_sq(rows, row_ok, units, unit_ok, c0_ptr, H, ACC), mask=row_ok)
    if k >= 1:
        if k <= T:
            m = _mask_tile(mask_ptr, rows, row_ok, units, unit_ok, H, has_mask, ACC)
            a = cell_scale(scale_ptr, units, unit_ok, CELL, BH, ACC)
            s = wide(hs, hs_lo, ACC)
            sq, tar, ar, c = _fwd_tile(k, rows, row_ok, L, units, unit_ok, xcols,
                                       act_cols(u0, G, BH), col_ok, m,
                                       x_ptr, w_ptr, h0_ptr, out_ptr, act_ptr, cs_ptr, c0_ptr,
                                       hn_ptr, cn_ptr, B, H, rev, theta, a, s, CELL, G, BB,
                                       BH, BK, ACC, ACC_F64, TF32)
            tl.store(part_ptr + ((k % 2) * NH + pid_h) * B + rows, sq, mask=row_ok)
            if CELL_NORMS:
                tl.store(cpart_ptr + ((k % 2) * NH + pid_h) * B + rows, tl.sum(c * c, axis=1),
                         mask=row_ok)
            tl.store(slot + 1, tl.load(slot + 1) + w_tar * tl.sum(tar, axis=0))
            tl.store(slot + 2, tl.load(slot + 2) + w_ar * tl.sum(ar, axis=0))
        ns = _finalize(k - 1, rows, row_ok, L, part_ptr, norms_ptr, NH, B, heps, ns_init,
                       pid_h == 0, NP)
        tl.store(slot, tl.load(slot) + w_ns * tl.sum(ns, axis=0))
        if CELL_NORMS:
            ok = tl.where(pid_h == 0, row_ok, False)
            m_k = tl.sqrt(_part_rows(cpart_ptr, k - 1, rows, ok, NH, B, NP) + heps)
            tl.store(cnorms_ptr + (k - 1) * B + rows, tl.where(k - 1 <= L, m_k, 0.0), mask=ok)
