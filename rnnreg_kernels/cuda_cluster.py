"""The Hopper cluster variant of the ``cuda`` backend (``csrc/cluster.cu``,
``csrc/cluster_backward.cu``), opt-in.

Where the whole ``w_hh`` fits the shared memory of one thread-block cluster (sm_90: up to 16
CTAs), forward and backward run the recurrence inside clusters: each CTA keeps its slice of
``w_hh`` (forward: its gate rows; backward: its columns over all gate rows), the cluster's
``h`` (forward) or ``dz`` (backward) is exchanged through distributed shared memory and
``barrier.cluster`` replaces the grid barrier; batch slices run on separate clusters
(docs/cuda.md, "Cluster variant").  ``grad_w_hh`` is the same GEMM after the kernel as for the
persistent backward (:func:`rnnreg_kernels.cuda._grad_w_hh`).

Not measured on a GPU yet, so nothing selects it by default (``backend="auto"`` included):
set ``RNNREG_CUDA_VARIANT=cluster`` to use it for ``backend="cuda"`` (``persistent``, the
default, are the cooperative kernels).  Tests and tuning: ``RNNREG_CUDA_CLUSTER_UNITS=n``
forces n hidden units per CTA (rounded up to a multiple of 8), ``RNNREG_CUDA_CLUSTER_SIZE=n``
caps the CTAs per cluster (1..16; default 16, which needs the non-portable cluster size).
It refuses (``unsupported_reason``) the normprop cell, ``Spec.cell_norms`` and float64, and
any H whose ``w_hh`` does not fit one cluster (forward or backward layout), naming the largest
H that fits.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .contract import Spec

VARIANTS = ("persistent", "cluster")
CELLS = ("lstm", "relu", "tanh", "trec")


def variant() -> str:
    """The cuda backend's forward variant: ``$RNNREG_CUDA_VARIANT`` or ``"persistent"``."""
    raw = os.environ.get("RNNREG_CUDA_VARIANT", "").strip().lower()
    if raw in ("", "persistent"):
        return "persistent"
    if raw == "cluster":
        return "cluster"
    raise ValueError(f"environment variable RNNREG_CUDA_VARIANT: expected one of "
                     f"{', '.join(VARIANTS)}, got {raw!r}")


def _env_int(name: str, lo: int, hi: int) -> int:
    raw = os.environ.get(name, "")
    if not raw:
        return 0
    try:
        v = int(raw)
    except ValueError:
        v = None
    if v is None or not lo <= v <= hi:
        raise ValueError(f"environment variable {name}: expected an integer in {lo}..{hi}, "
                         f"got {raw!r}")
    return v


def _units() -> int:
    return _env_int("RNNREG_CUDA_CLUSTER_UNITS", 1, 1 << 16)


def _csize() -> int:
    return _env_int("RNNREG_CUDA_CLUSTER_SIZE", 1, 16)


def unsupported_reason(spec: Spec, x_proj: torch.Tensor, w_hh: torch.Tensor) -> Optional[str]:
    """None when the cluster forward and the cluster backward run this case."""
    from . import cuda
    if spec.cell not in CELLS:
        return (f"the cuda cluster variant runs the {', '.join(CELLS)} cells, got "
                f"cell={spec.cell!r}; unset RNNREG_CUDA_VARIANT for the persistent kernels")
    if getattr(spec, "cell_norms", False):
        return ("the cuda cluster variant does not compute cell_norms; unset "
                "RNNREG_CUDA_VARIANT for the persistent kernels")
    if x_proj.dtype not in cuda._DTYPE_CODE:
        return (f"the cuda backend supports float32, bfloat16 and float16, got {x_proj.dtype}; "
                "use backend='reference'")
    try:
        ext = cuda.load_extension()
    except RuntimeError as e:
        return str(e)
    if not hasattr(ext, "cluster_plan"):
        return ("the built CUDA extension has no cluster variant (built from older sources); "
                "rebuild it or unset RNNREG_CUDA_VARIANT")
    _, B, _ = x_proj.shape
    H = w_hh.shape[1]
    idx = x_proj.device.index
    if idx is None:
        idx = torch.cuda.current_device() if x_proj.device.type == "cuda" else 0
    cell, dt = cuda._CELL_CODE[spec.cell], cuda._DTYPE_CODE[x_proj.dtype]
    why = ext.cluster_plan(cell, dt, B, H, idx, _units(), _csize())
    if why:
        return why
    if not hasattr(ext, "cluster_bwd_plan"):
        return ("the built CUDA extension has no cluster backward (built from older sources); "
                "rebuild it or unset RNNREG_CUDA_VARIANT")
    why = ext.cluster_bwd_plan(cell, dt, B, H, idx, _units(), _csize())
    return why or None


def forward(spec: Spec, x_proj, w_hh, h0, c0, ar_mask, lengths, cell_scale=None):
    """The forward of :func:`rnnreg_kernels.cuda.forward` on thread-block clusters (one launch).

    Same returns (``cell_norms`` None), including ``saved = (hs, gates, cs)`` (what either
    backward takes).  ``cell_scale`` must be None (normprop is refused).
    """
    from . import cuda
    if cell_scale is not None or spec.cell not in CELLS:
        raise ValueError(f"the cuda cluster variant runs the {', '.join(CELLS)} cells without "
                         f"cell_scale, got cell={spec.cell!r}")
    ext = cuda.load_extension()
    out, h_n, c_n, terms, norms, hs, gates, cs = ext.cluster_forward(
        x_proj, w_hh, h0, c0, ar_mask, lengths, cuda._CELL_CODE[spec.cell], spec.theta,
        spec.w_ns, spec.w_tar, spec.w_ar, spec.ns_include_initial, spec.ns_eps, spec.reverse,
        bool(spec.allow_tf32), _units(), _csize(), cuda._poison())
    return out, h_n, c_n, terms, norms, None, (hs, gates, cs)


def backward(spec: Spec, x_proj, w_hh, h0, c0, ar_mask, lengths, cell_scale, output, norms,
             cell_norms, saved, grad_output, grad_h_n, grad_c_n, grad_terms, grad_norms=None,
             grad_cell_norms=None):
    """The backward of :func:`rnnreg_kernels.cuda.backward` on thread-block clusters: one
    launch, then the ``grad_w_hh`` GEMM.  Same returns (``grad_cell_scale`` None).

    ``grad_norms`` (``[T+1, B]`` or None) enters as the radial term of contract.py;
    ``cell_scale`` / ``cell_norms`` / ``grad_cell_norms`` must be None (normprop and cell
    norms are refused by the variant).
    """
    from . import cuda
    if spec.cell not in CELLS:
        raise ValueError(f"cell: the cuda cluster variant runs the {', '.join(CELLS)} cells, "
                         f"got {spec.cell!r}")
    for name, t in (("cell_scale", cell_scale), ("cell_norms", cell_norms),
                    ("grad_cell_norms", grad_cell_norms)):
        if t is not None:
            raise ValueError(f"{name}: expected None (the cuda cluster variant has no normprop "
                             f"cell and no cell norms), got a tensor of shape "
                             f"{tuple(t.shape)}")
    ext = cuda.load_extension()
    hs, gates, cs = saved
    gn = cuda._f32(grad_norms)
    gx, gh0, gc0, dz = ext.cluster_backward(
        w_hh, h0, c0, ar_mask, lengths, output, norms, hs, gates, cs, grad_output, grad_h_n,
        grad_c_n, grad_terms.float().contiguous(), gn, cuda._CELL_CODE[spec.cell], spec.theta,
        spec.w_ns, spec.w_tar, spec.w_ar, spec.ns_include_initial, spec.ns_eps, spec.reverse,
        bool(spec.allow_tf32), _units(), _csize(), cuda._poison())
    gw = cuda._grad_w_hh(spec, w_hh, h0, lengths, output, hs, gx, dz)
    return gx, gw, gh0, gc0 if spec.has_cell_state else None, None


__all__ = ["VARIANTS", "variant", "unsupported_reason", "forward", "backward"]
