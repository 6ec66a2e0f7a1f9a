"""Typed configuration of the model. Serialised as the `config.json` of a model directory."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class LMConfig:
    """The MiniMind language model (Llama-style decoder)."""

    vocab_size: int = 6400
    """Tokens in the vocabulary; the embedding and the tied LM head have this many rows."""
    hidden_size: int = 512
    """Width of the residual stream."""
    num_hidden_layers: int = 8
    """Number of decoder blocks."""
    num_attention_heads: int = 8
    """Query heads; head_dim = hidden_size / num_attention_heads."""
    num_key_value_heads: int = 2
    """Key/value heads (grouped-query attention); divides num_attention_heads."""
    intermediate_size: int | None = None
    """SwiGLU width; None means the original's rule 64 * ceil(int(8 * hidden / 3) / 64)."""
    max_position_embeddings: int = 32768
    """Longest sequence the RoPE tables are built for."""
    rope_theta: float = 1e6
    """RoPE base."""
    rope_scaling: dict[str, Any] | None = None
    """YaRN scaling, e.g. {"type": "yarn", "factor": 4, "original_max_position_embeddings": 2048, "beta_fast": 4, "beta_slow": 1}."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    qk_norm: bool = False
    """RMSNorm on queries and keys per head (the 2026 generation); off for the original."""
    qk_norm_gain: float = 1.0
    """Initial weight of the query and key norms (learned afterwards). Normalised, a head's attention logits are at
    most head_dim ** 0.5 times the product of the two weights (5.7 for 32 dims at 1.0), too flat to pick one image
    token out of dozens until the weights grow; a gain g starts that bound at g ** 2 times it. Only the
    initialisation reads it: a trained model's weights hold the scale."""
    dropout: float = 0.0
    """Dropout on embeddings and attention during training."""
    use_moe: bool = False
    """Replace every FFN by a mixture of experts."""
    n_routed_experts: int = 4
    """Routed experts per MoE layer."""
    num_experts_per_tok: int = 2
    """Experts chosen per token (top-k)."""
    n_shared_experts: int = 1
    """Experts every token goes through."""
    norm_topk_prob: bool = True
    """Renormalise the top-k gate weights to sum to 1."""
    aux_loss_alpha: float = 0.1
    """Weight of the load-balancing loss (training only)."""
    seq_aux: bool = True
    """Per-sequence form of the load-balancing loss (2025's); off: over all tokens of the batch (2026's)."""
    numerics: Literal["2025", "2026"] = "2025"
    """Whose numerics where the originals differ: 2026 weights RMSNorm in fp32, renormalises top-1, ramps YaRN."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        return 64 * math.ceil(int(self.hidden_size * 8 / 3) / 64)


CLIP_B16 = "openai/clip-vit-base-patch16"
"""The original's vision tower: CLIP ViT-B/16 on the Hugging Face Hub."""
SIGLIP2_B32_256 = "jingyaogong/siglip2-base-p32-256-ve"
"""minimind-3v's vision tower: the vision half of SigLIP2 ViT-B/32 at 256 px (a SiglipVisionModel), on the Hub."""


@dataclass
class VisionConfig:
    """The vision tower: a Hugging Face CLIP or SigLIP vision model."""

    name_or_path: str = CLIP_B16
    """Hub id or directory of a pretrained tower; "vision" means the model directory's own vision/ folder."""
    init: dict[str, Any] | None = None
    """Build a randomly initialised tower from these Hugging Face config values instead (model_type key required)."""
    hidden_size: int = 768
    """Width of one patch feature."""
    image_size: int = 224
    """Input resolution (square)."""
    num_patches: int = 196
    """Patch features per image after dropping CLS: (image_size / patch_size) ** 2."""
    freeze: bool = True
    """Keep the tower's weights fixed (the original's choice)."""
    position_init_std: float | None = None
    """A tower built from scratch (init): draw its position embeddings with this std instead of the
    Hugging Face default (0.02, tiny next to the patch embedding), so that where a patch sits is
    visible from the first step. None keeps the default."""


@dataclass
class VLMConfig:
    """The whole vision-language model."""

    lm: LMConfig = field(default_factory=LMConfig)
    """The language model."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    """The vision tower."""
    projector: Literal["linear", "mlp"] = "linear"
    """linear: Linear(vision, hidden) with bias (the original); mlp: LayerNorm -> Linear -> GELU -> Linear."""
    image_token: str = "@"
    """Text of the placeholder token; each <image> becomes image_token_len copies of it (at the token level)."""
    image_token_id: int = 34
    """Id of the placeholder token."""
    image_token_len: int = 196
    """Placeholder tokens per image = patch features per image."""
    images_first: bool = False
    """Read each user turn's images before its text, in training and at inference alike, wherever the data or
    the user put them; the answer then cannot depend on the order. Off: as given, as the original's models
    were trained (its SFT data has the image after the text)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VLMConfig":
        """Strict: an unknown key is an error (a config from another tool must not half-load)."""
        data = dict(data)
        lm = _strict(LMConfig, data.pop("lm", {}), "lm")
        vision = _strict(VisionConfig, data.pop("vision", {}), "vision")
        top = _strict(cls, data, "", skip={"lm", "vision"})
        return dataclasses.replace(top, lm=lm, vision=vision)


def _strict(cls: type, data: dict[str, Any], where: str, skip: set[str] = frozenset()) -> Any:
    names = {f.name for f in dataclasses.fields(cls)} - set(skip)
    unknown = set(data) - names
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(f"unknown config key(s): {', '.join(prefix + k for k in sorted(unknown))}")
    return cls(**data)
