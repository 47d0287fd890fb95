"""The shared implementation of the drop-in ``LSTM``, ``RNN`` and ``IRNN`` modules with fused
activation regularizers (:mod:`rnnreg_kernels.nn.lstm`, :mod:`rnnreg_kernels.nn.rnn`;
:class:`rnnreg_kernels.NormPropLSTM`, in :mod:`rnnreg_kernels.nn.normprop`, shares it too:
only its parameters and weight transforms differ).

The modules accept what ``torch.nn.LSTM`` / ``torch.nn.RNN`` accept (same constructor
arguments in the same order, same parameter names and shapes, so ``state_dict`` loads both
ways; time-major, ``batch_first``, unbatched 2-D and ``PackedSequence`` input; the same ``hx``
handling and returns) and add the activation regularizers of DESIGN.md section 2 as keyword
arguments.  They contain no kernels and no autograd: each layer and direction is

    x_proj = F.linear(layer_input, weight_ih, bias_ih + bias_hh)         # one GEMM, [T, B, G*H]
    recurrence(x_proj, weight_hh, h0, c0, cell=..., penalties=..., lengths=..., reverse=...,
               backend=module.backend, theta=...)

After each forward the module holds

* ``module.penalty``: 0-dim tensor in the autograd graph, the sum of the terms below; add it to
  the loss (a zero tensor of the accumulation dtype when no penalty is active);
* ``module.penalty_terms``: ``{"norm_stabilizer", "tar", "ar", "cell_norm_stabilizer",
  "norm_target"}`` -> 0-dim tensors, already weighted by their coefficients;
* ``module.hidden_norms``: list of ``num_layers * num_directions`` ``[T+1, B]`` tensors
  (layer-major like ``h_n``), ``||h_k|| = sqrt(sum_i h_{k,i}^2 + H * ns_eps)`` after k processing
  steps (k = 0 is the initial state; a reverse direction counts from each row's last valid
  step; entries past a row's length 0); rows in the caller's batch order, also for a
  ``PackedSequence``.  They are in the autograd graph: any differentiable function of them is a
  penalty (its gradient reaches the kernels as the radial term ``(dL/dn_k) h_k / n_k``);
* ``module.cell_norms``: the same for the memory cells ``||c_k||`` (LSTM, NormPropLSTM) when a
  forward computes them (``cell_norm_stabilizer > 0`` or ``track_cell_norms=True``: every layer
  and direction), else None.

Penalty conventions (decided by the project lead):

* ``penalty_layers="last"`` (default) penalizes the last layer's hidden states, ``"all"`` every
  layer's; terms are summed over the penalized layers.
* In a bidirectional layer each term is the mean of the two directions' terms (each direction
  runs with half the coefficient), so the layer counts like its concatenated output for AR and
  TAR; the norm-stabilizer is the mean of the two directions' norm-stabilizers.
* ``ar_mask`` (forward keyword, ``[B, H]`` applied to every direction or ``[B, D*H]`` split
  between the directions; ``[H]`` / ``[D*H]`` for unbatched input) multiplies h before AR in the
  penalized layers, in the caller's batch order.
* ``cell_norm_stabilizer`` is the norm-stabilizer's formula on ``||c_t||`` (same S,
  ``ns_include_initial``, ``ns_eps``); ``norm_target`` is ``alpha / sum_b L_b * sum_b sum_{t=1..L_b}
  (||h_t|| - norm_target_value)^2``.  Both follow ``penalty_layers`` and the bidirectional mean.

Other extras: ``weight_drop`` is DropConnect on ``weight_hh_l{k}{_reverse}`` in training mode as
in awd-lstm-lm (``F.dropout`` on the weight, one mask per forward and weight, scaled by
1/(1-p)); weights are read by attribute name at every forward, so awd-lstm-lm's ``WeightDrop``
(which replaces ``module.weight_hh_l0`` by a plain tensor before each forward) keeps working;
``output_dropout`` is awd-lstm-lm's final locked dropout on the returned output (one ``[B, D*H]``
mask per forward, ``output_dropout_mask``; AR on the dropped output, TAR and the norm-stabilizer
on the raw one) and ``dropout_mode="locked"`` makes ``dropout`` between layers locked too
(awd's ``dropouth``); ``flatten_parameters()`` is a no-op; ``backend`` ("auto", "reference",
"naive", "triton", "cuda", "native") may be changed after construction.  When it resolves to
``native`` (``auto`` on the CPU), :mod:`rnnreg_kernels.nn.native_path` runs whole layers through
PyTorch's own RNN kernels instead of one ``recurrence`` per layer and direction; a stack with
``penalty_layers="last"`` is then one call, and ``hidden_norms`` is ``None`` for its inner
layers (with ``output_dropout`` active, ``dropout_mode="locked"``, under ``torch.compile`` or a
torch.func transform, for the normprop cell and whenever cell norms are needed, which PyTorch's
kernels do not expose, the layers go through ``recurrence`` one by one instead).  ``proj_size > 0`` is not supported
(``ValueError``; ``RNN`` / ``IRNN`` reject any ``proj_size`` with ``nn.RNN``'s message).
``_flat_weights`` lists the weights in ``_flat_weights_names`` order, read by name at each
access.  Before the first forward ``penalty`` is a 0-dim zero tensor and ``penalty_terms``
holds zeros.
``dropout`` is as in ``nn.LSTM``: ``F.dropout`` on every layer's output but the last, in
training mode.  The classes derive from ``nn.Module``, not ``nn.RNNBase``: TorchDynamo graph-breaks
on every ``nn.RNNBase``, and nothing here needs cuDNN's flat weight buffer.

A ``PackedSequence`` runs padded in its sorted order with per-row ``lengths`` derived from
``batch_sizes`` (a reverse direction starts at each row's own last step); ``hx`` is permuted by
``sorted_indices`` and ``h_n`` / ``c_n`` back by ``unsorted_indices`` exactly as ``nn.LSTM``
does, and the output is a ``PackedSequence`` with the same indices.  Bad input raises what
``nn.LSTM`` / ``nn.RNN`` raise (same exception type and message: input size, input rank, ``hx``
rank and shape, input dtype versus the weights, empty sequence); a few cases that ``nn.LSTM``
reports obscurely or not at all (``hx`` dtype or device, packed input of the wrong size) get a
``RuntimeError`` that says what to do.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ..contract import LSTM_CELLS, acc_dtype_of, has_cell_state
from . import native_path
from .dropout import check_probability, locked_mask
from ..ops import recurrence
from ..penalties import DEFAULT_NORM_TARGET, TERM_NAMES, Penalties

_NOT_GIVEN = object()  # RNN / IRNN: ``proj_size`` given at all (nn.RNN rejects any value)
_PROJ_SIZE_RNN = "proj_size argument is only supported for LSTM, not RNN or GRU"

_OUTPUT_ATTRS = ("_penalty", "_penalty_terms", "hidden_norms", "cell_norms")
_NORM_TARGET_VALUE = DEFAULT_NORM_TARGET  # r of the norm_target term (||h_t|| - r)^2


# the keyword-only extras every drop-in takes and hands on to _RecurrentBase unchanged
EXTRA_KEYWORDS = ("norm_stabilizer", "tar", "ar", "ns_include_initial", "ns_eps",
                  "penalty_layers", "weight_drop", "backend", "output_dropout", "dropout_mode",
                  "cell_norm_stabilizer", "norm_target", "norm_target_value",
                  "track_cell_norms")


def _extras(values: dict) -> dict:
    """The :data:`EXTRA_KEYWORDS` out of a drop-in constructor's ``locals()``."""
    return {name: values[name] for name in EXTRA_KEYWORDS}


def _check_coefficient(owner: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner}: {name} expected a non-negative finite number, got {value!r}")
    return float(value)


def _check_finite(owner: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value):
        raise ValueError(f"{owner}: {name} expected a finite number, got {value!r}")
    return float(value)


def _packed_to_padded(data: torch.Tensor, batch_sizes: torch.Tensor):
    """``[N, F]`` packed data -> (``[T, B, F]`` zero-padded, ``[N]`` flat positions, ``[B]``
    int64 lengths), rows in the packed (sorted) order.

    ``positions`` (on the data's device) are the indices of the packed entries in the
    flattened ``[T*B]`` grid; they repack an output with ``index_select``.  Index and lengths
    are built on the CPU (``batch_sizes`` lives there), so nothing waits for the device;
    ``recurrence`` checks and counts the CPU lengths and moves them itself.
    """
    steps, batch = batch_sizes.numel(), int(batch_sizes[0])
    valid = torch.arange(batch).unsqueeze(0) < batch_sizes.unsqueeze(1)  # [T, B]
    lengths = valid.sum(0)
    positions = valid.reshape(-1).nonzero().squeeze(1).to(data.device)
    padded = data.new_zeros(steps * batch, data.shape[-1]).index_copy(0, positions, data)
    return padded.view(steps, batch, -1), positions, lengths


def _total(terms: dict) -> torch.Tensor:
    """The sum of the weighted terms, in ``TERM_NAMES`` order."""
    values = [terms[name] for name in TERM_NAMES]
    total = values[0]
    for value in values[1:]:
        total = total + value
    return total


class _RecurrentBase(nn.Module):
    """Shared implementation of :class:`LSTM`, :class:`RNN` and :class:`IRNN`."""

    def __init__(self, mode: str, cell: str, input_size: int, hidden_size: int,
                 num_layers: int, bias: bool, batch_first: bool, dropout: float,
                 bidirectional: bool, device, dtype, *, norm_stabilizer: float, tar: float,
                 ar: float, ns_include_initial: bool, ns_eps: float, penalty_layers: str,
                 weight_drop: float, backend: str, theta: float, output_dropout: float = 0.0,
                 dropout_mode: str = "standard", cell_norm_stabilizer: float = 0.0,
                 norm_target: float = 0.0, norm_target_value: float = _NORM_TARGET_VALUE,
                 track_cell_norms: bool = False):
        super().__init__()
        name = type(self).__name__
        if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) \
                or not 0 <= dropout <= 1:
            raise ValueError("dropout should be a number in range [0, 1] representing the "
                             "probability of an element being zeroed")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so "
                          "non-zero dropout expects num_layers greater than 1, but got "
                          f"dropout={dropout} and num_layers={num_layers}", stacklevel=3)
        for arg, value in (("bias", bias), ("batch_first", batch_first),
                           ("bidirectional", bidirectional)):
            if not isinstance(value, bool):
                raise TypeError(f"{arg} should be of type bool, got: {type(value).__name__}")
        for arg, value in (("input_size", input_size), ("hidden_size", hidden_size),
                           ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{arg} should be of type int, got: {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"{arg} must be greater than zero")
        if not isinstance(ns_include_initial, bool):
            raise ValueError(f"{name}: ns_include_initial expected a bool, "
                             f"got {ns_include_initial!r}")
        if penalty_layers not in ("last", "all"):
            raise ValueError(f"{name}: penalty_layers expected 'last' or 'all', "
                             f"got {penalty_layers!r}")
        if isinstance(weight_drop, bool) or not isinstance(weight_drop, numbers.Real) \
                or not 0 <= weight_drop < 1:
            raise ValueError(f"{name}: weight_drop expected a number in [0, 1), "
                             f"got {weight_drop!r}")
        if not isinstance(backend, str):
            raise ValueError(f"{name}: backend expected a str such as 'auto', "
                             f"got {type(backend).__name__}")
        if isinstance(theta, bool) or not isinstance(theta, numbers.Real) \
                or not math.isfinite(theta):
            raise ValueError(f"{name}: theta expected a finite number, got {theta!r}")
        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = 0
        self.norm_stabilizer = _check_coefficient(name, "norm_stabilizer", norm_stabilizer)
        self.tar = _check_coefficient(name, "tar", tar)
        self.ar = _check_coefficient(name, "ar", ar)
        self.ns_include_initial = ns_include_initial
        self.ns_eps = _check_coefficient(name, "ns_eps", ns_eps)
        self.cell_norm_stabilizer = _check_coefficient(name, "cell_norm_stabilizer",
                                                       cell_norm_stabilizer)
        self.norm_target = _check_coefficient(name, "norm_target", norm_target)
        self.norm_target_value = _check_finite(name, "norm_target_value", norm_target_value)
        if not isinstance(track_cell_norms, bool):
            raise ValueError(f"{name}: track_cell_norms expected a bool, "
                             f"got {track_cell_norms!r}")
        if not has_cell_state(cell):
            for arg, value in (("cell_norm_stabilizer", self.cell_norm_stabilizer),
                               ("track_cell_norms", track_cell_norms)):
                if value:
                    raise ValueError(
                        f"{name}: {arg} needs a memory cell, which only the cells "
                        f"{', '.join(LSTM_CELLS)} have (rnnreg_kernels.LSTM, NormPropLSTM); "
                        f"got {arg}={value!r} for the {cell!r} cell")
        self.track_cell_norms = track_cell_norms
        self.penalty_layers = penalty_layers
        self.weight_drop = float(weight_drop)
        self.output_dropout = check_probability(name, "output_dropout", output_dropout)
        if dropout_mode not in ("standard", "locked"):
            raise ValueError(f"{name}: dropout_mode expected 'standard' or 'locked', "
                             f"got {dropout_mode!r}")
        self.dropout_mode = dropout_mode
        self.output_dropout_mask: Optional[torch.Tensor] = None
        self.backend = backend
        self.theta = float(theta)
        self._cell = cell
        self._penalty: Optional[torch.Tensor] = None
        self._penalty_terms: Optional[dict] = None
        self.hidden_norms: Optional[list] = None
        self.cell_norms: Optional[list] = None

        directions = 2 if bidirectional else 1
        factory = {"device": device, "dtype": dtype}
        self._flat_weights_names = []
        self._all_weights = []
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size * directions
            for direction in range(directions):
                suffix = "_reverse" if direction == 1 else ""
                names = []
                for stem, shape in self._direction_shapes(layer_input):
                    pname = f"{stem}_l{layer}{suffix}"
                    setattr(self, pname, nn.Parameter(torch.empty(shape, **factory)))
                    names.append(pname)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)

    def _direction_shapes(self, layer_input: int) -> list:
        """``(stem, shape)`` of one layer and direction's parameters, in ``nn.LSTM``'s order
        (``weight_ih``, ``weight_hh``, then ``bias_ih``, ``bias_hh`` when ``bias``)."""
        gh, hidden = self.gates * self.hidden_size, self.hidden_size
        shapes = [("weight_ih", (gh, layer_input)), ("weight_hh", (gh, hidden))]
        if self.bias:
            shapes += [("bias_ih", (gh,)), ("bias_hh", (gh,))]
        return shapes

    def _projection(self, idx: int, layer_input: torch.Tensor) -> tuple:
        """Layer and direction ``idx``'s op inputs: ``(x_proj [T, B, G*H], w_hh [G*H, H],
        cell keywords of recurrence())`` (DropConnect on ``weight_hh`` in training)."""
        weights = [getattr(self, n) for n in self._all_weights[idx]]
        w_ih, w_hh = weights[0], weights[1]
        if self.weight_drop and self.training:
            w_hh = F.dropout(w_hh, self.weight_drop, True)
        bias = weights[2] + weights[3] if self.bias else None
        x_proj = F.linear(layer_input, w_ih, bias)  # autocast may change its dtype
        return x_proj, w_hh.to(x_proj.dtype), {}

    @property
    def gates(self) -> int:
        """G: 4 for the LSTM-type cells, 1 for the plain RNN cells."""
        return 4 if has_cell_state(self._cell) else 1

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def needs_cell_norms(self) -> bool:
        """Whether a forward computes ``cell_norms`` (``track_cell_norms`` or a cell
        norm-stabilizer)."""
        return has_cell_state(self._cell) and (self.track_cell_norms
                                                or self.cell_norm_stabilizer > 0)

    def _zero_penalty(self) -> torch.Tensor:
        w = getattr(self, self._flat_weights_names[0])
        return torch.zeros((), dtype=acc_dtype_of(w.dtype), device=w.device)

    @property
    def penalty(self) -> torch.Tensor:
        """The last forward's weighted penalty sum (0-dim, in the graph); a zero tensor of
        the weights' accumulation dtype before the first forward."""
        return self._zero_penalty() if self._penalty is None else self._penalty

    @penalty.setter
    def penalty(self, value) -> None:
        self._penalty = value

    @property
    def penalty_terms(self) -> dict:
        """The last forward's weighted terms by name; zero tensors before the first forward."""
        if self._penalty_terms is None:
            return dict.fromkeys(TERM_NAMES, self._zero_penalty())
        return self._penalty_terms

    @penalty_terms.setter
    def penalty_terms(self, value) -> None:
        self._penalty_terms = value

    @property
    def _flat_weights(self) -> list:
        """The weights in ``_flat_weights_names`` order, read by name at every access (so a
        weight replaced by ``weight_norm``, pruning or awd-lstm-lm's ``WeightDrop`` shows)."""
        return [getattr(self, n) for n in self._flat_weights_names]

    @property
    def all_weights(self) -> list:
        """Per layer and direction, the weights in ``nn.LSTM``'s order (read by name)."""
        return [[getattr(self, n) for n in names] for names in self._all_weights]

    def reset_parameters(self) -> None:
        """``U(-1/sqrt(hidden_size), 1/sqrt(hidden_size))`` for every weight, as ``nn.LSTM``."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def flatten_parameters(self) -> None:
        """No-op (there is no cuDNN weight buffer to compact); kept for ``nn.LSTM`` callers."""
        return None

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.mode.startswith("RNN_") and type(self).__name__ == "RNN":
            s += f", nonlinearity={self.nonlinearity!r}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if self.batch_first is not False:
            s += f", batch_first={self.batch_first}"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if self.bidirectional is not False:
            s += f", bidirectional={self.bidirectional}"
        for extra in ("norm_stabilizer", "tar", "ar", "cell_norm_stabilizer", "norm_target",
                      "weight_drop", "output_dropout"):
            if getattr(self, extra):
                s += f", {extra}={getattr(self, extra)}"
        if self.norm_target:
            s += f", norm_target_value={self.norm_target_value}"
        if self.track_cell_norms:
            s += ", track_cell_norms=True"
        if self.dropout_mode != "standard":
            s += f", dropout_mode={self.dropout_mode!r}"
        if self.penalty_layers != "last":
            s += f", penalty_layers={self.penalty_layers!r}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s

    def __getstate__(self):
        # The per-forward results hold autograd graphs: never pickle or deep-copy them.
        state = self.__dict__.copy()
        for attr in _OUTPUT_ATTRS:
            state[attr] = None
        return state

    # ---------------------------------------------------------------- argument checks

    def _weight_dtype(self) -> torch.dtype:
        return getattr(self, self._flat_weights_names[0]).dtype

    def _check_input(self, input: torch.Tensor, expected_dim: int) -> None:
        if input.dtype != self._weight_dtype() \
                and not torch.is_autocast_enabled(input.device.type):
            w = self._weight_dtype()
            raise ValueError(f"RNN input dtype ({input.dtype}) does not match weight dtype "
                             f"({w}). Convert input: input.to({w}), or convert model: "
                             f"model.to({input.dtype})")
        if input.dim() != expected_dim:
            raise RuntimeError(f"input must have {expected_dim} dimensions, got {input.dim()}")
        if input.size(-1) != self.input_size:
            raise RuntimeError("input.size(-1) must be equal to input_size. Expected "
                               f"{self.input_size}, got {input.size(-1)}")

    def _check_state(self, state: torch.Tensor, expected: tuple, msg: str,
                     input: torch.Tensor) -> None:
        if state.size() != expected:
            raise RuntimeError(msg.format(expected, list(state.size())))
        if state.device != input.device:
            raise RuntimeError("Input and hidden tensors are not at the same device, found "
                               f"input tensor at {input.device} and hidden tensor at "
                               f"{state.device}")
        if state.dtype != input.dtype and not torch.is_autocast_enabled(input.device.type):
            raise RuntimeError(f"hx dtype ({state.dtype}) does not match input dtype "
                               f"({input.dtype}); convert hx: hx.to({input.dtype})")

    def _hx_ranks(self, hx, batched: bool) -> None:
        """nn.LSTM / nn.RNN's rank checks of ``hx`` for plain (not packed) input."""
        want = 3 if batched else 2
        kind = "batched 3-D" if batched else "unbatched 2-D"
        if has_cell_state(self._cell):
            if hx[0].dim() != want or hx[1].dim() != want:
                raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but "
                                   f"got ({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
        elif hx.dim() != want:
            raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got "
                               f"{hx.dim()}-D tensor")

    def _ar_masks(self, ar_mask, batch: int, batched: bool, sorted_indices):
        """The ``[B, H]`` AR mask of each direction (rows in processing order), or Nones."""
        directions, hidden = self.num_directions, self.hidden_size
        if ar_mask is None:
            return [None] * directions
        if not isinstance(ar_mask, torch.Tensor) or not ar_mask.is_floating_point():
            raise ValueError("ar_mask: expected a floating [B, H] or [B, D*H] tensor, got "
                             f"{getattr(ar_mask, 'dtype', type(ar_mask).__name__)}")
        mask = ar_mask if batched else ar_mask.unsqueeze(0)
        allowed = [(batch, hidden), (batch, directions * hidden)]
        if tuple(mask.shape) not in allowed:
            raise ValueError(f"ar_mask: expected shape [B, H] = [{batch}, {hidden}] or "
                             f"[B, D*H] = [{batch}, {directions * hidden}]"
                             f"{'' if batched else ' (without B for unbatched input)'}, "
                             f"got {list(ar_mask.shape)}")
        if sorted_indices is not None:
            mask = mask.index_select(0, sorted_indices)
        if mask.shape[1] == hidden:
            return [mask] * directions
        return [mask[:, d * hidden:(d + 1) * hidden].contiguous() for d in range(directions)]

    # ---------------------------------------------------------------- forward

    def forward(self, input, hx=None, *, ar_mask: Optional[torch.Tensor] = None):
        """Run the stacked recurrence; see the class docstrings for shapes and returns."""
        is_lstm = has_cell_state(self._cell)
        layers, directions, hidden = self.num_layers, self.num_directions, self.hidden_size
        packed = isinstance(input, PackedSequence)
        sorted_indices = unsorted_indices = None
        lengths = positions = None
        batched = True
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            self._check_input(data, 2)
            x, positions, lengths = _packed_to_padded(data, batch_sizes)
            ref = data
        else:
            if not isinstance(input, torch.Tensor) or input.dim() not in (2, 3):
                got = input.dim() if isinstance(input, torch.Tensor) else type(input).__name__
                raise ValueError(f"{'LSTM' if is_lstm else 'RNN'}: Expected input to be 2D or "
                                 f"3D, got {got}D{'' if is_lstm else ' tensor'} instead")
            batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            x = input if batched else input.unsqueeze(batch_dim)
            if hx is not None:
                self._hx_ranks(hx, batched)
                if not batched:
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1)) if is_lstm else hx.unsqueeze(1)
            self._check_input(x, 3)
            if self.batch_first:
                x = x.transpose(0, 1)
            ref = x
        steps, batch = x.shape[0], x.shape[1]
        expected = (layers * directions, batch, hidden)
        if hx is None:
            h0 = ref.new_zeros(expected)
            c0 = ref.new_zeros(expected) if is_lstm else None
        else:
            h0, c0 = (hx[0], hx[1]) if is_lstm else (hx, None)
            if is_lstm:
                self._check_state(h0, expected, "Expected hidden[0] size {}, got {}", ref)
                self._check_state(c0, expected, "Expected hidden[1] size {}, got {}", ref)
            else:
                self._check_state(h0, expected, "Expected hidden size {}, got {}", ref)
            if sorted_indices is not None:
                h0 = h0.index_select(1, sorted_indices)
                c0 = c0.index_select(1, sorted_indices) if is_lstm else None
        if steps == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        masks = self._ar_masks(ar_mask, batch, batched, sorted_indices)
        out_mask = last_masks = None
        if self.output_dropout and self.training and batch > 0:
            if ar_mask is not None:
                raise ValueError("ar_mask: not allowed with output_dropout in training mode (AR "
                                 "is then taken on the output-dropped output, whose mask the "
                                 "module draws); pass one or the other")
            out_mask = locked_mask(batch, directions * hidden, self.output_dropout, x)
            last_masks = [out_mask[:, d * hidden:(d + 1) * hidden] for d in range(directions)]

        if batch == 0:
            out, h_n, c_n = self._empty_forward(x, h0, c0)
        else:
            out, h_n, c_n = self._layers(x, h0, c0, lengths, masks, last_masks)
        if out_mask is not None:
            out = out * out_mask.to(out.dtype).unsqueeze(0)
            if unsorted_indices is not None:
                out_mask = out_mask.index_select(0, unsorted_indices)
            out_mask = out_mask if batched else out_mask.squeeze(0)
        self.output_dropout_mask = out_mask
        if unsorted_indices is not None:
            h_n = h_n.index_select(1, unsorted_indices)
            c_n = c_n.index_select(1, unsorted_indices) if is_lstm else None
            self.hidden_norms = [None if n is None else n.index_select(1, unsorted_indices)
                                 for n in self.hidden_norms]
            if self.cell_norms is not None:
                self.cell_norms = [None if n is None else n.index_select(1, unsorted_indices)
                                   for n in self.cell_norms]
        hidden_out = (h_n, c_n) if is_lstm else h_n
        if packed:
            flat = out.reshape(steps * batch, out.shape[-1]).index_select(0, positions)
            return PackedSequence(flat, batch_sizes, sorted_indices, unsorted_indices), hidden_out
        if self.batch_first:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(0 if self.batch_first else 1)
            hidden_out = (h_n.squeeze(1), c_n.squeeze(1)) if is_lstm else h_n.squeeze(1)
        return out, hidden_out

    def _penalties(self, penalize: bool, mask: Optional[torch.Tensor]) -> Penalties:
        if not penalize:
            return Penalties(ns_eps=self.ns_eps)
        share = float(self.num_directions)
        return Penalties(norm_stabilizer=self.norm_stabilizer / share, tar=self.tar / share,
                         ar=self.ar / share, ns_include_initial=self.ns_include_initial,
                         ns_eps=self.ns_eps, ar_mask=mask if self.ar else None,
                         cell_norm_stabilizer=self.cell_norm_stabilizer / share,
                         norm_target=self.norm_target / share,
                         norm_target_value=self.norm_target_value)

    def _layers(self, x, h0, c0, lengths, masks, last_masks=None):
        """Time-major ``[T, B, F]`` -> (``[T, B, D*H]``, ``h_n``, ``c_n``); sets the extras.

        ``masks``: the per-direction AR masks of the penalized layers; ``last_masks``, when
        given, replaces them in the last layer (the output-dropout mask)."""
        # --- native backend: whole layers / the whole stack through torch._VF (its own file);
        # awd's output dropout and locked dropout between layers, traced graphs and torch.func
        # transforms take the per-layer path below
        if (last_masks is None and self.dropout_mode == "standard"
                and not torch.compiler.is_compiling()
                and not torch._C._are_functorch_transforms_active()  # _VF has no vmap rule
                and native_path.use_native(self, x)):
            return native_path.run_layers(self, x, h0, c0, lengths, masks)
        # --- every other backend: one recurrence() per layer and direction
        is_lstm = has_cell_state(self._cell)
        directions = self.num_directions
        terms = dict.fromkeys(TERM_NAMES)
        h_n, c_n, norms, cell_norms = [], [], [], []
        want_cell_norms = self.needs_cell_norms
        layer_input = x
        for layer in range(self.num_layers):
            last = layer == self.num_layers - 1
            penalize = self.penalty_layers == "all" or last
            layer_masks = last_masks if last and last_masks is not None else masks
            outs = []
            for direction in range(directions):
                idx = layer * directions + direction
                x_proj, w_hh, cell_kw = self._projection(idx, layer_input)
                res = recurrence(
                    x_proj, w_hh, h0[idx].to(x_proj.dtype),
                    c0[idx].to(x_proj.dtype) if is_lstm else None, cell=self._cell,
                    penalties=self._penalties(penalize, layer_masks[direction]), lengths=lengths,
                    reverse=direction == 1, backend=self.backend, theta=self.theta,
                    cell_norms=want_cell_norms, **cell_kw)
                outs.append(res.output)
                h_n.append(res.h_n)
                if is_lstm:
                    c_n.append(res.c_n)
                norms.append(res.norms)
                cell_norms.append(res.cell_norms)
                if penalize:
                    for name in TERM_NAMES:
                        value = getattr(res.terms, name)
                        terms[name] = value if terms[name] is None else terms[name] + value
            out = outs[0] if directions == 1 else torch.cat(outs, -1)
            if not last and self.dropout and self.training:
                if self.dropout_mode == "locked":
                    mask = locked_mask(out.shape[1], out.shape[2], self.dropout, out)
                    out = out * mask.unsqueeze(0)
                else:
                    out = F.dropout(out, self.dropout, True)
            layer_input = out
        self.penalty_terms = terms
        self.penalty = _total(terms)
        self.hidden_norms = norms
        self.cell_norms = cell_norms if want_cell_norms else None
        return out, torch.stack(h_n), torch.stack(c_n) if is_lstm else None

    def _empty_forward(self, x, h0, c0):
        """Batch of 0 rows (``nn.LSTM`` accepts it): empty results that stay in the graph
        (every weight, ``x`` and ``hx`` get zero gradients, as in ``nn.LSTM``), zero penalty."""
        is_lstm = has_cell_state(self._cell)
        hidden, directions = self.hidden_size, self.num_directions
        h_n, c_n = [], []
        layer_input = x
        for layer in range(self.num_layers):
            outs = []
            for direction in range(directions):
                idx = layer * directions + direction
                x_proj, w_hh, cell_kw = self._projection(idx, layer_input)   # [T, 0, G*H]
                rec = h0[idx].to(x_proj.dtype) @ w_hh.t()                     # [0, G*H]
                if cell_kw.get("cell_scale") is not None:  # NormPropLSTM: gamma_c too
                    rec = rec * cell_kw["cell_scale"].repeat(self.gates).to(rec.dtype)
                outs.append((x_proj + rec)[..., :hidden])
                h_n.append(h0[idx] + rec[:, :hidden])
                if is_lstm:
                    c_n.append(c0[idx] + rec[:, hidden:2 * hidden])
            layer_input = outs[0] if directions == 1 else torch.cat(outs, -1)
        zero = layer_input.sum().to(acc_dtype_of(x.dtype))  # exactly 0, in the graph
        self.penalty_terms = dict.fromkeys(TERM_NAMES, zero)
        self.penalty = zero
        count = self.num_layers * directions
        self.hidden_norms = [x.new_zeros(x.shape[0] + 1, 0, dtype=zero.dtype)
                             for _ in range(count)]
        self.cell_norms = ([x.new_zeros(x.shape[0] + 1, 0, dtype=zero.dtype)
                            for _ in range(count)] if self.needs_cell_norms else None)
        return layer_input, torch.stack(h_n), torch.stack(c_n) if is_lstm else None


_EXTRAS_DOC = """
    Keyword-only extras (not in torch.nn):
        norm_stabilizer: beta of the norm-stabilizer (0 = off).
        tar: beta of temporal activation regularization (0 = off).
        ar: alpha of activation regularization (0 = off).
        ns_include_initial: also penalize the step h_0 -> h_1 in the norm-stabilizer.
        ns_eps: epsilon inside the norm (1e-9).
        penalty_layers: "last" (default) or "all": whose hidden states are penalized.
        weight_drop: DropConnect probability on every ``weight_hh`` in training mode.
        output_dropout: locked (awd-lstm-lm) dropout on the returned output in training mode:
            one ``[B, D*H]`` mask per forward (``output_dropout_mask`` after it), AR taken on
            the dropped output, TAR and the norm-stabilizer on the raw one.
        dropout_mode: "standard" (``nn.LSTM``'s elementwise ``dropout`` between layers) or
            "locked" (one mask per sequence and layer, awd-lstm-lm's ``dropouth``).
        backend: "auto", "reference", "naive", "triton", "cuda" or "native"; may be changed
            later.
        norm_target: alpha of the norm target term ``alpha / sum_b L_b * sum (||h_t|| - r)^2``
            (0 = off; the norm-stabilizer paper's ``(||h|| - 5)^2`` cost).
        norm_target_value: its r (default 5.0).
        cell_norm_stabilizer: beta of the norm-stabilizer on the memory cell ``c_t`` (LSTM and
            NormPropLSTM only; 0 = off).
        track_cell_norms: compute ``module.cell_norms`` (in the graph) even without the cell
            norm-stabilizer (LSTM and NormPropLSTM only).
"""
