"""Run the benchmark as a script: ``python benchmarks/run.py --set smoke --out /tmp/bench``.

Same options as ``python -m rnnreg_kernels bench`` (see ``--help`` and benchmarks/README.md);
works from a source checkout without installing the package.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rnnreg_kernels.bench import add_arguments, main  # noqa: E402

if __name__ == "__main__":
    parser = add_arguments(argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description="Benchmark rnnreg_kernels against nn.LSTM/nn.RNN + post-hoc penalties."))
    sys.exit(main(parser.parse_args()))
