"""Measurement around every phase of a run: wall-clock time now; memory peaks arrive with the measurement work.

Until GPU (NVML, allocator) and CPU (RSS) peaks are measured, their fields are null with a reason string —
never 0 — so that no table can mistake "not measured" for "free".
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

NOT_MEASURED = "memory peaks are not measured by this version of ddbench"
MEMORY_FIELDS = ("cpu_peak_rss_mb", "gpu_nvml_peak_mb", "gpu_torch_allocated_peak_mb", "gpu_torch_reserved_peak_mb")


def empty_phase() -> dict:
    return {"wall_s": None, **{k: None for k in MEMORY_FIELDS}, "gpu_reason": NOT_MEASURED}


@contextmanager
def phase(phases: dict, name: str, device: torch.device | str = "cpu") -> Iterator[dict]:
    """Time a phase into ``phases[name]`` (synchronising CUDA at the boundaries)."""
    figures = empty_phase()
    phases[name] = figures
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    try:
        yield figures
    finally:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        figures["wall_s"] = round(time.perf_counter() - start, 4)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment_stamp() -> dict:
    """Software and machine facts for a record."""
    import timm

    import bench

    cuda = torch.cuda.is_available()
    return {
        "ddbench": bench.__version__,
        "git_sha": _git("rev-parse", "HEAD"),
        "git_dirty": None if _git("rev-parse", "HEAD") is None else bool(_git("status", "--porcelain")),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "gpu_name": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "pid": os.getpid(),
    }
