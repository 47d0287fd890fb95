"""The Hopper cluster variant of the ``cuda`` backend's forward (``csrc/cluster.cu``), opt-in.

Where the whole ``w_hh`` fits the shared memory of one thread-block cluster (sm_90: up to 16
CTAs), the forward runs the recurrence inside clusters: each CTA keeps its rows of ``w_hh``,
the cluster's ``h`` is exchanged through distributed shared memory and ``barrier.cluster``
replaces the grid barrier; batch slices run on separate clusters (docs/cuda.md, "Cluster
variant").  The backward is the persistent backward of :mod:`rnnreg_kernels.cuda`: this forward
returns the same saved tensors.

Not measured on a GPU yet, so nothing selects it by default (``backend="auto"`` included):
set ``RNNREG_CUDA_VARIANT=cluster`` to use it for ``backend="cuda"`` (``persistent``, the
default, are the cooperative kernels).  Tests and tuning: ``RNNREG_CUDA_CLUSTER_UNITS=n``
forces n hidden units per CTA (rounded up to a multiple of 8), ``RNNREG_CUDA_CLUSTER_SIZE=n``
caps the CTAs per cluster (1..16; default 16, which needs the non-portable cluster size).
It refuses (``unsupported_reason``) the normprop cell and ``Spec.cell_norms``.
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
    """None when the cluster forward (and the persistent backward after it) runs this case."""
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
    why = ext.plan(cell, dt, B, H, idx, cuda._units())
    if why:
        return f"the backward of the cluster variant runs on the persistent kernels: {why}"
    return None


def forward(spec: Spec, x_proj, w_hh, h0, c0, ar_mask, lengths, cell_scale=None):
    """The forward of :func:`rnnreg_kernels.cuda.forward` on thread-block clusters (one launch).

    Same returns (``cell_norms`` None), including ``saved = (hs, gates, cs)`` for the
    persistent backward.  ``cell_scale`` must be None (normprop is refused).
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


__all__ = ["VARIANTS", "variant", "unsupported_reason", "forward"]
