"""Modules beside the recurrent drop-ins: :class:`LockedDropout` (awd-lstm-lm's variational
dropout) and :class:`NormPropLSTM` (:mod:`rnnreg_kernels.nn.normprop`, the LSTM of Recurrent
Normalization Propagation).  ``LSTM``, ``RNN`` and ``IRNN`` live in :mod:`rnnreg_kernels.modules`.

``NormPropLSTM`` is imported on first access: it builds on :mod:`rnnreg_kernels.modules`, which
itself imports :mod:`rnnreg_kernels.nn.dropout` (an eager import here would be circular)."""
from .dropout import LockedDropout, locked_mask

__all__ = ["LockedDropout", "locked_mask", "NormPropLSTM"]


def __getattr__(name):
    if name == "NormPropLSTM":
        from .normprop import NormPropLSTM
        return NormPropLSTM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
