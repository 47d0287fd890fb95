"""Build script. The pure-Python package always installs; the optional CUDA extension
(`rnnreg_kernels._C`, sources in csrc/) is added by `cuda_extension()` when it can be built."""
import os
import re
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "csrc"))


def cuda_extension():
    """(ext_modules, cmdclass) for the CUDA extension, or ([], {}) with one line saying why not.

    Implemented in csrc/build_ext.py (owned by the CUDA backend)."""
    try:
        import build_ext as _b  # csrc/build_ext.py
    except ImportError:
        print("rnnreg_kernels: csrc/build_ext.py not found; skipping the CUDA extension")
        return [], {}
    return _b.cuda_extension()


ext_modules, cmdclass = cuda_extension()


def long_description() -> str:
    """README.md for the package index: its relative links (files of the source tree, which
    do not resolve on an index page) become the path as code; images become their path."""
    path = os.path.join(HERE, "README.md")
    if not os.path.exists(path):
        return ""
    text = open(path).read()

    def local(m):
        target = m.group(2)
        if re.match(r"[a-z]+://|#", target):
            return m.group(0)
        if m.group(0).startswith("!"):
            return f"(figure: `{target}` in the source tree)"
        return m.group(1) if m.group(1).strip("`") == target else f"{m.group(1)} (`{target}`)"
    return re.sub(r"!?\[([^\]]*)\]\(([^)\s]+)\)", local, text)


setup(
    name="rnnreg_kernels",
    version="0.1.0",
    description="Fused Triton/CUDA kernels for RNNs trained with activation regularizers "
                "(norm-stabilizer, TAR, AR)",
    long_description=long_description(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    license_files=["LICENSE"],
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    packages=find_packages(include=["rnnreg_kernels", "rnnreg_kernels.*"]),
    package_data={"rnnreg_kernels": ["auto_wins.json"]},
    python_requires=">=3.10",
    # Ranges as tested: torch 2.13.0 (CPU wheel) and numpy 2.3.5 on the CI machine; widen a
    # bound only after the test suite has passed on the new version.
    install_requires=[
        "torch>=2.13,<2.14",
        # numpy < 2.4: Triton 3.6's CPU interpreter (the tests without a GPU) fails under
        # numpy 2.4.6 ("only 0-dimensional arrays can be converted to Python scalars");
        # the interpreters of Triton 3.8 and 3.9 pass tests/test_triton.py with numpy 2.4.6
        # (3.7 not tried), so the bound is only for the low end of the Triton range.
        "numpy>=2.3,<2.4",
        # the range .ci/run tests: 3.6.0 (README install) and 3.9.0 (its own venv)
        "triton>=3.6,<3.10; platform_system == 'Linux'",
        "matplotlib",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest>=9,<10", "hypothesis>=6.150,<7"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
