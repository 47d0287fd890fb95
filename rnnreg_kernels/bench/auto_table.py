"""Build ``backend="auto"``'s table of measured fused-backend cases
(``rnnreg_kernels/auto_wins.json``, the rule: :mod:`rnnreg_kernels.auto_rule`) from benchmark
result documents:

    python -m rnnreg_kernels.bench.auto_table --from benchmarks/results/<gpu run>.json --write

CPU runs are ignored; ``--out FILE`` writes elsewhere, neither prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from typing import Iterable, List, Optional

from rnnreg_kernels import auto_rule
from rnnreg_kernels.bench.contenders import BASELINE

# the contenders a fused backend must beat in the same run
BASELINES = ("ours:native", BASELINE)


def entries_from_results(docs: Iterable[tuple]) -> List[auto_rule.Measured]:
    """:class:`~rnnreg_kernels.auto_rule.Measured` entries from ``(source name, result
    document)`` pairs of the benchmark: every timed training-step row of a fused contender,
    ``won`` when faster than each of :data:`BASELINES` that ran the same case."""
    out = []
    for source, doc in docs:
        env = doc.get("env", {})
        if env.get("device_type") != "cuda":
            continue
        rows = [r for r in doc.get("rows", []) if r.get("mode") == "train"
                and r.get("status") == "ok" and r.get("time_ms")]
        by_case = {}
        for r in rows:
            by_case.setdefault((r["shape"]["name"], r["dtype"]), {})[r["contender"]] = r
        for (_, dtype), group in sorted(by_case.items()):
            base = [group[c]["time_ms"]["median"] for c in BASELINES if c in group]
            if not base:
                continue
            for backend in auto_rule.FUSED:
                r = group.get(f"ours:{backend}")
                if r is None:
                    continue
                t = r["time_ms"]["median"]
                out.append(auto_rule.Measured(
                    env["device_name"], backend, r["shape"]["cell"], dtype,
                    int(r["shape"]["hidden"]), int(r["shape"]["batch"]), t < min(base),
                    min(base) / t, f"{source} ({doc.get('created_utc')})"))
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rnnreg_kernels.bench.auto_table",
                                description="Build auto's table of measured fused-backend "
                                            "wins from benchmark result JSON files.")
    p.add_argument("--from", dest="sources", nargs="+", required=True, metavar="JSON",
                   help="benchmark result documents (GPU runs; CPU runs are ignored)")
    p.add_argument("--out", help="write the table here (default: print it)")
    p.add_argument("--write", action="store_true",
                   help="write the table to the package's own "
                        f"{os.path.basename(auto_rule.WINS_FILE)}")
    args = p.parse_args(argv)
    docs = []
    for path in args.sources:
        try:
            with open(path) as f:
                docs.append((os.path.basename(path), json.load(f)))
        except (OSError, json.JSONDecodeError) as e:
            p.error(f"--from: cannot read {path!r} as a result JSON: {e}")
    entries = entries_from_results(docs)
    doc = {"about": "auto's measured fused-backend cases (rnnreg_kernels/auto_rule.py); "
                    "written by `python -m rnnreg_kernels.bench.auto_table --from ... --write`",
           "sources": [name for name, _ in docs],
           "entries": [asdict(m) for m in entries]}
    text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
    target = auto_rule.WINS_FILE if args.write else args.out
    if target:
        with open(target, "w") as f:
            f.write(text)
        auto_rule.load.cache_clear()
        print(f"wrote {target}: {len(entries)} entries "
              f"({sum(m.won for m in entries)} wins) from {len(docs)} documents")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
