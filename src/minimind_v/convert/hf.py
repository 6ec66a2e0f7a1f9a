"""`convert export-hf` / `convert import-hf`: model directory <-> a transformers trust_remote_code directory.

The exported directory needs transformers, not minimind-v:

    config.json                 MiniMindVConfig, with auto_map -> the three .py files below
    configuration_minimind_v.py
    modeling_minimind_v.py      MiniMindVForCausalLM (PreTrainedModel + GenerationMixin), same numerics as ours
    processing_minimind_v.py    MiniMindVProcessor: chat template, <image> expansion, image preprocessing
    model.safetensors           our state dict as it is (vision tower included under vision.model.*)
    generation_config.json      stop on <|im_end|> and <|endoftext|>
    processor_config.json       the processor's settings (image_token_id, image_token_len, images_first)
    tokenizer files, preprocessor_config.json (the vision tower's image preprocessing)
    adapter/                    a LoRA model's adapter as it is (peft format; our module names are the export's)

    model = AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)
    model = peft.PeftModel.from_pretrained(model, f"{dir}/adapter")   # a LoRA model's adapter on top
    processor = AutoProcessor.from_pretrained(dir, trust_remote_code=True)
    inputs = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True), images=images)
    model.generate(**inputs)

import-hf reads such a directory back into a minimind-v model directory, weights unchanged.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minimind_v.errors import UserError

TEMPLATE = Path(__file__).with_name("hf_template")
CODE_FILES = ("configuration_minimind_v.py", "modeling_minimind_v.py", "processing_minimind_v.py")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
AUTO_MAP = {"AutoConfig": "configuration_minimind_v.MiniMindVConfig",
            "AutoModelForCausalLM": "modeling_minimind_v.MiniMindVForCausalLM",
            "AutoProcessor": "processing_minimind_v.MiniMindVProcessor"}


@dataclass
class ExportHFOptions:
    model: str
    """Model directory to export."""
    out: str
    """Directory to write the transformers (trust_remote_code) model to."""


@dataclass
class ImportHFOptions:
    src: str
    """A directory written by `convert export-hf`."""
    out: str
    """Model directory to write."""


def export_main(opts: ExportHFOptions) -> int:
    export_hf(opts.model, opts.out)
    print(f"wrote {opts.out}: AutoModelForCausalLM.from_pretrained({opts.out!r}, trust_remote_code=True)")
    if (Path(opts.out) / "adapter").is_dir():
        print(f"its LoRA adapter: peft.PeftModel.from_pretrained(model, {str(Path(opts.out) / 'adapter')!r})")
    return 0


def import_main(opts: ImportHFOptions) -> int:
    import_hf(opts.src, opts.out)
    print(f"wrote model directory {opts.out}")
    return 0


def _template(name: str) -> Any:
    return importlib.import_module(f"minimind_v.convert.hf_template.{name}")


def export_hf(model_dir: str | Path, out: str | Path) -> None:
    from minimind_v.constants import IMAGE_MARKER
    from minimind_v.data.tokenizer import load_tokenizer, save_tokenizer
    from minimind_v.fileio import atomic_write_text, normal_modes_for_new_files
    from minimind_v.modeldir import MiniMindVLM, load_image_processor, write_preprocessor_config

    out = _output_dir(out)
    model = MiniMindVLM.from_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir)
    processor = load_image_processor(model_dir, model.cfg)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config(model, tokenizer)
    hf_model = _template("modeling_minimind_v").MiniMindVForCausalLM(config)
    # Our names are theirs: a strict load proves the two architectures hold the same tensors.
    hf_model.load_state_dict(model.state_dict(), strict=True)
    hf_model.generation_config.eos_token_id = config.eos_token_id
    hf_model.generation_config.pad_token_id = config.pad_token_id
    with normal_modes_for_new_files(out):
        hf_model.save_pretrained(out)
    for name in CODE_FILES:
        shutil.copyfile(TEMPLATE / name, out / name)
    save_tokenizer(tokenizer, out)
    write_preprocessor_config(out, processor.to_config(), final_newline=False)
    settings = {"processor_class": "MiniMindVProcessor", "auto_map": {"AutoProcessor": AUTO_MAP["AutoProcessor"]},
                "image_marker": IMAGE_MARKER, "image_token_id": config.image_token_id,
                "image_token_len": config.image_token_len, "images_first": config.images_first}
    atomic_write_text(out / "processor_config.json", json.dumps(settings, indent=2) + "\n")
    _copy_adapter(Path(model_dir), out)


def hf_config(model: Any, tokenizer: Any) -> Any:
    """Our VLMConfig (and the tower's own config) as the template's MiniMindVConfig."""
    from minimind_v.constants import END_TOKENS

    cfg = model.cfg
    vocab = tokenizer.get_vocab()
    ends = [vocab[t] for t in END_TOKENS if t in vocab]
    tower = model.vision.model.config.to_dict()
    tower = {k: v for k, v in tower.items() if not k.startswith("_") and k not in ("transformers_version",
                                                                                    "architectures")}
    config = _template("configuration_minimind_v").MiniMindVConfig(
        lm=dataclasses.asdict(cfg.lm), vision_tower_config=tower, vision_hidden_size=cfg.vision.hidden_size,
        vision_settings={"image_size": cfg.vision.image_size, "num_patches": cfg.vision.num_patches,
                         "freeze": cfg.vision.freeze},
        projector=cfg.projector, image_token=cfg.image_token, image_token_id=cfg.image_token_id,
        image_token_len=cfg.image_token_len, images_first=cfg.images_first, eos_token_id=ends,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id)
    config.architectures = ["MiniMindVForCausalLM"]
    config.auto_map = dict(AUTO_MAP)
    return config


def import_hf(src: str | Path, out: str | Path) -> None:
    from minimind_v.fileio import atomic_write
    from minimind_v.model.config import LMConfig, VisionConfig, VLMConfig
    from minimind_v.modeldir import EMBED_KEY, PREPROCESSOR_FILE, TIED_KEY, VISION_DIR, MiniMindVLM, read_weights

    src, out = Path(src), _output_dir(out)
    data = _read_export_config(src)
    try:
        settings = data["vision_settings"]
        vision = VisionConfig(name_or_path=VISION_DIR, init=data["vision_tower_config"],
                              hidden_size=data["vision_hidden_size"], **settings)
        cfg = VLMConfig(lm=LMConfig(**data["lm"]), vision=vision, projector=data["projector"],
                        image_token=data["image_token"], image_token_id=data["image_token_id"],
                        image_token_len=data["image_token_len"], images_first=data.get("images_first", False))
    except (KeyError, TypeError) as err:
        raise UserError(f"{src / 'config.json'}: not a minimind-v export ({type(err).__name__}: {err})") from None
    model = MiniMindVLM(cfg)
    state = read_weights(src / "model.safetensors")
    state.setdefault(TIED_KEY, state.get(EMBED_KEY))  # tied: stored once
    missing, unexpected = _key_diff(model.state_dict(), state)
    if missing or unexpected:
        raise UserError(f"{src / 'model.safetensors'}: weights do not match config.json; missing: "
                        f"{missing or 'none'}; unexpected: {unexpected or 'none'}")
    model.load_state_dict(state, strict=True)
    model.save_pretrained(out)
    # Verbatim copies: loading the tokenizer through transformers here would ask to run the export's code.
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, Path(out) / name)
    atomic_write(out / VISION_DIR / PREPROCESSOR_FILE, lambda tmp: shutil.copyfile(src / PREPROCESSOR_FILE, tmp))
    _copy_adapter(src, out)


def _copy_adapter(src: Path, out: Path) -> None:
    """A LoRA model's adapter/ as it is: peft's format, our module names being the export's."""
    from minimind_v.modeldir import ADAPTER_DIR, own_adapter

    shutil.rmtree(out / ADAPTER_DIR, ignore_errors=True)  # never one left from another model
    adapter = own_adapter(src)
    if adapter is not None:
        shutil.copytree(adapter, out / ADAPTER_DIR)


def _output_dir(out: str | Path) -> Path:
    """--out checked before any work: a directory (new or existing), never a file in the way."""
    out = Path(out)
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"--out {out}: {parent} exists and is not a directory")
    return out


def _read_export_config(src: Path) -> dict[str, Any]:
    path = src / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: cannot read ({err})") from None
    if data.get("model_type") != "minimind_v":
        raise UserError(f"{path}: model_type {data.get('model_type')!r}, expected 'minimind_v' (from export-hf)")
    return data


def _key_diff(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(state))[:8], sorted(set(state) - set(expected))[:8]
