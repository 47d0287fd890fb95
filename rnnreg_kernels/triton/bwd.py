"""Backward kernels: batch-tiled, persistent, one launch per step (all use ``step.bwd_step``).

Arguments as in :mod:`.fwd`, plus what forward produced (``out``, ``act``, ``cs``,
``norms``, ``cnorms``), the upstream gradients ``gout [T, B, H]``, ``ghn``, ``gcn [B, H]``,
``gterms [3]``, ``gnorms`` and ``gcnorms [T+1, B]`` (ACC; read only when the constexprs
``GRAD_NORMS`` / ``GRAD_CELL_NORMS`` are set), and the outputs ``gx [T, B, G*H]`` (= dz, also
the exchange buffer between steps), ``gh0``, ``gc0 [B, H]`` and, for normprop,
``gscale [NB, H]`` (ACC: per batch tile, the sum over its rows and steps of the
grad_cell_scale terms; the launcher sums the tiles).  ``grad_w_hh`` is one GEMM in the
launcher.
"""
import triton
import triton.language as tl

from .step import (act_cols, bwd_step, cell_scale, dot_acc, gate_cols, grid_barrier,
                   ns_initial_grad, radial, tile_rows, wide)

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
def _h0_grad(dh, rows, row_ok, units, unit_ok, h0_ptr, norms_ptr, gnorms_ptr, B, H, ns_init,
             c_ns, ACC: tl.constexpr, GRAD_NORMS: tl.constexpr):
    """grad_h0 from ``dh [BB, BH]`` (the recurrent grad of step 1): + the NS-initial term
    (+ the radial term of ``gnorms[0]``)."""
    um = row_ok[:, None] & unit_ok[None, :]
    noff = rows[:, None] * H + units[None, :]
    h0 = tl.load(h0_ptr + noff, mask=um, other=0.0).to(ACC)
    n0 = tl.load(norms_ptr + rows, mask=row_ok, other=1.0)
    n1 = tl.load(norms_ptr + B + rows, mask=row_ok, other=1.0)
    gh0 = ns_initial_grad(dh, h0, n0, n1, c_ns, ns_init)
    if GRAD_NORMS:
        gh0 += radial(gnorms_ptr, norms_ptr, rows, row_ok)[:, None] * h0
    return gh0


@triton.jit
def _c0_grad(dc, rows, row_ok, units, unit_ok, c0_ptr, cnorms_ptr, gcnorms_ptr, H,
             ACC: tl.constexpr, GRAD_CELL_NORMS: tl.constexpr):
    """grad_c0 from ``dc [BB, BH]`` (dc of step 1): + the radial term of ``gcnorms[0]``
    (with ``GRAD_CELL_NORMS``)."""
    if GRAD_CELL_NORMS:
        um = row_ok[:, None] & unit_ok[None, :]
        c0 = tl.load(c0_ptr + rows[:, None] * H + units[None, :], mask=um, other=0.0).to(ACC)
        dc += radial(gcnorms_ptr, cnorms_ptr, rows, row_ok)[:, None] * c0
    return dc


@triton.jit
def _store_rows(v, rows, row_ok, units, unit_ok, ptr, H):
    """Store ``v [BB, BH]`` at rows x units of ``ptr [B, H]`` (in ``ptr``'s dtype)."""
    tl.store(ptr + rows[:, None] * H + units[None, :], v.to(ptr.dtype.element_ty),
             mask=row_ok[:, None] & unit_ok[None, :])


@triton.jit
def _store_grad_h0(dh_rec, rows, row_ok, units, unit_ok, h0_ptr, norms_ptr, gnorms_ptr,
                   gh0_ptr, B, H, ns_init, c_ns, ACC: tl.constexpr, GRAD_NORMS: tl.constexpr):
    """Store grad_h0 (``_h0_grad``)."""
    um = row_ok[:, None] & unit_ok[None, :]
    noff = rows[:, None] * H + units[None, :]
    gh0 = _h0_grad(dh_rec, rows, row_ok, units, unit_ok, h0_ptr, norms_ptr, gnorms_ptr, B, H,
                   ns_init, c_ns, ACC, GRAD_NORMS)
    tl.store(gh0_ptr + noff, gh0.to(gh0_ptr.dtype.element_ty), mask=um)


@triton.jit
def _store_grad_c0(dc, rows, row_ok, units, unit_ok, c0_ptr, cnorms_ptr, gcnorms_ptr, gc0_ptr,
                   H, ACC: tl.constexpr, GRAD_CELL_NORMS: tl.constexpr):
    """Store grad_c0 (``_c0_grad``)."""
    um = row_ok[:, None] & unit_ok[None, :]
    noff = rows[:, None] * H + units[None, :]
    dc = _c0_grad(dc, rows, row_ok, units, unit_ok, c0_ptr, cnorms_ptr, gcnorms_ptr, H, ACC,
                  GRAD_CELL_NORMS)
    tl.store(gc0_ptr + noff, dc.to(gc0_ptr.dtype.element_ty), mask=um)


@triton.jit
def _store_grad_scale(ga, rows, row_ok, units, unit_ok, gscale_ptr, tile, H, ACC: tl.constexpr,
                      ACCUMULATE: tl.constexpr):
    """Write (or add to) row ``tile`` of ``gscale [NB, H]`` the column sums of ``ga [BB, BH]``."""
    g = tl.sum(tl.where(row_ok[:, None], ga, 0.0), axis=0)
    off = gscale_ptr + tile * H + units
    if ACCUMULATE:
        g += tl.load(off, mask=unit_ok, other=0.0)
    tl.store(off, g.to(ACC), mask=unit_ok)


@triton.jit
def _grad_h0(dh_rec, rows, row_ok, units, unit_ok, h0_ptr, c0_ptr, norms_ptr, cnorms_ptr,
             gnorms_ptr, gcnorms_ptr, dc_ptr, gh0_ptr, gc0_ptr, B, H, ns_init, c_ns,
             G: tl.constexpr, ACC: tl.constexpr, GRAD_NORMS: tl.constexpr,
             GRAD_CELL_NORMS: tl.constexpr):
    """Store grad_h0 and grad_c0 (``dc_ptr`` holds dc of step 1)."""
    _store_grad_h0(dh_rec, rows, row_ok, units, unit_ok, h0_ptr, norms_ptr, gnorms_ptr, gh0_ptr,
                   B, H, ns_init, c_ns, ACC, GRAD_NORMS)
    if G == 4:
        um = row_ok[:, None] & unit_ok[None, :]
        noff = rows[:, None] * H + units[None, :]
        dc = tl.load(dc_ptr + noff, mask=um, other=0.0)
        _store_grad_c0(dc, rows, row_ok, units, unit_ok, c0_ptr, cnorms_ptr, gcnorms_ptr,
                       gc0_ptr, H, ACC, GRAD_CELL_NORMS)


@triton.jit(do_not_specialize=_NO_SPEC)
def bwd_tiled(out_ptr, w_ptr, h0_ptr, c0_ptr, len_ptr, mask_ptr, scale_ptr, act_ptr, cs_ptr,
              norms_ptr, cnorms_ptr, gout_ptr, ghn_ptr, gcn_ptr, gterms_ptr, gnorms_ptr,
              gcnorms_ptr, gx_ptr, gh0_ptr, gc0_ptr, gscale_ptr,
              T, B, H, has_len, has_mask, rev, ns_init, hs, hs_lo, w_ns, w_ns_lo, w_tar,
              w_tar_lo, w_ar, w_ar_lo, CELL: tl.constexpr, G: tl.constexpr, BB: tl.constexpr,
              BH: tl.constexpr, ACC: tl.constexpr, ACC_F64: tl.constexpr, TF32: tl.constexpr,
              GRAD_NORMS: tl.constexpr, GRAD_CELL_NORMS: tl.constexpr):
    """One program per batch tile holds all of W_hh and runs the reverse loop.

    Grid ``(cdiv(B, BB),)``; needs ``BH >= H``.
    """
    pid = tl.program_id(0)
    rows, row_ok, L = tile_rows(pid * BB, B, T, len_ptr, has_len, BB)
    units = tl.arange(0, BH)
    unit_ok = units < H
    xcols, col_ok = gate_cols(0, H, G, BH)
    acols = act_cols(0, G, BH)
    # W_hh tile [G*BH (gate rows, interleaved), BH]
    wb = tl.load(w_ptr + xcols[:, None] * H + units[None, :],
                 mask=col_ok[:, None] & unit_ok[None, :], other=0.0)
    c_ns, c_tar, c_ar = _coefs(gterms_ptr, w_ns, w_ns_lo, w_tar, w_tar_lo, w_ar, w_ar_lo, ACC)
    m2 = _mask_sq(mask_ptr, rows, row_ok, units, unit_ok, H, has_mask, ACC)
    a = cell_scale(scale_ptr, units, unit_ok, CELL, BH, ACC)
    s = wide(hs, hs_lo, ACC)
    dh_rec = tl.zeros([BB, BH], ACC)
    dc = tl.zeros([BB, BH], ACC)
    ga_acc = tl.zeros([BB, BH], ACC)
    for j in range(0, T):
        k = T - j
        dz, dc, ga = bwd_step(k, dh_rec, dc, m2, rows, row_ok, L, units, unit_ok, xcols, acols,
                              col_ok, out_ptr, h0_ptr, c0_ptr, act_ptr, cs_ptr, norms_ptr,
                              gout_ptr, ghn_ptr, gcn_ptr, gx_ptr, gnorms_ptr, cnorms_ptr,
                              gcnorms_ptr, B, H, rev, ns_init, c_ns, c_tar, c_ar, a, s,
                              CELL, G, BB, BH, ACC, GRAD_NORMS, GRAD_CELL_NORMS)
        if CELL == 4:
            ga_acc += ga
        dh_rec = dot_acc(dz.to(wb.dtype), wb, tl.zeros([BB, BH], ACC), ACC_F64, TF32)
    _store_grad_h0(dh_rec, rows, row_ok, units, unit_ok, h0_ptr, norms_ptr, gnorms_ptr, gh0_ptr,
                   B, H, ns_init, c_ns, ACC, GRAD_NORMS)
    if G == 4:
        _store_grad_c0(dc, rows, row_ok, units, unit_ok, c0_ptr, cnorms_ptr, gcnorms_ptr,
                       gc0_ptr, H, ACC, GRAD_CELL_NORMS)
    if CELL == 4:
        _store_grad_scale(ga_acc, rows, row_ok, units, unit_ok, gscale_ptr, pid, H, ACC, False)


@triton.jit
def _dz_w(kn, rows, row_ok, L, units, unit_ok, gx_ptr, w_ptr, B, H, rev,
          G: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
          ACC: tl.constexpr, ACC_F64: tl.constexpr, TF32: tl.constexpr):
    """``dz_{kn} @ W_hh[:, units]`` ``[BB, BH]`` (0 for rows where step kn is invalid).

    dz is read from ``gx`` at the position of step kn; W_hh is streamed in BK-chunks.
    """
    ok = row_ok & (kn <= L)
    pos = tl.where(rev != 0, L - kn, kn - 1).to(tl.int64)
    base = gx_ptr + (pos * B + rows)[:, None] * (G * H)
    acc = tl.zeros([BB, BH], ACC)
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
def _bwd_tile(k, rows, row_ok, L, units, unit_ok, xcols, acols, col_ok, m2,
              out_ptr, w_ptr, h0_ptr, c0_ptr, act_ptr, cs_ptr, norms_ptr, gout_ptr, ghn_ptr,
              gcn_ptr, gx_ptr, gnorms_ptr, cnorms_ptr, gcnorms_ptr, dc_ptr, gscale_ptr, pid_b,
              B, H, rev, ns_init, c_ns, c_tar, c_ar, a, s,
              CELL: tl.constexpr, G: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr,
              BK: tl.constexpr, ACC: tl.constexpr, ACC_F64: tl.constexpr, TF32: tl.constexpr,
              GRAD_NORMS: tl.constexpr, GRAD_CELL_NORMS: tl.constexpr):
    """Backward step k of one (batch tile, hidden slice); dc lives in ``dc_ptr [B, H]``, the
    normprop grad_cell_scale sums accumulate in row ``pid_b`` of ``gscale``."""
    dh_rec = _dz_w(k + 1, rows, row_ok, L, units, unit_ok, gx_ptr, w_ptr, B, H, rev, G, BB,
                   BH, BK, ACC, ACC_F64, TF32)
    noff = rows[:, None] * H + units[None, :]
    um = row_ok[:, None] & unit_ok[None, :]
    if G == 4:
        dc = tl.load(dc_ptr + noff, mask=um, other=0.0)
    else:
        dc = dh_rec
    dz, dc, ga = bwd_step(k, dh_rec, dc, m2, rows, row_ok, L, units, unit_ok, xcols, acols,
                          col_ok, out_ptr, h0_ptr, c0_ptr, act_ptr, cs_ptr, norms_ptr, gout_ptr,
                          ghn_ptr, gcn_ptr, gx_ptr, gnorms_ptr, cnorms_ptr, gcnorms_ptr, B, H,
                          rev, ns_init, c_ns, c_tar, c_ar, a, s, CELL, G, BB, BH, ACC,
                          GRAD_NORMS, GRAD_CELL_NORMS)
    if G == 4:
        tl.store(dc_ptr + noff, dc, mask=um)
    if CELL == 4:
        _store_grad_scale(ga, rows, row_ok, units, unit_ok, gscale_ptr, pid_b, H, ACC, True)


@triton.jit
def _w_gate(wb_ptr, g, u0, HF: tl.constexpr, BH: tl.constexpr, KS: tl.constexpr,
            KC: tl.constexpr, NHB):
    """Gate g of the slice's W_hh columns (from ``wb [G, NH*BH, HF]``, see
    ``launch.transpose_w``): ``[BH, HF]`` for KS = 1 (``[j, c]`` = W[g*H + c, u0 + j], the A
    operand of the transposed product); else ``[KS, KC, BH]`` (``[s, c, j]`` = W[g*H + s*KC +
    c, u0 + j], the B operand of the per-slice product)."""
    j = tl.arange(0, BH)
    c = tl.arange(0, KC)
    row = (g * NHB + u0 + j).to(tl.int64) * HF
    if KS == 1:
        w = tl.load(wb_ptr + row[:, None] + c[None, :])
    else:
        s = tl.arange(0, KS)
        w = tl.load(wb_ptr + row[None, None, :] + (s[:, None, None] * KC + c[None, :, None]))
    return w


@triton.jit
def _dz_offsets(rows, b0, HF: tl.constexpr, G: tl.constexpr, KS: tl.constexpr,
                KC: tl.constexpr, RB: tl.constexpr):
    """Offsets of gate 0 in one exchange slot: ``[HF, BB]`` (transposed, the tile's rows) for
    KS = 1; else the first RB rows of the tile (from row ``b0``) split over K, ``[KS, RB,
    KC]`` (int32; row sub-tile r is at ``+ r * RB * G * HF``).  Gate g is at ``+ g * HF``.
    One offset tensor serves all gates and sub-tiles (fewer live registers than one each)."""
    c = tl.arange(0, KC)
    if KS == 1:
        off = (rows * (G * HF))[None, :] + c[:, None]
    else:
        s = tl.arange(0, KS)
        r = b0 + tl.arange(0, RB)
        off = (r * (G * HF))[None, :, None] + (s[:, None, None] * KC + c[None, None, :])
    return off


@triton.jit
def _dz_gate(src, g, off, ok, HF: tl.constexpr, KS: tl.constexpr):
    """Gate g of one exchange slot (see ``_dz_offsets``; ``ok`` masks its rows)."""
    if KS == 1:
        m = ok[None, :]
    else:
        m = ok[None, :, None]
    return tl.load((src + g * HF) + off, mask=m, other=0.0, cache_modifier=".cg")


@triton.jit
def _dh_sub(src, off, ok, w0, w1, w2, w3, HF: tl.constexpr, G: tl.constexpr,
            BH: tl.constexpr, KS: tl.constexpr, RB: tl.constexpr, ACC: tl.constexpr,
            ACC_F64: tl.constexpr, TF32: tl.constexpr):
    """``[RB, BH]`` of ``dz @ W_hh[:, units]`` for RB rows (KS > 1): per gate a batched
    product over the KS K-slices (one per warp, no replicated MACs), ``dz [KS, RB, KC] @ W
    [KS, KC, BH]``, into its own accumulator; then the gates' and slices' partial sums."""
    z = tl.zeros([KS, RB, BH], ACC)
    acc = dot_acc(_dz_gate(src, 0, off, ok, HF, KS), w0, z, ACC_F64, TF32)
    if G == 4:
        a1 = dot_acc(_dz_gate(src, 1, off, ok, HF, KS), w1, z, ACC_F64, TF32)
        a2 = dot_acc(_dz_gate(src, 2, off, ok, HF, KS), w2, z, ACC_F64, TF32)
        a3 = dot_acc(_dz_gate(src, 3, off, ok, HF, KS), w3, z, ACC_F64, TF32)
        acc = (acc + a1) + (a2 + a3)
    return tl.sum(acc, axis=0)


@triton.jit
def _rows_join(a, b, R: tl.constexpr, BH: tl.constexpr):
    """``[2R, BH]``: ``a [R, BH]`` on top of ``b``."""
    return tl.reshape(tl.permute(tl.join(a, b), (2, 0, 1)), (2 * R, BH))


@triton.jit
def _gate_rows(src, g, off, r, B, STEP: tl.constexpr, w, acc0, acc1, acc2, acc3,
               HF: tl.constexpr, KS: tl.constexpr, RB: tl.constexpr, NRB: tl.constexpr,
               ACC_F64: tl.constexpr, TF32: tl.constexpr):
    """Gate g's product for NRB (2 or 4) row sub-tiles, one after the other with the same
    W operand ``w`` (its MMA fragments are read from shared memory once and die after the
    gate), each into its sub-tile's accumulator; ``r`` = the first sub-tile's rows.  A CTA
    barrier first (and after two sub-tiles): without it ptxas hoists the next gate's dz
    loads into this gate's products, and a 32-row tile spills."""
    tl.debug_barrier()
    acc0 = dot_acc(_dz_gate(src, g, off, r < B, HF, KS), w, acc0, ACC_F64, TF32)
    acc1 = dot_acc(_dz_gate(src + STEP, g, off, r + RB < B, HF, KS), w, acc1, ACC_F64, TF32)
    if NRB == 4:
        tl.debug_barrier()
        acc2 = dot_acc(_dz_gate(src + 2 * STEP, g, off, r + 2 * RB < B, HF, KS), w, acc2,
                       ACC_F64, TF32)
        acc3 = dot_acc(_dz_gate(src + 3 * STEP, g, off, r + 3 * RB < B, HF, KS), w, acc3,
                       ACC_F64, TF32)
    return acc0, acc1, acc2, acc3


@triton.jit
def _dh_rec(src, off, row_ok, b0, B, w0, w1, w2, w3, HF: tl.constexpr, G: tl.constexpr,
            BB: tl.constexpr, BH: tl.constexpr, KS: tl.constexpr, KC: tl.constexpr,
            RB: tl.constexpr, ACC: tl.constexpr, ACC_F64: tl.constexpr, TF32: tl.constexpr):
    """``dz @ W_hh[:, units]`` ``[BB, BH]`` from the exchange slot ``src``.

    KS = 1 (64 or more units): transposed, ``W^T [BH, HF] @ dz^T [HF, BB]`` (the units fill
    the M of a warpgroup MMA), per gate into its own accumulator.  KS > 1 (LSTM, 16 units):
    K split over the warps, a batched product ``dz [KS, RB, KC] @ W [KS, KC, BH]`` per gate
    and row sub-tile of RB rows.  One sub-tile (RB = BB <= 16): per gate into its own
    accumulator (``_dh_sub``).  2 or 4 sub-tiles (BB = 32 .. 128): gate by gate, each
    gate's W operand serving all sub-tiles (``_gate_rows``), one accumulator per sub-tile;
    so a product's dz tile, its staging in shared memory and the held W fragments stay
    those of one sub-tile whatever BB is.  Then the sums over the slices, the sub-tiles
    stacked."""
    if KS == 1:
        z = tl.zeros([BH, BB], ACC)
        acc = dot_acc(w0, _dz_gate(src, 0, off, row_ok, HF, KS), z, ACC_F64, TF32)
        if G == 4:
            a1 = dot_acc(w1, _dz_gate(src, 1, off, row_ok, HF, KS), z, ACC_F64, TF32)
            a2 = dot_acc(w2, _dz_gate(src, 2, off, row_ok, HF, KS), z, ACC_F64, TF32)
            a3 = dot_acc(w3, _dz_gate(src, 3, off, row_ok, HF, KS), z, ACC_F64, TF32)
            acc = (acc + a1) + (a2 + a3)
        dh = tl.trans(acc)
    elif RB == BB:
        dh = _dh_sub(src, off, row_ok, w0, w1, w2, w3, HF, G, BH, KS, RB, ACC, ACC_F64, TF32)
    else:
        NRB: tl.constexpr = BB // RB
        STEP: tl.constexpr = RB * G * HF
        r = b0 + tl.arange(0, RB)
        z = tl.zeros([KS, RB, BH], ACC)
        a0, a1, a2, a3 = _gate_rows(src, 0, off, r, B, STEP, w0, z, z, z, z, HF, KS, RB, NRB,
                                    ACC_F64, TF32)
        if G == 4:
            a0, a1, a2, a3 = _gate_rows(src, 1, off, r, B, STEP, w1, a0, a1, a2, a3, HF, KS,
                                        RB, NRB, ACC_F64, TF32)
            a0, a1, a2, a3 = _gate_rows(src, 2, off, r, B, STEP, w2, a0, a1, a2, a3, HF, KS,
                                        RB, NRB, ACC_F64, TF32)
            a0, a1, a2, a3 = _gate_rows(src, 3, off, r, B, STEP, w3, a0, a1, a2, a3, HF, KS,
                                        RB, NRB, ACC_F64, TF32)
        dh = _rows_join(tl.sum(a0, axis=0), tl.sum(a1, axis=0), RB, BH)
        if NRB == 4:
            dh = _rows_join(dh, _rows_join(tl.sum(a2, axis=0), tl.sum(a3, axis=0), RB, BH),
                            2 * RB, BH)
    return dh


@triton.jit(do_not_specialize=_NO_SPEC)
def bwd_persistent(out_ptr, wb_ptr, h0_ptr, c0_ptr, len_ptr, mask_ptr, scale_ptr, act_ptr,
                   cs_ptr, norms_ptr, cnorms_ptr, gout_ptr, ghn_ptr, gcn_ptr, gterms_ptr,
                   gnorms_ptr, gcnorms_ptr, gx_ptr, gh0_ptr, gc0_ptr, gscale_ptr,
                   dzbuf_ptr, bar_ptr,
                   T, B, H, has_len, has_mask, rev, ns_init, hs, hs_lo, w_ns, w_ns_lo, w_tar,
                   w_tar_lo, w_ar, w_ar_lo, CELL: tl.constexpr, G: tl.constexpr,
                   BB: tl.constexpr, BH: tl.constexpr, HF: tl.constexpr, KS: tl.constexpr,
                   ACC: tl.constexpr, ACC_F64: tl.constexpr, TF32: tl.constexpr,
                   GRAD_NORMS: tl.constexpr, GRAD_CELL_NORMS: tl.constexpr):
    """One launch for the reverse loop.  Grid ``(NH, NB)`` as in ``fwd_persistent``: program
    (p, q) owns units ``p*BH ..`` of batch tile q and keeps the LSTM cell gradient in
    registers; the NH programs of tile q meet at ``bar[q]`` after each step.

    The recurrent gradient of step k is ``dz_{k+1} @ W_hh[:, units]``, computed gate by gate
    (``_dh_rec``: transposed for 64 or more units, else with K split over KS slices and the
    rows in sub-tiles of RB); the loop runs T + 1 iterations, the last (k = 0) storing
    grad_h0 / grad_c0, so no product with the held W follows the loop; the slice's
    columns of W_hh stay on chip (``wb [G, NH*BH, HF]``: gate g, unit u, row k = W[g*H + k,
    u], zero-padded).  dz is exchanged through ``dzbuf [2, B, G*HF]`` (input dtype, zero
    padding, slot k % 2 holds dz_k in processing order; rows of an invalid step hold zeros).
    """
    pid = tl.program_id(0)
    q = tl.program_id(1)
    NH = tl.num_programs(0)
    NHB = NH * BH
    bar = bar_ptr + q
    u0 = pid * BH
    units = u0 + tl.arange(0, BH)
    unit_ok = units < H
    xcols, col_ok = gate_cols(u0, H, G, BH)
    acols = act_cols(u0, G, BH)
    rows, row_ok, L = tile_rows(q * BB, B, T, len_ptr, has_len, BB)
    KC: tl.constexpr = HF // KS
    # rows of a product's sub-tile: BB up to 16, else 16 (BB <= 64) or BB / 4
    RB: tl.constexpr = BB // min(4, (BB + 15) // 16)
    w0 = _w_gate(wb_ptr, 0, u0, HF, BH, KS, KC, NHB)
    if G == 4:
        w1 = _w_gate(wb_ptr, 1, u0, HF, BH, KS, KC, NHB)
        w2 = _w_gate(wb_ptr, 2, u0, HF, BH, KS, KC, NHB)
        w3 = _w_gate(wb_ptr, 3, u0, HF, BH, KS, KC, NHB)
    else:
        w1 = w0
        w2 = w0
        w3 = w0
    c_ns, c_tar, c_ar = _coefs(gterms_ptr, w_ns, w_ns_lo, w_tar, w_tar_lo, w_ar, w_ar_lo, ACC)
    m2 = _mask_sq(mask_ptr, rows, row_ok, units, unit_ok, H, has_mask, ACC)
    a = cell_scale(scale_ptr, units, unit_ok, CELL, BH, ACC)
    s = wide(hs, hs_lo, ACC)
    # own gate columns of a slot: gate g of unit u at g*HF + u
    n = tl.arange(0, G * BH)
    dcols = (n % G) * HF + u0 + n // G
    dslot = rows[:, None] * (G * HF) + dcols[None, :]
    dmask = row_ok[:, None] & col_ok[None, :]
    SLOT = B * G * HF
    doff = _dz_offsets(rows, q * BB, HF, G, KS, KC, RB)
    dc = tl.zeros([BB, BH], ACC)
    ga_acc = tl.zeros([BB, BH], ACC)
    # the k = 0 terms of grad_h0 / grad_c0, loaded up front (the last iteration only stores)
    zero = tl.zeros([BB, BH], ACC)
    gh0_t = _h0_grad(zero, rows, row_ok, units, unit_ok, h0_ptr, norms_ptr, gnorms_ptr, B, H,
                     ns_init, c_ns, ACC, GRAD_NORMS)
    gc0_t = _c0_grad(zero, rows, row_ok, units, unit_ok, c0_ptr, cnorms_ptr, gcnorms_ptr, H,
                     ACC, GRAD_CELL_NORMS)
    # T + 1 iterations: the last (k = 0) stores grad_h0 / grad_c0.  Its product with the
    # held W must be in the loop: after the loop it would keep W's MMA fragments (or their
    # shared-memory addresses) live in registers across the whole loop, and spill.
    for j in range(0, T + 1):
        k = T - j
        dh_rec = _dh_rec(dzbuf_ptr + ((k + 1) % 2) * SLOT, doff, row_ok, q * BB, B, w0, w1, w2,
                         w3, HF, G, BB, BH, KS, KC, RB, ACC, ACC_F64, TF32)
        if k >= 1:
            dz, dc, ga = bwd_step(k, dh_rec, dc, m2, rows, row_ok, L, units, unit_ok, xcols,
                                  acols, col_ok, out_ptr, h0_ptr, c0_ptr, act_ptr, cs_ptr,
                                  norms_ptr, gout_ptr, ghn_ptr, gcn_ptr, gx_ptr, gnorms_ptr,
                                  cnorms_ptr, gcnorms_ptr, B, H, rev, ns_init, c_ns, c_tar,
                                  c_ar, a, s, CELL, G, BB, BH, ACC, GRAD_NORMS,
                                  GRAD_CELL_NORMS)
            if CELL == 4:
                ga_acc += ga
            tl.store(dzbuf_ptr + (k % 2) * SLOT + dslot, dz.to(dzbuf_ptr.dtype.element_ty),
                     mask=dmask)
            grid_barrier(bar, (j + 1) * NH)
        else:
            _store_rows(dh_rec + gh0_t, rows, row_ok, units, unit_ok, gh0_ptr, H)
            if G == 4:
                _store_rows(dc + gc0_t, rows, row_ok, units, unit_ok, gc0_ptr, H)
    if CELL == 4:
        _store_grad_scale(ga_acc, rows, row_ok, units, unit_ok, gscale_ptr, q, H, ACC, False)


@triton.jit(do_not_specialize=_NO_SPEC)
def bwd_step_launch(out_ptr, w_ptr, h0_ptr, c0_ptr, len_ptr, mask_ptr, scale_ptr, act_ptr,
                    cs_ptr, norms_ptr, cnorms_ptr, gout_ptr, ghn_ptr, gcn_ptr, gterms_ptr,
                    gnorms_ptr, gcnorms_ptr, gx_ptr, gh0_ptr, gc0_ptr, gscale_ptr, dc_ptr, k,
                    T, B, H, has_len, has_mask, rev, ns_init, hs, hs_lo, w_ns, w_ns_lo, w_tar,
                    w_tar_lo, w_ar, w_ar_lo, CELL: tl.constexpr, G: tl.constexpr,
                    BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr,
                    ACC_F64: tl.constexpr, TF32: tl.constexpr, GRAD_NORMS: tl.constexpr,
                    GRAD_CELL_NORMS: tl.constexpr):
    """Launch ``k`` of ``T .. 0``: backward step k, or (k = 0) grad_h0 / grad_c0.

    Grid ``(cdiv(H, BH), cdiv(B, BB))``; W_hh columns are streamed in BK-chunks; ``gscale``
    (zero-initialized) accumulates across launches.
    """
    pid_h = tl.program_id(0)
    pid_b = tl.program_id(1)
    u0 = pid_h * BH
    units = u0 + tl.arange(0, BH)
    unit_ok = units < H
    xcols, col_ok = gate_cols(u0, H, G, BH)
    acols = act_cols(u0, G, BH)
    rows, row_ok, L = tile_rows(pid_b * BB, B, T, len_ptr, has_len, BB)
    c_ns, c_tar, c_ar = _coefs(gterms_ptr, w_ns, w_ns_lo, w_tar, w_tar_lo, w_ar, w_ar_lo, ACC)
    if k >= 1:
        m2 = _mask_sq(mask_ptr, rows, row_ok, units, unit_ok, H, has_mask, ACC)
        a = cell_scale(scale_ptr, units, unit_ok, CELL, BH, ACC)
        s = wide(hs, hs_lo, ACC)
        _bwd_tile(k, rows, row_ok, L, units, unit_ok, xcols, acols, col_ok, m2, out_ptr, w_ptr,
                  h0_ptr, c0_ptr, act_ptr, cs_ptr, norms_ptr, gout_ptr, ghn_ptr, gcn_ptr,
                  gx_ptr, gnorms_ptr, cnorms_ptr, gcnorms_ptr, dc_ptr, gscale_ptr, pid_b, B, H,
                  rev, ns_init, c_ns, c_tar, c_ar, a, s, CELL, G, BB, BH, BK, ACC, ACC_F64,
                  TF32, GRAD_NORMS, GRAD_CELL_NORMS)
    else:
        dh_rec = _dz_w(1, rows, row_ok, L, units, unit_ok, gx_ptr, w_ptr, B, H, rev, G, BB, BH,
                       BK, ACC, ACC_F64, TF32)
        _grad_h0(dh_rec, rows, row_ok, units, unit_ok, h0_ptr, c0_ptr, norms_ptr, cnorms_ptr,
                 gnorms_ptr, gcnorms_ptr, dc_ptr, gh0_ptr, gc0_ptr, B, H, ns_init, c_ns, G, ACC,
                 GRAD_NORMS, GRAD_CELL_NORMS)
