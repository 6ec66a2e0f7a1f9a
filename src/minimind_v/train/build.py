"""Where a run starts: the tokenizer, the model config and weights (--from), the image preprocessing, the data."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minimind_v import adapters, modeldir
from minimind_v.data import encodings
from minimind_v.data.dataset import DataSettings, VLMDataset
from minimind_v.data.augment import ChatAugmentation
from minimind_v.data.formats import open_dataset
from minimind_v.data.images import ImagePreprocessor
from minimind_v.data.tokenizer import load_tokenizer
from minimind_v.errors import UserError
from minimind_v.model.config import VLMConfig
from minimind_v.modeldir import MiniMindVLM
from minimind_v.presets import get_preset


@dataclass
class Start:
    """The starting point named by --from: a config to build, and how to fill its weights."""

    kind: str
    """"none", "dir" or "pth"."""
    path: Path | None
    cfg: VLMConfig
    tokenizer: Any
    vision_override: bool
    """--vision replaced the tower the starting point names."""


def resolve_start(from_: str, preset: str, tokenizer_dir: str | None, vision: str | None) -> Start:
    if from_ == "none":
        return _fresh(preset, tokenizer_dir, vision)
    path = Path(from_)
    if path.suffix == ".pth":
        if not path.is_file():
            raise UserError(f"--from {path}: no such file")
        return _from_pth(path, preset, tokenizer_dir, vision)
    cfg = modeldir.read_config(path)
    tokenizer = load_tokenizer(tokenizer_dir or path)
    if len(tokenizer) > cfg.lm.vocab_size:
        raise UserError(f"--tokenizer {tokenizer_dir or path}: {len(tokenizer)} tokens, the model in {path} has "
                        f"only {cfg.lm.vocab_size} embeddings")
    return Start("dir", path, _with_vision(cfg, vision), tokenizer, vision is not None)


def _with_vision(cfg: VLMConfig, vision: str | None) -> VLMConfig:
    if vision is None:
        return cfg
    return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, name_or_path=vision, init=None))


def _fresh(preset: str, tokenizer_dir: str | None, vision: str | None) -> Start:
    """A new model: the preset's shapes, the vocabulary and placeholder id of the given tokenizer."""
    if tokenizer_dir is None:
        raise UserError("--from none: a new model needs --tokenizer DIR (train one with `minimind-v tokenizer`)")
    tokenizer = load_tokenizer(tokenizer_dir)
    cfg = _with_vision(get_preset(preset), vision)
    vocab = tokenizer.get_vocab()
    if cfg.image_token not in vocab:
        raise UserError(f"--tokenizer {tokenizer_dir}: no token {cfg.image_token!r}, the image placeholder of "
                        f"--preset {preset} (set model.image_token to one it has)")
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, vocab_size=len(tokenizer)),
                              image_token_id=vocab[cfg.image_token])
    return Start("none", None, cfg, tokenizer, vision is not None)


def _from_pth(path: Path, preset: str, tokenizer_dir: str | None, vision: str | None) -> Start:
    """An original checkpoint: the preset's shapes with its generation's projector and placeholder."""
    from minimind_v.convert import upstream

    if tokenizer_dir is None:
        raise UserError(f"--from {path}: an original checkpoint carries no tokenizer; give --tokenizer DIR")
    tokenizer = load_tokenizer(tokenizer_dir)
    cfg = upstream.config_for_tokenizer(preset, vision or get_preset(preset).vision.name_or_path, tokenizer,
                                        tokenizer_dir)
    return Start("pth", path, cfg, tokenizer, vision is not None)


def build_model(start: Start, cfg: VLMConfig) -> tuple[MiniMindVLM, list[str]]:
    """The model of `cfg` (the start's config after --set) holding the starting weights, and notes for the log."""
    if start.kind == "none":
        return MiniMindVLM(cfg), []
    if start.kind == "pth":
        from minimind_v.convert.upstream import load_upstream_weights

        model = MiniMindVLM(cfg)
        return model, load_upstream_weights(model, start.path)
    source = cfg.vision.name_or_path if start.vision_override else modeldir.vision_source(cfg.vision, start.path)
    model = MiniMindVLM(cfg, vision=modeldir.build_tower(cfg.vision, source=source))
    weights = start.path / modeldir.WEIGHTS_FILE
    state = modeldir.read_weights(weights)
    modeldir.load_weights_strict(model, state, weights)
    adapter = modeldir.own_adapter(start.path)
    if adapter is None:
        return model, []
    adapters.apply_adapter(model, adapter, state)  # a LoRA run's model: its base and adapter, as one
    adapters.merge(model)
    return model, [f"its LoRA adapter {adapter} merged into the weights"]


def image_preprocessor(start: Start, cfg: VLMConfig) -> ImagePreprocessor:
    """The tower's own preprocessing: from its folder, or CLIP's recipe at its size for a tower built from init."""
    if cfg.vision.init is not None:
        return ImagePreprocessor.for_image_size(cfg.vision.image_size)
    if start.kind == "dir" and not start.vision_override:
        return modeldir.load_image_processor(start.path, cfg)
    return ImagePreprocessor.from_pretrained(cfg.vision.name_or_path)


def encodings_dir(value: str | None) -> Path | None:
    """--encodings-dir as a folder: the default cache, or None for 'none'."""
    if value is None:
        return encodings.default_root()
    return None if value.lower() == "none" else Path(value)


def open_data(path: str, images: str | None, tokenizer: Any, cfg: VLMConfig, preprocessor: ImagePreprocessor | None,
              max_seq_len: int, decode_images: bool, augment: ChatAugmentation | None = None,
              seed: int = 0, cache_dir: Path | None = None) -> VLMDataset:
    """A data set as training reads it; `augment` (seeded by `seed`) for training data only, so validation
    scores the data as written; the up-front pass's encodings kept in `cache_dir`."""
    settings = DataSettings.for_training(preprocessor, max_seq_len, decode_images, augment, seed, cache_dir)
    dataset = VLMDataset(open_dataset(path, images), tokenizer, cfg, preprocessor, settings)
    if len(dataset) == 0:
        first = f"; the first: {dataset.bad_upfront[0]}" if dataset.bad_upfront else ""
        raise UserError(f"--data {path}: no usable sample ({len(dataset.bad_upfront)} bad{first})")
    return dataset


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
