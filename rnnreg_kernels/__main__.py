"""``python -m rnnreg_kernels {check,demo,bench,profile,experiment}``.

* ``check``: float64 gradient checks of every backend that can run here, a PASS/FAIL table,
  exit status 1 on any failure (``rnnreg_kernels.check``).
* ``demo``: IRNN on the adding problem with and without the norm-stabilizer, run far past
  the training length, K seeds; table, PNG plot and JSON (``rnnreg_kernels.experiments.demo``).
* ``bench``: kernel benchmarks (``rnnreg_kernels.bench``, imported only for this command).
* ``profile``: static SASS profile of the kernels a plan launches, compiled for sm_90 without
  a GPU, with estimated µs per step (``rnnreg_kernels.profile``).
* ``experiment charlm``: the paper's character-level language-model table
  (``rnnreg_kernels.experiments.charlm``).

Exit status: 0 success, 1 a check failed (or the command failed), 2 bad arguments.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Optional, Sequence

COMMANDS = ("check", "demo", "bench", "profile", "experiment")
EXPERIMENTS = ("charlm",)


def _command_of(argv: Sequence[str]) -> Optional[str]:
    """The subcommand named in argv (the first token that is not an option), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The argument parser; ``bench``'s options are added only when ``bench`` is asked for."""
    from rnnreg_kernels import check
    from rnnreg_kernels.experiments import demo

    parser = argparse.ArgumentParser(
        prog="python -m rnnreg_kernels",
        description="Fused RNN kernels with activation regularizers: gradient checks, a demo, "
                    "benchmarks.")
    sub = parser.add_subparsers(dest="command",
                                metavar="{check,demo,bench,profile,experiment}",
                                required=True)
    p_check = sub.add_parser(
        "check", help="float64 gradcheck of every available backend (exit 1 on any failure)",
        description=(check.__doc__ or "").split("\n\n")[0])
    check.add_arguments(p_check)
    p_demo = sub.add_parser(
        "demo", help="IRNN on the adding problem with/without the norm-stabilizer, "
                     "evaluated far past the training length",
        description=(demo.__doc__ or "").split("\n\n")[0])
    demo.add_arguments(p_demo)
    p_bench = sub.add_parser("bench", help="benchmark the kernels against cuDNN + post-hoc "
                                           "penalties (options: bench --help)")
    if _command_of(argv) == "bench":
        from rnnreg_kernels import bench
        bench.add_arguments(p_bench)
    from rnnreg_kernels import profile
    p_profile = sub.add_parser(
        "profile", help="static SASS profile of the kernels a plan launches (sm_90, no GPU "
                        "needed), estimated us per step",
        description=(profile.__doc__ or "").split("\n\n")[0])
    profile.add_arguments(p_profile)
    _add_experiments(sub)
    return parser


def _add_experiments(sub) -> None:
    """``experiment {charlm}``: the paper-facing runs of ``rnnreg_kernels.experiments``."""
    from rnnreg_kernels.experiments import charlm

    p_exp = sub.add_parser("experiment", help="the paper's experiments (experiment charlm: "
                                              "character-level language models)")
    which = p_exp.add_subparsers(dest="experiment", metavar="{charlm}", required=True)
    p_charlm = which.add_parser(
        "charlm", help="tanh / IRNN / TRec / LSTM character-level LMs with and without the "
                       "norm-stabilizer: the paper's bpc table",
        description=(charlm.__doc__ or "").split("\n\n")[0])
    charlm.add_arguments(p_charlm)


def _triton_imported() -> bool:
    return any(name == "triton" or name.startswith("triton.") for name in sys.modules)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(argv)
    except ImportError as exc:
        print(f"python -m rnnreg_kernels: cannot load the {_command_of(argv)} command: {exc}",
              file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if args.command == "check":
        if args.interpret and os.environ.get("TRITON_INTERPRET") != "1":
            if _triton_imported():
                # triton reads TRITON_INTERPRET when kernels are defined: start afresh.
                env = dict(os.environ, TRITON_INTERPRET="1")
                return subprocess.call([sys.executable, "-m", "rnnreg_kernels", *argv],
                                       env=env)
            os.environ["TRITON_INTERPRET"] = "1"
        from rnnreg_kernels import check
        return check.main(args)
    if args.command == "demo":
        from rnnreg_kernels.experiments import demo
        return demo.main(args)
    if args.command == "profile":
        from rnnreg_kernels import profile
        return profile.main(args)
    if args.command == "experiment":
        from rnnreg_kernels.experiments import charlm
        return charlm.main(args)
    from rnnreg_kernels import bench
    return int(bench.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
