"""VisionTower: a Hugging Face CLIP, SigLIP or SigLIP2 vision model turned into patch features.

CLIP gives last_hidden_state without its CLS token (no post-layernorm, no projection), as the
original MiniMind-V; SigLIP has no CLS token, so its last_hidden_state is used whole, post-layernorm
included, as minimind-3v. Frozen by default: no gradients, and eval mode kept even while the VLM trains.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from transformers import AutoConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from minimind_v.model.config import VisionConfig

FAMILIES: dict[str, str] = {
    "clip": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "siglip2": "Siglip2VisionModel",
}
"""Each family's transformers class, by name: importing one family's modelling code takes seconds, so only the
family a run uses is imported (`family_class`)."""


def family_class(family: str) -> type[PreTrainedModel]:
    import transformers

    return getattr(transformers, FAMILIES[family])
# The modules of each family's vision model that the features never pass through: CLIP's features are read before
# its post-layernorm; SigLIP's after it, and SigLIP's pooling head only makes the pooled output.
UNUSED_BY_FEATURES: dict[str, tuple[str, ...]] = {
    "clip": ("post_layernorm",),
    "siglip": ("head",),
    "siglip2": ("head",),
}


class TowerConfigError(ValueError):
    """A tower config this module cannot build from; the message names the value at fault."""


class TowerUnavailable(OSError):
    """A pretrained tower that cannot be loaded from its source (absent, offline, unreadable); the message
    names the source. Callers that know where the source came from add how to fix it."""


def family_of(model_type: str) -> str:
    """'clip_vision_model' or 'clip' -> 'clip'; TowerConfigError for an unsupported type."""
    family = model_type.removesuffix("_vision_model")
    if family not in FAMILIES:
        raise TowerConfigError(f"vision tower model_type {model_type!r}: supported are CLIP, SigLIP and SigLIP2")
    return family


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig, source: str | None = None):
        """Build from `source` (a directory or hub id; default cfg.name_or_path) or, with no source
        and cfg.init set, randomly from cfg.init."""
        super().__init__()
        self.source = source if source is not None or cfg.init is not None else cfg.name_or_path
        if self.source is None:
            init = dict(cfg.init)
            self.family = family_of(init.get("model_type", ""))
            config = AutoConfig.for_model(init.pop("model_type"), **init)
            self.model = family_class(self.family)(config)
            if cfg.position_init_std is not None:
                _init_positions(self.model, cfg.position_init_std)
        else:
            self.family, self.model = _load_pretrained(self.source)
        self.frozen = cfg.freeze
        if self.frozen:
            self.model.requires_grad_(False)
            self.model.eval()

    def unused_by_features(self) -> list[nn.Parameter]:
        """The parameters the features do not depend on: they never get a gradient, so they must not train."""
        unused = UNUSED_BY_FEATURES[self.family]
        return [p for name, p in self.model.named_parameters() if name.split(".")[0] in unused]

    def train(self, mode: bool = True) -> "VisionTower":
        # A frozen tower stays in eval mode whatever the VLM around it does (dropout, norms).
        return super().train(mode and not self.frozen)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, n_patches, vision_dim)."""
        pixel_values = pixel_values.to(self.model.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            if self.family == "siglip2":
                hidden = self._siglip2(pixel_values)
            else:
                hidden = self.model(pixel_values=pixel_values).last_hidden_state  # (N, 1? + P, D)
        return hidden[:, 1:] if self.family == "clip" else hidden

    def _siglip2(self, pixel_values: Tensor) -> Tensor:
        # SigLIP2 (NaFlex) takes patches flattened the way its image processor does: (N, P, p*p*C).
        N, C, H, W = pixel_values.shape
        p = self.model.config.patch_size
        h, w = H // p, W // p
        patches = pixel_values.reshape(N, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(N, h * w, p * p * C)
        mask = torch.ones(N, h * w, dtype=torch.long, device=pixel_values.device)
        shapes = torch.tensor([[h, w]] * N, dtype=torch.long, device=pixel_values.device)
        return self.model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes).last_hidden_state


def _init_positions(model: nn.Module, std: float) -> None:
    if not std > 0:
        raise TowerConfigError(f"vision.position_init_std {std}: must be positive")
    tables = [m for name, m in model.named_modules() if name.endswith("position_embedding") and isinstance(m, nn.Embedding)]
    if not tables:
        raise TowerConfigError("vision.position_init_std: this tower has no position embedding table")
    for table in tables:
        nn.init.normal_(table.weight, mean=0.0, std=std)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No per-shard progress bars for a tower of a few hundred MB; restores the caller's setting."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class _HeldLoadReport(logging.Filter):
    """Holds back transformers' per-key LOAD REPORT so that it can be shown only when something is wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.records.append(record)
            return False
        return True


def _load_pretrained(source: str) -> tuple[str, PreTrainedModel]:
    """The vision half of `source`; a full CLIP or SigLIP checkpoint (the hub's usual form) loads too, and its
    text half, which a VLM never uses, is reported in one line instead of transformers' table of its keys."""
    report_logger = logging.getLogger("transformers.modeling_utils")
    held = _HeldLoadReport()
    report_logger.addFilter(held)
    expected_report = False
    try:
        config = AutoConfig.from_pretrained(source)
        family = family_of(config.model_type)
        with quiet_transformers():
            model, info = family_class(family).from_pretrained(source, output_loading_info=True)
        unused = [k for k in info["unexpected_keys"] if not k.startswith("vision_model.")]
        full = not config.model_type.endswith("_vision_model")
        expected_report = full and not (info["missing_keys"] or info["mismatched_keys"] or info["error_msgs"]
                                        or len(unused) < len(info["unexpected_keys"]))
        if full:
            print(f"vision tower {source}: a full {family} checkpoint; its text half ({len(unused)} tensors) is "
                  "not used", file=sys.stderr)
        return family, model
    except TowerConfigError:
        raise
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TowerUnavailable(f"vision tower {source!r} cannot be loaded ({reason})") from None
    finally:
        report_logger.removeFilter(held)
        if not expected_report:
            for record in held.records:
                report_logger.handle(record)
