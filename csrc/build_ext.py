"""Build glue for the optional CUDA extension ``rnnreg_kernels._C`` (called by setup.py).

``cuda_extension()`` returns ``(ext_modules, cmdclass)``.  The extension is built when the
build environment has a CUDA build of torch and nvcc; otherwise it is skipped with one line
saying why (``RNNREG_SKIP_CUDA_BUILD=1`` forces the skip).  pip's default build isolation hides
the installed torch, so building the extension at install time needs
``pip install --no-build-isolation .``; without it the package still installs and
``rnnreg_kernels.cuda`` JIT-builds the same sources on first use of ``backend="cuda"``.

Either way ``build_py`` copies the kernel sources into the installed package
(``rnnreg_kernels/csrc``) so the JIT build works from a non-editable install too.
"""
from __future__ import annotations

import glob
import os
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_ARCH_LIST = "8.0;9.0"

# The extension's translation units (relative to the project root, as setuptools wants).
SOURCES = ("csrc/binding.cpp", "csrc/forward.cu", "csrc/backward.cu", "csrc/plan.cu")
SOURCES += ("csrc/cluster_binding.cpp", "csrc/cluster.cu")  # the Hopper cluster variant
SOURCES += ("csrc/cluster_backward.cu",)  # its backward
# Everything the JIT build needs, shipped inside the package.
SHIPPED_PATTERNS = ("*.cu", "*.cuh", "*.h", "*.cpp")
NVCC_FLAGS = ["-O3", "-lineinfo"]  # no -std: torch picks the standard it needs
CXX_FLAGS = ["-O3"]


def _say(msg: str) -> None:
    print(f"rnnreg_kernels: {msg}", flush=True)


def shipped_sources() -> list:
    """Paths of the csrc files that are copied into the package for JIT builds."""
    out = []
    for pat in SHIPPED_PATTERNS:
        out.extend(sorted(glob.glob(os.path.join(HERE, pat))))
    return out


def _build_py_class():
    from setuptools.command.build_py import build_py

    class BuildPyWithCsrc(build_py):
        """build_py that also copies csrc/ kernel sources to rnnreg_kernels/csrc/."""

        def run(self):
            super().run()
            dest = os.path.join(self.build_lib, "rnnreg_kernels", "csrc")
            os.makedirs(dest, exist_ok=True)
            for src in shipped_sources():
                shutil.copy2(src, os.path.join(dest, os.path.basename(src)))

    return BuildPyWithCsrc


def _skip_reason():
    """None when the extension can be built here, else one line saying why not."""
    if os.environ.get("RNNREG_SKIP_CUDA_BUILD", "") not in ("", "0"):
        return "RNNREG_SKIP_CUDA_BUILD is set"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return ("torch is not importable in the build environment (pip's build isolation hides "
                "it; use `pip install --no-build-isolation .` to build the extension)")
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build (no CUDA)"
    home = cpp_extension.CUDA_HOME
    if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return "nvcc not found (set CUDA_HOME to a CUDA toolkit matching torch.version.cuda)"
    return None


def cuda_extension():
    """``(ext_modules, cmdclass)``: the CUDA extension when buildable, else ``([], {...})``."""
    cmdclass = {"build_py": _build_py_class()}
    why = _skip_reason()
    if why is not None:
        _say(f"skipping the CUDA extension: {why}; backend='cuda' will JIT-build it on first "
             f"use if nvcc is available then")
        return [], cmdclass
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    arch = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    _say(f"building the CUDA extension rnnreg_kernels._C for TORCH_CUDA_ARCH_LIST={arch}")
    ext = CUDAExtension(
        name="rnnreg_kernels._C",
        sources=list(SOURCES),
        include_dirs=[HERE],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
    )
    cmdclass["build_ext"] = BuildExtension
    return [ext], cmdclass
