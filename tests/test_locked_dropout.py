"""awd-lstm-lm's dropout scheme built in: output_dropout, dropout_mode, LockedDropout
(issue 10, item 6)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rnnreg_kernels import LSTM, RNN, LockedDropout

DT = torch.float64


class AwdLockedDropout(nn.Module):
    """salesforce/awd-lstm-lm locked_dropout.py, transcribed (time-major [T, B, F])."""

    def forward(self, x, dropout=0.5):
        if not self.training or not dropout:
            return x
        m = x.data.new(1, x.size(1), x.size(2)).bernoulli_(1 - dropout)
        mask = m.requires_grad_(False) / (1 - dropout)
        return mask.expand_as(x) * x


def test_locked_dropout_module_matches_awd_and_exposes_mask():
    x = torch.randn(7, 3, 6, dtype=DT)
    ours, awd = LockedDropout(0.4), AwdLockedDropout()
    torch.manual_seed(5)
    y = ours(x)
    torch.manual_seed(5)
    expect = awd(x, 0.4)
    torch.testing.assert_close(y, expect, rtol=0, atol=0)
    assert ours.mask.shape == (3, 6)
    torch.testing.assert_close(y, x * ours.mask, rtol=0, atol=0)
    assert set(ours.mask.unique().tolist()) <= {0.0, 1 / 0.6}
    bf = LockedDropout(0.4, batch_first=True)
    torch.manual_seed(5)
    torch.testing.assert_close(bf(x.transpose(0, 1)), expect.transpose(0, 1), rtol=0, atol=0)
    ours.eval()
    assert ours(x) is x and ours.mask is None
    assert LockedDropout(0.0)(x) is x


@pytest.mark.parametrize("p", [-0.1, 1.0, "0.5", True])
def test_locked_dropout_bad_p(p):
    with pytest.raises(ValueError, match="LockedDropout: p expected a number in \\[0, 1\\)"):
        LockedDropout(p)


def test_locked_dropout_bad_input():
    with pytest.raises(ValueError, match=r"LockedDropout: expected a 3-D input"):
        LockedDropout(0.5)(torch.randn(3, 4))


def _awd_step(ref_lstm, x, p_out, alpha, beta):
    """awd-lstm-lm's last-layer recipe on a torch.nn.LSTM: raw output, lockdrop, AR on the
    dropped output, TAR on the raw one."""
    raw, _ = ref_lstm(x)
    dropped = AwdLockedDropout()(raw, p_out)
    ar = alpha * dropped.pow(2).mean()
    tar = beta * (raw[1:] - raw[:-1]).pow(2).mean()
    return dropped, ar, tar


@pytest.mark.parametrize("bidirectional", [False, True])
def test_output_dropout_is_awd_lockdrop_with_ar_on_dropped_and_tar_on_raw(bidirectional):
    torch.manual_seed(0)
    ref = nn.LSTM(3, 5, bidirectional=bidirectional).to(DT)
    ours = LSTM(3, 5, bidirectional=bidirectional, output_dropout=0.3, ar=2.0,
                tar=1.0).to(DT)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(6, 4, 3, dtype=DT)
    torch.manual_seed(11)
    out, _ = ours(x)
    mask = ours.output_dropout_mask
    D = 2 if bidirectional else 1
    assert mask.shape == (4, D * 5)
    torch.manual_seed(11)
    dropped, ar, tar = _awd_step(ref, x, 0.3, 2.0, 1.0)
    torch.testing.assert_close(out, dropped, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours.penalty_terms["ar"], ar, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours.penalty_terms["tar"], tar, rtol=1e-12, atol=1e-14)
    # gradients of the whole awd loss agree too
    g_ours = torch.autograd.grad(out.sum() + ours.penalty, list(ours.parameters()))
    torch.manual_seed(11)
    dropped, ar, tar = _awd_step(ref, x, 0.3, 2.0, 1.0)
    g_ref = torch.autograd.grad(dropped.sum() + ar + tar, list(ref.parameters()))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_output_dropout_eval_and_zero_p_and_mask_per_forward():
    m = RNN(3, 4, output_dropout=0.5)
    x = torch.randn(5, 2, 3)
    out1, _ = m(x)
    m1 = m.output_dropout_mask
    # same mask at every step, only 0 or 1/(1-p)
    assert set(m1.unique().tolist()) <= {0.0, 2.0}
    m.eval()
    out_eval, _ = m(x)
    assert m.output_dropout_mask is None
    raw = out_eval
    torch.testing.assert_close(out1, raw * m1.unsqueeze(0))
    m.train()
    m(x)
    assert not torch.equal(m.output_dropout_mask, m1) or m1.numel() < 4
    assert RNN(3, 4)(x) is not None and RNN(3, 4).output_dropout_mask is None


def test_output_dropout_batch_first_unbatched_and_packed():
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    m = LSTM(3, 4, batch_first=True, output_dropout=0.5)
    x = torch.randn(3, 6, 3)
    out, _ = m(x)
    mask = m.output_dropout_mask
    m.eval()
    raw, _ = m(x)
    m.train()
    torch.testing.assert_close(out, raw * mask.unsqueeze(1))
    out, _ = m(x[0])  # unbatched [T, I]
    assert m.output_dropout_mask.shape == (4,)
    lengths = torch.tensor([2, 6, 4])
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, _ = m(packed)
    mask = m.output_dropout_mask  # caller's batch order
    m.eval()
    raw, _ = m(packed)
    m.train()
    a, _ = pad_packed_sequence(out, batch_first=True)
    b, _ = pad_packed_sequence(raw, batch_first=True)
    torch.testing.assert_close(a, b * mask.unsqueeze(1))


def test_output_dropout_and_ar_mask_together_is_an_error():
    m = LSTM(3, 4, output_dropout=0.5, ar=1.0)
    with pytest.raises(ValueError, match="ar_mask.*output_dropout"):
        m(torch.randn(3, 2, 3), ar_mask=torch.ones(2, 4))
    m.eval()
    m(torch.randn(3, 2, 3), ar_mask=torch.ones(2, 4))  # eval: no output dropout, mask used


def test_dropout_mode_locked_between_layers():
    torch.manual_seed(0)
    ref = nn.LSTM(3, 5, 3).to(DT)
    ours = LSTM(3, 5, 3, dropout=0.4, dropout_mode="locked").to(DT)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(6, 2, 3, dtype=DT)
    torch.manual_seed(3)
    out, _ = ours(x)
    # rebuild with one torch.nn.LSTM per layer and awd's lockdrop between
    singles = []
    for layer in range(3):
        one = nn.LSTM(5 if layer else 3, 5).to(DT)
        one.load_state_dict({k.replace(f"_l{layer}", "_l0"): v
                             for k, v in ref.state_dict().items() if k.endswith(f"_l{layer}")})
        singles.append(one)
    torch.manual_seed(3)
    h = x
    for layer, one in enumerate(singles):
        h, _ = one(h)
        if layer < 2:
            h = AwdLockedDropout()(h, 0.4)
    torch.testing.assert_close(out, h, rtol=1e-12, atol=1e-14)
    # standard mode is nn.LSTM's elementwise dropout: same RNG stream, same output
    std = LSTM(3, 5, 3, dropout=0.4).to(DT)
    std.load_state_dict(ref.state_dict())
    torch.manual_seed(3)
    a, _ = std(x)
    torch.manual_seed(3)
    b, _ = _nn_lstm_standard_dropout(singles, x, 0.4)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(a, out)


def _nn_lstm_standard_dropout(singles, x, p):
    h = x
    for layer, one in enumerate(singles):
        h, _ = one(h)
        if layer < len(singles) - 1:
            h = F.dropout(h, p, True)
    return h, None


@pytest.mark.parametrize("kwargs, match", [
    (dict(output_dropout=1.0), "output_dropout expected a number in \\[0, 1\\)"),
    (dict(output_dropout=-0.5), "output_dropout expected a number in \\[0, 1\\)"),
    (dict(dropout_mode="variational"), "dropout_mode expected 'standard' or 'locked'"),
])
def test_bad_dropout_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LSTM(3, 4, 2, **kwargs)


def test_readme_awd_example_runs_and_is_awd():
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"<!-- example:awd -->\n```python\n(.*?)```", text, re.S).group(1)
    ns = {}
    exec(code, ns)
    torch.manual_seed(0)
    model = ns["AwdRNN"](ntoken=11, ninp=6, nhid=8, nlayers=3)
    tokens = torch.randint(0, 11, (5, 2))
    logits, hidden, penalty = model(tokens, [None] * 3)
    assert logits.shape == (5, 2, 11) and len(hidden) == 3
    assert model.rnns[-1].output_dropout_mask.shape == (2, 6)
    assert all(r.output_dropout_mask is not None for r in model.rnns)
    assert penalty.item() > 0
    penalty.backward()
    assert model.rnns[0].weight_hh_l0.grad is not None
