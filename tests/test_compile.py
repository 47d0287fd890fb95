"""torch.compile over the modules: fullgraph (no graph break), eager values and gradients,
no recompile per sequence length (issue 10, item 3).  CPU only here: the triton / cuda
backends go through the same custom ops (rnnreg_kernels/library.py) but were not compiled
on a GPU."""
import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from rnnreg_kernels import LSTM, RNN
from rnnreg_kernels.library import _saved_layout


class Model(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size * rnn.num_directions, 2)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out).pow(2).mean() + self.rnn.penalty


def _grads(model, x):
    loss = model(x)
    return [loss] + list(torch.autograd.grad(loss, list(model.parameters())))


@pytest.mark.parametrize("make", [
    lambda: LSTM(3, 5, 2, norm_stabilizer=1.0, tar=0.5, ar=0.3),
    lambda: RNN(3, 5, nonlinearity="tanh", bidirectional=True, tar=1.0, ar=0.5)])
def test_fullgraph_matches_eager_and_does_not_recompile_per_length(make):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Model(make())
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=cnt)
    for T in (5, 8, 11):
        x = torch.randn(T, 3, 3)
        got, expect = _grads(compiled, x), _grads(model, x)
        for a, b in zip(got, expect):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the first length compiles static, the second marks T dynamic; the third reuses it
    assert cnt.frame_count <= 2, cnt.frame_count


def test_mark_dynamic_compiles_once():
    torch._dynamo.reset()
    model = Model(LSTM(3, 4, tar=1.0))
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=cnt)
    for T in (4, 6, 9):
        x = torch.randn(T, 2, 3)
        torch._dynamo.mark_dynamic(x, 0)
        _grads(compiled, x)
    assert cnt.frame_count == 1


def test_inductor_fullgraph_values_and_grads():
    torch._dynamo.reset()
    torch.manual_seed(1)
    model = Model(LSTM(3, 4, ar=1.0, tar=1.0))
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(6, 2, 3)
    for a, b in zip(_grads(compiled, x), _grads(model, x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell, cell_norms", [("lstm", False), ("normprop", True)])
def test_custom_ops_pass_opcheck(cell, cell_norms):
    from rnnreg_kernels.library import recurrence_bwd, recurrence_fwd
    g = torch.Generator().manual_seed(0)
    T, B, H = 3, 2, 5
    scale = torch.rand(H, generator=g) + 0.5 if cell == "normprop" else None
    common = (torch.randn(T, B, 4 * H, generator=g), torch.randn(4 * H, H, generator=g) * 0.3,
              torch.randn(B, H, generator=g), torch.randn(B, H, generator=g), None,
              torch.tensor([3, 2]), scale)
    flags = ("reference", cell, 1.0, 0.5, 0.5, 0.5, False, 1e-9, True, False,
             1.5 if cell == "normprop" else 1.0, cell_norms)
    torch.library.opcheck(recurrence_fwd, common + flags,
                          test_utils=("test_schema", "test_faketensor"))
    outs = recurrence_fwd(*common, *flags)
    output, norms, cnorms, saved = outs[0], outs[4], outs[5], outs[6:]
    grads = (torch.randn(T, B, H, generator=g), torch.randn(B, H, generator=g),
             torch.randn(B, H, generator=g), torch.randn(3, generator=g),
             torch.randn(T + 1, B, generator=g),
             torch.randn(T + 1, B, generator=g) if cell_norms else None)
    args = (common[0],) + common[1:] + (output, norms, cnorms if cell_norms else None,
                                        list(saved)) + grads + flags
    torch.library.opcheck(recurrence_bwd, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("cell", ["lstm", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fake_saved_layout_matches_the_backends(cell, dtype):
    """The fake impl's saved shapes equal what each CPU-runnable backend really saves
    (triton under the interpreter); cuda's layout is from its docstring (no GPU here)."""
    from rnnreg_kernels.library import recurrence_fwd
    T, B, H = 3, 2, 5
    G = 4 if cell == "lstm" else 1
    backends = ["reference"]
    import os
    if os.environ.get("TRITON_INTERPRET") == "1":
        backends.append("triton")
    for backend in backends:
        outs = recurrence_fwd(torch.randn(T, B, G * H, dtype=dtype),
                              torch.randn(G * H, H, dtype=dtype) * 0.3,
                              torch.randn(B, H, dtype=dtype),
                              torch.randn(B, H, dtype=dtype) if cell == "lstm" else None,
                              None, None, None, backend, cell, 1.0, 0.0, 0.0, 0.0, False,
                              1e-9, False, False, 1.0, False)
        layout = _saved_layout(backend, cell, dtype, T, B, H)
        assert len(outs) == 6 + len(layout)
        for t, slot in zip(outs[6:], layout):
            if slot is None:
                assert t.shape == (0,)
            else:
                assert (tuple(t.shape), t.dtype) == slot


def test_fullgraph_recurrence_normprop_with_norm_terms_matches_eager():
    """The custom ops with contract v2's new arguments (cell_scale, h_scale, cell_norms, the
    norms' gradients) trace fullgraph; the norm-only terms (torch ops on the differentiable
    norms) keep no T-dependent constant: one dynamic recompile at most over three lengths."""
    from rnnreg_kernels import Penalties, recurrence
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    H, B = 4, 3
    w = (torch.randn(4 * H, H, generator=g) * 0.4).requires_grad_()
    a = (torch.rand(H, generator=g) + 0.5).requires_grad_()
    pen = Penalties(norm_stabilizer=0.5, cell_norm_stabilizer=0.7, norm_target=0.3)

    def f(x, h0, c0):
        r = recurrence(x, w, h0, c0, cell="normprop", cell_scale=a, h_scale=1.5,
                       penalties=pen, backend="reference")
        n = r.norms
        return r.output.pow(2).mean() + r.penalty + (((n[1:] - n[:-1]) / n[:-1]) ** 2).sum()
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, fullgraph=True, backend=cnt)
    for T in (3, 5, 6):
        x, h0, c0 = (torch.randn(T, B, 4 * H, generator=g), torch.randn(B, H, generator=g),
                     torch.randn(B, H, generator=g))
        got = [compiled(x, h0, c0)]
        got += list(torch.autograd.grad(got[0], [w, a]))
        want = [f(x, h0, c0)]
        want += list(torch.autograd.grad(want[0], [w, a]))
        for u, v in zip(got, want):
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)
    assert cnt.frame_count <= 2, cnt.frame_count
