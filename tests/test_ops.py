"""recurrence(): argument checks, backend choice, outputs' shapes and dtypes."""
import pytest
import torch

import rnnreg_kernels
from rnnreg_kernels import BackendUnavailableError, Penalties, recurrence
from rnnreg_kernels.ops import resolve_backend


def _args(cell="lstm", T=4, B=3, H=5, dtype=torch.float32):
    G = 4 if cell == "lstm" else 1
    x = torch.randn(T, B, G * H, dtype=dtype)
    w = torch.randn(G * H, H, dtype=dtype)
    h0 = torch.randn(B, H, dtype=dtype)
    c0 = torch.randn(B, H, dtype=dtype) if cell == "lstm" else None
    return x, w, h0, c0


def test_public_api():
    for name in ("recurrence", "RecurrenceOutput", "Penalties", "LSTM", "RNN", "IRNN", "Terms"):
        assert hasattr(rnnreg_kernels, name)
    r = recurrence(*_args(), cell="lstm", penalties=Penalties(tar=1.0))
    assert r._fields == ("output", "h_n", "c_n", "penalty", "terms", "norms", "cell_norms")
    assert r.terms._fields == ("norm_stabilizer", "tar", "ar", "cell_norm_stabilizer",
                               "norm_target")
    assert r.cell_norms is None
    assert r.output.shape == (4, 3, 5) and r.h_n.shape == (3, 5) and r.c_n.shape == (3, 5)
    assert r.penalty.dim() == 0 and r.norms.shape == (5, 3) and r.norms.dtype == torch.float32
    assert r.penalty.item() == pytest.approx(r.terms.tar.item())
    x, w, h0, _ = _args("relu")
    r = recurrence(x, w, h0, cell="relu")
    assert r.c_n is None and r.penalty.item() == 0.0


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda a: {**a, "cell": "gru"}, ValueError, "cell: expected one of lstm, relu, tanh, trec, normprop, got 'gru'"),
    (lambda a: {**a, "backend": "cudnn"}, ValueError, "backend: expected one of auto, reference, naive, triton, cuda, native, got 'cudnn'"),
    (lambda a: {**a, "x_proj": a["x_proj"][0]}, ValueError, r"x_proj: expected 3 dimensions"),
    (lambda a: {**a, "x_proj": a["x_proj"].int()}, TypeError, r"x_proj: expected float16.*got torch.int32"),
    (lambda a: {**a, "x_proj": a["x_proj"][..., :-1]}, ValueError, r"x_proj: expected last dimension G\*H = 4\*5 = 20.*got 19"),
    (lambda a: {**a, "w_hh": a["w_hh"][:-1]}, ValueError, r"w_hh: expected shape \[G\*H, H\] = \[20, 5\], got \[19, 5\]"),
    (lambda a: {**a, "h0": a["h0"][:2]}, ValueError, r"h0: expected shape \[B, H\] = \[3, 5\], got \[2, 5\]"),
    (lambda a: {**a, "c0": None}, ValueError, "c0: the lstm cell needs an initial cell state"),
    (lambda a: {**a, "c0": a["c0"].t()}, ValueError, r"c0: expected shape \[B, H\] = \[3, 5\], got \[5, 3\]"),
    (lambda a: {**a, "h0": a["h0"].double()}, TypeError, "h0: expected dtype torch.float32 .*got torch.float64"),
    (lambda a: {**a, "lengths": [4, 0, 2]}, ValueError, r"lengths: every length must be in 1..T = 1..4, got values in 0..4"),
    (lambda a: {**a, "lengths": [4, 5, 2]}, ValueError, r"lengths: every length must be in 1..T = 1..4, got values in 2..5"),
    (lambda a: {**a, "lengths": [4, 2]}, ValueError, r"lengths: expected shape \[B\] = \[3\], got \[2\]"),
    (lambda a: {**a, "lengths": torch.tensor([1.0, 2.0, 3.0])}, ValueError, "lengths: expected an integer tensor"),
    (lambda a: {**a, "penalties": {"tar": 1.0}}, TypeError, "penalties: expected rnnreg_kernels.Penalties"),
    (lambda a: {**a, "theta": float("nan")}, ValueError, "theta: expected a finite number"),
])
def test_bad_arguments_name_what_is_wrong(mutate, exc, match):
    x, w, h0, c0 = _args()
    a = dict(x_proj=x, w_hh=w, h0=h0, c0=c0, cell="lstm", penalties=None, lengths=None,
             backend="auto", theta=1.0)
    a = mutate(a)
    with pytest.raises(exc, match=match):
        recurrence(a.pop("x_proj"), a.pop("w_hh"), a.pop("h0"), a.pop("c0"), **a)


def test_c0_for_plain_rnn_is_an_error():
    x, w, h0, _ = _args("tanh")
    with pytest.raises(ValueError, match=r"c0: only the cells with a cell state \(lstm, "
                                         r"normprop\) take c0; expected None for cell 'tanh'"):
        recurrence(x, w, h0, h0.clone(), cell="tanh")


def test_auto_picks_reference_on_cpu_and_honours_env(monkeypatch):
    x, w, h0, c0 = _args()
    r = recurrence(x, w, h0, c0, cell="lstm")  # auto on CPU
    monkeypatch.setenv("RNNREG_BACKEND", "naive")
    n = recurrence(x, w, h0, c0, cell="lstm")
    assert n.output.grad_fn is None or "Recurrence" not in type(n.output.grad_fn).__name__
    torch.testing.assert_close(r.output, n.output)
    monkeypatch.setenv("RNNREG_BACKEND", "fastest")
    with pytest.raises(ValueError, match="RNNREG_BACKEND: expected one of .*got 'fastest'"):
        recurrence(x, w, h0, c0, cell="lstm")


def test_named_backend_that_cannot_run_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w, h0, c0 = _args()
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot run this case"):
        recurrence(x, w, h0, c0, cell="lstm", backend="cuda")


def test_resolve_backend_on_cpu_is_native_except_trec():
    x, w, _, _ = _args()
    from rnnreg_kernels.contract import Spec
    spec = Spec("lstm", 1.0, 0.0, 0.0, 0.0, False, 1e-9, False)
    assert resolve_backend("auto", spec, x, w) == "native"
    spec = Spec("trec", 1.0, 0.0, 0.0, 0.0, False, 1e-9, False)
    assert resolve_backend("auto", spec, x[..., :w.shape[1]], w[:w.shape[1]]) == "reference"


def test_outputs_are_fresh_and_inputs_untouched():
    x, w, h0, c0 = _args()
    copies = [t.clone() for t in (x, w, h0, c0)]
    r = recurrence(x, w, h0, c0, cell="lstm", penalties=Penalties(1.0, 1.0, 1.0))
    for a, b in zip((x, w, h0, c0), copies):
        assert torch.equal(a, b)
    assert r.output.data_ptr() != x.data_ptr()


def test_non_contiguous_inputs_work():
    x, w, h0, c0 = _args(dtype=torch.float64)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert not xt.is_contiguous()
    a = recurrence(xt, w, h0, c0, cell="lstm")
    b = recurrence(x, w, h0, c0, cell="lstm")
    torch.testing.assert_close(a.output, b.output)


def test_importing_does_not_initialise_cuda():
    import subprocess
    import sys
    code = ("import torch, rnnreg_kernels, rnnreg_kernels.reference, rnnreg_kernels.ops;"
            "print(torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"
