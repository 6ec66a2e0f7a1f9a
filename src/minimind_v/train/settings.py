"""What `minimind-v train` reads and writes, and where: the knobs that never change a run's result.

Everything that does change it is a field of TrainConfig (train/config.py), recorded in each
checkpoint; these may differ freely between a run and its resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from minimind_v.train.config import TrainConfig


@dataclass
class RunSettings:
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
    (104M), minimind2-small-v-moe, minimind-3v (2026, 65M), minimind-3v-moe (200M-A65M), tiny (the
    quickstart's); presets.py holds them."""
    tokenizer: str | None = None
    """Tokenizer directory (required for --from none and .pth; default: the --from model directory's)."""
    vision: str | None = None
    """Vision tower directory or hub id, replacing the one the preset or model names."""
    val_data: str | None = None
    """Held-out data for a validation loss (same format; its images from --images)."""
    eval_every: int = 0
    """Validation every N steps (0: only at the end); needs --val-data."""
    save_every: int = 0
    """Checkpoint every N optimizer steps (0: by the clock, every --save-minutes)."""
    save_minutes: float = 10.0
    """With --save-every 0: checkpoint once this many minutes of training have passed since the last one, checked
    at log steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept in OUT/checkpoints."""
    resume: bool = False
    """Continue the run in OUT from its newest checkpoint (any number of processes)."""
    log_every: int = 10
    """Log loss, lr and throughput every N steps."""
    log_to: list[str] = field(default_factory=list, metadata={"metavar": "tensorboard|wandb|swanlab"})
    """Also log to tensorboard, wandb or swanlab (repeatable)."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda, cuda:N, mps."""
    compile: bool = False
    """torch.compile the model (CUDA; the first steps are slow while it compiles), one graph per batch shape."""
    length_buckets: int = 8
    """With --compile: batches padded to one of this many widths (from the data's lengths) and to --batch-size
    rows, so that an epoch compiles at most one graph per width."""
    num_workers: int | None = None
    """DataLoader worker processes (default: 4 on CUDA, 0 on CPU)."""
    feature_cache_dir: str | None = None
    """Where cached features live (default: OUT/feature_cache); share it between stages to encode once."""
    encodings_dir: str | None = None
    """Where the up-front pass keeps each data file's token ids for the next run and every stage (default:
    $MINIMIND_V_CACHE/encodings, else ~/.cache/minimind-v/encodings; none: not kept)."""
    set_: list[str] = field(default_factory=list, metadata={"metavar": "KEY=VALUE"})
    """key=value for any training or model setting, e.g. warmup_steps=50, model.lm.dropout=0.1 (repeatable)."""


@dataclass
class TrainOptions:
    """`minimind-v train`'s flags: the config's fields and the run's settings, each declared once."""

    config: TrainConfig = field(metadata={"inline": True})
    run: RunSettings = field(metadata={"inline": True})
