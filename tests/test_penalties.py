"""Penalty values against direct transcriptions of the published formulas, and Penalties checks."""
import math

import pytest
import torch

from rnnreg_kernels import Penalties, recurrence
from rnnreg_kernels.penalties import penalty_weights, posthoc_terms, to_processing_order

CELLS = ["lstm", "relu", "tanh", "trec"]


def _seed_ns(h, beta):
    """The seed's own norm-stabilizer code, verbatim in spirit."""
    hidden_norms = torch.sqrt(torch.sum(h ** 2 + 1e-9, -1))
    return beta * torch.mean((hidden_norms[1:] - hidden_norms[:-1]) ** 2)


def _awd_tar(out, beta):
    return beta * (out[1:] - out[:-1]).pow(2).mean()


def _awd_ar(out, alpha):
    return alpha * out.pow(2).mean()


def _inputs(cell, T, B, H, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    G = 4 if cell == "lstm" else 1
    x = torch.randn(T, B, G * H, generator=g, dtype=dtype)
    w = torch.randn(G * H, H, generator=g, dtype=dtype) * 0.4
    h0 = torch.randn(B, H, generator=g, dtype=dtype)
    c0 = torch.randn(B, H, generator=g, dtype=dtype) if cell == "lstm" else None
    return x, w, h0, c0


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("T", [1, 2, 7])
@pytest.mark.parametrize("backend", ["reference", "naive"])
def test_terms_match_published_formulas(cell, T, backend):
    B, H = 3, 5
    x, w, h0, c0 = _inputs(cell, T, B, H, seed=T)
    mask = torch.bernoulli(torch.full((B, H), 0.6, dtype=torch.float64)) / 0.6
    pen = Penalties(norm_stabilizer=3.0, tar=2.0, ar=1.5, ar_mask=mask)
    r = recurrence(x, w, h0, c0, cell=cell, penalties=pen, backend=backend)
    out = r.output
    if T == 1:
        assert r.terms.norm_stabilizer.item() == 0.0 and r.terms.tar.item() == 0.0
    else:
        torch.testing.assert_close(r.terms.norm_stabilizer, _seed_ns(out, 3.0), rtol=1e-12, atol=0)
        torch.testing.assert_close(r.terms.tar, _awd_tar(out, 2.0), rtol=1e-12, atol=0)
    torch.testing.assert_close(r.terms.ar, _awd_ar(out * mask, 1.5), rtol=1e-12, atol=0)
    torch.testing.assert_close(r.penalty, sum(r.terms), rtol=1e-12, atol=0)
    for t in (*r.terms, r.penalty):
        assert torch.isfinite(t)
    # the paper's formula: the initial state is part of the sequence
    r2 = recurrence(x, w, h0, c0, cell=cell, backend=backend,
                    penalties=Penalties(norm_stabilizer=3.0, ns_include_initial=True))
    full = torch.cat([h0.unsqueeze(0), r2.output], 0)
    torch.testing.assert_close(r2.terms.norm_stabilizer, _seed_ns(full, 3.0), rtol=1e-12, atol=0)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("backend", ["reference", "naive"])
def test_terms_with_lengths_count_only_valid_steps(reverse, backend):
    T, B, H = 6, 3, 5
    x, w, h0, _ = _inputs("tanh", T, B, H, seed=11)
    lengths = torch.tensor([6, 1, 4])
    pen = Penalties(norm_stabilizer=2.0, tar=1.0, ar=0.5)
    r = recurrence(x, w, h0, cell="tanh", penalties=pen, lengths=lengths, reverse=reverse,
                   backend=backend)
    ns_sum = tar_sum = ar_sum = 0.0
    ns_cnt = tar_cnt = ar_cnt = 0
    for b in range(B):
        L = int(lengths[b])
        seq = r.output[:L, b]  # positions 0..L-1
        if reverse:
            seq = seq.flip(0)  # processing order
        n = torch.sqrt(torch.sum(seq ** 2 + 1e-9, -1))
        ns_sum += ((n[1:] - n[:-1]) ** 2).sum()
        ns_cnt += L - 1
        tar_sum += ((seq[1:] - seq[:-1]) ** 2).sum()
        tar_cnt += (L - 1) * H
        ar_sum += (seq ** 2).sum()
        ar_cnt += L * H
        assert torch.all(r.output[L:, b] == 0)
    torch.testing.assert_close(r.terms.norm_stabilizer, 2.0 * ns_sum / ns_cnt, rtol=1e-12, atol=0)
    torch.testing.assert_close(r.terms.tar, 1.0 * tar_sum / tar_cnt, rtol=1e-12, atol=0)
    torch.testing.assert_close(r.terms.ar, 0.5 * ar_sum / ar_cnt, rtol=1e-12, atol=0)


def test_all_rows_length_one_gives_zero_temporal_terms():
    x, w, h0, _ = _inputs("relu", 4, 3, 5)
    r = recurrence(x, w, h0, cell="relu", lengths=[1, 1, 1],
                   penalties=Penalties(norm_stabilizer=1.0, tar=1.0, ar=1.0))
    assert r.terms.norm_stabilizer.item() == 0.0 and r.terms.tar.item() == 0.0
    assert r.terms.ar.item() > 0


@pytest.mark.parametrize("backend", ["reference", "naive"])
@pytest.mark.parametrize("cell", ["relu", "trec"])
def test_zero_states_give_finite_gradients(backend, cell):
    """relu/trec states that are exactly zero (norm sqrt(H*eps)) must not give NaN."""
    T, B, H = 5, 3, 4
    x = torch.full((T, B, H), -2.0, dtype=torch.float64, requires_grad=True)
    w = torch.eye(H, dtype=torch.float64).requires_grad_()
    h0 = torch.zeros(B, H, dtype=torch.float64, requires_grad=True)
    pen = Penalties(norm_stabilizer=1.0, tar=1.0, ar=1.0, ns_include_initial=True)
    r = recurrence(x, w, h0, cell=cell, penalties=pen, backend=backend)
    assert torch.all(r.output == 0)
    torch.testing.assert_close(r.norms, torch.full((T + 1, B), math.sqrt(H * 1e-9),
                                                   dtype=torch.float64))
    (r.penalty + r.output.sum()).backward()
    for t in (x, w, h0):
        assert torch.isfinite(t.grad).all()


def test_posthoc_terms_matches_module_free_formula_and_processing_order():
    T, B, H = 5, 2, 3
    g = torch.Generator().manual_seed(3)
    out = torch.randn(T, B, H, generator=g, dtype=torch.float64)
    h0 = torch.randn(B, H, generator=g, dtype=torch.float64)
    pen = Penalties(norm_stabilizer=1.0, tar=2.0, ar=3.0)
    t = posthoc_terms(h0, out, pen)
    torch.testing.assert_close(t[0], _seed_ns(out, 1.0))
    torch.testing.assert_close(t[1], _awd_tar(out, 2.0))
    torch.testing.assert_close(t[2], _awd_ar(out, 3.0))
    lengths = torch.tensor([5, 2])
    po = to_processing_order(out, lengths, reverse=True)
    torch.testing.assert_close(po[:2, 1], out[:2, 1].flip(0))
    torch.testing.assert_close(po[:, 0], out[:, 0].flip(0))
    assert torch.all(po[2:, 1] == 0)
    # the mapping is its own inverse on the valid part
    back = to_processing_order(po, lengths, reverse=True)
    torch.testing.assert_close(back[:2, 1], out[:2, 1])


def test_penalty_weights_divisors():
    pen = Penalties(norm_stabilizer=2.0, tar=3.0, ar=4.0)
    w = penalty_weights(pen, steps=7, batch=3, hidden=5)
    assert w.ns == pytest.approx(2.0 / (6 * 3))
    assert w.tar == pytest.approx(3.0 / (6 * 3 * 5))
    assert w.ar == pytest.approx(4.0 / (7 * 3 * 5))
    wi = penalty_weights(Penalties(norm_stabilizer=2.0, ns_include_initial=True), 7, 3, 5)
    assert wi.ns == pytest.approx(2.0 / 21)
    wl = penalty_weights(pen, 7, 3, 5, lengths=torch.tensor([7, 1, 3]))
    assert wl.ns == pytest.approx(2.0 / 8) and wl.ar == pytest.approx(4.0 / (11 * 5))
    assert penalty_weights(pen, 1, 3, 5) == (0.0, 0.0, pytest.approx(4.0 / 15), 0.0, 0.0)
    # the two norm-only terms: beta_c / |S| (the norm-stabilizer's S) and alpha / sum_b L_b
    pn = Penalties(cell_norm_stabilizer=2.0, norm_target=3.0)
    wn = penalty_weights(pn, 7, 3, 5, lengths=torch.tensor([7, 1, 3]))
    assert wn.cell_ns == pytest.approx(2.0 / 8) and wn.norm_target == pytest.approx(3.0 / 11)
    assert wn.ns == wn.tar == wn.ar == 0.0
    wn1 = penalty_weights(pn, 1, 3, 5)
    assert wn1.cell_ns == 0.0 and wn1.norm_target == pytest.approx(1.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(norm_stabilizer=-1.0), "norm_stabilizer.*non-negative"),
    (dict(tar=float("nan")), "tar.*finite"),
    (dict(ar=float("inf")), "ar.*finite"),
    (dict(ar="1"), "ar.*number"),
    (dict(ns_eps=-1e-9), "ns_eps"),
    (dict(ns_include_initial=1), "ns_include_initial.*bool"),
    (dict(ar_mask=torch.ones(3)), r"ar_mask.*\[B, H\]"),
    (dict(ar_mask=[[1.0]]), "ar_mask.*tensor"),
])
def test_penalties_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Penalties(**kwargs)


def test_penalties_mask_shape_checked_against_input():
    x, w, h0, _ = _inputs("tanh", 3, 3, 5)
    with pytest.raises(ValueError, match=r"ar_mask.*\[3, 5\].*\[3, 4\]"):
        recurrence(x, w, h0, cell="tanh", penalties=Penalties(ar=1.0, ar_mask=torch.ones(3, 4)))


def test_penalties_frozen():
    p = Penalties(tar=1.0)
    with pytest.raises(Exception):
        p.tar = 2.0
