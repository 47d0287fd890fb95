"""rnnreg_kernels: fused RNN kernels with in-kernel activation regularizers.

Public names: :func:`recurrence` (the op: cells lstm, normprop, relu, tanh, trec; differentiable
``norms`` / ``cell_norms``), :class:`RecurrenceOutput`, :class:`Terms` (the five weighted
terms), :class:`Penalties`, :func:`activation_penalties` (the fused penalty pass over any RNN's
output), :func:`higher_order_grads`, and the drop-in modules :class:`LSTM`, :class:`RNN`,
:class:`IRNN`, :class:`NormPropLSTM` (Recurrent Normalization Propagation) and
:class:`LockedDropout`.
Importing never touches a GPU.
"""
from .ops import (BackendUnavailableError, RecurrenceOutput, Terms, higher_order_grads,
                  recurrence)
from .penalties import Penalties
from .native import activation_penalties
from .nn import IRNN, LSTM, RNN, LockedDropout, NormPropLSTM

__version__ = "0.1.0"

__all__ = ["recurrence", "RecurrenceOutput", "Terms", "Penalties", "activation_penalties",
           "LSTM", "RNN", "IRNN", "NormPropLSTM", "LockedDropout",
           "BackendUnavailableError", "higher_order_grads", "__version__"]
