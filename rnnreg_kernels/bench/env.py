"""What machine and software a benchmark ran on (recorded in every result JSON)."""
from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import subprocess
import sys
from typing import Dict, Optional

import torch


def _run(cmd) -> Optional[str]:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> Optional[list]:
    """1, 5 and 15 minute load averages (how busy the machine was), or None."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    return getattr(triton, "__version__", "unknown")


def git_state(root: str) -> Dict[str, object]:
    """Commit and dirty flag of the checkout at ``root`` (None where git is unavailable)."""
    commit = _run(["git", "-C", root, "rev-parse", "HEAD"])
    status = _run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"])
    return {"commit": commit, "dirty": bool(status) if commit else None}


def environment(device: torch.device) -> Dict[str, object]:
    """Device, versions, threads, load and the relevant environment variables."""
    info: Dict[str, object] = {
        "device_type": device.type,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "torch_cuda": torch.version.cuda,
        "cudnn": None,
        "driver": None,
        "gpu": None,
        "mkldnn_enabled": bool(torch.backends.mkldnn.is_available()
                               and torch.backends.mkldnn.enabled),
        "loadavg_start": loadavg(),
        "env": {k: os.environ[k] for k in ("RNNREG_BACKEND", "TRITON_INTERPRET",
                                           "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                           "CUDA_VISIBLE_DEVICES") if k in os.environ},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_capability"] = list(torch.cuda.get_device_capability(device))
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        info["gpu_sm_count"] = props.multi_processor_count
        info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() \
            else None
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        info["driver"] = smi.splitlines()[0].strip() if smi else None
    info["device_name"] = info["gpu"] or info["cpu"]
    return info


def device_slug(info: Dict[str, object]) -> str:
    """A file-name-safe short name of the device, e.g. ``nvidia-h100-80gb-hbm3`` or
    ``cpu-amd-epyc-2t``."""
    if info.get("gpu"):
        base = str(info["gpu"])
    else:
        base = f"cpu-{info['cpu']}-{info['torch_threads']}t"
    slug = re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")
    return slug[:60] or "device"


def now_utc() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def command_line() -> str:
    """The command that started this process, shell-quoted (``python -m rnnreg_kernels ...``
    when it was started that way)."""
    argv = list(sys.argv)
    if argv and argv[0].replace(os.sep, "/").endswith("rnnreg_kernels/__main__.py"):
        argv = ["-m", "rnnreg_kernels"] + argv[1:]
    return shlex.join([os.path.basename(sys.executable)] + argv)
