"""`--device` for every command: one reading of cpu / cuda / cuda:N / auto, and one error for a device that is not there."""

from __future__ import annotations

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
