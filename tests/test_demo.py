"""The multi-seed demo (``python -m rnnreg_kernels demo``) and the README section made from
its committed JSON.

The batched engine is checked against ``rnnreg_kernels.IRNN`` with the fused norm-stabilizer
(float64, same init and data: the weights after training agree to rounding), the per-model
clipping against ``clip_grad_norm_``, the boundedness statistics and the verdict against
hand-made cases, and a tiny run's JSON for every seed and the aggregate.
"""
import json
import math
import os

import pytest
import torch

from rnnreg_kernels.__main__ import main
from rnnreg_kernels.experiments import common, demo, readme

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_json_has_every_seed_and_the_aggregate(tmp_path, capsys):
    out = tmp_path / "d"
    rc = main(["demo", "--steps", "30", "--hidden", "16", "--train-len", "20", "--batch", "16",
               "--eval-batch", "32", "--eval-factors", "1,2,5", "--seeds", "3",
               "--first-seed", "4", "--workers", "1",
               "--out", str(out), "--no-progress", "--device", "cpu"])
    text = capsys.readouterr().out
    assert rc == 0, text
    doc = json.loads((out / "demo.json").read_text())
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lengths = doc["lengths"]
    assert lengths == [20, 40, 100] and doc["horizon"] == 20
    assert [s["seed"] for s in doc["seeds"]] == [4, 5, 6]
    for s in doc["seeds"]:
        assert isinstance(s["bounded"], bool)
        ns = s["models"]["NS"]
        assert s["bounded"] == ns["bounded"] and s["norm_ratio"] == ns["norm_ratio"]
        for name, model in s["models"].items():
            ratio = model["norm_ratio"]
            assert model["bounded"] == (ratio is not None and ratio <= demo.BOUND_FACTOR)
            assert model["beta"] == (0.0 if name == "plain" else 200.0)
            assert set(model["mse"]) == {str(L) for L in lengths}
            assert len(model["max_norm_curve"]) == max(lengths) + 1
            assert model["backend_used"] == "native"  # auto on the CPU (relu)
            top = [v for v in model["max_norm_curve"][1:] if v is not None]
            if ratio is not None and model["first_non_finite_step"] is None:
                # the ratio is the curve's own max after / max up to the horizon
                # (the longest run holds the largest norm past the horizon unless overflow)
                assert ratio >= max(top[lengths[0]:]) / model["max_up_to_horizon"] * 0.999
    agg = doc["aggregate"]
    assert agg["seeds"] == 3
    assert agg["bounded_count"] == sum(s["bounded"] for s in doc["seeds"])
    for name in demo.NAMES:
        a = agg["models"][name]
        assert a["bounded_count"] == sum(s["models"][name]["bounded"] for s in doc["seeds"])
        for L in lengths:
            mses = sorted(s["models"][name]["mse"][str(L)] for s in doc["seeds"])
            assert a["mse"][str(L)]["median"] == pytest.approx(mses[1])
            assert a["mse"][str(L)]["min"] == pytest.approx(mses[0])
    assert doc["verdict"] in text and f"in {agg['bounded_count']}/3" in doc["verdict"]
    assert doc["command"] and doc["env"]["torch"] == torch.__version__
    assert doc["wall_s"] > 0 and all(c > 0 for c in doc["train_cpu_s"])


def test_batched_engine_trains_the_same_models_as_rnnreg_kernels_irnn():
    cfg = dict(steps=12, hidden=5, train_len=7, batch=3, lr=0.01, clip=0.5, backend="reference",
               device="cpu", progress=False, dtype="float64")
    specs = [(0, 0.0), (1, 0.0), (0, 50.0), (1, 50.0)]
    start = demo.init_models(specs, 5, "cpu", torch.float64)
    a = demo.train_group({"specs": specs, "config": cfg, "engine": "batched", "index": 0})
    b = demo.train_group({"specs": specs, "config": cfg, "engine": "modules", "index": 0})
    for key in start:
        moved = (a["weights"][key] - start[key]).abs().max()
        assert moved > 1e-3  # training did something
        torch.testing.assert_close(a["weights"][key], b["weights"][key], rtol=1e-10,
                                   atol=1e-12)
    torch.testing.assert_close(torch.tensor(a["train_mse"]), torch.tensor(b["train_mse"]),
                               rtol=1e-10, atol=1e-12)
    # the stabilizer changed the training: same seed, different beta -> different weights
    assert (a["weights"]["w_hh"][0] - a["weights"]["w_hh"][2]).abs().max() > 1e-4


def test_init_models_is_the_irnn_init():
    w = demo.init_models([(3, 0.0), (3, 9.0), (4, 0.0)], 6, "cpu")
    assert torch.equal(w["w_hh"][0], torch.eye(6)) and torch.equal(w["b_ih"], torch.zeros(3, 6))
    assert torch.equal(w["w_ih"][0], w["w_ih"][1])  # same seed, same start
    assert not torch.equal(w["w_ih"][0], w["w_ih"][2])


def test_clip_per_model_matches_clip_grad_norm():
    g = torch.Generator().manual_seed(0)
    params = {k: torch.zeros(3, *s, requires_grad=True) for k, s in
              (("a", (4, 2)), ("b", (5,)))}
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=g) * torch.tensor([0.01, 1.0, 30.0]).view(
            -1, *([1] * (p.dim() - 1)))
    expect = []
    for m in range(3):
        single = [params[k].grad[m].clone().requires_grad_() for k in params]
        for t in single:
            t.grad = t.detach().clone()
        torch.nn.utils.clip_grad_norm_(single, 0.5)
        expect.append([t.grad for t in single])
    demo.clip_per_model(params, 0.5)
    for m in range(3):
        for k, e in zip(params, expect[m]):
            torch.testing.assert_close(params[k].grad[m], e)
    assert torch.equal(params["b"].grad[0], expect[0][1])  # small gradient left alone


def _ev(max_in, after: dict, curve, bad=None):
    return {"max_up_to_horizon": max_in, "max_after": after, "max_norm_curve": curve,
            "first_non_finite_step": bad}


def test_norm_stats_follow_the_criterion():
    lengths = [10, 20, 40]
    flat = demo.norm_stats(_ev(2.0, {10: None, 20: 2.5, 40: 3.9}, [1.0] * 41), lengths, 10)
    assert flat["bounded"] and flat["norm_ratio"] == pytest.approx(1.95)
    assert flat["norm_ratio_at"] == {10: None, 20: pytest.approx(1.25), 40: pytest.approx(1.95)}
    assert flat["late_growth"] == 1.0
    over = demo.norm_stats(_ev(2.0, {10: None, 20: 2.5, 40: 4.1}, [1.0] * 41), lengths, 10)
    assert not over["bounded"] and over["norm_ratio"] == pytest.approx(2.05)
    grow = [1.0] * 21 + [2.0 ** (k / 4) for k in range(1, 21)]
    g = demo.norm_stats(_ev(1.0, {10: None, 20: 1.0, 40: 32.0}, grow), lengths, 10)
    assert not g["bounded"] and g["late_growth"] == pytest.approx(32.0)
    blown = demo.norm_stats(_ev(1.0, {10: None, 20: 1.5, 40: math.inf},
                                [1.0] * 30 + [math.inf] * 11, bad=30), lengths, 10)
    assert not blown["bounded"] and blown["norm_ratio"] == math.inf
    assert blown["norm_ratio_at"][40] == math.inf


def _agg(nb, pb, k=5):
    def model(count, ratio):
        return {"bounded_count": count, "bounded_and_learned_count": count // 2,
                "norm_ratio": {"median": ratio}}
    return {"seeds": k, "models": {"NS": model(nb, 1.5), "plain": model(pb, math.inf)}}


@pytest.mark.parametrize("nb, pb, needle", [
    (4, 1, "the stabilizer kept more seeds bounded"),
    (2, 2, "no difference in the count"),
    (0, 3, "fewer seeds bounded, the opposite of the paper's claim"),
])
def test_verdict_says_what_the_counts_say(nb, pb, needle):
    line = demo.verdict(_agg(nb, pb), 50)
    assert line.startswith("observed across 5 seeds:")
    assert f"in {nb}/5, the plain IRNN in {pb}/5" in line and needle in line
    assert "x1.5 stabilized vs overflow plain" in line
    assert f"of those, {nb // 2} stabilized and {pb // 2} plain had learned the task" in line


def test_learned_needs_half_the_constant_predictions_error():
    seed = {"baseline_mse": {"50": 0.16},
            "models": {"a": {"mse": {"50": 0.079}}, "b": {"mse": {"50": 0.081}},
                       "c": {"mse": {"50": None}}}}
    assert demo.learned(seed, "a", 50) and not demo.learned(seed, "b", 50)
    assert not demo.learned(seed, "c", 50)  # overflowed


def test_spread_handles_overflow_and_even_counts():
    s = common.spread([3.0, 1.0, math.inf, 2.0])
    assert s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == math.inf
    assert s["q75"] == math.inf and s["n"] == 4
    assert common.spread([None, 1.0])["max"] == math.inf  # None = overflowed (JSON null)
    assert common.spread([])["median"] is None


def test_run_jobs_in_two_processes_keeps_the_order():
    assert common.run_jobs(common.positive_int, ["3", "1", "2"], workers=2, threads=1) == \
        [3, 1, 2]


def test_progress_bars_only_on_a_terminal(monkeypatch):
    import io
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert not common.show_progress(False) and not common.show_progress(True)

    class Tty(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.setattr("sys.stderr", Tty())
    assert common.show_progress(False) and not common.show_progress(True)


# ----------------------------------------------------------------------------- README

def test_readme_sections_match_the_committed_json():
    with open(os.path.join(ROOT, "README.md")) as f:
        content = f.read()
    texts = readme.generate(ROOT)
    assert set(texts) == {"demo", "charlm"}, "commit docs/results/{demo,charlm}/*.json"
    assert readme.replace_sections(content, texts) == content, (
        "README.md is out of date: run python -m rnnreg_kernels.experiments.readme")
    with open(os.path.join(ROOT, readme.DEMO_JSON)) as f:
        doc = json.load(f)
    assert doc["verdict"] in content
    assert f"**{doc['aggregate']['bounded_count']}/{doc['aggregate']['seeds']}**" in content
    for name in ("demo", "charlm"):
        png = os.path.join(ROOT, "docs", "results", name, f"{name}.png")
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_readme_rewrite_replaces_only_between_the_markers(tmp_path):
    texts = {"demo": "new demo", "charlm": "new charlm"}
    body = ("a\n<!-- demo:begin -->\nold\n<!-- demo:end -->\nb\n<!-- charlm:begin -->\nx\n"
            "<!-- charlm:end -->\nc\n")
    assert readme.replace_sections(body, texts) == (
        "a\n<!-- demo:begin -->\nnew demo\n<!-- demo:end -->\nb\n<!-- charlm:begin -->\n"
        "new charlm\n<!-- charlm:end -->\nc\n")
    with pytest.raises(ValueError, match="charlm:begin"):
        readme.replace_sections("<!-- demo:begin -->\n<!-- demo:end -->\n", texts)
    stale = tmp_path / "README.md"
    stale.write_text(open(os.path.join(ROOT, "README.md")).read().replace(
        "<!-- demo:end -->", "hand-typed\n<!-- demo:end -->"))
    assert readme.main(["--readme", str(stale), "--check"]) == 1
    assert readme.main(["--readme", str(stale)]) == 0
    assert readme.main(["--readme", str(stale), "--check"]) == 0
