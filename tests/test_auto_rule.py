"""auto's measured rule on CUDA tensors (rnnreg_kernels.auto_rule): which measured cases send a
case to a fused backend, how the table is built from benchmark result documents, and the CLI.
(resolve_backend's use of it on real CUDA tensors: tests/test_triton_gpu.py, on a GPU.)"""
import json

import pytest
import torch

from rnnreg_kernels import auto_rule
from rnnreg_kernels.bench import auto_table
from rnnreg_kernels.bench.auto_table import entries_from_results
from rnnreg_kernels.auto_rule import Measured, fused_choice

GPU = "NVIDIA H200"


def m(backend, hidden, batch, won, cell="lstm", dtype="bf16", device=GPU):
    return Measured(device, backend, cell, dtype, hidden, batch, won, 2.0 if won else 0.5, "t")


def test_empty_table_never_picks_a_fused_backend():
    assert fused_choice(GPU, "lstm", torch.bfloat16, 1024, 32, table=()) is None


def test_the_committed_table_loads():
    entries = auto_rule.load()
    assert all(isinstance(e, Measured) and e.backend in auto_rule.FUSED for e in entries)


def test_inside_the_measured_wins_only():
    table = [m("triton", 512, 16, True), m("triton", 1024, 64, True)]
    assert fused_choice(GPU, "lstm", torch.bfloat16, 768, 32, table) == "triton"
    assert fused_choice(GPU, "lstm", torch.bfloat16, 512, 16, table) == "triton"  # corners
    assert fused_choice(GPU, "lstm", torch.bfloat16, 1024, 64, table) == "triton"
    assert fused_choice(GPU, "lstm", torch.bfloat16, 2048, 32, table) is None  # H outside
    assert fused_choice(GPU, "lstm", torch.bfloat16, 768, 8, table) is None    # B outside
    assert fused_choice(GPU, "relu", torch.bfloat16, 768, 32, table) is None   # other cell
    assert fused_choice(GPU, "lstm", torch.float16, 768, 32, table) is None    # other dtype
    assert fused_choice("NVIDIA H100 80GB HBM3", "lstm", torch.bfloat16, 768, 32, table) is None


def test_a_measured_loss_inside_the_range_vetoes_it():
    table = [m("triton", 512, 16, True), m("triton", 1024, 64, True), m("triton", 768, 32, False)]
    assert fused_choice(GPU, "lstm", torch.bfloat16, 600, 20, table) is None
    # the cuda backend's own wins still count
    table += [m("cuda", 256, 8, True), m("cuda", 1024, 64, True)]
    assert fused_choice(GPU, "lstm", torch.bfloat16, 600, 20, table) == "cuda"


def test_triton_before_cuda_when_both_won():
    table = [m("cuda", 1024, 32, True), m("triton", 1024, 32, True)]
    assert fused_choice(GPU, "lstm", torch.bfloat16, 1024, 32, table) == "triton"


def _row(contender, median, status="ok", mode="train", hidden=1024, batch=32, dtype="bf16"):
    shape = {"cell": "lstm", "hidden": hidden, "batch": batch, "steps": 100, "layers": 1,
             "input_size": hidden, "name": f"lstm-h{hidden}-b{batch}-t100"}
    return {"shape": shape, "dtype": dtype, "mode": mode, "contender": contender,
            "status": status, "time_ms": {"median": median} if status == "ok" else None}


def _doc(rows, device_type="cuda"):
    return {"env": {"device_type": device_type, "device_name": GPU}, "rows": rows,
            "created_utc": "2026-12-02T00:00:00Z"}


def test_entries_from_a_gpu_run():
    rows = [_row("nn+eager", 10.0), _row("ours:native", 8.0), _row("ours:triton", 4.0),
            _row("ours:cuda", 9.0),
            _row("nn+eager", 5.0, hidden=256), _row("ours:triton", 6.0, hidden=256),
            _row("ours:cuda", None, status="wrong", hidden=256),   # failed the gate: no entry
            _row("ours:triton", 1.0, mode="forward", hidden=512),  # forward rows: ignored
            _row("nn+eager", 2.0, mode="forward", hidden=512)]
    got = {(e.backend, e.hidden): e for e in entries_from_results([("run.json", _doc(rows))])}
    assert set(got) == {("triton", 1024), ("cuda", 1024), ("triton", 256)}
    assert got["triton", 1024].won and got["triton", 1024].speedup == pytest.approx(2.0)
    assert not got["cuda", 1024].won  # slower than native (8.0) though faster than nn+eager
    assert not got["triton", 256].won and got["triton", 256].speedup == pytest.approx(5 / 6)
    assert got["triton", 1024].source.startswith("run.json")
    assert entries_from_results([("cpu.json", _doc(rows, device_type="cpu"))]) == []


def test_cli_writes_a_loadable_table(tmp_path, capsys):
    src = tmp_path / "run.json"
    src.write_text(json.dumps(_doc([_row("nn+eager", 10.0), _row("ours:triton", 4.0)])))
    out = tmp_path / "wins.json"
    assert auto_table.main(["--from", str(src), "--out", str(out)]) == 0
    assert "1 entries (1 wins)" in capsys.readouterr().out
    entries = auto_rule.load(str(out))
    assert entries == (Measured(GPU, "triton", "lstm", "bf16", 1024, 32, True, 2.5,
                                "run.json (2026-12-02T00:00:00Z)"),)
    assert fused_choice(GPU, "lstm", torch.bfloat16, 1024, 32, entries) == "triton"


def test_cli_and_table_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        auto_table.main(["--from", str(tmp_path / "missing.json")])
    assert "--from: cannot read" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"entries": [{"device_name": GPU, "backend": "native"}]}))
    with pytest.raises(ValueError, match=r"entries\[0\]: an entry expected the fields"):
        auto_rule.load(str(bad))
    bad.write_text(json.dumps({"entries": [dict(m("native", 1, 1, True).__dict__)]}))
    auto_rule.load.cache_clear()
    with pytest.raises(ValueError, match="backend expected one of"):
        auto_rule.load(str(bad))


def test_cli_runs_as_a_module_without_warnings(tmp_path):
    """``python -m rnnreg_kernels.bench.auto_table`` (what the docs and gpu_run.sh run)."""
    import subprocess
    import sys
    from pathlib import Path

    src = tmp_path / "run.json"
    src.write_text(json.dumps(_doc([_row("nn+eager", 10.0), _row("ours:cuda", 20.0)])))
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m",
                          "rnnreg_kernels.bench.auto_table", "--from", str(src)],
                         capture_output=True, text=True, cwd=root, timeout=300)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert [e["won"] for e in doc["entries"]] == [False] and doc["sources"] == ["run.json"]
