"""Where a training loop stands (saved in every checkpoint) and what it measured since its last log line."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from minimind_v.train import distributed


@dataclass
class LoopState:
    """Everything about the loop's progress a checkpoint must hold to continue it bit for bit."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    position: int = 0
    """Micro-batches of the epoch's plan consumed by all processes together (train/sampler.py)."""
    samples: int = 0
    """Samples of the epoch those micro-batches hold."""
    tokens: int = 0
    """Tokens trained on by all processes, padding excluded."""
    elapsed: float = 0.0
    """Seconds of training before this process took over."""

    def saved(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "position": self.position, "samples": self.samples,
                "tokens": self.tokens, "elapsed": self.elapsed}

    @classmethod
    def from_saved(cls, state: dict[str, Any]) -> "LoopState":
        return cls(step=state["step"], epoch=state["epoch"], position=state["position"], samples=state["samples"],
                   tokens=state["tokens"], elapsed=state["elapsed"])


@dataclass
class Window:
    """Sums over the steps since the last log line; kept on the device so a step never waits for it."""

    device: torch.device
    ce: torch.Tensor = field(init=False)
    supervised: int = field(init=False)
    tokens: int = field(init=False)
    began: float = field(init=False)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.ce = torch.zeros((), device=self.device)
        self.supervised, self.tokens = 0, 0
        self.began = time.perf_counter()

    def add(self, ce_sum: torch.Tensor, supervised: int, tokens: int) -> None:
        self.ce += ce_sum
        self.supervised += supervised
        self.tokens += tokens

    def totals(self) -> tuple[float, float, float]:
        """(CE sum, supervised tokens, tokens) over all processes: the one host sync per log line."""
        sums = torch.stack([self.ce.double(), torch.tensor(float(self.supervised), device=self.device),
                            torch.tensor(float(self.tokens), device=self.device)]).double()
        ce, supervised, tokens = distributed.all_reduce_sum(sums).tolist()
        return ce, supervised, tokens
