"""Which micro-batches each process reads at each step: one seeded global order, sliced by position.

data/batching.py's BatchPlan turns (seed, epoch) into the epoch's list of micro-batches, the same
on every process. The run's data position is (epoch, micro-batches of that list consumed by all
processes together). An optimizer step consumes W x k of them (W processes, k accumulation
steps): micro-step j of the step starting at position p gives process r the batch p + j*W + r.

So with random batching, W processes of batch B see in each step exactly the samples one process
of batch W*B sees; and a run resumed with another number of processes continues slicing the same
list from the same batch, which is the same global sample: with random or grouped batching, batch
p starts at sample p * B of the epoch's order (batches of a token budget have no fixed B, but the list is
the same). (The batch size itself must stay, or the list would change.) The tail of an epoch shorter than
one step is skipped, so every process does the same work.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Slicing:
    world_size: int
    accumulation_steps: int

    @property
    def batches_per_step(self) -> int:
        return self.world_size * self.accumulation_steps

    def steps_left(self, num_batches: int, position: int) -> int:
        """Full optimizer steps that still fit in an epoch of `num_batches` from `position` on."""
        return max(0, num_batches - position) // self.batches_per_step

    def micro_batches(self, position: int, rank: int) -> list[int]:
        """Indices (into the epoch's batch list) of this process's micro-batches for the step at `position`."""
        return [position + j * self.world_size + rank for j in range(self.accumulation_steps)]

    def steps(self, num_batches: int, position: int, rank: int) -> Iterator[tuple[int, list[int]]]:
        """(position after the step, this process's micro-batch indices) for every step left in the epoch."""
        for _ in range(self.steps_left(num_batches, position)):
            yield position + self.batches_per_step, self.micro_batches(position, rank)
            position += self.batches_per_step
