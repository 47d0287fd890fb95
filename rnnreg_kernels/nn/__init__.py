"""Modules beside the recurrent drop-ins: :class:`LockedDropout` (awd-lstm-lm's variational
dropout).  The recurrent modules live in :mod:`rnnreg_kernels.modules`."""
from .dropout import LockedDropout, locked_mask

__all__ = ["LockedDropout", "locked_mask"]
