"""Supervised pretraining of a vision tower built from scratch: every patch names what covers it.

A tower trained only through a language model that is itself learning from scratch gets a weak,
mixed signal (docs/experiments.md). ViT-B/16, the tower MiniMind-V uses, was itself first pretrained
as a classifier (ImageNet-21k) before CLIP; this is that step at toy scale. Where a patch is a grid
cell of the synthetic world, its labels are the cell's colour, shape, size and colour-shape pair
(0: empty), read from the scene records of the training split, and which cell it is; a linear
head per label reads each patch's feature, and the heads are thrown away afterwards. The tower is then
frozen, as CLIP is in the real recipe, and saved like any Hugging Face tower.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from minimind_v.data.synth.world import CELL_LABELS, GRID, Scene, cell_labels, scene_from_record
from minimind_v.model.vision import VisionTower
from minimind_v.train.optim import build_optimizer
from minimind_v.train.step import Precision, apply_gradients, backward


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
    # Not fused: on CUDA the fused kernel rounds differently, and these steps stay those the tower has always taken.
    optimizer = build_optimizer(nn.ModuleList([tower, heads]), lr, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8,
                                fused=False)
    optimizer.zero_grad(set_to_none=True)  # the first step sees only its own gradients, whatever the tower held
    precision = Precision.choose("fp32", pixels.device)
    began, loss = time.perf_counter(), torch.tensor(float("nan"))
    for _ in range(steps):
        batch = torch.randint(0, train_n, (batch_size,), generator=generator)
        features = tower(pixels[batch])
        target = targets[batch.to(pixels.device)]
        loss = sum(nn.functional.cross_entropy(head(features).flatten(0, 1), target[:, k].flatten())
                   for k, head in enumerate(heads))
        backward(loss, precision)
        apply_gradients(optimizer, precision, grad_clip=0)
    seconds = time.perf_counter() - began
    accuracy = _held_out_accuracy(tower, heads, pixels[train_n:], targets[train_n:], labels.names)
    return TowerReport(steps, round(seconds, 2), round(loss.item(), 4), accuracy)


def _held_out_accuracy(tower: VisionTower, heads: nn.ModuleList, pixels: Tensor, targets: Tensor,
                       names: tuple[str, ...]) -> dict[str, float]:
    """Per attribute, the share of patches showing an object whose head names it right (the tower left in eval)."""
    tower.eval()
    accuracy = {}
    with torch.no_grad():
        features = tower(pixels)
        occupied = targets[:, 0] > 0
        for k, (name, head) in enumerate(zip(names, heads)):
            right = (head(features).argmax(-1) == targets[:, k])[occupied]
            accuracy[name] = round(right.float().mean().item(), 4) if right.numel() else float("nan")
    return accuracy


def world_tower_data(data: Path, n: int, image_size: int, places: bool = True) -> tuple[Tensor, PatchLabels]:
    """The first `n` scenes of a synth jsonl file: their images preprocessed for a tower of `image_size` (read as
    the trainer reads them, wherever the file's image folder is) and their patch labels."""
    from minimind_v.data.formats import open_dataset
    from minimind_v.data.images import ImageFolder, ImagePreprocessor, load_image

    reader = open_dataset(data)
    count = min(n, len(reader))
    with open(data, encoding="utf-8") as f:
        scenes = [scene_from_record(json.loads(line)["scene"]) for line, _ in zip(f, range(count))]
    folder, preprocess = ImageFolder(reader.images_dir), ImagePreprocessor.for_image_size(image_size)
    pixels = np.stack([preprocess.array(load_image(folder.resolve(reader[i].images[0]))) for i in range(count)])
    return torch.from_numpy(pixels), world_labels(scenes, places)


PLACE_LABELS = ("cell",)
"""Where each patch is: its grid cell in reading order (1 + the index; 0 is never used), named for every patch,
empty or not."""


def world_labels(scenes: list[Scene], places: bool = True) -> PatchLabels:
    """The synthetic world's labels for these scenes, one image each: what each cell holds (world.py CELL_LABELS)
    and, with `places`, which cell it is (PLACE_LABELS).

    The place label makes each patch's feature say which cell it is outright. The questions that find an object
    by its name ("where is the red circle?", "is it above the blue square?") read the place off the patch they
    found; from the position embedding alone, trained only as far as it helps name the contents, the language
    model learned that read last. One label for the cell rather than one for its row and one for its column: with
    a row and a column feature, "the object at the top left" also half-matches the rest of its row and column,
    and what is read off the attended patches blurs (docs/experiments.md, "The tower names each cell's place").
    """
    contents = torch.tensor([cell_labels(scene) for scene in scenes])
    content_classes = tuple(1 + len(v) for v in CELL_LABELS.values())
    if not places:
        return PatchLabels(tuple(CELL_LABELS), content_classes, contents)
    where = (1 + torch.arange(GRID * GRID)).expand(len(scenes), 1, GRID * GRID)
    return PatchLabels(tuple(CELL_LABELS) + PLACE_LABELS, content_classes + (1 + GRID * GRID,),
                       torch.cat([contents, where], dim=1))


def tower_patches(tower: VisionTower, pixels: Tensor) -> int:
    with torch.no_grad():
        return tower(pixels[:1]).shape[1]
