"""What a run tells its user: OUT/metrics.jsonl, OUT/train.log, OUT/loss.png and optional trackers.

Only rank 0 creates these objects. Trackers (TensorBoard, W&B, SwanLab) are imported only when
chosen, and a missing package is a one-line error before any training starts.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import time
from pathlib import Path
from typing import Any, TextIO

from minimind_v.errors import UserError
from minimind_v.fileio import atomic_write, atomic_write_text

TRACKERS = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "swanlab": "swanlab"}


def require_tracker(kind: str) -> None:
    """Fail before any work when a chosen tracker is unknown or not installed."""
    if kind not in TRACKERS:
        raise UserError(f"--log-to {kind}: choose from {', '.join(TRACKERS)}")
    if importlib.util.find_spec(kind) is None:
        raise UserError(f"--log-to {kind}: the package is not installed (pip install {kind})")


class Tracker:
    """One experiment tracker behind the same two calls."""

    def __init__(self, kind: str, out: Path, config: dict[str, Any]) -> None:
        require_tracker(kind)
        module = importlib.import_module(TRACKERS[kind])
        self.kind = kind
        if kind == "tensorboard":
            self.run = module.SummaryWriter(log_dir=str(out / "tensorboard"))
        else:  # wandb and swanlab share init(project, config) / log(dict, step) / finish()
            self.run = module.init(project="minimind-v", name=out.name, config=config, dir=str(out))

    def log(self, values: dict[str, float], step: int) -> None:
        if self.kind == "tensorboard":
            for key, value in values.items():
                self.run.add_scalar(key, value, step)
        else:
            self.run.log(values, step=step)

    def close(self) -> None:
        if self.kind == "tensorboard":
            self.run.close()
        else:
            self.run.finish()


class MetricsLog:
    """Appends one JSON object per logging step to OUT/metrics.jsonl and forwards it to the trackers."""

    def __init__(self, out: Path, trackers: list[Tracker], resume_step: int) -> None:
        self.path = out / "metrics.jsonl"
        self.trackers = trackers
        # After an interruption the old run may have logged steps past the checkpoint we resume from.
        self.records = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
        _write_jsonl(self.path, self.records)
        self.file = self.path.open("a", encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        for tracker in self.trackers:
            tracker.log(numbers, record["step"])

    def close(self) -> None:
        self.file.close()
        for tracker in self.trackers:
            tracker.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def plot_loss(records: list[dict[str, Any]], path: Path, title: str, ylabel: str) -> None:
    """The loss curve (and validation points) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    save_figure(fig, ax, path)


def save_figure(fig: Any, ax: Any, path: Path) -> None:
    """A plot's grid and legend (when anything is labelled), written to `path` as a PNG atomically; the figure
    is closed whatever happens."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


class RunLog:
    """OUT/train.log: human-readable lines, also echoed to the console (stderr, off the progress bar)."""

    def __init__(self, out: Path, echo: TextIO | None) -> None:
        self.file = (out / "train.log").open("a", encoding="utf-8")
        self.echo = echo

    def line(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.file.write(f"[{stamp}] {text}\n")
        self.file.flush()
        if self.echo is not None:
            from tqdm import tqdm

            tqdm.write(text, file=self.echo)

    def close(self) -> None:
        self.file.close()
