"""convert import-upstream: a .pth in the original layout gives the original's logits; bad files exit 2."""

import json

import minimind_reference as reference
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from minimind_v import cli, presets
from minimind_v.data.tokenizer import load_tokenizer
from minimind_v.model.config import LMConfig, VisionConfig, VLMConfig
from minimind_v.modeldir import MiniMindVLM

H, LAYERS, FFN, VISION = 64, 2, 192, 24  # FFN = 64 * ceil(int(8 * 64 / 3) / 64)


@pytest.fixture
def setup(tmp_path, tokenizer_dir, monkeypatch):
    """Upstream-shaped presets at a tiny size (8 heads, 2 KV heads) and a tiny CLIP tower on disk."""
    vocab = len(load_tokenizer(tokenizer_dir))
    vision = VisionConfig(name_or_path="set by --vision", hidden_size=VISION, image_size=32, num_patches=16)
    for name, moe in (("upstream-tiny", False), ("upstream-tiny-moe", True)):
        lm = LMConfig(vocab_size=vocab, hidden_size=H, num_hidden_layers=LAYERS, max_position_embeddings=256,
                      use_moe=moe)
        monkeypatch.setitem(presets.PRESETS, name, VLMConfig(lm=lm, vision=vision))
    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=VISION, intermediate_size=48, num_hidden_layers=1,
                                            num_attention_heads=4, image_size=32, patch_size=8)).eval()
    clip.save_pretrained(tmp_path / "clip")
    return tmp_path, tokenizer_dir, vocab, clip


def original_state(vocab: int, moe: bool, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random weights in the original's layout and dtype: fp16, both tied copies stored."""
    gen = torch.Generator().manual_seed(seed)

    def w(*shape, scale=0.1):
        return (torch.randn(*shape, generator=gen) * scale).half()

    def ffn(prefix):
        return {prefix + "gate_proj.weight": w(FFN, H), prefix + "down_proj.weight": w(H, FFN),
                prefix + "up_proj.weight": w(FFN, H)}

    embed = w(vocab, H, scale=0.5)
    sd = {"model.embed_tokens.weight": embed, "lm_head.weight": embed.clone(),
          "model.norm.weight": 1 + w(H), "vision_proj.vision_proj.0.weight": w(H, VISION),
          "vision_proj.vision_proj.0.bias": w(H)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        sd |= {p + "self_attn.q_proj.weight": w(H, H), p + "self_attn.k_proj.weight": w(2 * H // 8, H),
               p + "self_attn.v_proj.weight": w(2 * H // 8, H), p + "self_attn.o_proj.weight": w(H, H),
               p + "input_layernorm.weight": 1 + w(H), p + "post_attention_layernorm.weight": 1 + w(H)}
        if moe:
            for e in range(4):
                sd |= ffn(f"{p}mlp.experts.{e}.")
            sd |= ffn(p + "mlp.shared_experts.0.") | {p + "mlp.gate.weight": w(4, H)}
        else:
            sd |= ffn(p + "mlp.")
    return sd


def run_import(root, tok, pth, preset="upstream-tiny"):
    return cli.main(["convert", "import-upstream", "--pth", str(pth), "--preset", preset,
                     "--vision", str(root / "clip"), "--tokenizer", str(tok), "--out", str(root / "out")])


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_import_gives_the_original_logits(setup, moe, capsys):
    root, tok, vocab, clip = setup
    sd = original_state(vocab, moe)
    torch.save(sd, root / "sft_vlm.pth")
    assert run_import(root, tok, root / "sft_vlm.pth", "upstream-tiny-moe" if moe else "upstream-tiny") == 0

    at = load_tokenizer(tok).encode("@", add_special_tokens=False)[0]
    config = json.loads((root / "out" / "config.json").read_text())
    assert (config["image_token"], config["image_token_id"], config["image_token_len"]) == ("@", at, 16)
    assert config["vision"]["name_or_path"] == str(root / "clip") and config["projector"] == "linear"
    assert (root / "out" / "tokenizer.json").is_file() and not (root / "out" / "vision").exists()

    torch.manual_seed(3)
    ids = torch.randint(4, vocab, (2, 30))
    ids[ids == at] = 4
    ids[0, 2:18], ids[1, 10:26] = at, at
    pixels = torch.randn(2, 3, 32, 32)
    sd32 = {k: v.float() for k, v in sd.items()}
    with torch.no_grad():
        features = clip(pixel_values=pixels).last_hidden_state[:, 1:]
        embeds = sd32["model.embed_tokens.weight"][ids]
        embeds[ids == at] = (features @ sd32["vision_proj.vision_proj.0.weight"].T
                             + sd32["vision_proj.vision_proj.0.bias"]).reshape(-1, H)
        expected = reference.logits(sd32, LAYERS, 8, 2, embeds=embeds, use_moe=moe)
        model = MiniMindVLM.from_pretrained(root / "out").eval()
        assert torch.allclose(model(ids, pixel_values=pixels).logits, expected, atol=1e-4)


def test_llm_only_file_gets_a_fresh_projector(setup, capsys):
    root, tok, vocab, _ = setup
    sd = {k: v for k, v in original_state(vocab, moe=False).items() if not k.startswith("vision_proj.")}
    torch.save(sd, root / "llm.pth")
    assert run_import(root, tok, root / "llm.pth") == 0
    assert "projector is freshly initialised" in capsys.readouterr().out
    ids = torch.randint(40, vocab, (1, 12))
    with torch.no_grad():
        got = MiniMindVLM.from_pretrained(root / "out").eval()(ids).logits
    expected = reference.logits({k: v.float() for k, v in sd.items()}, LAYERS, 8, 2, ids)
    assert torch.allclose(got, expected, atol=1e-4)


def expect_exit_2(root, tok, pth, capsys, *fragments):
    assert run_import(root, tok, pth) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err
    assert not (root / "out").exists()


def test_truncated_and_foreign_files_are_user_errors(setup, capsys):
    root, tok, vocab, _ = setup
    torch.save(original_state(vocab, moe=False), root / "full.pth")
    data = (root / "full.pth").read_bytes()
    (root / "cut.pth").write_bytes(data[: len(data) // 2])
    expect_exit_2(root, tok, root / "cut.pth", capsys, "cut.pth", "not a readable")
    torch.save([1, 2, 3], root / "list.pth")
    expect_exit_2(root, tok, root / "list.pth", capsys, "list.pth", "dict of tensors")
    expect_exit_2(root, tok, root / "absent.pth", capsys, "absent.pth")


def test_wrong_keys_are_listed(setup, capsys):
    root, tok, vocab, _ = setup
    sd = original_state(vocab, moe=False)
    sd["model.layers.0.mlp.gate_projection.weight"] = sd.pop("model.layers.0.mlp.gate_proj.weight")
    torch.save(sd, root / "renamed.pth")
    expect_exit_2(root, tok, root / "renamed.pth", capsys, "unknown: model.layers.0.mlp.gate_projection.weight",
                  "missing: model.layers.0.mlp.gate_proj.weight")


def test_moe_file_against_dense_preset_is_refused(setup, capsys):
    root, tok, vocab, _ = setup
    torch.save(original_state(vocab, moe=True), root / "moe.pth")
    expect_exit_2(root, tok, root / "moe.pth", capsys, "model.layers.0.mlp.experts.0.down_proj.weight")


def test_wrong_shapes_are_named(setup, capsys):
    root, tok, vocab, _ = setup
    sd = original_state(vocab, moe=False)
    sd["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(H, H, dtype=torch.float16)
    torch.save(sd, root / "shape.pth")
    expect_exit_2(root, tok, root / "shape.pth", capsys, "model.layers.1.self_attn.k_proj.weight (64, 64) vs (16, 64)")


def test_untied_head_is_refused(setup, capsys):
    root, tok, vocab, _ = setup
    sd = original_state(vocab, moe=False)
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    torch.save(sd, root / "untied.pth")
    expect_exit_2(root, tok, root / "untied.pth", capsys, "lm_head.weight differs from model.embed_tokens.weight")
