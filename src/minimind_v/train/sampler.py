"""Which samples each process reads at each step: one seeded global order, sliced by position.

The order of epoch e is a permutation drawn from (seed, e) alone, the same on every process. The
run's data position is (epoch, samples of that order already consumed by all processes together).
An optimizer step consumes G = batch_size x world_size x accumulation_steps samples: micro-step j
of the step starting at position p gives process r the samples p + j*B*W + r*B ... + B - 1.
Because the position counts global samples, a run resumed with another number of processes
(another G) simply continues slicing the same order from the same sample. The tail of an epoch
shorter than G is skipped, so every step is full and every process does the same work.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The global order of epoch `epoch`: a function of (seed, epoch) only, hence reproducible anywhere."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


@dataclass(frozen=True)
class Slicing:
    batch_size: int
    world_size: int
    accumulation_steps: int

    @property
    def global_batch(self) -> int:
        """Samples consumed by one optimizer step over all processes."""
        return self.batch_size * self.world_size * self.accumulation_steps

    def steps_left(self, num_samples: int, position: int) -> int:
        """Full optimizer steps that still fit in an epoch from `position` on."""
        return max(0, num_samples - position) // self.global_batch

    def micro_batches(self, order: np.ndarray, position: int, rank: int) -> list[list[int]]:
        """This process's micro-batches (sample indices) for the step that starts at `position`."""
        per_micro = self.batch_size * self.world_size
        out = []
        for micro in range(self.accumulation_steps):
            start = position + micro * per_micro + rank * self.batch_size
            out.append(order[start:start + self.batch_size].tolist())
        return out

    def steps(self, order: np.ndarray, position: int, rank: int) -> Iterator[tuple[int, list[list[int]]]]:
        """(position after the step, its micro-batches) for every step left in the epoch."""
        for _ in range(self.steps_left(len(order), position)):
            yield position + self.global_batch, self.micro_batches(order, position, rank)
            position += self.global_batch
