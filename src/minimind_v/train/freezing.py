"""Freezing policies by name: which parts of the VLM learn in a stage.

Freezing is requires_grad=False, and only parameters that still require grad reach the optimizer
(train/optim.py), so a frozen weight can neither move nor cost optimizer memory.

minimind-3v's `freeze_llm` levels are three of these: 2 = projector, 1 = projector+ends, 0 = llm.
"""

from __future__ import annotations

from typing import Literal, get_args

from torch import nn

from minimind_v.adapters import is_adapter_weight

Policy = Literal["adapter", "projector", "projector+ends", "llm", "all"]
"""adapter: a LoRA adapter alone (the projector frozen too); projector: the projector alone; projector+ends:
also the first and last LLM blocks (embeddings, head and final norm stay frozen); llm: the whole LLM and the
projector; all: also the vision tower."""
POLICIES: tuple[str, ...] = get_args(Policy)


def _set(module: nn.Module, trainable: bool) -> None:
    for param in module.parameters():
        param.requires_grad_(trainable)


def apply_policy(model: nn.Module, policy: str, train_vision: bool, uses_images: bool, lora: bool = False) -> None:
    """Mark what learns under `policy`.

    `train_vision`: the tower learns under every policy (a tower built from scratch, like the tiny
    preset's, is useless frozen). Without images (the lm stage) the projector and the tower never
    see a gradient, so they are frozen whatever the policy says. `lora`: the language model carries a
    LoRA adapter (peft's layers); its own weights stay frozen and only the adapter's learn, whatever the
    policy says of the LLM.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown freezing policy {policy!r} (known: {', '.join(POLICIES)})")
    _set(model, False)
    _set(model.projector, policy != "adapter")
    if policy == "projector+ends":
        _set(model.lm.layers[0], True)
        _set(model.lm.layers[-1], True)
    if policy in ("llm", "all"):
        _set(model.lm, True)
    vision_learns = uses_images and (policy == "all" or train_vision)
    if not uses_images:
        _set(model.projector, False)
    _set(model.vision, vision_learns)
    if lora:
        for name, param in model.lm.named_parameters():
            param.requires_grad_(is_adapter_weight(name))
    # A weight the features never reach gets no gradient: trainable, it would break DDP and waste optimizer state.
    for param in model.vision.unused_by_features():
        param.requires_grad_(False)
    # The tower runs without autograd and in eval mode while `frozen`; it must agree with requires_grad.
    model.vision.frozen = not vision_learns


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameters, a tied tensor counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
