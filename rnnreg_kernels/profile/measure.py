"""``profile --measure``: time the op on a CUDA GPU, so the static estimate can be calibrated.

Per direction, the op ``rnnreg_kernels.recurrence`` runs through the profiled backend at
T = 100 and T = 200 (same B, H, dtype; all three penalties on, so the kernels take the
penalty paths the profile counted).  Forward: the op without autograd.  Backward: forward
plus ``backward()`` minus forward.  Measured µs per step = (time(T=200) - time(T=100)) / 100,
which cancels the launch and the per-call work; each time is the median of ``reps`` calls
timed with CUDA events (``bench.timing.time_interleaved``: L2 flushed and the device idle
before each call).  The backward figure includes the ``grad_w_hh`` GEMM (it grows with T too).
"""
from __future__ import annotations

import statistics
from typing import Optional

from ..contract import gates_of, has_cell_state

T_SHORT, T_LONG = 100, 200


def gpu_problem(backend: str) -> Optional[str]:
    """None when ``--measure`` can run here, else why not."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover
        return f"torch is not importable ({e})"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build (no CUDA)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    return None


def _inputs(cell: str, T: int, B: int, H: int, dtype, device, requires_grad: bool):
    import torch
    G = gates_of(cell)
    gen = torch.Generator(device="cpu").manual_seed(0)
    def rnd(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)
    x = rnd(T, B, G * H, scale=0.5)
    w = rnd(G * H, H, scale=H ** -0.5)
    h0 = rnd(B, H, scale=0.1)
    c0 = rnd(B, H, scale=0.1) if has_cell_state(cell) else None
    return x, w, h0, c0


def measure(result: dict, backend: str, cell: str, H: int, B: int, dtype: str, tf32: bool,
            reps: int = 9, device=None) -> None:
    """Add ``measured_us_per_step`` (and how) to each kernel record of ``result``.

    ``device`` defaults to the current CUDA device (a CPU device times the same way with
    perf_counter, for tests of this code path)."""
    import torch

    from .. import Penalties, recurrence
    from ..bench.timing import time_interleaved
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
              "fp64": torch.float64}[dtype]
    device = torch.device("cuda") if device is None else torch.device(device)
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    pen = Penalties(norm_stabilizer=1.0, tar=1.0, ar=1.0)
    # normprop: the module's constants at its default gammas (2, 2, 1): 1/sigma_c, 1/sigma_h
    extra = {} if cell != "normprop" else dict(
        cell_scale=torch.full((H,), 1.494, device=device), h_scale=2.584)
    fns = {}
    for T in (T_SHORT, T_LONG):
        fx = _inputs(cell, T, B, H, tdtype, device, False)
        bx = _inputs(cell, T, B, H, tdtype, device, True)

        def fwd(a=fx):
            with torch.no_grad():
                return recurrence(*a, cell=cell, penalties=pen, backend=backend, **extra)

        def train(a=bx):
            out = recurrence(*a, cell=cell, penalties=pen, backend=backend, **extra)
            (out.output.float().sum() + out.penalty).backward()

        fns[f"fwd{T}"] = fwd
        fns[f"train{T}"] = train
    try:
        samples = time_interleaved(fns, warmup=3, reps=reps, device=device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    med = {k: statistics.median(v) for k, v in samples.items()}   # ms
    steps = T_LONG - T_SHORT
    fwd_us = (med[f"fwd{T_LONG}"] - med[f"fwd{T_SHORT}"]) * 1e3 / steps
    bwd_us = ((med[f"train{T_LONG}"] - med[f"fwd{T_LONG}"])
              - (med[f"train{T_SHORT}"] - med[f"fwd{T_SHORT}"])) * 1e3 / steps
    clock = "CUDA events" if device.type == "cuda" else "perf_counter, CPU"
    how = (f"median of {reps} calls ({clock}) of recurrence(backend={backend!r}) at "
           f"T={T_SHORT} and T={T_LONG}; (t{T_LONG} - t{T_SHORT}) / {steps}; backward = "
           f"(forward+backward) - forward, including the grad_w_hh GEMM")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, sms = props.name, props.multi_processor_count
    else:
        name, sms = "cpu", None
    result["measured"] = {"device": name, "sm_count": sms, "torch": torch.__version__,
                          "how": how,
                          "median_ms": {k: round(v, 4) for k, v in med.items()}}
    for k in result["kernels"]:
        k["measured_us_per_step"] = round(fwd_us if k["direction"] == "forward" else bwd_us, 3)
        k["measured_how"] = how
