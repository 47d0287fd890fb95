"""Timers and memory probes.

Contenders of one case are timed round-robin (one call of each per round) after warm-up, so
drifts of a shared machine hit them alike.  CPU: ``time.perf_counter_ns`` around each call
(monotonic).  GPU: a CUDA event pair around each call on the current stream, with the L2 cache
flushed (a 256 MB buffer zeroed) before each timed call outside the events, as
``triton.testing.do_bench`` does.  Every sample is kept, so median, min and max are exact.

Memory: on GPU ``torch.cuda.max_memory_allocated`` around one call (the step's peak over what
was allocated before it); on CPU the same quantity from the profiler's allocation events
(``profile_memory=True``: running sum of allocated minus freed bytes, its maximum), plus the
process-wide peak RSS from ``getrusage`` (which never goes down, so it is not per contender).
"""
from __future__ import annotations

import contextlib
import os
import resource
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

_L2_FLUSH_BYTES = 256 * 1024 * 1024


def summarize(samples_ms: List[float]) -> Dict[str, float]:
    """median, min, max, mean and the count of a list of times in ms."""
    return {"median": statistics.median(samples_ms), "min": min(samples_ms),
            "max": max(samples_ms), "mean": statistics.fmean(samples_ms),
            "reps": len(samples_ms)}


def time_interleaved(fns: Dict[str, Callable[[], object]], warmup: int, reps: int,
                     device: torch.device, min_warmup_ms: float = 25.0) -> Dict[str, List[float]]:
    """Times (ms) of ``reps`` calls of each function, taken round-robin.

    Every function is first called at least ``warmup`` times (and, on GPU, for at least
    ``min_warmup_ms``).  Then each round calls every function once, so slow drifts of the
    machine (other processes, clocks) hit all contenders alike and their ratio stays fair.
    CPU: ``time.perf_counter_ns`` around the call.  GPU: CUDA events around the call on the
    current stream, the L2 cache flushed and the device synchronized before each call (so a
    contender's launch overhead is never hidden behind the previous call's GPU work).
    """
    cuda = device.type == "cuda"
    for fn in fns.values():
        t0 = time.perf_counter()
        done = 0
        while done < warmup or (cuda and (time.perf_counter() - t0) * 1e3 < min_warmup_ms):
            fn()
            if cuda:
                torch.cuda.synchronize(device)
            done += 1
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    if not cuda:
        for _ in range(reps):
            for name, fn in fns.items():
                t0 = time.perf_counter_ns()
                fn()
                samples[name].append((time.perf_counter_ns() - t0) / 1e6)
        return samples
    flush = torch.empty(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    for _ in range(reps):
        events = {}
        for name, fn in fns.items():
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            flush.zero_()
            torch.cuda.synchronize(device)  # an empty queue: launch gaps are not hidden
            start.record()
            fn()
            end.record()
            events[name] = (start, end)
        torch.cuda.synchronize(device)
        for name, (start, end) in events.items():
            samples[name].append(start.elapsed_time(end))
    return samples


def rss_peak_mb_process() -> float:
    """Peak resident set size of this process so far, in MB (never decreases)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20


def cuda_step_peak(fn: Callable[[], object], device: torch.device) -> Dict[str, float]:
    """Run ``fn`` once; MB allocated at its peak above what was live before, and absolute."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"step_peak_mb": (peak - base) / 2**20, "peak_allocated_mb": peak / 2**20}


@contextlib.contextmanager
def _stderr_silenced():
    """Send file descriptor 2 to /dev/null (the profiler's C++ start/stop log lines)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def profile_step(fn: Callable[[], object]) -> Dict[str, object]:
    """Run ``fn`` once under the (CPU-activity) profiler with memory events.

    Returns ``cpu_step_peak_mb``: MB of CPU memory allocated at the step's peak above its start
    (None if the profiler gave no memory events); ``ops``: the profiled op names containing
    "rnn" or "lstm" (which kernel a contender really ran, e.g. ``aten::mkldnn_rnn_layer`` or
    ``aten::_cudnn_rnn``).
    """
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU],
                                     profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    mem = sorted((e.start_ns(), e.nbytes()) for e in events
                 if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    peak = None
    if mem:
        run = best = 0
        for _, nbytes in mem:
            run += nbytes
            best = max(best, run)
        peak = best / 2**20
    ops = sorted({e.name() for e in events if e.name() != "[memory]"
                  and ("rnn" in e.name().lower() or "lstm" in e.name().lower())})
    return {"cpu_step_peak_mb": peak, "ops": ops}
