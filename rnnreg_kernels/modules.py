"""Compatibility name: the drop-in modules live in :mod:`rnnreg_kernels.nn` (one file per family;
the shared implementation and its documentation in :mod:`rnnreg_kernels.nn.base`)."""
from .nn.lstm import LSTM
from .nn.rnn import IRNN, RNN

__all__ = ["LSTM", "RNN", "IRNN"]
