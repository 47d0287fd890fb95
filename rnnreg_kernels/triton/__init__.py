"""The ``triton`` backend: fused Triton kernels for the recurrence, penalties and gradients.

Implements the backend contract of :mod:`rnnreg_kernels.contract`.  Importing this package
neither imports triton nor touches a GPU; the kernels load on the first ``forward``.
Runs on CUDA GPUs, and on the CPU only under ``TRITON_INTERPRET=1`` (set before triton is
imported; the tests do this).  See docs/triton.md for the launch variants.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from ..contract import CELLS, Spec

__all__ = ["unavailable_reason", "unsupported_reason", "forward", "backward"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the Triton kernels can run on ``device``, else why not and what to do."""
    if importlib.util.find_spec("triton") is None:
        return ("the triton package is not installed (pip install triton, Linux with a CUDA "
                "GPU); use backend='reference'")
    device = torch.device(device)
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (f"the triton backend needs a CUDA GPU (or TRITON_INTERPRET=1, set before triton "
            f"is imported, to run its kernels in the CPU interpreter for testing); got "
            f"device {device}: use backend='reference' on the CPU")


def unsupported_reason(spec: Spec, x_proj: torch.Tensor, w_hh: torch.Tensor) -> Optional[str]:
    """None when the kernels run this case, else why not and which backend would."""
    if spec.cell not in CELLS:
        return f"cell {spec.cell!r} is not one of {', '.join(CELLS)}"
    if spec.cell == "normprop":
        return ("cell 'normprop' is not yet in the Triton kernels; use backend='reference' "
                "(any device)")
    if spec.cell_norms:
        return ("the cell norms (cell_norms=True or a cell norm-stabilizer) are not yet in "
                "the Triton kernels; use backend='reference' (any device)")
    if x_proj.dtype not in _DTYPES:
        return (f"dtype {x_proj.dtype} is not supported (float16, bfloat16, float32, "
                f"float64); use backend='reference'")
    if x_proj.dtype == torch.float64 and x_proj.device.type == "cuda":
        return ("float64 runs only in the Triton interpreter (for tests); on the GPU use "
                "backend='reference' for float64, or float32/bfloat16/float16 with triton")
    return None


def forward(spec: Spec, x_proj: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor,
            c0: Optional[torch.Tensor], ar_mask: Optional[torch.Tensor],
            lengths: Optional[torch.Tensor], cell_scale: Optional[torch.Tensor] = None):
    """Contract forward: ``(output, h_n, c_n, terms, norms, cell_norms, saved)`` (see
    launch.forward); ``cell_norms`` is None (no normprop / cell norms here yet)."""
    from .launch import forward as _forward
    output, h_n, c_n, terms, norms, saved = _forward(spec, x_proj, w_hh, h0, c0, ar_mask,
                                                     lengths)
    return output, h_n, c_n, terms, norms, None, saved


def backward(spec: Spec, x_proj, w_hh, h0, c0, ar_mask, lengths, cell_scale, output, norms,
             cell_norms, saved, grad_output, grad_h_n, grad_c_n, grad_terms, grad_norms=None,
             grad_cell_norms=None):
    """Contract backward: ``(grad_x_proj, grad_w_hh, grad_h0, grad_c0, grad_cell_scale)``.

    ``grad_norms`` enters as the exactly equivalent radial term added to ``grad_output``
    (:func:`rnnreg_kernels.penalties.fold_radial`) until the kernels take it themselves;
    ``grad_cell_scale`` is None (no normprop here yet)."""
    from ..penalties import fold_radial
    from .launch import backward as _backward
    grad_output, extra_h0 = fold_radial(grad_norms, grad_output, output, h0, norms,
                                        lengths, spec.reverse)
    gx, gw, gh0, gc0 = _backward(spec, x_proj, w_hh, h0, c0, ar_mask, lengths, output, norms,
                                 saved, grad_output, grad_h_n, grad_c_n, grad_terms)
    if extra_h0 is not None:
        gh0 = (gh0.to(extra_h0.dtype) + extra_h0).to(gh0.dtype)
    return gx, gw, gh0, gc0, None
