"""``RNN`` (tanh / relu / trec) and ``IRNN``: drop-in ``torch.nn.RNN`` with fused activation
regularizers; IRNN initialized as Le, Jaitly & Hinton (2015).

The implementation is shared with the other drop-ins (:mod:`rnnreg_kernels.nn.base`)."""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from .base import (_EXTRAS_DOC, _NORM_TARGET_VALUE, _NOT_GIVEN, _PROJ_SIZE_RNN,
                   _RecurrentBase, _extras)

__all__ = ["RNN", "IRNN"]


class RNN(_RecurrentBase):
    __doc__ = """Drop-in ``torch.nn.RNN`` with a thresholded rectifier and fused regularizers.

    Args: as ``torch.nn.RNN`` (``input_size, hidden_size, num_layers=1,
    nonlinearity="tanh", bias=True, batch_first=False, dropout=0.0, bidirectional=False,
    device=None, dtype=None``); ``nonlinearity`` is "tanh", "relu" or "trec"
    (``trec(z) = z * [z > theta]``, keyword ``theta=1.0``).
    """ + _EXTRAS_DOC + """
    Forward: ``rnn(input, hx=None, *, ar_mask=None) -> (output, h_n)``, shapes as
    :class:`LSTM` without ``c``.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, device=None, dtype=None, *,
                 theta: float = 1.0, norm_stabilizer: float = 0.0, tar: float = 0.0,
                 ar: float = 0.0, ns_include_initial: bool = False, ns_eps: float = 1e-9,
                 penalty_layers: str = "last", weight_drop: float = 0.0,
                 backend: str = "auto", output_dropout: float = 0.0,
                 dropout_mode: str = "standard", norm_target: float = 0.0,
                 norm_target_value: float = _NORM_TARGET_VALUE,
                 cell_norm_stabilizer: float = 0.0, track_cell_norms: bool = False,
                 proj_size=_NOT_GIVEN):
        if proj_size is not _NOT_GIVEN:
            raise ValueError(_PROJ_SIZE_RNN)
        if nonlinearity not in ("tanh", "relu", "trec"):
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh', "
                             "'relu' or 'trec'.")
        super().__init__(f"RNN_{nonlinearity.upper()}", nonlinearity, input_size, hidden_size,
                         num_layers, bias, batch_first, dropout, bidirectional, device, dtype,
                         theta=theta, **_extras(locals()))
        self.nonlinearity = nonlinearity
        self.reset_parameters()


class IRNN(RNN):
    __doc__ = """ReLU :class:`RNN` initialized as Le, Jaitly & Hinton (2015).

    ``weight_hh = identity_scale * I``, zero biases, ``weight_ih ~ N(0, init_std)`` in every
    layer and direction.  Args: ``input_size, hidden_size, num_layers=1, bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None`` and the
    keywords ``identity_scale=1.0``, ``init_std=0.001``.
    """ + _EXTRAS_DOC

    identity_scale = 1.0
    init_std = 0.001

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, device=None, dtype=None, *,
                 identity_scale: float = 1.0, init_std: float = 0.001,
                 norm_stabilizer: float = 0.0, tar: float = 0.0, ar: float = 0.0,
                 ns_include_initial: bool = False, ns_eps: float = 1e-9,
                 penalty_layers: str = "last", weight_drop: float = 0.0,
                 backend: str = "auto", output_dropout: float = 0.0,
                 dropout_mode: str = "standard", norm_target: float = 0.0,
                 norm_target_value: float = _NORM_TARGET_VALUE,
                 cell_norm_stabilizer: float = 0.0, track_cell_norms: bool = False,
                 proj_size=_NOT_GIVEN):
        if proj_size is not _NOT_GIVEN:
            raise ValueError(_PROJ_SIZE_RNN)
        for arg, value in (("identity_scale", identity_scale), ("init_std", init_std)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                    or not math.isfinite(value):
                raise ValueError(f"IRNN: {arg} expected a finite number, got {value!r}")
        if init_std < 0:
            raise ValueError(f"IRNN: init_std expected a non-negative number, got {init_std!r}")
        super().__init__(input_size, hidden_size, num_layers, "relu", bias, batch_first,
                         dropout, bidirectional, device, dtype, **_extras(locals()))
        self.identity_scale = float(identity_scale)
        self.init_std = float(init_std)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Identity (times ``identity_scale``) ``weight_hh``, zero biases, N(0, init_std)
        ``weight_ih``."""
        with torch.no_grad():
            for names in self._all_weights:
                for name in names:
                    p = getattr(self, name)
                    if name.startswith("weight_hh"):
                        p.copy_(torch.eye(self.hidden_size, dtype=p.dtype, device=p.device)
                                * self.identity_scale)
                    elif name.startswith("weight_ih"):
                        nn.init.normal_(p, 0.0, self.init_std)
                    else:
                        p.zero_()
