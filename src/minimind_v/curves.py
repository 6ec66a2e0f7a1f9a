"""Accuracy against time: every checkpoint of a run evaluated on held-out data, and the pictures of it.

A checkpoint's minute is its run's training time at the save (state.json's `elapsed`) after the
minute training began, so the curve needs no file times and survives a copy of the run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from minimind_v.train.metrics import save_figure


def checkpoint_engines(run_dir: Path) -> list[tuple[Path, Any]]:
    """An engine per saved checkpoint of a run: the run's final model with the checkpoint's weights."""
    from minimind_v.infer.engine import Engine
    from minimind_v.train import checkpoint

    engines = []
    for path in sorted(checkpoint.checkpoint_root(run_dir).glob("step-*")):
        engine = Engine.load(run_dir / "model", "cpu")
        checkpoint.load_for_inference(path, engine.model)
        engines.append((path, engine))
    return engines


def curve_point(stage: str, step: int, minutes: float, report: dict[str, Any]) -> dict[str, Any]:
    """One point of the accuracy curve: an evaluation report's exact match (all, short, long) at a minute."""
    return {"stage": stage, "step": step, "minutes": round(minutes, 3), "exact_match": report["exact_match"],
            "short": report["short"]["exact_match"], "long": report["long"]["exact_match"]}


def accuracy_curve(run_dir: Path, test: Path, limit: int, began_min: float) -> list[dict[str, Any]]:
    """Held-out exact match at every checkpoint of the run in `run_dir`, whose training began at `began_min`."""
    from minimind_v.evaluate import evaluate
    from minimind_v.train.checkpoint import read_state

    points = []
    for path, engine in checkpoint_engines(run_dir):
        report, _ = evaluate(run_dir / "model", test, limit=limit, engine=engine)
        state = read_state(path)
        points.append(curve_point(run_dir.name, state["step"], began_min + state["elapsed"] / 60, report))
    return points


def plot_curves(points: list[dict[str, Any]], metrics: list[dict[str, Any]], began_min: float, out: Path,
                title: str) -> None:
    """OUT/accuracy.png (exact match against minutes) and OUT/loss.png (the training loss against minutes;
    training began `began_min` minutes in)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, label in (("short", "short answers"), ("long", "descriptions"), ("exact_match", "all")):
        xy = [(p["minutes"], 100 * p[key]) for p in points if p[key] is not None]
        if xy:
            ax.plot(*zip(*xy), "o-", label=label, markersize=4)
    ax.set(xlabel="minutes since the start", ylabel="held-out exact match (%)", ylim=(0, 100),
           title=f"{title}: accuracy against time")
    save_figure(fig, ax, out / "accuracy.png")

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    xy = [(began_min + r["elapsed"] / 60, r["loss"]) for r in metrics if "loss" in r]
    if xy:
        ax.plot(*zip(*xy), label="training loss", linewidth=1.2)
    ax.set(xlabel="minutes since the start", ylabel="cross-entropy per answer token", yscale="log",
           title=f"{title}: training loss")
    save_figure(fig, ax, out / "loss.png")
