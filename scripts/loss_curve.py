"""The quickstart recipe at a fixed step count, fp32, one thread: its loss curves, to compare two versions.

    python scripts/loss_curve.py OUT [STEPS] [KEY=VALUE ...] > curve.json
    python scripts/loss_curve.py --compare A.json B.json     # the largest difference at any logged step

KEY=VALUE pairs override fields of the quickstart's training config (e.g. feature_cache_dtype=float16), for
experiments that change one knob of the recipe.

One thread and a fixed step count take the machine's speed out of the run (the quickstart otherwise picks
its thread count and its steps by timing), so two versions of the code give comparable curves: the tower's
pretraining loss and the trainer's loss at every logged step. docs/experiments.md records the comparison
made for the refactor of train/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from pathlib import Path

import torch


def curve(out: Path, steps: int, overrides: list[str]) -> dict:
    from minimind_v.options import apply_overrides
    from minimind_v.quickstart import QuickstartOptions, Recipe, main
    from minimind_v.train import config
    from minimind_v.train.metrics import read_metrics

    resolve = config.for_stage
    config.for_stage = lambda cfg: resolve(apply_overrides(cfg, overrides))  # the quickstart imports it when it trains

    torch.set_num_threads(1)
    torch.set_num_threads = lambda n: None  # the quickstart's thread choice would make the run machine-dependent
    recipe = dataclasses.replace(Recipe(), steps=steps, qa_samples=1500, tower_samples=600, tower_steps=60,
                                 test_samples=16, curve_samples=8)
    with contextlib.redirect_stdout(sys.stderr):  # the curve alone goes to stdout
        assert main(QuickstartOptions(out=str(out), seed=0, minutes=600.0, recipe=recipe)) == 0
    summary = json.loads((out / "quickstart.json").read_text(encoding="utf-8"))
    records = read_metrics(out / "sft" / "metrics.jsonl")
    return {"tower_loss": summary["tower"]["loss"], "steps": steps,
            "loss": {r["step"]: r["loss"] for r in records if "loss" in r},
            "grad_norm": {r["step"]: r["grad_norm"] for r in records if "grad_norm" in r}}


def compare(a: dict, b: dict) -> float:
    if a["loss"].keys() != b["loss"].keys():
        raise SystemExit(f"logged steps differ: {sorted(a['loss'])} vs {sorted(b['loss'])}")
    worst = max(abs(a["loss"][k] - b["loss"][k]) for k in a["loss"])
    print(f"{len(a['loss'])} logged steps; largest loss difference {worst:.3g}; "
          f"tower loss {a['tower_loss']} vs {b['tower_loss']}")
    return worst


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        a, b = (json.loads(Path(p).read_text()) for p in sys.argv[2:4])
        sys.exit(0 if compare(a, b) <= 1e-6 and a["tower_loss"] == b["tower_loss"] else 1)
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    print(json.dumps(curve(Path(sys.argv[1]), steps, sys.argv[3:]), indent=1))
