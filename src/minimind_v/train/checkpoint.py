"""Training checkpoints: everything needed to continue a run bit for bit, written atomically.

OUT/checkpoints/step-00000100/
  trainable.safetensors  the trainable parameters (frozen ones are rebuilt from --from, and checked)
  optimizer.pt           AdamW state, GradScaler state
  rng.pt                 python, numpy, torch and CUDA generator states, one entry per process
  state.json             step, data position (epoch, global samples consumed), counters, config

A checkpoint is written under a temporary name and renamed into place, so a run killed at any
moment leaves either the complete checkpoint or none. The newest `keep` are kept.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from minimind_v.errors import UserError, short_list
from minimind_v.fileio import replace_dir
from minimind_v.train import freezing, lora
from minimind_v.train.stages import get_stage

_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_root(out: Path) -> Path:
    return out / "checkpoints"


def latest(out: Path) -> Path | None:
    """The newest complete checkpoint of the run in `out` (temporary directories never match)."""
    root = checkpoint_root(out)
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return max(found)[1] if found else None


def rng_state() -> dict[str, Any]:
    """This process's generator states, in tensors and plain types (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def frozen_fingerprint(model: nn.Module) -> float:
    """A cheap sum over the frozen weights: resuming on top of other frozen weights would silently differ."""
    total = 0.0
    for p in model.parameters():
        if not p.requires_grad:
            total += float(p.detach().double().abs().sum())
    return total


def save(out: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
         scaler: torch.amp.GradScaler | None, rng_states: list[dict[str, Any]], state: dict[str, Any],
         keep: int) -> Path:
    """Write checkpoint `step` atomically and drop all but the newest `keep`. Call on rank 0 only."""
    root = checkpoint_root(out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.cpu() for k, v in trainable_state(model).items()}, str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None}, tmp / "optimizer.pt")
    torch.save(rng_states, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    replace_dir(tmp, final)  # the same step written again after a resume replaces the old one
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    found = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)))
    for _, path in found[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "state.json").read_text())


def load_trainable(path: Path, model: nn.Module) -> None:
    """Copy checkpoint `path`'s trained weights into `model`; they must be exactly the parameters of `model`
    that require grad, so a checkpoint of another run never half-loads."""
    tensors = load_file(str(path / "trainable.safetensors"))
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise UserError(f"{path}: trainable weights differ from this run's (freezing policy changed?); "
                        f"missing {short_list(missing, 5)}; unexpected {short_list(unexpected, 5)}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


def load_for_inference(path: Path, model: nn.Module) -> None:
    """Checkpoint `path`'s weights into the final model of its run (e.g. to evaluate each checkpoint): what
    learned is chosen by the run's own freezing policy, then loaded strictly; nothing learns afterwards."""
    cfg = read_state(path)["config"]
    freezing.apply_policy(model, cfg["freeze"], train_vision=not cfg["model"]["vision"]["freeze"],
                          uses_images=get_stage(cfg["stage"]).uses_images, lora=lora.uses_lora(cfg))
    load_trainable(path, model)
    model.requires_grad_(False)


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
         scaler: torch.amp.GradScaler | None) -> list[dict[str, Any]]:
    """Restore weights, optimizer and scaler from `path`; returns the per-process RNG states."""
    load_trainable(path, model)
    opt = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(opt["optimizer"])
    if scaler is not None and opt["scaler"] is not None:
        scaler.load_state_dict(opt["scaler"])
    return torch.load(path / "rng.pt", weights_only=True)
