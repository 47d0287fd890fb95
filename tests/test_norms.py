"""Issue 12 in the op: the normprop cell, cell norms, differentiable norms and the two
norm-only terms (cell norm-stabilizer, norm_target).

* float64 gradcheck on ``reference`` of the normprop cell (cell_scale included) and of the new
  terms, through every output incl. ``norms`` / ``cell_norms``;
* ``reference`` against ``naive`` (the independent oracle: autograd through the loop, terms
  post hoc from the states and memory cells) for every new thing: lengths, reverse, T = 1,
  H = 5 / B = 3, zero-norm states with ns_eps = 0, ns_include_initial;
* a user's own differentiable norm penalty gives the same gradients on every backend that
  runs here (reference, naive, native, triton in the interpreter);
* normprop with cell_scale = 1, h_scale = 1 is the lstm exactly; the values of the new terms
  against direct transcriptions of their formulas; argument errors; backend choice.
"""
import math

import pytest
import torch

import rnnreg_kernels as rk
from rnnreg_kernels import BackendUnavailableError, Penalties, recurrence
from rnnreg_kernels.contract import Spec
from rnnreg_kernels.ops import resolve_backend
from rnnreg_kernels.penalties import TERM_NAMES

DT = torch.float64
ALL = dict(norm_stabilizer=0.7, tar=0.9, ar=1.3, cell_norm_stabilizer=1.1, norm_target=0.6,
           norm_target_value=1.2)


def _inputs(cell, T, B, H, seed=0, dtype=DT, zero_state=False):
    g = torch.Generator().manual_seed(seed)
    G = 4 if cell in ("lstm", "normprop") else 1
    x = torch.randn(T, B, G * H, generator=g, dtype=DT)
    w = torch.randn(G * H, H, generator=g, dtype=DT) * (0.6 / math.sqrt(H))
    h0 = torch.randn(B, H, generator=g, dtype=DT) * 0.5
    c0 = torch.randn(B, H, generator=g, dtype=DT) * 0.5 if G == 4 else None
    if zero_state:
        h0 = torch.zeros_like(h0)
        c0 = None if c0 is None else torch.zeros_like(c0)
    a = torch.rand(H, generator=g, dtype=DT) + 0.5 if cell == "normprop" else None
    ins = [t.to(dtype) for t in (x, w, h0)] + [None if c0 is None else c0.to(dtype), a]
    return ins


def _run(backend, cell, ins, pen, lengths=None, reverse=False, h_scale=None, cell_norms=None,
         **kw):
    x, w, h0, c0, a = ins
    extra = {}
    if cell == "normprop":
        extra = dict(cell_scale=a, h_scale=1.7 if h_scale is None else h_scale)
    if cell_norms is not None:
        extra["cell_norms"] = cell_norms
    return recurrence(x, w, h0, c0, cell=cell, penalties=pen, lengths=lengths,
                      reverse=reverse, backend=backend, **extra, **kw)


def _leaves(ins):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in ins]


def _scalar(r, gen_seed=7):
    """Random weights on every output (norms and cell norms included): one scalar through
    which every gradient path flows."""
    g = torch.Generator().manual_seed(gen_seed)
    outs = [r.output, r.h_n, r.norms, r.penalty, *r.terms]
    if r.c_n is not None:
        outs.append(r.c_n)
    if r.cell_norms is not None:
        outs.append(r.cell_norms)
    return sum((o.double() * torch.randn(o.shape, generator=g, dtype=DT)).sum() for o in outs)


def _values_and_grads(backend, cell, ins, pen, **kw):
    leaves = _leaves(ins)
    r = _run(backend, cell, leaves, pen, **kw)
    live = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(_scalar(r), live, allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(live, grads)]
    vals = [r.output, r.h_n, r.c_n, r.norms, r.cell_norms, *r.terms, r.penalty]
    return [None if v is None else v.detach() for v in vals], grads


def _assert_same(a, b, rtol=1e-10, atol=1e-12):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert (u is None) == (v is None), i
        if u is not None:
            assert u.shape == v.shape and u.dtype == v.dtype, (i, u.shape, v.shape)
            torch.testing.assert_close(u, v, rtol=rtol, atol=atol, msg=lambda m: f"#{i}: {m}")


# ----------------------------------------------------------------------------- gradcheck

@pytest.mark.parametrize("cell", ["normprop", "lstm"])
def test_gradcheck_reference_new_terms_and_normprop(cell):
    """float64 gradcheck of every output (norms, cell norms, the five terms) with respect to
    x_proj, w_hh, h0, c0 and (normprop) cell_scale, with lengths, reverse and the initial
    step in both norm-stabilizers."""
    T, B, H = 4, 3, 3
    ins = _inputs(cell, T, B, H, seed=1)
    pen = Penalties(**ALL, ns_include_initial=True)
    lengths = torch.tensor([4, 2, 3])
    leaves = [t.detach().clone().requires_grad_(True) for t in ins if t is not None]

    def f(*args):
        it = iter(args)
        full = [next(it), next(it), next(it), next(it), next(it) if cell == "normprop" else None]
        r = _run("reference", cell, full, pen, lengths=lengths, reverse=True)
        return _scalar(r)
    assert torch.autograd.gradcheck(f, tuple(leaves), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_reference_norm_target_plain_cell():
    T, B, H = 3, 3, 5
    ins = _inputs("tanh", T, B, H, seed=2)
    pen = Penalties(norm_target=0.8, norm_target_value=0.5, norm_stabilizer=0.4)
    leaves = [t.detach().clone().requires_grad_(True) for t in ins[:3]]

    def f(x, w, h0):
        return _scalar(_run("reference", "tanh", [x, w, h0, None, None], pen,
                            lengths=torch.tensor([3, 1, 2])))
    assert torch.autograd.gradcheck(f, tuple(leaves), eps=1e-6, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------- vs naive

CASES = [  # (T, B, H, lengths, reverse, ns_include_initial)
    (7, 3, 5, None, False, False),
    (7, 3, 5, [4, 7, 1], True, True),
    (6, 3, 5, [6, 2, 5], False, True),
    (5, 3, 5, None, True, False),
    (1, 3, 5, None, False, True),
    (1, 3, 5, None, True, False),
]


@pytest.mark.parametrize("cell", ["normprop", "lstm"])
@pytest.mark.parametrize("T,B,H,lengths,reverse,incl", CASES)
def test_reference_matches_naive(cell, T, B, H, lengths, reverse, incl):
    ins = _inputs(cell, T, B, H, seed=T + 3 * int(reverse))
    mask = torch.rand(B, H, generator=torch.Generator().manual_seed(5), dtype=DT) + 0.5
    pen = Penalties(**ALL, ns_include_initial=incl, ar_mask=mask)
    lengths = None if lengths is None else torch.tensor(lengths)
    ref = _values_and_grads("reference", cell, ins, pen, lengths=lengths, reverse=reverse)
    nai = _values_and_grads("naive", cell, ins, pen, lengths=lengths, reverse=reverse)
    _assert_same(ref[0] + ref[1], nai[0] + nai[1])
    cn = ref[0][4]
    assert cn is not None and cn.shape == (T + 1, B) and cn.dtype == DT
    if lengths is not None:  # 0 past each row's length
        for b, n in enumerate(lengths.tolist()):
            assert torch.all(cn[n + 1:, b] == 0) and torch.all(ref[0][3][n + 1:, b] == 0)


@pytest.mark.parametrize("cell", ["normprop", "lstm", "tanh"])
def test_zero_norm_states_with_zero_eps(cell):
    """Zero initial states and ns_eps = 0: the norms are exactly 0 there, the radial terms
    contribute 0, and reference and naive agree with finite gradients."""
    T, B, H = 4, 3, 5
    ins = _inputs(cell, T, B, H, seed=11, zero_state=True)
    if cell == "tanh":
        ins[0] = ins[0].clone()
        ins[0][:, 1] = 0.0  # row 1 stays at exactly 0 for every step
    kw = dict(ALL) if cell != "tanh" else {k: v for k, v in ALL.items()
                                          if k != "cell_norm_stabilizer"}
    pen = Penalties(**kw, ns_include_initial=True, ns_eps=0.0)
    ref = _values_and_grads("reference", cell, ins, pen, lengths=torch.tensor([4, 2, 3]))
    nai = _values_and_grads("naive", cell, ins, pen, lengths=torch.tensor([4, 2, 3]))
    assert torch.all(ref[0][3][0] == 0)
    if cell == "tanh":
        assert torch.all(ref[0][3][:, 1] == 0)
    else:
        assert torch.all(ref[0][4][0] == 0)
    for t in ref[1]:
        assert torch.isfinite(t).all()
    _assert_same(ref[0] + ref[1], nai[0] + nai[1])


def test_normprop_with_unit_scales_is_the_lstm_exactly():
    T, B, H = 5, 3, 5
    ins = _inputs("lstm", T, B, H, seed=4)
    pen = Penalties(**ALL)
    lengths = torch.tensor([5, 2, 4])
    for backend in ("reference", "naive"):
        lstm = _values_and_grads(backend, "lstm", ins, pen, lengths=lengths, reverse=True)
        np_ins = ins[:4] + [torch.ones(H, dtype=DT)]
        npr = _values_and_grads(backend, "normprop", np_ins, pen, lengths=lengths,
                                reverse=True, h_scale=1.0)
        for a, b in zip(lstm[0] + lstm[1], npr[0] + npr[1][:4]):
            assert torch.equal(a, b)


def test_cell_scale_any_float_dtype_grad_flows_back():
    T, B, H = 3, 2, 4
    ins = _inputs("normprop", T, B, H, seed=6, dtype=torch.float32)
    a16 = ins[4].to(torch.bfloat16).requires_grad_(True)
    x, w, h0, c0 = ins[:4]
    r = recurrence(x, w, h0, c0, cell="normprop", cell_scale=a16, h_scale=2.0,
                   penalties=Penalties(norm_target=1.0))
    (r.output.sum() + r.penalty).backward()
    assert a16.grad is not None and a16.grad.dtype == torch.bfloat16
    assert torch.isfinite(a16.grad.float()).all() and a16.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- custom penalty

def _relative_ns(norms):
    """The paper's relative form: sum ((n_t - n_{t-1}) / n_{t-1})^2."""
    return (((norms[1:] - norms[:-1]) / norms[:-1]) ** 2).sum()


def _custom_grads(backend, cell, ins, lengths, reverse):
    leaves = _leaves(ins)
    r = _run(backend, cell, leaves, Penalties(tar=0.5), lengths=lengths, reverse=reverse)
    n = r.norms
    if lengths is not None:  # only each row's valid steps
        T = n.shape[0] - 1
        keep = torch.arange(T + 1).unsqueeze(1) <= lengths.view(1, -1)
        n = torch.where(keep, n, torch.ones_like(n))
    loss = _relative_ns(n) + r.output.sum() + r.penalty
    live = [t for t in leaves if t is not None]
    return [loss.detach()] + list(torch.autograd.grad(loss, live))


@pytest.mark.parametrize("cell", ["lstm", "tanh"])
@pytest.mark.parametrize("lengths,reverse", [(None, False), ([5, 2, 4], True)])
def test_custom_norm_penalty_same_grads_on_every_backend(cell, lengths, reverse):
    T, B, H = 5, 3, 5
    ins = _inputs(cell, T, B, H, seed=8)
    lengths = None if lengths is None else torch.tensor(lengths)
    ref = _custom_grads("reference", cell, ins, lengths, reverse)
    for backend in ("naive", "native"):
        _assert_same(_custom_grads(backend, cell, ins, lengths, reverse), ref)


def test_custom_norm_penalty_triton_interpreter_matches_reference():
    """The interim triton wrapper folds grad_norms into grad_output as the radial term."""
    import os
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton runs on the CPU only under TRITON_INTERPRET=1")
    T, B, H = 3, 2, 4
    ins = _inputs("tanh", T, B, H, seed=9)
    lengths = torch.tensor([3, 2])
    ref = _custom_grads("reference", "tanh", ins, lengths, True)
    _assert_same(_custom_grads("triton", "tanh", ins, lengths, True), ref)
    pen = Penalties(norm_target=0.7, norm_target_value=0.3, norm_stabilizer=0.5,
                    ns_include_initial=True)
    a = _values_and_grads("triton", "tanh", ins, pen, lengths=lengths)
    b = _values_and_grads("reference", "tanh", ins, pen, lengths=lengths)
    _assert_same(a[0] + a[1], b[0] + b[1])


@pytest.mark.parametrize("cell", ["lstm", "relu"])
def test_native_norm_target_matches_reference(cell):
    T, B, H = 6, 3, 5
    ins = _inputs(cell, T, B, H, seed=10)
    if cell == "relu":
        ins[0] = ins[0] + 0.3
    pen = Penalties(norm_stabilizer=0.7, tar=0.9, ar=1.3, norm_target=0.6,
                    norm_target_value=0.9, ns_include_initial=True)
    for lengths, reverse in ((None, False), (torch.tensor([6, 2, 4]), True)):
        ref = _values_and_grads("reference", cell, ins, pen, lengths=lengths, reverse=reverse)
        nat = _values_and_grads("native", cell, ins, pen, lengths=lengths, reverse=reverse)
        _assert_same(nat[0] + nat[1], ref[0] + ref[1])


def test_activation_penalties_norm_target_and_differentiable_norms():
    g = torch.Generator().manual_seed(12)
    T, B, H = 5, 3, 4
    out = torch.randn(T, B, H, generator=g, dtype=DT, requires_grad=True)
    h0 = torch.randn(B, H, generator=g, dtype=DT, requires_grad=True)
    pen = Penalties(norm_target=0.5, norm_target_value=1.5, tar=0.2)
    penalty, terms, norms = rk.activation_penalties(out, pen, h0)
    assert terms._fields == TERM_NAMES and terms.cell_norm_stabilizer.item() == 0.0
    n = torch.sqrt((out.detach() ** 2).sum(-1) + H * 1e-9)
    torch.testing.assert_close(terms.norm_target, 0.5 * ((n - 1.5) ** 2).mean())
    loss = penalty + _relative_ns(norms)
    g1 = torch.autograd.grad(loss, [out, h0])
    o2, h2 = out.detach().clone().requires_grad_(), h0.detach().clone().requires_grad_()
    n2 = torch.sqrt((torch.cat([h2.unsqueeze(0), o2]) ** 2).sum(-1) + H * 1e-9)
    loss2 = (0.2 * (o2[1:] - o2[:-1]).pow(2).mean() + 0.5 * ((n2[1:] - 1.5) ** 2).mean()
             + _relative_ns(n2))
    g2 = torch.autograd.grad(loss2, [o2, h2])
    _assert_same(list(g1), list(g2))
    with pytest.raises(ValueError, match="cell_norm_stabilizer.*memory cells"):
        rk.activation_penalties(out, Penalties(cell_norm_stabilizer=1.0), h0)


# ----------------------------------------------------------------------------- values

def _lstm_loop(x, w, h0, c0):
    """A direct transcription of the LSTM: (hs [T+1, B, H], cs [T+1, B, H]) incl. h0, c0."""
    H = w.shape[1]
    h, c, hs, cs = h0, c0, [h0], [c0]
    for t in range(x.shape[0]):
        z = x[t] + h @ w.t()
        i, f, gg, o = (torch.sigmoid(z[:, :H]), torch.sigmoid(z[:, H:2 * H]),
                       torch.tanh(z[:, 2 * H:3 * H]), torch.sigmoid(z[:, 3 * H:]))
        c = f * c + i * gg
        h = o * torch.tanh(c)
        hs.append(h)
        cs.append(c)
    return torch.stack(hs), torch.stack(cs)


@pytest.mark.parametrize("backend", ["reference", "naive"])
def test_new_term_values_match_direct_formulas(backend):
    T, B, H = 6, 3, 5
    x, w, h0, c0, _ = _inputs("lstm", T, B, H, seed=13)
    pen = Penalties(cell_norm_stabilizer=2.0, norm_target=3.0, norm_target_value=0.4)
    r = recurrence(x, w, h0, c0, cell="lstm", penalties=pen, backend=backend)
    hs, cs = _lstm_loop(x, w, h0, c0)
    m = torch.sqrt((cs ** 2 + 1e-9).sum(-1))
    n = torch.sqrt((hs ** 2 + 1e-9).sum(-1))
    torch.testing.assert_close(r.terms.cell_norm_stabilizer,
                               2.0 * ((m[2:] - m[1:-1]) ** 2).mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(r.terms.norm_target, 3.0 * ((n[1:] - 0.4) ** 2).mean(),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(r.cell_norms, m, rtol=1e-12, atol=0)
    torch.testing.assert_close(r.penalty, sum(r.terms), rtol=1e-12, atol=0)
    assert r.terms.norm_stabilizer.item() == r.terms.tar.item() == r.terms.ar.item() == 0.0
    ri = recurrence(x, w, h0, c0, cell="lstm", backend=backend,
                    penalties=Penalties(cell_norm_stabilizer=2.0, ns_include_initial=True))
    torch.testing.assert_close(ri.terms.cell_norm_stabilizer,
                               2.0 * ((m[1:] - m[:-1]) ** 2).mean(), rtol=1e-12, atol=0)
    # T = 1 without the initial step: an empty sum is 0, not NaN
    r1 = recurrence(x[:1], w, h0, c0, cell="lstm", penalties=pen, backend=backend)
    assert r1.terms.cell_norm_stabilizer.item() == 0.0


def test_cell_norms_only_when_asked():
    T, B, H = 3, 2, 4
    x, w, h0, c0, a = _inputs("normprop", T, B, H)
    r = recurrence(x, w, h0, c0, cell="normprop", cell_scale=a)
    assert r.cell_norms is None
    r = recurrence(x, w, h0, c0, cell="normprop", cell_scale=a, cell_norms=True)
    assert r.cell_norms.shape == (T + 1, B)
    r = recurrence(x, w, h0, c0, cell="normprop", cell_scale=a,
                   penalties=Penalties(cell_norm_stabilizer=1.0))
    assert r.cell_norms is not None and r.terms.cell_norm_stabilizer.item() > 0


def test_double_backward_through_norms_normprop():
    T, B, H = 3, 2, 2
    ins = _inputs("normprop", T, B, H, seed=14)
    pen = Penalties(norm_stabilizer=0.5, cell_norm_stabilizer=0.5, norm_target=0.5)
    leaves = tuple(t.detach().clone().requires_grad_(True) for t in ins)

    def f(x, w, h0, c0, a):
        r = _run("reference", "normprop", [x, w, h0, c0, a], pen, lengths=torch.tensor([3, 2]))
        return _relative_ns(r.norms) + r.penalty + (r.cell_norms ** 2).sum() + r.output.sum()
    assert torch.autograd.gradgradcheck(f, leaves, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_torch_func_grad_and_vmap_normprop():
    from torch.func import grad, vmap
    T, B, H = 3, 2, 3
    x, w, h0, c0, a = _inputs("normprop", T, B, H, seed=15)
    pen = Penalties(norm_target=0.5, cell_norm_stabilizer=0.5)

    def loss(a, x):
        r = recurrence(x, w, h0, c0, cell="normprop", cell_scale=a, h_scale=1.3,
                       penalties=pen, backend="reference")
        return r.penalty + _relative_ns(r.norms) + r.output.sum()
    xs = torch.stack([x, x * 0.5])
    got = vmap(grad(loss), in_dims=(None, 0))(a, xs)
    for i in range(2):
        ai = a.clone().requires_grad_(True)
        want = torch.autograd.grad(loss(ai, xs[i]), ai)[0]
        torch.testing.assert_close(got[i], want, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- choice, errors

def test_native_refuses_normprop_and_cell_norms_and_auto_skips_it():
    x, w, h0, c0, a = _inputs("normprop", 3, 2, 4)
    with pytest.raises(BackendUnavailableError, match="normprop.*cuDNN / ATen"):
        recurrence(x, w, h0, c0, cell="normprop", cell_scale=a, backend="native")
    with pytest.raises(BackendUnavailableError, match="cell norms.*do not expose"):
        recurrence(x, w, h0, c0, cell="lstm", cell_norms=True, backend="native")
    with pytest.raises(BackendUnavailableError, match="cell norms"):
        recurrence(x, w, h0, c0, cell="lstm", backend="native",
                   penalties=Penalties(cell_norm_stabilizer=1.0))
    spec = Spec("normprop", 1.0, 0.0, 0.0, 0.0, False, 1e-9, False, h_scale=2.0)
    assert resolve_backend("auto", spec, x, w) == "reference"
    spec = Spec("lstm", 1.0, 0.0, 0.0, 0.0, False, 1e-9, False, cell_norms=True)
    assert resolve_backend("auto", spec, x, w) == "reference"
    spec = Spec("lstm", 1.0, 0.0, 0.0, 0.0, False, 1e-9, False)
    assert resolve_backend("auto", spec, x, w) == "native"
    # native does run differentiable hidden norms and norm_target
    r = recurrence(x, w, h0, c0, cell="lstm", backend="native",
                   penalties=Penalties(norm_target=1.0))
    assert r.norms.requires_grad is False and r.terms.norm_target.item() > 0


def test_fused_wrappers_refuse_normprop_and_cell_norms():
    # (the cuda kernels run both since issue12-cuda: tests/test_cuda_build.py)
    from rnnreg_kernels import triton
    x, w, _, _, _ = _inputs("lstm", 3, 2, 4)
    for mod, where in ((triton, "Triton kernels"),):
        spec = Spec("normprop", 1.0, 0.0, 0.0, 0.0, False, 1e-9, False, h_scale=2.0)
        assert f"not yet in the {where}" in mod.unsupported_reason(spec, x, w)
        spec = Spec("lstm", 1.0, 0.0, 0.0, 0.0, False, 1e-9, False, cell_norms=True)
        assert f"not yet in the {where}" in mod.unsupported_reason(spec, x, w)


def _np_args():
    x, w, h0, c0, a = _inputs("normprop", 3, 2, 4, dtype=torch.float32)
    return dict(x_proj=x, w_hh=w, h0=h0, c0=c0, cell="normprop", cell_scale=a.float(),
                h_scale=1.5)


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda a: {**a, "cell_scale": None}, ValueError,
     r"cell_scale: the normprop cell needs its per-unit scale \[H\].*got None"),
    (lambda a: {**a, "cell_scale": a["cell_scale"][:3]}, ValueError,
     r"cell_scale: expected shape \[H\] = \[4\], got \[3\]"),
    (lambda a: {**a, "cell_scale": torch.ones(4, dtype=torch.int64)}, TypeError,
     r"cell_scale: expected a floating dtype.*got torch.int64"),
    (lambda a: {**a, "cell_scale": [1.0] * 4}, TypeError,
     r"cell_scale: expected a \[H\] = \[4\] floating tensor, got list"),
    (lambda a: {**a, "h_scale": 0.0}, ValueError, r"h_scale: expected a positive finite number.*got 0.0"),
    (lambda a: {**a, "h_scale": float("nan")}, ValueError, r"h_scale: expected a positive finite"),
    (lambda a: {**a, "h_scale": True}, TypeError, r"h_scale: expected a positive finite number, got bool"),
    (lambda a: {**a, "c0": None}, ValueError, r"c0: the normprop cell needs an initial cell state"),
    (lambda a: {**a, "cell": "lstm"}, ValueError,
     r"cell_scale: only the normprop cell takes a cell scale; expected None for cell 'lstm'"),
    (lambda a: {**a, "cell": "lstm", "cell_scale": None}, ValueError,
     r"h_scale: only the normprop cell takes an output scale; expected 1.0 for cell 'lstm', got 1.5"),
    (lambda a: {**a, "cell_norms": 1}, TypeError, r"cell_norms: expected a bool, got int"),
])
def test_bad_normprop_arguments_name_what_is_wrong(mutate, exc, match):
    a = mutate(_np_args())
    with pytest.raises(exc, match=match):
        recurrence(a.pop("x_proj"), a.pop("w_hh"), a.pop("h0"), a.pop("c0"), **a)


def test_cell_norms_on_plain_cells_name_the_cells():
    x, w, h0, _, _ = _inputs("tanh", 3, 2, 4)
    with pytest.raises(ValueError, match=r"cell_norms: only the cells with a cell state "
                                         r"\(lstm, normprop\).*cell 'tanh'"):
        recurrence(x, w, h0, cell="tanh", cell_norms=True)
    with pytest.raises(ValueError, match=r"penalties.cell_norm_stabilizer: only the cells with "
                                         r"a cell state \(lstm, normprop\).*got 1.0"):
        recurrence(x, w, h0, cell="tanh", penalties=Penalties(cell_norm_stabilizer=1.0))


@pytest.mark.parametrize("kwargs, match", [
    (dict(cell_norm_stabilizer=-1.0), "cell_norm_stabilizer.*non-negative"),
    (dict(norm_target=float("inf")), "norm_target.*finite"),
    (dict(norm_target="1"), "norm_target.*number"),
    (dict(norm_target_value=float("nan")), "norm_target_value: expected a finite number"),
    (dict(norm_target_value=None), "norm_target_value: expected a finite number"),
])
def test_penalties_new_fields_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Penalties(**kwargs)


def test_penalties_new_fields_appended_and_defaults():
    p = Penalties(1.0, 2.0, 3.0, True, 1e-6, None, 4.0, 5.0, 6.0)
    assert (p.cell_norm_stabilizer, p.norm_target, p.norm_target_value) == (4.0, 5.0, 6.0)
    d = Penalties()
    assert d.norm_target_value == 5.0 and not d.active
    assert Penalties(norm_target=1.0).active and Penalties(cell_norm_stabilizer=1.0).active
    assert TERM_NAMES == ("norm_stabilizer", "tar", "ar", "cell_norm_stabilizer",
                          "norm_target")
