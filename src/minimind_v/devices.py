"""`--device` for every command: one reading of cpu / cuda / cuda:N / auto, and one error for a device that is not
there; and what timing on a device needs (its name, its clock, its peak memory and bf16 FLOP/s)."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

from minimind_v.errors import UserError


def resolve_device(name: str | None, local_rank: int = 0) -> torch.device:
    """auto (or None): this process's GPU when there is one, else the CPU; cuda without an index: cuda:local_rank."""
    if name in (None, "auto"):
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: expected cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine (this torch: {torch.__version__})")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type not in ("cpu", "mps"):
        raise UserError(f"--device {name!r}: expected cpu, cuda, cuda:N or auto")
    return device


BF16_PEAKS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
              ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12),
              ("A10", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12))
"""Dense bf16 peaks (FLOP/s) by device name, most specific first."""


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def bf16_peak(device: torch.device) -> float | None:
    """The GPU's dense bf16 peak, when it is a known one (None on the CPU)."""
    if device.type != "cuda":
        return None
    return next((peak for name, peak in BF16_PEAKS if name in device_name(device)), None)


def now(device: torch.device) -> float:
    """perf_counter() once the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def peak_memory_mb(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"kind": "cuda_max_allocated", "mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}
    # ru_maxrss is KB on Linux: the whole process's peak so far, tower and data included.
    return {"kind": "process_peak_rss", "mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def process_age() -> float | None:
    """Seconds since this process started (the interpreter and its imports included), or None off Linux."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
