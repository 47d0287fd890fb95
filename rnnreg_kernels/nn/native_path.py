"""The modules' ``native`` path: whole layers (or the whole stack) through ``torch._VF``.

:func:`use_native` decides, per forward, whether a module runs here: ``backend="native"``, or
``"auto"`` when :func:`rnnreg_kernels.ops.resolve_backend` picks ``native`` for the case; never
for the normprop cell or a module that needs its cell norms (``cell_norm_stabilizer``,
``track_cell_norms``): PyTorch's kernels expose no ``c_t``.
:func:`run_layers` then replaces the per-layer, per-direction ``recurrence()`` calls of
``_RecurrentBase._layers``:

* weights are read by name at every forward (``weight_drop`` and awd-lstm-lm's WeightDrop keep
  working) and passed to ``torch._VF.lstm`` / ``rnn_relu`` / ``rnn_tanh`` in ``nn.LSTM``'s
  order; one call per layer covers both directions;
* with ``penalty_layers="last"`` and ``nn.LSTM``'s between-layer dropout, the whole stack is one
  call (``_VF``'s own dropout, as ``nn.LSTM``); the inner layers' outputs are then never
  materialized outside the kernel, so their ``hidden_norms`` entries are ``None``;
* otherwise one call per layer, ``F.dropout`` between layers as the reference path does;
* each penalized layer and direction gets one :func:`rnnreg_kernels.native.penalty_pass`
  (a reverse direction in place, never flipped), with the module's per-direction
  coefficients; every other layer's norms come from the same pass with the terms off.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..contract import Spec, gates_of
from ..native import penalty_pass, vf_call
from ..penalties import TERM_NAMES

# the cells use_native asks resolve_backend about (it answers "not native" for trec)
NATIVE_CELLS = ("lstm", "relu", "tanh", "trec")


def use_native(module, x: torch.Tensor) -> bool:
    """Whether ``module``'s backend resolves to ``native`` for input ``x [T, B, F]``."""
    from ..ops import resolve_backend

    backend = module.backend
    if backend not in ("auto", "native"):
        return False
    cell = module._cell
    if cell not in NATIVE_CELLS or getattr(module, "needs_cell_norms", False):
        # PyTorch's kernels have no normprop cell and never expose the cell states c_t: such
        # modules take the per-layer recurrence() path (where backend="native" then raises
        # recurrence's own error saying why and what runs it)
        return False
    H = module.hidden_size
    w_hh = getattr(module, module._all_weights[-1][1])
    spec = Spec(cell=cell, theta=module.theta, w_ns=0.0, w_tar=0.0, w_ar=0.0,
                ns_include_initial=module.ns_include_initial, ns_eps=module.ns_eps,
                reverse=False)  # a probe: only the cell, dtype, device and sizes matter
    probe = x.new_empty(()).expand(x.shape[0], x.shape[1], gates_of(cell) * H)
    return resolve_backend(backend, spec, probe, w_hh.to(x.dtype)) == "native"


def _params(module, layers) -> list:
    """The flat weights of ``layers`` (every direction), read by name; DropConnect applied."""
    out = []
    for layer in layers:
        for direction in range(module.num_directions):
            names = module._all_weights[layer * module.num_directions + direction]
            weights = [getattr(module, n) for n in names]
            if module.weight_drop and module.training:
                weights[1] = F.dropout(weights[1], module.weight_drop, True)
            out.extend(weights)
    return out


def run_layers(module, x, h0, c0, lengths, masks):
    """``_layers`` on the native path: ``[T, B, F]`` -> (``[T, B, D*H]``, h_n, c_n); sets the
    module's ``penalty``, ``penalty_terms`` (the five terms of each pass), ``hidden_norms``
    (differentiable) and ``cell_norms`` (None)."""
    is_lstm = module._cell == "lstm"  # use_native let no other cell with a cell state here
    D, L, H = module.num_directions, module.num_layers, module.hidden_size
    whole = module.penalty_layers == "last" \
        and getattr(module, "dropout_mode", "standard") == "standard"
    groups = [list(range(L))] if whole else [[layer] for layer in range(L)]
    if lengths is not None and int(lengths.min()) == x.shape[0]:
        lengths = None  # every row is full: the unpacked kernels compute the same thing
    dev_lengths = None if lengths is None else lengths.to(device=x.device, dtype=torch.int64)
    terms = dict.fromkeys(TERM_NAMES)
    norms = [None] * (L * D)
    h_n, c_n = [], []
    layer_input = x
    for gi, group in enumerate(groups):
        lo, hi = group[0] * D, (group[-1] + 1) * D
        hx = (h0[lo:hi], c0[lo:hi]) if is_lstm else h0[lo:hi]
        dropout = module.dropout if len(group) > 1 else 0.0
        out, hn, cn = vf_call(module._cell, layer_input, hx, _params(module, group),
                              module.bias, len(group), dropout, module.training, D == 2,
                              lengths)
        h_n.append(hn)
        if is_lstm:
            c_n.append(cn)
        layer = group[-1]
        penalize = module.penalty_layers == "all" or layer == L - 1
        for d in range(D):
            idx = layer * D + d
            pen = module._penalties(penalize, masks[d])
            states = out if D == 1 else out[..., d * H:(d + 1) * H]
            t, n = penalty_pass(states, h0[idx], pen, dev_lengths, reverse=d == 1)
            norms[idx] = n  # in the graph (its gradient is the pass's radial term)
            if penalize:
                for k, name in enumerate(TERM_NAMES):
                    terms[name] = t[k] if terms[name] is None else terms[name] + t[k]
        if gi < len(groups) - 1 and module.dropout and module.training:
            out = F.dropout(out, module.dropout, True)
        layer_input = out
    module.penalty_terms = terms
    total = terms[TERM_NAMES[0]]
    for name in TERM_NAMES[1:]:
        total = total + terms[name]
    module.penalty = total
    module.hidden_norms = norms
    module.cell_norms = None  # use_native sent every module that needs them elsewhere
    h_n = h_n[0] if len(h_n) == 1 else torch.cat(h_n, 0)
    c_n = (c_n[0] if len(c_n) == 1 else torch.cat(c_n, 0)) if is_lstm else None
    return out, h_n, c_n
