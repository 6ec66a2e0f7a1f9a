"""Freezing policies move exactly what they name, with a CLIP and a SigLIP tower: one real training step each.

minimind-3v's freeze_llm levels 2 / 1 / 0 are the policies projector / projector+ends / llm. A trainable tower
trains what its features pass through: SigLIP's post-layernorm (its features include it), not CLIP's (they are
read before it), never SigLIP's pooling head.
"""

import pytest
import torch

from minimind_v.model.config import LMConfig, VisionConfig, VLMConfig
from minimind_v.model.vlm import MiniMindVLM
from minimind_v.train import freezing, optim
from minimind_v.train.step import Precision, train_step

IMG, N_PATCH, LAYERS = 3, 4, 3
TOWER = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
         "image_size": 16, "patch_size": 8, "num_channels": 3}
UNUSED = {"clip_vision_model": ("vision.model.post_layernorm.",), "siglip_vision_model": ("vision.model.head.",)}


def tiny_vlm(model_type: str) -> MiniMindVLM:
    torch.manual_seed(0)
    cfg = VLMConfig(
        lm=LMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128, qk_norm=True, rms_norm_eps=1e-6,
                    numerics="2026"),
        vision=VisionConfig(name_or_path="vision", hidden_size=16, image_size=16, num_patches=N_PATCH,
                            init={"model_type": model_type, **TOWER}),
        projector="mlp", image_token="<|image_pad|>", image_token_id=IMG, image_token_len=N_PATCH)
    return MiniMindVLM(cfg)


def one_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 64, (2, 14), generator=g)
    ids[:, 1:1 + N_PATCH] = IMG
    labels = ids.clone()
    labels[:, :7] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(2, 3, 16, 16, generator=g)}


def moved_by_one_step(model: MiniMindVLM) -> set[str]:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = optim.build_optimizer(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    cpu = torch.device("cpu")
    train_step(model, [one_batch()], opt, Precision.choose("fp32", cpu), 1.0, cpu)
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


NAMED = {"projector": ("projector.",), "projector+ends": ("projector.", "lm.layers.0.", f"lm.layers.{LAYERS - 1}."),
         "llm": ("projector.", "lm."), "all": ("projector.", "lm.", "vision.")}


@pytest.mark.parametrize("policy", [p for p in freezing.POLICIES if p != "adapter"])  # adapter: a LoRA's own
@pytest.mark.parametrize("model_type", ["clip_vision_model", "siglip_vision_model"], ids=["clip", "siglip"])
def test_each_policy_moves_exactly_what_it_names(model_type, policy):
    model = tiny_vlm(model_type)
    freezing.apply_policy(model, policy, train_vision=False, uses_images=True)
    names = [n for n, _ in model.named_parameters()]
    expected = {n for n in names if n.startswith(NAMED[policy]) and not n.startswith(UNUSED[model_type])}
    assert moved_by_one_step(model) == expected
    if policy == "projector+ends":  # embeddings, head and final norm stay as they were
        assert not expected & {"lm.embed_tokens.weight", "lm.norm.weight"}


@pytest.mark.parametrize("model_type", ["clip_vision_model", "siglip_vision_model"], ids=["clip", "siglip"])
def test_a_trainable_tower_trains_what_its_features_pass_through(model_type):
    model = tiny_vlm(model_type)
    freezing.apply_policy(model, "projector", train_vision=True, uses_images=True)
    moved = moved_by_one_step(model)
    tower = {n for n in moved if n.startswith("vision.")}
    post = {"vision.model.post_layernorm.weight", "vision.model.post_layernorm.bias"}
    assert tower and not any(n.startswith(UNUSED[model_type]) for n in tower)
    assert (post <= tower) == (model_type == "siglip_vision_model")
    params = dict(model.named_parameters())
    assert all(params[n].requires_grad == (n in moved) for n in params)  # nothing trainable that cannot move
