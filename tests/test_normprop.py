"""NormPropLSTM, the memory-cell norm-stabilizer, norm_target and differentiable norms, at the
module level, in float64.

The oracle is :func:`transcribe`: issue 12's equations written out directly, one batch row and
one step at a time with plain autograd (row norms of the raw weights, gammas, the fixed
sigmas; per-row lengths; a reverse direction starting at each row's own last step), and the
five penalty terms written from their definitions on the per-row states.  Every comparison
checks the outputs, the final states, the terms, ``hidden_norms`` / ``cell_norms`` and the
gradients of the input, ``hx`` and every parameter under random upstream gradients.
"""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnnreg_kernels
from rnnreg_kernels import IRNN, LSTM, RNN, NormPropLSTM
from rnnreg_kernels.nn import native_path as native_modules
from rnnreg_kernels.nn.normprop import gaussian_expectation, normprop_sigmas
from rnnreg_kernels.penalties import TERM_NAMES

DT = torch.float64
TOL = dict(rtol=1e-8, atol=1e-10)
EPS = 1e-9
PEN = dict(norm_stabilizer=0.7, tar=0.4, ar=0.3, cell_norm_stabilizer=0.9, norm_target=0.6,
           norm_target_value=1.5)


# ----------------------------------------------------------------------------- the oracle

def _row_terms(hs, cs, coef, include_initial):
    """Per-row sums of the five terms' numerators and their counts (one direction).

    ``hs`` / ``cs``: per batch row, the states h_0..h_L / c_0..c_L in processing order."""
    n = lambda v: torch.sqrt((v * v).sum() + v.numel() * EPS)  # noqa: E731
    sums = dict.fromkeys(TERM_NAMES, 0.0)
    counts = dict(ns=0, pairs=0, steps=0)
    H = hs[0][0].numel()
    for h, c in zip(hs, cs):
        L = len(h) - 1
        first = 1 if include_initial else 2
        for k in range(1, L + 1):
            if k >= first:
                sums["norm_stabilizer"] = sums["norm_stabilizer"] + (n(h[k]) - n(h[k - 1])) ** 2
                if c is not None:
                    sums["cell_norm_stabilizer"] = sums["cell_norm_stabilizer"] + (
                        n(c[k]) - n(c[k - 1])) ** 2
            if k >= 2:
                sums["tar"] = sums["tar"] + ((h[k] - h[k - 1]) ** 2).sum()
            sums["ar"] = sums["ar"] + (h[k] ** 2).sum()
            sums["norm_target"] = sums["norm_target"] + (n(h[k]) - coef["norm_target_value"]) ** 2
        counts["ns"] += L - first + 1
        counts["pairs"] += L - 1
        counts["steps"] += L
    div = {"norm_stabilizer": counts["ns"], "cell_norm_stabilizer": counts["ns"],
           "tar": counts["pairs"] * H, "ar": counts["steps"] * H, "norm_target": counts["steps"]}
    return {k: (coef.get(k, 0.0) * sums[k] / div[k] if div[k] and coef.get(k, 0.0) else
                torch.zeros((), dtype=DT)) for k in TERM_NAMES}


def transcribe(module, params, x, hx=None, lengths=None, normprop=True):
    """Issue 12's equations (or the plain LSTM's with ``normprop=False``), time-major
    ``x [T, B, I]``.  Returns (output, h_n, c_n, terms, hidden norms, cell norms)."""
    T, B, _ = x.shape
    H, D, Lyr = module.hidden_size, module.num_directions, module.num_layers
    lengths = [T] * B if lengths is None else [int(v) for v in lengths]
    if hx is None:
        hx = (x.new_zeros(Lyr * D, B, H), x.new_zeros(Lyr * D, B, H))
    coef = {k: getattr(module, k) / D for k in TERM_NAMES}
    coef["norm_target_value"] = module.norm_target_value
    terms = {k: torch.zeros((), dtype=DT) for k in TERM_NAMES}
    h_n, c_n, hnorms, cnorms = [], [], [], []
    layer_input = x
    norm = lambda v: torch.sqrt((v * v).sum() + H * EPS)  # noqa: E731
    for layer in range(Lyr):
        outs = []
        for d in range(D):
            idx, sfx = layer * D + d, f"_l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = params["weight_ih" + sfx], params["weight_hh" + sfx]
            hs, cs = [], []
            cols = []
            for b in range(B):
                h, c = hx[0][idx, b], hx[1][idx, b]
                hrow, crow, at = [h], [c], {}
                steps = range(lengths[b]) if d == 0 else reversed(range(lengths[b]))
                for t in steps:
                    xt = layer_input[t, b]
                    if normprop:
                        z = (params["gamma_ih" + sfx] * (w_ih @ xt) / w_ih.norm(dim=1)
                             + params["gamma_hh" + sfx] * (w_hh @ h) / w_hh.norm(dim=1))
                        if module.bias:
                            z = z + params["bias" + sfx]
                    else:
                        z = w_ih @ xt + w_hh @ h
                        if module.bias:
                            z = z + params["bias_ih" + sfx] + params["bias_hh" + sfx]
                    i, f, g, o = z.chunk(4)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    if normprop:
                        h = (torch.sigmoid(o) * torch.tanh(params["gamma_c" + sfx] * c
                                                           / module.sigma_c) / module.sigma_h)
                    else:
                        h = torch.sigmoid(o) * torch.tanh(c)
                    hrow.append(h)
                    crow.append(c)
                    at[t] = h
                cols.append(torch.stack([at.get(t, x.new_zeros(H)) for t in range(T)]))
                hs.append(hrow)
                cs.append(crow)
                h_n.append(h)
                c_n.append(c)
            outs.append(torch.stack(cols, 1))
            pad = lambda seq: torch.stack(  # noqa: E731
                [torch.stack([norm(v) for v in r] + [x.new_zeros(())] * (T + 1 - len(r)))
                 for r in seq], 1)
            hnorms.append(pad(hs))
            cnorms.append(pad(cs))
            if module.penalty_layers == "all" or layer == Lyr - 1:
                got = _row_terms(hs, cs, coef, module.ns_include_initial)
                terms = {k: terms[k] + got[k] for k in TERM_NAMES}
        layer_input = torch.cat(outs, -1)
    h_n = torch.stack(h_n).view(Lyr * D, B, H)
    c_n = torch.stack(c_n).view(Lyr * D, B, H)
    return layer_input, h_n, c_n, terms, hnorms, cnorms


# ----------------------------------------------------------------------------- helpers

def _randomize(module, seed=0):
    """Parameters away from their init (so every gradient path carries a signal)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.rand(p.shape, generator=gen, dtype=p.dtype)
            if name.startswith("gamma"):
                p.copy_(0.5 + r * 1.5)
            elif name.startswith("bias"):
                p.copy_((r - 0.5) * 0.6)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def _states(module, x, hx, gen):
    B = x.shape[0 if module.batch_first else 1]
    shape = (module.num_layers * module.num_directions, B, module.hidden_size)
    return (torch.randn(shape, generator=gen, dtype=DT), torch.randn(shape, generator=gen,
                                                                       dtype=DT)) if hx else None


def _compare(module, x, with_hx=False, lengths=None, enforce_sorted=False, seed=0,
             normprop=True, extra_loss=None):
    """Run ``module`` and :func:`transcribe` on the same leaves with the same random upstream
    gradients; compare everything."""
    gen = torch.Generator().manual_seed(seed)
    hx = _states(module, x, with_hx, gen)
    xl = x.detach().clone().requires_grad_(True)
    hxl = None if hx is None else tuple(h.clone().requires_grad_(True) for h in hx)
    params = dict(module.named_parameters())
    inp = xl
    if lengths is not None:
        inp = pack_padded_sequence(xl, torch.tensor(lengths), batch_first=module.batch_first,
                                   enforce_sorted=enforce_sorted)
    out, (h_n, c_n) = module(inp, hxl)
    if isinstance(out, PackedSequence):
        out = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=module.batch_first,
                                                     total_length=x.shape[
                                                         1 if module.batch_first else 0])[0]
    xt = xl.transpose(0, 1) if module.batch_first else xl
    r_out, r_hn, r_cn, r_terms, r_hnorms, r_cnorms = transcribe(module, params, xt, hxl,
                                                                 lengths, normprop)
    if module.batch_first:
        r_out = r_out.transpose(0, 1)
    ups = [torch.randn(t.shape, generator=gen, dtype=DT) for t in (r_out, r_hn, r_cn)]
    tg = {k: float(torch.randn((), generator=gen)) for k in TERM_NAMES}

    def loss(o, hn, cn, terms, hnorms, cnorms):
        v = sum((a * g).sum() for a, g in zip((o, hn, cn), ups))
        v = v + sum(tg[k] * terms[k] for k in TERM_NAMES)
        if extra_loss is not None:
            v = v + extra_loss(hnorms, cnorms)
        return v

    torch.testing.assert_close(out, r_out, **TOL)
    torch.testing.assert_close(h_n, r_hn, **TOL)
    torch.testing.assert_close(c_n, r_cn, **TOL)
    for k in TERM_NAMES:
        torch.testing.assert_close(module.penalty_terms[k], r_terms[k], **TOL, msg=k)
    torch.testing.assert_close(module.penalty, sum(r_terms.values()), **TOL)
    assert len(module.hidden_norms) == len(r_hnorms)
    for a, b in zip(module.hidden_norms, r_hnorms):
        torch.testing.assert_close(a, b, **TOL)
    if module.cell_norms is not None:
        assert len(module.cell_norms) == len(r_cnorms)
        for a, b in zip(module.cell_norms, r_cnorms):
            torch.testing.assert_close(a, b, **TOL)
    leaves = [xl] + ([] if hxl is None else list(hxl)) + list(params.values())
    got = torch.autograd.grad(loss(out, h_n, c_n, module.penalty_terms, module.hidden_norms,
                                   module.cell_norms), leaves)
    want = torch.autograd.grad(loss(r_out, r_hn, r_cn, r_terms, r_hnorms, r_cnorms), leaves,
                               allow_unused=True)
    names = ["x"] + ([] if hxl is None else ["h0", "c0"]) + list(params)
    for name, a, b in zip(names, got, want):
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, **TOL, msg=name)
        steps = x.shape[1 if module.batch_first else 0]
        if name.startswith(("gamma", "weight", "bias")) and not (
                name.startswith(("weight_hh", "gamma_hh")) and steps == 1 and hx is None):
            # (T = 1 from h0 = 0: W_hh h0 = 0, so W_hh and gamma_hh rightly get nothing)
            assert a.abs().max() > 0, name  # every parameter gets a signal
    return module


# ----------------------------------------------------------------------------- sigmas

def _dense_expectation(f, std):
    """E[f(z)], z ~ N(0, std^2), by the trapezoid rule on a fine grid (independent of the
    quadrature under test)."""
    z = np.linspace(-14 * std, 14 * std, 400001)
    pdf = np.exp(-0.5 * (z / std) ** 2) / (std * math.sqrt(2 * math.pi))
    return float(np.trapezoid(f(z) * pdf, z))


def test_sigmas_match_the_issue_numbers():
    sigma_c, sigma_h = normprop_sigmas(2.0, 2.0, 1.0)
    assert sigma_c ** 2 == pytest.approx(0.4481, abs=5e-5)
    assert sigma_h ** 2 == pytest.approx(0.1498, abs=5e-5)
    m = NormPropLSTM(3, 4)
    assert isinstance(m.sigma_c, float) and isinstance(m.sigma_h, float)
    assert (m.sigma_c, m.sigma_h) == (sigma_c, sigma_h)


@pytest.mark.parametrize("gx, gh, gc, rel", [(2.0, 2.0, 1.0, 2e-5), (1.0, 0.5, 3.0, 2e-5),
                                             (0.1, 0.2, 0.25, 1e-12), (3.0, 3.0, 3.0, 1e-3)])
def test_sigmas_against_dense_integration(gx, gh, gc, rel):
    """200 Gauss-Hermite nodes on integrands with poles near the real axis converge slowly:
    measured errors 4.1e-6 / 8.7e-6 for the first two triples, ~1e-16 for the third, 2.9e-4
    for the fourth (docs/normprop.md); the tolerances bound them."""
    s = math.hypot(gx, gh)
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    E = _dense_expectation(sig, s)
    V = _dense_expectation(lambda z: (sig(z) - E) ** 2, s)
    Q = _dense_expectation(lambda z: np.tanh(z) ** 2, s)
    sigma_c2 = Q * (V + E ** 2) / (1 - V - E ** 2)
    sigma_h2 = _dense_expectation(lambda u: np.tanh(gc * u) ** 2, 1.0) * (V + E ** 2)
    got = NormPropLSTM(2, 3, gamma_x=gx, gamma_h=gh, gamma_c=gc)
    assert got.sigma_c ** 2 == pytest.approx(sigma_c2, rel=rel)
    assert got.sigma_h ** 2 == pytest.approx(sigma_h2, rel=rel)
    # the quadrature itself: E[z^2] = s^2, E[z^4] = 3 s^4 (exact for polynomials)
    assert gaussian_expectation(lambda z: z ** 2, s) == pytest.approx(s ** 2, rel=1e-12)
    assert gaussian_expectation(lambda z: z ** 4, s) == pytest.approx(3 * s ** 4, rel=1e-12)


def test_sigmas_keep_unit_variance_at_init():
    """What the constants are for: with unit-variance inputs and states at the fixed point,
    the pre-activations have variance s^2 and h has unit second moment (Monte Carlo)."""
    gen = torch.Generator().manual_seed(0)
    sigma_c, sigma_h = normprop_sigmas(2.0, 2.0, 1.0)
    s = math.hypot(2.0, 2.0)
    z = torch.randn(4, 400000, generator=gen, dtype=DT) * s
    i, f, g, o = torch.sigmoid(z[0]), torch.sigmoid(z[1]), torch.tanh(z[2]), torch.sigmoid(z[3])
    c = torch.randn(400000, generator=gen, dtype=DT) * sigma_c  # c_{t-1} at the fixed point
    c = f * c + i * g
    assert (c ** 2).mean().item() == pytest.approx(sigma_c ** 2, rel=0.02)
    u = torch.randn(400000, generator=gen, dtype=DT)
    h = o * torch.tanh(u) / sigma_h
    assert (h ** 2).mean().item() == pytest.approx(1.0, rel=0.02)


# ----------------------------------------------------------------------------- construction

def test_parameters_and_init():
    m = NormPropLSTM(3, 5, 2, bidirectional=True, gamma_x=1.5, gamma_h=0.5, gamma_c=2.0)
    names = [n for n, _ in m.named_parameters()]
    stems = ["weight_ih", "weight_hh", "bias", "gamma_ih", "gamma_hh", "gamma_c"]
    assert names == [f"{s}_l{k}{r}" for k in range(2) for r in ("", "_reverse") for s in stems]
    for k in range(2):
        for r in ("", "_reverse"):
            w_ih, w_hh = getattr(m, f"weight_ih_l{k}{r}"), getattr(m, f"weight_hh_l{k}{r}")
            assert w_ih.shape == (20, 3 if k == 0 else 10) and w_hh.shape == (20, 5)
            for g in range(4):
                blk_ih, blk_hh = w_ih[g * 5:(g + 1) * 5], w_hh[g * 5:(g + 1) * 5]
                torch.testing.assert_close(blk_hh @ blk_hh.t(), torch.eye(5))
                small = blk_ih.t() @ blk_ih if k == 0 else blk_ih @ blk_ih.t()
                torch.testing.assert_close(small, torch.eye(small.shape[0]))
            assert torch.equal(getattr(m, f"bias_l{k}{r}"), torch.zeros(20))
            assert torch.equal(getattr(m, f"gamma_ih_l{k}{r}"), torch.full((20,), 1.5))
            assert torch.equal(getattr(m, f"gamma_hh_l{k}{r}"), torch.full((20,), 0.5))
            assert torch.equal(getattr(m, f"gamma_c_l{k}{r}"), torch.full((5,), 2.0))
    assert (m.sigma_c, m.sigma_h) == normprop_sigmas(1.5, 0.5, 2.0)
    nobias = NormPropLSTM(3, 4, bias=False)
    assert not any(n.startswith("bias") for n, _ in nobias.named_parameters())
    assert "gamma_x=1.5" in repr(m) and "NormPropLSTM(3, 5, num_layers=2" in repr(m)
    half = NormPropLSTM(3, 4, dtype=torch.bfloat16)
    assert half.weight_hh_l0.dtype == torch.bfloat16
    assert rnnreg_kernels.nn.NormPropLSTM is NormPropLSTM


@pytest.mark.parametrize("kw, needle", [
    (dict(gamma_x=0.0), "gamma_x expected a positive finite number, got 0.0"),
    (dict(gamma_h=-1.0), "gamma_h expected a positive finite number, got -1.0"),
    (dict(gamma_c=float("nan")), "gamma_c expected a positive finite number, got nan"),
    (dict(gamma_x=True), "gamma_x expected a positive finite number, got True"),
    (dict(gamma_c="1"), "gamma_c expected a positive finite number, got '1'"),
    (dict(cell_norm_stabilizer=-1.0), "cell_norm_stabilizer expected a non-negative"),
    (dict(norm_target=float("inf")), "norm_target expected a non-negative finite number"),
    (dict(norm_target_value=float("nan")), "norm_target_value expected a finite number"),
    (dict(track_cell_norms=1), "track_cell_norms expected a bool, got 1"),
])
def test_argument_errors(kw, needle):
    with pytest.raises(ValueError, match="NormPropLSTM: " + needle.replace("(", r"\(")):
        NormPropLSTM(3, 4, **kw)


@pytest.mark.parametrize("cls, kw", [(RNN, {}), (RNN, {"nonlinearity": "relu"}), (IRNN, {})])
@pytest.mark.parametrize("arg, value", [("cell_norm_stabilizer", 0.5),
                                        ("track_cell_norms", True)])
def test_cell_keywords_need_a_cell_state(cls, kw, arg, value):
    with pytest.raises(ValueError, match=rf"{arg} needs a memory cell, which only the cells "
                                         r"lstm, normprop have"):
        cls(3, 4, **kw, **{arg: value})
    m = cls(3, 4, **kw, norm_target=0.5, norm_target_value=2.0)  # accepted
    assert m.norm_target == 0.5 and m.norm_target_value == 2.0


def test_native_is_never_asked_for_normprop_or_cell_norms(monkeypatch):
    x = torch.randn(4, 2, 3)
    assert native_modules.use_native(LSTM(3, 4), x)  # auto on the CPU
    assert native_modules.use_native(LSTM(3, 4, norm_target=1.0), x)
    for m in (NormPropLSTM(3, 4), NormPropLSTM(3, 4, backend="native"),
              LSTM(3, 4, cell_norm_stabilizer=1.0), LSTM(3, 4, track_cell_norms=True),
              LSTM(3, 4, backend="native", cell_norm_stabilizer=1.0)):
        assert not native_modules.use_native(m, x)

    def boom(*a, **k):
        raise AssertionError("the native whole-layer path ran")
    monkeypatch.setattr(native_modules, "run_layers", boom)
    NormPropLSTM(3, 4, 2)(x)
    LSTM(3, 4, 2, cell_norm_stabilizer=1.0)(x)
    with pytest.raises(Exception, match="normprop"):
        NormPropLSTM(3, 4, backend="native")(x)  # recurrence says why native cannot run it


# ----------------------------------------------------------------------------- vs the equations

def test_the_transcription_is_torch_lstm_without_normprop():
    """The oracle itself: with ``normprop=False`` it is torch.nn.LSTM (2 layers, both
    directions, packed rows of different lengths)."""
    ours = _randomize(LSTM(3, 4, 2, bidirectional=True, dtype=DT), seed=12)
    ref = nn.LSTM(3, 4, 2, bidirectional=True, dtype=DT)
    ref.load_state_dict(ours.state_dict())
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(5, 3, 3, generator=gen, dtype=DT)
    hx = (torch.randn(4, 3, 4, generator=gen, dtype=DT), torch.randn(4, 3, 4, generator=gen,
                                                                      dtype=DT))
    lengths = [5, 2, 4]
    out, (h, c) = ref(pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False), hx)
    out = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=5)[0]
    r_out, r_h, r_c = transcribe(ours, dict(ours.named_parameters()), x, hx, lengths,
                                 normprop=False)[:3]
    for a, b in ((r_out, out), (r_h, h), (r_c, c)):
        torch.testing.assert_close(a, b, **TOL)


CONFIGS = [  # (layers, bidirectional, batch_first, T, B, H, I, with_hx, lengths)
    (1, False, False, 1, 1, 5, 3, False, None),
    (2, True, False, 4, 3, 5, 3, True, None),
    (1, True, True, 5, 3, 3, 2, True, [5, 2, 4]),
    (2, False, False, 4, 3, 5, 4, False, [3, 4, 1]),
]


@pytest.mark.parametrize("layers, bi, bf, T, B, H, I, with_hx, lengths", CONFIGS)
def test_normprop_matches_the_equations(layers, bi, bf, T, B, H, I, with_hx, lengths):
    m = NormPropLSTM(I, H, layers, bidirectional=bi, batch_first=bf, dtype=DT,
                     gamma_x=1.5, gamma_h=1.0, gamma_c=0.7, track_cell_norms=True, **PEN)
    _randomize(m, seed=T + B)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((B, T, I) if bf else (T, B, I), generator=gen, dtype=DT)
    _compare(m, x, with_hx, lengths)
    assert m.cell_norms is not None and len(m.cell_norms) == layers * (2 if bi else 1)


def test_normprop_naive_backend_and_all_layers_penalized():
    m = NormPropLSTM(3, 5, 2, bidirectional=True, dtype=DT, penalty_layers="all",
                     ns_include_initial=True, backend="naive", **PEN)
    _randomize(m, seed=4)
    x = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(2), dtype=DT)
    _compare(m, x, with_hx=True, lengths=[3, 2])
    assert m.cell_norms is not None  # computed for the cell norm-stabilizer


def test_normprop_no_bias_unbatched_and_batch_first():
    m = _randomize(NormPropLSTM(2, 3, bias=False, batch_first=True, dtype=DT, norm_target=1.0))
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(3), dtype=DT)
    out, (h, c) = m(x)  # unbatched [T, I]
    assert out.shape == (4, 3) and h.shape == c.shape == (1, 3) and m.cell_norms is None
    out_b, (h_b, c_b) = m(x.unsqueeze(0))
    torch.testing.assert_close(out, out_b[0], **TOL)
    torch.testing.assert_close(h, h_b[:, 0], **TOL)
    _compare(m, x.unsqueeze(0))


def test_lstm_new_keywords_match_the_equations():
    """rnnreg_kernels.LSTM with the cell norm-stabilizer and norm_target (reference path:
    cell norms keep it off native) against the plain LSTM's equations."""
    m = LSTM(3, 5, 2, bidirectional=True, dtype=DT, **PEN)
    _randomize(m, seed=5)
    x = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(4), dtype=DT)
    _compare(m, x, with_hx=True, lengths=[4, 1, 3], normprop=False)
    assert m.cell_norms is not None and len(m.cell_norms) == 4


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_lstm_norm_target_and_custom_norm_penalty(backend):
    """norm_target alone keeps an LSTM on native under auto (hidden norms are differentiable
    there too); a user's own penalty on ``hidden_norms`` (the relative form
    (Delta ||h|| / ||h||)^2) gets the right gradient on both paths."""
    m = LSTM(3, 4, 2, dtype=DT, norm_target=0.8, norm_target_value=0.7, backend=backend,
             penalty_layers="all")
    _randomize(m, seed=6)
    x = torch.randn(5, 3, 3, generator=torch.Generator().manual_seed(5), dtype=DT)
    assert native_modules.use_native(m, x) == (backend == "auto")

    def relative(hnorms, cnorms):
        total = 0.0
        for n in hnorms:
            total = total + (((n[1:] - n[:-1]) / n[1:]) ** 2).mean()
        return 3.0 * total
    _compare(m, x, with_hx=True, normprop=False, extra_loss=relative)
    assert m.cell_norms is None


def test_cell_norms_are_differentiable():
    m = _randomize(NormPropLSTM(2, 3, dtype=DT, track_cell_norms=True), seed=7)
    x = torch.randn(4, 2, 2, generator=torch.Generator().manual_seed(6), dtype=DT)
    _compare(m, x, lengths=[4, 2], extra_loss=lambda h, c: (c[0] ** 3).sum() + (h[0] ** 2).sum())


def test_rnn_norm_target_against_torch():
    for cls, kw in ((RNN, {"nonlinearity": "tanh"}), (IRNN, {})):
        ours = cls(3, 4, **kw, dtype=DT, norm_target=0.9, norm_target_value=0.3)
        ref = nn.RNN(3, 4, nonlinearity=kw.get("nonlinearity", "relu"), dtype=DT)
        _randomize(ours, seed=8)
        ref.load_state_dict(ours.state_dict())
        x = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(7), dtype=DT)
        out, _ = ours(x)
        states, _ = ref(x)
        n = torch.sqrt((states ** 2).sum(-1) + 4 * EPS)
        want = 0.9 * ((n - 0.3) ** 2).mean()
        torch.testing.assert_close(ours.penalty_terms["norm_target"], want, **TOL)
        torch.testing.assert_close(ours.penalty, want, **TOL)
        torch.testing.assert_close(out, states, **TOL)
        for k in ("norm_stabilizer", "tar", "ar", "cell_norm_stabilizer"):
            assert ours.penalty_terms[k] == 0
        got = torch.autograd.grad(ours.penalty, list(ours.parameters()))
        exp = torch.autograd.grad(want, list(ref.parameters()))
        for a, b in zip(got, exp):
            torch.testing.assert_close(a, b, **TOL)
        assert ours.cell_norms is None and ours.hidden_norms[0].requires_grad


def test_weight_drop_drops_the_raw_weight_before_normalizing():
    m = _randomize(NormPropLSTM(3, 6, dtype=DT, weight_drop=0.3), seed=9)
    x = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(8), dtype=DT)
    params = dict(m.named_parameters())
    torch.manual_seed(11)
    out, _ = m(x)
    torch.manual_seed(11)
    dropped = dict(params, weight_hh_l0=F.dropout(params["weight_hh_l0"], 0.3, True))
    assert (dropped["weight_hh_l0"] == 0).any() and (dropped["weight_hh_l0"] != 0).any(1).all()
    torch.testing.assert_close(out, transcribe(m, dropped, x)[0], **TOL)
    m.eval()
    torch.testing.assert_close(m(x)[0], transcribe(m, params, x)[0], **TOL)


def test_zero_weight_row_stays_zero():
    """A weight row of zeros (DropConnect can make one) contributes 0, not 0/0."""
    m = _randomize(NormPropLSTM(3, 4, dtype=DT), seed=13)
    with torch.no_grad():
        m.weight_hh_l0[2].zero_()
        m.weight_ih_l0[5].zero_()
    x = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(13), dtype=DT)
    out, (h, c) = m(x)
    grads = torch.autograd.grad(out.sum() + c.sum(), list(m.parameters()))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    ref = dict(m.named_parameters())
    safe = {k: v.clone() for k, v in ref.items()}
    for name, row in (("weight_hh_l0", 2), ("weight_ih_l0", 5)):  # the row's term is 0 anyway
        safe[name] = safe[name].detach().clone()
        safe[name][row, 0] = 1.0
    for name, row in (("gamma_hh_l0", 2), ("gamma_ih_l0", 5)):
        safe[name] = safe[name].detach().clone()
        safe[name][row] = 0.0
    torch.testing.assert_close(out, transcribe(m, safe, x)[0], **TOL)


def test_gradcheck_module():
    """float64 gradcheck of the whole module (all five terms, both directions) in every input
    and parameter, independent of the transcription."""
    m = _randomize(NormPropLSTM(2, 3, bidirectional=True, dtype=DT, **PEN), seed=10)
    names = [n for n, _ in m.named_parameters()]
    x = torch.randn(3, 2, 2, generator=torch.Generator().manual_seed(9), dtype=DT)

    def f(x, *ps):
        out, (h, c) = torch.func.functional_call(m, dict(zip(names, ps)), (x,))
        return out, h, c, m.penalty
    inputs = (x.requires_grad_(True),) + tuple(p.detach().clone().requires_grad_(True)
                                               for p in m.parameters())
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


def test_empty_batch_state_dict_and_deepcopy():
    m = NormPropLSTM(3, 4, 2, dtype=DT, cell_norm_stabilizer=1.0)
    out, (h, c) = m(torch.zeros(5, 0, 3, dtype=DT))
    assert out.shape == (5, 0, 4) and h.shape == c.shape == (2, 0, 4)
    grads = torch.autograd.grad(out.sum() + h.sum() + c.sum() + m.penalty, list(m.parameters()))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    assert m.cell_norms is not None and m.cell_norms[0].shape == (6, 0)
    m(torch.randn(2, 1, 3, dtype=DT))
    twin = copy.deepcopy(m)
    assert twin.cell_norms is None and twin.hidden_norms is None
    other = NormPropLSTM(3, 4, 2, dtype=DT)
    other.load_state_dict(m.state_dict())
    x = torch.randn(3, 2, 3, dtype=DT)
    torch.testing.assert_close(other(x)[0], m(x)[0])


def _readme_example(tag):
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return re.search(rf"<!-- example:{tag} -->\n```python\n(.*?)```", text, re.S).group(1)


def test_readme_examples_run():
    """The README's normprop snippet and its custom norm penalty, as written there."""
    ns = {"rnnreg_kernels": rnnreg_kernels, "x": torch.randn(4, 2, 50)}
    exec(_readme_example("normprop").replace("1000", "6"), ns)  # a small hidden size
    lstm = ns["lstm"]
    assert isinstance(lstm, NormPropLSTM) and (ns["lstm"].sigma_c, lstm.sigma_h) == \
        normprop_sigmas(2.0, 2.0, 1.0)
    assert lstm.penalty_terms["cell_norm_stabilizer"] > 0 and lstm.cell_norms is not None
    ns["task_loss"] = lambda out: out.square().mean()
    exec(_readme_example("norm-penalty"), ns)
    assert ns["relative"] > 0 and torch.isfinite(ns["loss"])
    ns["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lstm.parameters())
