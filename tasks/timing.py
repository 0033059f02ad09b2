"""Timing for the speed benches: wall clocks synchronized on CUDA, paired medians, and the machine measured on."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from model.memory.dtypes import dtype_name


def sync(device: torch.device) -> None:
    """Wait for the work queued on `device` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds `fn()` takes, with the device synchronized before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def paired(
    optimized: Callable[[], object], baseline: Callable[[], object], device: torch.device, repeats: int
) -> tuple[float, float]:
    """Median seconds of `optimized()` and `baseline()`: one warm-up each, then `repeats` alternating runs."""
    optimized(), baseline()
    times = [(clock(optimized, device), clock(baseline, device)) for _ in range(repeats)]
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def machine_info(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    return {
        "cpu": names[0] if names else platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "device": str(device),
        "dtype": dtype_name(dtype),
    }
