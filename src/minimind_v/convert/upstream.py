"""`minimind-v convert import-upstream`: an original MiniMind-V .pth -> a model directory.

The original files are plain fp16 state dicts (docs: UPSTREAM_FORMAT.md), of two generations: MiniMind2-V
(2025) and minimind-3v (2026). The preset says which one a model is (its LMConfig.numerics); the file's keys say
which one it holds, and a file of the other generation, or MoE against dense, is refused in one line. Every weight
name of ours has exactly one upstream name (`upstream_name`), so checking a file is set arithmetic on upstream
names: unknown keys, missing keys and wrong shapes are all reported before anything is written. The tied
embedding is stored twice upstream; both copies must be present and equal.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from minimind_v.data.tokenizer import load_tokenizer
from minimind_v.errors import UserError, first_line, short_list
from minimind_v.model.config import VLMConfig
from minimind_v.model.vision import VisionTower
from minimind_v.model.vlm import MiniMindVLM
from minimind_v.modeldir import build_tower, load_weights_strict, save_model, weights_to_save
from minimind_v.presets import PRESETS, get_preset

UPSTREAM_HEAD, UPSTREAM_EMBED = "lm_head.weight", "model.embed_tokens.weight"
PROJECTOR_PREFIX = "vision_proj."
TOWER_PREFIX = "vision_encoder."
OUR_PROJECTOR = "projector.net."
QK_NORM, EXPERTS, DENSE_FFN = ".self_attn.q_norm.", ".mlp.experts.", ".mlp.gate_proj."
"""Key fragments that tell the files apart: only minimind-3v has q/k norms; only a MoE file has experts."""


@dataclass(frozen=True)
class Generation:
    """What an original generation's files and models look like, where the two differ."""

    name: str
    """How messages name it."""
    projector: Literal["linear", "mlp"]
    """Its projector (VLMConfig.projector)."""
    projector_keys: str
    """The projector's key prefix upstream (followed by the Sequential index, as ours)."""
    image_token: str
    """The placeholder token each image becomes, as text."""
    tower_family: str
    """The family of the vision tower it was trained with (model/vision.py)."""


GENERATIONS = {  # keyed by LMConfig.numerics
    "2025": Generation("MiniMind2-V (2025)", "linear", "vision_proj.vision_proj.", "@", "clip"),
    "2026": Generation("minimind-3v (2026)", "mlp", "vision_proj.mlp.", "<|image_pad|>", "siglip"),
}

# ours -> upstream for the language model, first match wins (the projector's name depends on the generation)
_RENAMES = [
    (r"^lm\.layers\.(\d+)\.attn\.", r"model.layers.\1.self_attn."),
    (r"^lm\.layers\.(\d+)\.attn_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^lm\.layers\.(\d+)\.mlp_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^lm\.layers\.(\d+)\.mlp\.router\.", r"model.layers.\1.mlp.gate."),
    (r"^lm\.", "model."),
]


@dataclass
class ImportUpstreamOptions:
    pth: str
    """The original .pth (llm_*.pth, pretrain_vlm_*.pth, sft_vlm_*.pth, their _moe variants)."""
    preset: str
    """Architecture of the file: minimind2-small-v, minimind2-v, minimind2-small-v-moe; minimind-3v, minimind-3v-moe."""
    vision: str
    """Its original's vision tower (CLIP ViT-B/16; minimind-3v: SigLIP2 B/32-256): a directory or hub id, referenced."""
    tokenizer: str
    """Directory of that generation's tokenizer (tokenizer.json, tokenizer_config.json); copied into the output."""
    out: str
    """Model directory to write."""


def upstream_name(key: str, numerics: str = "2025") -> str:
    """Our weight name -> the original's, in the generation `numerics` names."""
    if key.startswith(OUR_PROJECTOR):
        return GENERATIONS[numerics].projector_keys + key[len(OUR_PROJECTOR):]
    for pattern, replacement in _RENAMES:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key, count=1)
    raise ValueError(f"no upstream name for {key!r}")


def read_pth(path: Path) -> dict[str, torch.Tensor]:
    """The state dict, unpickled without code execution; any unreadable file is the user's to fix."""
    if not path.is_file():
        raise UserError(f"--pth {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, not torch at all: all one answer for the user
        raise UserError(f"--pth {path}: not a readable PyTorch state dict ({first_line(err)[:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--pth {path}: expected a dict of tensors (a plain state_dict)")
    return state


def _first_key(upstream: dict[str, torch.Tensor], fragment: str) -> str | None:
    return next((k for k in sorted(upstream) if fragment in k), None)


def _presets_for(numerics: str, moe: bool) -> str:
    names = [name for name, cfg in PRESETS.items() if cfg.lm.numerics == numerics and cfg.lm.use_moe == moe]
    return f"presets for this file: {', '.join(names) or 'none'}"


def check_generation(upstream: dict[str, torch.Tensor], cfg: VLMConfig, path: Path) -> None:
    """The file must be of the config's generation and, MoE or dense, of its kind; the error names the key that
    shows what the file is."""
    marker = _first_key(upstream, QK_NORM) or _first_key(upstream, GENERATIONS["2026"].projector_keys)
    numerics = "2026" if marker else "2025"
    experts, dense = _first_key(upstream, EXPERTS), _first_key(upstream, DENSE_FFN)
    if numerics != cfg.lm.numerics:
        shown = marker or f"no *{QK_NORM}* keys"
        raise UserError(f"--pth {path}: a {GENERATIONS[numerics].name} checkpoint ({shown}), but the preset is a "
                        f"{GENERATIONS[cfg.lm.numerics].name} model; {_presets_for(numerics, experts is not None)}")
    if (experts and not cfg.lm.use_moe) or (dense and cfg.lm.use_moe):
        kind, shown = ("MoE", experts) if experts else ("dense", dense)
        raise UserError(f"--pth {path}: a {kind} checkpoint ({shown}), but the preset is "
                        f"{'MoE' if cfg.lm.use_moe else 'dense'}; {_presets_for(numerics, experts is not None)}")


def map_state(upstream: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], cfg: VLMConfig,
              path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Upstream tensors -> our names, as float32. Returns the mapped weights and notes for the user."""
    check_generation(upstream, cfg, path)
    notes = []
    tower_keys = [k for k in upstream if k.startswith(TOWER_PREFIX)]
    if tower_keys:
        notes.append(f"ignored {len(tower_keys)} {TOWER_PREFIX}* keys: the tower comes from --vision")
    names = {upstream_name(k, cfg.lm.numerics): k for k in expected}
    has_projector = any(k.startswith(PROJECTOR_PREFIX) for k in upstream)
    if not has_projector:
        names = {up: k for up, k in names.items() if not up.startswith(PROJECTOR_PREFIX)}
        notes.append("no vision_proj.* keys (an llm_*.pth): the projector is freshly initialised")
    present = set(upstream) - set(tower_keys)
    unknown = sorted(present - set(names) - {UPSTREAM_HEAD})
    missing = sorted((set(names) | {UPSTREAM_HEAD}) - present)
    if unknown or missing:
        raise UserError(f"--pth {path}: keys do not match the preset; unknown: {short_list(unknown, 6)}; "
                        f"missing: {short_list(missing, 6)}")
    wrong = [f"{up} {tuple(upstream[up].shape)} vs {tuple(expected[k].shape)}"
             for up, k in names.items() if upstream[up].shape != expected[k].shape]
    if wrong:
        raise UserError(f"--pth {path}: shapes do not match the preset (file vs preset): {short_list(wrong, 6)}")
    if not torch.equal(upstream[UPSTREAM_HEAD], upstream[UPSTREAM_EMBED]):
        raise UserError(f"--pth {path}: {UPSTREAM_HEAD} differs from {UPSTREAM_EMBED}; the original ties them, "
                        "so this file is not an original MiniMind-V checkpoint")
    return {k: upstream[up].float() for up, k in names.items()}, notes


def image_token_id(tokenizer, where: str, token: str = GENERATIONS["2025"].image_token) -> int:
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise UserError(f"--tokenizer {where}: {token!r} is not a single token, so it cannot be the "
                        "image placeholder (the 2025 and 2026 tokenizers are not interchangeable)")
    return ids[0]


def upstream_config(preset: str, vision: str, token_id: int) -> VLMConfig:
    """The preset as its original generation built it: frozen tower `vision`, that generation's projector and
    placeholder (id `token_id`)."""
    cfg = get_preset(preset)
    generation = GENERATIONS[cfg.lm.numerics]
    tower = dataclasses.replace(cfg.vision, name_or_path=vision, init=None, freeze=True)
    return dataclasses.replace(cfg, vision=tower, projector=generation.projector, image_token=generation.image_token,
                               image_token_id=token_id, image_token_len=tower.num_patches)


def config_for_tokenizer(preset: str, vision: str, tokenizer, where: str) -> VLMConfig:
    """upstream_config with the id `tokenizer` gives the placeholder of the preset's generation."""
    token = GENERATIONS[get_preset(preset).lm.numerics].image_token
    return upstream_config(preset, vision, image_token_id(tokenizer, where, token))


def check_tower(tower: VisionTower, cfg: VLMConfig, where: str) -> None:
    family = GENERATIONS[cfg.lm.numerics].tower_family
    if tower.family != family:
        raise UserError(f"--vision {where}: a {tower.family} tower, but {GENERATIONS[cfg.lm.numerics].name} models "
                        f"see through a {family} one")
    hf = tower.model.config
    patches = (hf.image_size // hf.patch_size) ** 2 if hasattr(hf, "image_size") else hf.num_patches
    if hf.hidden_size != cfg.vision.hidden_size or patches != cfg.vision.num_patches:
        raise UserError(f"--vision {where}: {hf.hidden_size}-wide features x {patches} patches, the preset needs "
                        f"{cfg.vision.hidden_size} x {cfg.vision.num_patches}")


def load_upstream_weights(model: MiniMindVLM, path: str | Path) -> list[str]:
    """Load an original .pth into `model`, strictly; a file without vision_proj keeps the fresh projector.

    Returns notes for the user (ignored tower keys, fresh projector)."""
    return apply_upstream_state(model, read_pth(Path(path)), Path(path))


def apply_upstream_state(model: MiniMindVLM, upstream: dict[str, torch.Tensor], path: Path) -> list[str]:
    current = weights_to_save(model)
    weights, notes = map_state(upstream, current, model.cfg, path)
    load_weights_strict(model, {**current, **weights}, path)
    return notes


def main(opts: ImportUpstreamOptions) -> int:
    tokenizer = load_tokenizer(opts.tokenizer)
    cfg = config_for_tokenizer(opts.preset, opts.vision, tokenizer, opts.tokenizer)
    upstream = read_pth(Path(opts.pth))  # a bad file fails before the tower is loaded
    check_generation(upstream, cfg, Path(opts.pth))
    tower = build_tower(cfg.vision)
    check_tower(tower, cfg, opts.vision)
    model = MiniMindVLM(cfg, vision=tower)
    notes = apply_upstream_state(model, upstream, Path(opts.pth))
    save_model(model, opts.out, tokenizer=tokenizer)
    for note in notes:
        print(f"note: {note}")
    print(f"imported {opts.pth} ({opts.preset}) -> {opts.out}")
    return 0
