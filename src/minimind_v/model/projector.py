"""The projector: patch features (vision width) -> the language model's embedding space."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn


class Projector(nn.Module):
    """linear: Linear(vision, hidden) with bias, the original's. mlp: LayerNorm -> Linear -> GELU -> Linear."""

    def __init__(self, kind: Literal["linear", "mlp"], vision_dim: int, hidden: int):
        super().__init__()
        if kind == "linear":
            self.net = nn.Sequential(nn.Linear(vision_dim, hidden))
        elif kind == "mlp":
            self.net = nn.Sequential(nn.LayerNorm(vision_dim), nn.Linear(vision_dim, hidden), nn.GELU(),
                                     nn.Linear(hidden, hidden))
        else:
            raise ValueError(f"projector {kind!r}: expected 'linear' or 'mlp'")

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)  # (..., vision_dim) -> (..., hidden)
