"""``python -m rnnreg_kernels experiment charlm``: the paper's character-level language models.

Krueger & Memisevic train character-level language models (next-step prediction) on Penn
Treebank and report bits per character for tanh, relu (IRNN) and TRec RNNs with the
norm-stabilizer at beta = 0 and beta = 500, and for LSTMs with it on the hidden state or on
the memory cell.  This command trains the same table on a corpus every Python install has,
the text of ``pydoc_data.topics`` (the interpreter's help topics, about 465 KB; it differs a
little between Python versions, so the JSON records the version, size and a hash), or on
any text file (``--corpus FILE``, e.g. PTB's character files).

Data: the characters of the corpus (vocabulary = every character in it), split into the
first 90 % (train), the next 5 % (valid) and the last 5 % (test).  Training: ``--batch``
contiguous streams, truncated backpropagation through ``--seq-len`` steps with the hidden
state carried (detached) from chunk to chunk, cross-entropy + the module's penalty, Adam
(lr 0.002) with gradient-norm clipping 1 (the paper's best column), one layer.  Evaluation:
bits per character over the whole valid / test text, state carried, every ``--eval-every``
steps on valid; test is scored with the weights of the best valid evaluation.

Models (one row each): tanh (PyTorch's uniform init), relu = IRNN (identity ``weight_hh``,
zero biases, Le et al. 2015) and TRec (thresholded rectifier, theta = 1, initialized as the
IRNN), each with beta = 0 and ``--beta``.  The one-hot input makes ``weight_ih`` a character
embedding: for relu and TRec it starts ``N(0, 1)`` (as ``nn.Embedding``; IRNN's N(0, 0.001)
barely learned in short runs, and TRec needs inputs above its threshold to fire at all).
LSTM (PyTorch's init) with beta = 0 and ``--beta`` on the hidden state, and with ``--beta`` on
the memory cell (``cell_norm_stabilizer``, the slides' "penalize: memory cell" row).  The
normprop LSTM (``rnnreg_kernels.NormPropLSTM``, Recurrent Normalization Propagation, its
defaults gamma = (2, 2, 1)) is one more row at beta = 0, beside the plain LSTM; its one-hot
input is scaled by sqrt(vocabulary), so that each input component has unit second moment
(the variance the normprop constants assume; a plain one-hot vector through unit-norm
weight rows would reach the gates with variance ~1/vocabulary).  The memory-cell and normprop
rows need the cell states, so they run on ``reference`` on the CPU (never ``native``).

Sizes: ``--quick`` (tests / CI: about 30 CPU seconds), the CPU default (hidden 256, 6000
steps of 32 x 50: an estimated 1900 CPU seconds from the per-step CPU time of these models,
about 16 minutes on 2 idle cores with 2 worker processes; not a measured run), and on CUDA
the scale of the project's char-level benchmark shape (hidden 1000, 100 steps, batch 32).
Writes ``charlm.json`` (rows, curves, command, versions) and ``charlm.png`` (validation bpc
against training step) into ``--out``.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys

from . import common

LN2 = math.log(2.0)
# The paper's PTB test bpc in its "lr = .002, gc = 1" column (the setting used here) and its
# best over all four columns (slides of Krueger & Memisevic, IRNN performance table).
PAPER_PTB = {("tanh", 0.0): (1.71, 1.55), ("tanh", 500.0): (1.57, 1.57),
             ("relu", 0.0): (1.78, 1.69), ("relu", 500.0): (1.74, 1.65),
             ("trec", 0.0): (1.62, 1.62), ("trec", 500.0): (1.48, 1.48)}

SIZES = {
    "quick": dict(hidden=48, steps=300, seq_len=25, batch=16, eval_every=100, lr=0.005,
                  max_chars=60000, eval_chars=3000),
    "cpu": dict(hidden=256, steps=6000, seq_len=50, batch=32, eval_every=500, lr=2e-3,
                max_chars=0, eval_chars=0),
    "cuda": dict(hidden=1000, steps=20000, seq_len=100, batch=32, eval_every=1000, lr=2e-3,
                 max_chars=0, eval_chars=0),
}
# relu and TRec: weight_ih acts as a character embedding (one-hot input) and starts N(0, 1)
# as nn.Embedding does; IRNN's own N(0, 0.001) left the quick runs near the unigram level.
EMBED_STD = 1.0
LABELS = {"tanh": "tanh", "relu": "relu (IRNN)", "trec": "TRec", "lstm": "LSTM",
          "normprop": "normprop LSTM"}
MODELS = ",".join(LABELS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", default=None,
                        help="a UTF-8 text file (default: the text of pydoc_data.topics)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny run for tests / CI (explicit options win): " +
                             ", ".join(f"{k}={v}" for k, v in SIZES["quick"].items()))
    for key, kind, text in (
            ("hidden", common.positive_int, "hidden units"),
            ("steps", common.positive_int, "training steps per model"),
            ("seq-len", common.positive_int, "truncated-BPTT length"),
            ("batch", common.positive_int, "training streams (batch size)"),
            ("eval-every", common.positive_int, "steps between validation evaluations")):
        parser.add_argument(f"--{key}", type=kind, default=None,
                            help=f"{text} (default: {SIZES['cpu'][key.replace('-', '_')]} on "
                                 f"the CPU, {SIZES['cuda'][key.replace('-', '_')]} on CUDA)")
    parser.add_argument("--max-chars", type=int, default=None,
                        help="use only the first N characters of the corpus (0 = all)")
    parser.add_argument("--eval-chars", type=int, default=None,
                        help="score only the first N characters of valid and test (0 = all)")
    parser.add_argument("--lr", type=common.positive_float, default=None,
                        help="Adam learning rate (default 0.002; 0.01 with --quick)")
    parser.add_argument("--clip", type=common.non_negative_float, default=1.0,
                        help="gradient-norm clipping, 0 = off (default 1)")
    parser.add_argument("--beta", type=common.positive_float, default=500.0,
                        help="norm-stabilizer beta of the stabilized rows (default 500)")
    parser.add_argument("--models", default=MODELS,
                        help=f"comma-separated cells to train (default {MODELS})")
    parser.add_argument("--eval-streams", type=common.positive_int, default=10,
                        help="parallel streams the valid / test text is cut into (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every model (default 0)")
    common.add_run_arguments(parser, "charlm_out")


# ----------------------------------------------------------------------------- data

def load_corpus(path=None) -> tuple:
    """``(text, name)``: the file's text, or the help topics of ``pydoc_data.topics`` joined
    in key order."""
    if path is None:
        import platform

        import pydoc_data.topics as topics

        return ("".join(topics.topics[k] for k in sorted(topics.topics)),
                f"pydoc_data.topics (Python {platform.python_version()})")
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read(), os.path.basename(path)


def unigram_entropy(text: str) -> float:
    """Bits per character of the corpus's own character frequencies (the bpc of a model
    that learned only how often each character occurs)."""
    from collections import Counter

    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in Counter(text).values())


def split(ids, fractions=(0.9, 0.05)) -> tuple:
    """Contiguous train / valid / test thirds of a 1-D tensor at the given fractions."""
    n = ids.numel()
    a, b = int(n * fractions[0]), int(n * (fractions[0] + fractions[1]))
    return ids[:a], ids[a:b], ids[b:]


def streams(ids, count: int):
    """``[N] -> [N // count, count]``: ``count`` contiguous streams, time-major."""
    n = ids.numel() // count
    return ids[:n * count].view(count, n).t().contiguous()


# ----------------------------------------------------------------------------- model

def row_plan(cells: list, beta: float) -> list:
    """The table's rows: dicts with model, beta and target ("hidden" or "cell": what the
    norm-stabilizer penalizes).  Every RNN and the LSTM at beta = 0 and ``beta`` on the hidden
    state, the LSTM also on its memory cell; the normprop LSTM at beta = 0 only (a comparison
    row beside the plain LSTM, kept to one row for the run's cost)."""
    rows = []
    for cell in cells:
        for b in ((0.0,) if cell == "normprop" else (0.0, beta)):
            rows.append({"model": cell, "beta": b, "target": "hidden"})
        if cell == "lstm":
            rows.append({"model": "lstm", "beta": beta, "target": "cell"})
    return rows


def input_scale(rnn) -> float:
    """The factor on the one-hot input: sqrt(vocabulary) for the normprop LSTM (unit second
    moment per input component, what its constants assume), 1 for every other model."""
    import rnnreg_kernels

    return math.sqrt(rnn.input_size) if isinstance(rnn, rnnreg_kernels.NormPropLSTM) else 1.0


def build_model(row: dict, vocab: int, hidden: int, backend: str, device):
    """The recurrent module of one row (rnnreg_kernels.RNN / IRNN / LSTM) and its readout."""
    import torch

    import rnnreg_kernels

    cell, beta = row["model"], row["beta"]
    if cell == "lstm":
        kw = ({"cell_norm_stabilizer": beta} if row["target"] == "cell"
              else {"norm_stabilizer": beta})
        rnn = rnnreg_kernels.LSTM(vocab, hidden, backend=backend, device=device, **kw)
    elif cell == "normprop":
        rnn = rnnreg_kernels.NormPropLSTM(vocab, hidden, norm_stabilizer=beta, backend=backend,
                                          device=device)
    elif cell == "relu":
        rnn = rnnreg_kernels.IRNN(vocab, hidden, init_std=EMBED_STD, norm_stabilizer=beta,
                                  backend=backend, device=device)
    elif cell == "trec":
        rnn = rnnreg_kernels.RNN(vocab, hidden, nonlinearity="trec", theta=1.0,
                                 norm_stabilizer=beta, backend=backend, device=device)
        with torch.no_grad():
            rnn.weight_hh_l0.copy_(torch.eye(hidden, device=device))
            rnn.weight_ih_l0.normal_(0.0, EMBED_STD)
            rnn.bias_ih_l0.zero_()
            rnn.bias_hh_l0.zero_()
    elif cell == "tanh":
        rnn = rnnreg_kernels.RNN(vocab, hidden, nonlinearity="tanh", norm_stabilizer=beta,
                                 backend=backend, device=device)
    else:
        raise ValueError(f"charlm: unknown model {cell!r}; expected one of {MODELS}")
    return rnn, torch.nn.Linear(hidden, vocab, device=device)


def _forward(rnn, readout, x, state, vocab: int):
    """Logits ``[T, B, V]`` and the next state for one chunk of character ids ``x [T, B]``."""
    import torch

    onehot = torch.nn.functional.one_hot(x, vocab).to(readout.weight.dtype)
    scale = input_scale(rnn)
    out, state = rnn(onehot * scale if scale != 1.0 else onehot, state)
    return readout(out), state


def _detach(state):
    if state is None:
        return None
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


def evaluate(rnn, readout, data, seq_len: int, vocab: int) -> float:
    """Bits per character of predicting ``data[t + 1]`` from ``data[..t]`` over a
    ``[N, S]`` stream tensor, state carried from chunk to chunk."""
    import torch

    total, count, state = 0.0, 0, None
    with torch.no_grad():
        for i in range(0, data.shape[0] - 1, seq_len):
            x, y = data[i:i + seq_len], data[i + 1:i + 1 + seq_len]
            x = x[:y.shape[0]]
            logits, state = _forward(rnn, readout, x, state, vocab)
            total += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, vocab).double(), y.reshape(-1), reduction="sum"))
            count += y.numel()
    return total / count / LN2 if math.isfinite(total) else float("inf")


def train_row(job: dict) -> dict:
    """Train and score one row (runs in a worker process); returns the row's result."""
    import torch

    row, cfg = job["row"], job["config"]
    device = torch.device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    vocab = job["vocab"]
    train, valid, test = (job[k].to(device=device, dtype=torch.long)
                          for k in ("train", "valid", "test"))
    rnn, readout = build_model(row, vocab, cfg["hidden"], cfg["backend"], device)
    params = list(rnn.parameters()) + list(readout.parameters())
    opt = torch.optim.Adam(params, lr=cfg["lr"])
    data = streams(train, cfg["batch"])
    vdata, tdata = streams(valid, cfg["eval_streams"]), streams(test, cfg["eval_streams"])
    T = cfg["seq_len"]
    chunks = max(1, (data.shape[0] - 1) // T)
    curve, best, best_state, train_sum, train_n, state = [], float("inf"), None, 0.0, 0, None
    timer = common.Timer()
    bar = common.progress(cfg["steps"], f"{LABELS[row['model']]} b={row['beta']:g}",
                          cfg["progress"], job["index"] % max(1, cfg["workers"]))
    diverged = None
    for step in range(1, cfg["steps"] + 1):
        k = (step - 1) % chunks
        if k == 0:
            state = None  # a new pass over the training text starts from a zero state
        x, y = data[k * T:(k + 1) * T], data[k * T + 1:(k + 1) * T + 1]
        logits, state = _forward(rnn, readout, x, state, vocab)
        state = _detach(state)
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
        loss = ce + rnn.penalty
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg["clip"]:
            torch.nn.utils.clip_grad_norm_(params, cfg["clip"])
        opt.step()
        ce_value = float(ce.detach())
        if not math.isfinite(ce_value):
            diverged = step
        train_sum, train_n = train_sum + ce_value, train_n + 1
        bar.update(1)
        if step % cfg["eval_every"] == 0 or step == cfg["steps"] or diverged:
            vbpc = evaluate(rnn, readout, vdata, T, vocab)
            curve.append({"step": step, "train_bpc": train_sum / train_n / LN2,
                          "valid_bpc": vbpc, "penalty": float(rnn.penalty.detach())})
            train_sum, train_n = 0.0, 0
            bar.set_postfix(valid_bpc=f"{vbpc:.3f}")
            if vbpc < best:
                best = vbpc
                best_state = ({k: v.clone() for k, v in rnn.state_dict().items()},
                              {k: v.clone() for k, v in readout.state_dict().items()})
            if diverged:
                break
    bar.close()
    test_bpc = float("inf")
    if best_state is not None:
        rnn.load_state_dict(best_state[0])
        readout.load_state_dict(best_state[1])
        test_bpc = evaluate(rnn, readout, tdata, T, vocab)
    return dict(row, valid_bpc=best, test_bpc=test_bpc, curve=curve,
                best_step=next((c["step"] for c in curve if c["valid_bpc"] == best), None),
                diverged_at_step=diverged, train_wall_s=timer.wall(), cpu_s=timer.cpu(),
                backend_used=common.backend_used(rnn, row["model"]))


# ----------------------------------------------------------------------------- report

def format_table(rows: list) -> str:
    """The paper's layout: one line per model and beta, valid and test bpc."""
    lines = [f"{'model':<14} {'beta':>6} {'target':<7} {'valid bpc':>10} {'test bpc':>9}  "
             f"paper PTB test (lr .002, gc 1 / best)"]
    for r in rows:
        paper = PAPER_PTB.get((r["model"], float(r["beta"])))
        ref = f"{paper[0]:.2f} / {paper[1]:.2f}" if paper else "-"
        vals = f"{_bpc(r['valid_bpc']):>10} {_bpc(r['test_bpc']):>9}"
        lines.append(f"{LABELS[r['model']]:<14} {r['beta']:>6g} {r['target']:<7} {vals}  {ref}")
    return "\n".join(lines)


def _bpc(v) -> str:
    return "inf" if v is None or not math.isfinite(v) else f"{v:.3f}"


def plot(path: str, rows: list, unigram: float, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {"tanh": "C0", "relu": "C1", "trec": "C2", "lstm": "C3", "normprop": "C4"}
    for r in rows:
        pts = [(c["step"], c["valid_bpc"]) for c in r.get("curve", [])
               if c["valid_bpc"] is not None and math.isfinite(c["valid_bpc"])]
        if not pts:
            continue
        ax.plot(*zip(*pts), marker=".", color=colors[r["model"]],
                ls=":" if r["target"] == "cell" else ("-" if r["beta"] > 0 else "--"),
                label=f"{LABELS[r['model']]} beta={r['beta']:g} ({r['target']})")
    ax.axhline(unigram, color="gray", ls=":", label=f"unigram entropy {unigram:.2f}")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation bits per character")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    """Train every row, print the table, write charlm.json / charlm.png; 0 on success, 2 on an
    unusable setting."""
    import torch

    timer = common.Timer()
    device = common.check_run_arguments("experiment charlm", args)
    if device is None:
        return 2
    size = "quick" if args.quick else ("cuda" if device.type == "cuda" else "cpu")
    for key, value in SIZES[size].items():
        if getattr(args, key) is None:  # options given explicitly win over the size
            setattr(args, key, value)
    cells = [c.strip() for c in args.models.split(",") if c.strip()]
    bad = [c for c in cells if c not in LABELS]
    if bad or not cells:
        print(f"experiment charlm: --models expected a comma-separated subset of "
              f"{MODELS}, got {args.models!r}", file=sys.stderr)
        return 2
    try:
        text, name = load_corpus(args.corpus)
    except OSError as exc:
        print(f"experiment charlm: --corpus {args.corpus!r}: cannot read it: {exc}",
              file=sys.stderr)
        return 2
    if args.max_chars:
        text = text[:args.max_chars]
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.int16)
    train, valid, test = split(ids)
    if args.eval_chars:
        valid, test = valid[:args.eval_chars], test[:args.eval_chars]
    need = args.batch * (args.seq_len + 1)
    if train.numel() < need or min(valid.numel(), test.numel()) < 2 * args.eval_streams:
        print(f"experiment charlm: the corpus is too short ({len(text)} characters) for "
              f"--batch {args.batch} x --seq-len {args.seq_len} (train needs {need}) and "
              f"--eval-streams {args.eval_streams}; use a longer --corpus or smaller sizes",
              file=sys.stderr)
        return 2
    unigram = unigram_entropy(text)
    env = common.environment(device)
    rows = row_plan(cells, args.beta)
    cfg = {k: getattr(args, k) for k in ("hidden", "steps", "seq_len", "batch", "eval_every",
                                         "lr", "clip", "seed", "backend", "eval_streams",
                                         "workers")}
    cfg.update(device=str(device), progress=common.show_progress(args.no_progress))
    print(f"experiment charlm: {name}, {len(text)} characters, vocabulary {len(chars)}, "
          f"train/valid/test {train.numel()}/{valid.numel()}/{test.numel()}; unigram entropy "
          f"{unigram:.3f} bits; hidden {args.hidden}, {args.steps} steps of {args.batch} x "
          f"{args.seq_len} characters, Adam lr {args.lr:g}, clip {args.clip:g}, beta "
          f"{args.beta:g}; device {device}, backend {args.backend}, {args.workers} worker(s)")
    # longest first (the LSTMs), so two workers finish together
    order = sorted(range(len(rows)), key=lambda i: rows[i]["model"] not in ("lstm", "normprop"))
    jobs = [{"row": rows[i], "config": cfg, "vocab": len(chars), "train": train,
             "valid": valid, "test": test, "index": n} for n, i in enumerate(order)]
    results = common.run_jobs(train_row, jobs, args.workers, args.threads)
    done = {order[n]: res for n, res in enumerate(results)}
    out_rows = [done[i] for i in range(len(rows))]
    for r in out_rows:
        paper = PAPER_PTB.get((r["model"], float(r["beta"])))
        r["paper_ptb_test_bpc"] = ({"lr.002_gc1": paper[0], "best": paper[1]}
                                   if paper else None)
    print(format_table(out_rows))
    png = os.path.join(args.out, "charlm.png")
    plot(png, out_rows, unigram,
         f"char-level LM on {name}: hidden {args.hidden}, {args.steps} steps of "
         f"{args.batch}x{args.seq_len}; dashed beta=0, solid beta={args.beta:g} (hidden), "
         f"dotted beta={args.beta:g} (memory cell)")
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    doc = {"experiment": "charlm", "command": common.command_line(),
           "created_utc": common.now_utc(),
           "corpus": {"name": name, "path": args.corpus, "characters": len(text),
                      "sha256": sha, "vocabulary": len(chars),
                      "split": {"train": train.numel(), "valid": valid.numel(),
                                "test": test.numel()},
                      "unigram_entropy_bits": unigram},
           "config": dict(cfg, size=size, beta=args.beta, models=cells,
                          max_chars=args.max_chars, eval_chars=args.eval_chars,
                          threads=args.threads, quick=args.quick),
           "rows": out_rows, "wall_s": timer.wall(), "cpu_s": timer.cpu(),
           "env": common.finish_environment(env)}
    path = os.path.join(args.out, "charlm.json")
    common.write_json(path, doc)
    print(f"unigram entropy of the corpus {unigram:.3f} bits per character; wrote {png} and "
          f"{path} ({timer.wall():.1f} s wall, {timer.cpu():.1f} s CPU)")
    return 0
