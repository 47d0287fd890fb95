"""Test setup: run Triton kernels in the interpreter when no CUDA GPU is present.

TRITON_INTERPRET must be set before triton is imported anywhere, so this runs first.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu_run.sh on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
