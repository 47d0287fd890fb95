"""The step body shared by every Triton kernel: cell math, one forward step, one backward step.

Index conventions used by all kernels (see docs/triton.md):

* ``rows [BB]`` int64 batch rows of the tile, ``L [BB]`` their lengths (T without lengths).
* A program owns the hidden units ``units = u0 + arange(BH)``.  Its gate columns are
  interleaved, column ``n = j*G + g`` <-> gate ``g`` of unit ``u0 + j``; ``xcols[n]`` is that
  column's index in ``x_proj`` / ``w_hh`` rows (``g*H + u0 + j``).  The LSTM cell splits a
  ``[BB, 4*BH]`` tile into i, f, g, o by reshape + split, and joins the gradients back.
* Processing step ``k`` (1-based) of row b is valid when ``k <= L_b``; it reads and writes time
  position ``pos = L_b - k`` (reverse) or ``k - 1``.  An invalid step writes zeros at position
  ``k - 1``, so every position of ``output`` / ``grad_x_proj`` is written exactly once.
* The state after ``idx`` steps is ``h0`` / ``c0`` for ``idx == 0``, else ``output`` / ``cs`` at
  the position of step ``idx`` (``load_state``).
"""
import triton
import triton.language as tl


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # libdevice tanh does not run in the interpreter
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@triton.jit
def wide(hi, lo, ACC: tl.constexpr):
    """A float passed as two fp32 scalars (hi + lo) so that float64 kernels get it exactly.

    In fp32 ``hi`` alone is the value (``lo`` is below half an ulp of it): the kernel then
    reads the parameter directly, with no register held for it."""
    if ACC == tl.float64:
        v = tl.full([], hi, ACC) + tl.full([], lo, ACC)
    else:
        v = hi
    return v


@triton.jit
def dot_acc(a, b, acc, ACC_F64: tl.constexpr, TF32: tl.constexpr):
    """acc + a @ b with fp32 (fp64) accumulation; TF32 only when allowed."""
    if ACC_F64:
        out = tl.dot(a, b, acc, out_dtype=tl.float64)
    elif TF32:
        out = tl.dot(a, b, acc, input_precision="tf32")
    else:
        out = tl.dot(a, b, acc, input_precision="ieee")
    return out


@triton.jit
def grid_barrier(bar_ptr, target):
    """Grid-wide barrier of a co-resident grid: ``target`` = (barrier number) * (programs)."""
    tl.debug_barrier()
    tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def tile_rows(b0, B, T, len_ptr, has_len, BB: tl.constexpr):
    """Rows ``b0 .. b0+BB-1`` (int64), their mask, and their lengths."""
    rows = (b0 + tl.arange(0, BB)).to(tl.int64)
    row_ok = rows < B
    L = tl.load(len_ptr + rows, mask=tl.where(has_len != 0, row_ok, False), other=T)
    L = tl.where(has_len != 0, L, T).to(tl.int64)
    return rows, row_ok, L


@triton.jit
def gate_cols(u0, H, G: tl.constexpr, BH: tl.constexpr):
    """Interleaved gate columns of units ``u0 .. u0+BH-1``: (xcols int64, col_ok)."""
    n = tl.arange(0, G * BH)
    unit = u0 + n // G
    xcols = ((n % G) * H + unit).to(tl.int64)
    return xcols, unit < H


@triton.jit
def act_cols(u0, G: tl.constexpr, BH: tl.constexpr):
    """Columns of the saved activated gates: stored interleaved (column ``u*G + g``), so a
    tile's gates are one contiguous run (full-width vector stores and loads)."""
    return (u0 * G + tl.arange(0, G * BH)).to(tl.int64)


@triton.jit
def _position(k, L, valid, rev):
    """Time position of step ``k`` per row (``k - 1`` where the step is invalid)."""
    return tl.where(valid & (rev != 0), L - k, k - 1).to(tl.int64)


@triton.jit
def load_state(idx, L, rows, row_ok, cols, col_ok, init_ptr, seq_ptr, B, W, rev, ok,
                ACC: tl.constexpr):
    """State after ``idx [BB]`` steps (``init`` for 0, else ``seq`` at the step's position).

    ``cols [C]`` are the columns of a row of width ``W``; ``ok [BB]`` masks the rows to load.
    Returns ``[BB, C]`` in ``ACC``; rows/columns masked out are 0.
    """
    first = idx == 0
    pos = tl.where(rev != 0, L - idx, idx - 1).to(tl.int64)
    m = (row_ok & ok)[:, None] & col_ok[None, :]
    a = tl.load(init_ptr + rows[:, None] * W + cols[None, :], mask=m & first[:, None], other=0.0)
    b = tl.load(seq_ptr + (pos * B + rows)[:, None] * W + cols[None, :], mask=m & ~first[:, None],
                other=0.0, cache_modifier=".cg")
    return tl.where(first[:, None], a.to(ACC), b.to(ACC))


@triton.jit
def load_h_op(idx, L, rows, row_ok, cols, col_ok, h0_ptr, out_ptr, B, H, rev):
    """``h`` after ``idx`` steps as a dot operand (the dtype of ``output``), ``[BB, C]``."""
    pos = tl.where(rev != 0, L - idx, idx - 1).to(tl.int64)
    base = tl.where(idx == 0, h0_ptr + rows * H, out_ptr + (pos * B + rows) * H)
    m = row_ok[:, None] & col_ok[None, :]
    return tl.load(base[:, None] + cols[None, :], mask=m, other=0.0, cache_modifier=".cg")


@triton.jit
def _cell_fwd(z, c_prev, theta, a, s, CELL: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr):
    """``z [BB, G*BH]`` pre-activations -> (h [BB, BH], c [BB, BH], act [BB, G*BH]).

    CELL: 0 lstm (act = activated i, f, g, o interleaved), 1 relu, 2 tanh, 3 trec,
    4 normprop (the LSTM with ``h = o * tanh(a * c) * s``, ``a [BH]`` the cell scale,
    ``s`` the h scale; ``a`` and ``s`` are ignored by the other cells).
    """
    if CELL == 0 or CELL == 4:
        z0, z1 = tl.split(tl.reshape(z, (BB, BH, 2, 2)))
        zi, zg = tl.split(z0)
        zf, zo = tl.split(z1)
        i = _sigmoid(zi)
        f = _sigmoid(zf)
        g = _tanh(zg)
        o = _sigmoid(zo)
        c = f * c_prev + i * g
        if CELL == 4:
            h = o * _tanh(a[None, :] * c) * s
        else:
            h = o * _tanh(c)
        act = tl.reshape(tl.join(tl.join(i, g), tl.join(f, o)), (BB, 4 * BH))
    elif CELL == 1:
        h = tl.maximum(z, 0.0)
        c = c_prev
        act = z
    elif CELL == 2:
        h = _tanh(z)
        c = c_prev
        act = z
    else:
        h = tl.where(z > theta, z, 0.0)
        c = c_prev
        act = z
    return h, c, act


@triton.jit
def _cell_bwd(dh, dc, act, c, c_prev, h, a, s, CELL: tl.constexpr, BB: tl.constexpr,
              BH: tl.constexpr):
    """Cell backward: (dz [BB, G*BH] interleaved, dc into step k-1, ga [BB, BH]).

    ``ga`` is the step's contribution to grad_cell_scale (normprop: ``dh*o*s*(1-tc^2)*c``
    with ``tc = tanh(a*c)``); the other cells return ``dc`` there (unused).
    """
    if CELL == 0 or CELL == 4:
        a0, a1 = tl.split(tl.reshape(act, (BB, BH, 2, 2)))
        i, g = tl.split(a0)
        f, o = tl.split(a1)
        if CELL == 4:
            tc = _tanh(a[None, :] * c)
            dac = dh * o * s * (1.0 - tc * tc)
            dc = dc + dac * a[None, :]
            ga = dac * c
            do = dh * tc * s * o * (1.0 - o)
        else:
            tc = _tanh(c)
            dc = dc + dh * o * (1.0 - tc * tc)
            do = dh * tc * o * (1.0 - o)
            ga = dc
        di = dc * g * i * (1.0 - i)
        df = dc * c_prev * f * (1.0 - f)
        dg = dc * i * (1.0 - g * g)
        dz = tl.reshape(tl.join(tl.join(di, dg), tl.join(df, do)), (BB, 4 * BH))
        dc_prev = dc * f
    elif CELL == 2:
        dz = dh * (1.0 - h * h)
        dc_prev = dc
        ga = dc
    else:
        dz = tl.where(h != 0.0, dh, 0.0)
        dc_prev = dc
        ga = dc
    return dz, dc_prev, ga


@triton.jit
def cell_scale(scale_ptr, units, unit_ok, CELL: tl.constexpr, BH: tl.constexpr,
               ACC: tl.constexpr):
    """The normprop cell scale of the units ``[BH]`` (0 at padded units); zeros (unused)
    for the other cells."""
    if CELL == 4:
        a = tl.load(scale_ptr + units, mask=unit_ok, other=0.0).to(ACC)
    else:
        a = tl.zeros([BH], ACC)
    return a


@triton.jit
def radial(g_ptr, n_ptr, off, ok):
    """``g[off] / n[off]`` per row ``[BB]`` (0 where ``ok`` is False or the norm is 0): the
    coefficient of the radial term ``g * v / n`` that a norm's upstream gradient ``g`` adds
    to the gradient of the state ``v`` whose norm is ``n``."""
    g = tl.load(g_ptr + off, mask=ok, other=0.0)
    n = tl.load(n_ptr + off, mask=ok, other=1.0)
    pos = ok & (n > 0.0)
    return tl.where(pos, g / tl.where(pos, n, 1.0), 0.0)


@triton.jit
def load_x(k, rows, row_ok, L, xcols, col_ok, x_ptr, B, H, rev, G: tl.constexpr):
    """The input projection of step ``k`` for a tile's gate columns, ``[BB, G*BH]`` (0 where
    the step is invalid).  Independent of the recurrence: persistent kernels prefetch it
    before the barrier of step k - 1."""
    valid = row_ok & (k <= L)
    pos = _position(k, L, valid, rev)
    xm = valid[:, None] & col_ok[None, :]
    return tl.load(x_ptr + (pos * B + rows)[:, None] * (G * H) + xcols[None, :], mask=xm,
                   other=0.0)


@triton.jit
def fwd_step(k, x, hw, h_prev, c_prev, rows, row_ok, L, units, unit_ok, acols, col_ok,
             out_ptr, act_ptr, cs_ptr, hn_ptr, cn_ptr, B, H, rev, theta, a, s,
             CELL: tl.constexpr, G: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr,
             ACC: tl.constexpr):
    """One forward step of a ``[BB rows, BH units]`` tile.

    ``x [BB, G*BH]`` is the step's input projection (``load_x``), ``hw [BB, G*BH]`` is
    ``h_{k-1} @ W_hh^T`` for the tile's gate columns; ``h_prev``, ``c_prev [BB, BH]`` the
    tile's state after k-1 steps (ACC), ``a [BH]`` / ``s`` the normprop cell and h scales.
    Stores output, h_n / c_n at the row's last step and, for the LSTM-type cells, the
    activated gates and c.  Returns the state after k steps (held where the step is
    invalid; h rounded to the output dtype).
    """
    valid = row_ok & (k <= L)
    pos = _position(k, L, valid, rev)
    rowoff = pos * B + rows
    h, c, act = _cell_fwd(x.to(ACC) + hw, c_prev, theta, a, s, CELL, BB, BH)
    hd = h.to(out_ptr.dtype.element_ty)
    hoff = rowoff[:, None] * H + units[None, :]
    um = row_ok[:, None] & unit_ok[None, :]
    vm = valid[:, None] & unit_ok[None, :]
    tl.store(out_ptr + hoff, tl.where(vm, hd, 0.0).to(hd.dtype), mask=um)
    last = (valid & (k == L))[:, None] & unit_ok[None, :]
    noff = rows[:, None] * H + units[None, :]
    tl.store(hn_ptr + noff, hd, mask=last)
    h_new = tl.where(vm, hd.to(ACC), h_prev)
    if G == 4:
        tl.store(act_ptr + rowoff[:, None] * (G * H) + acols[None, :], act,
                 mask=valid[:, None] & col_ok[None, :])
        tl.store(cs_ptr + hoff, c, mask=vm)
        tl.store(cn_ptr + noff, c.to(cn_ptr.dtype.element_ty), mask=last)
        c_new = tl.where(vm, c, c_prev)
    else:
        c_new = c_prev
    return h_new, c_new


@triton.jit
def fwd_penalty(k, h, h_prev, m, row_ok, L):
    """Per-row partial sums of one step: (sum h^2, TAR sum, AR sum), each ``[BB]``.

    ``h`` / ``h_prev`` are the states after k and k-1 steps (0 at padded units), ``m`` the
    AR mask tile.  TAR counts steps 2..L_b, AR steps 1..L_b.
    """
    valid = row_ok & (k <= L)
    sq = tl.sum(h * h, axis=1)
    d = h - h_prev
    tar = tl.where(valid & (k >= 2), tl.sum(d * d, axis=1), 0.0)
    mh = m * h
    ar = tl.where(valid, tl.sum(mh * mh, axis=1), 0.0)
    return sq, tar, ar


@triton.jit
def ns_step(k, n_k, n_prev, row_ok, L, ns_init):
    """(norms[k] to store, NS contribution (n_k - n_{k-1})^2 where k is in S_b), ``[BB]``."""
    valid = row_ok & (k <= L)
    in_s = valid & (k >= 1) & ((k >= 2) | (ns_init != 0))
    d = n_k - n_prev
    return tl.where(valid, n_k, 0.0), tl.where(in_s, d * d, 0.0)


@triton.jit
def bwd_step(k, dh_rec, dc, m2, rows, row_ok, L, units, unit_ok, xcols, acols, col_ok,
             out_ptr, h0_ptr, c0_ptr, act_ptr, cs_ptr, norms_ptr, gout_ptr, ghn_ptr, gcn_ptr,
             gx_ptr, gnorms_ptr, cnorms_ptr, gcnorms_ptr, B, H, rev, ns_init, c_ns, c_tar,
             c_ar, a, s, CELL: tl.constexpr, G: tl.constexpr, BB: tl.constexpr,
             BH: tl.constexpr, ACC: tl.constexpr, GRAD_NORMS: tl.constexpr,
             GRAD_CELL_NORMS: tl.constexpr):
    """One backward step of a ``[BB rows, BH units]`` tile.

    ``dh_rec [BB, BH]`` is the recurrent gradient ``dz_{k+1} @ W_hh`` (0 where step k+1 is
    invalid), ``dc`` the cell gradient from step k+1 (LSTM).  Adds the upstream gradient of
    the output (and of h_n / c_n at the row's last step) and the penalty gradients
    (``c_ns = 2 w_ns g_ns`` etc.), the radial terms of the norms' upstream gradients
    (``GRAD_NORMS``: ``gnorms [T+1, B]`` folded into the norm-stabilizer's radial
    coefficient; ``GRAD_CELL_NORMS``: ``gcnorms[k] * c_k / m_k`` into dc, ``m = cnorms``),
    runs the cell backward (``a [BH]``, ``s``: the normprop scales), stores ``grad_x_proj``
    at the step's position (zeros for an invalid step) and returns ``(dz [BB, G*BH], dc,
    ga [BB, BH])``: dz and dc for step k-1, ga the step's grad_cell_scale terms
    (normprop; unused otherwise).
    """
    valid = row_ok & (k <= L)
    nxt = valid & (k + 1 <= L)
    pos = _position(k, L, valid, rev)
    rowoff = pos * B + rows
    hoff = rowoff[:, None] * H + units[None, :]
    vm = valid[:, None] & unit_ok[None, :]
    h = tl.load(out_ptr + hoff, mask=vm, other=0.0).to(ACC)
    dh = dh_rec + tl.load(gout_ptr + hoff, mask=vm, other=0.0).to(ACC)
    last = valid & (k == L)
    noff = rows[:, None] * H + units[None, :]
    dh += tl.load(ghn_ptr + noff, mask=last[:, None] & unit_ok[None, :], other=0.0).to(ACC)
    # norm-stabilizer: radial, from the saved norms
    n_k = tl.load(norms_ptr + k * B + rows, mask=valid, other=1.0)
    n_p = tl.load(norms_ptr + (k - 1) * B + rows, mask=valid, other=1.0)
    n_n = tl.load(norms_ptr + (k + 1) * B + rows, mask=nxt, other=0.0)
    d_k = tl.where(valid & ((k >= 2) | (ns_init != 0)), n_k - n_p, 0.0)
    d_n = tl.where(nxt, n_n - n_k, 0.0)
    pos_k = valid & (n_k > 0.0)
    num = c_ns * (d_k - d_n)
    if GRAD_NORMS:
        num += tl.load(gnorms_ptr + k * B + rows, mask=valid, other=0.0)
    coef = tl.where(pos_k, num / tl.where(pos_k, n_k, 1.0), 0.0)
    dh += coef[:, None] * h
    # TAR: needs h_{k-1} and h_{k+1}
    tar_on = c_tar != 0.0
    h_p = load_state(k - 1 + 0 * L, L, rows, row_ok, units, unit_ok, h0_ptr, out_ptr, B, H,
                      rev, tl.where(tar_on, valid, False), ACC)
    pos_n = tl.where(rev != 0, L - k - 1, k).to(tl.int64)
    h_n = tl.load(out_ptr + (pos_n * B + rows)[:, None] * H + units[None, :],
                  mask=tl.where(tar_on, nxt, False)[:, None] & unit_ok[None, :], other=0.0).to(ACC)
    back = tl.where(k >= 2, h - h_p, 0.0)
    fwd = tl.where(nxt[:, None], h_n - h, 0.0)
    dh += c_tar * (back - fwd)
    # AR
    dh += c_ar * m2 * h
    dh = tl.where(vm, dh, 0.0)
    if G == 4:
        act = tl.load(act_ptr + rowoff[:, None] * (G * H) + acols[None, :],
                      mask=valid[:, None] & col_ok[None, :], other=0.0)
        c = tl.load(cs_ptr + hoff, mask=vm, other=0.0)
        c_prev = load_state(k - 1 + 0 * L, L, rows, row_ok, units, unit_ok, c0_ptr, cs_ptr,
                             B, H, rev, valid, ACC)
        gcn = tl.load(gcn_ptr + noff, mask=last[:, None] & unit_ok[None, :], other=0.0)
        dc_in = tl.where(last[:, None], gcn.to(ACC), dc)
        c = c.to(ACC)
        if GRAD_CELL_NORMS:
            dc_in += radial(gcnorms_ptr, cnorms_ptr, k * B + rows, valid)[:, None] * c
        dz, dc_prev, ga = _cell_bwd(dh, dc_in, act.to(ACC), c, c_prev, h, a, s, CELL, BB, BH)
        dc_out = tl.where(vm, dc_prev, 0.0)
    else:
        dz, dc_out, ga = _cell_bwd(dh, dc, h, h, h, h, a, s, CELL, BB, BH)
    dz = tl.where(valid[:, None] & col_ok[None, :], dz, 0.0)
    tl.store(gx_ptr + rowoff[:, None] * (G * H) + xcols[None, :],
             dz.to(gx_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    return dz, dc_out, ga


@triton.jit
def ns_initial_grad(dh0, h0, n0, n1, c_ns, ns_init):
    """Add the norm-stabilizer gradient of h_0 (only with ``ns_include_initial``)."""
    ok = (ns_init != 0) & (n0 > 0.0)
    coef = tl.where(ok, -c_ns * (n1 - n0) / tl.where(ok, n0, 1.0), 0.0)
    return dh0 + coef[:, None] * h0
