"""export-hf / import-hf at tiny size: transformers' generate equals our engine, and the round trip is exact."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from PIL import Image

from minimind_v import cli
from minimind_v.data.template import build_prompt
from minimind_v.errors import UserError
from minimind_v.infer.engine import Engine, SamplingParams
from minimind_v.model.vlm import MiniMindVLM
from minimind_v.modeldir import read_config


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    return Engine.load(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "export"
    assert cli.main(["convert", "export-hf", "--model", str(tiny_model_dir), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def transformers_side(exported):
    """The export loaded the way a transformers user would, with minimind_v made impossible to import."""
    from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "minimind_v", None)  # any `import minimind_v...` now fails
        model = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(exported, trust_remote_code=True)
        processor = AutoImageProcessor.from_pretrained(exported)
    return model.eval(), tokenizer, processor


def picture(color) -> Image.Image:
    return Image.new("RGB", (50, 36), color)


def test_export_layout(exported):
    config = json.loads((exported / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_minimind_v.MiniMindVConfig",
                                  "AutoModelForCausalLM": "modeling_minimind_v.MiniMindVForCausalLM"}
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                 "generation_config.json", "configuration_minimind_v.py", "modeling_minimind_v.py"):
        assert (exported / name).is_file(), name
    code = (exported / "modeling_minimind_v.py").read_text() + (exported / "configuration_minimind_v.py").read_text()
    assert "minimind_v." not in code.replace("configuration_minimind_v", "").replace("modeling_minimind_v", "")


@pytest.mark.parametrize("n_images", [0, 1])
def test_transformers_generate_equals_engine(engine, transformers_side, n_images):
    model, tokenizer, processor = transformers_side
    images = [picture((200, 40, 40))] * n_images
    messages = [{"role": "user", "content": "<image>\n" * n_images + "describe the image"}]
    ours = engine.chat(messages, images, SamplingParams(max_new_tokens=12))

    prompt = build_prompt(tokenizer, messages, model.config.image_token_id, model.config.image_token_len)
    ids = torch.tensor([prompt])
    pixels = processor(images=images, return_tensors="pt")["pixel_values"] if images else None
    if images:  # the exported preprocessing is the one our engine uses
        assert torch.allclose(pixels, engine.encode_images(images), atol=1e-5)
    with torch.inference_mode():
        logits = model(ids, pixel_values=pixels).logits
        out = model.generate(ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, max_new_tokens=12,
                             do_sample=False)
        reference = engine.model(ids, pixel_values=engine.encode_images(images) if images else None).logits
    assert torch.allclose(logits, reference, atol=1e-5)
    new = out[0, len(prompt):].tolist()
    if ours.finish_reason == "stop":  # transformers keeps the stop token it ended on; ours does not
        stops = model.generation_config.eos_token_id
        assert new[-1] in (stops if isinstance(stops, list) else [stops])
        new = new[:-1]
    assert new == ours.token_ids
    assert len(set(new)) > 3  # a varied answer: the comparison means something


def test_transformers_left_padded_batch_equals_engine(engine, transformers_side):
    model, tokenizer, processor = transformers_side
    conversations = [[{"role": "user", "content": "<image>\nwhat color"}], [{"role": "user", "content": "hi"}]]
    prompts = [build_prompt(tokenizer, m, model.config.image_token_id, model.config.image_token_len)
               for m in conversations]
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    pixels = processor(images=[picture((20, 200, 20))], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=8, do_sample=False)
    ours = engine.generate(prompts, [[picture((20, 200, 20))], []], SamplingParams(max_new_tokens=8))
    for row, done in zip(out[:, width:].tolist(), ours):
        assert row[:len(done.token_ids)] == done.token_ids


def test_import_hf_round_trip_is_exact(tiny_model_dir, exported, engine, tmp_path):
    back = tmp_path / "back"
    assert cli.main(["convert", "import-hf", "--src", str(exported), "--out", str(back)]) == 0
    assert read_config(back) == read_config(tiny_model_dir)
    model = MiniMindVLM.from_pretrained(back).eval()
    prompt = build_prompt(engine.tokenizer, [{"role": "user", "content": "<image>\nwhat"}],
                          engine.config.image_token_id, engine.config.image_token_len)
    ids, pixels = torch.tensor([prompt]), engine.encode_images([picture((9, 9, 200))])
    with torch.inference_mode():
        assert torch.equal(model(ids, pixel_values=pixels).logits, engine.model(ids, pixel_values=pixels).logits)
    again = Engine.load(back, device="cpu")
    messages = [{"role": "user", "content": "a red square"}]
    params = SamplingParams(max_new_tokens=10)
    assert again.chat(messages, [], params).text == engine.chat(messages, [], params).text


def test_import_hf_refuses_other_directories(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="expected 'minimind_v'"):
        from minimind_v.convert.hf import import_hf
        import_hf(tiny_model_dir, tmp_path / "out")
