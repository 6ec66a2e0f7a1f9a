"""Supervised tower pretraining (data/synth/tower.py): the tower learns what covers each patch, and is saved loadable."""

import dataclasses

import numpy as np
import pytest
import torch

from minimind_v.data import synth
from minimind_v.data.images import ImagePreprocessor
from minimind_v.data.synth.tower import PatchLabels, pretrain_tower, world_labels
from minimind_v.model.vision import VisionTower
from minimind_v.modeldir import save_tower
from minimind_v.presets import get_preset


def _world(n):
    samples = [synth.make_sample(7, "train", i, kind="caption") for i in range(n)]
    preprocess = ImagePreprocessor.for_image_size(48)
    pixels = torch.from_numpy(np.stack([preprocess.array(s.image) for s in samples]))
    return pixels, world_labels([s.scene for s in samples])


def test_tower_learns_each_cell_and_reloads(tmp_path):
    torch.manual_seed(0)
    pixels, labels = _world(600)
    cfg = get_preset("tiny").vision
    tower = VisionTower(cfg)
    untrained = pretrain_tower(VisionTower(cfg), pixels, labels, steps=0, held_out=150)
    report = pretrain_tower(tower, pixels, labels, steps=150, held_out=150)
    # Chance is 1/5 colours, 1/4 shapes, 1/2 sizes; 150 steps of batch 32 reach far beyond it.
    assert report.held_out_accuracy["color"] > 0.9 and report.held_out_accuracy["size"] > 0.9
    assert report.held_out_accuracy["shape"] > max(0.5, untrained.held_out_accuracy["shape"] + 0.2)
    assert report.held_out_accuracy["cell"] > 0.95
    save_tower(tower, tmp_path, cfg.image_size)
    frozen = VisionTower(dataclasses.replace(cfg, freeze=True, init=None), source=str(tmp_path / "vision"))
    assert frozen.frozen and not any(p.requires_grad for p in frozen.parameters())
    with torch.no_grad():
        assert torch.allclose(frozen(pixels[:4]), tower(pixels[:4]), atol=1e-5)


def test_labels_must_match_the_patches():
    pixels, labels = _world(8)
    bad = PatchLabels(labels.names, labels.classes, labels.targets[:, :, :4])
    with pytest.raises(ValueError, match="do not match"):
        pretrain_tower(VisionTower(get_preset("tiny").vision), pixels, bad, steps=1)


def test_every_patch_is_labelled_with_its_cell_empty_or_not():
    scene = (synth.SceneObject(0, 2, "red", "circle", "big"), synth.SceneObject(2, 1, "blue", "square", "small"))
    labels = world_labels([scene, ()])
    cell = labels.names.index("cell")
    assert labels.targets[:, cell].tolist() == [list(range(1, 10))] * 2 and labels.classes[cell] == 10
    assert world_labels([scene], places=False).names == tuple(synth.CELL_LABELS)
    color = labels.names.index("color")
    assert labels.targets[0, color].tolist() == [0, 0, 1, 0, 0, 0, 0, 3, 0] and not labels.targets[1, color].any()
