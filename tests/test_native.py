"""The ``native`` backend and the fused penalty op ``activation_penalties``.

* ``recurrence(..., backend="native")`` against ``reference`` in float64: every output, norms,
  terms and every gradient under random upstream gradients, forward and reverse, with lengths,
  ``ns_include_initial`` and ``ar_mask``; T = 1, odd B and H.
* ``activation_penalties`` against the post-hoc formulas (``penalties.posthoc_terms``) and by
  ``gradcheck`` / ``gradgradcheck``; its CPU code against its Triton kernels (interpreter on
  the CPU: conftest sets TRITON_INTERPRET=1) in float64, float32, float16, with strided input
  and H larger than one block; zero-norm states; bad input.
* auto's choice, and the module path's call structure (one ``_VF`` call per layer or stack).
"""
import itertools

import pytest
import torch

import rnnreg_kernels as rk
from rnnreg_kernels import native
from rnnreg_kernels.nn import native_path as native_modules
from rnnreg_kernels.contract import Spec
from rnnreg_kernels.ops import BackendUnavailableError, resolve_backend
from rnnreg_kernels.penalties import Penalties, hidden_norms, posthoc_terms, step_mask

DT = torch.float64
COEF = dict(norm_stabilizer=0.7, tar=0.9, ar=1.3)


def _recurrence_run(backend, cell, T, B, H, pen, lengths, reverse, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = 4 if cell == "lstm" else 1
    x = torch.randn(T, B, G * H, generator=g, dtype=DT).requires_grad_()
    w = (torch.randn(G * H, H, generator=g, dtype=DT) * 0.4).requires_grad_()
    h0 = torch.randn(B, H, generator=g, dtype=DT).requires_grad_()
    c0 = torch.randn(B, H, generator=g, dtype=DT).requires_grad_() if cell == "lstm" else None
    r = rk.recurrence(x, w, h0, c0, cell=cell, penalties=pen, lengths=lengths,
                      reverse=reverse, backend=backend)
    outs = [r.output, r.h_n] + ([r.c_n] if c0 is not None else []) + list(r.terms)
    gu = torch.Generator().manual_seed(99)
    loss = sum((o * torch.randn(o.shape, generator=gu, dtype=DT)).sum() for o in outs)
    leaves = [x, w, h0] + ([c0] if c0 is not None else [])
    return [o.detach() for o in outs] + [r.norms], list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("cell", ["lstm", "relu", "tanh"])
@pytest.mark.parametrize("T,B,H", [(7, 3, 5), (1, 3, 5), (2, 1, 4)])
def test_recurrence_native_matches_reference(cell, T, B, H):
    for incl, mask, lens, rev in itertools.product([False, True], repeat=4):
        m = torch.rand(B, H, generator=torch.Generator().manual_seed(3), dtype=DT) + 0.5
        pen = Penalties(**COEF, ns_include_initial=incl, ar_mask=m if mask else None)
        lengths = torch.tensor(([max(1, (T + 1) // 2), T, 1] * B)[:B]) if lens else None
        ref, ref_g = _recurrence_run("reference", cell, T, B, H, pen, lengths, rev)
        got, got_g = _recurrence_run("native", cell, T, B, H, pen, lengths, rev)
        for a, b in zip(ref + ref_g, got + got_g):
            assert a.shape == b.shape and a.dtype == b.dtype
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_recurrence_native_gradcheck_lstm_reverse_lengths():
    g = torch.Generator().manual_seed(5)
    T, B, H = 4, 3, 3
    x = torch.randn(T, B, 4 * H, generator=g, dtype=DT, requires_grad=True)
    w = (torch.randn(4 * H, H, generator=g, dtype=DT) * 0.4).requires_grad_()
    h0 = torch.randn(B, H, generator=g, dtype=DT, requires_grad=True)
    c0 = torch.randn(B, H, generator=g, dtype=DT, requires_grad=True)
    pen = Penalties(**COEF, ns_include_initial=True)
    lengths = torch.tensor([2, 4, 1])

    def f(x, w, h0, c0):
        r = rk.recurrence(x, w, h0, c0, cell="lstm", penalties=pen, lengths=lengths,
                          reverse=True, backend="native")
        return r.output, r.h_n, r.c_n, r.penalty
    assert torch.autograd.gradcheck(f, (x, w, h0, c0))


def test_native_refuses_trec_and_auto_knows():
    x, w, h0 = torch.randn(3, 2, 4), torch.randn(4, 4), torch.randn(2, 4)
    with pytest.raises(BackendUnavailableError, match="trec"):
        rk.recurrence(x, w, h0, cell="trec", backend="native")
    spec = Spec("trec", 1.0, 0.0, 0.0, 0.0, False, 1e-9, False)
    assert resolve_backend("auto", spec, x, w) == "reference"
    for cell in ("lstm", "relu", "tanh"):
        G = 4 if cell == "lstm" else 1
        spec = Spec(cell, 1.0, 0.0, 0.0, 0.0, False, 1e-9, False)
        assert resolve_backend("auto", spec, torch.randn(3, 2, 4 * G), torch.randn(4 * G, 4)) \
            == "native"


def test_auto_env_override(monkeypatch):
    monkeypatch.setenv("RNNREG_BACKEND", "reference")
    spec = Spec("lstm", 1.0, 0.0, 0.0, 0.0, False, 1e-9, False)
    assert resolve_backend("auto", spec, torch.randn(3, 2, 16), torch.randn(16, 4)) \
        == "reference"


# ----------------------------------------------------------------------------- penalty op

def _oracle(states, h0, pen, lengths):
    """Published formulas: terms [5] and norms [T+1, B] (zeros past each length)."""
    terms = posthoc_terms(h0, states, pen, lengths)
    with torch.no_grad():
        n = hidden_norms(torch.cat([h0.unsqueeze(0), states], 0), pen.ns_eps)
        valid = step_mask(states.shape[0], lengths, states.shape[1])
        n[1:] = torch.where(valid, n[1:], 0.0)
    return terms, n


PEN_CASES = [  # (penalties kwargs, mask, lengths)
    (dict(norm_stabilizer=0.7), False, False),
    (dict(tar=0.9), False, False),
    (dict(ar=1.3), False, False),
    (dict(COEF), False, False),
    (dict(COEF, ns_include_initial=True), True, True),
    (dict(COEF), True, True),
    (dict(COEF, norm_target=0.6, norm_target_value=1.5), False, True),
]


@pytest.mark.parametrize("kwargs,mask,lens", PEN_CASES)
@pytest.mark.parametrize("T,B,H", [(7, 3, 5), (1, 3, 5), (2, 2, 3)])
def test_activation_penalties_matches_posthoc(kwargs, mask, lens, T, B, H):
    g = torch.Generator().manual_seed(T * 10 + B)
    out = torch.randn(T, B, H, generator=g, dtype=DT)
    h0 = torch.randn(B, H, generator=g, dtype=DT)
    m = torch.rand(B, H, generator=g, dtype=DT) + 0.5 if mask else None
    pen = Penalties(**kwargs, ar_mask=m)
    lengths = torch.tensor(([max(1, T - 1), T, 1] * B)[:B]) if lens else None
    if lengths is not None:  # garbage past the lengths must be ignored
        for b, n in enumerate(lengths.tolist()):
            out[n:, b] = 1e3
    a, ha = out.clone().requires_grad_(), h0.clone().requires_grad_()
    penalty, terms, norms = rk.activation_penalties(a, pen, ha, lengths)
    o, ho = out.clone().requires_grad_(), h0.clone().requires_grad_()
    t_ref, n_ref = _oracle(o, ho, pen, lengths)
    torch.testing.assert_close(torch.stack(list(terms)), t_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(penalty, t_ref.sum(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(norms, n_ref, rtol=1e-12, atol=1e-14)
    up = torch.tensor([0.3, -1.1, 0.7, 0.0, 1.9], dtype=DT)
    ga = torch.autograd.grad((torch.stack(list(terms)) * up).sum(), [a, ha], allow_unused=True)
    go = torch.autograd.grad((t_ref * up).sum(), [o, ho], allow_unused=True)
    for x, y in zip(ga, go):
        x = torch.zeros_like(y) if x is None else x
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-13)


def test_activation_penalties_gradcheck_and_gradgradcheck():
    g = torch.Generator().manual_seed(2)
    T, B, H = 5, 3, 4
    out = torch.randn(T, B, H, generator=g, dtype=DT, requires_grad=True)
    h0 = torch.randn(B, H, generator=g, dtype=DT, requires_grad=True)
    mask = torch.rand(B, H, generator=g, dtype=DT) + 0.5
    lengths = torch.tensor([3, 5, 1])
    for pen in (Penalties(**COEF, ns_include_initial=True, ar_mask=mask), Penalties(**COEF)):
        def f(o, h):
            p, t, _ = rk.activation_penalties(o, pen, h, lengths)
            return p, t.norm_stabilizer, t.tar, t.ar
        assert torch.autograd.gradcheck(f, (out, h0))
        assert torch.autograd.gradgradcheck(lambda o, h: f(o, h)[0], (out, h0))


def test_reverse_route_matches_flipped_posthoc():
    """The in-place reverse pass (the native backend's second direction) equals the formulas
    on each row's reversed states, norms in processing order."""
    from rnnreg_kernels.penalties import to_processing_order
    g = torch.Generator().manual_seed(4)
    T, B, H = 6, 3, 5
    out = torch.randn(T, B, H, generator=g, dtype=DT, requires_grad=True)
    h0 = torch.randn(B, H, generator=g, dtype=DT, requires_grad=True)
    for lengths in (None, torch.tensor([4, 6, 1])):
        pen = Penalties(**COEF, ns_include_initial=True)
        terms, norms = native.penalty_pass(out, h0, pen, lengths, reverse=True)
        t_ref, n_ref = _oracle(to_processing_order(out, lengths, True), h0, pen, lengths)
        torch.testing.assert_close(terms, t_ref, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(norms, n_ref, rtol=1e-12, atol=1e-14)
        ga = torch.autograd.grad(terms.sum(), [out, h0])
        go = torch.autograd.grad(t_ref.sum(), [out, h0])
        for x, y in zip(ga, go):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-13)


def test_zero_norm_states_give_finite_gradients():
    out = torch.zeros(4, 2, 3, dtype=DT, requires_grad=True)
    h0 = torch.zeros(2, 3, dtype=DT, requires_grad=True)
    pen = Penalties(**COEF, ns_include_initial=True, ns_eps=0.0)
    p, _, norms = rk.activation_penalties(out, pen, h0)
    assert p.item() == 0 and torch.equal(norms, torch.zeros_like(norms))
    g = torch.autograd.grad(p, [out, h0], allow_unused=True)
    assert all(t is None or (torch.isfinite(t).all() and t.abs().max() == 0) for t in g)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5),
                                       (torch.float16, 3e-3)])
def test_triton_kernels_match_cpu_code(monkeypatch, dtype, tol):
    pytest.importorskip("triton")
    from rnnreg_kernels.triton import unavailable_reason
    if unavailable_reason(torch.device("cpu")) is not None:
        pytest.skip("triton cannot run on the CPU here (TRITON_INTERPRET unset)")
    cases = [((7, 3, 5), COEF, False, False, False),
             ((1, 3, 5), dict(COEF, norm_target=0.5), True, True, True),
             ((4, 5, 300), dict(COEF, ns_include_initial=True), True, True, False),
             ((3, 2, 6), dict(tar=1.0), False, True, True)]
    for (T, B, H), kw, mask, lens, strided in cases:
        g = torch.Generator().manual_seed(T + H)
        base = torch.randn(T, B, 2 * H if strided else H, generator=g, dtype=DT)
        h0 = torch.randn(B, H, generator=g, dtype=DT)
        m = torch.rand(B, H, generator=g, dtype=DT) + 0.5 if mask else None
        lengths = torch.tensor(([max(1, T - 1), 1, T] * B)[:B]) if lens else None
        results = []
        for impl in ("torch", "triton"):
            monkeypatch.setattr(native, "FORCE_IMPL", impl)
            b = base.to(dtype).requires_grad_()
            s = b[..., H:] if strided else b  # a bidirectional output's second half
            h = h0.to(dtype).requires_grad_()
            pen = Penalties(**kw, ar_mask=None if m is None else m.to(dtype))
            for rev in (False, True):
                terms, norms = native.penalty_pass(s, h, pen, lengths, reverse=rev)
                up = torch.tensor([0.3, -1.1, 0.7, 0.0, 0.4], dtype=terms.dtype)
                loss = (terms * up).sum() + 0.1 * (norms ** 2).sum()  # + the radial term
                gs, gh = torch.autograd.grad(loss, [b, h], allow_unused=True)
                results.append([terms.detach(), norms.detach(), gs,
                                torch.zeros_like(h) if gh is None else gh])
        half = len(results) // 2
        for got, ref in zip(results[half:], results[:half]):
            for x, y in zip(got, ref):
                assert x.dtype == y.dtype and x.shape == y.shape
                scale = y.double().abs().max().clamp(min=1e-30)
                assert ((x.double() - y.double()).abs().max() / scale).item() <= tol


def test_activation_penalties_bad_input():
    out = torch.randn(3, 2, 4)
    with pytest.raises(ValueError, match=r"output: expected 3 dimensions"):
        rk.activation_penalties(out[0], Penalties(ar=1.0))
    with pytest.raises(TypeError, match="output: expected float16"):
        rk.activation_penalties(out.long(), Penalties(ar=1.0))
    with pytest.raises(ValueError, match=r"h0: expected shape \[B, H\] = \[2, 4\]"):
        rk.activation_penalties(out, Penalties(ar=1.0), torch.zeros(3, 4))
    with pytest.raises(TypeError, match="h0: expected dtype torch.float32"):
        rk.activation_penalties(out, Penalties(ar=1.0), torch.zeros(2, 4, dtype=DT))
    with pytest.raises(ValueError, match=r"lengths: every length must be in 1..T = 1..3"):
        rk.activation_penalties(out, Penalties(ar=1.0), lengths=[0, 3])
    with pytest.raises(ValueError, match=r"ar_mask: expected shape \[B, H\] = \[2, 4\]"):
        rk.activation_penalties(out, Penalties(ar=1.0, ar_mask=torch.ones(2, 5)))
    with pytest.raises(TypeError, match="penalties: expected rnnreg_kernels.Penalties"):
        rk.activation_penalties(out, {"ar": 1.0})
    p, terms, norms = rk.activation_penalties(out, None)  # nothing on: zeros, norms still
    assert p.item() == 0 and norms.shape == (4, 2)


def test_activation_penalties_under_nn_gru_float32():
    """Any RNN's output: nn.GRU + the op, gradient equal to post-hoc autograd in float32."""
    torch.manual_seed(0)
    gru = torch.nn.GRU(3, 6)
    x = torch.randn(5, 4, 3)
    pen = Penalties(**COEF)
    out, _ = gru(x)
    p, _, _ = rk.activation_penalties(out, pen)
    g1 = torch.autograd.grad(p, list(gru.parameters()))
    out, _ = gru(x)
    g2 = torch.autograd.grad(posthoc_terms(torch.zeros(4, 6), out, pen).sum(),
                             list(gru.parameters()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- modules

def _count_vf(monkeypatch):
    calls = []
    real = native_modules.vf_call

    def counting(*args, **kwargs):
        calls.append(args[5])  # num_layers of the call
        return real(*args, **kwargs)
    monkeypatch.setattr(native_modules, "vf_call", counting)
    return calls


@pytest.mark.parametrize("layers,bi,penalty_layers,expect", [
    (1, True, "last", [1]), (3, False, "last", [3]), (2, True, "all", [1, 1])])
def test_module_native_call_structure(monkeypatch, layers, bi, penalty_layers, expect):
    monkeypatch.delenv("RNNREG_BACKEND", raising=False)
    calls = _count_vf(monkeypatch)
    m = rk.LSTM(3, 4, layers, bidirectional=bi, tar=1.0, penalty_layers=penalty_layers,
                dtype=DT)
    m(torch.randn(5, 2, 3, dtype=DT))
    assert calls == expect
    D = 2 if bi else 1
    seen = [n is not None for n in m.hidden_norms]
    assert seen == ([False] * (layers - 1) * D + [True] * D if penalty_layers == "last"
                    else [True] * layers * D)


def test_module_trec_auto_uses_reference(monkeypatch):
    monkeypatch.delenv("RNNREG_BACKEND", raising=False)
    calls = _count_vf(monkeypatch)
    m = rk.RNN(3, 4, nonlinearity="trec", ar=1.0)
    m(torch.randn(4, 2, 3))
    assert calls == []
    m.backend = "native"
    with pytest.raises(BackendUnavailableError, match="trec"):
        m(torch.randn(4, 2, 3))


def test_module_native_float32_close_to_reference():
    torch.manual_seed(3)
    a = rk.LSTM(5, 7, 2, bidirectional=True, norm_stabilizer=1.0, tar=1.0, ar=2.0,
                backend="native")
    b = rk.LSTM(5, 7, 2, bidirectional=True, norm_stabilizer=1.0, tar=1.0, ar=2.0,
                backend="reference")
    b.load_state_dict(a.state_dict())
    x = torch.randn(6, 3, 5)
    outs = []
    for m in (a, b):
        out, (h, c) = m(x)
        loss = out.square().mean() + m.penalty
        grads = torch.autograd.grad(loss, list(m.parameters()))
        outs.append([out, h, c, m.penalty, *grads])
    for u, v in zip(*outs):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)
