"""rnnreg_kernels: fused RNN kernels with in-kernel activation regularizers.

Public names: :func:`recurrence` (the op), :class:`RecurrenceOutput`, :class:`Terms`,
:class:`Penalties`, and the drop-in modules :class:`LSTM`, :class:`RNN`, :class:`IRNN`, and :class:`LockedDropout`.
Importing never touches a GPU.
"""
from .ops import (BackendUnavailableError, RecurrenceOutput, Terms, higher_order_grads,
                  recurrence)
from .penalties import Penalties
from .modules import IRNN, LSTM, RNN
from .nn import LockedDropout

__version__ = "0.1.0"

__all__ = ["recurrence", "RecurrenceOutput", "Terms", "Penalties", "LSTM", "RNN", "IRNN", "LockedDropout",
           "BackendUnavailableError", "higher_order_grads", "__version__"]
