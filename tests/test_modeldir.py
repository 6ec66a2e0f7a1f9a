"""The model directory: save -> load gives identical logits; loads are strict; errors name what is wrong."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from minimind_v.errors import UserError
from minimind_v.model.config import LMConfig, VisionConfig, VLMConfig
from minimind_v.modeldir import MiniMindVLM
from minimind_v.modeldir import embed_tower

IMG, RUN = 5, 16
LM = LMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128)
TOWER = {"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
         "image_size": 32, "patch_size": 8}


def vlm(vision: VisionConfig) -> MiniMindVLM:
    torch.manual_seed(0)
    cfg = VLMConfig(lm=LM, vision=vision, projector="mlp", image_token="<img>", image_token_id=IMG,
                    image_token_len=RUN)
    return MiniMindVLM(cfg).eval()


def inside_tower_model() -> MiniMindVLM:
    init = {"model_type": "clip_vision_model", **TOWER}
    return vlm(VisionConfig(name_or_path="vision", init=init, hidden_size=24, image_size=32, num_patches=RUN,
                            freeze=False))


def logits(model: MiniMindVLM) -> torch.Tensor:
    torch.manual_seed(2)
    ids = torch.randint(6, 64, (2, 40))
    ids[0, 3:3 + RUN], ids[1, 20:20 + RUN] = IMG, IMG
    with torch.no_grad():
        return model(ids, pixel_values=torch.randn(2, 3, 32, 32)).logits


def test_tower_inside_round_trip(tmp_path):
    model = inside_tower_model()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["format_version"] == 1 and config["vision"]["name_or_path"] == "vision"
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "lm.embed_tokens.weight" in keys and "lm.lm_head.weight" not in keys
    assert not any(k.startswith("vision.") for k in keys)
    processor = json.loads((tmp_path / "vision" / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "CLIPImageProcessor" and processor["crop_size"]["height"] == 32
    loaded = MiniMindVLM.from_pretrained(tmp_path).eval()
    assert loaded.lm.lm_head.weight is loaded.lm.embed_tokens.weight
    assert torch.equal(logits(loaded), logits(model))
    loaded.save_pretrained(tmp_path / "again")  # a tower loaded from vision/ travels on
    assert torch.equal(logits(MiniMindVLM.from_pretrained(tmp_path / "again").eval()), logits(model))


def test_referenced_tower_round_trip(tmp_path, monkeypatch):
    torch.manual_seed(1)
    CLIPVisionModel(CLIPVisionConfig(**TOWER)).save_pretrained(tmp_path / "clip")
    monkeypatch.chdir(tmp_path)
    model = vlm(VisionConfig(name_or_path="clip", hidden_size=24, image_size=32, num_patches=RUN, freeze=True))
    model.save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model" / "vision").exists()
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["vision"]["name_or_path"] == str(tmp_path / "clip")  # relative path made absolute
    monkeypatch.chdir("/")
    assert torch.equal(logits(MiniMindVLM.from_pretrained(tmp_path / "model").eval()), logits(model))


def test_embed_tower_makes_the_directory_self_contained(tmp_path):
    torch.manual_seed(1)
    CLIPVisionModel(CLIPVisionConfig(**TOWER)).save_pretrained(tmp_path / "clip")
    model = vlm(VisionConfig(name_or_path=str(tmp_path / "clip"), hidden_size=24, image_size=32, num_patches=RUN,
                             freeze=True))
    model.save_pretrained(tmp_path / "model")
    embed_tower(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["vision"]["name_or_path"] == "vision" and config["vision"]["freeze"] is True
    shutil.rmtree(tmp_path / "clip")
    shutil.move(tmp_path / "model", tmp_path / "moved")
    assert torch.equal(logits(MiniMindVLM.from_pretrained(tmp_path / "moved").eval()), logits(model))
    embed_tower(tmp_path / "moved")  # already inside: nothing to do
    assert torch.equal(logits(MiniMindVLM.from_pretrained(tmp_path / "moved").eval()), logits(model))


def test_tokenizer_is_saved_beside_the_weights(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, "<unk>")))
    tok.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    inside_tower_model().save_pretrained(tmp_path, tokenizer=tok)
    assert (tmp_path / "tokenizer.json").is_file()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == tok.chat_template  # inside the config, as the original keeps it


def rewrite_weights(directory, edit):
    state = load_file(directory / "model.safetensors")
    edit(state)
    save_file(state, directory / "model.safetensors")


def test_strict_load_lists_missing_and_unexpected_keys(tmp_path):
    inside_tower_model().save_pretrained(tmp_path)

    def edit(state):
        state.pop("lm.norm.weight")
        state["lm.extra.weight"] = torch.zeros(1)
    rewrite_weights(tmp_path, edit)
    with pytest.raises(UserError, match=r"missing: lm\.norm\.weight; unexpected: lm\.extra\.weight"):
        MiniMindVLM.from_pretrained(tmp_path)


def test_strict_load_names_key_and_both_shapes(tmp_path):
    inside_tower_model().save_pretrained(tmp_path)
    rewrite_weights(tmp_path, lambda state: state.update({"lm.norm.weight": torch.ones(31)}))
    with pytest.raises(UserError, match=r"lm\.norm\.weight has shape \(31,\), the config needs \(32,\)"):
        MiniMindVLM.from_pretrained(tmp_path)


def test_unreadable_directories_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not a model directory"):
        MiniMindVLM.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json"):
        MiniMindVLM.from_pretrained(tmp_path)
    inside_tower_model().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(UserError, match="model.safetensors"):
        MiniMindVLM.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "lm": {**config["lm"], "bogus": 1}}))
    with pytest.raises(UserError, match=r"lm\.bogus"):
        MiniMindVLM.from_pretrained(tmp_path)


def test_model_package_is_architecture_only():
    """model/ imports no files layer, no CLI and no user errors: modeldir imports model/, never the reverse."""
    import ast
    from pathlib import Path

    import minimind_v.model

    banned = ("minimind_v.modeldir", "minimind_v.errors", "minimind_v.cli", "minimind_v.options",
              "minimind_v.devices", "minimind_v.fileio", "argparse", "safetensors")
    for path in Path(minimind_v.model.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                assert not any(name == b or name.startswith(b + ".") for b in banned), (path.name, name)


def test_the_architecture_alone_has_no_files_and_the_public_class_is_it(tmp_path):
    from minimind_v.model import vlm as architecture

    assert not hasattr(architecture.MiniMindVLM, "from_pretrained")
    assert not hasattr(architecture.MiniMindVLM, "save_pretrained")
    inside_tower_model().save_pretrained(tmp_path)
    loaded = MiniMindVLM.from_pretrained(tmp_path)
    assert isinstance(loaded, architecture.MiniMindVLM) and not loaded.training


def test_preprocessor_config_bytes_of_a_model_directory_and_an_export(tmp_path):
    from minimind_v.modeldir import default_image_processor, write_preprocessor_config

    inside_tower_model().save_pretrained(tmp_path / "model")
    expected = json.dumps(default_image_processor("clip", 32), indent=2)
    assert (tmp_path / "model" / "vision" / "preprocessor_config.json").read_text() == expected + "\n"
    write_preprocessor_config(tmp_path, {"a": [1, 2]}, final_newline=False)
    assert (tmp_path / "preprocessor_config.json").read_bytes() == b'{\n  "a": [\n    1,\n    2\n  ]\n}'


def test_an_unbuildable_tower_in_a_config_is_a_user_error(tmp_path):
    inside_tower_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["vision"].update(name_or_path=str(tmp_path / "elsewhere"), freeze=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"elsewhere' cannot be loaded .*minimind-v download.*--vision DIR"):
        MiniMindVLM.from_pretrained(tmp_path)
