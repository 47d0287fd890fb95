"""``python -m rnnreg_kernels demo``: does the norm-stabilizer keep an IRNN bounded past its
training horizon?

Trains two IRNNs (relu, identity init; Le, Jaitly & Hinton 2015) on the adding problem at one
sequence length, one plain and one with the norm-stabilizer (Krueger & Memisevic 2016), then
runs both on sequences up to many times longer and records, per time step, the mean hidden
norm (``module.hidden_norms``) and, per evaluation length, the mean squared error.  Writes a
table to stdout, ``demo.png`` (hidden norm against time step, log scale; error against
evaluation length) and ``demo.json`` (every number) into ``--out``; the closing summary is
computed from the measured numbers.

Adding problem: two input channels per step, a value uniform in [0, 1] and a marker that is 1
at exactly two steps (one in the first half of the sequence, one in the second) and 0
elsewhere; the target is the sum of the two marked values.  Predicting the constant 1 gives
MSE 1/6, the level a model that learned nothing reaches.

Defaults (hidden 64, T = 50, 4000 Adam steps, beta = 200) take about 70 s on one idle CPU
core with the reference backend.  beta = 200 was chosen by running 10, 50 and 200: all three
kept the seed-0 norms within x2 past the horizon, 200 also kept the error low up to 20x the
training length.  The outcome depends on the seed (``--seed``); the summary says what this
run did.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Optional

QUICK = dict(steps=30, hidden=16, train_len=20, batch=16, eval_batch=32, eval_factors="1,2,5")
BOUND_FACTOR = 2.0  # "bounded": max norm past the horizon <= this x the max norm up to it


def adding_batch(steps: int, batch: int, gen, device=None):
    """One adding-problem batch.

    Returns ``x [steps, batch, 2]`` (float32; channel 0 values, channel 1 markers) and
    ``y [batch]`` (sum of the two marked values).  The first marker is uniform over the first
    ``steps // 2`` positions, the second over the rest (``steps >= 2``).
    """
    import torch

    if steps < 2:
        raise ValueError(f"adding problem: sequence length must be >= 2, got {steps}")
    values = torch.rand(steps, batch, generator=gen)
    half = steps // 2
    first = torch.randint(0, half, (batch,), generator=gen)
    second = torch.randint(half, steps, (batch,), generator=gen)
    markers = torch.zeros(steps, batch)
    cols = torch.arange(batch)
    markers[first, cols] = 1.0
    markers[second, cols] = 1.0
    x = torch.stack([values, markers], -1)
    y = (values * markers).sum(0)
    return x.to(device), y.to(device)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _float_above(lower: float, inclusive: bool):
    """argparse type: a finite float > lower (>= lower when ``inclusive``)."""
    bound = f"{'>=' if inclusive else '>'} {lower:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < lower or (value == lower and not inclusive):
            raise argparse.ArgumentTypeError(f"expected a finite number {bound}, got {text!r}")
        return value

    return parse


_non_negative_float = _float_above(0.0, inclusive=True)
_positive_float = _float_above(0.0, inclusive=False)


def _factors(text: str) -> list:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers such as 1,2,5,10, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers such as 1,2,5,10, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=_positive_int, default=4000,
                        help="training steps per model (default 4000)")
    parser.add_argument("--hidden", type=_positive_int, default=64,
                        help="hidden units (default 64)")
    parser.add_argument("--train-len", type=_positive_int, default=50,
                        help="training sequence length T (default 50, >= 2)")
    parser.add_argument("--batch", type=_positive_int, default=64,
                        help="training batch size (default 64)")
    parser.add_argument("--lr", type=_positive_float, default=2e-3,
                        help="Adam learning rate (default 2e-3)")
    parser.add_argument("--clip", type=_non_negative_float, default=1.0,
                        help="gradient norm clipping, 0 = off (default 1.0)")
    parser.add_argument("--beta", type=_non_negative_float, default=200.0,
                        help="norm-stabilizer beta of the stabilized model (default 200)")
    parser.add_argument("--eval-factors", type=_factors, default=_factors("1,2,5,10,20"),
                        help="evaluation lengths as multiples of --train-len "
                             "(default 1,2,5,10,20)")
    parser.add_argument("--eval-batch", type=_positive_int, default=256,
                        help="sequences per evaluation length (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed for init and data (default 0)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--backend", default="auto",
                        choices=("auto", "reference", "naive", "triton", "cuda"),
                        help="recurrence backend (default auto: the fastest that can run)")
    parser.add_argument("--threads", type=_positive_int, default=1,
                        help="CPU threads for torch (default 1: the per-step products are "
                             "tiny and run fastest single-threaded)")
    parser.add_argument("--out", default="demo_out",
                        help="output folder for demo.png and demo.json (default ./demo_out)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny run for tests / CI (overrides sizes: " +
                             ", ".join(f"{k}={v}" for k, v in QUICK.items()) + ")")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


# ----------------------------------------------------------------------------- runs

def train(model, readout, args, gen, label: str) -> list:
    """Train ``model`` + ``readout`` in place; returns the training MSE every step."""
    import torch
    from tqdm import tqdm

    params = list(model.parameters()) + list(readout.parameters())
    opt = torch.optim.Adam(params, lr=args.lr)
    history = []
    bar = tqdm(range(args.steps), desc=f"train {label}", unit="step", file=sys.stderr,
               disable=args.no_progress, leave=False)
    for _ in bar:
        x, y = adding_batch(args.train_len, args.batch, gen, args.device)
        out, h_n = model(x)
        mse = ((readout(h_n[-1]).squeeze(-1) - y) ** 2).mean()
        loss = mse + model.penalty
        mse = mse.detach()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        history.append(mse.item())
        if len(history) % 25 == 0:
            bar.set_postfix(mse=f"{sum(history[-25:]) / 25:.4f}",
                            penalty=f"{model.penalty.detach().item():.3g}")
    bar.close()
    return history


def evaluate(model, readout, lengths: list, args, seed: int) -> dict:
    """Run the trained model on fresh sequences of every length (the same data for every
    model: the generator is re-seeded).

    Per length L: ``mse`` (mean squared error), ``median_se``, ``baseline_mse`` (predicting
    1), ``max_norm`` ([L+1] per-step max of ||h_t|| over the batch), ``final_norm`` (mean of
    ||h_L||).  For the longest length also ``mean_norm`` ([L+1] per-step batch mean).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    keys = ("mse", "median_se", "baseline_mse", "max_norm", "final_norm")
    result = {k: {} for k in keys}
    with torch.no_grad():
        for steps in lengths:
            x, y = adding_batch(steps, args.eval_batch, gen, args.device)
            _, h_n = model(x)
            se = (readout(h_n[-1]).squeeze(-1) - y).double() ** 2
            result["mse"][steps] = float(se.mean())
            result["median_se"][steps] = float(se.median())
            result["baseline_mse"][steps] = float(((1.0 - y) ** 2).mean())
            norms = model.hidden_norms[-1].double()  # [T+1, B], t = 0..T
            result["max_norm"][steps] = _curve(norms.max(1).values)
            result["final_norm"][steps] = float(norms[-1].mean())
            if steps == max(lengths):
                result["mean_norm"] = _curve(norms.mean(1))
    return result


def _curve(t) -> list:
    """A 1-D tensor as a list of floats, NaN read as inf (an overflowed norm)."""
    return [float("inf") if math.isnan(v) else v for v in t.tolist()]


# ----------------------------------------------------------------------------- report

def _finite(v: float) -> Optional[float]:
    return v if math.isfinite(v) else None


def norm_stats(mean_curve: list, max_curves: list, horizon: int) -> dict:
    """Boundedness of one model's hidden norms past the training horizon.

    Args:
        mean_curve: per-step batch-mean norm of the longest run (index t = 0..T_max).
        max_curves: per-step batch-max norm of every evaluation run, the longest last.
        horizon: the training length.
    ``bounded``: the largest norm of any sequence after t = horizon is finite and at most
    ``BOUND_FACTOR`` times the largest up to t = horizon (over all runs).  ``late_growth``:
    the longest run's batch-max norm at its end over its value halfway (1 = levelled off).
    """
    inside = [v for c in max_curves for v in c[1:horizon + 1]]
    after = [v for c in max_curves for v in c[horizon + 1:]]
    max_in = max(inside, default=float("nan"))
    bad = [next((t for t, v in enumerate(c) if not math.isfinite(v)), None) for c in max_curves]
    bad = [t for t in bad if t is not None]
    overflow = min(bad) if bad else None
    max_after = float("inf") if overflow is not None else max(after, default=float("nan"))
    growth = max_after / max_in if max_in > 0 else float("inf")
    longest = max_curves[-1]
    half = longest[(len(longest) - 1) // 2]
    late = longest[-1] / half if half > 0 else float("inf")
    return {"mean_at_horizon": mean_curve[horizon], "mean_final": mean_curve[-1],
            "max_up_to_horizon": max_in, "max_after_horizon": max_after,
            "max_finite_after_horizon": max((v for v in after if math.isfinite(v)),
                                            default=None),
            "growth_after_horizon": growth, "late_growth": late,
            "first_non_finite_step": overflow,
            "bounded": bool(math.isfinite(growth) and growth <= BOUND_FACTOR)}


def describe(name: str, stats: dict, horizon: int, t_max: int) -> str:
    """One sentence about a model's norms, from its numbers."""
    head = (f"{name}: mean hidden norm {stats['mean_at_horizon']:.3g} at t={horizon} (the "
            f"training length) and {stats['mean_final']:.3g} at t={t_max}; largest norm of "
            f"any sequence {stats['max_up_to_horizon']:.3g} up to t={horizon}")
    if stats["first_non_finite_step"] is not None:
        return (f"{head}, non-finite (overflow) from t={stats['first_non_finite_step']}: "
                f"NOT bounded")
    verdict = (f"within x{BOUND_FACTOR:g}: bounded" if stats["bounded"] else
               f"beyond x{BOUND_FACTOR:g}: NOT bounded")
    late = stats["late_growth"]
    trend = (f"levelled off (x{late:.3g} over the second half of the T={t_max} run)"
             if late <= 1.05 else
             f"still growing at t={t_max} (x{late:.3g} over the second half of that run)")
    return (f"{head}, {stats['max_after_horizon']:.3g} after it "
            f"(x{stats['growth_after_horizon']:.3g}, {verdict}); {trend}")


def format_table(lengths: list, runs: dict, horizon: int) -> str:
    """Per evaluation length: each model's MSE, median squared error, largest hidden norm
    and mean final norm, and the constant-prediction MSE."""
    names = list(runs)
    head = ["T_eval", "x train", "MSE const"]
    for n in names:
        head += [f"MSE {n}", f"medSE {n}", f"max|h| {n}", f"mean|h_T| {n}"]
    rows = [head]
    for steps in lengths:
        ev0 = runs[names[0]]["eval"]
        row = [str(steps), f"{steps / horizon:g}", f"{ev0['baseline_mse'][steps]:.3g}"]
        for n in names:
            ev = runs[n]["eval"]
            row += [f"{ev['mse'][steps]:.3g}", f"{ev['median_se'][steps]:.3g}",
                    f"{max(ev['max_norm'][steps]):.3g}", f"{ev['final_norm'][steps]:.3g}"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(path: str, lengths: list, runs: dict, horizon: int, title: str) -> None:
    """demo.png: hidden norm vs time step on the longest run (batch mean solid, batch max
    dashed; log y) and error vs evaluation length (log-log)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    t_max = max(lengths)
    for name, run in runs.items():
        ev = run["eval"]
        mean, top = ev["mean_norm"], ev["max_norm"][t_max]
        t = [i for i, v in enumerate(mean) if i > 0 and math.isfinite(v) and v > 0]
        line, = ax1.plot(t, [mean[i] for i in t], label=f"{name}: batch mean")
        t = [i for i, v in enumerate(top) if i > 0 and math.isfinite(v) and v > 0]
        ax1.plot(t, [top[i] for i in t], ls="--", lw=0.8, color=line.get_color(),
                 label=f"{name}: batch max")
        bad = next((i for i, v in enumerate(top) if not math.isfinite(v)), None)
        if bad is not None:
            ax1.axvline(bad, color=line.get_color(), ls=":", lw=1)
            ax1.annotate(f"{name}: overflow at t={bad}", (bad, 0.98),
                         xycoords=("data", "axes fraction"), rotation=90, va="top",
                         ha="right", fontsize=8, color=line.get_color())
        for key, style in (("mse", "o-"), ("median_se", "s--")):
            vals = [(s, ev[key][s]) for s in lengths if math.isfinite(ev[key][s])
                    and ev[key][s] > 0]
            ax2.plot([s for s, _ in vals], [v for _, v in vals], style, color=line.get_color(),
                     label=f"{name}: {'mean' if key == 'mse' else 'median'} sq. error")
    ax1.axvline(horizon, color="gray", ls="--", lw=1, label=f"training length {horizon}")
    ax1.set_yscale("log")
    ax1.set_xlabel("time step t")
    ax1.set_ylabel("hidden norm ||h_t||")
    ax1.set_title(f"hidden norm on the T={t_max} evaluation run (t >= 1)")
    ax1.legend(fontsize=7)
    base = runs[next(iter(runs))]["eval"]["baseline_mse"]
    ax2.plot(lengths, [base[s] for s in lengths], "k:", label="predict 1 (learned nothing)")
    ax2.axvline(horizon, color="gray", ls="--", lw=1)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("evaluation sequence length")
    ax2.set_ylabel("squared error (non-finite points omitted)")
    ax2.set_title("error against evaluation length")
    ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _jsonable(obj):
    if isinstance(obj, float):
        return _finite(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def summary_lines(runs: dict, lengths: list, horizon: int) -> list:
    """The closing summary, every claim computed from the numbers."""
    t_max = max(lengths)
    lines = [describe(name, run["norm_stats"], horizon, t_max) for name, run in runs.items()]
    for name, run in runs.items():
        ev = run["eval"]
        parts = ", ".join(f"{ev['mse'][s]:.3g}/{ev['median_se'][s]:.3g} at T={s}"
                          for s in lengths)
        learned = [s for s in lengths if math.isfinite(ev["mse"][s])
                   and ev["mse"][s] < 0.5 * ev["baseline_mse"][s]]
        beats = ("MSE below half the constant prediction's at T=" +
                 ",".join(str(s) for s in learned)) if learned else \
            "MSE never below half the constant prediction's"
        lines.append(f"{name}: MSE/median squared error {parts}; {beats}")
    names = list(runs)
    plain, ns = runs[names[0]]["norm_stats"], runs[names[1]]["norm_stats"]
    within = f"within x{BOUND_FACTOR:g}"
    if ns["bounded"] and not plain["bounded"]:
        verdict = f"the stabilized IRNN stayed {within} past the horizon and the plain one did not"
    elif ns["bounded"] and plain["bounded"]:
        verdict = f"both IRNNs stayed {within} past the horizon (no difference to attribute)"
    elif not ns["bounded"] and not plain["bounded"]:
        verdict = f"neither IRNN stayed {within} past the horizon in this run"
    else:
        verdict = f"the plain IRNN stayed {within} past the horizon and the stabilized one did not"
    lines.append(f"observed: {verdict} (bounded = the largest norm of any sequence after "
                 f"t={horizon} is at most x{BOUND_FACTOR:g} the largest up to it); one seed, "
                 f"rerun with other --seed values to see how much this varies")
    return lines


# ----------------------------------------------------------------------------- main

def main(args: argparse.Namespace) -> int:
    """Train, evaluate, write demo.png / demo.json into ``args.out``; 0 on success, 2 on an
    unusable setting."""
    import torch

    t_start = time.perf_counter()
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, _factors(value) if key == "eval_factors" else value)
    if args.train_len < 2:
        print(f"demo: --train-len must be >= 2 (the adding problem has two markers), got "
              f"{args.train_len}", file=sys.stderr)
        return 2
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        print(f"demo: --device {args.device!r} is not usable here: {exc}", file=sys.stderr)
        return 2
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        print(f"demo: --out {args.out!r}: cannot create the output folder: {exc}",
              file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, device, t_start)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, device, t_start: float) -> int:
    """The demo proper (arguments already checked)."""
    import torch

    from rnnreg_kernels import IRNN

    horizon = args.train_len
    lengths = [horizon * f for f in args.eval_factors]
    if horizon not in lengths:
        lengths = [horizon] + lengths
    configs = {"plain": 0.0, "NS": args.beta}
    print(f"demo: adding problem, IRNN hidden={args.hidden}, train length {horizon}, "
          f"{args.steps} steps x batch {args.batch}, Adam lr={args.lr:g}, clip={args.clip:g}, "
          f"device {device}, backend {args.backend}, seed {args.seed}; evaluation lengths "
          f"{', '.join(map(str, lengths))} ({args.eval_batch} sequences each)")
    runs = {}
    for name, beta in configs.items():
        torch.manual_seed(args.seed)
        gen = torch.Generator().manual_seed(args.seed + 1)
        model = IRNN(2, args.hidden, norm_stabilizer=beta, backend=args.backend, device=device)
        readout = torch.nn.Linear(args.hidden, 1, device=device)
        t0 = time.perf_counter()
        history = train(model, readout, args, gen, name)
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = evaluate(model, readout, lengths, args, seed=args.seed + 2)
        t_eval = time.perf_counter() - t0
        stats = norm_stats(result["mean_norm"], list(result["max_norm"].values()), horizon)
        tail = history[-max(1, len(history) // 10):]
        runs[name] = {"beta": beta, "train_mse_last10pct": sum(tail) / len(tail),
                      "train_mse": history, "eval": result, "norm_stats": stats,
                      "train_s": t_train, "eval_s": t_eval,
                      "backend_used": _backend_used(model)}
        print(f"  {name}: trained in {t_train:.1f} s (final-10% train MSE "
              f"{runs[name]['train_mse_last10pct']:.4f}), evaluated in {t_eval:.1f} s, "
              f"backend {runs[name]['backend_used']}")
    print(format_table(lengths, runs, horizon))
    png = os.path.join(args.out, "demo.png")
    plot(png, lengths, runs, horizon,
         f"IRNN (hidden {args.hidden}) on the adding problem, trained at T={horizon}; "
         f"plain vs norm-stabilizer beta={args.beta:g}")
    lines = summary_lines(runs, lengths, horizon)
    wall = time.perf_counter() - t_start
    doc = {"config": {k: v for k, v in vars(args).items() if k != "func"},
           "lengths": lengths, "horizon": horizon, "bound_factor": BOUND_FACTOR,
           "runs": runs, "summary": lines, "wall_s": wall,
           "torch": torch.__version__, "device": str(device)}
    with open(os.path.join(args.out, "demo.json"), "w") as f:
        json.dump(_jsonable(doc), f, indent=1)
    print("summary:")
    for line in lines:
        print(f"  {line}")
    print(f"wrote {png} and {os.path.join(args.out, 'demo.json')} ({wall:.1f} s in all)")
    return 0


def _backend_used(model) -> str:
    """The backend this model's recurrence runs on (auto's choice resolved), for the report."""
    from rnnreg_kernels import ops
    from rnnreg_kernels.contract import Spec

    w = model.weight_hh_l0
    spec = Spec(cell="relu", theta=1.0, w_ns=0.0, w_tar=0.0, w_ar=0.0,
                ns_include_initial=False, ns_eps=1e-9, reverse=False)
    try:
        return ops.resolve_backend(model.backend, spec, w.new_zeros(1, 1, w.shape[0]), w)
    except (ValueError, RuntimeError) as exc:
        return f"{model.backend} ({exc})"
