"""``backend="auto"`` on CUDA tensors: the fused kernels only where a GPU run measured them faster.

The project's rule: ``auto`` must never make a user slower than ``nn.LSTM`` / ``nn.RNN`` plus
post-hoc penalties.  The ``native`` backend is that arithmetic (PyTorch's own recurrence, cuDNN
on CUDA, plus one fused penalty pass instead of the eager penalty ops), so it is auto's choice
on CUDA unless a committed measurement says a fused backend (``triton``, ``cuda``) is faster.

The measurements live in ``auto_wins.json`` beside this file, written
(:mod:`rnnreg_kernels.bench.auto_table`) by

    python -m rnnreg_kernels.bench.auto_table --from benchmarks/results/<gpu run>.json [...] --write

from benchmark result documents (``python -m rnnreg_kernels bench``, ``benchmarks/gpu_run.sh``).
Each entry is one training-step case (shape, dtype) on one GPU model where a fused contender
(``ours:triton`` / ``ours:cuda``) passed the benchmark's correctness gate and was timed, with
``won`` true when its median time was below both ``ours:native``'s and ``nn+eager``'s (the
ones of them that ran) in the same run.

A case (GPU name, cell, dtype, H, B) goes to a fused backend when that backend has winning
entries for the same GPU name, cell and dtype whose H and B ranges span the case, and no
losing entry of that backend lies inside the same ranges.  Everything else on CUDA goes to
``native``, or where ``native`` cannot run the case (the ``trec`` and ``normprop`` cells, cell
norms, torch.func transforms) to ``reference``: an unmeasured fused kernel is never auto's
choice.  ``backend="triton"`` / ``"cuda"`` opt in by name.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

WINS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "auto_wins.json")
FUSED = ("triton", "cuda")  # the order auto tries them in when both are measured faster


@dataclass(frozen=True)
class Measured:
    """One measured training-step case of a fused backend."""

    device_name: str
    backend: str
    cell: str
    dtype: str
    hidden: int
    batch: int
    won: bool
    speedup: float  # the better baseline's median time / the fused backend's median time
    source: str


def _entry(raw: dict, where: str) -> Measured:
    try:
        m = Measured(**raw)
    except TypeError as e:
        raise ValueError(f"{where}: an entry expected the fields of Measured "
                         f"({', '.join(Measured.__dataclass_fields__)}), got {sorted(raw)}: {e}")
    if m.backend not in FUSED:
        raise ValueError(f"{where}: backend expected one of {FUSED}, got {m.backend!r}")
    return m


@functools.lru_cache(maxsize=8)
def load(path: str = WINS_FILE) -> tuple:
    """The measured entries of ``path`` (empty when the file does not exist)."""
    if not os.path.exists(path):
        return ()
    with open(path) as f:
        doc = json.load(f)
    return tuple(_entry(raw, f"{path}: entries[{i}]")
                 for i, raw in enumerate(doc.get("entries", [])))


def fused_choice(device_name: str, cell: str, dtype: torch.dtype, hidden: int, batch: int,
                 table: Optional[Sequence[Measured]] = None) -> Optional[str]:
    """The fused backend measured faster for this case, or None (then ``native``)."""
    from .bench.contenders import DTYPES  # the dtype names of the benchmark's result rows

    table = load() if table is None else table
    name = next((n for n, d in DTYPES.items() if d == dtype), None)
    for backend in FUSED:
        rows = [m for m in table if (m.device_name, m.backend, m.cell, m.dtype)
                == (device_name, backend, cell, name)]
        wins = [m for m in rows if m.won]
        if not wins:
            continue
        h_lo, h_hi = min(m.hidden for m in wins), max(m.hidden for m in wins)
        b_lo, b_hi = min(m.batch for m in wins), max(m.batch for m in wins)
        if not (h_lo <= hidden <= h_hi and b_lo <= batch <= b_hi):
            continue
        if any(not m.won and h_lo <= m.hidden <= h_hi and b_lo <= m.batch <= b_hi
               for m in rows):
            continue
        return backend
    return None
