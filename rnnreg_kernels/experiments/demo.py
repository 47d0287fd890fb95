"""``python -m rnnreg_kernels demo``: does the norm-stabilizer keep an IRNN bounded past its
training horizon?  K seeds of each, so the answer is a count, not one chaotic run.

For each of ``--seeds`` K seeds, two IRNNs (relu, identity init; Le, Jaitly & Hinton 2015)
are trained on the adding problem at one sequence length, one plain and one with the
norm-stabilizer (Krueger & Memisevic 2016); the two models of a seed share their initial
weights and their training data.  Every model is then run (as an ``rnnreg_kernels.IRNN``,
``--backend``) on fresh sequences up to many times the training length, and the hidden norms
and errors are recorded.

Criterion, fixed before the run: a model is *bounded* when the largest hidden norm of any
evaluation sequence after t = T_train is finite and at most ``BOUND_FACTOR`` (2) times the
largest up to t = T_train; its *norm ratio* is the first over the second.  The report gives,
per seed and in aggregate (how many of the K seeds were bounded; median, quartiles and range
over the seeds), the norm ratio and the mean squared error at each evaluation length.  The
closing verdict says what was observed across the seeds, whichever way it went.

Adding problem: two input channels per step, a value uniform in [0, 1] and a marker that is 1
at exactly two steps (one in the first half of the sequence, one in the second) and 0
elsewhere; the target is the sum of the two marked values.  Predicting the constant 1 gives
MSE 1/6, the level of a model that learned nothing.

Training engines: ``batched`` (default) trains all 2K models as one computation (weights
stacked, one batched matrix product per step: on a CPU this is several times faster than K
separate runs, whose per-step products are too small to keep a core busy); ``modules`` trains
each model as an ``rnnreg_kernels.IRNN`` on ``--backend`` in turn (the fused kernels on a
GPU).  Both compute the same loss (the MSE plus the package's norm-stabilizer definition) with
per-model gradient clipping and Adam, so they train the same models up to rounding.  The
models are split over ``--workers`` processes.

Writes a table to stdout, ``demo.png`` (every seed's hidden norm against time step and error
against evaluation length, thin lines, with the median across seeds) and ``demo.json`` (every
number, the command, the machine and versions) into ``--out``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from . import common

QUICK = dict(steps=30, hidden=16, train_len=20, batch=16, eval_batch=32, eval_factors="1,2,5",
             seeds=2)
BOUND_FACTOR = 2.0
CRITERION = (f"bounded = the largest hidden norm of any evaluation sequence after the training "
             f"length is finite and at most {BOUND_FACTOR:g}x the largest up to it; norm ratio "
             f"= the first over the second")
NAMES = ("plain", "NS")


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=common.positive_int, default=5,
                        help="seeds K: K plain and K stabilized models (default 5)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="the seeds are first-seed .. first-seed + K - 1 (default 0)")
    parser.add_argument("--steps", type=common.positive_int, default=4000,
                        help="training steps per model (default 4000)")
    parser.add_argument("--hidden", type=common.positive_int, default=64,
                        help="hidden units (default 64)")
    parser.add_argument("--train-len", type=common.positive_int, default=50,
                        help="training sequence length T (default 50, >= 2)")
    parser.add_argument("--batch", type=common.positive_int, default=64,
                        help="training batch size (default 64)")
    parser.add_argument("--lr", type=common.positive_float, default=2e-3,
                        help="Adam learning rate (default 2e-3)")
    parser.add_argument("--clip", type=common.non_negative_float, default=1.0,
                        help="gradient norm clipping per model, 0 = off (default 1.0)")
    parser.add_argument("--beta", type=common.non_negative_float, default=200.0,
                        help="norm-stabilizer beta of the stabilized model (default 200)")
    parser.add_argument("--eval-factors", type=common.int_list,
                        default=common.int_list("1,2,5,10,20"),
                        help="evaluation lengths as multiples of --train-len "
                             "(default 1,2,5,10,20)")
    parser.add_argument("--eval-batch", type=common.positive_int, default=256,
                        help="sequences per evaluation length (default 256)")
    parser.add_argument("--engine", choices=("batched", "modules"), default="batched",
                        help="train all models as one batched computation (default) or each "
                             "as an rnnreg_kernels.IRNN on --backend")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny run for tests / CI (overrides sizes: " +
                             ", ".join(f"{k}={v}" for k, v in QUICK.items()) + ")")
    common.add_run_arguments(parser, "demo_out")


# ----------------------------------------------------------------------------- training

def init_models(specs: list, hidden: int, device, dtype=None) -> dict:
    """Initial weights of every model, stacked along dim 0: each model ``(seed, beta)`` gets
    exactly the weights ``rnnreg_kernels.IRNN(2, hidden)`` and ``torch.nn.Linear(hidden, 1)``
    draw after ``torch.manual_seed(seed)``."""
    import torch

    from rnnreg_kernels import IRNN

    parts = {k: [] for k in ("w_ih", "w_hh", "b_ih", "b_hh", "w_out", "b_out")}
    for seed, _ in specs:
        torch.manual_seed(seed)
        rnn = IRNN(2, hidden, device=device, dtype=dtype)
        out = torch.nn.Linear(hidden, 1, device=device, dtype=dtype)
        for key, p in (("w_ih", rnn.weight_ih_l0), ("w_hh", rnn.weight_hh_l0),
                       ("b_ih", rnn.bias_ih_l0), ("b_hh", rnn.bias_hh_l0),
                       ("w_out", out.weight[0]), ("b_out", out.bias[0])):
            parts[key].append(p.detach().clone())
    return {k: torch.stack(v) for k, v in parts.items()}


def batched_loss(params: dict, x, y, betas):
    """Per-model loss ``[M]`` (MSE + norm-stabilizer) of M stacked IRNNs.

    ``x [T, M, B, 2]``, ``y [M, B]``, ``betas [M]``.  The norm-stabilizer is the package's
    definition (DESIGN.md section 2, ``ns_include_initial=False``): beta / ((T-1) B) times the
    sum over t = 2..T and the batch of (n_t - n_{t-1})^2, n_t from
    :func:`rnnreg_kernels.penalties.hidden_norms`.  Returns ``(loss, mse)``.
    """
    import torch

    from rnnreg_kernels.penalties import hidden_norms

    steps, models, batch, _ = x.shape
    bias = (params["b_ih"] + params["b_hh"]).view(1, models, 1, -1)
    x_proj = torch.einsum("tmbi,mhi->tmbh", x, params["w_ih"]) + bias
    w_t = params["w_hh"].transpose(1, 2)
    h = x_proj.new_zeros(models, batch, w_t.shape[-1])
    states = []
    for xt in x_proj.unbind(0):  # unbind: one backward node, not T slices of the whole
        h = torch.relu(xt + torch.bmm(h, w_t))
        states.append(h)
    pred = (h * params["w_out"].unsqueeze(1)).sum(-1) + params["b_out"].unsqueeze(1)
    mse = ((pred - y) ** 2).mean(-1)
    if steps < 2:
        return mse, mse.detach()
    norms = hidden_norms(torch.stack(states), 1e-9)  # [T, M, B]
    ns = ((norms[1:] - norms[:-1]) ** 2).sum((0, 2)) / ((steps - 1) * batch)
    return mse + betas * ns, mse.detach()


def clip_per_model(params: dict, max_norm: float) -> None:
    """``clip_grad_norm_`` applied to each model's slice of the stacked gradients."""
    import torch

    grads = [p.grad for p in params.values()]
    sq = sum(g.reshape(g.shape[0], -1).double().pow(2).sum(1) for g in grads)
    coef = torch.clamp(max_norm / (sq.sqrt() + 1e-6), max=1.0).to(grads[0].dtype)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))


def _train_batched(specs, cfg, device, dtype, bar) -> tuple:
    import torch

    params = {k: v.requires_grad_() for k, v in
              init_models(specs, cfg["hidden"], device, dtype).items()}
    betas = torch.tensor([b for _, b in specs], device=device, dtype=params["w_hh"].dtype)
    opt = torch.optim.Adam(list(params.values()), lr=cfg["lr"])
    seeds = sorted({s for s, _ in specs})
    gens = {s: torch.Generator().manual_seed(s + 1) for s in seeds}
    col = torch.tensor([seeds.index(s) for s, _ in specs], device=device)
    history = []
    for _ in range(cfg["steps"]):
        data = [adding_batch(cfg["train_len"], cfg["batch"], gens[s], device) for s in seeds]
        x = torch.stack([d[0] for d in data], 1).to(dtype).index_select(1, col)
        y = torch.stack([d[1] for d in data], 0).to(dtype).index_select(0, col)
        loss, mse = batched_loss(params, x, y, betas)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        if cfg["clip"]:
            clip_per_model(params, cfg["clip"])
        opt.step()
        history.append(mse)
        bar.update(1)
    weights = {k: v.detach() for k, v in params.items()}
    return weights, torch.stack(history).t().tolist()


def _train_modules(specs, cfg, device, dtype, bar) -> tuple:
    import torch

    from rnnreg_kernels import IRNN

    start = init_models(specs, cfg["hidden"], device, dtype)
    weights, history = {k: [] for k in start}, []
    for m, (seed, beta) in enumerate(specs):
        rnn = IRNN(2, cfg["hidden"], norm_stabilizer=beta, backend=cfg["backend"],
                   device=device, dtype=dtype)
        out = torch.nn.Linear(cfg["hidden"], 1, device=device, dtype=dtype)
        _load(rnn, out, {k: v[m] for k, v in start.items()})
        params = list(rnn.parameters()) + list(out.parameters())
        opt = torch.optim.Adam(params, lr=cfg["lr"])
        gen = torch.Generator().manual_seed(seed + 1)
        mses = []
        for _ in range(cfg["steps"]):
            x, y = adding_batch(cfg["train_len"], cfg["batch"], gen, device)
            _, h_n = rnn(x.to(dtype))
            mse = ((out(h_n[-1]).squeeze(-1) - y.to(dtype)) ** 2).mean()
            loss = mse + rnn.penalty
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg["clip"]:
                torch.nn.utils.clip_grad_norm_(params, cfg["clip"])
            opt.step()
            mses.append(mse.detach())
            bar.update(1 / len(specs))
        history.append(torch.stack(mses).tolist())
        for k, v in _weights(rnn, out).items():
            weights[k].append(v)
    return {k: torch.stack(v) for k, v in weights.items()}, history


def _load(rnn, out, w: dict) -> None:
    import torch

    with torch.no_grad():
        rnn.weight_ih_l0.copy_(w["w_ih"])
        rnn.weight_hh_l0.copy_(w["w_hh"])
        rnn.bias_ih_l0.copy_(w["b_ih"])
        rnn.bias_hh_l0.copy_(w["b_hh"])
        out.weight.copy_(w["w_out"].unsqueeze(0))
        out.bias.copy_(w["b_out"].reshape(1))


def _weights(rnn, out) -> dict:
    return {"w_ih": rnn.weight_ih_l0.detach().clone(), "w_hh": rnn.weight_hh_l0.detach().clone(),
            "b_ih": rnn.bias_ih_l0.detach().clone(), "b_hh": rnn.bias_hh_l0.detach().clone(),
            "w_out": out.weight[0].detach().clone(), "b_out": out.bias[0].detach().clone()}


def train_group(job: dict) -> dict:
    """Train the models ``job["specs"]`` (a list of ``(seed, beta)``) with ``job["engine"]``;
    returns their final weights (stacked, on the CPU), per-step training MSE and times.  Runs
    in a worker process or in-process."""
    import torch

    cfg, specs = job["config"], job["specs"]
    device = torch.device(cfg["device"])
    dtype = getattr(torch, cfg.get("dtype", "float32"))
    timer = common.Timer()
    bar = common.progress(cfg["steps"], f"train {len(specs)} models ({job['engine']})",
                          cfg["progress"], job["index"])
    train = _train_batched if job["engine"] == "batched" else _train_modules
    weights, history = train(specs, cfg, device, dtype, bar)
    bar.close()
    return {"weights": {k: v.cpu() for k, v in weights.items()}, "train_mse": history,
            "wall_s": timer.wall(), "cpu_s": timer.cpu()}


# ----------------------------------------------------------------------------- evaluation

def evaluate(weights: dict, m: int, lengths: list, horizon: int, cfg: dict, seed: int,
             device) -> dict:
    """Run model ``m`` as an ``rnnreg_kernels.IRNN`` on fresh sequences of every length (the
    same data for both models of a seed: the generator is seeded from ``seed``).

    Returns per length L ``mse``, ``median_se``, ``baseline_mse`` (predicting 1), the largest
    norm after the horizon (``max_after``), ``final_mean_norm``, the largest norm up to it
    over all runs (``max_up_to_horizon``), the first non-finite step, and the longest run's
    per-step batch max and mean norm (``max_norm_curve``, ``mean_norm_curve``, t = 0..T).
    """
    import torch

    from rnnreg_kernels import IRNN

    rnn = IRNN(2, cfg["hidden"], backend=cfg["backend"], device=device)
    out = torch.nn.Linear(cfg["hidden"], 1, device=device)
    _load(rnn, out, {k: v[m].to(device=device, dtype=torch.float32)
                     for k, v in weights.items()})
    gen = torch.Generator().manual_seed(seed + 2)
    res = {k: {} for k in ("mse", "median_se", "baseline_mse", "max_after", "final_mean_norm")}
    max_in, bad = 0.0, None
    with torch.no_grad():
        for steps in lengths:
            x, y = adding_batch(steps, cfg["eval_batch"], gen, device)
            _, h_n = rnn(x)
            se = (out(h_n[-1]).squeeze(-1) - y).double() ** 2
            res["mse"][steps] = _inf(float(se.mean()))
            res["median_se"][steps] = _inf(float(se.median()))
            res["baseline_mse"][steps] = float(((1.0 - y) ** 2).double().mean())
            norms = rnn.hidden_norms[-1].double()  # [T+1, B], t = 0..T
            top = torch.nan_to_num(norms.max(1).values, nan=math.inf)
            finite = torch.isfinite(top)
            if not bool(finite.all()):
                first = int((~finite).nonzero()[0])
                bad = first if bad is None else min(bad, first)
            max_in = max(max_in, float(top[1:horizon + 1].max()))
            res["max_after"][steps] = float(top[horizon + 1:].max()) if steps > horizon \
                else None
            res["final_mean_norm"][steps] = _inf(float(norms[-1].mean()))
            if steps == max(lengths):
                res["max_norm_curve"] = top.tolist()
                res["mean_norm_curve"] = torch.nan_to_num(norms.mean(1), nan=math.inf).tolist()
    res["max_up_to_horizon"], res["first_non_finite_step"] = max_in, bad
    res["backend_used"] = common.backend_used(rnn, "relu")
    return res


def _inf(v: float) -> float:
    return math.inf if math.isnan(v) else v


def norm_stats(ev: dict, lengths: list, horizon: int) -> dict:
    """Boundedness of one model from its evaluation: ``norm_ratio`` (largest norm after the
    horizon over the largest up to it, inf on overflow), ``norm_ratio_at`` per length,
    ``bounded`` (ratio finite and <= BOUND_FACTOR) and ``late_growth`` (the longest run's
    batch-max norm at its end over its value halfway; 1 = levelled off)."""
    max_in = ev["max_up_to_horizon"]
    after = [ev["max_after"][s] for s in lengths if ev["max_after"][s] is not None]

    def ratio(v):
        if v is None:
            return None
        return v / max_in if max_in > 0 and math.isfinite(v) else math.inf

    at = {s: ratio(ev["max_after"][s]) for s in lengths}
    overall = math.inf if ev["first_non_finite_step"] is not None else \
        ratio(max(after)) if after else None
    curve = ev["max_norm_curve"]
    half = curve[(len(curve) - 1) // 2]
    late = curve[-1] / half if half > 0 and math.isfinite(curve[-1]) else math.inf
    return {"norm_ratio": overall, "norm_ratio_at": at, "late_growth": late,
            "bounded": bool(overall is not None and math.isfinite(overall)
                            and overall <= BOUND_FACTOR)}


def learned(seed: dict, name: str, horizon: int) -> bool:
    """Whether a seed's model learned the task: its MSE at the training length is below half
    of predicting the constant 1 (a collapsed model, h = 0, is bounded but learned nothing)."""
    mse = seed["models"][name]["mse"]
    base = seed["baseline_mse"]
    key = horizon if horizon in mse else str(horizon)
    value = mse[key]
    return value is not None and math.isfinite(value) and value < 0.5 * base[key]


def aggregate(seeds: list, lengths: list) -> dict:
    """Across seeds, per model: bounded count (and how many of those learned the task) and
    the spread of the norm ratio, of the norm ratio at each length, of the MSE at each length
    and of the final training MSE."""
    agg = {"seeds": len(seeds), "bounded_count": sum(s["bounded"] for s in seeds),
           "models": {}}
    for name in NAMES:
        runs = [s["models"][name] for s in seeds]
        fit = [learned(s, name, lengths[0]) for s in seeds]
        agg["models"][name] = {
            "bounded_count": sum(r["bounded"] for r in runs),
            "learned_count": sum(fit),
            "bounded_and_learned_count": sum(r["bounded"] and f for r, f in zip(runs, fit)),
            "norm_ratio": common.spread(r["norm_ratio"] for r in runs),
            "norm_ratio_at": {L: common.spread(r["norm_ratio_at"][L] for r in runs)
                              for L in lengths if L > lengths[0]},
            "mse": {L: common.spread(r["mse"][L] for r in runs) for L in lengths},
            "train_mse_last10pct": common.spread(r["train_mse_last10pct"] for r in runs)}
    agg["baseline_mse"] = {L: common.spread(s["baseline_mse"][L] for s in seeds)
                           for L in lengths}
    return agg


def verdict(agg: dict, horizon: int) -> str:
    """What was observed across the seeds, computed from the counts."""
    k = agg["seeds"]
    ns, plain = agg["models"]["NS"], agg["models"]["plain"]
    nb, pb = ns["bounded_count"], plain["bounded_count"]
    if nb > pb:
        what = "the stabilizer kept more seeds bounded"
    elif nb < pb:
        what = "the stabilizer kept fewer seeds bounded, the opposite of the paper's claim"
    else:
        what = "no difference in the count"
    return (f"observed across {k} seed{'s' if k != 1 else ''}: the stabilized IRNN stayed "
            f"bounded past t={horizon} in {nb}/{k}, the plain IRNN in {pb}/{k} ({what}); of "
            f"those, {ns['bounded_and_learned_count']} stabilized and "
            f"{plain['bounded_and_learned_count']} plain had learned the task (MSE at the "
            f"training length below half of predicting 1); median norm ratio "
            f"{_x(ns['norm_ratio']['median'])} stabilized vs "
            f"{_x(plain['norm_ratio']['median'])} plain")


def _x(v) -> str:
    return "overflow" if v is None or not math.isfinite(v) else f"x{v:.3g}"


def _g(v) -> str:
    return "inf" if v is None or not math.isfinite(v) else f"{v:.3g}"


def format_tables(seeds: list, agg: dict, lengths: list) -> str:
    """Per seed (norm ratio, bounded, MSE at the longest length) and per length (median and
    range over the seeds of MSE and norm ratio)."""
    t_max = max(lengths)
    rows = [["seed"] + [f"{h} {n}" for n in NAMES for h in ("ratio", "bounded",
                                                            f"MSE@{t_max}")]]
    for s in seeds:
        row = [str(s["seed"])]
        for n in NAMES:
            r = s["models"][n]
            row += [_x(r["norm_ratio"]), "yes" if r["bounded"] else "no", _g(r["mse"][t_max])]
        rows.append(row)
    out = [_columns(rows), ""]
    rows = [["T_eval", "MSE const"] + [f"{h} {n}" for n in NAMES
                                       for h in ("MSE med [min-max]", "ratio med [min-max]")]]
    for L in lengths:
        row = [str(L), _g(agg["baseline_mse"][L]["median"])]
        for n in NAMES:
            a = agg["models"][n]
            mse = a["mse"][L]
            row.append(f"{_g(mse['median'])} [{_g(mse['min'])}-{_g(mse['max'])}]")
            r = a["norm_ratio_at"].get(L)
            row.append(f"{_g(r['median'])} [{_g(r['min'])}-{_g(r['max'])}]" if r else "-")
        rows.append(row)
    out.append(_columns(rows))
    return "\n".join(out)


def _columns(rows: list) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(path: str, seeds: list, lengths: list, horizon: int, title: str) -> None:
    """demo.png: every seed's batch-max hidden norm on the longest run (thin) and the median
    over seeds (thick), log y; MSE against evaluation length likewise (log-log)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name, color in zip(NAMES, ("C0", "C1")):
        curves = [s["models"][name]["max_norm_curve"] for s in seeds]
        t = list(range(1, len(curves[0])))
        for c in curves:
            pts = [(i, c[i]) for i in t if c[i] is not None and math.isfinite(c[i]) and c[i] > 0]
            if pts:
                ax1.plot(*zip(*pts), color=color, lw=0.6, alpha=0.5)
        med = [_median([c[i] for c in curves]) for i in t]
        pts = [(i, v) for i, v in zip(t, med) if math.isfinite(v) and v > 0]
        if pts:
            ax1.plot(*zip(*pts), color=color, lw=2.2, label=f"{name}: median of {len(curves)}")
        for s in seeds:
            mse = [(L, s["models"][name]["mse"][L]) for L in lengths]
            pts = [(L, v) for L, v in mse if v is not None and math.isfinite(v) and v > 0]
            if pts:
                ax2.plot(*zip(*pts), color=color, lw=0.6, alpha=0.5, marker=".")
        med = [(L, _median([s["models"][name]["mse"][L] for s in seeds])) for L in lengths]
        pts = [(L, v) for L, v in med if math.isfinite(v) and v > 0]
        if pts:
            ax2.plot(*zip(*pts), color=color, lw=2.2, marker="o", label=f"{name}: median")
    ax1.axvline(horizon, color="gray", ls="--", lw=1, label=f"training length {horizon}")
    ax1.set_yscale("log")
    ax1.set_xlabel("time step t")
    ax1.set_ylabel("largest hidden norm in the batch, ||h_t||")
    ax1.set_title(f"hidden norm on the T={max(lengths)} run (thin: one seed each)", fontsize=9)
    ax1.legend(fontsize=7)
    base = [(L, _median([s["baseline_mse"][L] for s in seeds])) for L in lengths]
    ax2.plot(*zip(*base), "k:", label="predict 1 (learned nothing)")
    ax2.axvline(horizon, color="gray", ls="--", lw=1)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("evaluation sequence length")
    ax2.set_ylabel("mean squared error (non-finite points omitted)")
    ax2.set_title("error against evaluation length (thin: one seed each)", fontsize=9)
    ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _median(values) -> float:
    m = common.spread(values)["median"]
    return math.inf if m is None else m


# ----------------------------------------------------------------------------- main

def main(args: argparse.Namespace) -> int:
    """Train, evaluate, write demo.png / demo.json into ``args.out``; 0 on success, 2 on an
    unusable setting."""
    import torch

    timer = common.Timer()
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, common.int_list(value) if key == "eval_factors" else value)
    if args.train_len < 2:
        print(f"demo: --train-len must be >= 2 (the adding problem has two markers), got "
              f"{args.train_len}", file=sys.stderr)
        return 2
    device = common.check_run_arguments("demo", args)
    if device is None:
        return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, device, timer)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, device, timer) -> int:
    import torch

    env = common.environment(device)
    horizon = args.train_len
    lengths = sorted({horizon} | {horizon * f for f in args.eval_factors})
    seed_list = [args.first_seed + k for k in range(args.seeds)]
    specs = [(s, b) for b in (0.0, args.beta) for s in seed_list]  # plain models first
    cfg = {k: getattr(args, k) for k in ("steps", "hidden", "train_len", "batch", "lr", "clip",
                                         "eval_batch", "backend")}
    cfg.update(device=str(device), progress=common.show_progress(args.no_progress))
    print(f"demo: adding problem, {args.seeds} seeds ({seed_list[0]}..{seed_list[-1]}) x "
          f"{{plain, norm-stabilizer beta={args.beta:g}}} IRNNs, hidden {args.hidden}, train "
          f"length {horizon}, {args.steps} steps x batch {args.batch}, Adam lr {args.lr:g}, "
          f"clip {args.clip:g}; engine {args.engine}, {args.workers} worker(s), device "
          f"{device}, backend {args.backend}; evaluation lengths "
          f"{', '.join(map(str, lengths))} ({args.eval_batch} sequences each)")
    print(f"criterion: {CRITERION}")
    groups = [specs[i::args.workers] for i in range(min(args.workers, len(specs)))]
    jobs = [{"specs": g, "config": cfg, "engine": args.engine, "index": i}
            for i, g in enumerate(groups)]
    t_train = common.Timer()
    results = common.run_jobs(train_group, jobs, args.workers, args.threads)
    train_wall = t_train.wall()
    weights, history = {}, {}
    for g, res in zip(groups, results):
        for j, spec in enumerate(g):
            weights[spec] = {k: v[j:j + 1] for k, v in res["weights"].items()}
            history[spec] = res["train_mse"][j]
    t_eval = common.Timer()
    seeds = []
    for s in seed_list:
        entry = {"seed": s, "models": {}}
        for name, beta in zip(NAMES, (0.0, args.beta)):
            ev = evaluate(weights[(s, beta)], 0, lengths, horizon, cfg, s, device)
            stats = norm_stats(ev, lengths, horizon)
            hist = history[(s, beta)]
            tail = hist[-max(1, len(hist) // 10):]
            block = max(1, len(hist) // 50)
            entry["baseline_mse"] = ev.pop("baseline_mse")
            entry["models"][name] = dict(
                beta=beta, **stats, **ev, train_mse_last10pct=sum(tail) / len(tail),
                train_mse_blocks=[sum(hist[i:i + block]) / len(hist[i:i + block])
                                  for i in range(0, len(hist), block)],
                train_mse_block_steps=block)
        entry["bounded"] = entry["models"]["NS"]["bounded"]
        entry["norm_ratio"] = entry["models"]["NS"]["norm_ratio"]
        seeds.append(entry)
    agg = aggregate(seeds, lengths)
    line = verdict(agg, horizon)
    print(format_tables(seeds, agg, lengths))
    print(f"(predicting the constant 1 scores MSE about "
          f"{agg['baseline_mse'][lengths[0]]['median']:.3g})")
    png = os.path.join(args.out, "demo.png")
    plot(png, seeds, lengths, horizon,
         f"{args.seeds} seeds of IRNN (hidden {args.hidden}) on the adding problem, trained at "
         f"T={horizon}; plain vs norm-stabilizer beta={args.beta:g}")
    backend = seeds[0]["models"]["NS"]["backend_used"]
    doc = {"experiment": "demo", "command": common.command_line(),
           "created_utc": common.now_utc(),
           "config": {k: v for k, v in vars(args).items() if k != "func"},
           "criterion": CRITERION, "bound_factor": BOUND_FACTOR, "horizon": horizon,
           "lengths": lengths, "engine": args.engine, "eval_backend_used": backend,
           "seeds": seeds, "aggregate": agg, "verdict": line,
           "train_wall_s": train_wall, "train_cpu_s": [r["cpu_s"] for r in results],
           "eval_wall_s": t_eval.wall(), "wall_s": timer.wall(), "cpu_s": timer.cpu(),
           "env": common.finish_environment(env)}
    common.write_json(os.path.join(args.out, "demo.json"), _rounded(doc))
    print(line)
    print(f"wrote {png} and {os.path.join(args.out, 'demo.json')} ({timer.wall():.1f} s wall, "
          f"{timer.cpu():.1f} s CPU in all, {args.workers} worker(s))")
    return 0


def _rounded(doc: dict) -> dict:
    """The long per-step curves at 4 significant digits (the JSON is committed)."""
    for s in doc["seeds"]:
        for r in s["models"].values():
            for key in ("max_norm_curve", "mean_norm_curve", "train_mse_blocks"):
                r[key] = common.jsonable(r[key], digits=4)
    return doc
