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


# Hypothesis profiles: "ci" (default; a small fixed budget, derandomized so CI is
# reproducible) and "long" for local runs: python -m pytest --hypothesis-profile=long
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is a test extra; the property tests skip without it
    pass
else:
    _common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow],
                   print_blob=True)
    settings.register_profile("ci", max_examples=12, derandomize=True, **_common)
    settings.register_profile("long", max_examples=400, **_common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
