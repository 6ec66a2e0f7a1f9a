"""export-hf of a minimind-3v-shaped model (q/k norms, 2026 numerics, top-1 MoE without a shared expert, the mlp
projector, a SigLIP tower): transformers alone gives our logits and greedy answers, and import-hf is exact."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
from PIL import Image

from minimind_v import cli
from minimind_v.data.template import build_prompt
from minimind_v.data.tokenizer import load_tokenizer
from minimind_v.infer.engine import Engine, SamplingParams
from minimind_v.modeldir import MiniMindVLM, read_config
from minimind_v.presets import get_preset

SIGLIP = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
          "num_attention_heads": 4, "image_size": 32, "patch_size": 8, "num_channels": 3}


@pytest.fixture(scope="module", params=["minimind-3v", "minimind-3v-moe"], ids=["dense", "moe"])
def model_dir(request, tokenizer_dir, tmp_path_factory):
    """The preset at a tiny size with a random SigLIP tower (so it travels inside), matrices drawn wide (std 0.2) so
    that greedy answers vary token to token."""
    tokenizer = load_tokenizer(tokenizer_dir)
    cfg = get_preset(request.param)
    cfg = dataclasses.replace(
        cfg, lm=dataclasses.replace(cfg.lm, vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                    max_position_embeddings=512),
        vision=dataclasses.replace(cfg.vision, name_or_path="vision", init=SIGLIP, hidden_size=32, image_size=32,
                                   num_patches=16),
        image_token_id=tokenizer.convert_tokens_to_ids(cfg.image_token), image_token_len=16)
    torch.manual_seed(0)
    model = MiniMindVLM(cfg)
    with torch.no_grad():
        for p in [*model.lm.parameters(), *model.projector.parameters()]:
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
            elif p.dim() == 1:
                p.uniform_(0.5, 1.5)  # norms away from 1, so a mixed-up norm weight shows
    out = tmp_path_factory.mktemp(request.param) / "model"
    model.save_pretrained(out, tokenizer=tokenizer)
    return out


@pytest.fixture(scope="module")
def exported(model_dir):
    out = model_dir.parent / "export"
    assert cli.main(["convert", "export-hf", "--model", str(model_dir), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def transformers_model(exported):
    """The export as a transformers user loads it, with minimind_v made impossible to import."""
    from transformers import AutoModelForCausalLM

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "minimind_v", None)
        return AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True).eval()


def pictures(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (50, 36), color) for color in [(200, 40, 40), (20, 200, 20)][:n]]


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_transformers_gives_our_logits_and_greedy_answer(model_dir, transformers_model, n_images):
    engine = Engine.load(model_dir, device="cpu")
    assert engine.config.lm.numerics == "2026" and transformers_model.config.lm["numerics"] == "2026"
    messages = [{"role": "user", "content": "<image>\n" * n_images + "what color is it"}]
    images = pictures(n_images)
    ours = engine.chat(messages, images, SamplingParams(max_new_tokens=12))
    prompt = build_prompt(engine.tokenizer, messages, engine.config.image_token_id, engine.config.image_token_len)
    ids = torch.tensor([prompt])
    pixels = engine.encode_images(images) if images else None
    with torch.inference_mode():
        theirs = transformers_model(ids, pixel_values=pixels).logits
        expected = engine.model(ids, pixel_values=pixels).logits
        out = transformers_model.generate(ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                                          max_new_tokens=12, do_sample=False)
    assert torch.allclose(theirs, expected, atol=1e-5)
    new = out[0, len(prompt):].tolist()
    stops = transformers_model.generation_config.eos_token_id
    if ours.finish_reason == "stop":  # transformers keeps the stop token it ended on; ours does not
        assert new[-1] in (stops if isinstance(stops, list) else [stops])
        new = new[:-1]
    assert new == ours.token_ids and len(set(new)) > 3


def test_import_hf_round_trip_is_exact(model_dir, exported, tmp_path):
    back = tmp_path / "back"
    assert cli.main(["convert", "import-hf", "--src", str(exported), "--out", str(back)]) == 0
    assert read_config(back) == read_config(model_dir)
    ours, again = MiniMindVLM.from_pretrained(model_dir), MiniMindVLM.from_pretrained(back)
    engine = Engine.load(model_dir, device="cpu")
    prompt = build_prompt(engine.tokenizer, [{"role": "user", "content": "<image>\nwhat"}],
                          engine.config.image_token_id, engine.config.image_token_len)
    ids, pixels = torch.tensor([prompt]), engine.encode_images(pictures(1))
    with torch.inference_mode():
        assert torch.equal(again(ids, pixel_values=pixels).logits, ours(ids, pixel_values=pixels).logits)


def test_the_exported_image_processing_is_the_siglip_towers(model_dir, exported):
    from transformers import AutoImageProcessor

    engine = Engine.load(model_dir, device="cpu")
    processor = AutoImageProcessor.from_pretrained(exported)
    images = pictures(2)
    assert torch.allclose(processor(images=images, return_tensors="pt")["pixel_values"], engine.encode_images(images),
                          atol=1e-5)


@pytest.mark.parametrize("numerics", ["2025", "2026"])
def test_the_template_rounds_as_we_do_in_bf16_and_ramps_yarn_alike(numerics):
    from minimind_v.convert.hf_template import modeling_minimind_v as template
    from minimind_v.model.config import LMConfig
    from minimind_v.model.llm import rms_norm, rope_frequencies

    lm = LMConfig(hidden_size=96, num_attention_heads=1, rms_norm_eps=1e-6, numerics=numerics,
                  rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 2048,
                                "beta_fast": 32, "beta_slow": 1})
    ours, theirs = rms_norm(96, lm), template.RMSNorm(96, dataclasses.asdict(lm))
    torch.manual_seed(0)
    with torch.no_grad():
        for norm in (ours, theirs):
            norm.weight.copy_(torch.linspace(0.5, 1.5, 96))
        x = (torch.randn(5, 96) * 3).bfloat16()
        assert torch.equal(ours.bfloat16()(x), theirs.bfloat16()(x))
    assert torch.equal(template.rope_frequencies(dataclasses.asdict(lm), 96), rope_frequencies(lm))
