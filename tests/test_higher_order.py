"""Higher-order gradients (create_graph=True, double backward, gradgradcheck) through
recurrence() on every CPU-runnable backend and through the modules (issue 10, item 1)."""
import pytest
import torch
from torch import nn

import rnnreg_kernels
from rnnreg_kernels import LSTM, RNN, recurrence
from rnnreg_kernels.check import H_SCALE, THETA, make_cell_scale, make_inputs

LSTM_TYPE = ("lstm", "normprop")


def _fn(backend, cell, pen, lengths, reverse):
    extra = {"theta": THETA} if cell == "trec" else {}

    def f(*ins):
        if cell == "normprop":
            *ins, a = ins
            extra.update(cell_scale=a, h_scale=H_SCALE)
        r = recurrence(*ins, cell=cell, penalties=pen, lengths=lengths, reverse=reverse,
                       backend=backend, **extra)
        outs = [r.output, r.h_n] + ([r.c_n] if cell in LSTM_TYPE else [])
        outs += [r.norms] + ([r.cell_norms] if r.cell_norms is not None else [])
        return tuple(outs) + tuple(r.terms) + (r.penalty,)
    return f


def _inputs(cell, steps, config, seed=0):
    x, w, h0, c0, pen, lengths, reverse = make_inputs(cell, steps, config,
                                                      torch.device("cpu"), seed)
    ins = [x, w, h0] + ([c0] if cell in LSTM_TYPE else [])
    if cell == "normprop":
        ins.append(make_cell_scale(cell, torch.device("cpu"), seed))
    return [t.clone().requires_grad_(True) for t in ins], pen, lengths, reverse


@pytest.mark.parametrize("cell", ["lstm", "relu", "tanh", "trec", "normprop"])
@pytest.mark.parametrize("steps, config", [(3, "all5+initial+mask+lengths+reverse"),
                                           (1, "ns+tar+ar")])
def test_gradgradcheck_reference(cell, steps, config):
    ins, pen, lengths, reverse = _inputs(cell, steps, config)
    f = _fn("reference", cell, pen, lengths, reverse)
    assert torch.autograd.gradgradcheck(f, ins, fast_mode=True, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend, cell", [("naive", "lstm")])
def test_gradgradcheck_other_cpu_backends(backend, cell):
    """(Triton under the interpreter is too slow for gradgradcheck's many calls: its double
    backward is checked against naive by test_create_graph_matches_naive.)"""
    ins, pen, lengths, reverse = _inputs(cell, 2, "all5+initial+mask+lengths+reverse")
    f = _fn(backend, cell, pen, lengths, reverse)
    with rnnreg_kernels.higher_order_grads():
        assert torch.autograd.gradgradcheck(f, ins, fast_mode=True, atol=1e-6, rtol=1e-4)


def _hvp(backend, cell, ctxmgr=None):
    """grad of sum(grad^2) (a gradient penalty) w.r.t. the inputs, via create_graph."""
    ins, pen, lengths, reverse = _inputs(cell, 4, "ns+tar+ar", seed=1)
    f = _fn(backend, cell, pen, lengths, reverse)
    gen = torch.Generator().manual_seed(3)
    with ctxmgr or rnnreg_kernels.higher_order_grads():
        outs = f(*ins)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
    grads = torch.autograd.grad(loss, ins, create_graph=True)
    gp = sum((g * g).sum() for g in grads)
    return [g.detach() for g in grads], torch.autograd.grad(gp, ins)


@pytest.mark.parametrize("cell, backends", [("lstm", ["reference"]),
                                            ("tanh", ["reference", "triton"])])
def test_create_graph_matches_naive(cell, backends):
    g_ref, h_ref = _hvp("naive", cell)
    for backend in backends:
        g, h = _hvp(backend, cell)
        for a, b in zip(g + list(h), g_ref + list(h_ref)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_reference_needs_no_context_manager():
    import contextlib
    g, h = _hvp("reference", "lstm", contextlib.nullcontext())
    assert all(torch.isfinite(t).all() for t in h)


def test_fused_backend_without_context_says_what_to_do():
    import contextlib
    with pytest.raises(RuntimeError, match="higher_order_grads"):
        _hvp("triton", "tanh", contextlib.nullcontext())


def test_module_gradient_penalty_matches_nn_lstm():
    """A gradient penalty through two stacked LSTM layers: d/dparams of ||dL/dparams||^2."""
    torch.manual_seed(0)
    ref = nn.LSTM(3, 5, 2).double()
    ours = LSTM(3, 5, 2).double()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    res = []
    for m in (ref, ours):
        out, (h, c) = m(x)
        loss = (out * out).sum() + h.sum() + c.sum()
        ps = list(m.parameters())
        gs = torch.autograd.grad(loss, ps, create_graph=True)
        res.append(torch.autograd.grad(sum((g * g).sum() for g in gs), ps))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_module_double_backward_with_penalties_matches_naive():
    torch.manual_seed(0)
    ms = [RNN(3, 5, nonlinearity="tanh", tar=1.0, ar=0.5, norm_stabilizer=2.0,
              backend=b).double() for b in ("reference", "naive")]
    ms[1].load_state_dict(ms[0].state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    res = []
    for m in ms:
        out, h = m(x)
        loss = out.sum() + m.penalty
        ps = list(m.parameters())
        gs = torch.autograd.grad(loss, ps, create_graph=True)
        res.append(torch.autograd.grad(sum((g * g).sum() for g in gs), ps))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
