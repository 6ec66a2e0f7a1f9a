"""Presets are data: a name -> the VLMConfig it stands for."""

from __future__ import annotations

import copy
import dataclasses

from minimind_v.errors import UserError
from minimind_v.model.config import CLIP_B16, SIGLIP2_B32_256, LMConfig, VisionConfig, VLMConfig
from minimind_v.modeldir import VISION_DIR

_CLIP_TOWER = VisionConfig(name_or_path=CLIP_B16, hidden_size=768, image_size=224, num_patches=196)
_SIGLIP_TOWER = VisionConfig(name_or_path=SIGLIP2_B32_256, hidden_size=768, image_size=256, num_patches=64)
# minimind-3v's LLM: 4 KV heads of 96, FFN ceil(768 * pi / 64) * 64, per-head q/k RMSNorm, the 2026 numerics.
_LM_3V = LMConfig(hidden_size=768, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=2432, rms_norm_eps=1e-6, qk_norm=True, numerics="2026")
# Its MoE: 4 experts, top-1, no shared expert, the load-balancing loss over all tokens of the batch.
_LM_3V_MOE = dataclasses.replace(_LM_3V, use_moe=True, n_routed_experts=4, num_experts_per_tok=1,
                                 n_shared_experts=0, aux_loss_alpha=5e-4, seq_aux=False)
_IMAGE_PAD_3V = dict(projector="mlp", image_token="<|image_pad|>", image_token_id=12, image_token_len=64)

PRESETS: dict[str, VLMConfig] = {
    # The original MiniMind2-Small-V: 26M LLM + frozen CLIP ViT-B/16.
    "minimind2-small-v": VLMConfig(lm=LMConfig(hidden_size=512, num_hidden_layers=8), vision=_CLIP_TOWER),
    # The original MiniMind2-V: 104M LLM.
    "minimind2-v": VLMConfig(lm=LMConfig(hidden_size=768, num_hidden_layers=16), vision=_CLIP_TOWER),
    # The original MoE variant: 4 routed experts, top-2, one shared expert.
    "minimind2-small-v-moe": VLMConfig(lm=LMConfig(hidden_size=512, num_hidden_layers=8, use_moe=True),
                                       vision=_CLIP_TOWER),
    # minimind-3v (2026): 65M dense LLM, frozen SigLIP2 ViT-B/32 at 256 px, the mlp projector, <|image_pad|> x 64.
    "minimind-3v": VLMConfig(lm=_LM_3V, vision=_SIGLIP_TOWER, **_IMAGE_PAD_3V),
    # minimind-3v-moe: 200M-A65M.
    "minimind-3v-moe": VLMConfig(lm=_LM_3V_MOE, vision=_SIGLIP_TOWER, **_IMAGE_PAD_3V),
    # For tests and the CPU quickstart: a CLIP tower trained from scratch on 48x48 images in 16x16 patches, so
    # each cell of the synthetic world's 3x3 grid is exactly one patch (9 image tokens). The tower has no
    # transformer layer (patch embedding + position + LayerNorm; the projector's MLP is the nonlinearity). Its
    # position embeddings start at std 0.5 rather than 0.02, so that a patch's position is not ~4% of its
    # embedding. docs/experiments.md ("The tiny preset's tower, ...") has the runs behind both choices.
    "tiny": VLMConfig(
        lm=LMConfig(vocab_size=1024, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=2048),
        vision=VisionConfig(
            name_or_path=VISION_DIR,
            init={"model_type": "clip_vision_model", "hidden_size": 128, "intermediate_size": 256,
                  "num_hidden_layers": 0, "num_attention_heads": 4, "image_size": 48, "patch_size": 16,
                  "num_channels": 3},
            hidden_size=128, image_size=48, num_patches=9, freeze=False, position_init_std=0.5),
        projector="mlp", image_token="<|image_pad|>", image_token_id=3, image_token_len=9,
    ),
}


def get_preset(name: str) -> VLMConfig:
    if name not in PRESETS:
        raise UserError(f"--preset {name!r}: unknown preset (known: {', '.join(PRESETS)})")
    return copy.deepcopy(PRESETS[name])
