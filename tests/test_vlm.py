"""MiniMindVLM: image k lands exactly in the k-th placeholder run; tower, projector and dtype plumbing."""

import pytest
import torch

from minimind_v.model.config import LMConfig, VisionConfig, VLMConfig
from minimind_v.model.projector import Projector
from minimind_v.model.vlm import MiniMindVLM

IMG, RUN = 5, 16  # placeholder id, placeholders per image


def tiny_vlm(projector="linear", freeze=False, seed=0) -> MiniMindVLM:
    torch.manual_seed(seed)
    init = {"model_type": "clip_vision_model", "hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 1,
            "num_attention_heads": 4, "image_size": 32, "patch_size": 8}
    cfg = VLMConfig(lm=LMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=128),
                    vision=VisionConfig(name_or_path="vision", init=init, hidden_size=24, image_size=32,
                                        num_patches=RUN, freeze=freeze),
                    projector=projector, image_token="<img>", image_token_id=IMG, image_token_len=RUN)
    return MiniMindVLM(cfg).eval()


def ids_with_runs(starts_per_row: list[list[int]], T: int = 60) -> torch.Tensor:
    torch.manual_seed(1)
    ids = torch.randint(6, 64, (len(starts_per_row), T))
    for row, starts in enumerate(starts_per_row):
        for s in starts:
            ids[row, s:s + RUN] = IMG
    return ids


def test_image_k_fills_the_kth_run_row_by_row():
    model = tiny_vlm()
    starts = [[2, 30], [], [10]]  # two images, none, one: images 0, 1 in row 0 and image 2 in row 2
    ids = ids_with_runs(starts)
    features = torch.randn(3, RUN, 24)
    with torch.no_grad():
        plain = model.lm.embed_tokens(ids)
        embeds = model.insert_images(ids, plain.clone(), features)
        projected = model.projector(features)
    runs = [(row, s) for row, row_starts in enumerate(starts) for s in row_starts]
    for k, (row, s) in enumerate(runs):
        assert torch.equal(embeds[row, s:s + RUN], projected[k])
    text = ids != IMG
    assert torch.equal(embeds[text], plain[text])


def test_pixel_values_flat_5d_and_precomputed_features_agree():
    model = tiny_vlm()
    ids = ids_with_runs([[3, 25], [8, 40]])
    pixels = torch.randn(2, 2, 3, 32, 32)  # (B, N, 3, H, W)
    with torch.no_grad():
        five_d = model(ids, pixel_values=pixels).logits
        flat = model(ids, pixel_values=pixels.flatten(0, 1)).logits
        cached = model(ids, image_features=model.encode_images(pixels)).logits
        text_only = model(ids).logits
    assert torch.equal(five_d, flat) and torch.equal(flat, cached)
    assert not torch.allclose(flat, text_only)


def test_placeholder_count_mismatch_names_both_counts():
    model = tiny_vlm()
    ids = ids_with_runs([[3, 25]])
    with pytest.raises(ValueError, match=r"32 image placeholder tokens .* 1 images x 16 features need 16"):
        model(ids, image_features=torch.randn(1, RUN, 24))


def test_decode_step_with_cache_skips_images():
    model = tiny_vlm()
    ids = ids_with_runs([[3]], T=30)
    features = torch.randn(1, RUN, 24)
    with torch.no_grad():
        full = model(ids, image_features=features).logits
        out = model(ids[:, :-1], image_features=features, use_cache=True)
        step = model(ids[:, -1:], image_features=features, past_key_values=out.past_key_values)
    assert torch.allclose(step.logits[:, -1], full[:, -1], atol=1e-5)


def test_features_are_cast_to_the_embedding_dtype():
    model = tiny_vlm()
    ids = ids_with_runs([[3]], T=30)
    features = torch.randn(1, RUN, 24)
    with torch.no_grad():
        reference = model(ids, image_features=features).logits
        from_float64 = model(ids, image_features=features.double()).logits
    assert from_float64.dtype == torch.float32 and torch.allclose(from_float64, reference, atol=1e-6)


def test_frozen_tower_stays_in_eval_and_gets_no_grad_inside_a_training_vlm():
    model = tiny_vlm(freeze=True).train()
    ids = ids_with_runs([[3]], T=30)
    out = model(ids, pixel_values=torch.randn(1, 3, 32, 32), labels=ids)
    out.loss.backward()
    assert not model.vision.training and model.lm.training
    assert all(p.grad is None for p in model.vision.parameters())
    assert model.projector.net[0].weight.grad is not None


def test_projector_kinds():
    linear, mlp = Projector("linear", 24, 32), Projector("mlp", 24, 32)
    assert [type(m).__name__ for m in linear.net] == ["Linear"] and linear.net[0].bias is not None
    assert [type(m).__name__ for m in mlp.net] == ["LayerNorm", "Linear", "GELU", "Linear"]
    assert mlp(torch.randn(2, 7, 24)).shape == (2, 7, 32)
