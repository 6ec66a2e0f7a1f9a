"""The training config: every knob that decides a run's result, one typed field each (`--set key=value`).

Flags fill it from the stage's defaults; `--set` reaches every field, the model's included
(`--set model.lm.hidden_size=256 --set warmup_steps=50`). It is stored in each checkpoint, and a
resumed run must agree with it, except for the fields in RESUMABLE_CHANGES.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from minimind_v.model.config import VLMConfig

RESUMABLE_CHANGES = frozenset({"max_steps", "epochs", "max_bad_fraction", "accumulation_steps", "dtype"})
"""Fields a resumed run may change (train longer, tolerate more, another memory trade-off); the rest would
make it a different run. The batch size stays: the data position counts batches of the epoch's plan."""


@dataclass
class TrainConfig:
    stage: Literal["lm", "pretrain", "sft"]
    """lm: text only; pretrain: captions, projector; sft: conversations, LLM + projector."""
    lr: float
    """Peak learning rate."""
    batch_size: int
    """Samples per micro-batch per process."""
    max_seq_len: int
    """Longest sample in tokens (longer ones lose trailing turns or are skipped)."""
    epochs: int
    """Passes over the training data."""
    freeze: Literal["projector", "projector+ends", "llm", "all"]
    """What learns: projector | projector+ends (+ first and last LLM blocks) | llm (+ projector) | all (+ vision)."""
    accumulation_steps: int = 1
    """Micro-batches per optimizer step (each process)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (the schedule then spans exactly these)."""
    seed: int = 42
    """Seeds the initialisation, the data order of every epoch and dropout."""
    warmup_steps: int | None = None
    """Linear warmup to the peak; None: 2% of all steps."""
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at lr * min_lr_ratio."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (never on norms, biases, embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    batching: Literal["random", "grouped", "packed"] = "random"
    """random: shuffled; grouped: similar lengths per batch (less padding); packed: samples packed into rows."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on CUDA, fp32 elsewhere; fp16 uses a gradient scaler."""
    max_bad_fraction: float = 0.01
    """Share of unusable samples above which the run stops with exit 2."""
    model: VLMConfig = field(default_factory=VLMConfig)
    """The model (from the preset, or from --from)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return max(1, round(0.02 * total_steps))


def resume_conflicts(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Settings of the current command that differ from the checkpoint's run, as 'key: saved -> now'."""
    before, now = _flatten(saved), _flatten(current)
    return [f"{key}: {before.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(before) | set(now))
            if key not in RESUMABLE_CHANGES and before.get(key) != now.get(key)]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and key != "init" and key != "rope_scaling":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
