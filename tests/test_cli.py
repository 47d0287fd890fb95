"""The command line: ``python -m rnnreg_kernels {check,demo,bench,experiment}``.

Subprocess runs check the real entry point (exit status, output files); in-process runs
check that a wrong backend makes ``check`` fail and that bad arguments exit with status 2
and a message naming the argument.
"""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from rnnreg_kernels import check
from rnnreg_kernels.experiments import demo
from rnnreg_kernels.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*argv, env_drop=("TRITON_INTERPRET",), timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "rnnreg_kernels", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- check

def test_check_quick_exits_0_and_prints_table():
    r = _run("check", "--quick", "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    rows = [ln for ln in lines if ln.startswith(("reference ", "naive "))]
    # 2 backends x 5 cells x 4 cases, every one PASS with a gradcheck that ran
    assert len(rows) == 2 * 5 * len(check.QUICK_PLAN), r.stdout
    assert all(ln.rstrip().endswith("PASS") and " ok " in ln for ln in rows), r.stdout
    assert {ln.split()[2] for ln in rows} == {"lstm", "relu", "tanh", "trec", "normprop"}
    summary = re.search(r"check: (\d+)/(\d+) passed, 0 failed", r.stdout)
    assert summary and summary.group(1) == summary.group(2), r.stdout  # GPU rows too, if any
    assert "triton on cpu" in r.stdout  # says why triton was skipped


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter path is for CPU-only "
                    "machines; with a GPU, check runs triton on it")
def test_check_interpret_runs_triton_on_cpu():
    """``--interpret`` sets TRITON_INTERPRET before triton loads (the env var is removed)."""
    r = _run("check", "--quick", "--interpret", "--backend", "triton", "--cell", "relu",
             "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("triton ")]
    assert len(rows) == len(check.QUICK_PLAN)
    assert all(" cpu " in ln and " ok " in ln and ln.rstrip().endswith("PASS") for ln in rows)
    assert "TRITON_INTERPRET=1" in r.stdout


def test_check_interpret_restarts_when_triton_is_already_imported(monkeypatch):
    import rnnreg_kernels.__main__ as cli

    calls = []
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(cli, "_triton_imported", lambda: True)
    monkeypatch.setattr(cli.subprocess, "call", lambda argv, env: calls.append((argv, env)) or 7)
    argv = ["check", "--interpret", "--quick", "--cell", "relu"]
    assert cli.main(argv) == 7  # the child's status is passed on
    (child, env), = calls
    assert child == [sys.executable, "-m", "rnnreg_kernels", *argv]
    assert env["TRITON_INTERPRET"] == "1" and "TRITON_INTERPRET" not in os.environ


class _SkewGrad(torch.autograd.Function):
    """Identity forward; backward scales the gradient by 1.01 (a subtly wrong backend)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * 1.01


def _broken(kind):
    real = check.recurrence

    def recurrence(*args, backend, **kwargs):
        res = real(*args, backend=backend, **kwargs)
        if backend != "reference":
            return res
        if kind == "crash":
            raise RuntimeError("boom (test)")
        if kind == "grad":
            return res._replace(output=_SkewGrad.apply(res.output))
        return res._replace(h_n=res.h_n * (1 + 1e-6))
    return recurrence


@pytest.mark.parametrize("kind", ["grad", "value", "crash"])
def test_check_fails_with_status_1_on_a_wrong_backend(monkeypatch, capsys, kind):
    monkeypatch.setattr(check, "recurrence", _broken(kind))
    rc = main(["check", "--quick", "--backend", "reference", "--cell", "tanh", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1, out
    rows = [ln for ln in out.splitlines() if ln.startswith("reference ")]
    assert len(rows) == len(check.QUICK_PLAN)
    assert all(ln.rstrip().endswith("FAIL") for ln in rows), out
    if kind == "grad":
        assert all(" FAIL " in ln for ln in rows)  # the gradcheck column itself
    if kind == "crash":
        assert out.count("RuntimeError: boom (test)") == len(rows)
    assert f"0/{len(rows)} passed, {len(rows)} failed" in out


def test_check_passes_unpatched_in_process(capsys):
    rc = main(["check", "--quick", "--backend", "reference", "--cell", "trec", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out


def test_check_inputs_avoid_the_kinks():
    for cell in ("relu", "trec"):
        for steps, config in check.FULL_PLAN:
            x_proj, w_hh, h0, _, pen, lengths, reverse = check.make_inputs(
                cell, steps, config, torch.device("cpu"), seed=steps * 31 + 7)
            zs, states = check._preactivations(cell, x_proj, w_hh, h0, lengths, reverse)
            kink = 0.0 if cell == "relu" else check.THETA
            assert min(float((z - kink).abs().min()) for z in zs) > check.KINK_MARGIN
            assert min(float(s.norm()) for s in states) > check.MIN_NORM
            # deterministic: the same seed gives the same inputs
            again = check.make_inputs(cell, steps, config, torch.device("cpu"),
                                      seed=steps * 31 + 7)
            assert torch.equal(again[0], x_proj)


def test_check_falls_back_to_float32_when_a_fused_backend_refuses_float64(capsys,
                                                                         monkeypatch):
    tr = pytest.importorskip("rnnreg_kernels.triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if tr.unavailable_reason(torch.device(device)) is not None:
        pytest.skip(tr.unavailable_reason(torch.device(device)))
    real = tr.unsupported_reason

    def no_float64(spec, x_proj, w_hh):
        if x_proj.dtype == torch.float64:
            return "float64 off (test)"
        return real(spec, x_proj, w_hh)
    monkeypatch.setattr(tr, "unsupported_reason", no_float64)
    rc = main(["check", "--quick", "--backend", "triton", "--cell", "tanh", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = [ln for ln in out.splitlines() if ln.startswith("triton ")]
    assert len(rows) == len(check.QUICK_PLAN)
    assert all(" float32 " in ln and "skip (float32)" in ln and ln.rstrip().endswith("PASS")
               for ln in rows), out
    assert f"({len(rows)} cases): float64 unsupported: float64 off (test)" in out


def test_check_unavailable_backend_is_an_error(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(check, "_fused_reason", lambda name, device: "not here (test)")
    rc = main(["check", "--quick", "--backend", "triton", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "triton" in err and "not here (test)" in err


# ----------------------------------------------------------------------------- demo

def test_demo_quick_writes_png_json_and_table(tmp_path):
    """The README's main command, as a user runs it (the JSON's contents: tests/test_demo.py)."""
    out = tmp_path / "demo"
    r = _run("demo", "--quick", "--out", str(out), "--no-progress", "--device", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    png, js = out / "demo.png", out / "demo.json"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(js.read_text())
    assert doc["lengths"] == [20, 40, 100]
    assert [s["seed"] for s in doc["seeds"]] == list(range(demo.QUICK["seeds"]))
    assert doc["aggregate"]["seeds"] == demo.QUICK["seeds"]
    assert doc["config"]["workers"] >= 1 and doc["engine"] == "batched"
    assert "criterion: bounded = " in r.stdout and "T_eval" in r.stdout
    for s in doc["lengths"]:
        assert any(ln.split()[:1] == [str(s)] for ln in r.stdout.splitlines())
    assert doc["verdict"] in r.stdout and doc["verdict"].startswith("observed across 2 seeds")
    assert "\r" not in r.stderr  # no progress bar drawn into a pipe


def test_adding_batch_is_the_adding_problem():
    g = torch.Generator().manual_seed(3)
    x, y = demo.adding_batch(9, 200, g)
    assert x.shape == (9, 200, 2) and y.shape == (200,)
    values, markers = x[..., 0], x[..., 1]
    assert ((values >= 0) & (values <= 1)).all()
    assert torch.equal(markers.sum(0), torch.full((200,), 2.0))
    assert (markers[:4].sum(0) == 1).all() and (markers[4:].sum(0) == 1).all()
    torch.testing.assert_close(y, (values * markers).sum(0))
    with pytest.raises(ValueError, match="must be >= 2, got 1"):
        demo.adding_batch(1, 3, g)


# ----------------------------------------------------------------------------- arguments

@pytest.mark.parametrize("argv, needle", [
    ([], "the following arguments are required: {check,demo,bench,profile,experiment}"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["check", "--backend", "bogus"], "argument --backend: invalid choice: 'bogus'"),
    (["check", "--cell", "gru"], "argument --cell: invalid choice: 'gru'"),
    (["demo", "--steps", "0"], "argument --steps: expected a positive integer, got 0"),
    (["demo", "--hidden", "x"], "argument --hidden: expected a positive integer, got 'x'"),
    (["demo", "--eval-factors", "1,a"], "argument --eval-factors: expected comma-separated"),
    (["demo", "--beta", "-1"], "argument --beta: expected a finite number >= 0"),
    (["demo", "--lr", "0"], "argument --lr: expected a finite number > 0"),
    (["demo", "--lr", "nan"], "argument --lr: expected a finite number > 0, got 'nan'"),
    (["demo", "--seeds", "0"], "argument --seeds: expected a positive integer, got 0"),
    (["demo", "--engine", "gpu"], "argument --engine: invalid choice: 'gpu'"),
    (["experiment"], "the following arguments are required: {charlm}"),
    (["experiment", "wordlm"], "invalid choice: 'wordlm'"),
    (["experiment", "charlm", "--beta", "0"], "argument --beta: expected a finite number > 0"),
    (["experiment", "charlm", "--hidden", "-3"],
     "argument --hidden: expected a positive integer, got -3"),
])
def test_bad_arguments_exit_2_with_a_message(capsys, argv, needle):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["--train-len", "1"], "--train-len must be >= 2"),
    (["--device", "bogus"], "--device 'bogus' is not usable here"),
    (["--out", "/dev/null/x"], "--out '/dev/null/x': cannot create the output folder"),
])
def test_demo_rejects_unusable_settings(capsys, tmp_path, argv, needle):
    argv = ["demo", "--out", str(tmp_path), "--no-progress", "--threads", "1"] + argv
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_help_lists_the_commands():
    r = _run("--help")
    assert r.returncode == 0
    for name in ("check", "demo", "bench", "profile", "experiment"):
        assert name in r.stdout


def test_bench_options_come_from_rnnreg_kernels_bench(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: python -m rnnreg_kernels bench" in out and "--set" in out
