"""One training step of a model, eager against torch.compile, on one batch shape (what `train --compile` gains
where every batch has the same shape).

    python scripts/compile_step.py MODEL_DIR [--threads 2]      # MODEL_DIR: e.g. runs/quickstart/model

Prints one JSON line per (batch size, compiled): the first step's seconds (the compile) and the mean of the next
ten. docs/experiments.md ("torch.compile in the quickstart") has the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from minimind_v.modeldir import load_model
from minimind_v.train.budget import step_batch
from minimind_v.train.config import TrainConfig, for_stage
from minimind_v.train.run import build_optimizer, compile_model
from minimind_v.train.step import Precision, train_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="A model directory (its weights start the timed steps).")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=120, help="Row width of the timed batch.")
    a = p.parse_args()
    if not (Path(a.model) / "config.json").is_file():
        sys.exit(f"{a.model}: not a model directory (no config.json)")
    torch.set_num_threads(a.threads)
    cpu = torch.device("cpu")
    for batch_size in (32, 64):
        for compiled in (False, True):
            torch.manual_seed(0)
            model = load_model(a.model)
            model.train()
            cfg = model.cfg
            optimizer = build_optimizer(model, for_stage(TrainConfig(stage="sft", model=cfg)))
            step_model = compile_model(model, cfg.lm.use_moe, False) if compiled else model
            batch = step_batch(cfg, batch_size, a.tokens, 25 / a.tokens)
            precision = Precision.choose("fp32", cpu)
            began = time.perf_counter()
            train_step(step_model, [batch], optimizer, precision, 1.0, cpu)
            first = time.perf_counter() - began
            train_step(step_model, [batch], optimizer, precision, 1.0, cpu)
            began = time.perf_counter()
            for _ in range(10):
                train_step(step_model, [batch], optimizer, precision, 1.0, cpu)
            print(json.dumps({"threads": a.threads, "batch": batch_size, "tokens": a.tokens, "compiled": compiled,
                              "first_step_s": round(first, 2),
                              "step_s": round((time.perf_counter() - began) / 10, 4)}), flush=True)


if __name__ == "__main__":
    main()
