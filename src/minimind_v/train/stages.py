"""A stage is a config, not a script: the defaults that make `lm`, `pretrain` and `sft` different.

Each recipe (the original's 2025 MiniMind-V, and its 2026 minimind-3v) sets the stages' defaults;
every value is only a default a flag can change.
"""

from __future__ import annotations

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
    """Peak learning rate."""
    max_seq_len: int
    """Samples longer than this are counted as bad and skipped."""
    epochs: int
    batch_size: int
    """Samples per micro-batch per process."""
    needs_from: bool
    """Starting from random weights makes no sense here, so --from must be given."""


RECIPES: dict[str, dict[str, Stage]] = {
    "minimind-v": {
        # The language model alone, on text, from nothing (the original MiniMind pretrain: 5e-4, 512 tokens).
        "lm": Stage("lm", uses_images=False, freeze="llm", lr=5e-4, max_seq_len=512, epochs=1, batch_size=32,
                    needs_from=False),
        # Captions: only the projector learns to map image features into the LLM's space (the original: 4e-4, 640).
        "pretrain": Stage("pretrain", uses_images=True, freeze="projector", lr=4e-4, max_seq_len=640, epochs=4,
                          batch_size=16, needs_from=True),
        # Conversations: LLM + projector. The original uses 1e-6 on a well-trained LLM; a model trained here from
        # scratch needs far more to move, and 5e-5 stays well below the pretrain rate.
        "sft": Stage("sft", uses_images=True, freeze="llm", lr=5e-5, max_seq_len=1536, epochs=2, batch_size=8,
                     needs_from=True),
    },
    # The 2026 recipe (UPSTREAM_FORMAT.md): its freeze_llm 2 (pretrain) and 1 (SFT) are our projector and
    # projector+ends; it has no text-only stage of its own.
    "minimind-3v": {
        "pretrain": Stage("pretrain", uses_images=True, freeze="projector", lr=4e-4, max_seq_len=450, epochs=2,
                          batch_size=16, needs_from=True),
        "sft": Stage("sft", uses_images=True, freeze="projector+ends", lr=5e-6, max_seq_len=768, epochs=2,
                     batch_size=4, needs_from=True),
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
