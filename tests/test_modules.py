"""The drop-in modules against torch.nn.LSTM / nn.RNN in float64.

Every comparison loads one state_dict into both modules, runs the same input, and compares
outputs, final states and the gradients of the input, the initial state and every parameter
under random upstream gradients.  Penalties are checked against ``posthoc_terms`` applied to
the hidden states that torch.nn produces (layer by layer where more than the last layer is
penalized).
"""
import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from rnnreg_kernels.nn import IRNN, LSTM, RNN
from rnnreg_kernels.penalties import (TERM_NAMES, Penalties, hidden_norms, posthoc_terms,
                                      to_processing_order)

DT = torch.float64
TOL = dict(rtol=1e-9, atol=1e-11)


@pytest.fixture(autouse=True, params=["native", "reference"])
def backend(request, monkeypatch):
    """Every test runs twice: ``auto`` as it resolves on the CPU (``native``; ``reference``
    for trec) and ``auto`` forced to ``reference`` through ``RNNREG_BACKEND``."""
    if request.param == "reference":
        monkeypatch.setenv("RNNREG_BACKEND", "reference")
    else:
        monkeypatch.delenv("RNNREG_BACKEND", raising=False)
    return request.param


def _pair(kind, *args, load="ref_to_ours", **kwargs):
    """(torch.nn module, our module) in float64 with identical weights."""
    ours_extra = kwargs.pop("extra", {})
    if kind == "lstm":
        ref, ours = nn.LSTM(*args, **kwargs), LSTM(*args, **kwargs, **ours_extra)
    else:
        ref = nn.RNN(*args, nonlinearity=kind, **kwargs)
        ours = RNN(*args, nonlinearity=kind, **kwargs, **ours_extra)
    ref, ours = ref.to(DT), ours.to(DT)
    if load == "ref_to_ours":
        ours.load_state_dict(ref.state_dict())
    else:
        ref.load_state_dict(ours.state_dict())
    return ref, ours


def _flat(result):
    """Module result -> list of tensors (PackedSequence -> its data)."""
    out, hidden = result
    out = out.data if isinstance(out, PackedSequence) else out
    return [out] + (list(hidden) if isinstance(hidden, tuple) else [hidden])


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def _run(module, x, hx, grads, packed_lengths=None, enforce_sorted=True, extra_loss=None):
    """Forward + backward with upstream ``grads``; returns (outputs, grads of x, hx, params)."""
    x, hx = _leaf(x), (tuple(_leaf(h) for h in hx) if isinstance(hx, tuple) else _leaf(hx))
    inp = x
    if packed_lengths is not None:
        inp = pack_padded_sequence(x, packed_lengths, batch_first=module.batch_first,
                                   enforce_sorted=enforce_sorted)
    result = module(inp, hx)
    outs = _flat(result)
    loss = sum((o * g).sum() for o, g in zip(outs, grads))
    if extra_loss is not None:
        loss = loss + extra_loss(module, result)
    leaves = [x] + (list(hx) if isinstance(hx, tuple) else ([hx] if hx is not None else []))
    params = dict(module.named_parameters())
    got = torch.autograd.grad(loss, leaves + list(params.values()))
    return result, outs, got[:len(leaves)], dict(zip(params, got[len(leaves):]))


def _assert_same(ref, ours, x, hx=None, packed_lengths=None, enforce_sorted=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        shapes = [o.shape for o in _flat(ref(
            pack_padded_sequence(x, packed_lengths, batch_first=ref.batch_first,
                                 enforce_sorted=enforce_sorted)
            if packed_lengths is not None else x, hx))]
    grads = [torch.randn(s, generator=gen, dtype=DT) for s in shapes]
    r_res, r_out, r_in, r_par = _run(ref, x, hx, grads, packed_lengths, enforce_sorted)
    o_res, o_out, o_in, o_par = _run(ours, x, hx, grads, packed_lengths, enforce_sorted)
    assert len(r_out) == len(o_out)
    for a, b in zip(r_out, o_out):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(b, a, **TOL)
    for a, b in zip(r_in, o_in):
        torch.testing.assert_close(b, a, **TOL)
    assert r_par.keys() == o_par.keys()
    for name in r_par:
        torch.testing.assert_close(o_par[name], r_par[name], **TOL, msg=name)
    return r_res, o_res


CONFIGS = [  # (kind, layers, bidirectional, batch_first, T, B, H, with_hx)
    ("lstm", 1, False, False, 5, 3, 5, False),
    ("lstm", 2, True, False, 4, 3, 5, True),
    ("lstm", 2, False, True, 1, 1, 3, True),
    ("lstm", 1, True, True, 6, 2, 4, False),
    ("tanh", 2, True, False, 5, 3, 5, True),
    ("tanh", 1, False, True, 1, 3, 5, False),
    ("relu", 2, False, False, 6, 3, 5, True),
    ("relu", 1, True, True, 3, 5, 7, True),
    ("lstm", 1, False, False, 3, 3, 50, True),
]


@pytest.mark.parametrize("kind,layers,bi,bf,T,B,H,with_hx", CONFIGS)
def test_matches_torch(kind, layers, bi, bf, T, B, H, with_hx):
    torch.manual_seed(1)
    ref, ours = _pair(kind, 4, H, layers, batch_first=bf, bidirectional=bi,
                      load="ours_to_ref" if layers == 2 else "ref_to_ours")
    x = torch.randn((B, T, 4) if bf else (T, B, 4), dtype=DT)
    hx = None
    if with_hx:
        shape = (layers * (2 if bi else 1), B, H)
        hx = torch.randn(shape, dtype=DT)
        hx = (hx, torch.randn(shape, dtype=DT)) if kind == "lstm" else hx
    _assert_same(ref, ours, x, hx)


@pytest.mark.parametrize("kind", ["lstm", "tanh"])
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("bf", [False, True])
def test_packed_matches_torch(kind, enforce_sorted, bf):
    torch.manual_seed(2)
    ref, ours = _pair(kind, 3, 5, 2, batch_first=bf, bidirectional=True)
    lengths = torch.tensor([6, 5, 3, 1]) if enforce_sorted else torch.tensor([3, 6, 1, 5])
    x = torch.randn((4, 6, 3) if bf else (6, 4, 3), dtype=DT)
    hx = torch.randn(4, 4, 5, dtype=DT)
    hx = (hx, torch.randn(4, 4, 5, dtype=DT)) if kind == "lstm" else hx
    r_res, o_res = _assert_same(ref, ours, x, hx, lengths, enforce_sorted)
    r_pack, o_pack = r_res[0], o_res[0]
    assert isinstance(o_pack, PackedSequence)
    assert torch.equal(o_pack.batch_sizes, r_pack.batch_sizes)
    for name in ("sorted_indices", "unsorted_indices"):
        a, b = getattr(r_pack, name), getattr(o_pack, name)
        assert (a is None and b is None) or torch.equal(a, b)
    padded, _ = pad_packed_sequence(o_pack, batch_first=bf)
    assert padded.shape[:2] == x.shape[:2]


@pytest.mark.parametrize("kind", ["lstm", "relu"])
@pytest.mark.parametrize("bf", [False, True])
def test_unbatched_matches_torch(kind, bf):
    torch.manual_seed(3)
    ref, ours = _pair(kind, 4, 5, 2, batch_first=bf, bidirectional=True)
    x = torch.randn(5, 4, dtype=DT)
    _assert_same(ref, ours, x)
    hx = torch.randn(4, 5, dtype=DT)
    hx = (hx, torch.randn(4, 5, dtype=DT)) if kind == "lstm" else hx
    r_res, o_res = _assert_same(ref, ours, x, hx)
    assert o_res[0].shape == (5, 10)


def test_float32_default_dtype_close_to_torch():
    torch.manual_seed(14)
    ref, ours = nn.LSTM(4, 6, 2, bidirectional=True), LSTM(4, 6, 2, bidirectional=True)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 4)
    out, (h, c) = ours(x)
    r_out, (r_h, r_c) = ref(x)
    assert out.dtype == torch.float32
    for a, b in ((out, r_out), (h, r_h), (c, r_c)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_state_dict_and_constructor_compat():
    ref = nn.LSTM(4, 6, 2, False, True, 0.0, True)  # positional, as nn.LSTM accepts them
    ours = LSTM(4, 6, 2, False, True, 0.0, True)
    assert [(k, v.shape) for k, v in ref.state_dict().items()] == \
        [(k, v.shape) for k, v in ours.state_dict().items()]
    ours.load_state_dict(ref.state_dict())
    ref.load_state_dict(ours.state_dict())
    assert ours.bias is False and ours.batch_first is True and ours.bidirectional is True
    assert [[p.shape for p in w] for w in ours.all_weights] == \
        [[p.shape for p in w] for w in ref.all_weights]
    rnn_ref, rnn = nn.RNN(3, 5, 2, "relu", True), RNN(3, 5, 2, "relu", True)
    assert rnn.nonlinearity == "relu"
    assert list(rnn.state_dict()) == list(rnn_ref.state_dict())
    rnn_ref.load_state_dict(rnn.state_dict())
    irnn = IRNN(3, 5, bidirectional=True)
    nn.RNN(3, 5, nonlinearity="relu", bidirectional=True).load_state_dict(irnn.state_dict())
    assert "LSTM(4, 6, num_layers=2, bias=False" in repr(ours)


def test_irnn_init_and_forward():
    torch.manual_seed(4)
    m = IRNN(6, 40, 2, identity_scale=0.5, init_std=0.01, dtype=DT)
    for layer in range(2):
        torch.testing.assert_close(getattr(m, f"weight_hh_l{layer}"),
                                   0.5 * torch.eye(40, dtype=DT), rtol=0, atol=0)
        assert not getattr(m, f"bias_ih_l{layer}").any()
        assert not getattr(m, f"bias_hh_l{layer}").any()
        std = getattr(m, f"weight_ih_l{layer}").std().item()
        assert 0.007 < std < 0.013
    assert m.nonlinearity == "relu"
    assert torch.equal(IRNN(3, 4).weight_hh_l0, torch.eye(4))
    ref = nn.RNN(6, 40, 2, nonlinearity="relu").to(DT)
    ref.load_state_dict(m.state_dict())
    _assert_same(ref, m, torch.randn(4, 3, 6, dtype=DT))


def test_trec_matches_manual_loop():
    torch.manual_seed(5)
    m = RNN(3, 5, nonlinearity="trec", theta=0.3, dtype=DT)
    x, h = torch.randn(6, 3, 3, dtype=DT), torch.randn(1, 3, 5, dtype=DT)
    out, h_n = m(x, h)
    state, expect = h[0], []
    for t in range(6):
        z = x[t] @ m.weight_ih_l0.T + m.bias_ih_l0 + m.bias_hh_l0 + state @ m.weight_hh_l0.T
        state = z * (z > 0.3)
        expect.append(state)
    torch.testing.assert_close(out, torch.stack(expect), **TOL)
    torch.testing.assert_close(h_n[0], state, **TOL)
    assert (out == 0).any() and (out != 0).any()


# ------------------------------------------------------------------------------ penalties

def _torch_layer_outputs(ref, x, h0, c0=None):
    """Per-layer time-major outputs of a (not batch_first) nn.LSTM/nn.RNN, layer by layer."""
    D = 2 if ref.bidirectional else 1
    outs, inp = [], x
    for layer in range(ref.num_layers):
        if isinstance(ref, nn.LSTM):
            single = nn.LSTM(inp.shape[-1], ref.hidden_size, bidirectional=ref.bidirectional)
        else:
            single = nn.RNN(inp.shape[-1], ref.hidden_size, nonlinearity=ref.nonlinearity,
                            bidirectional=ref.bidirectional)
        single = single.to(DT)
        for name, p in single.named_parameters():
            setattr(single, name, getattr(ref, name.replace("_l0", f"_l{layer}")))
        sl = slice(layer * D, (layer + 1) * D)
        out, _ = single(inp, (h0[sl], c0[sl]) if c0 is not None else h0[sl])
        outs.append(out)
        inp = out
    return outs


def _expected_terms(outs, h0, pen, layers, H, lengths=None):
    """Sum over ``layers`` of the direction-mean of posthoc_terms on nn's outputs."""
    D = outs[0].shape[-1] // H
    total = 0
    for layer in layers:
        for d in range(D):
            states = to_processing_order(outs[layer][..., d * H:(d + 1) * H], lengths, d == 1)
            p = pen
            if pen.ar_mask is not None and pen.ar_mask.shape[1] == D * H:
                p = dataclasses.replace(pen, ar_mask=pen.ar_mask[:, d * H:(d + 1) * H])
            total = total + posthoc_terms(h0[layer * D + d], states, p, lengths) / D
    return total


@pytest.mark.parametrize("kind,layers,bi,which,include", [
    ("lstm", 1, False, "last", False),
    ("lstm", 1, True, "last", True),
    ("lstm", 2, True, "all", False),
    ("lstm", 2, False, "last", True),
    ("tanh", 2, True, "all", True),
    ("relu", 2, False, "last", False),
])
def test_penalties_against_torch_outputs(kind, layers, bi, which, include):
    """Values and gradients of the penalties vs posthoc_terms on nn.LSTM/nn.RNN outputs (every
    term but the memory-cell norm-stabilizer, which needs the cell states: test_normprop)."""
    torch.manual_seed(6)
    coeffs = dict(norm_stabilizer=0.7, tar=1.3, ar=0.4, norm_target=0.6, norm_target_value=1.2)
    ref, ours = _pair(kind, 3, 5, layers, bidirectional=bi,
                      extra=dict(coeffs, ns_include_initial=include, penalty_layers=which))
    D, T, B = 2 if bi else 1, 5, 3
    x = torch.randn(T, B, 3, dtype=DT)
    h0 = torch.randn(layers * D, B, 5, dtype=DT)
    c0 = torch.randn(layers * D, B, 5, dtype=DT) if kind == "lstm" else None
    pen = Penalties(**coeffs, ns_include_initial=include)
    g_terms = torch.tensor([1.7, -0.6, 2.1, 0.9, -1.3], dtype=DT)
    g_out = torch.randn(T, B, D * 5, dtype=DT)
    penalized = range(layers) if which == "all" else [layers - 1]

    leaves_ref = [_leaf(t) for t in (x, h0, c0) if t is not None]
    outs = _torch_layer_outputs(ref, *leaves_ref)
    expect = _expected_terms(outs, leaves_ref[1], pen, penalized, 5)
    loss_ref = (outs[-1] * g_out).sum() + (expect * g_terms).sum()
    grads_ref = torch.autograd.grad(loss_ref, leaves_ref + list(ref.parameters()))

    leaves = [_leaf(t) for t in (x, h0, c0) if t is not None]
    hx = (leaves[1], leaves[2]) if kind == "lstm" else leaves[1]
    out, _ = ours(leaves[0], hx)
    got = torch.stack([ours.penalty_terms[n] for n in TERM_NAMES])
    torch.testing.assert_close(got, expect.detach(), **TOL)
    on = [TERM_NAMES.index(n) for n in ("norm_stabilizer", "tar", "ar", "norm_target")]
    assert all(expect[on] > 0) and expect[TERM_NAMES.index("cell_norm_stabilizer")] == 0
    torch.testing.assert_close(ours.penalty, got.sum(), **TOL)
    assert ours.penalty.dim() == 0 and ours.penalty.dtype == DT
    loss = (out * g_out).sum() + (got * g_terms).sum()
    grads = torch.autograd.grad(loss, leaves + list(ours.parameters()))
    for a, b in zip(grads_ref, grads):
        torch.testing.assert_close(b, a, **TOL)


@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_penalties_packed_with_ar_mask(enforce_sorted):
    """Ragged rows (one of length 1), reverse direction from each row's end, AR mask rows in
    the caller's order, penalty gradients, hidden_norms."""
    torch.manual_seed(7)
    coeffs = dict(norm_stabilizer=0.5, tar=0.9, ar=1.1, norm_target=0.7, norm_target_value=0.4)
    ref, ours = _pair("lstm", 3, 4, 1, bidirectional=True, extra=coeffs)
    T, B, H = 5, 4, 4
    lengths = torch.tensor([5, 4, 2, 1]) if enforce_sorted else torch.tensor([2, 5, 1, 4])
    x = torch.randn(T, B, 3, dtype=DT)
    mask = (torch.rand(B, 2 * H, dtype=DT) > 0.3).to(DT) / 0.7
    pen = Penalties(**coeffs, ar_mask=mask)
    g_terms = torch.tensor([0.8, 1.4, -0.5, 0.3, 1.6], dtype=DT)
    grads = {}
    for name, module in (("ref", ref), ("ours", ours)):
        xl = _leaf(x)
        packed = pack_padded_sequence(xl, lengths, enforce_sorted=enforce_sorted)
        if name == "ref":
            out, (h_n, _) = module(packed)
            padded, _ = pad_packed_sequence(out, total_length=T)
            terms = _expected_terms([padded], torch.zeros(2, B, H, dtype=DT), pen, [0], H,
                                    lengths)
        else:
            out, (h_n, _) = module(packed, ar_mask=mask)
            terms = torch.stack([module.penalty_terms[n] for n in TERM_NAMES])
        loss = (terms * g_terms).sum() + h_n.sum()
        grads[name] = (terms.detach(), torch.autograd.grad(loss, [xl] + list(module.parameters())))
    torch.testing.assert_close(grads["ours"][0], grads["ref"][0], **TOL)
    for a, b in zip(grads["ref"][1], grads["ours"][1]):
        torch.testing.assert_close(b, a, **TOL)
    # hidden_norms: [T+1, B] per direction, caller's row order, zero past each row's length,
    # in the graph (their gradient is tested in test_normprop)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    padded, _ = pad_packed_sequence(ref(packed)[0], total_length=T)
    assert len(ours.hidden_norms) == 2
    for d, norms in enumerate(ours.hidden_norms):
        states = to_processing_order(padded[..., d * H:(d + 1) * H], lengths, d == 1)
        expect = hidden_norms(torch.cat([torch.zeros(1, B, H, dtype=DT), states]), 1e-9)
        k = torch.arange(T + 1).view(-1, 1)
        expect = torch.where(k <= lengths.view(1, B), expect, torch.zeros_like(expect))
        assert norms.requires_grad and norms.shape == (T + 1, B)
        torch.testing.assert_close(norms, expect.detach(), **TOL)


def test_ar_mask_forms():
    torch.manual_seed(15)
    m = RNN(3, 4, bidirectional=True, ar=1.0, dtype=DT)
    x, mask = torch.randn(5, 2, 3, dtype=DT), torch.rand(2, 4, dtype=DT)
    m(x, ar_mask=mask)
    shared = m.penalty.item()
    m(x, ar_mask=torch.cat([mask, mask], 1))
    assert m.penalty.item() == pytest.approx(shared, rel=1e-12)
    m(x, ar_mask=torch.cat([mask, torch.zeros_like(mask)], 1))
    half = m.penalty.item()
    m(x)
    assert 0 < half < shared < m.penalty.item()
    m(x[:, :1], ar_mask=mask[:1])
    batched = m.penalty.item()
    m(x[:, 0], ar_mask=mask[0])
    assert m.penalty.item() == pytest.approx(batched, rel=1e-12)


def test_no_penalty_is_zero_and_addable(backend):
    ours = LSTM(3, 4, 2, dtype=DT)
    out, _ = ours(torch.randn(3, 2, 3, dtype=DT))
    assert ours.penalty.dim() == 0 and ours.penalty.dtype == DT and ours.penalty.item() == 0
    assert set(ours.penalty_terms) == set(TERM_NAMES)
    (out.sum() + ours.penalty).backward()
    assert len(ours.hidden_norms) == 2 and ours.hidden_norms[1].shape == (4, 2)
    if backend == "native":  # the stack ran as one call: the inner layer's states are unseen
        assert ours.hidden_norms[0] is None
    else:
        assert ours.hidden_norms[0].shape == (4, 2)
    ours32 = RNN(3, 4, ar=1.0)
    ours32(torch.randn(3, 2, 3))
    assert ours32.penalty.dtype == torch.float32 and ours32.penalty.item() > 0


def test_t1_penalties_empty_sums_are_zero():
    ours = RNN(3, 4, norm_stabilizer=1.0, tar=1.0, ar=1.0, dtype=DT)
    ours(torch.randn(1, 3, 3, dtype=DT))
    assert ours.penalty_terms["norm_stabilizer"].item() == 0
    assert ours.penalty_terms["tar"].item() == 0
    assert ours.penalty_terms["ar"].item() > 0
    assert torch.isfinite(ours.penalty)


# ------------------------------------------------------------------------------ gradcheck

def _gradcheck_module(module, x, state, make_input=lambda x: x):
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in module.parameters()]
    state = [s.detach().clone().requires_grad_(True) for s in state]

    def f(x, *rest):
        hx = tuple(rest[:len(state)])
        hx = hx if len(hx) == 2 else hx[0]
        out, hidden = torch.func.functional_call(
            module, dict(zip(names, rest[len(state):])), (make_input(x), hx))
        out = out.data if isinstance(out, PackedSequence) else out
        hidden = hidden if isinstance(hidden, tuple) else (hidden,)
        return (out,) + hidden + (module.penalty,)

    assert torch.autograd.gradcheck(f, (x.requires_grad_(True), *state, *params))


def test_gradcheck_lstm_bidirectional_penalties():
    torch.manual_seed(8)
    m = LSTM(2, 2, 2, bidirectional=True, norm_stabilizer=0.5, tar=0.7, ar=0.3,
             penalty_layers="all", ns_include_initial=True, dtype=DT)
    _gradcheck_module(m, torch.randn(3, 2, 2, dtype=DT),
                      [torch.randn(4, 2, 2, dtype=DT), torch.randn(4, 2, 2, dtype=DT)])


def test_gradcheck_rnn_packed_penalties():
    torch.manual_seed(9)
    m = RNN(2, 3, nonlinearity="tanh", bidirectional=True, norm_stabilizer=0.5, tar=0.7,
            ar=0.3, dtype=DT)
    lengths = torch.tensor([1, 4, 3])
    _gradcheck_module(m, torch.randn(4, 3, 2, dtype=DT), [torch.randn(2, 3, 3, dtype=DT)],
                      lambda x: pack_padded_sequence(x, lengths, enforce_sorted=False))


# ------------------------------------------------------------------------------ extras

class _AwdWeightDrop(nn.Module):
    """awd-lstm-lm's WeightDrop (non-variational), as written there."""

    def __init__(self, module, weights, dropout):
        super().__init__()
        self.module, self.weights, self.dropout = module, weights, dropout
        for name_w in weights:
            w = getattr(module, name_w)
            del module._parameters[name_w]
            module.register_parameter(name_w + "_raw", nn.Parameter(w.data))

    def forward(self, *args):
        for name_w in self.weights:
            raw_w = getattr(self.module, name_w + "_raw")
            setattr(self.module, name_w, F.dropout(raw_w, p=self.dropout, training=True))
        return self.module(*args)


def test_awd_weight_drop_attribute_replacement():
    torch.manual_seed(10)
    ref, ours = _pair("lstm", 3, 4)
    x = torch.randn(4, 2, 3, dtype=DT)
    wrapped = _AwdWeightDrop(ours, ["weight_hh_l0"], 0.5)
    for seed in (0, 1):
        torch.manual_seed(seed)
        out, _ = wrapped(x)
        torch.manual_seed(seed)
        dropped = F.dropout(ours.weight_hh_l0_raw, p=0.5, training=True)
        with torch.no_grad():
            ref.weight_hh_l0.copy_(dropped)
            expect, _ = ref(x)
        torch.testing.assert_close(out, expect, **TOL)
    out.sum().backward()
    assert ours.weight_hh_l0_raw.grad is not None and ours.weight_hh_l0_raw.grad.abs().sum() > 0
    ours.weight_hh_l0 = torch.zeros(16, 4, dtype=DT)  # plain attribute, read at forward
    with torch.no_grad():
        ref.weight_hh_l0.zero_()
    torch.testing.assert_close(ours(x)[0], ref(x)[0], **TOL)


def test_weight_drop_train_and_eval():
    torch.manual_seed(11)
    ref, ours = _pair("lstm", 3, 4, bidirectional=True, extra=dict(weight_drop=0.4))
    x = torch.randn(5, 2, 3, dtype=DT)
    ours.eval()
    torch.testing.assert_close(ours(x)[0], ref(x)[0], **TOL)
    ours.train()
    torch.manual_seed(3)
    out, _ = ours(x)
    assert not torch.allclose(out, ref(x)[0])
    torch.manual_seed(3)  # one mask per weight per forward, drawn in layer/direction order
    with torch.no_grad():
        for name in ("weight_hh_l0", "weight_hh_l0_reverse"):
            getattr(ref, name).copy_(F.dropout(getattr(ours, name), 0.4, True))
    torch.testing.assert_close(out, ref(x)[0], **TOL)


def test_dropout_between_layers():
    torch.manual_seed(12)
    ref, ours = _pair("tanh", 3, 4, 2, dropout=0.5)
    x = torch.randn(5, 2, 3, dtype=DT)
    ref.eval(), ours.eval()
    torch.testing.assert_close(ours(x)[0], ref(x)[0], **TOL)
    ours.train()
    first = _torch_layer_outputs(ref, x, torch.zeros(2, 2, 4, dtype=DT))[0]
    single = nn.RNN(4, 4).to(DT)
    for name, _ in single.named_parameters():
        setattr(single, name, getattr(ref, name.replace("_l0", "_l1")))
    torch.manual_seed(5)
    out, h_n = ours(x)
    torch.manual_seed(5)
    dropped = F.dropout(first, 0.5, True)
    assert not torch.equal(dropped, first)
    expect, _ = single(dropped)
    torch.testing.assert_close(out, expect, **TOL)  # no dropout after the last layer
    torch.testing.assert_close(h_n[1], expect[-1], **TOL)


def test_flatten_parameters_noop_and_backend_switch():
    torch.manual_seed(13)
    ref, ours = _pair("lstm", 3, 4, 2)
    x = torch.randn(4, 3, 3, dtype=DT)
    ptrs = [p.data_ptr() for p in ours.parameters()]
    assert ours.flatten_parameters() is None
    assert ptrs == [p.data_ptr() for p in ours.parameters()]
    expect = ref(x)[0]
    torch.testing.assert_close(ours(x)[0], expect, **TOL)
    ours.backend = "naive"
    torch.testing.assert_close(ours(x)[0], expect, **TOL)
    ours.backend = "no-such-backend"
    with pytest.raises((ValueError, RuntimeError), match="no-such-backend"):
        ours(x)


def test_deepcopy_after_forward():
    m = LSTM(3, 4, tar=1.0)
    m(torch.randn(3, 2, 3))
    assert m.penalty.requires_grad
    clone = copy.deepcopy(m)
    assert clone.penalty.item() == 0.0 and not clone.penalty.requires_grad
    torch.testing.assert_close(clone(torch.ones(2, 1, 3))[0], m(torch.ones(2, 1, 3))[0])


def test_empty_batch_like_torch():
    ref, ours = _pair("lstm", 3, 4, 2, bidirectional=True)
    out, (h, c) = ours(torch.randn(5, 0, 3, dtype=DT))
    r_out, (r_h, r_c) = ref(torch.randn(5, 0, 3, dtype=DT))
    assert out.shape == r_out.shape and h.shape == r_h.shape and c.shape == r_c.shape
    assert ours.penalty.item() == 0


# ------------------------------------------------------------------------------ errors

def _bad_calls():
    z = torch.zeros
    return {
        "input size": lambda m, lstm: m(z(3, 2, 3)),
        "rank 4": lambda m, lstm: m(z(3, 2, 5, 1)),
        "rank 1": lambda m, lstm: m(z(5)),
        "h shape": lambda m, lstm: m(z(3, 2, 5), (z(2, 3, 4), z(2, 2, 4)) if lstm else z(1, 2, 4)),
        "c shape": lambda m, lstm: m(z(3, 2, 5), (z(2, 2, 4), z(2, 2, 5)) if lstm else z(2, 2, 5)),
        "hx rank batched": lambda m, lstm: m(z(3, 2, 5),
                                             (z(2, 4), z(2, 2, 4)) if lstm else z(2, 4)),
        "hx rank unbatched": lambda m, lstm: m(z(3, 5), (z(2, 1, 4),) * 2 if lstm else z(2, 1, 4)),
        "unbatched h shape": lambda m, lstm: m(z(3, 5), (z(2, 3), z(2, 4)) if lstm else z(2, 3)),
        "dtype": lambda m, lstm: m(z(3, 2, 5, dtype=torch.float64)),
        "int input": lambda m, lstm: m(z(3, 2, 5, dtype=torch.int64)),
        "empty sequence": lambda m, lstm: m(z(0, 2, 5)),
    }


@pytest.mark.parametrize("lstm", [True, False])
@pytest.mark.parametrize("case", list(_bad_calls()))
def test_errors_match_torch(case, lstm):
    call = _bad_calls()[case]
    ref = nn.LSTM(5, 4, 2) if lstm else nn.RNN(5, 4, 2)
    ours = LSTM(5, 4, 2) if lstm else RNN(5, 4, 2)
    with pytest.raises(Exception) as expected:
        call(ref, lstm)
    with pytest.raises(expected.type) as got:
        call(ours, lstm)
    assert str(got.value) == str(expected.value)


def test_errors_beyond_torch():
    lstm = LSTM(5, 4)
    x = torch.zeros(3, 2, 5)
    with pytest.raises(RuntimeError, match=r"hx dtype \(torch.float64\) does not match input"):
        lstm(x, (torch.zeros(1, 2, 4, dtype=DT), torch.zeros(1, 2, 4)))
    packed = pack_padded_sequence(torch.zeros(3, 2, 3), torch.tensor([3, 2]))
    with pytest.raises(RuntimeError, match="Expected 5, got 3"):
        lstm(packed)
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(1, 2, 4\)"):
        lstm(pack_padded_sequence(torch.zeros(3, 2, 5), torch.tensor([3, 2])),
             (torch.zeros(1, 3, 4), torch.zeros(1, 3, 4)))
    with pytest.raises(ValueError, match=r"ar_mask: expected shape \[B, H\] = \[2, 4\]"):
        LSTM(5, 4, ar=1.0)(x, ar_mask=torch.ones(3, 4))
    with pytest.raises(ValueError, match="proj_size expected 0"):
        LSTM(5, 4, proj_size=2)
    with pytest.raises(ValueError, match="proj_size expected 0"):
        LSTM(5, 4, 1, True, False, 0.0, False, 3)
    with pytest.raises(ValueError, match="Unknown nonlinearity 'gelu'"):
        RNN(5, 4, nonlinearity="gelu")
    with pytest.raises(ValueError, match="dropout should be a number in range"):
        LSTM(5, 4, 2, dropout=1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="num_layers greater than 1"):
            RNN(5, 4, dropout=0.5)
    for kwargs, word in ((dict(tar=-1.0), "tar"), (dict(ar=float("nan")), "ar"),
                         (dict(norm_stabilizer="1"), "norm_stabilizer"),
                         (dict(penalty_layers="first"), "penalty_layers"),
                         (dict(weight_drop=1.0), "weight_drop"),
                         (dict(ns_include_initial=1), "ns_include_initial")):
        with pytest.raises(ValueError, match=word):
            LSTM(5, 4, **kwargs)
    with pytest.raises(ValueError, match="init_std"):
        IRNN(5, 4, init_std=-1.0)
    with pytest.raises(TypeError, match="hidden_size should be of type int"):
        RNN(5, 4.0)


def test_compatibility_names():
    """The modules moved into rnnreg_kernels.nn (one file per family); the old import paths
    still give the same classes, and ``native_modules`` is the very module the layers use."""
    import rnnreg_kernels
    from rnnreg_kernels import modules, native_modules
    from rnnreg_kernels.nn import base, native_path

    assert (modules.LSTM, modules.RNN, modules.IRNN) == \
        (rnnreg_kernels.LSTM, rnnreg_kernels.RNN, rnnreg_kernels.IRNN)
    assert native_modules is native_path and base.native_path is native_path
    assert issubclass(rnnreg_kernels.NormPropLSTM, base._RecurrentBase)


@pytest.mark.parametrize("cls", ["LSTM", "NormPropLSTM", "RNN", "IRNN"])
def test_every_extra_keyword_reaches_the_module(cls):
    """Each drop-in hands every keyword-only extra on to the shared base unchanged (the
    constructors forward them by name from one list, nn.base.EXTRA_KEYWORDS)."""
    import rnnreg_kernels
    from rnnreg_kernels.nn.base import EXTRA_KEYWORDS

    values = dict(norm_stabilizer=1.5, tar=0.25, ar=0.125, ns_include_initial=True,
                  ns_eps=1e-7, penalty_layers="all", weight_drop=0.2, backend="reference",
                  output_dropout=0.3, dropout_mode="locked", norm_target=0.75,
                  norm_target_value=2.5, cell_norm_stabilizer=0.5, track_cell_norms=True)
    assert set(values) == set(EXTRA_KEYWORDS)
    if cls in ("RNN", "IRNN"):  # no memory cell: those two must stay off
        values.update(cell_norm_stabilizer=0.0, track_cell_norms=False)
    m = getattr(rnnreg_kernels, cls)(3, 4, 2, **values)
    assert {k: getattr(m, k) for k in values} == values
