"""``NormPropLSTM``: the LSTM of Recurrent Normalization Propagation (Laurent, Ballas & Vincent).

Per layer and direction, with ``W_ih [4H, I]``, ``W_hh [4H, H]`` (gate order i, f, g, o),
row norms taken per output row and ``gamma_ih``, ``gamma_hh``, ``bias`` ``[4H]``,
``gamma_c [H]`` trainable (docs/normprop.md has the derivation):

    z_t = gamma_ih * (x_t W_ih^T / ||W_ih,row||) + gamma_hh * (h_{t-1} W_hh^T / ||W_hh,row||)
          + bias                                                                (eq. 13)
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)                           (eq. 14)
    h_t = sigmoid(o) * tanh(gamma_c * c_t / sigma_c) / sigma_h                  (eq. 15)

The row normalization and the gammas of ``W_ih`` / ``W_hh`` are weight transforms done here,
outside the op, at every forward (autograd carries their gradients):

    x_proj = F.linear(x, (gamma_ih / ||W_ih,row||)[:, None] * W_ih, bias)
    w_hh   = (gamma_hh / ||W_hh,row||)[:, None] * W_hh

and the recurrence is ``recurrence(x_proj, w_hh, h0, c0, cell="normprop",
cell_scale=gamma_c / sigma_c, h_scale=1 / sigma_h, ...)`` on whatever backend the module's
``backend`` picks (never ``native``: PyTorch's kernels have no such cell).  A weight row that is
all zero (possible only after DropConnect of a tiny layer) stays zero instead of dividing by 0.

``sigma_c`` and ``sigma_h`` are constants, computed once at construction from the initial
gammas by :func:`normprop_sigmas` and kept fixed while the gammas train.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import _EXTRAS_DOC, _NORM_TARGET_VALUE, _RecurrentBase, _extras

__all__ = ["NormPropLSTM", "normprop_sigmas", "gaussian_expectation"]

# Gauss-Hermite nodes.  The integrands (sigmoid, tanh^2) have poles near the real axis, so the
# rule converges slowly (algebraically): at 200 nodes the constants agree with a dense
# trapezoid integration to 1e-5 relative for gammas up to (2, 2, 1) and (1, 0.5, 3)
# (tests/test_normprop.py), to 3e-4 at (3, 3, 3); numpy's nodes overflow past ~360.
QUADRATURE_POINTS = 200


@functools.lru_cache(maxsize=4)
def _hermite_rule(points: int):
    return np.polynomial.hermite.hermgauss(points)


def gaussian_expectation(f, std: float, points: int = QUADRATURE_POINTS) -> float:
    """``E[f(z)]`` for ``z ~ N(0, std^2)`` by Gauss-Hermite quadrature.

    ``f`` maps a float64 numpy array to an array of the same shape.  With the physicists'
    nodes ``x_i`` and weights ``w_i`` (weight function ``exp(-x^2)``), the substitution
    ``z = sqrt(2) * std * x`` gives ``E[f(z)] = sum_i w_i f(sqrt(2) std x_i) / sqrt(pi)``
    (exact for polynomials of degree < 2 * points).
    """
    x, w = _hermite_rule(points)
    return float(np.dot(w, f(math.sqrt(2.0) * std * x)) / math.sqrt(math.pi))


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow for large |z|


def normprop_sigmas(gamma_x: float, gamma_h: float, gamma_c: float) -> Tuple[float, float]:
    """``(sigma_c, sigma_h)`` of the normprop LSTM for the initial gammas.

    With ``s = sqrt(gamma_x^2 + gamma_h^2)`` (the pre-activation of unit-norm rows applied to
    unit-variance inputs: the paper's eq. 22; its eqs. 9-10 write ``gamma_x + gamma_h``),
    ``z ~ N(0, s^2)``, ``E = E[sigmoid(z)]``, ``V = Var[sigmoid(z)]``, ``Q = E[tanh(z)^2]``
    and ``u ~ N(0, 1)``:

        sigma_c^2 = Q (V + E^2) / (1 - V - E^2)              (eq. 8)
        sigma_h^2 = E_u[tanh(gamma_c u)^2] (V + E^2)         (eq. 12)

    (``V + E^2 = E[sigmoid(z)^2]``.)  For (2, 2, 1): ``sigma_c^2 = 0.4481``,
    ``sigma_h^2 = 0.1498``.  Every gamma must be a positive finite number.
    """
    for name, value in (("gamma_x", gamma_x), ("gamma_h", gamma_h), ("gamma_c", gamma_c)):
        _check_gamma("normprop_sigmas", name, value)
    s = math.hypot(gamma_x, gamma_h)
    second = gaussian_expectation(lambda z: _sigmoid(z) ** 2, s)  # V + E^2
    q = gaussian_expectation(lambda z: np.tanh(z) ** 2, s)
    sigma_c2 = q * second / (1.0 - second)
    sigma_h2 = gaussian_expectation(lambda u: np.tanh(gamma_c * u) ** 2, 1.0) * second
    return math.sqrt(sigma_c2), math.sqrt(sigma_h2)


def _check_gamma(owner: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}: {name} expected a positive finite number, got {value!r}")
    return float(value)


def _scaled_rows(weight: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``(gamma / ||weight,row||)[:, None] * weight``; a zero row stays zero."""
    norm = torch.linalg.vector_norm(weight, dim=1)
    norm = torch.where(norm > 0, norm, torch.ones_like(norm))
    return (gamma / norm).unsqueeze(1) * weight


def _stem(name: str) -> str:
    """``"weight_ih_l1_reverse"`` -> ``"weight_ih"``."""
    return name.rsplit("_l", 1)[0]


class NormPropLSTM(_RecurrentBase):
    __doc__ = """LSTM with Recurrent Normalization Propagation (Laurent, Ballas & Vincent).

    Args: ``input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
    bidirectional=False`` as ``torch.nn.LSTM``; keyword-only ``gamma_x=2.0``, ``gamma_h=2.0``,
    ``gamma_c=1.0`` (the initial values of ``gamma_ih``, ``gamma_hh``, ``gamma_c``; the
    paper's char-PTB setting), ``device=None``, ``dtype=None``.

    Parameters per layer ``k`` and direction: ``weight_ih_l{k}{_reverse} [4H, I]``,
    ``weight_hh_l{k}{_reverse} [4H, H]`` (orthogonal per gate block at init),
    ``bias_l{k}{_reverse} [4H]`` (when ``bias``; zero at init), ``gamma_ih_l{k}{_reverse}``,
    ``gamma_hh_l{k}{_reverse}`` ``[4H]`` and ``gamma_c_l{k}{_reverse} [H]``.  Attributes
    ``sigma_c``, ``sigma_h`` (floats, fixed; :func:`normprop_sigmas`).  The equations are in
    :mod:`rnnreg_kernels.nn.normprop` and docs/normprop.md.
    """ + _EXTRAS_DOC + """
    Forward, ``hx``, returns, ``penalty``, ``penalty_terms``, ``hidden_norms`` and
    ``cell_norms``: as :class:`rnnreg_kernels.LSTM` (``weight_drop`` drops entries of the raw
    ``weight_hh`` before its rows are normalized, as awd-lstm-lm's ``WeightDrop`` replacing
    ``weight_hh_l{k}`` would).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, *, gamma_x: float = 2.0, gamma_h: float = 2.0,
                 gamma_c: float = 1.0, device=None, dtype=None,
                 norm_stabilizer: float = 0.0, tar: float = 0.0, ar: float = 0.0,
                 ns_include_initial: bool = False, ns_eps: float = 1e-9,
                 penalty_layers: str = "last", weight_drop: float = 0.0,
                 backend: str = "auto", output_dropout: float = 0.0,
                 dropout_mode: str = "standard", cell_norm_stabilizer: float = 0.0,
                 norm_target: float = 0.0, norm_target_value: float = _NORM_TARGET_VALUE,
                 track_cell_norms: bool = False):
        gammas = [_check_gamma("NormPropLSTM", name, value) for name, value in
                  (("gamma_x", gamma_x), ("gamma_h", gamma_h), ("gamma_c", gamma_c))]
        super().__init__("NormPropLSTM", "normprop", input_size, hidden_size, num_layers, bias,
                         batch_first, dropout, bidirectional, device, dtype, theta=1.0,
                         **_extras(locals()))
        self.gamma_x, self.gamma_h, self.gamma_c = gammas
        self.sigma_c, self.sigma_h = normprop_sigmas(*gammas)
        self.reset_parameters()

    def _direction_shapes(self, layer_input: int) -> list:
        gh, hidden = 4 * self.hidden_size, self.hidden_size
        shapes = [("weight_ih", (gh, layer_input)), ("weight_hh", (gh, hidden))]
        if self.bias:
            shapes.append(("bias", (gh,)))
        return shapes + [("gamma_ih", (gh,)), ("gamma_hh", (gh,)), ("gamma_c", (hidden,))]

    def _projection(self, idx: int, layer_input: torch.Tensor) -> tuple:
        p = {_stem(n): getattr(self, n) for n in self._all_weights[idx]}
        w_hh = p["weight_hh"]
        if self.weight_drop and self.training:
            w_hh = F.dropout(w_hh, self.weight_drop, True)
        x_proj = F.linear(layer_input, _scaled_rows(p["weight_ih"], p["gamma_ih"]),
                          p.get("bias"))
        w_hh = _scaled_rows(w_hh, p["gamma_hh"]).to(x_proj.dtype)
        return x_proj, w_hh, {"cell_scale": p["gamma_c"] / self.sigma_c,
                              "h_scale": 1.0 / self.sigma_h}

    def reset_parameters(self) -> None:
        """Orthogonal ``weight_ih`` / ``weight_hh`` per gate block, zero bias, the gammas at
        ``gamma_x``, ``gamma_h``, ``gamma_c``."""
        hidden = self.hidden_size
        fill = {"gamma_ih": self.gamma_x, "gamma_hh": self.gamma_h, "gamma_c": self.gamma_c,
                "bias": 0.0}
        with torch.no_grad():
            for names in self._all_weights:
                for name in names:
                    p, stem = getattr(self, name), _stem(name)
                    if stem in fill:
                        p.fill_(fill[stem])
                        continue
                    # QR has no half-precision CPU kernel: draw in float32 at least
                    work = torch.promote_types(p.dtype, torch.float32)
                    for g in range(4):
                        block = torch.empty(hidden, p.shape[1], dtype=work, device=p.device)
                        p[g * hidden:(g + 1) * hidden].copy_(nn.init.orthogonal_(block))

    def extra_repr(self) -> str:
        s = super().extra_repr()
        for name, default in (("gamma_x", 2.0), ("gamma_h", 2.0), ("gamma_c", 1.0)):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        return s
