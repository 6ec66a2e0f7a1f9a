"""AdamW over the trainable parameters only, and the learning-rate schedule as a pure function of the step."""

from __future__ import annotations

import math

import torch
from torch import nn


def _no_decay_ids(model: nn.Module) -> set[int]:
    """Norm weights, biases and embeddings: decaying them only pulls useful scales toward zero."""
    ids: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith("Norm")
        if is_norm or isinstance(module, nn.Embedding):
            ids.update(id(p) for p in module.parameters(recurse=False))
    # A tied LM head is the embedding itself, so it is caught above by identity.
    ids.update(id(p) for p in model.parameters() if p.ndim < 2)
    return ids


def param_groups(model: nn.Module, weight_decay: float, lora_plus: float = 1.0) -> list[dict]:
    """AdamW groups of trainable parameters: with and without weight decay (frozen ones never enter); with
    `lora_plus` != 1 the adapter's B matrices in groups of their own, whose "lr_scale" set_lr applies."""
    no_decay = _no_decay_ids(model)
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():  # yields a tied tensor once
        if param.requires_grad:
            scale = lora_plus if "lora_B" in name else 1.0
            groups.setdefault((id(param) in no_decay, scale), []).append(param)
    return [{"params": params, "weight_decay": 0.0 if plain else weight_decay, "lr_scale": scale}
            for (plain, scale), params in sorted(groups.items())]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float, fused: bool = True, lora_plus: float = 1.0) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of `model`; `fused`: the one-launch kernel where the parameters
    are on CUDA (it exists for CUDA tensors only); `lora_plus`: the B matrices' rate as a multiple of `lr`."""
    groups = param_groups(model, weight_decay, lora_plus)
    if not groups:
        raise ValueError("no trainable parameters: the freezing policy left nothing to train")
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=(fused and on_cuda) or None)
    set_lr(optimizer, lr)
    return optimizer


def lr_at(step: int, peak: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning rate of optimizer step `step` (0-based) of `total_steps`.

    Linear warmup reaches exactly `peak` at step warmup_steps - 1 (and stays there at step warmup_steps),
    then a half cosine falls to exactly `peak * min_lr_ratio` at the last step.
    """
    floor = peak * min_lr_ratio
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    weight = 0.5 * (1.0 + math.cos(math.pi * progress))  # exactly 1 at the start, exactly 0 at the end
    return peak * weight + floor * (1.0 - weight)  # this form hits both ends exactly in floating point


def schedule_step(step: int, first_step: int, total_steps: int, clock_used: float) -> int:
    """The step to read the schedule at when a share `clock_used` of the time limit has passed since `first_step`:
    the later of the step itself and the step the clock points to (the steps left scaled by the time used)."""
    by_clock = first_step + min(1.0, max(0.0, clock_used)) * (total_steps - first_step)
    return max(step, min(int(by_clock), total_steps - 1))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group at `lr` times its "lr_scale" (param_groups: LoRA+'s B matrices)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
