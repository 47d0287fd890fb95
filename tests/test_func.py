"""torch.func over recurrence() and the modules: vmap, grad, jacrev over functional_call,
and gradcheck(check_batched_grad=True) (issue 10, item 2)."""
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from rnnreg_kernels import LSTM, RNN, Penalties, recurrence

DT = torch.float64
TOL = dict(rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("cell", ["lstm", "tanh"])
def test_gradcheck_batched_grad_recurrence(cell):
    g = torch.Generator().manual_seed(0)
    G = 4 if cell == "lstm" else 1
    T, B, H = 3, 2, 5
    ins = [torch.randn(T, B, G * H, generator=g, dtype=DT),
           torch.randn(G * H, H, generator=g, dtype=DT) * 0.4,
           torch.randn(B, H, generator=g, dtype=DT)]
    if cell == "lstm":
        ins.append(torch.randn(B, H, generator=g, dtype=DT))
    ins = [t.requires_grad_(True) for t in ins]
    pen = Penalties(norm_stabilizer=0.7, tar=0.9, ar=1.3)

    def f(*a):
        r = recurrence(*a, cell=cell, penalties=pen, lengths=[3, 1], reverse=True,
                       backend="reference")
        return (r.output, r.h_n, r.penalty) + ((r.c_n,) if cell == "lstm" else ())
    assert torch.autograd.gradcheck(f, ins, check_batched_grad=True, fast_mode=True)


def _models(kind):
    torch.manual_seed(0)
    if kind == "lstm":
        ref, ours = nn.LSTM(3, 5, 2).to(DT), LSTM(3, 5, 2, tar=0.5, ar=0.3).to(DT)
    else:
        ref = nn.RNN(3, 5, nonlinearity="tanh").to(DT)
        ours = RNN(3, 5, nonlinearity="tanh", norm_stabilizer=2.0).to(DT)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("kind", ["lstm", "tanh"])
def test_per_sample_gradients_vmap_of_grad(kind):
    _, m = _models(kind)
    params = {k: v.detach() for k, v in m.named_parameters()}
    xs = torch.randn(4, 6, 3, dtype=DT)  # 4 samples, each an unbatched [T=6, I=3] sequence

    def loss(p, x):
        out, _ = functional_call(m, p, (x,))
        return (out ** 2).sum() + m.penalty

    got = vmap(grad(loss), in_dims=(None, 0))(params, xs)
    for i in range(xs.shape[0]):
        ps = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        expect = torch.autograd.grad(loss(ps, xs[i]), list(ps.values()))
        for (name, e) in zip(ps, expect):
            torch.testing.assert_close(got[name][i], e, **TOL)


@pytest.mark.parametrize("kind", ["lstm", "tanh"])
def test_jacrev_matches_torch_nn(kind):
    ref, ours = _models(kind)
    x = torch.randn(4, 2, 3, dtype=DT)
    jacs = []
    for m in (ref, ours):
        params = {k: v.detach() for k, v in m.named_parameters()}
        jacs.append(jacrev(lambda p, x: functional_call(m, p, (x,))[0], argnums=(0, 1))(
            params, x))
    (jp_ref, jx_ref), (jp, jx) = jacs
    torch.testing.assert_close(jx, jx_ref, **TOL)
    for name in jp_ref:
        torch.testing.assert_close(jp[name], jp_ref[name], **TOL)


def test_grad_matches_autograd_and_vmap_of_forward():
    _, m = _models("lstm")
    params = {k: v.detach() for k, v in m.named_parameters()}
    x = torch.randn(5, 3, 3, dtype=DT)

    def loss(p):
        out, (h, c) = functional_call(m, p, (x,))
        return out.sum() + h.sum() + m.penalty
    got = grad(loss)(params)
    ps = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    expect = torch.autograd.grad(loss(ps), list(ps.values()))
    for name, e in zip(ps, expect):
        torch.testing.assert_close(got[name], e, **TOL)
    xs = torch.randn(3, 5, 3, dtype=DT)  # vmap over unbatched sequences == a batch of them
    out_v = vmap(lambda xi: functional_call(m, params, (xi,))[0])(xs)
    out_b = m(xs.transpose(0, 1))[0].transpose(0, 1)
    torch.testing.assert_close(out_v, out_b, **TOL)


def test_hessian_of_recurrence_is_symmetric():
    """jacrev(jacrev(...)) (functorch's own double backward) through the op."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 5, generator=g, dtype=DT) * 0.4
    x = torch.randn(3, 2, 5, generator=g, dtype=DT)
    h0 = torch.randn(2, 5, generator=g, dtype=DT)

    def f(w):
        r = recurrence(x, w, h0, cell="tanh", penalties=Penalties(tar=1.0),
                       backend="reference")
        return r.output.pow(2).sum() + r.penalty
    hess = jacrev(jacrev(f))(w).reshape(25, 25)
    torch.testing.assert_close(hess, hess.t(), **TOL)
    from rnnreg_kernels.reference import naive_from_spec  # noqa: F401  (the recompute path)

    def f_naive(w):
        r = recurrence(x, w, h0, cell="tanh", penalties=Penalties(tar=1.0), backend="naive")
        return r.output.pow(2).sum() + r.penalty
    torch.testing.assert_close(hess, jacrev(jacrev(f_naive))(w).reshape(25, 25), **TOL)


def test_hessian_through_norms_and_cell_scale_matches_naive():
    """jacrev(jacrev(...)) of a norm penalty of the normprop cell w.r.t. cell_scale: the
    vmap rules and the double backward carry grad_norms / grad_cell_norms / cell_scale."""
    g = torch.Generator().manual_seed(2)
    H = 3
    x = torch.randn(3, 2, 4 * H, generator=g, dtype=DT)
    w = torch.randn(4 * H, H, generator=g, dtype=DT) * 0.4
    h0 = torch.randn(2, H, generator=g, dtype=DT)
    c0 = torch.randn(2, H, generator=g, dtype=DT)
    a = torch.rand(H, generator=g, dtype=DT) + 0.5
    pen = Penalties(norm_target=0.5, cell_norm_stabilizer=0.7, norm_stabilizer=0.3)

    def f(backend):
        def loss(a):
            r = recurrence(x, w, h0, c0, cell="normprop", cell_scale=a, h_scale=1.4,
                           penalties=pen, backend=backend, lengths=torch.tensor([3, 2]))
            n = r.norms
            return (((n[1:] - n[:-1]) / n[:-1]) ** 2).sum() + r.penalty + r.output.sum()
        return loss
    hess = jacrev(jacrev(f("reference")))(a)
    torch.testing.assert_close(hess, hess.t(), **TOL)
    torch.testing.assert_close(hess, jacrev(jacrev(f("naive")))(a), **TOL)
