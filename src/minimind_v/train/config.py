"""The training config: every knob that decides a run's result, one typed field each.

`minimind-v train`'s flags are these fields (options.py derives them); `--set key=value` reaches
every field, the model's included (`--set model.lm.hidden_size=256 --set warmup_steps=50`). A field
left unset (None) takes the stage's default (train/stages.py) in `for_stage`. The resolved config
is stored in each checkpoint, and a resumed run must agree with it, except in RESUMABLE_CHANGES.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from minimind_v.data.augment import ChatAugmentation
from minimind_v.errors import UserError
from minimind_v.model.config import VLMConfig
from minimind_v.options import flag_name
from minimind_v.train.freezing import Policy
from minimind_v.train.stages import Recipe, get_stage

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The language model's linear layers a LoRA adapter can wrap: attention, and the (expert) SwiGLU MLPs."""

RESUMABLE_CHANGES = frozenset({"max_steps", "epochs", "max_bad_fraction", "accumulation_steps", "dtype"})
"""Fields a resumed run may change (train longer, tolerate more, another memory trade-off); the rest would
make it a different run. The batch size stays: the data position counts batches of the epoch's plan."""


@dataclass
class LoraSettings:
    """A LoRA adapter (peft) on the language model: its own weights frozen, a low-rank update learns instead."""

    lora_rank: int = 0
    """LoRA rank r: train an adapter of rank r on the LLM's linear layers (their weights frozen; the projector and
    tower learn as --freeze says); 0: no adapter."""
    lora_alpha: int | None = None
    """LoRA alpha: the update is scaled by alpha / rank (default: 2 * rank)."""
    lora_targets: str = ",".join(LORA_TARGETS)
    """Comma-separated LLM layers the adapter wraps, in every block (and every MoE expert)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input."""
    lora_tokens: str = ""
    """Comma-separated words whose embedding rows also learn (every token of each, as written at a line's start and
    after a space; the output head's rows with them, tied): for answers in words the base model never learned to
    write, which the low-rank layers alone cannot."""
    lora_plus: float = 1.0
    """LoRA+: the adapter's B matrices learn at this multiple of --lr, its A matrices at --lr (the LoRA+ paper uses
    16); 1: one rate for all."""


@dataclass
class TrainConfig:
    stage: Literal["lm", "pretrain", "sft", "dpo"]
    """lm: the language model on text, from nothing; pretrain: captions, projector only; sft: conversations, LLM + projector;
    dpo: preference pairs (a prompt, a chosen and a rejected answer), against the starting model."""
    recipe: Recipe = "minimind-v"
    """Whose stage defaults: minimind-v (the 2025 recipe) or minimind-3v (2026: pretrain 2 epochs of 450 tokens;
    SFT lr 5e-6, batch 4, 768 tokens, projector+ends); train/stages.py holds them."""
    lr: float | None = None
    """Peak learning rate (default: the stage's, times sqrt(k) where --batch-size x --accumulation-steps x
    processes is k times the samples per step it was set for)."""
    batch_size: int | None = None
    """Samples per micro-batch per process (default: the stage's); with --tokens-per-step, the most a batch holds."""
    tokens_per_step: int | None = None
    """Batches by a token budget instead of a sample count: each process's micro-batches hold as many
    length-grouped samples as fit this many tokens per optimizer step once padded (rows x padded width, split
    evenly over --accumulation-steps). Short samples then come in bigger batches and long ones in smaller, so
    every step does about the same work. Not with --packing (its rows are the budget)."""
    max_seq_len: int | None = None
    """Longest sample in tokens; longer ones lose trailing turns or are skipped (default: the stage's)."""
    epochs: int | None = None
    """Passes over the data (default: the stage's)."""
    freeze: Policy | None = None
    """What learns (default: the stage's): adapter (a LoRA adapter alone, the projector frozen too) | projector |
    projector+ends (+ first and last LLM blocks) | llm (+ projector) | all (+ vision tower); train/freezing.py
    applies them."""
    accumulation_steps: int = 1
    """Micro-batches per optimizer step; the loss is normalised over all their supervised tokens."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (the schedule then spans exactly these)."""
    max_minutes: float | None = None
    """Stop (saving the model) once the training loop has run this long; a run that would not finish its steps in
    time decays its learning rate on the clock instead, so it still ends at the schedule's floor."""
    seed: int = 42
    """Seeds initialisation, data order and dropout; the same seed gives the same run."""
    warmup_steps: int | None = None
    """Linear warmup to the peak (default: 2% of all steps)."""
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
    batching: Literal["random", "grouped", "packed"] = field(default="grouped", metadata={"shortcuts": {
        "packing": ("packed", "Pack several samples into each row of max_seq_len tokens (no padding)"),
        "group_by_length": ("grouped", "Batch samples of similar length together (less padding)")}})
    """grouped: similar lengths per batch, batches in random order (little padding: every padded token is computed
    for nothing); random: shuffled samples; packed: samples packed into rows."""
    dtype: Literal["auto", "fp32", "fp32-strict", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on CUDA, fp32 elsewhere; fp32 on CUDA multiplies on TF32 tensor cores (fp32-strict: in
    full fp32); fp16 uses a gradient scaler."""
    max_bad_fraction: float = 0.01
    """Share of unusable samples (broken image, malformed record, too long) above which the run stops, exit 2."""
    augment: ChatAugmentation = field(default_factory=ChatAugmentation, metadata={"inline": True})
    """The 3v recipe's random edits of training conversations (--system-prompt-ratio, --drop-empty-think-ratio)."""
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"inline": True})
    """LoRA instead of training the language model's weights (--lora-rank, --lora-alpha, --lora-targets,
    --lora-dropout, --lora-tokens, --lora-plus)."""
    dpo_beta: float = 0.1
    """DPO's beta: an answer's reward is beta times its log-probability gain over the starting model; larger keeps
    the model closer to where it started."""
    dpo_sft_weight: float = 0.0
    """DPO: add this times the chosen answer's cross-entropy per token to each pair's loss (RPO; LLaMA-Factory's
    pref_ftx), so the chosen answers stay likely while the margin grows; 0: plain DPO."""
    feature_cache: bool | None = None
    """Encode each image once with the frozen tower and train on the stored features (default: on when the tower
    is frozen)."""
    feature_cache_dtype: Literal["int8", "float16"] = "int8"
    """How cached features are stored: int8 with one scale per patch (half the disk; the loss matches fp16's,
    docs/experiments.md) or float16."""
    model: VLMConfig = field(default_factory=VLMConfig, metadata={"cli": False})
    """The model (from the preset, or from --from; --set model.KEY=VALUE changes it)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def tower_learns(self) -> bool:
        """The vision tower gets gradients (and so cannot be cached)."""
        return get_stage(self.stage, self.recipe).uses_images and (self.freeze == "all" or not self.model.vision.freeze)


def for_stage(cfg: TrainConfig, processes: int = 1) -> TrainConfig:
    """`cfg` with every unset field at the stage's default, checked; what a run trains with and records.
    `processes`: how many share each optimizer step (the default rate is for the samples of the whole step)."""
    stage = get_stage(cfg.stage, cfg.recipe)
    defaults = {name: getattr(stage, name) for name in ("batch_size", "max_seq_len", "epochs", "freeze")}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})
    if cfg.lr is None:
        # A batch_size or accumulation_steps below 1 is refused by check() below, not scaled by.
        samples = max(1, cfg.batch_size) * max(1, cfg.accumulation_steps) * processes
        cfg = dataclasses.replace(cfg, lr=stage.default_lr(samples, lora=cfg.lora.lora_rank > 0))
    if cfg.freeze == "all" and cfg.model.vision.freeze:
        # A tower that learns must travel with the model directory, not be referenced by hub id.
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, vision=dataclasses.replace(cfg.model.vision, freeze=False)))
    if cfg.feature_cache is None:
        cfg = dataclasses.replace(cfg, feature_cache=stage.uses_images and not cfg.tower_learns)
    if cfg.lora.lora_rank > 0 and cfg.lora.lora_alpha is None:
        cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, lora_alpha=2 * cfg.lora.lora_rank))
    check(cfg)
    return cfg


def check(cfg: TrainConfig) -> None:
    """One line naming the flag for a value no run can use."""
    for name in ("batch_size", "max_seq_len", "epochs", "max_steps", "accumulation_steps"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise UserError(f"{flag_name(name)} {value}: must be at least 1")
    if cfg.max_minutes is not None and cfg.max_minutes <= 0:
        raise UserError(f"--max-minutes {cfg.max_minutes}: must be positive")
    if cfg.tokens_per_step is not None:
        if cfg.tokens_per_step < cfg.accumulation_steps:
            raise UserError(f"--tokens-per-step {cfg.tokens_per_step}: must be at least 1 per accumulation step")
        if cfg.batching == "packed":
            raise UserError("--tokens-per-step: packed batches are already budgeted (batch_size rows of "
                            "max_seq_len); use --batching grouped or random")
    if cfg.lr is not None and cfg.lr < 0:
        raise UserError(f"--lr {cfg.lr}: must not be negative")
    if not 0 <= cfg.max_bad_fraction <= 1:
        raise UserError(f"--max-bad-fraction {cfg.max_bad_fraction}: must be between 0 and 1")
    check_lora(cfg.lora)
    if cfg.freeze == "adapter" and cfg.lora.lora_rank == 0:
        raise UserError("--freeze adapter: trains a LoRA adapter alone; give --lora-rank")
    if cfg.dpo_beta <= 0:
        raise UserError(f"--dpo-beta {cfg.dpo_beta}: must be positive")
    if cfg.dpo_sft_weight < 0:
        raise UserError(f"--dpo-sft-weight {cfg.dpo_sft_weight}: must not be negative")
    if cfg.stage == "dpo" and cfg.batching == "packed":
        raise UserError("--batching packed: DPO compares each pair's two answers row by row; use random or grouped")
    if cfg.feature_cache and cfg.tower_learns:
        raise UserError(f"--feature-cache: the tower learns under --freeze {cfg.freeze}, so its features "
                        "cannot be stored once")


def check_lora(lora: LoraSettings) -> None:
    if lora.lora_rank < 0:
        raise UserError(f"--lora-rank {lora.lora_rank}: must not be negative (0: no adapter)")
    if lora.lora_alpha is not None and lora.lora_alpha <= 0:
        raise UserError(f"--lora-alpha {lora.lora_alpha}: must be positive")
    if not lora.lora_plus > 0:
        raise UserError(f"--lora-plus {lora.lora_plus}: must be positive (1: the B matrices at --lr)")
    if lora.lora_plus != 1 and lora.lora_rank == 0:
        raise UserError(f"--lora-plus {lora.lora_plus}: scales a LoRA adapter's rate; give --lora-rank too")
    if not 0 <= lora.lora_dropout < 1:
        raise UserError(f"--lora-dropout {lora.lora_dropout}: must be at least 0 and below 1")
    if lora_words(lora) and lora.lora_rank == 0:
        raise UserError(f"--lora-tokens {lora.lora_tokens!r}: retrains embedding rows of a LoRA adapter; give "
                        f"--lora-rank too")
    unknown = [t for t in lora_targets(lora) if t not in LORA_TARGETS]
    if unknown or not lora_targets(lora):
        raise UserError(f"--lora-targets {lora.lora_targets!r}: expected some of {', '.join(LORA_TARGETS)}")


def lora_targets(lora: LoraSettings) -> list[str]:
    return _comma_list(lora.lora_targets)


def lora_words(lora: LoraSettings) -> list[str]:
    return _comma_list(lora.lora_tokens)


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return max(1, round(0.02 * total_steps))


def resume_conflicts(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Settings of the current command that differ from the checkpoint's run, as 'key: saved -> now'. A setting
    a checkpoint predates counts as its default then, so adding a knob never strands a run."""
    defaults = _flatten(json.loads(json.dumps(TrainConfig(stage=current["stage"]).to_dict())))
    before, now = {**defaults, **_flatten(saved)}, _flatten(current)
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
