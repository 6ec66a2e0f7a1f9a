"""The self-describing model directory: what train and convert write, what everything else reads.

    config.json          VLMConfig.to_dict() + format_version
    model.safetensors    language model + projector (the tied embedding / LM head stored once)
    tokenizer files      when a tokenizer was given
    vision/              the tower in Hugging Face save_pretrained layout + preprocessor_config.json,
                         only when it lives inside (built from `init`, trained, or already inside);
                         a frozen pretrained tower is referenced by path or hub id in config.json
                         (embed_tower copies it inside, for a directory that must travel alone)
    adapter/             a LoRA run's adapter in peft's format (adapters.py); the files above are its base

Loading is strict: a missing, unexpected or mis-shaped weight is an error naming the key(s).

The public `MiniMindVLM` lives here: model/vlm.py's architecture with `from_pretrained` and `save_pretrained`,
and a tower that cannot be built reported as a UserError saying how to fix it (model/ knows no flags).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minimind_v import adapters
from minimind_v.data.images import CLIP_MEAN, CLIP_STD, RESCALE_FACTOR, ImagePreprocessor, image_processor_config
from minimind_v.data.tokenizer import save_tokenizer
from minimind_v.errors import UserError, short_list
from minimind_v.fileio import atomic_write, atomic_write_text, normal_modes, replace_dir
from minimind_v.model import vlm
from minimind_v.model.config import VisionConfig, VLMConfig
from minimind_v.model.vision import TowerConfigError, TowerUnavailable, VisionTower, quiet_transformers

FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, VISION_DIR, ADAPTER_DIR = "config.json", "model.safetensors", "vision", "adapter"
PREPROCESSOR_FILE = "preprocessor_config.json"
EMBED_KEY = "lm.embed_tokens.weight"
TIED_KEY = "lm.lm_head.weight"  # the same Parameter as EMBED_KEY
FETCH_HINT = "fetch it with `minimind-v download` or pass a local directory with --vision DIR"


def build_tower(vision: VisionConfig, source: str | None = None) -> VisionTower:
    """VisionTower(vision, source) for a user's command: its errors as UserErrors, an unloadable tower's saying
    how to get it."""
    try:
        return VisionTower(vision, source=source)
    except TowerUnavailable as err:
        raise UserError(f"{err}; {FETCH_HINT}") from None
    except TowerConfigError as err:
        raise UserError(str(err)) from None


class MiniMindVLM(vlm.MiniMindVLM):
    """The VLM as users hold it: the architecture, read from and written to a model directory."""

    def __init__(self, cfg: VLMConfig, vision: VisionTower | None = None):
        """Random language model and projector; the tower is `vision` if given, else built from cfg.vision."""
        super().__init__(cfg, vision if vision is not None else build_tower(cfg.vision))

    def save_pretrained(self, directory: str | Path, tokenizer: Any = None) -> None:
        """Write a model directory; a given tokenizer is saved beside the weights."""
        save_model(self, directory, tokenizer=tokenizer)

    @classmethod
    def from_pretrained(cls, directory: str | Path, adapter: str | Path | None = None) -> "MiniMindVLM":
        """Strict load of a model directory written by save_pretrained or convert, in eval mode (`.train()` to train);
        with `adapter`, a LoRA adapter directory (peft format) applied on top."""
        return load_model(directory, adapter).eval()


def save_model(model: vlm.MiniMindVLM, directory: str | Path, tokenizer: Any = None) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    if tower_lives_inside(cfg.vision):
        cfg = _save_tower_inside(model.vision, directory, cfg)
    elif Path(cfg.vision.name_or_path).is_dir():
        # A local tower is referenced absolutely, so the directory still works from anywhere.
        cfg = dataclasses.replace(cfg, vision=dataclasses.replace(
            cfg.vision, name_or_path=str(Path(cfg.vision.name_or_path).resolve())))
    weights = weights_to_save(model)
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(weights, str(tmp), {"format": "pt"}))
    _write_config(directory, cfg)
    if tokenizer is not None:
        save_tokenizer(tokenizer, directory)  # the chat template kept inside tokenizer_config.json
    if adapters.has_adapter(model):
        adapters.save_adapter(model, directory / ADAPTER_DIR, weights)
    else:  # an adapter left from an earlier save would be applied to weights it was not trained on
        shutil.rmtree(directory / ADAPTER_DIR, ignore_errors=True)


def embed_tower(directory: str | Path) -> None:
    """Copy the tower a model directory references (a local path or a hub id) into its own vision/ and
    point config.json there, so the directory works after being moved or copied to another machine."""
    directory = Path(directory)
    cfg = read_config(directory)
    if cfg.vision.name_or_path == VISION_DIR:
        return
    tower = build_tower(cfg.vision, source=vision_source(cfg.vision, directory))
    _write_config(directory, _save_tower_inside(tower, directory, cfg))


def _save_tower_inside(tower: VisionTower, directory: Path, cfg: VLMConfig) -> VLMConfig:
    """Write the tower to directory/vision/; the config to store, pointing there."""
    save_tower(tower, directory, cfg.vision.image_size)
    return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, name_or_path=VISION_DIR, init=None))


def _write_config(directory: Path, cfg: VLMConfig) -> None:
    config = {"format_version": FORMAT_VERSION, **cfg.to_dict()}
    atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")


def tower_lives_inside(vision: VisionConfig) -> bool:
    """Random or trained towers, and towers already inside a model directory, travel with it."""
    return vision.init is not None or not vision.freeze or vision.name_or_path == VISION_DIR


def _stored(key: str) -> bool:
    """Whether model.safetensors holds this weight: not the tower's (saved or referenced apart), not the tied
    head's (a copy of the embedding)."""
    return key != TIED_KEY and not key.startswith("vision.")


def weights_to_save(model: vlm.MiniMindVLM) -> dict[str, torch.Tensor]:
    """What model.safetensors holds; of a model carrying a LoRA adapter, the weights it adapts (its base)."""
    state = adapters.base_weights(model.state_dict())
    return {k: v.detach().contiguous() for k, v in state.items() if _stored(k)}


def load_model(directory: str | Path, adapter: str | Path | None = None) -> MiniMindVLM:
    directory = Path(directory)
    cfg = read_config(directory)
    model = MiniMindVLM(cfg, vision=build_tower(cfg.vision, source=vision_source(cfg.vision, directory)))
    weights = read_weights(directory / WEIGHTS_FILE)
    load_weights_strict(model, weights, directory / WEIGHTS_FILE)
    if adapter is not None:
        adapters.apply_adapter(model, adapter, weights)
    return model


def own_adapter(directory: str | Path) -> Path | None:
    """The adapter a model directory carries (a LoRA run's OUT/model/adapter), if any."""
    path = Path(directory) / ADAPTER_DIR
    return path if (path / adapters.CONFIG_FILE).is_file() else None


def read_config(directory: str | Path) -> VLMConfig:
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise UserError(f"{directory}: not a model directory (it does not exist or is not a directory)")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: cannot read the model config ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    version = data.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise UserError(f"{path}: format_version {version!r}, this minimind-v reads {FORMAT_VERSION}")
    try:
        return VLMConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise UserError(f"{path}: {err}") from None


def vision_source(vision: VisionConfig, directory: Path) -> str:
    """Where the tower comes from: the directory's own vision/ (or another relative folder), else the reference."""
    inside = directory / vision.name_or_path
    if inside.is_dir():
        return str(inside)
    if vision.name_or_path == VISION_DIR:
        raise UserError(f"{inside}: missing; config.json says the vision tower lives inside the model directory")
    return vision.name_or_path


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise UserError(f"{path}: cannot read the weights ({err})") from None


def load_weights_strict(model: vlm.MiniMindVLM, state: dict[str, torch.Tensor], source: Path | str) -> None:
    expected = {k: v for k, v in model.state_dict().items() if _stored(k)}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(f"{source}: weights do not match the config; missing: {short_list(missing, 8)}; "
                        f"unexpected: {short_list(unexpected, 8)}")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise UserError(f"{source}: {key} has shape {tuple(value.shape)}, the config needs "
                            f"{tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=False)  # strictness checked above; the tower and tied head are apart


def save_tower(tower: VisionTower, directory: Path, image_size: int) -> None:
    """vision/ in save_pretrained layout with its preprocessor config, swapped in whole."""
    staging = Path(tempfile.mkdtemp(prefix=".vision-", dir=directory))
    with quiet_transformers():
        tower.model.save_pretrained(str(staging))
    processor = default_image_processor(tower.family, image_size)
    if tower.source is not None:  # the source's own settings, in whichever layout transformers saved them
        with contextlib.suppress(UserError):  # a bare tower saved without any keeps its family's recipe
            processor = image_processor_config(tower.source)
    write_preprocessor_config(staging, processor)
    normal_modes(staging)
    replace_dir(staging, directory / VISION_DIR)


def write_preprocessor_config(directory: Path, config: dict[str, Any], final_newline: bool = True) -> None:
    """The one writer of preprocessor_config.json (a tower's image processing, as transformers reads it): into a
    model directory's vision/, and into an export-hf directory, which has never had the final newline."""
    text = json.dumps(config, indent=2) + ("\n" if final_newline else "")
    atomic_write_text(Path(directory) / PREPROCESSOR_FILE, text)


def default_image_processor(family: str, image_size: int) -> dict[str, Any]:
    """The transformers image-processor config a tower of this family expects (CLIP's or SigLIP's recipe)."""
    common = {"do_convert_rgb": True, "do_resize": True, "do_rescale": True, "rescale_factor": RESCALE_FACTOR,
              "do_normalize": True}
    if family == "clip":
        return {"image_processor_type": "CLIPImageProcessor", **common, "resample": 3,
                "size": {"shortest_edge": image_size}, "do_center_crop": True,
                "crop_size": {"height": image_size, "width": image_size},
                "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}
    return {"image_processor_type": "SiglipImageProcessor", **common, "resample": 2,
            "size": {"height": image_size, "width": image_size}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}


def load_image_processor(model_dir: str | Path, config: VLMConfig) -> ImagePreprocessor:
    """The preprocessing of a model directory's tower (its vision/ folder, or the referenced tower)."""
    own = Path(model_dir) / VISION_DIR
    if config.vision.name_or_path == VISION_DIR or (own / PREPROCESSOR_FILE).is_file():
        return ImagePreprocessor.from_pretrained(own)
    return ImagePreprocessor.from_pretrained(config.vision.name_or_path)
