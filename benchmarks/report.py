"""Benchmark JSON -> markdown tables and PNG plots (and the README's performance section).

    python benchmarks/report.py                                   # benchmarks/results/*.json
    python benchmarks/report.py RESULT.json ... --md OUT.md --plots DIR
    python benchmarks/report.py --readme README.md                # also rewrite the README
    python benchmarks/report.py --check RESULT.json               # validate only (CI)

Writes ``RESULTS.md`` (one section per JSON: machine, versions, command, every row) and
``speedup_vs_batch.png`` / ``speedup_vs_hidden.png`` (speedup over the nn+eager baseline
against B at fixed H, T and against H at fixed B, T; one line per device, contender, dtype,
mode and fixed sizes).  With ``--readme``, the text between ``<!-- perf:begin -->`` and
``<!-- perf:end -->`` is replaced by a generated summary; nothing else in the file changes.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from rnnreg_kernels.bench.schema import validate  # noqa: E402
from rnnreg_kernels.bench.table import (  # noqa: E402
    SHORT, markdown_table, pivot_table, text_table)

BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"
BASELINE = "nn+eager"
PLOTS = {"batch": "speedup_vs_batch.png", "hidden": "speedup_vs_hidden.png"}
_LETTER = {"hidden": "H", "batch": "B", "steps": "T"}


def load(paths: List[str]) -> List[Tuple[str, dict]]:
    """(path, document) for every JSON file named or found in a named directory, by date."""
    files: List[str] = []
    for p in paths:
        files.extend(sorted(glob.glob(os.path.join(p, "*.json"))) if os.path.isdir(p) else [p])
    docs = []
    for f in files:
        with open(f) as fh:
            docs.append((f, json.load(fh)))
    docs.sort(key=lambda d: d[1].get("created_utc", ""))
    return docs


def _device(doc: dict) -> str:
    env = doc["env"]
    if env.get("device_type") == "cuda":
        return str(env.get("gpu") or env.get("device_name"))
    return f"{env.get('cpu')} ({env.get('torch_threads')} thread" \
           f"{'s' if env.get('torch_threads') != 1 else ''})"


def _versions(doc: dict) -> str:
    env = doc["env"]
    parts = [f"torch {env.get('torch')}", f"triton {env.get('triton')}"]
    if env.get("device_type") == "cuda":
        parts += [f"CUDA {env.get('torch_cuda')}", f"cuDNN {env.get('cudnn')}",
                  f"driver {env.get('driver')}"]
    parts.append(f"Python {env.get('python')}")
    return ", ".join(parts)


def _penalties(doc: dict) -> str:
    p = doc.get("penalties", {})
    return f"norm-stabilizer {p.get('norm_stabilizer')}, TAR {p.get('tar')}, AR {p.get('ar')}"


def section(path: str, doc: dict, rel_to: str) -> str:
    """The markdown section of one result file."""
    env = doc["env"]
    rows = doc["rows"]
    tf32 = doc.get("options", {}).get("tf32")
    lines = [f"### {_device(doc)}: {', '.join(doc.get('sets', []))} "
             f"({doc.get('created_utc', '?')[:10]})", "",
             f"- file: `{os.path.relpath(path, rel_to)}`",
             f"- versions: {_versions(doc)}",
             f"- command: `{doc.get('command')}`",
             f"- penalties: {_penalties(doc)}; loss = {doc.get('protocol', {}).get('loss')}",
             f"- load average (1/5/15 min) at start {env.get('loadavg_start')}, end "
             f"{env.get('loadavg_end')}; {len(rows)} rows in {doc.get('elapsed_s')} s"
             + ("" if doc.get("complete") else " (**incomplete run**)")]
    if env.get("device_type") == "cuda":
        lines.append(f"- fp32: TF32 {'allowed' if tf32 else 'off'} on both sides "
                     "(cuDNN and matmul)")
    lines += ["", markdown_table(rows), ""]
    return "\n".join(lines)


def _sweeps(docs: List[Tuple[str, dict]], axis: str) -> Dict[tuple, List[Tuple[int, float]]]:
    """Lines of (x, speedup) where only ``axis`` ("batch" or "hidden") varies."""
    others = [k for k in ("cell", "layers", "hidden", "batch", "steps") if k != axis]
    lines: Dict[tuple, List[Tuple[int, float]]] = defaultdict(list)
    for _, doc in docs:
        dev = _device(doc)
        for r in doc["rows"]:
            if r["status"] != "ok" or r["contender"] == BASELINE or r["speedup"] is None:
                continue
            s = r["shape"]
            key = (dev, r["contender"], r["dtype"], r["mode"]) + tuple(
                (k, s[k]) for k in others)
            lines[key].append((s[axis], r["speedup"]))
    return {k: sorted(set(v)) for k, v in lines.items() if len({x for x, _ in v}) >= 2}


def plot(docs: List[Tuple[str, dict]], axis: str, path: str) -> Optional[str]:
    """Write the speedup-vs-``axis`` PNG; None if no sweep exists in the results."""
    sweeps = _sweeps(docs, axis)
    if not sweeps:
        return None
    try:
        import matplotlib
    except ImportError:
        print(f"report.py: matplotlib is not installed; no {os.path.basename(path)}",
              file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - used through matplotlib.ticker

    modes = sorted({k[3] for k in sweeps}, key=lambda m: (m != "train", m))
    fig, axes = plt.subplots(1, len(modes), figsize=(6.2 * len(modes), 4.4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        ticks = set()
        for key, pts in sorted(sweeps.items()):
            if key[3] != mode:
                continue
            dev, contender, dtype = key[:3]
            fixed = ", ".join(f"{_LETTER[k[0]]}={k[1]}" for k in key[4:] if k[0] in _LETTER)
            cell = dict(key[4:]).get("cell")
            xs, ys = zip(*pts)
            ticks.update(xs)
            ax.plot(xs, ys, marker="o", label=f"{contender} {dtype} {cell} {fixed}\n{dev}")
        ax.axhline(1.0, color="gray", lw=1, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ticks))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.minorticks_off()
        ax.set_xlabel({"batch": "batch size B", "hidden": "hidden size H"}[axis])
        ax.set_ylabel("speedup over nn + eager post-hoc (x)")
        ax.set_title(f"{mode}: speedup against {axis} size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def readme_section(docs: List[Tuple[str, dict]], md_path: str, plots: List[str],
                   readme: str) -> str:
    """The generated text that goes between the README markers."""
    base = os.path.dirname(os.path.abspath(readme))
    out = ["", "<!-- generated by benchmarks/report.py from benchmarks/results/*.json; "
           "do not edit by hand -->", ""]
    for path, doc in docs:
        out += [f"**{_device(doc)}** ({', '.join(doc.get('sets', []))}, "
                f"{doc.get('created_utc', '?')[:10]}; {_versions(doc)}; penalties: "
                f"{_penalties(doc)}; `{doc.get('command')}`):", "",
                pivot_table(doc["rows"]), ""]
    if not any(doc["env"].get("device_type") == "cuda" for _, doc in docs):
        out += ["No GPU results are committed yet: run `benchmarks/gpu_run.sh` on a GPU machine "
                "and add its JSON to `benchmarks/results/`.", ""]
    out.append("Median milliseconds per call (forward = inference; train = forward + backward), "
               "and in parentheses the speedup = median time of `nn.LSTM`/`nn.RNN` + eager "
               "post-hoc penalties over the contender's, same run (above 1 = faster); every "
               "timed contender first passed the correctness gate. "
               f"All rows, machines and commands: [{os.path.relpath(md_path, base)}]"
               f"({os.path.relpath(md_path, base)}).")
    for p in plots:
        out += ["", f"![{os.path.basename(p)}]({os.path.relpath(p, base)})"]
    out.append("")
    return "\n".join(out)


def rewrite_readme(readme: str, text: str) -> None:
    """Replace what lies between the markers; raise ValueError when they are missing."""
    with open(readme) as f:
        content = f.read()
    i, j = content.find(BEGIN), content.find(END)
    if i < 0 or j < 0 or j < i:
        raise ValueError(f"--readme {readme}: expected the markers {BEGIN} ... {END} in this "
                         "order; add them where the performance section belongs")
    new = content[:i + len(BEGIN)] + "\n" + text.strip("\n") + "\n" + content[j:]
    with open(readme, "w") as f:
        f.write(new)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="*", default=[os.path.join(HERE, "results")],
                    help="result JSON files or directories (default: benchmarks/results)")
    ap.add_argument("--md", default=None,
                    help="markdown output (default: RESULTS.md next to the first input)")
    ap.add_argument("--plots", default=None, help="PNG directory (default: the --md directory)")
    ap.add_argument("--readme", default=None, help="rewrite this README's performance section")
    ap.add_argument("--check", action="store_true", help="validate the JSON files and exit")
    ap.add_argument("--summary", action="store_true",
                    help="print a short table of every row (after writing the outputs)")
    ap.add_argument("--strict", action="store_true",
                    help="with --check: also fail on wrong/error rows and incomplete runs")
    args = ap.parse_args(argv)
    docs = load(args.inputs)
    if not docs:
        print(f"report.py: no result JSON in {args.inputs}", file=sys.stderr)
        return 2
    bad = 0
    for path, doc in docs:
        for p in validate(doc, strict=args.check and args.strict):
            print(f"{path}: {p}", file=sys.stderr)
            bad += 1
    if args.check:
        print(f"report.py: {len(docs)} file(s), {bad} problem(s)")
        return 1 if bad else 0
    first = args.inputs[0]
    md = args.md or os.path.join(first if os.path.isdir(first) else os.path.dirname(first),
                                 "RESULTS.md")
    plot_dir = args.plots or os.path.dirname(os.path.abspath(md))
    os.makedirs(plot_dir, exist_ok=True)
    md_dir = os.path.dirname(os.path.abspath(md))
    plots = [p for axis, name in PLOTS.items()
             if (p := plot(docs, axis, os.path.join(plot_dir, name)))]
    parts = ["# Benchmark results", "",
             "Generated by `benchmarks/report.py` from the JSON files listed below; see "
             "benchmarks/README.md for the protocol.", ""]
    parts += [f"![{os.path.basename(p)}]({os.path.relpath(p, md_dir)})" for p in plots]
    parts.append("")
    parts += [section(path, doc, md_dir) for path, doc in docs]
    with open(md, "w") as f:
        f.write("\n".join(parts))
    print(f"report.py: wrote {md}" + "".join(f", {p}" for p in plots))
    if args.summary:
        for path, doc in docs:
            print(f"\n# {_device(doc)}: {os.path.basename(path)}")
            print(text_table(doc["rows"], max_status=40, columns=SHORT))
    if args.readme:
        try:
            rewrite_readme(args.readme, readme_section(docs, md, plots, args.readme))
        except (OSError, ValueError) as e:
            print(f"report.py: {e}", file=sys.stderr)
            return 2
        print(f"report.py: rewrote the performance section of {args.readme}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
