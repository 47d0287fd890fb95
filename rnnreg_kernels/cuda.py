"""The ``cuda`` backend: persistent cooperative CUDA kernels from ``csrc/``.

The compiled extension is ``rnnreg_kernels._C`` when it was built at install time
(``pip install --no-build-isolation .`` with a CUDA torch and nvcc), else the same sources are
JIT-built once with ``torch.utils.cpp_extension.load`` (ninja) into a cache directory
(``$RNNREG_CACHE``, default ``~/.cache/rnnreg_kernels``).  Importing this module touches no GPU
and builds nothing; the build happens on the first ``unsupported_reason`` / ``forward`` call.

Environment (tests and tuning): ``RNNREG_CUDA_UNITS`` forces the hidden units per block
(default ceil(H / #SMs)); ``RNNREG_CUDA_POISON=1`` fills every output with NaN before the
kernels run, so an element a kernel forgot to write shows up.  ``RNNREG_CUDA_VARIANT=cluster``
selects the opt-in Hopper cluster forward and backward (:mod:`rnnreg_kernels.cuda_cluster`;
default ``persistent``).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from .contract import Spec

SAVE_X_PROJ = False

_CELL_CODE = {"lstm": 0, "relu": 1, "tanh": 2, "trec": 3, "normprop": 4}
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_SOURCES = ("binding.cpp", "forward.cu", "backward.cu", "plan.cu")
_HEADERS = ("common.cuh", "mma.cuh", "rnnreg_api.h")
_SOURCES += ("cluster_binding.cpp", "cluster.cu")  # the Hopper cluster variant (cuda_cluster.py)
_SOURCES += ("cluster_backward.cu",)  # its backward
_HEADERS += ("cluster.cuh", "cluster_api.h")
_JIT_NAME = "rnnreg_kernels_cuda_jit"

_ext = None
_load_error: Optional[str] = None


def sources_dir() -> Optional[Path]:
    """The directory with the kernel sources: the installed copy, else the source checkout."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent / "csrc"):
        if all((cand / f).is_file() for f in _SOURCES + _HEADERS):
            return cand
    return None


def cache_dir() -> Path:
    """Where JIT builds go: ``$RNNREG_CACHE`` or ``~/.cache/rnnreg_kernels``."""
    root = os.environ.get("RNNREG_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "rnnreg_kernels")
    return Path(root)


def _nvcc_path() -> Optional[str]:
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME:
        p = os.path.join(CUDA_HOME, "bin", "nvcc")
        if os.path.exists(p):
            return p
    return shutil.which("nvcc")


def _prebuilt_available() -> bool:
    return importlib.util.find_spec("rnnreg_kernels._C") is not None


def _jit_problem() -> Optional[str]:
    """None when a JIT build can be attempted, else what is missing."""
    from torch.utils.cpp_extension import is_ninja_available
    if sources_dir() is None:
        return "the csrc/ kernel sources are not found next to the package"
    if _nvcc_path() is None:
        return "nvcc is not found (install the CUDA toolkit and set CUDA_HOME)"
    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def _jit_build():
    from torch.utils.cpp_extension import load
    src = sources_dir()
    digest = hashlib.sha256()
    for name in _SOURCES + _HEADERS:
        digest.update((src / name).read_bytes())
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    digest.update(f"{torch.__version__}|{torch.version.cuda}|{arch}".encode())
    build = cache_dir() / f"{_JIT_NAME}_{digest.hexdigest()[:16]}"
    build.mkdir(parents=True, exist_ok=True)
    return load(name=_JIT_NAME, sources=[str(src / f) for f in _SOURCES],
                extra_include_paths=[str(src)], build_directory=str(build),
                extra_cflags=["-O3"],
                extra_cuda_cflags=["-O3", "-lineinfo"], verbose=False)


def load_extension():
    """The compiled extension (prebuilt ``rnnreg_kernels._C`` or a cached JIT build).

    Raises ``RuntimeError`` with what to do when neither is possible.
    """
    global _ext, _load_error
    if _ext is not None:
        return _ext
    if _load_error is not None:
        raise RuntimeError(_load_error)
    prebuilt_error = ""
    if _prebuilt_available():
        try:
            _ext = importlib.import_module("rnnreg_kernels._C")
            return _ext
        except ImportError as e:  # e.g. built against another torch
            prebuilt_error = f"the prebuilt rnnreg_kernels._C does not load ({e}); "
    problem = _jit_problem()
    if problem is not None:
        _load_error = (f"the CUDA extension is not available: {prebuilt_error}{problem}. "
                       "Build it with `pip install --no-build-isolation .` on a machine with a "
                       "CUDA build of torch and nvcc, or use backend='triton' or 'reference'")
        raise RuntimeError(_load_error)
    try:
        _ext = _jit_build()
    except Exception as e:  # the build log is in the message
        _load_error = (f"JIT build of the CUDA extension failed ({type(e).__name__}: {e}); "
                       f"cache directory {cache_dir()} (set RNNREG_CACHE to move it). "
                       "Use backend='triton' or 'reference' meanwhile")
        raise RuntimeError(_load_error) from e
    return _ext


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the cuda backend can run on ``device`` at all (no build happens here)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors only, got device {device}"
    if torch.version.cuda is None:
        return (f"torch {torch.__version__} is a CPU build; install a CUDA build of torch to use "
                "backend='cuda'")
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    if _load_error is not None:
        return _load_error
    idx = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(idx)
    if major < 8:
        return (f"the cuda backend needs compute capability 8.0 or newer, device {idx} has "
                f"{major}.{minor}; use backend='triton' or 'reference'")
    if _ext is not None or _prebuilt_available():
        return None
    problem = _jit_problem()
    if problem is not None:
        return (f"the CUDA extension is not built and cannot be JIT-built: {problem}; install "
                "with `pip install --no-build-isolation .` where nvcc is available, or use "
                "backend='triton'")
    return None


def _units() -> int:
    raw = os.environ.get("RNNREG_CUDA_UNITS", "")
    if not raw:
        return 0
    try:
        units = int(raw)
    except ValueError:
        raise ValueError(f"environment variable RNNREG_CUDA_UNITS: expected a positive integer, "
                         f"got {raw!r}") from None
    if units < 1:
        raise ValueError(f"environment variable RNNREG_CUDA_UNITS: expected a positive integer, "
                         f"got {units}")
    return units


def _poison() -> bool:
    return os.environ.get("RNNREG_CUDA_POISON", "") not in ("", "0")


def _cluster():
    """The cluster variant (:mod:`rnnreg_kernels.cuda_cluster`) when ``RNNREG_CUDA_VARIANT``
    selects it, else None (the persistent kernels)."""
    from . import cuda_cluster
    return cuda_cluster if cuda_cluster.variant() == "cluster" else None


def unsupported_reason(spec: Spec, x_proj: torch.Tensor, w_hh: torch.Tensor) -> Optional[str]:
    """None when this case runs on the cuda backend, else why not and what would.

    Loads the extension, JIT-building it once if it was not built at install time.
    """
    if _cluster() is not None:
        return _cluster().unsupported_reason(spec, x_proj, w_hh)
    if x_proj.dtype not in _DTYPE_CODE:
        return (f"the cuda backend supports float32, bfloat16 and float16, got {x_proj.dtype}; "
                "use backend='reference'")
    try:
        ext = load_extension()
    except RuntimeError as e:
        return str(e)
    _, B, _ = x_proj.shape
    H = w_hh.shape[1]
    idx = x_proj.device.index if x_proj.device.index is not None else torch.cuda.current_device()
    why = ext.plan(_CELL_CODE[spec.cell], _DTYPE_CODE[x_proj.dtype], B, H, idx, _units())
    return why or None


def _scalars(spec: Spec):
    return (_CELL_CODE[spec.cell], spec.theta, spec.w_ns, spec.w_tar, spec.w_ar,
            spec.ns_include_initial, spec.ns_eps, spec.reverse, bool(spec.allow_tf32), _units(),
            _poison())


def _f32(t):
    """An optional acc-dtype input as the contiguous float32 tensor the kernels read."""
    return None if t is None else t.float().contiguous()


def forward(spec: Spec, x_proj, w_hh, h0, c0, ar_mask, lengths, cell_scale=None, *,
            plant: int = 0):
    """Forward of the contract (see :mod:`rnnreg_kernels.contract`), one cooperative launch.

    Returns ``(output [T, B, H], h_n [B, H], c_n [B, H] or None, terms [3] fp32,
    norms [T+1, B] fp32, cell_norms [T+1, B] fp32 or None, saved)`` with
    ``saved = (hs, gates, cs)``: ``hs [T, B, H]`` fp32 states in processing order for
    bfloat16/float16 (None for float32, whose output holds them), and for the cells with a
    cell state (lstm, normprop) ``gates [T, B, 4H]`` (activated i, f, g, o) and
    ``cs [T, B, H]`` fp32, also in processing order.  ``cell_norms`` only with
    ``spec.cell_norms``.  ``plant`` is for the sanitizer test only.
    """
    if _cluster() is not None:
        return _cluster().forward(spec, x_proj, w_hh, h0, c0, ar_mask, lengths, cell_scale)
    ext = load_extension()
    out, h_n, c_n, terms, norms, cnorms, hs, gates, cs = ext.forward(
        x_proj, w_hh, h0, c0, ar_mask, lengths, _f32(cell_scale), float(spec.h_scale),
        bool(spec.cell_norms), *_scalars(spec), plant)
    return out, h_n, c_n, terms, norms, cnorms, (hs, gates, cs)


@contextlib.contextmanager
def _fp32_matmul(allow_tf32: bool):
    """Run float32 GEMMs with (or without) TF32 as the op's Spec asks, then restore."""
    m = torch.backends.cuda.matmul
    old = m.allow_tf32
    m.allow_tf32 = allow_tf32
    try:
        yield
    finally:
        m.allow_tf32 = old


def _grad_w_hh(spec: Spec, w_hh, h0, lengths, output, hs, gx, dz):
    """One GEMM (two products) ``dZ^T [G*H, T*B] @ H_prev [T*B, H]`` after the kernel.

    bfloat16/float16: ``dz`` and ``hs`` are fp32 and in processing order, so
    H_prev = [h0, hs[:-1]]; float32: ``gx`` and ``output`` are in time positions, and h_{k-1}
    sits one position before (forward) or after (reverse) the position of step k, except for
    each row's first step, which uses h0.
    """
    T, B, GH = gx.shape
    H = w_hh.shape[1]
    with _fp32_matmul(spec.allow_tf32):
        if dz is not None:
            first, rest, prev = dz[0], dz[1:], hs[:-1]
            h0m = h0.float()
        else:
            if not spec.reverse:
                first, rest, prev = gx[0], gx[1:], output[:-1]
            else:
                rest, prev = gx[:-1], output[1:]
                if lengths is None:
                    first = gx[T - 1]
                else:
                    pos = (lengths - 1).view(1, B, 1).expand(1, B, GH)
                    first = gx.gather(0, pos)[0]
            h0m = h0
        grad = first.t().mm(h0m)
        if T > 1:
            grad.addmm_(rest.reshape(-1, GH).t(), prev.reshape(-1, H))
    return grad.to(w_hh.dtype)


def backward(spec: Spec, x_proj, w_hh, h0, c0, ar_mask, lengths, cell_scale, output, norms,
             cell_norms, saved, grad_output, grad_h_n, grad_c_n, grad_terms, grad_norms=None,
             grad_cell_norms=None, *, plant: int = 0):
    """Backward of the contract: one cooperative launch, then one GEMM for ``grad_w_hh``.

    ``grad_norms`` / ``grad_cell_norms`` (``[T+1, B]`` or None = zero) enter the kernel as the
    radial terms of contract.py; a None costs nothing.  Returns ``(grad_x_proj [T, B, G*H],
    grad_w_hh [G*H, H], grad_h0 [B, H], grad_c0 [B, H] or None, grad_cell_scale [H] fp32 or
    None)`` (grad_c0 for lstm / normprop, grad_cell_scale for normprop only).
    """
    if _cluster() is not None and not plant:
        return _cluster().backward(spec, x_proj, w_hh, h0, c0, ar_mask, lengths, cell_scale,
                                   output, norms, cell_norms, saved, grad_output, grad_h_n,
                                   grad_c_n, grad_terms, grad_norms, grad_cell_norms)
    ext = load_extension()
    hs, gates, cs = saved
    gcn = _f32(grad_cell_norms)
    gx, gh0, gc0, gcs, dz = ext.backward(
        w_hh, h0, c0, ar_mask, lengths, _f32(cell_scale), float(spec.h_scale), output, norms,
        _f32(cell_norms) if gcn is not None else None, hs, gates, cs, grad_output, grad_h_n,
        grad_c_n, grad_terms.float().contiguous(), _f32(grad_norms), gcn, *_scalars(spec),
        plant)
    gw = _grad_w_hh(spec, w_hh, h0, lengths, output, hs, gx, dz)
    return (gx, gw, gh0, gc0 if spec.has_cell_state else None,
            gcs if spec.cell == "normprop" else None)


__all__ = ["SAVE_X_PROJ", "unavailable_reason", "unsupported_reason", "forward", "backward"]
