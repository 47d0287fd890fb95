"""``LSTM``: the drop-in ``torch.nn.LSTM`` (no ``proj_size``) with fused activation regularizers.

The implementation is shared with the other drop-ins (:mod:`rnnreg_kernels.nn.base`)."""
from __future__ import annotations

from .base import _EXTRAS_DOC, _NORM_TARGET_VALUE, _RecurrentBase, _extras

__all__ = ["LSTM"]


class LSTM(_RecurrentBase):
    __doc__ = """Drop-in ``torch.nn.LSTM`` (no ``proj_size``) with fused regularizers.

    Args: as ``torch.nn.LSTM`` (``input_size, hidden_size, num_layers=1, bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, proj_size=0, device=None,
    dtype=None``), positionally or by name; ``proj_size`` must be 0.
    """ + _EXTRAS_DOC + """
    Forward: ``lstm(input, hx=None, *, ar_mask=None) -> (output, (h_n, c_n))`` with
    input ``[T, B, I]`` (``[B, T, I]`` if batch_first), ``[T, I]`` unbatched, or a
    ``PackedSequence``; ``hx = (h_0, c_0)`` each ``[L*D, B, H]`` (``[L*D, H]`` unbatched);
    output ``[T, B, D*H]`` (same layout rules; a ``PackedSequence`` for packed input);
    ``h_n``, ``c_n`` ``[L*D, B, H]``.  Then ``penalty``, ``penalty_terms``, ``hidden_norms``,
    ``cell_norms``.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, proj_size: int = 0, device=None, dtype=None, *,
                 norm_stabilizer: float = 0.0, tar: float = 0.0, ar: float = 0.0,
                 ns_include_initial: bool = False, ns_eps: float = 1e-9,
                 penalty_layers: str = "last", weight_drop: float = 0.0,
                 backend: str = "auto", output_dropout: float = 0.0,
                 dropout_mode: str = "standard", cell_norm_stabilizer: float = 0.0,
                 norm_target: float = 0.0, norm_target_value: float = _NORM_TARGET_VALUE,
                 track_cell_norms: bool = False):
        if proj_size != 0:
            raise ValueError(f"LSTM: proj_size expected 0 (rnnreg_kernels has no projected "
                             f"LSTM), got {proj_size!r}; use torch.nn.LSTM for proj_size > 0")
        super().__init__("LSTM", "lstm", input_size, hidden_size, num_layers, bias,
                         batch_first, dropout, bidirectional, device, dtype, theta=1.0,
                         **_extras(locals()))
        self.reset_parameters()
