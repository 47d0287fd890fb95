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
from typing import List, Optional

from rnnreg_kernels import auto_rule


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
    entries = auto_rule.entries_from_results(docs)
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
