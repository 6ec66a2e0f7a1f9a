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
from minimind_v.modeldir import MiniMindVLM
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


@pytest.fixture(scope="module")
def hf_processor(exported, transformers_side):
    """AutoProcessor of the export, loaded and called with minimind_v unimportable."""
    from transformers import AutoProcessor

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "minimind_v", None)
        yield AutoProcessor.from_pretrained(exported, trust_remote_code=True)


def without_minimind_v(run):
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "minimind_v", None)
        return run()


def answer_tokens(model, row: list[int]) -> list[int]:
    """A generated row as our engine reports it: the stop token transformers keeps, dropped."""
    stops = model.generation_config.eos_token_id
    stops = stops if isinstance(stops, list) else [stops]
    return row[:-1] if row and row[-1] in stops else row


def picture(color) -> Image.Image:
    return Image.new("RGB", (50, 36), color)


def test_export_layout(exported):
    config = json.loads((exported / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_minimind_v.MiniMindVConfig",
                                  "AutoModelForCausalLM": "modeling_minimind_v.MiniMindVForCausalLM",
                                  "AutoProcessor": "processing_minimind_v.MiniMindVProcessor"}
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                 "processor_config.json", "generation_config.json", "configuration_minimind_v.py",
                 "modeling_minimind_v.py", "processing_minimind_v.py"):
        assert (exported / name).is_file(), name
    code = "".join((exported / f"{kind}_minimind_v.py").read_text() for kind in ("modeling", "configuration",
                                                                                  "processing"))
    for kind in ("configuration", "modeling", "processing"):
        code = code.replace(f"{kind}_minimind_v", "")
    assert "minimind_v." not in code


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


COLORS = [(200, 40, 40), (20, 200, 20), (30, 30, 220)]


def parts_message(n_images: int, text: str) -> dict:
    """transformers' multimodal convention: a list of parts, the images first."""
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


@pytest.mark.parametrize("n_images", [0, 1, 2])
@pytest.mark.parametrize("content", ["string", "parts"])
def test_processor_generate_equals_engine(engine, transformers_side, hf_processor, n_images, content):
    model = transformers_side[0]
    images = [picture(c) for c in COLORS[:n_images]]
    text = "what color is it" if n_images < 2 else "which one is red"
    ours_messages = [{"role": "user", "content": "<image>\n" * n_images + text}]
    messages = ours_messages if content == "string" else [parts_message(n_images, text)]
    ours = engine.chat(ours_messages, images, SamplingParams(max_new_tokens=12))

    def transformers_only():
        prompt = hf_processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = hf_processor(text=prompt, images=images or None, return_tensors="pt")
        with torch.inference_mode():
            return inputs, model.generate(**inputs, max_new_tokens=12, do_sample=False)

    inputs, out = without_minimind_v(transformers_only)
    expected_prompt = build_prompt(engine.tokenizer, ours_messages, engine.config.image_token_id,
                                   engine.config.image_token_len)
    assert inputs["input_ids"][0].tolist() == expected_prompt
    if images:
        assert torch.allclose(inputs["pixel_values"], engine.encode_images(images), atol=1e-5)
    new = answer_tokens(model, out[0, inputs["input_ids"].shape[1]:].tolist())
    assert new == ours.token_ids
    assert len(set(new)) > 3


def test_processor_left_padded_batch_of_three_equals_engine(engine, transformers_side, hf_processor):
    model = transformers_side[0]
    asked = [(2, "which one is green"), (0, "hi"), (1, "describe the image in a few words please")]
    images = [[picture(COLORS[0]), picture(COLORS[1])], [], [picture(COLORS[2])]]

    def transformers_only():
        prompts = hf_processor.apply_chat_template([[parts_message(n, text)] for n, text in asked],
                                                   add_generation_prompt=True)
        inputs = hf_processor(text=prompts, images=images, return_tensors="pt")
        with torch.inference_mode():
            return inputs, model.generate(**inputs, max_new_tokens=10, do_sample=False)

    inputs, out = without_minimind_v(transformers_only)
    mask = inputs["attention_mask"]
    assert len(set(mask.sum(1).tolist())) == 3 and (mask[:, -1] == 1).all()  # three lengths, padded on the left
    ours_prompts = [build_prompt(engine.tokenizer, [{"role": "user", "content": "<image>\n" * n + text}],
                                 engine.config.image_token_id, engine.config.image_token_len) for n, text in asked]
    ours = engine.generate(ours_prompts, images, SamplingParams(max_new_tokens=10))
    width = inputs["input_ids"].shape[1]
    for row, done in zip(out[:, width:].tolist(), ours):
        assert answer_tokens(model, row[:len(done.token_ids) + 1]) == done.token_ids


def test_processor_tokenized_chat_carries_the_images(transformers_side, hf_processor):
    images = [picture(COLORS[0]), picture(COLORS[2])]
    messages = [{"role": "user", "content": [{"type": "image", "image": images[0]},
                                             {"type": "image", "image": images[1]},
                                             {"type": "text", "text": "which one is blue"}]}]

    def transformers_only():
        direct = hf_processor(text=hf_processor.apply_chat_template(messages, add_generation_prompt=True),
                              images=images)
        return direct, hf_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                        return_dict=True)

    direct, tokenized = without_minimind_v(transformers_only)
    assert torch.equal(tokenized["input_ids"], direct["input_ids"])
    assert torch.equal(tokenized["pixel_values"], direct["pixel_values"])
    with pytest.raises(ValueError, match="1 <image> marker"):
        hf_processor(text="<image>\nwhat", images=images)


def test_sampled_generation_with_cache_equals_without(transformers_side, hf_processor):
    """Cached decoding is the same computation as recomputing the whole sequence, sampling included."""
    model = transformers_side[0]
    inputs = hf_processor(text=hf_processor.apply_chat_template([parts_message(1, "what")],
                                                                add_generation_prompt=True),
                          images=[picture(COLORS[1])])
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        with torch.inference_mode():
            outs.append(model.generate(**inputs, max_new_tokens=10, do_sample=True, temperature=1.5, top_k=0,
                                       use_cache=use_cache).tolist())
    assert outs[0] == outs[1]


def test_an_images_first_export_reads_the_image_first_whatever_the_order(images_first_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoProcessor

    out = tmp_path / "export"
    assert cli.main(["convert", "export-hf", "--model", str(images_first_model_dir), "--out", str(out)]) == 0
    engine = Engine.load(images_first_model_dir, device="cpu")
    image = picture(COLORS[1])
    ours = engine.chat([{"role": "user", "content": "what color\n<image>"}], [image], SamplingParams(max_new_tokens=10))

    def transformers_only():
        model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
        answers = []
        for content in ([{"type": "text", "text": "what color"}, {"type": "image"}], "what color\n<image>",
                        "<image>\nwhat color"):
            prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
            inputs = processor(text=prompt, images=[image])
            with torch.inference_mode():
                row = model.generate(**inputs, max_new_tokens=10, do_sample=False)[0].tolist()
            answers.append(answer_tokens(model, row[inputs["input_ids"].shape[1]:]))
        return answers

    assert without_minimind_v(transformers_only) == [ours.token_ids] * 3

    # The processor moves images as our template does, labelled lines ("first: <image>") whole.
    contents = ["compare\nfirst: <image>\nsecond: <image>", "第一张：<image>\n第二张：<image>\n比较",
                "what color is it? <image>\n<image>", "a\n\nb <image> c\n<image>"]

    def processor_ids():
        processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
        return [processor(text=processor.apply_chat_template([{"role": "user", "content": c}],
                                                              add_generation_prompt=True),
                          images=[image, image])["input_ids"][0].tolist() for c in contents]

    cfg = engine.config
    assert without_minimind_v(processor_ids) == [
        build_prompt(engine.tokenizer, [{"role": "user", "content": c}], cfg.image_token_id, cfg.image_token_len,
                     images_first=True) for c in contents]
    assert cli.main(["convert", "import-hf", "--src", str(out), "--out", str(tmp_path / "back")]) == 0
    assert read_config(tmp_path / "back") == read_config(images_first_model_dir)
    assert read_config(tmp_path / "back").images_first


def test_the_export_config_defaults_are_lmconfig_defaults():
    """The template's LM_DEFAULTS stand in for LMConfig's when an older export lacks a key: they must agree."""
    import dataclasses

    from minimind_v.convert.hf_template.configuration_minimind_v import LM_DEFAULTS
    from minimind_v.model.config import LMConfig

    assert LM_DEFAULTS == dataclasses.asdict(LMConfig())


def test_lm_defaults_are_the_lmconfig_field_defaults_field_by_field():
    """LM_DEFAULTS repeats LMConfig's defaults (the template may not import minimind_v): same keys, same values."""
    import dataclasses

    from minimind_v.convert.hf_template.configuration_minimind_v import LM_DEFAULTS
    from minimind_v.model.config import LMConfig

    fields = {f.name: f.default for f in dataclasses.fields(LMConfig)}
    assert set(LM_DEFAULTS) == set(fields)
    for name, default in fields.items():
        assert LM_DEFAULTS[name] == default, name
        assert type(LM_DEFAULTS[name]) is type(default), name  # 1e6 and 1000000 would differ in config.json


def test_the_template_config_defaults_are_vlmconfig_and_visionconfig_defaults():
    """MiniMindVConfig() stands for VLMConfig() when an export lacks a key: every repeated default agrees."""
    from minimind_v.convert.hf_template.configuration_minimind_v import MiniMindVConfig
    from minimind_v.model.config import VLMConfig

    ours, theirs = VLMConfig(), MiniMindVConfig()
    for name in ("projector", "image_token", "image_token_id", "image_token_len", "images_first"):
        assert getattr(theirs, name) == getattr(ours, name), name
    assert theirs.vision_hidden_size == ours.vision.hidden_size
    assert theirs.vision_settings == {k: getattr(ours.vision, k) for k in ("image_size", "num_patches", "freeze")}


@pytest.mark.parametrize("lm", [{}, {"hidden_size": 768}, {"hidden_size": 768, "num_attention_heads": 8,
                                                             "intermediate_size": 2432}])
def test_the_template_derives_head_dim_and_ffn_size_as_lmconfig_does(lm):
    import dataclasses

    from minimind_v.convert.hf_template.configuration_minimind_v import MiniMindVConfig
    from minimind_v.model.config import LMConfig

    ours, theirs = LMConfig(**lm), MiniMindVConfig(lm=lm)
    assert (theirs.head_dim, theirs.ffn_size) == (ours.head_dim, ours.ffn_size)
    assert theirs.lm == dataclasses.asdict(ours)


def test_the_template_knows_the_same_tower_families_and_image_marker():
    import inspect

    from minimind_v.constants import IMAGE_MARKER
    from minimind_v.convert.hf_template.modeling_minimind_v import TOWERS
    from minimind_v.convert.hf_template.processing_minimind_v import MiniMindVProcessor
    from minimind_v.model.vision import FAMILIES

    assert set(TOWERS) == set(FAMILIES)
    assert inspect.signature(MiniMindVProcessor).parameters["image_marker"].default == IMAGE_MARKER


def test_the_export_writes_every_setting_the_processor_reads(exported):
    from minimind_v.constants import IMAGE_MARKER
    from minimind_v.convert.hf_template.processing_minimind_v import SETTINGS

    settings = json.loads((exported / "processor_config.json").read_text())
    assert set(SETTINGS) <= set(settings) and settings["image_marker"] == IMAGE_MARKER
