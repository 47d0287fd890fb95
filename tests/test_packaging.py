"""Packaging and first contact: LICENSE and metadata, tested version ranges, README links,
check's cuda line, warning filters (issue 10, item 8)."""
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[([^\]]*)\]\(([^)\s]+)\)")


def _setup_text():
    return (ROOT / "setup.py").read_text()


def test_license_file_is_bsd_3_clause_and_declared():
    text = (ROOT / "LICENSE").read_text()
    assert "Redistribution and use in source and binary forms" in text
    assert "Neither the name of the copyright holder" in text  # the third clause
    setup = _setup_text()
    assert 'license="BSD-3-Clause"' in setup and '"LICENSE"' in setup
    assert "LICENSE" in (ROOT / "MANIFEST.in").read_text()


def test_install_requires_declare_tested_ranges():
    setup = _setup_text()
    for line in ('"torch>=2.13,<2.14"', '"numpy>=2.3,<2.4"'):
        assert line in setup, line
    assert re.search(r'"hypothesis>=6\.1\d\d,<7"', setup)
    import numpy
    import hypothesis
    assert torch.__version__.startswith("2.13") and numpy.__version__.startswith("2.3")
    assert hypothesis.__version__.startswith("6.")


def test_auto_table_ships_with_the_package():
    """auto's measured table is package data: declared for wheels and the sdist, and the
    file beside auto_rule is the one it reads."""
    from rnnreg_kernels import auto_rule

    assert 'package_data={"rnnreg_kernels": ["auto_wins.json"]}' in _setup_text()
    assert "include rnnreg_kernels/auto_wins.json" in (ROOT / "MANIFEST.in").read_text()
    assert Path(auto_rule.WINS_FILE) == ROOT / "rnnreg_kernels" / "auto_wins.json"
    assert Path(auto_rule.WINS_FILE).is_file()


def test_readme_relative_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert "DESIGN.md" not in text  # the spec is not shipped in this repository
    rel = [t for _, t in LINK.findall(text) if not re.match(r"[a-z]+://|#", t)]
    assert rel, "expected some relative links"
    for target in rel:
        assert (ROOT / target.split("#")[0]).exists(), target
    for name in re.findall(r"`((?:rnnreg_kernels|docs|benchmarks|tests|csrc)/[^`\s]*)`", text):
        assert (ROOT / name.rstrip("/")).exists() or "*" in name, name


def test_long_description_has_no_relative_links():
    r = subprocess.run([sys.executable, "setup.py", "--long-description"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    desc = r.stdout
    assert "## Usage" in desc
    rel = [t for _, t in LINK.findall(desc) if not re.match(r"[a-z]+://|#", t)]
    assert rel == [], rel


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine cuda may run")
def test_check_reports_cuda_status_with_reason():
    from rnnreg_kernels import cuda
    from rnnreg_kernels.check import available_backends
    runs, skipped = available_backends()
    assert "cuda" not in {b for b, _ in runs}
    lines = [s for s in skipped if s.startswith("cuda")]
    assert len(lines) == 1
    assert cuda.unavailable_reason(torch.device("cuda")) in lines[0]
    assert any(s.startswith("triton on cuda") for s in skipped)


def test_pytest_config_filters_triton_interpreter_warnings_by_message():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    filters = cfg["tool"]["pytest"]["ini_options"]["filterwarnings"]
    assert any(f.startswith("ignore:Conversion of an array with ndim > 0 to a scalar")
               for f in filters)
    assert all(f.split(":")[1] for f in filters if f.startswith("ignore"))  # by message


def test_configured_filters_silence_the_triton_interpreter():
    """Run a small Triton-interpreter forward + backward with and without the pytest
    config's filters: whatever it warns without them, nothing passes with them."""
    import warnings

    from _pytest.warnings import parse_warning_filter

    from rnnreg_kernels import recurrence
    if recurrence is None or pytest.importorskip("triton") is None:
        return
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    filters = cfg["tool"]["pytest"]["ini_options"]["filterwarnings"]

    def run(apply_filters):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            if apply_filters:
                for f in filters:
                    warnings.filterwarnings(*parse_warning_filter(f, escape=False))
            x = torch.randn(2, 3, 5, requires_grad=True)
            w, h = torch.randn(5, 5), torch.randn(3, 5)
            recurrence(x, w, h, cell="tanh", backend="triton").output.sum().backward()
        return [str(r.message) for r in rec]
    assert run(True) == []
    unfiltered = run(False)
    assert all("Conversion of an array" in m for m in unfiltered), unfiltered
