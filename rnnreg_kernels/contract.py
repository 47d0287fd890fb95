"""The backend contract: what every backend (reference, triton, cuda) receives and returns.

``ops.recurrence`` checks the user's arguments, turns them into a :class:`Spec` plus plain
tensors, and calls a backend's ``forward`` / ``backward``.  Backends know nothing of autograd;
``ops`` knows nothing of kernels.

Conventions every backend follows (DESIGN.md section 2, made exact here):

* ``T`` steps are processed in *processing order* k = 1..L_b for row b (L_b = T without
  ``lengths``).  Forward direction: step k reads ``x_proj[k-1]`` and writes ``output[k-1]``.
  ``reverse=True``: step k reads and writes time position ``L_b - k`` (each row starts at its
  own last valid position).  Output positions a row never reaches are zero.
* ``norms[k, b]`` (k = 0..T) is ``sqrt(sum_i h_{k,i}^2 + H * ns_eps)`` of the state after k
  processing steps (k = 0 is h0); entries with k > L_b are 0.  dtype: float64 for float64
  input, float32 otherwise (``acc_dtype``).
* ``terms`` is a 1-D tensor of 3 values (``acc_dtype``): the weighted norm-stabilizer, TAR and
  AR terms, using the precomputed weights ``Spec.w_ns``, ``w_tar``, ``w_ar``:
      NS  = w_ns  * sum_b sum_{k in S_b} (n_k - n_{k-1})^2,  S_b = {2..L_b} or {1..L_b}
      TAR = w_tar * sum_b sum_{k=2..L_b} ||h_k - h_{k-1}||^2
      AR  = w_ar  * sum_b sum_{k=1..L_b} ||m_b * h_k||^2       (m = ar_mask or 1)
  A weight of 0 means the term is off (the kernel may skip it; the term is exactly 0).
* Backward gets the upstream gradients (zeros where autograd had none) and the tensors that
  its own forward returned in ``saved``; it returns grads for x_proj, w_hh, h0, c0 and
  cell_scale (c0 grad None for cells without a cell state, cell_scale grad None unless
  normprop).  Penalty gradients (DESIGN.md section 2) with the weights above:
      NS : dL/dh_k += g_ns  * 2 w_ns  * (d_k - d_{k+1}) * h_k / n_k, d_k = n_k - n_{k-1} for
           k in S_b else 0, d_{L_b+1} = 0; with ns_include_initial also
           dL/dh_0 += -g_ns * 2 w_ns * d_1 * h_0 / n_0
      TAR: dL/dh_k += g_tar * 2 w_tar * ((h_k - h_{k-1})[k>=2] - (h_{k+1} - h_k)[k<=L_b-1])
      AR : dL/dh_k += g_ar  * 2 w_ar  * m^2 * h_k
* ``h_n`` / ``c_n`` are the state after step L_b; all outputs have the dtype of ``x_proj``
  except ``norms`` and ``terms``.  Internally c, norms and penalty sums stay in ``acc_dtype``.

A fused backend module (``rnnreg_kernels.triton``, ``rnnreg_kernels.cuda``) exposes:

    unavailable_reason(device: torch.device) -> str | None
        None when the backend can run on this device at all, else why not and what to install.
    unsupported_reason(spec: Spec, x_proj, w_hh) -> str | None
        None when this case (dtype, H, B, ...) runs, else why not and which backend would.
    forward(spec, x_proj, w_hh, h0, c0, ar_mask, lengths, cell_scale)
        -> (output, h_n, c_n, terms, norms, cell_norms, saved: tuple[Tensor, ...])
    backward(spec, x_proj, w_hh, h0, c0, ar_mask, lengths, cell_scale, output, norms,
             cell_norms, saved, grad_output, grad_h_n, grad_c_n, grad_terms, grad_norms,
             grad_cell_norms)
        -> (grad_x_proj, grad_w_hh, grad_h0, grad_c0, grad_cell_scale)

Cell states, differentiable norms and the normprop cell (issue 12):

* ``cell == "normprop"`` (Recurrent Normalization Propagation) is the LSTM cell with
  ``h_k = o * tanh(a * c_k) * s``: ``a`` is ``cell_scale [H]`` (= gamma_c / sigma_c, an input
  with a gradient, ``acc_dtype``), ``s`` is ``Spec.h_scale`` (= 1 / sigma_h, a constant; 1.0
  for every other cell).  Everything else (gates, c, saved tensors, lengths, reverse,
  penalties) is the LSTM's.  ``has_cell_state(cell)`` is True for "lstm" and "normprop";
  ``cell_scale`` is None for every other cell.  Backward: with ``tc = tanh(a * c_k)``,
  ``do = dh * tc * s``, ``dc += dh * o * s * a * (1 - tc^2)``, and
  ``grad_cell_scale[j] = sum_{k, b} dh * o * s * (1 - tc^2) * c_k`` (valid steps only),
  returned in ``acc_dtype``.
* ``Spec.cell_norms`` (only for cells with a cell state): the forward also returns
  ``cell_norms [T+1, B]`` (``acc_dtype``), ``m_k = sqrt(sum_i c_{k,i}^2 + H * ns_eps)`` of the
  cell state after k processing steps (k = 0 is c0; 0 for k > L_b), else None.
* ``norms`` and ``cell_norms`` are differentiable outputs: backward receives
  ``grad_norms [T+1, B]`` and ``grad_cell_norms [T+1, B]`` (``acc_dtype``; None when autograd
  had no gradient for them, then they count as zero) and adds the radial terms, for
  k = 1..L_b (entries past L_b are ignored: those norms are constants):
      dL/dh_k += grad_norms[k]      * h_k / n_k     (before the cell backward of step k)
      dL/dc_k += grad_cell_norms[k] * c_k / m_k     (into dc before the cell backward of step k)
      grad_h0 += grad_norms[0] * h0 / n0,  grad_c0 += grad_cell_norms[0] * c0 / m0
  (a zero norm, possible only with ns_eps = 0, contributes 0).  The terms that depend only on
  the norms (the cell norm-stabilizer, norm_target, a user's own norm penalty) are computed
  by ``ops`` from these outputs, so their gradients reach the kernels through these inputs.

``x_proj`` is handed to ``backward`` only when the backend module sets ``SAVE_X_PROJ = True``
(it then stays alive until backward); otherwise backward gets None there, so that no extra
``[T, B, G*H]`` buffer is kept beyond what the backend returns in ``saved``.

Tensors handed to backends: ``x_proj [T, B, G*H]``, ``w_hh [G*H, H]``, ``h0 [B, H]``,
``c0 [B, H]`` or None (cells with a cell state only), all contiguous, one device, one floating
dtype; ``ar_mask [B, H]`` (same dtype) or None; ``lengths [B]`` int64 on the same device,
values in 1..T, or None; ``cell_scale [H]`` (``acc_dtype``, contiguous) or None.
``grad_terms`` is a ``[3]`` tensor of ``acc_dtype``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

CELLS = ("lstm", "relu", "tanh", "trec", "normprop")
LSTM_CELLS = ("lstm", "normprop")  # the cells with a cell state c and four gates


def has_cell_state(cell: str) -> bool:
    """True for the LSTM-type cells ("lstm", "normprop"): four gates and a cell state."""
    return cell in LSTM_CELLS


def gates_of(cell: str) -> int:
    """G: 4 for the LSTM-type cells, 1 for the plain RNN cells."""
    return 4 if cell in LSTM_CELLS else 1


def acc_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / state dtype for an input dtype: float64 stays float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Spec:
    """Non-tensor description of one recurrence call, as a backend sees it.

    ``w_ns``, ``w_tar``, ``w_ar`` are the penalty coefficients already divided by their counts
    (beta / |S|, beta / (sum_b (L_b - 1) * H), alpha / (sum_b L_b * H)); 0 when the term is off
    or its sum is empty.
    """

    cell: str
    theta: float
    w_ns: float
    w_tar: float
    w_ar: float
    ns_include_initial: bool
    ns_eps: float
    reverse: bool
    allow_tf32: bool = False
    h_scale: float = 1.0      # normprop: 1 / sigma_h; 1.0 for every other cell
    cell_norms: bool = False  # cells with a cell state: also return cell_norms [T+1, B]

    @property
    def gates(self) -> int:
        return gates_of(self.cell)

    @property
    def has_cell_state(self) -> bool:
        return has_cell_state(self.cell)

    @property
    def any_penalty(self) -> bool:
        return self.w_ns != 0.0 or self.w_tar != 0.0 or self.w_ar != 0.0
