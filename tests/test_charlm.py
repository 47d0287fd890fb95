"""``python -m rnnreg_kernels experiment charlm``: the paper's character-level LM table.

The ``--quick`` run (the CI run) goes through the real entry point and must give finite bits
per character for every row it trains, with the unstabilized rows below the unigram entropy
of the corpus (they learned more than character frequencies).  At the quick size (300 steps)
the beta = 500 penalty still dominates the relu and TRec losses, which sit near the unigram
level, so those rows are only required to be finite.  The data split, the bpc evaluation and
the row plan are checked on small hand-made cases.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from rnnreg_kernels.__main__ import main
from rnnreg_kernels.experiments import charlm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_charlm_quick_runs_and_beats_the_unigram_entropy(tmp_path):
    out = tmp_path / "c"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "rnnreg_kernels", "experiment", "charlm",
                        "--quick", "--out", str(out), "--no-progress"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads((out / "charlm.json").read_text())
    assert (out / "charlm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    unigram = doc["corpus"]["unigram_entropy_bits"]
    assert 4.0 < unigram < 5.0  # Python's help text: ~4.6 bits per character
    rows = doc["rows"]
    plan = [(r["model"], r["beta"], r["target"]) for r in rows]
    assert plan == [(m, b, "hidden") for m in ("tanh", "relu", "trec", "lstm")
                    for b in (0.0, 500.0)] + [("lstm", 500.0, "cell"),
                                              ("normprop", 0.0, "hidden")]
    for row in rows:
        for key in ("valid_bpc", "test_bpc"):
            assert row[key] is not None and math.isfinite(row[key]) and row[key] > 0, row
        # auto on the CPU: native, but reference for trec and whatever needs the cell states
        slow = row["model"] in ("trec", "normprop") or row["target"] == "cell"
        assert row["curve"] and row["backend_used"] == ("reference" if slow else "native"), row
        if row["beta"] == 0:
            assert row["test_bpc"] < unigram and row["valid_bpc"] < unigram, row
    assert min(r["test_bpc"] for r in rows) < unigram - 0.5
    assert "valid bpc" in r.stdout and "test bpc" in r.stdout
    assert "normprop LSTM" in r.stdout and "cell" in r.stdout
    assert doc["command"].endswith("--no-progress") and doc["env"]["torch"] == torch.__version__
    assert doc["corpus"]["sha256"] and doc["config"]["quick"] is True


def test_split_streams_and_unigram_entropy():
    ids = torch.arange(100)
    train, valid, test = charlm.split(ids)
    assert (train.numel(), valid.numel(), test.numel()) == (90, 5, 5)
    assert torch.equal(torch.cat([train, valid, test]), ids)
    s = charlm.streams(torch.arange(10), 3)  # 3 streams of 3, the last element dropped
    assert s.tolist() == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert charlm.unigram_entropy("abab") == pytest.approx(1.0)
    assert charlm.unigram_entropy("aaaa") == 0.0


def test_evaluate_is_bits_per_character():
    """A model whose logits ignore the input scores exactly the cross-entropy of its output
    distribution, in bits, whatever the chunking."""
    vocab, hidden = 4, 3
    rnn, readout = charlm.build_model({"model": "tanh", "beta": 0.0, "target": "hidden"},
                                      vocab, hidden, "reference", torch.device("cpu"))
    with torch.no_grad():
        readout.weight.zero_()
        readout.bias.copy_(torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125])))
    data = charlm.streams(torch.tensor([0, 1, 2, 3, 0, 0, 1, 0, 2] * 4), 2)
    targets = data[1:].reshape(-1).tolist()
    bits = {0: 1.0, 1: 2.0, 2: 3.0, 3: 3.0}
    expect = sum(bits[t] for t in targets) / len(targets)
    for seq_len in (1, 4, 50):
        assert charlm.evaluate(rnn, readout, data, seq_len, vocab) == pytest.approx(expect)


def test_row_plan_has_the_papers_table():
    rows = charlm.row_plan(["tanh", "relu", "trec", "lstm", "normprop"], 500.0)
    hidden = [(r["model"], r["beta"]) for r in rows if r["target"] == "hidden"]
    assert hidden == [(m, b) for m in ("tanh", "relu", "trec", "lstm")
                      for b in (0.0, 500.0)] + [("normprop", 0.0)]
    cell = [r for r in rows if r["target"] == "cell"]
    assert len(cell) == 1 and cell[0]["model"] == "lstm" and cell[0]["beta"] == 500.0
    assert not any("skipped" in r for r in rows)
    assert charlm.MODELS == "tanh,relu,trec,lstm,normprop"


def test_models_are_the_papers_cells():
    dev = torch.device("cpu")
    for model, cls, nonlin in (("tanh", "RNN", "tanh"), ("relu", "IRNN", "relu"),
                               ("trec", "RNN", "trec"), ("lstm", "LSTM", None),
                               ("normprop", "NormPropLSTM", None)):
        rnn, readout = charlm.build_model({"model": model, "beta": 500.0, "target": "hidden"},
                                          7, 5, "reference", dev)
        assert type(rnn).__name__ == cls and rnn.norm_stabilizer == 500.0
        assert getattr(rnn, "nonlinearity", None) == nonlin
        assert readout.out_features == 7 and rnn.input_size == 7
        assert charlm.input_scale(rnn) == (7 ** 0.5 if model == "normprop" else 1.0)
        if model in ("relu", "trec"):
            assert torch.equal(rnn.weight_hh_l0, torch.eye(5))
    rnn, _ = charlm.build_model({"model": "lstm", "beta": 50.0, "target": "cell"}, 7, 5,
                                "reference", dev)
    assert rnn.cell_norm_stabilizer == 50.0 and rnn.norm_stabilizer == 0.0
    with pytest.raises(ValueError, match="unknown model 'gru'; expected one of tanh,relu"):
        charlm.build_model({"model": "gru", "beta": 0.0, "target": "hidden"}, 7, 5,
                           "reference", dev)


@pytest.mark.parametrize("extra, needle", [
    (["--corpus", "/nonexistent/text.txt"], "--corpus '/nonexistent/text.txt': cannot read"),
    (["--models", "tanh,gru"], "--models expected a comma-separated subset"),
    (["--max-chars", "300"], "the corpus is too short (300 characters)"),
])
def test_charlm_rejects_unusable_settings(capsys, tmp_path, extra, needle):
    argv = ["experiment", "charlm", "--quick", "--out", str(tmp_path), "--no-progress"] + extra
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_charlm_reads_a_corpus_file(tmp_path, capsys):
    text = tmp_path / "tiny.txt"
    text.write_text("the cat sat on the mat. " * 400)
    rc = main(["experiment", "charlm", "--corpus", str(text), "--models", "tanh", "--hidden",
               "8", "--steps", "20", "--seq-len", "10", "--batch", "4", "--eval-every", "10",
               "--eval-streams", "2", "--workers", "1", "--out", str(tmp_path / "o"),
               "--no-progress"])
    assert rc == 0, capsys.readouterr()
    doc = json.loads((tmp_path / "o" / "charlm.json").read_text())
    assert doc["corpus"]["name"] == "tiny.txt" and doc["corpus"]["vocabulary"] == 11
    assert [r["model"] for r in doc["rows"]] == ["tanh", "tanh"]
    assert all(math.isfinite(r["test_bpc"]) for r in doc["rows"])
