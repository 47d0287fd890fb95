"""Locked (variational) dropout as in awd-lstm-lm: one mask per sequence, the same at every
time step, scaled by 1/(1-p), applied in training mode only."""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import nn


def check_probability(owner: str, name: str, p) -> float:
    """``p`` as a float in [0, 1), else a ``ValueError`` naming ``owner`` and ``name``."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p < 1:
        raise ValueError(f"{owner}: {name} expected a number in [0, 1), got {p!r}")
    return float(p)


def locked_mask(batch: int, features: int, p: float, like: torch.Tensor) -> torch.Tensor:
    """``[batch, features]`` mask of 0 and 1/(1-p), drawn as awd-lstm-lm draws it
    (``bernoulli_(1 - p)`` on a fresh tensor of ``like``'s dtype and device, from the default
    generator), so the same seed gives awd's mask."""
    m = like.new_empty(1, batch, features).bernoulli_(1 - p)
    return (m / (1 - p))[0]


class LockedDropout(nn.Module):
    """``LockedDropout(p, batch_first=False)``: ``x * mask`` with one ``[B, F]`` mask for the
    whole sequence (``x`` is ``[T, B, F]``, or ``[B, T, F]`` with ``batch_first``).

    Identity in eval mode or with ``p = 0`` (then ``mask`` is None); after a training-mode
    forward, ``mask`` is the ``[B, F]`` mask it used (0 or 1/(1-p)).  The mask is drawn like
    awd-lstm-lm's ``LockedDropout``, so under the same seed both give the same output.
    """

    def __init__(self, p: float = 0.5, batch_first: bool = False):
        super().__init__()
        self.p = check_probability("LockedDropout", "p", p)
        if not isinstance(batch_first, bool):
            raise ValueError(f"LockedDropout: batch_first expected a bool, got {batch_first!r}")
        self.batch_first = batch_first
        self.mask: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"LockedDropout: expected a 3-D input "
                             f"[{'B, T' if self.batch_first else 'T, B'}, F], got {got}")
        if not self.training or self.p == 0:
            self.mask = None
            return x
        batch = x.shape[0] if self.batch_first else x.shape[1]
        self.mask = locked_mask(batch, x.shape[-1], self.p, x)
        return x * (self.mask.unsqueeze(1) if self.batch_first else self.mask.unsqueeze(0))

    def extra_repr(self) -> str:
        return f"p={self.p}" + (", batch_first=True" if self.batch_first else "")
