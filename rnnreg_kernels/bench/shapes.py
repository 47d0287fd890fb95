"""Named shape sets of the benchmark (DESIGN.md section 6).

A :class:`Shape` is one recurrent layer stack to time: cell, layers, input size ``I``, hidden
size ``H``, batch ``B`` and steps ``T`` (time-major input ``[T, B, I]``).  A :class:`ShapeSet`
groups shapes with the defaults that suit them (device, dtypes, modes, repetitions).

CPU sets: ``smoke`` (seconds; CI and a first try) and ``cpu`` (a few minutes on 2 cores; the
committed CPU comparison).  GPU sets: ``char``, ``word``, ``small-batch``, ``large-batch``,
``irnn``, ``key`` (LSTM and IRNN H=1024 B=32 T=100, what gpu_run.sh measures first),
``flashrnn-point`` and ``hidden-sweep`` (speedup against H at fixed B, T).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

CELL_NAMES = {"lstm": "LSTM", "relu": "IRNN (relu RNN)", "tanh": "tanh RNN"}


@dataclass(frozen=True)
class Shape:
    """One benchmark case without dtype and mode.

    Attributes:
        cell: ``"lstm"``, ``"relu"`` (IRNN-initialized relu RNN) or ``"tanh"``.
        hidden: H.  batch: B.  steps: T.
        layers: stacked layers (the penalties act on the last one, the module default).
        input_size: I of the first layer; 0 means ``hidden``.
    """

    cell: str
    hidden: int
    batch: int
    steps: int
    layers: int = 1
    input_size: int = 0

    @property
    def inputs(self) -> int:
        return self.input_size or self.hidden

    @property
    def name(self) -> str:
        stem = self.cell + (str(self.layers) if self.layers > 1 else "")
        extra = f"-i{self.input_size}" if self.input_size and self.input_size != self.hidden else ""
        return f"{stem}-h{self.hidden}-b{self.batch}-t{self.steps}{extra}"

    @property
    def tokens(self) -> int:
        """B * T: the tokens one call processes."""
        return self.batch * self.steps

    def as_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = self.inputs
        d["name"] = self.name
        return d


@dataclass(frozen=True)
class ShapeSet:
    """Shapes plus the defaults that suit them (``threads``: CPU threads, None = torch's)."""

    name: str
    device: str  # "cpu" or "cuda"
    shapes: Tuple[Shape, ...]
    description: str
    dtypes: Tuple[str, ...] = ("fp32",)
    modes: Tuple[str, ...] = ("forward", "train")
    contenders: Tuple[str, ...] = ("eager", "compile", "fused", "ours")
    warmup: int = 2
    reps: int = 10
    threads: Optional[int] = None  # CPU threads unless --threads says otherwise


def _lstm(h, b, t, layers=1):
    return Shape("lstm", h, b, t, layers)


_GPU_DTYPES = ("fp32", "bf16", "fp16")
_SWEEP = ("eager", "fused", "ours")  # sweeps skip nn+compile (a compile per shape and dtype)

SETS: Dict[str, ShapeSet] = {s.name: s for s in [
    ShapeSet("smoke", "cpu", (
        Shape("lstm", 8, 3, 5),
        Shape("relu", 5, 3, 7),
        Shape("tanh", 6, 2, 1),
        Shape("lstm", 6, 3, 4, layers=2, input_size=5),
    ), "tiny awkward sizes (H = 5..8, B = 2..3, T = 1..7) on the CPU: seconds; CI and a "
       "first try (1 thread: tiny ops only suffer from threading)",
       contenders=("eager", "ours"), warmup=1, reps=3, threads=1),
    ShapeSet("cpu", "cpu", (
        _lstm(256, 32, 100),
        _lstm(128, 32, 100),
        _lstm(512, 32, 100),
        _lstm(256, 8, 100),
        _lstm(256, 64, 100),
        Shape("relu", 256, 32, 100),
    ), "CPU comparison (native and reference backends vs nn.LSTM + eager post-hoc "
       "penalties, nn.LSTM + torch.compile'd post-hoc and nn.LSTM + activation_penalties); "
       "the headline is LSTM H=256, B=32, T=100, training step", warmup=3, reps=15),
    ShapeSet("char", "cuda", (_lstm(1000, 32, 100), _lstm(1000, 128, 100)),
             "character-level LM: LSTM H=1000, B=32/128, T=100", _GPU_DTYPES),
    ShapeSet("word", "cuda", (Shape("lstm", 650, 20, 35, layers=2),),
             "word-level LM (Zaremba medium): 2-layer LSTM H=650, B=20, T=35", _GPU_DTYPES),
    ShapeSet("small-batch", "cuda",
             (_lstm(768, 16, 1024),)
             + tuple(_lstm(1024, b, t) for t in (100, 512) for b in (8, 16, 32, 64)),
             "small batch, long sequences: LSTM H=768, B=16, T=1024; H=1024, B=8..64, "
             "T=100/512", _GPU_DTYPES, contenders=_SWEEP),
    ShapeSet("large-batch", "cuda", (_lstm(512, 256, 100),),
             "large batch: LSTM H=512, B=256, T=100", _GPU_DTYPES),
    ShapeSet("irnn", "cuda", tuple(Shape("relu", 1024, 32, t) for t in (100, 300, 1000)),
             "IRNN: relu RNN (identity W_hh) H=1024, B=32, T=100..1000", _GPU_DTYPES,
             contenders=_SWEEP),
    ShapeSet("key", "cuda", (_lstm(1024, 32, 100), Shape("relu", 1024, 32, 100)),
             "the issue's key rows: LSTM and IRNN H=1024, B=32, T=100 (gpu_run.sh runs them "
             "first, bf16 and fp16)", ("bf16", "fp16"), contenders=_SWEEP),
    ShapeSet("flashrnn-point", "cuda", (_lstm(768, 16, 1024),),
             "FlashRNN's comparison point: LSTM H=768, B=16, T=1024", _GPU_DTYPES),
    ShapeSet("hidden-sweep", "cuda", tuple(_lstm(h, 32, 100) for h in (256, 512, 768, 1024,
                                                                         1536, 2048)),
             "speedup against hidden size: LSTM H=256..2048, B=32, T=100", _GPU_DTYPES,
             contenders=_SWEEP),
]}

GPU_SETS = tuple(n for n, s in SETS.items() if s.device == "cuda")


def resolve_sets(spec: str) -> List[ShapeSet]:
    """``"char,word"`` or ``"gpu"`` (all GPU sets) -> the named sets, in order, no repeats.

    Raises ``ValueError`` naming the unknown set and the known ones.
    """
    names: List[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        expanded = list(GPU_SETS) if part == "gpu" else [part]
        for name in expanded:
            if name not in SETS:
                raise ValueError(f"--set: unknown shape set {name!r}; known: "
                                 f"{', '.join(SETS)} (or 'gpu' for all GPU sets)")
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError(f"--set: expected one or more of {', '.join(SETS)}, got {spec!r}")
    return [SETS[n] for n in names]


def describe_sets() -> str:
    """A listing of every set and its shapes (for ``--list``)."""
    lines = []
    for s in SETS.values():
        lines.append(f"{s.name} [{s.device}; dtypes {','.join(s.dtypes)}; modes "
                     f"{','.join(s.modes)}]: {s.description}")
        lines.extend(f"    {shape.name}" for shape in s.shapes)
    return "\n".join(lines)
