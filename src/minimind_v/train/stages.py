"""A stage is a config, not a script: the defaults that make `lm`, `pretrain`, `sft` and `dpo` different.

Each recipe (the original's 2025 MiniMind-V, and its 2026 minimind-3v) sets the stages' defaults;
every value is only a default a flag can change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from minimind_v.errors import UserError

Recipe = Literal["minimind-v", "minimind-3v"]


@dataclass(frozen=True)
class Stage:
    """What one stage of training means in a recipe."""

    name: str
    uses_images: bool
    """Samples carry images (pretrain, sft) or are text only (lm)."""
    freeze: str
    """Default freezing policy (see train/freezing.py)."""
    lr: float
    """Peak learning rate at `lr_batch` samples per optimizer step (batch_scaled_lr scales it)."""
    max_seq_len: int
    """Samples longer than this are counted as bad and skipped."""
    epochs: int
    batch_size: int
    """Samples per micro-batch per process."""
    needs_from: bool
    """Starting from random weights makes no sense here, so --from must be given."""
    lora_lr: float | None = None
    """Peak learning rate under --lora-rank, when it differs from the full model's."""
    lr_batch: int = 0
    """Samples per optimizer step that `lr` was chosen for (0: `batch_size`)."""

    def __post_init__(self) -> None:
        if not self.lr_batch:
            object.__setattr__(self, "lr_batch", self.batch_size)

    def default_lr(self, samples: int, lora: bool = False) -> float:
        """The peak rate a run with `samples` per optimizer step takes when --lr is not given."""
        lr = self.lora_lr if lora and self.lora_lr is not None else self.lr
        return batch_scaled_lr(lr, self.lr_batch, samples)


def batch_scaled_lr(lr: float, lr_batch: int, batch: int) -> float:
    """The square-root rule for Adam: `lr`, chosen for `lr_batch` samples per step, at `batch` samples per step.
    k times the samples average the gradient's noise down by sqrt(k), and Adam's step grows with it: measured on
    the synthetic world in docs/experiments.md ("A bigger batch")."""
    return lr * math.sqrt(batch / lr_batch)


# Preference pairs (train/dpo.py): from a trained model, one epoch. Measured on the quickstart model halfway through
# its SFT (scripts/dpo_experiment.py, 2000 pairs): an epoch at 1e-5 on the LLM or at 1e-4 under LoRA moves its
# held-out preference share alike (95% -> 98.4-98.6%); 5e-5 full or 3e-4 LoRA for a quarter epoch already halve its
# description exact match. Plain DPO lowers the chosen answers' likelihood too: --dpo-sft-weight 1 keeps it.
DPO = Stage("dpo", uses_images=True, freeze="llm", lr=1e-5, max_seq_len=1536, epochs=1, batch_size=8, needs_from=True,
            lora_lr=1e-4)

RECIPES: dict[str, dict[str, Stage]] = {
    "minimind-v": {
        # The language model alone, on text, from nothing (the original MiniMind pretrain: 5e-4, 512 tokens).
        "lm": Stage("lm", uses_images=False, freeze="llm", lr=5e-4, max_seq_len=512, epochs=1, batch_size=32,
                    needs_from=False),
        # Captions: only the projector learns to map image features into the LLM's space (the original: 4e-4 at
        # batch 16, 640 tokens). Twice the original's batch, at the square-root rule's rate (5.7e-4): a step of 16
        # leaves a GPU waiting on kernel launches, and on the synthetic world 2x the batch at the same samples
        # seen matched batch 32 over two seeds where 4x lost 9 points of descriptions (docs/experiments.md,
        # "A bigger batch").
        "pretrain": Stage("pretrain", uses_images=True, freeze="projector", lr=4e-4, max_seq_len=640, epochs=4,
                          batch_size=32, lr_batch=16, needs_from=True),
        # Conversations: LLM + projector. The original uses 1e-6 on a well-trained LLM; a model trained here from
        # scratch needs far more to move, and 5e-5 at batch 8 stays well below the pretrain rate; 2x the batch
        # as in pretrain (7.1e-5).
        "sft": Stage("sft", uses_images=True, freeze="llm", lr=5e-5, max_seq_len=1536, epochs=2, batch_size=16,
                     lr_batch=8, needs_from=True),
        "dpo": DPO,
    },
    # The 2026 recipe (UPSTREAM_FORMAT.md): its freeze_llm 2 (pretrain) and 1 (SFT) are our projector and
    # projector+ends; it has no text-only stage of its own.
    "minimind-3v": {
        "pretrain": Stage("pretrain", uses_images=True, freeze="projector", lr=4e-4, max_seq_len=450, epochs=2,
                          batch_size=16, needs_from=True),
        "sft": Stage("sft", uses_images=True, freeze="projector+ends", lr=5e-6, max_seq_len=768, epochs=2,
                     batch_size=4, needs_from=True),
        "dpo": DPO,  # neither original recipe has preference tuning: both share ours
    },
}


def get_stage(name: str, recipe: str = "minimind-v") -> Stage:
    if recipe not in RECIPES:
        raise UserError(f"--recipe {recipe!r}: unknown recipe (known: {', '.join(RECIPES)})")
    stages = RECIPES[recipe]
    if name not in stages:
        known = ", ".join(stages)
        raise UserError(f"--stage {name!r}: not a stage of --recipe {recipe} (its stages: {known})")
    return stages[name]
