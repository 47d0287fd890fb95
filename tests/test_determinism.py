"""Bitwise determinism: the same inputs give the same outputs and gradients when run twice,
on every CPU-runnable backend, and the modules run under
torch.use_deterministic_algorithms(True) (issue 10, item 10)."""
import os

import pytest
import torch

from rnnreg_kernels import LSTM, Penalties, recurrence

BACKENDS = ["reference", "naive"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1"
                                     else [])


def _run(backend, cell, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = 4 if cell == "lstm" else 1
    T, B, H = 4, 3, 5
    ins = [torch.randn(T, B, G * H, generator=g), torch.randn(G * H, H, generator=g) * 0.4,
           torch.randn(B, H, generator=g)] + ([torch.randn(B, H, generator=g)]
                                              if cell == "lstm" else [])
    ins = [t.requires_grad_(True) for t in ins]
    mask = (torch.rand(B, H, generator=g) < 0.5).float() * 2
    r = recurrence(*ins, cell=cell, lengths=[4, 2, 3], reverse=True, backend=backend,
                   penalties=Penalties(norm_stabilizer=1.0, tar=0.7, ar=0.3, ar_mask=mask))
    outs = [r.output, r.h_n, r.penalty, *r.terms] + ([r.c_n] if cell == "lstm" else [])
    loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs)
    grads = torch.autograd.grad(loss, ins)
    return [o.detach() for o in outs] + [r.norms] + list(grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["lstm", "relu"])
def test_twice_bitwise_equal(backend, cell):
    a, b = _run(backend, cell), _run(backend, cell)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_module_under_deterministic_algorithms():
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        res = []
        for _ in range(2):
            torch.manual_seed(0)
            m = LSTM(3, 5, 2, weight_drop=0.3, output_dropout=0.2, tar=1.0, ar=1.0)
            out, (h, c) = m(torch.randn(6, 2, 3))
            loss = out.sum() + m.penalty
            res.append([out, h, c, m.penalty] + list(torch.autograd.grad(loss, list(m.parameters()))))
        for x, y in zip(*res):
            assert torch.equal(x, y)
    finally:
        torch.use_deterministic_algorithms(prev)


def test_kernels_sum_without_float_atomics():
    """The fused kernels reduce in a fixed order: the only atomics in the Triton sources are
    the grid barrier's integer counter, and the CUDA sources use none (a float atomicAdd
    would make the sum order, and so the bits, depend on scheduling)."""
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "rnnreg_kernels" / "triton").glob("*.py")):
        for line in path.read_text().splitlines():
            if re.search(r"tl\.atomic_\w+\(", line):
                assert "bar_ptr" in line, f"{path.name}: {line.strip()}"
    for path in sorted((root / "csrc").rglob("*.cu*")):
        text = path.read_text()
        assert not re.search(r"\batomicAdd\s*\(", text), path.name
