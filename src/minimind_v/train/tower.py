"""Supervised pretraining of a vision tower built from scratch: every patch names what covers it.

A tower trained only through a language model that is itself learning from scratch gets a weak,
mixed signal: in the synthetic world's experiments (scripts/probe_world.py, 4,000 steps) colour
came through but shape and size stayed at chance. ViT-B/16, the tower MiniMind-V uses, was itself
first pretrained as a classifier (ImageNet-21k) before CLIP; this is that step at toy scale. Where a
patch is a grid cell of the synthetic world, its labels are the cell's colour, shape, size and
colour-shape pair (0: empty), read from the scene records of the training split; a linear head per
label reads each patch's feature, and the heads are thrown away afterwards. On 2 CPU cores it takes
seconds; the tower is then frozen, as CLIP is in the real recipe, and saved like any Hugging Face tower.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from minimind_v.data import synth
from minimind_v.model.vision import VisionTower


@dataclass
class PatchLabels:
    """What each patch of each image shows, attribute by attribute."""

    names: tuple[str, ...]
    classes: tuple[int, ...]
    """Classes per attribute, 0 (nothing there) included."""
    targets: Tensor
    """(N images, attributes, patches) long."""


@dataclass
class TowerReport:
    steps: int
    seconds: float
    loss: float
    held_out_accuracy: dict[str, float]
    """Per attribute, over the held-out images' patches that show an object."""


def pretrain_tower(tower: VisionTower, pixels: Tensor, labels: PatchLabels, steps: int, batch_size: int = 32,
                   lr: float = 1e-3, held_out: int = 256, seed: int = 0) -> TowerReport:
    """Train `tower` (in place) with a linear head per attribute on its patch features.

    The last `held_out` images are not trained on; the report gives the accuracy on their patches.
    The heads and labels go to the device of `pixels`, which must be the tower's.
    """
    n, patches = pixels.shape[0], tower_patches(tower, pixels)
    if labels.targets.shape[0] != n or labels.targets.shape[2] != patches:
        raise ValueError(f"labels {tuple(labels.targets.shape)} do not match {n} images of {patches} patches")
    held_out = min(held_out, n // 4)
    train_n = n - held_out
    generator = torch.Generator().manual_seed(seed)
    width = tower.model.config.hidden_size
    heads = nn.ModuleList(nn.Linear(width, k) for k in labels.classes).to(pixels.device)
    targets = labels.targets.to(pixels.device)
    tower.requires_grad_(True)
    tower.frozen = False
    tower.train()
    optimizer = torch.optim.AdamW([*tower.parameters(), *heads.parameters()], lr=lr, weight_decay=0.0)
    began, loss = time.perf_counter(), torch.tensor(float("nan"))
    for _ in range(steps):
        batch = torch.randint(0, train_n, (batch_size,), generator=generator)
        features = tower(pixels[batch])
        target = targets[batch.to(pixels.device)]
        loss = sum(nn.functional.cross_entropy(head(features).flatten(0, 1), target[:, k].flatten())
                   for k, head in enumerate(heads))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - began
    tower.eval()
    accuracy = {}
    with torch.no_grad():
        features = tower(pixels[train_n:])
        target = targets[train_n:]
        occupied = target[:, 0] > 0
        for k, (name, head) in enumerate(zip(labels.names, heads)):
            right = (head(features).argmax(-1) == target[:, k])[occupied]
            accuracy[name] = round(right.float().mean().item(), 4) if right.numel() else float("nan")
    return TowerReport(steps, round(seconds, 2), round(loss.item(), 4), accuracy)


def world_labels(scenes: list[synth.Scene]) -> PatchLabels:
    """The synthetic world's labels (data/synth.py CELL_LABELS) for these scenes, one image each."""
    targets = torch.tensor([synth.cell_labels(scene) for scene in scenes])
    return PatchLabels(tuple(synth.CELL_LABELS), tuple(1 + len(v) for v in synth.CELL_LABELS.values()), targets)


def tower_patches(tower: VisionTower, pixels: Tensor) -> int:
    with torch.no_grad():
        return tower(pixels[:1]).shape[1]
