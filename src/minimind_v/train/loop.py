"""`minimind-v train`: the one training loop, for every stage.

A stage (lm, pretrain, sft) is a config (train/stages.py), not a script. Single process:
`minimind-v train --stage sft --data sft.jsonl --from runs/pretrain/model --out runs/sft`.
Several GPUs or CPU processes: `torchrun --nproc-per-node 8 -m minimind_v.cli train ...` (same flags).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from minimind_v.data.formats import data_file
from minimind_v.errors import UserError
from minimind_v.options import apply_overrides
from minimind_v.train import build, checkpoint, distributed
from minimind_v.train.config import TrainConfig, resume_conflicts
from minimind_v.train.metrics import require_tracker
from minimind_v.train.session import Session
from minimind_v.train.stages import get_stage


@dataclass
class TrainOptions:
    stage: Literal["lm", "pretrain", "sft"]
    """lm: the language model on text, from nothing; pretrain: captions, projector only; sft: conversations, LLM + projector."""
    data: str
    """Training data: MiniMind-V or LLaVA jsonl/json, parquet, or {"text": ...} lines for the lm stage."""
    out: str
    """Run directory: checkpoints/, metrics.jsonl, train.log, loss.png, and the trained model in OUT/model."""
    images: str | None = None
    """Image folder of --data (default: images/ beside the data file, else its folder)."""
    from_: str | None = field(default=None, metadata={"metavar": "DIR|FILE.pth|none"})
    """Start from a model directory, an original .pth, or none (random; the lm stage's default)."""
    preset: str = "minimind2-small-v"
    """Model shapes for --from none or an original .pth: minimind2-small-v (the original's 26M), minimind2-v
    (104M), minimind2-small-v-moe, tiny (the quickstart's); presets.py holds them."""
    tokenizer: str | None = None
    """Tokenizer directory (required for --from none and .pth; default: the --from model directory's)."""
    vision: str | None = None
    """Vision tower directory or hub id, replacing the one the preset or model names."""
    batch_size: int | None = None
    """Samples per micro-batch per process (default: the stage's)."""
    lr: float | None = None
    """Peak learning rate (default: the stage's)."""
    max_seq_len: int | None = None
    """Longest sample in tokens (default: the stage's)."""
    accumulation_steps: int = 1
    """Micro-batches per optimizer step; the loss is normalised over all their supervised tokens."""
    epochs: int | None = None
    """Passes over the data (default: the stage's)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps."""
    max_minutes: float | None = None
    """Stop (saving the model) once the training loop has run this long; a run that would not finish its steps in
    time decays its learning rate on the clock instead, so it still ends at the schedule's floor."""
    seed: int = 42
    """Seeds initialisation, data order and dropout; the same seed gives the same run."""
    freeze: Literal["projector", "projector+ends", "llm", "all"] | None = None
    """What learns (default: the stage's): projector | projector+ends | llm (+ projector) | all (+ vision tower)."""
    packing: bool = False
    """Pack several samples into each row of max_seq_len tokens (no padding)."""
    group_by_length: bool = False
    """Batch samples of similar length together (less padding, same samples per epoch)."""
    val_data: str | None = None
    """Held-out data for a validation loss (same format; its images from --images)."""
    eval_every: int = 0
    """Validation every N steps (0: only at the end); needs --val-data."""
    save_every: int = 500
    """Checkpoint every N optimizer steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept in OUT/checkpoints."""
    resume: bool = False
    """Continue the run in OUT from its newest checkpoint (any number of processes)."""
    max_bad_fraction: float = 0.01
    """Share of unusable samples (broken image, malformed record, too long) above which the run stops, exit 2."""
    log_every: int = 10
    """Log loss, lr and throughput every N steps."""
    log_to: list[str] = field(default_factory=list, metadata={"metavar": "tensorboard|wandb|swanlab"})
    """Also log to tensorboard, wandb or swanlab (repeatable)."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda, cuda:N, mps."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on CUDA, fp32 elsewhere."""
    compile: bool = False
    """torch.compile the model (CUDA; the first steps are slow while it compiles)."""
    num_workers: int | None = None
    """DataLoader worker processes (default: 4 on CUDA, 0 on CPU)."""
    feature_cache: bool | None = None
    """Encode each image once with the frozen tower and reuse the features (default: on when the tower is frozen)."""
    feature_cache_dir: str | None = None
    """Where cached features live (default: OUT/feature_cache); share it between stages to encode once."""
    set_: list[str] = field(default_factory=list, metadata={"metavar": "KEY=VALUE"})
    """key=value for any training or model setting, e.g. warmup_steps=50, model.lm.dropout=0.1 (repeatable)."""


def main(opts: TrainOptions) -> int:
    _check_options(opts)
    info = distributed.setup(opts.device)
    try:
        Session(opts, info, *prepare(opts)).run()
    finally:
        distributed.teardown()
    return 0


def _check_options(opts: TrainOptions) -> None:
    if opts.max_minutes is not None and opts.max_minutes <= 0:
        raise UserError(f"--max-minutes {opts.max_minutes}: must be positive")
    for name in ("batch_size", "max_seq_len", "epochs", "max_steps"):
        value = getattr(opts, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    if opts.accumulation_steps < 1:
        raise UserError(f"--accumulation-steps {opts.accumulation_steps}: must be at least 1")
    if not 0 <= opts.max_bad_fraction <= 1:
        raise UserError(f"--max-bad-fraction {opts.max_bad_fraction}: must be between 0 and 1")
    for kind in opts.log_to:
        require_tracker(kind)
    if opts.eval_every and not opts.val_data:
        raise UserError("--eval-every needs --val-data")
    # The inputs exist before anything is built or written: a mistyped path costs nothing.
    data_file(opts.data)
    if opts.val_data:
        data_file(opts.val_data, "--val-data")
    if opts.images is not None and not Path(opts.images).is_dir():
        raise UserError(f"--images {opts.images}: no such folder")


def train_config(opts: TrainOptions, model_cfg: Any) -> TrainConfig:
    """Flags over the stage's defaults, then --set over everything."""
    stage = get_stage(opts.stage)
    batching = "packed" if opts.packing else "grouped" if opts.group_by_length else "random"
    cfg = TrainConfig(
        stage=opts.stage, lr=opts.lr or stage.lr, batch_size=opts.batch_size or stage.batch_size,
        max_seq_len=opts.max_seq_len or stage.max_seq_len, epochs=opts.epochs or stage.epochs,
        freeze=opts.freeze or stage.freeze, accumulation_steps=opts.accumulation_steps, max_steps=opts.max_steps,
        seed=opts.seed, batching=batching, dtype=opts.dtype, max_bad_fraction=opts.max_bad_fraction,
        model=model_cfg)
    cfg = apply_overrides(cfg, opts.set_)
    if cfg.freeze == "all" and cfg.model.vision.freeze:
        # A tower that learns must travel with the model directory, not be referenced by hub id.
        cfg = apply_overrides(cfg, ["model.vision.freeze=false"])
    return cfg


def prepare(opts: TrainOptions) -> tuple[TrainConfig, build.Start, Path | None]:
    """The run's config and starting point; on --resume also the checkpoint, checked against the config."""
    stage = get_stage(opts.stage)
    from_ = opts.from_ or ("none" if not stage.needs_from else None)
    if from_ is None:
        raise UserError(f"--stage {opts.stage} starts from a trained model: give --from DIR (or a .pth, or none)")
    start = build.resolve_start(from_, opts.preset, opts.tokenizer, opts.vision)
    cfg = train_config(opts, start.cfg)
    resume_from = None
    if opts.resume:
        resume_from = checkpoint.latest(Path(opts.out))
        if resume_from is None:
            raise UserError(f"--resume: no checkpoint in {Path(opts.out) / 'checkpoints'}")
        saved = checkpoint.read_state(resume_from)["config"]
        conflicts = resume_conflicts(saved, json.loads(json.dumps(cfg.to_dict())))
        if conflicts:
            raise UserError(f"--resume: this command differs from the run in {opts.out}: {'; '.join(conflicts[:4])}")
    elif checkpoint.latest(Path(opts.out)) is not None:
        raise UserError(f"--out {opts.out}: already holds a run; add --resume to continue it, or pick a new --out")
    return cfg, start, resume_from
