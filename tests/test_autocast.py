"""The modules under torch.autocast behave like torch.nn.LSTM / nn.RNN (issue 10, item 4):
the recurrence runs in the autocast dtype, outputs and states come back in it, fp32 weights
get fp32 gradients, penalties accumulate in fp32.  CPU autocast only (no GPU here)."""
import pytest
import torch
from torch import nn

import rnnreg_kernels.ops as ops
from rnnreg_kernels import LSTM, RNN


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("kind", ["lstm", "tanh"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("given_hx", [False, True])
def test_cpu_autocast_like_torch_nn(kind, dtype, given_hx, backend, monkeypatch):
    """``reference`` runs one recurrence() per layer (spied on: it must see the autocast
    dtype); ``native`` (auto's CPU choice) runs PyTorch's own kernels through
    nn.native_path, so only its results are compared with nn's."""
    if backend == "native" and kind == "lstm" and dtype == torch.float16:
        pytest.skip("native is nn.LSTM's own CPU kernel, which torch 2.13 lacks in fp16")
    torch.manual_seed(0)
    kw = dict(tar=1.0, ar=0.5, norm_stabilizer=1.0, backend=backend)
    if kind == "lstm":
        ref, ours = nn.LSTM(3, 8, 2), LSTM(3, 8, 2, **kw)
    else:
        ref = nn.RNN(3, 8, 2, nonlinearity="tanh")
        ours = RNN(3, 8, 2, nonlinearity="tanh", **kw)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(6, 4, 3)
    hx = None
    if given_hx:
        z = torch.zeros(2, 4, 8)
        hx = (z, z) if kind == "lstm" else z
    seen = []
    real = ops.recurrence

    def spy(x_proj, *a, **k):
        seen.append(x_proj.dtype)
        return real(x_proj, *a, **k)
    monkeypatch.setattr("rnnreg_kernels.nn.base.recurrence", spy)
    results = []
    models = (ref, ours)
    if kind == "lstm" and dtype == torch.float16:
        models = (ours,)  # torch 2.13's nn.LSTM fails there (oneDNN has no fp16 CPU LSTM)
    for m in models:
        with torch.autocast("cpu", dtype):
            out, h = m(x, hx)
        flat = [out] + (list(h) if isinstance(h, tuple) else [h])
        results.append(flat)
        loss = sum(t.float().sum() for t in flat)
        if m is ours:
            assert ours.penalty.dtype == torch.float32
            assert all(t.dtype == torch.float32 for t in ours.penalty_terms.values())
            loss = loss + ours.penalty
        loss.backward()
    if backend == "reference":  # the recurrence ran in the autocast dtype
        assert seen and all(s == dtype for s in seen)
    if len(models) == 1:
        assert all(t.dtype == dtype for t in results[0])
        assert all(q.grad.dtype == torch.float32 for q in ours.parameters())
        return
    for a, b in zip(*results):
        assert a.dtype == b.dtype == dtype
        # same math in the same low precision: within a few low-precision ulps of nn's
        eps = torch.finfo(dtype).eps
        assert (a.float() - b.float()).abs().max() <= 8 * eps * max(1.0, b.float().abs().max())
    for (name, p), (_, q) in zip(ref.named_parameters(), ours.named_parameters()):
        assert q.grad.dtype == p.grad.dtype == torch.float32, name
