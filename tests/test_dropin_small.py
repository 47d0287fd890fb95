"""Small drop-in details of the modules that torch.nn users lean on (issue 10, item 7)."""
import pytest
import torch
from torch import nn

from rnnreg_kernels import IRNN, LSTM, RNN


@pytest.mark.parametrize("kind", ["lstm", "tanh", "relu"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_zero_batch_stays_in_the_graph(kind, bidirectional):
    make = (lambda: LSTM(3, 5, 2, bidirectional=bidirectional, ar=1.0, tar=1.0)) \
        if kind == "lstm" else \
        (lambda: RNN(3, 5, 2, nonlinearity=kind, bidirectional=bidirectional, ar=1.0))
    m = make()
    x = torch.zeros(4, 0, 3, requires_grad=True)
    out, hidden = m(x)
    h_n = hidden[0] if kind == "lstm" else hidden
    D = 2 if bidirectional else 1
    assert out.shape == (4, 0, D * 5) and h_n.shape == (2 * D, 0, 5)
    assert out.grad_fn is not None and h_n.grad_fn is not None
    if kind == "lstm":
        assert hidden[1].grad_fn is not None
    loss = out.sum() + h_n.sum() + m.penalty
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.equal(p.grad, torch.zeros_like(p)), name
    assert x.grad is not None and x.grad.shape == x.shape
    assert m.penalty.dim() == 0 and m.penalty.item() == 0.0


def test_zero_batch_with_given_state_passes_its_gradient():
    m = LSTM(3, 5)
    h0 = torch.zeros(1, 0, 5, requires_grad=True)
    c0 = torch.zeros(1, 0, 5, requires_grad=True)
    out, (h, c) = m(torch.zeros(2, 0, 3), (h0, c0))
    (out.sum() + h.sum() + c.sum()).backward()
    assert h0.grad is not None and c0.grad is not None


@pytest.mark.parametrize("make", [lambda: LSTM(3, 4, 2, bidirectional=True),
                                  lambda: RNN(3, 4, 2, bias=False), lambda: IRNN(3, 4)])
def test_flat_weights_in_names_order_read_each_time(make):
    m = make()
    assert [id(w) for w in m._flat_weights] == \
        [id(getattr(m, n)) for n in m._flat_weights_names]
    ref = nn.LSTM(3, 4, 2, bidirectional=True) if isinstance(m, LSTM) else None
    if ref is not None:
        assert m._flat_weights_names == ref._flat_weights_names
    # replaced by name (as weight_norm / pruning / awd's WeightDrop do): the list follows
    new = nn.Parameter(torch.zeros_like(m.weight_hh_l0))
    m.weight_hh_l0 = new
    assert m._flat_weights[m._flat_weights_names.index("weight_hh_l0")] is new


@pytest.mark.parametrize("cls", [RNN, IRNN])
@pytest.mark.parametrize("value", [0, 2])
def test_rnn_proj_size_raises_nn_rnn_value_error(cls, value):
    with pytest.raises(ValueError) as ours:
        cls(3, 4, proj_size=value)
    with pytest.raises(ValueError) as theirs:
        nn.RNN(3, 4, proj_size=value)
    assert str(ours.value) == str(theirs.value) == \
        "proj_size argument is only supported for LSTM, not RNN or GRU"


@pytest.mark.parametrize("make, dtype", [(lambda: LSTM(3, 4, ar=1.0), torch.float32),
                                         (lambda: RNN(3, 4).double(), torch.float64),
                                         (lambda: IRNN(3, 4, tar=2.0), torch.float32)])
def test_penalty_is_zero_tensor_before_first_forward(make, dtype):
    m = make()
    assert isinstance(m.penalty, torch.Tensor) and m.penalty.dim() == 0
    assert m.penalty.item() == 0.0 and m.penalty.dtype == dtype
    assert set(m.penalty_terms) == {"norm_stabilizer", "tar", "ar", "cell_norm_stabilizer",
                                    "norm_target"}
    for t in m.penalty_terms.values():
        assert isinstance(t, torch.Tensor) and t.dim() == 0 and t.item() == 0.0
    loss = torch.tensor(1.0, dtype=dtype) + m.penalty
    assert loss.item() == 1.0
    x = torch.randn(3, 2, 3, dtype=dtype)
    m(x)
    assert m.penalty.grad_fn is not None or not m.ar and not m.tar
