"""VisionTower: the features the original uses, for CLIP, SigLIP and SigLIP2; frozen means frozen."""

import pytest
import torch
from transformers import (CLIPVisionConfig, CLIPVisionModel, Siglip2VisionConfig, Siglip2VisionModel,
                          SiglipVisionConfig, SiglipVisionModel)

from minimind_v.errors import UserError
from minimind_v.model.config import VisionConfig
from minimind_v.model.vision import TowerConfigError, TowerUnavailable, VisionTower
from minimind_v.modeldir import build_tower

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)


def saved(tmp_path, model_cls, config):
    torch.manual_seed(0)
    model = model_cls(config).eval()
    model.save_pretrained(tmp_path)
    return model


def test_clip_features_are_last_hidden_state_without_cls(tmp_path):
    hf = saved(tmp_path, CLIPVisionModel, CLIPVisionConfig(**SMALL, image_size=32, patch_size=8))
    tower = VisionTower(VisionConfig(name_or_path=str(tmp_path), hidden_size=32, image_size=32, num_patches=16))
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = hf(pixel_values=pixels).last_hidden_state[:, 1:]
    assert tower.family == "clip"
    assert torch.equal(tower(pixels), expected) and expected.shape == (3, 16, 32)


def test_siglip_features_are_last_hidden_state(tmp_path):
    hf = saved(tmp_path, SiglipVisionModel, SiglipVisionConfig(**SMALL, image_size=32, patch_size=8))
    tower = VisionTower(VisionConfig(name_or_path=str(tmp_path), hidden_size=32, image_size=32, num_patches=16))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(tower(pixels), hf(pixel_values=pixels).last_hidden_state)


def test_siglip2_patches_like_its_image_processor(tmp_path):
    from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches

    hf = saved(tmp_path, Siglip2VisionModel, Siglip2VisionConfig(**SMALL, patch_size=8, num_patches=16))
    tower = VisionTower(VisionConfig(name_or_path=str(tmp_path), hidden_size=32, image_size=32, num_patches=16))
    pixels = torch.randn(2, 3, 32, 32)
    patches = torch.stack([torch.from_numpy(convert_image_to_patches(img.numpy(), 8)) for img in pixels])
    with torch.no_grad():
        expected = hf(pixel_values=patches, pixel_attention_mask=torch.ones(2, 16, dtype=torch.long),
                      spatial_shapes=torch.tensor([[4, 4], [4, 4]])).last_hidden_state
    assert torch.allclose(tower(pixels), expected, atol=1e-6)


def test_frozen_tower_stays_frozen_and_in_eval_mode(tmp_path):
    saved(tmp_path, CLIPVisionModel, CLIPVisionConfig(**SMALL, image_size=32, patch_size=8))
    tower = VisionTower(VisionConfig(name_or_path=str(tmp_path), freeze=True))
    torch.nn.Sequential(tower).train()  # the VLM around it going into training
    assert not tower.training and not tower.model.training
    assert not any(p.requires_grad for p in tower.parameters())
    assert not tower(torch.randn(1, 3, 32, 32)).requires_grad


def test_trainable_tower_built_from_init_trains():
    init = {"model_type": "clip_vision_model", **SMALL, "image_size": 32, "patch_size": 8}
    tower = VisionTower(VisionConfig(init=init, hidden_size=32, image_size=32, num_patches=16, freeze=False)).train()
    assert isinstance(tower.model, CLIPVisionModel) and tower.model.config.hidden_size == 32
    assert tower.training and tower(torch.randn(1, 3, 32, 32)).requires_grad


def test_unreachable_hub_id_is_a_one_line_user_error():
    with pytest.raises(UserError, match="minimind-v download") as err:
        build_tower(VisionConfig(name_or_path="nobody/no-such-vision-tower"))
    assert "\n" not in str(err.value)


def test_the_model_names_the_unloadable_tower_but_no_flag():
    """model/ knows no CLI: the hint about `download` and --vision is added by modeldir.build_tower."""
    with pytest.raises(TowerUnavailable, match=r"^vision tower 'nobody/no-such-vision-tower' cannot be loaded \(") as err:
        VisionTower(VisionConfig(name_or_path="nobody/no-such-vision-tower"))
    assert not isinstance(err.value, UserError) and "--vision" not in str(err.value)
    with pytest.raises(UserError) as user:
        build_tower(VisionConfig(name_or_path="nobody/no-such-vision-tower"))
    assert str(user.value) == f"{err.value}; fetch it with `minimind-v download` or pass a local directory with --vision DIR"


def test_an_unsupported_tower_type_is_a_config_error_not_a_load_failure(tmp_path):
    init = {"model_type": "vit", **SMALL}
    with pytest.raises(TowerConfigError, match="model_type 'vit': supported are CLIP, SigLIP and SigLIP2"):
        VisionTower(VisionConfig(init=init, hidden_size=32, image_size=32, num_patches=16))
    CLIPVisionConfig(**SMALL).save_pretrained(tmp_path)  # a pretrained folder of the wrong type: same message
    config = (tmp_path / "config.json").read_text().replace("clip_vision_model", "vit")
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(UserError, match=r"^vision tower model_type 'vit': supported are CLIP, SigLIP and SigLIP2$"):
        build_tower(VisionConfig(name_or_path=str(tmp_path)))


@pytest.mark.parametrize("family", ["clip_vision_model", "siglip_vision_model"])
def test_position_init_std_sets_only_the_position_table_of_a_new_tower(family):
    init = {"model_type": family, **SMALL, "image_size": 32, "patch_size": 8}
    cfg = VisionConfig(name_or_path=None, init=init, hidden_size=32, image_size=32, num_patches=16, freeze=False)
    torch.manual_seed(0)
    default = VisionTower(cfg)
    torch.manual_seed(0)
    wide = VisionTower(VisionConfig(**{**vars(cfg), "position_init_std": 0.5}))
    positions = [n for n, _ in wide.named_parameters() if "position_embedding" in n]
    assert positions
    for (name, a), (_, b) in zip(default.named_parameters(), wide.named_parameters()):
        if name in positions:
            assert 0.4 < b.std().item() < 0.6 and a.std().item() < 0.3
        else:
            assert torch.equal(a, b), name


def test_position_init_std_must_be_positive():
    init = {"model_type": "clip_vision_model", **SMALL, "image_size": 32, "patch_size": 8}
    cfg = VisionConfig(name_or_path=None, init=init, hidden_size=32, image_size=32, num_patches=16, freeze=False,
                       position_init_std=-0.5)
    with pytest.raises(UserError, match="position_init_std -0.5: must be positive"):
        build_tower(cfg)
    with pytest.raises(TowerConfigError, match="position_init_std -0.5: must be positive"):
        VisionTower(cfg)


def full_clip(tmp_path, drop: str | None = None):
    """A whole CLIPModel checkpoint (text half included), the form the hub's CLIP towers come in."""
    from safetensors.torch import load_file, save_file
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(text_config=dict(SMALL, vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1),
                        vision_config=dict(SMALL, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(tmp_path)
    if drop is not None:
        weights = load_file(tmp_path / "model.safetensors")
        del weights[drop]
        save_file(weights, tmp_path / "model.safetensors", {"format": "pt"})
    return model


def test_full_clip_checkpoint_loads_its_vision_half_and_says_so_in_one_line(tmp_path, capfd, caplog):
    full = full_clip(tmp_path)
    capfd.readouterr()
    tower = VisionTower(VisionConfig(name_or_path=str(tmp_path), hidden_size=32, image_size=32, num_patches=16))
    err = capfd.readouterr().err
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(tower(pixels), full.vision_model(pixel_values=pixels).last_hidden_state[:, 1:])
    for shown in (err, caplog.text):  # transformers logs its report; we print our line
        assert "LOAD REPORT" not in shown and "UNEXPECTED" not in shown
    lines = [line for line in err.splitlines() if "text half" in line]
    text_side = sum(1 for k in full.state_dict() if not k.startswith("vision_model."))
    assert lines == [f"vision tower {tmp_path}: a full clip checkpoint; its text half ({text_side} tensors) is not used"]


def test_full_checkpoint_missing_a_vision_weight_keeps_transformers_report(tmp_path, caplog):
    full_clip(tmp_path, drop="vision_model.post_layernorm.weight")
    VisionTower(VisionConfig(name_or_path=str(tmp_path), hidden_size=32, image_size=32, num_patches=16))
    assert "LOAD REPORT" in caplog.text and "post_layernorm.weight" in caplog.text and "MISSING" in caplog.text
