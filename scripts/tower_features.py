"""How much of a quickstart tower's patch features says where the patch is, against what it shows.

    python scripts/tower_features.py RUN [RUN ...]     # RUN: a quickstart OUT (its vision/ and data/qa/)

Prints, over the first 1,000 training images: the share of the features' variance that the per-patch mean
carries (the place), and how far apart the mean features of big and small objects, and of the five colours,
lie once that mean is taken away. docs/experiments.md ("The tower names each cell's place") has the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from minimind_v.data.synth.tower import world_tower_data
from minimind_v.errors import UserError
from minimind_v.model.vision import VisionTower
from minimind_v.presets import get_preset


def report(run: Path, n: int = 1000) -> dict[str, float]:
    cfg = get_preset("tiny").vision
    tower = VisionTower(dataclasses.replace(cfg, freeze=True, init=None), source=str(run / "vision"))
    pixels, labels = world_tower_data(run / "data" / "qa" / "train.jsonl", n, cfg.image_size, places=False)
    with torch.no_grad():
        features = tower(pixels)  # (images, patches, width)
    per_patch = features.mean(0, keepdim=True)
    total = features.var(dim=(0, 1), unbiased=False).sum()
    place = ((per_patch - features.mean((0, 1), keepdim=True)) ** 2).mean((0, 1)).sum()
    rest = features - per_patch
    color, size = labels.names.index("color"), labels.names.index("size")
    size_gap = (rest[labels.targets[:, size] == 2].mean(0) - rest[labels.targets[:, size] == 1].mean(0)).norm()
    colors = torch.stack([rest[labels.targets[:, color] == k].mean(0) for k in range(1, labels.classes[color])])
    return {"place_share": round((place / total).item(), 3), "size_gap": round(size_gap.item(), 2),
            "color_spread": round(colors.std(0).norm().item(), 2)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="quickstart OUT directories (their vision/ and data/qa/)")
    for run in parser.parse_args().runs:
        if not (run / "vision").is_dir() or not (run / "data" / "qa" / "train.jsonl").is_file():
            parser.exit(2, f"error: {UserError(f'{run}: not a quickstart OUT (needs vision/ and data/qa/train.jsonl)')}\n")
        print(run, report(run))
