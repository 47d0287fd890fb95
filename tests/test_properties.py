"""Property tests (hypothesis): recurrence() on every CPU-runnable backend agrees with the
others in float64 on random shapes and options, and the modules agree with torch.nn on
random configurations (issue 10, item 9).  The "ci" profile (tests/conftest.py) keeps a
small fixed budget; ``--hypothesis-profile=long`` runs many more examples locally.  Failing
examples found are kept below as @example regressions."""
import os

import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from rnnreg_kernels import LSTM, RNN, Penalties, recurrence  # noqa: E402

DT = torch.float64


@st.composite
def cases(draw, max_t=12, max_b=6, max_h=24):
    cell = draw(st.sampled_from(["lstm", "relu", "tanh", "trec"]))
    T = draw(st.integers(1, max_t))
    B = draw(st.integers(1, max_b))
    H = draw(st.integers(1, max_h))
    coef = st.sampled_from([0.0, 0.3, 1.7])
    pen = dict(norm_stabilizer=draw(coef), tar=draw(coef), ar=draw(coef),
               ns_include_initial=draw(st.booleans()))
    lengths = draw(st.none() | st.lists(st.integers(1, T), min_size=B, max_size=B))
    return dict(cell=cell, T=T, B=B, H=H, pen=pen, lengths=lengths,
                reverse=draw(st.booleans()), mask=draw(st.booleans()),
                seed=draw(st.integers(0, 2 ** 16)))


def _inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    G = 4 if c["cell"] == "lstm" else 1
    T, B, H = c["T"], c["B"], c["H"]
    shift = {"lstm": 0.0, "tanh": 0.0, "relu": 0.1, "trec": 1.0}[c["cell"]]
    ins = [torch.randn(T, B, G * H, generator=g, dtype=DT) + shift,
           torch.randn(G * H, H, generator=g, dtype=DT) / max(H, 1) ** 0.5,
           torch.randn(B, H, generator=g, dtype=DT).abs() + 0.1]
    if c["cell"] == "lstm":
        ins.append(torch.randn(B, H, generator=g, dtype=DT))
    mask = ((torch.rand(B, H, generator=g, dtype=DT) < 0.6).to(DT) / 0.6) if c["mask"] \
        else None
    ups = torch.Generator().manual_seed(c["seed"] + 1)
    return ins, Penalties(**c["pen"], ar_mask=mask), ups


def _everything(backend, c):
    ins, pen, ups = _inputs(c)
    ins = [t.requires_grad_(True) for t in ins]
    r = recurrence(*ins, cell=c["cell"], penalties=pen, lengths=c["lengths"],
                   reverse=c["reverse"], backend=backend, theta=0.8)
    outs = [r.output, r.h_n, *r.terms, r.penalty] + ([r.c_n] if c["cell"] == "lstm" else [])
    loss = sum((o * torch.randn(o.shape, generator=ups, dtype=DT)).sum() for o in outs)
    grads = torch.autograd.grad(loss, ins)
    return [o.detach() for o in outs] + [r.norms] + list(grads)


def _agree(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10)


_CORNER = dict(T=1, B=1, H=1, pen=dict(norm_stabilizer=1.7, tar=1.7, ar=1.7,
                                      ns_include_initial=True),
               lengths=None, reverse=True, mask=True, seed=0)


@given(cases())
@example(dict(_CORNER, cell="lstm"))
@example(dict(_CORNER, cell="trec", T=3, B=2, lengths=[1, 3]))
@example(dict(_CORNER, cell="relu", T=2, B=3, H=5, lengths=[1, 1, 1], reverse=False))
def test_reference_agrees_with_naive(c):
    _agree(_everything("reference", c), _everything("naive", c))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="triton on the CPU needs TRITON_INTERPRET=1 (tests/conftest.py)")
@settings(max_examples=4)  # the interpreter takes seconds per case
@given(cases(max_t=5, max_b=4, max_h=9))
def test_triton_agrees_with_reference(c):
    _agree(_everything("triton", c), _everything("reference", c))


@st.composite
def module_configs(draw):
    kind = draw(st.sampled_from(["lstm", "tanh", "relu"]))
    return dict(kind=kind, I=draw(st.integers(1, 6)), H=draw(st.integers(1, 9)),
                layers=draw(st.integers(1, 2)), bidirectional=draw(st.booleans()),
                batch_first=draw(st.booleans()), bias=draw(st.booleans()),
                T=draw(st.integers(1, 7)), B=draw(st.integers(1, 4)),
                seed=draw(st.integers(0, 2 ** 16)))


@given(module_configs())
def test_modules_agree_with_torch_nn(c):
    torch.manual_seed(c["seed"])
    kw = dict(num_layers=c["layers"], bidirectional=c["bidirectional"],
              batch_first=c["batch_first"], bias=c["bias"])
    if c["kind"] == "lstm":
        ref, ours = nn.LSTM(c["I"], c["H"], **kw), LSTM(c["I"], c["H"], **kw)
    else:
        ref = nn.RNN(c["I"], c["H"], nonlinearity=c["kind"], **kw)
        ours = RNN(c["I"], c["H"], nonlinearity=c["kind"], **kw)
    ref, ours = ref.to(DT), ours.to(DT)
    ours.load_state_dict(ref.state_dict())
    shape = (c["B"], c["T"], c["I"]) if c["batch_first"] else (c["T"], c["B"], c["I"])
    x = torch.randn(shape, dtype=DT)
    res = []
    for m in (ref, ours):
        xi = x.clone().requires_grad_(True)
        out, h = m(xi)
        flat = [out] + (list(h) if isinstance(h, tuple) else [h])
        g = torch.Generator().manual_seed(1)
        loss = sum((t * torch.randn(t.shape, generator=g, dtype=DT)).sum() for t in flat)
        res.append([t.detach() for t in flat]
                   + list(torch.autograd.grad(loss, [xi] + list(m.parameters()))))
    _agree(*res)
