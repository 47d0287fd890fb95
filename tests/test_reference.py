"""The reference backend (hand-written backward) against gradcheck and the naive backend."""
import itertools

import pytest
import torch

from rnnreg_kernels import Penalties, recurrence

CELLS = ["lstm", "relu", "tanh", "trec"]
B, H = 3, 5


def make_inputs(cell, T, seed, dtype=torch.float64, requires_grad=True):
    """Random inputs; relu/trec pre-activations are kept away from their kinks so that
    finite differences do not straddle a non-differentiable point."""
    g = torch.Generator().manual_seed(seed)
    G = 4 if cell == "lstm" else 1
    x = torch.randn(T, B, G * H, generator=g, dtype=dtype)
    w = torch.randn(G * H, H, generator=g, dtype=dtype) * 0.4
    h0 = torch.randn(B, H, generator=g, dtype=dtype)
    c0 = torch.randn(B, H, generator=g, dtype=dtype) if cell == "lstm" else None
    if cell in ("relu", "trec"):
        h0 = h0.abs()
    ins = [x, w, h0] + ([c0] if c0 is not None else [])
    return [t.requires_grad_(requires_grad) for t in ins]


def kink_margin(cell, ins, theta=1.0, **kw):
    """Smallest distance of any pre-activation to the cell's kink (inf for smooth cells)."""
    if cell not in ("relu", "trec"):
        return float("inf")
    with torch.no_grad():
        r = recurrence(*ins, cell=cell, backend="naive", theta=theta, **kw)
        x, w, h0 = ins[:3]
        # recompute z per position from the outputs: z_t = x_t + h_prev W^T
        out = r.output
        T = out.shape[0]
        rev = kw.get("reverse", False)
        lengths = kw.get("lengths")
        margins = []
        for b in range(B):
            L = T if lengths is None else int(lengths[b])
            order = range(L - 1, -1, -1) if rev else range(L)
            h = h0[b]
            for p in order:
                z = x[p, b] + h @ w.t()
                kink = 0.0 if cell == "relu" else theta
                margins.append((z - kink).abs().min().item())
                h = out[p, b]
        return min(margins)


def good_inputs(cell, T, seed, **kw):
    for s in range(seed, seed + 50):
        ins = make_inputs(cell, T, s)
        if kink_margin(cell, ins, **kw) > 1e-3:
            return ins
    raise RuntimeError("no input away from the kink found")


def outputs_fn(cell, penalties, lengths, reverse, backend):
    def f(*ins):
        r = recurrence(*ins, cell=cell, penalties=penalties, lengths=lengths, reverse=reverse,
                       backend=backend)
        outs = [r.output, r.h_n, r.penalty, *r.terms]
        if r.c_n is not None:
            outs.append(r.c_n)
        return tuple(outs)
    return f


MASK = torch.rand(B, H, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2
ALL = Penalties(norm_stabilizer=2.0, tar=1.5, ar=0.7)
INIT_MASK = Penalties(norm_stabilizer=2.0, ns_include_initial=True, ar=1.0, ar_mask=MASK)
CASES = {  # name: (T, penalties, lengths, reverse)
    "T1": (1, ALL, None, False),
    "T2": (2, INIT_MASK, None, False),
    "all": (7, ALL, None, False),
    "initial+mask": (7, INIT_MASK, None, False),
    "ns-only": (7, Penalties(norm_stabilizer=3.0), None, False),
    "lengths": (7, ALL, torch.tensor([7, 1, 4]), False),
    "reverse": (7, INIT_MASK, None, True),
    "lengths+reverse": (7, INIT_MASK, torch.tensor([3, 7, 1]), True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck_reference(cell, case):
    T, pen, lengths, reverse = CASES[case]
    ins = good_inputs(cell, T, seed=7, lengths=lengths, reverse=reverse)
    f = outputs_fn(cell, pen, lengths, reverse, "reference")
    assert torch.autograd.gradcheck(f, ins, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck_naive(cell):
    T, pen, lengths, reverse = CASES["lengths+reverse"]
    ins = good_inputs(cell, T, seed=3, lengths=lengths, reverse=reverse)
    assert torch.autograd.gradcheck(outputs_fn(cell, pen, lengths, reverse, "naive"), ins)


PENS = {"none": Penalties(), "all": ALL, "initial+mask": INIT_MASK,
        "tar": Penalties(tar=2.0), "ar": Penalties(ar=2.0)}


@pytest.mark.parametrize("cell, pen, T, lengths, reverse", [
    (c, p, T, lg, r) for c, p, T, lg, r in itertools.product(
        CELLS, PENS, [1, 2, 7], [False, True], [False, True])])
def test_reference_matches_naive(cell, pen, T, lengths, reverse):
    """Every output and every gradient, with random upstream grads on each output."""
    lengths = torch.tensor([T, 1, max(1, T - 3)]) if lengths else None
    ins = make_inputs(cell, T, seed=T * 13 + len(pen))
    f_ref = outputs_fn(cell, PENS[pen], lengths, reverse, "reference")
    f_nai = outputs_fn(cell, PENS[pen], lengths, reverse, "naive")
    ref = f_ref(*ins)
    ins2 = [t.detach().clone().requires_grad_() for t in ins]
    nai = f_nai(*ins2)
    g = torch.Generator().manual_seed(1)
    ups = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in ref]
    for a, b in zip(ref, nai):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    ga = torch.autograd.grad(ref, ins, ups)
    gb = torch.autograd.grad(nai, ins2, ups)
    for name, a, b in zip(["x_proj", "w_hh", "h0", "c0"], ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")


def test_norms_and_final_state_semantics():
    T = 5
    x, w, h0 = make_inputs("tanh", T, seed=2, requires_grad=False)
    lengths = torch.tensor([5, 2, 1])
    fwd = recurrence(x, w, h0, cell="tanh", lengths=lengths)
    rev = recurrence(x, w, h0, cell="tanh", lengths=lengths, reverse=True)
    for r, last_pos in ((fwd, lengths - 1), (rev, torch.zeros(3, dtype=torch.long))):
        assert r.norms.shape == (T + 1, B) and r.norms.dtype == torch.float64
        for b in range(B):
            L = int(lengths[b])
            torch.testing.assert_close(r.h_n[b], r.output[last_pos[b], b])
            assert torch.all(r.output[L:, b] == 0) and torch.all(r.norms[L + 1:, b] == 0)
        torch.testing.assert_close(r.norms[0], torch.sqrt((h0 ** 2).sum(-1) + H * 1e-9))
    # reverse without lengths is forward over the flipped sequence, read back flipped
    full = recurrence(x, w, h0, cell="tanh", reverse=True)
    flip = recurrence(x.flip(0), w, h0, cell="tanh")
    torch.testing.assert_close(full.output, flip.output.flip(0))
    torch.testing.assert_close(full.norms, flip.norms)
    # a row of length L equals running that row alone for L steps
    one = recurrence(x[:2, 1:2], w, h0[1:2], cell="tanh")
    torch.testing.assert_close(fwd.output[:2, 1:2], one.output)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_matches_float64_within_naive_error(dtype):
    T = 6
    ins = make_inputs("lstm", T, seed=4, requires_grad=False)
    pen = Penalties(norm_stabilizer=1.0, tar=1.0, ar=1.0)
    exact = recurrence(*ins, cell="lstm", penalties=pen, backend="naive")
    low = [t.to(dtype) for t in ins]
    ref = recurrence(*low, cell="lstm", penalties=pen, backend="reference")
    nai = recurrence(*low, cell="lstm", penalties=pen, backend="naive")
    assert ref.output.dtype == dtype and ref.norms.dtype == torch.float32
    assert ref.penalty.dtype == torch.float32
    err_ref = (ref.output.double() - exact.output).abs().max()
    err_nai = (nai.output.double() - exact.output).abs().max()
    assert err_ref <= 2 * err_nai + 1e-6
    rel_pen = abs(ref.penalty.double() - exact.penalty) / exact.penalty
    assert rel_pen < {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
