"""The modules, one file per family (DESIGN.md section 4); no kernels and no autograd here.

* :mod:`~rnnreg_kernels.nn.lstm`: :class:`LSTM`, the drop-in ``torch.nn.LSTM``;
* :mod:`~rnnreg_kernels.nn.rnn`: :class:`RNN` (tanh, relu, trec) and :class:`IRNN`, drop-in
  ``torch.nn.RNN``;
* :mod:`~rnnreg_kernels.nn.normprop`: :class:`NormPropLSTM`, the LSTM of Recurrent
  Normalization Propagation;
* :mod:`~rnnreg_kernels.nn.dropout`: :class:`LockedDropout` (awd-lstm-lm's variational
  dropout) and :func:`locked_mask`;
* :mod:`~rnnreg_kernels.nn.base`: the implementation the recurrent modules share (input
  handling, layers and directions, penalties, ``hidden_norms`` / ``cell_norms``), one
  ``recurrence()`` call per layer and direction;
* :mod:`~rnnreg_kernels.nn.native_path`: the whole-layer path through PyTorch's own kernels
  when the backend resolves to ``native``.
"""
from .dropout import LockedDropout, locked_mask
from .lstm import LSTM
from .normprop import NormPropLSTM
from .rnn import IRNN, RNN

__all__ = ["LSTM", "RNN", "IRNN", "NormPropLSTM", "LockedDropout", "locked_mask"]
