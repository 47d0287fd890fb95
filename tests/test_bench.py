"""The benchmark harness: the smoke set end to end, its JSON, the gate, and report.py."""
import argparse
import importlib.util
import json
import math
import os

import pytest
import torch

from rnnreg_kernels.bench import add_arguments, main, parse_penalties
from rnnreg_kernels.bench import runner as runner_mod
from rnnreg_kernels.bench.check import gate, rel_err
from rnnreg_kernels.bench.schema import validate
from rnnreg_kernels.bench.shapes import SETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, *extra):
    args = add_arguments(argparse.ArgumentParser()).parse_args(
        ["--set", "smoke", "--out", str(tmp_path), "--name", "smoke", "--no-progress",
         "--warmup", "1", "--reps", "2", *extra])
    rc = main(args)
    with open(tmp_path / "smoke.json") as f:
        return rc, json.load(f)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("bench"))


def _report():
    spec = importlib.util.spec_from_file_location("bench_report",
                                                  os.path.join(ROOT, "benchmarks", "report.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_json_schema_and_values(smoke, capsys):
    rc, doc = smoke
    assert rc == 0
    assert validate(doc, strict=True) == []
    env = doc["env"]
    assert env["torch"] == torch.__version__ and env["device_type"] == "cpu"
    assert env["torch_threads"] >= 1 and env["cpu"]
    assert doc["args"]["set"] == "smoke" and doc["command"]
    shapes = {s.name for s in SETS["smoke"].shapes}
    expected = {(s, m, c) for s in shapes for m in ("forward", "train")
                for c in ("nn+eager", "ours:native", "ours:reference")}
    got = {(r["shape"]["name"], r["mode"], r["contender"]) for r in doc["rows"]}
    assert got == expected
    medians = {}
    for r in doc["rows"]:
        assert r["status"] == "ok", r
        assert r["correct"] is True
        t = r["time_ms"]
        assert t["median"] > 0 and t["min"] <= t["median"] <= t["max"] and t["reps"] == 2
        assert len(r["samples_ms"]) == 2
        assert r["check"]["errors"]["loss"]["err"] is not None
        medians[(r["shape"]["name"], r["mode"], r["contender"])] = t["median"]
        mem = r["memory"]
        assert mem["rss_peak_mb_process"] > 0
    for (shape, mode, contender), med in medians.items():
        base = medians[(shape, mode, "nn+eager")]
        row = next(r for r in doc["rows"] if (r["shape"]["name"], r["mode"], r["contender"])
                   == (shape, mode, contender))
        assert math.isclose(row["speedup"], base / med, rel_tol=1e-12)
        steps = row["shape"]["steps"]
        assert math.isclose(row["us_per_step"], med * 1e3 / steps, rel_tol=1e-12)
    train = [r for r in doc["rows"] if r["mode"] == "train" and r["contender"] != "nn+eager"]
    assert all(any(k.startswith("grad.weight_hh") for k in r["check"]["errors"]) for r in train)
    assert all("grad.x" in r["check"]["errors"] for r in train)


def test_wrong_contender_is_reported_not_timed(tmp_path, monkeypatch):
    real_build = runner_mod.build

    def sabotaged(name, problem):
        inst = real_build(name, problem)
        if name.startswith("ours:"):
            with torch.no_grad():
                inst.module.weight_hh_l0.mul_(1.001)
        return inst

    monkeypatch.setattr(runner_mod, "build", sabotaged)
    rc, doc = _run(tmp_path, "--shapes", "lstm-h8", "--modes", "train")
    assert rc == 1
    rows = {r["contender"]: r for r in doc["rows"]}
    assert rows["ours:native"]["status"] == "wrong"
    assert rows["ours:reference"]["status"] == "wrong"
    assert rows["ours:reference"]["correct"] is False
    assert rows["ours:reference"]["time_ms"] is None
    assert rows["ours:reference"]["speedup"] is None
    assert "allowed" in rows["ours:reference"]["reason"]
    assert rows["nn+eager"]["status"] == "ok"
    assert validate(doc) == []
    assert validate(doc, strict=True) != []


def test_gate_scales_with_the_baseline_error():
    ref = {"output": torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)}
    base = {"output": torch.tensor([1.0, -2.0, 3.0 + 3e-6])}
    near = {"output": torch.tensor([1.0, -2.0 + 6e-6, 3.0])}
    far = {"output": torch.tensor([1.0, -2.0, 3.0 + 6e-5])}
    assert rel_err(base["output"], ref["output"]) == pytest.approx(1e-6, rel=0.05)
    ok = gate(near, base, ref, torch.float32, grad=False, factor=4.0, floor_eps=8.0)
    assert ok["correct"] and ok["worst"] == "output"
    bad = gate(far, base, ref, torch.float32, grad=False, factor=4.0, floor_eps=8.0)
    assert not bad["correct"]
    nan = {"output": torch.tensor([1.0, float("nan"), 3.0])}
    assert not gate(nan, base, ref, torch.float32, False, 4.0, 8.0)["correct"]
    assert not gate({}, base, ref, torch.float32, False, 4.0, 8.0)["correct"]


def test_report_table_plots_and_readme(smoke, tmp_path):
    rc, doc = smoke
    src = tmp_path / "res"
    src.mkdir()
    with open(src / "r.json", "w") as f:
        json.dump(doc, f)
    readme = tmp_path / "README.md"
    readme.write_text("# x\nbefore\n<!-- perf:begin -->\nold text\n<!-- perf:end -->\nafter\n")
    report = _report()
    assert report.main([str(src), "--md", str(tmp_path / "out" / "R.md"),
                        "--readme", str(readme)]) == 0
    md = (tmp_path / "out" / "R.md").read_text()
    assert "| shape | dtype | mode | contender |" in md
    for r in doc["rows"]:
        assert r["shape"]["name"] in md
    text = readme.read_text()
    assert text.startswith("# x\nbefore\n<!-- perf:begin -->\n") and text.endswith(
        "<!-- perf:end -->\nafter\n")
    assert "old text" not in text and "ours:reference" in text
    assert report.main([str(src), "--check", "--strict"]) == 0
    readme.write_text("no markers here\n")
    assert report.main([str(src), "--md", str(tmp_path / "R2.md"),
                        "--readme", str(readme)]) == 2


def test_report_plots_sweeps(smoke, tmp_path):
    _, doc = smoke
    rows = []
    for b, speed in ((8, 0.5), (32, 0.7)):
        for r in doc["rows"]:
            if r["shape"]["name"] == "lstm-h8-b3-t5" and r["mode"] == "train":
                r = json.loads(json.dumps(r))
                r["shape"]["batch"] = b
                r["speedup"] = speed if r["contender"] != "nn+eager" else 1.0
                rows.append(r)
    fake = dict(doc, rows=rows)
    report = _report()
    path = report.plot([("f.json", fake)], "batch", str(tmp_path / "b.png"))
    assert path and os.path.getsize(path) > 1000
    assert report.plot([("f.json", fake)], "hidden", str(tmp_path / "h.png")) is None


def test_cli_errors_name_the_option(tmp_path, capsys):
    parser = add_arguments(argparse.ArgumentParser())
    assert main(parser.parse_args(["--set", "nope"])) == 2
    assert "--set" in capsys.readouterr().err
    assert main(parser.parse_args(["--set", "smoke", "--dtypes", "fp8"])) == 2
    assert "--dtypes" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--penalties"):
        parse_penalties("beta=3")
    assert parse_penalties("none").active is False
    assert parse_penalties("ns=2,ar=1").norm_stabilizer == 2.0
    if not torch.cuda.is_available():
        assert main(parser.parse_args(["--set", "char"])) == 2
        assert "CUDA" in capsys.readouterr().err


@pytest.mark.gpu
def test_gpu_bench_word_set(tmp_path):
    """The harness on a GPU: every contender checked, timed with CUDA events, valid JSON."""
    args = add_arguments(argparse.ArgumentParser()).parse_args(
        ["--set", "word", "--dtypes", "fp32,bf16", "--modes", "train", "--reps", "3",
         "--out", str(tmp_path), "--name", "gpu", "--no-progress"])
    rc = main(args)
    with open(tmp_path / "gpu.json") as f:
        doc = json.load(f)
    assert validate(doc) == []
    env = doc["env"]
    assert env["device_type"] == "cuda" and env["gpu"] and env["cudnn"]
    rows = doc["rows"]
    assert {r["status"] for r in rows} <= {"ok", "unavailable"}, [
        (r["contender"], r["dtype"], r["status"], r["reason"]) for r in rows]
    assert rc == 0
    for r in rows:
        if r["status"] == "ok":
            assert r["memory"]["step_peak_mb"] > 0
            if r["dtype"] == "fp32":
                assert r["tf32"] is not None and not any(r["tf32"].values())
    base = [r for r in rows if r["contender"] == "nn+eager"]
    assert base and all(r["status"] == "ok" for r in base)
    assert any(r["contender"].startswith("ours:") and r["status"] == "ok" for r in rows)


def test_fused_posthoc_baseline_runs_and_passes_the_gate(tmp_path):
    """nn.LSTM / nn.RNN + activation_penalties: a contender like the others, same gate."""
    rc, doc = _run(tmp_path, "--shapes", "relu-h5", "--contenders", "eager,fused",
                   "--modes", "train")
    assert rc == 0
    rows = {r["contender"]: r for r in doc["rows"]}
    assert set(rows) == {"nn+eager", "nn+fused-posthoc"}
    assert rows["nn+fused-posthoc"]["status"] == "ok" and rows["nn+fused-posthoc"]["correct"]
    assert validate(doc, strict=True) == []
