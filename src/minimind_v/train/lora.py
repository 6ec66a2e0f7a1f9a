"""LoRA in a training run: the adapter `TrainConfig.lora` asks for, injected into the freshly built model.

Under LoRA the language model's own weights stay frozen (train/freezing.py) and the adapter's learn; the
projector and the tower learn as the stage's --freeze policy says. The checkpoints hold what learns, the
adapter included (train/checkpoint.py); OUT/model holds the base and the adapter in adapter/ (modeldir.py).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from minimind_v import adapters
from minimind_v.train.config import TrainConfig, lora_targets, lora_words


def add_adapter(model: nn.Module, cfg: TrainConfig, tokenizer: Any) -> None:
    """Inject the config's adapter (none at rank 0); its A matrices are drawn from torch's seeded generator."""
    lora = cfg.lora
    if lora.lora_rank > 0:
        adapters.inject(model, adapters.lora_config(lora.lora_rank, lora.lora_alpha, lora_targets(lora),
                                                    lora.lora_dropout, token_ids(lora_words(lora), tokenizer)))


def token_ids(words: list[str], tokenizer: Any) -> list[int]:
    """Every token a word is written in, at a line's start and after a space (byte-level BPE spells the two
    differently), the space's own token left out: the rows `--lora-tokens` retrains, sorted."""
    space = set(tokenizer.encode(" ", add_special_tokens=False))
    found: set[int] = set()
    for word in words:
        found.update(tokenizer.encode(word, add_special_tokens=False))
        found.update(set(tokenizer.encode(" " + word, add_special_tokens=False)) - space)
    return sorted(found)


def uses_lora(config: dict[str, Any]) -> bool:
    """Whether a run's saved config (a checkpoint's state.json) trained a LoRA adapter."""
    return config.get("lora", {}).get("lora_rank", 0) > 0


def describe(cfg: TrainConfig) -> str:
    """The adapter, for the log's parameter line ("" without one)."""
    lora = cfg.lora
    if lora.lora_rank == 0:
        return ""
    rows = f" and the embedding rows of {','.join(lora_words(lora))}" if lora_words(lora) else ""
    return f", LoRA rank {lora.lora_rank} alpha {lora.lora_alpha} on {','.join(lora_targets(lora))}{rows}"
