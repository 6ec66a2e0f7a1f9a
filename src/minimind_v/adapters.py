"""LoRA adapters in peft's own format: what `train --lora-rank` writes to OUT/model/adapter/, what `--adapter DIR`
reads, what `convert merge-lora` folds into the weights.

    adapter_config.json          peft's LoraConfig; target_modules a regex over the model's module names;
                                 trainable_token_indices the token ids whose embedding rows it retrains, if any
    adapter_model.safetensors    the adapter's weights under PeftModel.save_pretrained's names
                                 (base_model.model.<module>.lora_A.weight; the retrained rows in
                                 base_model.model.lm.embed_tokens.token_adapter.trainable_tokens_delta); its
                                 metadata holds the sha256 of the base weights it was trained on

Inside minimind-v the adapter is injected into the model in place (peft's inject_adapter_in_model), so the model
stays a MiniMindVLM with its own methods. Our module names are the export-hf model's, so the same directory
loads with `peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(export, ...), adapter_dir)`.
Retrained token rows are for words the base never learned (a new skill's answers): an adapter alone cannot
write a token whose embedding row never trained. The output head is the embedding (tied), so the rows change in
both; MiniMindVLM tells peft so (its _tied_weights_keys, get_input_embeddings and config).
peft is imported only when an adapter is built or read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from minimind_v.errors import UserError, first_line, short_list
from minimind_v.fileio import atomic_write

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
"""PeftModel's names for the wrapped model's modules: the PeftModel holds a LoraModel that holds the model."""
BASE_SHA256 = "minimind_v_base_sha256"
"""The metadata key of the base weights' fingerprint (peft ignores metadata it does not know)."""


def lora_config(rank: int, alpha: int, targets: list[str], dropout: float, token_ids: list[int] | None = None) -> Any:
    """A LoraConfig wrapping the named linear layers of every block of the language model (lm.layers.N...),
    never the tower's or the projector's layers of the same name; `token_ids`: embedding rows it also retrains
    (distinct ids, as train/lora.token_ids gives them)."""
    from peft import LoraConfig

    names = "|".join(re.escape(t) for t in targets)
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                      target_modules=rf"lm\.layers\.\d+\.(.+\.)?({names})",
                      trainable_token_indices=list(token_ids) if token_ids else None)


def inject(model: nn.Module, config: Any) -> None:
    """Wrap the config's target layers of `model` in LoRA layers, in place (the adapter's A drawn from torch's
    generator, its B zero: the model still computes what it did)."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, model)


def has_adapter(model: nn.Module) -> bool:
    return getattr(model, "peft_config", None) is not None


def is_adapter_weight(name: str) -> bool:
    """A tensor of an adapter (peft's lora_A, lora_B, ..., and its retrained token rows, trainable_tokens_delta),
    not of the layer it wraps."""
    return ".lora_" in f".{name}" or ".trainable_tokens_" in name


def base_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of a model carrying an adapter as the plain model's: each wrapped layer's weights under its
    own name (peft keeps them in `base_layer`, an embedding with retrained rows in `token_adapter.base_layer`),
    the adapter's left out."""
    return {k.replace(".token_adapter.base_layer.", ".").replace(".base_layer.", "."): v for k, v in state.items()
            if not is_adapter_weight(k)}


def fingerprint(weights: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of `weights`: which base an adapter belongs to."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def save_adapter(model: nn.Module, directory: str | Path, base: dict[str, torch.Tensor]) -> None:
    """Write the adapter of `model` to `directory` as PeftModel.save_pretrained would; `base`: the weights it
    adapts (the model directory's model.safetensors), fingerprinted into the metadata."""
    from peft import get_peft_model_state_dict

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {PREFIX + k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    metadata = {"format": "pt", BASE_SHA256: fingerprint(base)}
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp), metadata))
    config = dataclasses.replace(model.peft_config["default"], inference_mode=True)
    config.save_pretrained(str(directory))


def apply_adapter(model: nn.Module, directory: str | Path, base: dict[str, torch.Tensor]) -> None:
    """Inject the adapter in `directory` into `model` and load its weights strictly; `base`: the model's weights
    as stored, checked against the adapter's fingerprint. Nothing learns afterwards."""
    directory = Path(directory)
    config = read_config(directory)
    state, metadata = read_weights(directory)
    expected = metadata.get(BASE_SHA256)
    if expected is not None and expected != fingerprint(base):
        raise UserError(f"{directory}: this adapter was trained on other base weights than the model's (load it "
                        f"with the model directory it was saved beside)")
    try:
        inject(model, config)
    except ValueError as err:  # no target layer, or one peft cannot wrap
        raise UserError(f"{directory / CONFIG_FILE}: does not fit this model ({first_line(err)})") from None
    _load_strict(model, state, directory / WEIGHTS_FILE)
    model.requires_grad_(False)


def read_config(directory: Path) -> Any:
    """The adapter's LoraConfig, or a UserError naming the directory or file at fault."""
    from peft import PeftConfig, PeftType

    path = directory / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{directory}: not a LoRA adapter directory (no {CONFIG_FILE})")
    try:
        peft_type = json.loads(path.read_text()).get("peft_type")
        if peft_type != PeftType.LORA:
            raise UserError(f"{path}: peft_type {peft_type!r}; minimind-v applies LoRA adapters only")
        return PeftConfig.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise UserError(f"{path}: cannot read the adapter config ({err})") from None


def read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = directory / WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (OSError, SafetensorError) as err:
        raise UserError(f"{path}: cannot read the adapter weights ({err})") from None


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    state = {k.removeprefix(PREFIX): v for k, v in state.items()}
    expected = get_peft_model_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(f"{source}: the adapter does not fit this model; missing: {short_list(missing, 4)}; "
                        f"unexpected: {short_list(unexpected, 4)}")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise UserError(f"{source}: {key} has shape {tuple(value.shape)}, this model needs "
                            f"{tuple(expected[key].shape)}")
    set_peft_model_state_dict(model, state)


def merge(model: nn.Module) -> None:
    """Fold the adapter into the weights it wraps and take its layers out: the plain model, the same function."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import TrainableTokensWrapper

    for name, module in list(model.named_modules()):
        if isinstance(module, TrainableTokensWrapper):  # the retrained rows; the head's share the embedding's
            module.token_adapter.merge()
            plain: nn.Module = module.token_adapter.get_base_layer()
        elif isinstance(module, BaseTunerLayer) and not name.endswith(".token_adapter"):
            module.merge()
            plain = module.get_base_layer()
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, plain)
    del model.peft_config
