"""convert import-upstream of minimind-3v files: the original's logits, dense and MoE; the wrong generation exits 2."""

import json
from pathlib import Path

import minimind_reference as reference
import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from minimind_v import cli, presets
from minimind_v.convert.upstream import config_for_tokenizer
from minimind_v.data.tokenizer import load_tokenizer
from minimind_v.errors import UserError
from minimind_v.model.config import LMConfig, VisionConfig, VLMConfig
from minimind_v.modeldir import MiniMindVLM

H, LAYERS, HEADS, KV_HEADS, FFN, VISION, EXPERTS = 64, 2, 4, 2, 208, 24, 4  # FFN = 64 * ceil(64 * pi / 64)
D = H // HEADS
PRESET, PRESET_MOE = "upstream-3v-tiny", "upstream-3v-tiny-moe"


@pytest.fixture
def setup(tmp_path, tokenizer_dir, monkeypatch):
    """minimind-3v-shaped presets at a tiny size (the real ones with smaller numbers) and a tiny SigLIP tower."""
    vocab = len(load_tokenizer(tokenizer_dir))
    for name, real in ((PRESET, "minimind-3v"), (PRESET_MOE, "minimind-3v-moe")):
        cfg = presets.get_preset(real)
        lm = LMConfig(**{**vars(cfg.lm), "vocab_size": vocab, "hidden_size": H, "num_hidden_layers": LAYERS,
                         "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "intermediate_size": FFN,
                         "max_position_embeddings": 256})
        vision = VisionConfig(name_or_path="set by --vision", hidden_size=VISION, image_size=32, num_patches=16)
        monkeypatch.setitem(presets.PRESETS, name, VLMConfig(lm=lm, vision=vision))
    torch.manual_seed(0)
    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=VISION, intermediate_size=48, num_hidden_layers=1,
                                                  num_attention_heads=4, image_size=32, patch_size=8)).eval()
    siglip.save_pretrained(tmp_path / "siglip")
    return tmp_path, tokenizer_dir, vocab, siglip


def original_state(vocab: int, moe: bool, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random weights in minimind-3v's layout and dtype: fp16, both tied copies, q/k norms, the mlp projector."""
    gen = torch.Generator().manual_seed(seed)

    def w(*shape, scale=0.1):
        return (torch.randn(*shape, generator=gen) * scale).half()

    def ffn(prefix):
        return {prefix + "gate_proj.weight": w(FFN, H), prefix + "down_proj.weight": w(H, FFN),
                prefix + "up_proj.weight": w(FFN, H)}

    embed = w(vocab, H, scale=0.5)
    sd = {"model.embed_tokens.weight": embed, "lm_head.weight": embed.clone(), "model.norm.weight": 1 + w(H),
          "vision_proj.mlp.0.weight": 1 + w(VISION), "vision_proj.mlp.0.bias": w(VISION),
          "vision_proj.mlp.1.weight": w(H, VISION, scale=0.3), "vision_proj.mlp.1.bias": w(H),
          "vision_proj.mlp.3.weight": w(H, H, scale=0.3), "vision_proj.mlp.3.bias": w(H)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        sd |= {p + "self_attn.q_proj.weight": w(H, H), p + "self_attn.k_proj.weight": w(KV_HEADS * D, H),
               p + "self_attn.v_proj.weight": w(KV_HEADS * D, H), p + "self_attn.o_proj.weight": w(H, H),
               p + "self_attn.q_norm.weight": 1 + w(D), p + "self_attn.k_norm.weight": 1 + w(D),
               p + "input_layernorm.weight": 1 + w(H), p + "post_attention_layernorm.weight": 1 + w(H)}
        if moe:
            for e in range(EXPERTS):
                sd |= ffn(f"{p}mlp.experts.{e}.")
            sd[p + "mlp.gate.weight"] = w(EXPERTS, H, scale=1.0)
        else:
            sd |= ffn(p + "mlp.")
    return sd


def run_import(root: Path, tok: Path, pth: Path, preset: str) -> int:
    return cli.main(["convert", "import-upstream", "--pth", str(pth), "--preset", preset,
                     "--vision", str(root / "siglip"), "--tokenizer", str(tok), "--out", str(root / "out")])


RUNS = [(0, 2), (0, 20), (1, 10)]
"""Where the placeholder runs start, (row, position), in the order the images fill them."""


def inputs(vocab: int, pad: int, n_images: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Two rows of 40 tokens with the first n_images runs of RUNS: 2 is two images in one row, 3 adds one in the
    other row."""
    torch.manual_seed(3)
    ids = torch.randint(4, vocab, (2, 40))
    ids[ids == pad] = 4
    for row, start in RUNS[:n_images]:
        ids[row, start:start + 16] = pad
    return ids, (torch.randn(n_images, 3, 32, 32) if n_images else None)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_import_gives_the_original_3v_logits(setup, moe):
    root, tok, vocab, siglip = setup
    sd = original_state(vocab, moe)
    torch.save(sd, root / "sft_vlm_768.pth")
    assert run_import(root, tok, root / "sft_vlm_768.pth", PRESET_MOE if moe else PRESET) == 0
    pad = load_tokenizer(tok).convert_tokens_to_ids("<|image_pad|>")
    config = json.loads((root / "out" / "config.json").read_text())
    assert (config["image_token"], config["image_token_id"], config["image_token_len"]) == ("<|image_pad|>", pad, 16)
    assert config["projector"] == "mlp" and config["lm"]["numerics"] == "2026" and config["lm"]["qk_norm"]

    sd32 = {k: v.float() for k, v in sd.items()}
    model = MiniMindVLM.from_pretrained(root / "out").eval()
    for n_images in (0, 1, 2, 3):
        ids, pixels = inputs(vocab, pad, n_images)
        with torch.no_grad():
            embeds = sd32["model.embed_tokens.weight"][ids]
            if pixels is not None:
                features = siglip(pixel_values=pixels).last_hidden_state  # post-layernorm included
                embeds[ids == pad] = reference.mlp_projector(features, sd32).reshape(-1, H)
            expected = reference.logits(sd32, LAYERS, HEADS, KV_HEADS, embeds=embeds, use_moe=moe, qk_norm=True,
                                        generation="2026")
            got = model(ids, pixel_values=pixels).logits
        diff = float((got - expected).abs().max())
        print(f"3v {'moe' if moe else 'dense'} {n_images} image(s): max |logit diff| {diff:.2e}")
        assert diff < 2e-3 and torch.allclose(got, expected, atol=1e-4), diff


def expect_exit_2(root, tok, pth, preset, capsys, *fragments):
    assert run_import(root, tok, pth, preset) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in (str(pth), *fragments):
        assert fragment in err, err
    assert not (root / "out").exists()


def test_a_2025_file_with_a_3v_preset_is_refused(setup, capsys):
    root, tok, vocab, _ = setup
    sd = {k: v for k, v in original_state(vocab, moe=False).items()  # an llm_*.pth of 2025 has neither
          if not k.endswith(("q_norm.weight", "k_norm.weight")) and not k.startswith("vision_proj.")}
    torch.save(sd, root / "llm_512.pth")
    expect_exit_2(root, tok, root / "llm_512.pth", PRESET, capsys, "MiniMind2-V (2025) checkpoint",
                  "no *.self_attn.q_norm.* keys", "minimind-3v (2026) model", "minimind2-small-v")


def test_a_3v_file_with_a_2025_preset_is_refused(setup, capsys):
    root, tok, vocab, _ = setup
    torch.save(original_state(vocab, moe=False), root / "sft_vlm_768.pth")
    expect_exit_2(root, tok, root / "sft_vlm_768.pth", "minimind2-v", capsys, "minimind-3v (2026) checkpoint",
                  "model.layers.0.self_attn.q_norm.weight", "MiniMind2-V (2025) model", "minimind-3v, ")


def test_a_dense_3v_file_with_the_moe_preset_and_the_reverse_are_refused(setup, capsys):
    root, tok, vocab, _ = setup
    torch.save(original_state(vocab, moe=False), root / "dense.pth")
    expect_exit_2(root, tok, root / "dense.pth", PRESET_MOE, capsys, "a dense checkpoint",
                  "model.layers.0.mlp.gate_proj.weight", "the preset is MoE", PRESET)
    torch.save(original_state(vocab, moe=True), root / "moe.pth")
    expect_exit_2(root, tok, root / "moe.pth", PRESET, capsys, "a MoE checkpoint",
                  "model.layers.0.mlp.experts.0.down_proj.weight", "the preset is dense", "minimind-3v-moe")


def test_a_clip_tower_with_a_3v_preset_is_refused(setup, capsys):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    root, tok, vocab, _ = setup
    torch.save(original_state(vocab, moe=False), root / "sft.pth")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=VISION, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=4, image_size=32, patch_size=8)).save_pretrained(root / "clip")
    code = cli.main(["convert", "import-upstream", "--pth", str(root / "sft.pth"), "--preset", PRESET, "--vision",
                     str(root / "clip"), "--tokenizer", str(tok), "--out", str(root / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "a clip tower" in err and "siglip" in err and str(root / "clip") in err


@pytest.fixture(scope="session")
def tokenizers_3v_and_2025():
    """The two original tokenizers from shared/reference/ beside the checkout (never committed); skips if absent."""
    for shared in (Path(__file__).resolve().parents[2] / "shared", Path("/work/shared")):
        found = [shared / "reference" / name for name in ("minimind-3v-tokenizer", "minimind2-v-tokenizer")]
        if all(path.is_dir() for path in found):
            return found
    pytest.skip("original tokenizers not found in shared/reference/ beside the checkout")


def test_the_3v_tokenizer_gives_the_presets_placeholder_and_the_2025_one_cannot(tokenizers_3v_and_2025):
    new, old = tokenizers_3v_and_2025
    cfg = config_for_tokenizer("minimind-3v", "tower", load_tokenizer(new), str(new))
    assert (cfg.image_token, cfg.image_token_id) == ("<|image_pad|>", presets.get_preset("minimind-3v").image_token_id)
    assert (cfg.image_token_len, cfg.vision.freeze, cfg.projector) == (64, True, "mlp")
    with pytest.raises(UserError, match="'<|image_pad|>' is not a single token"):
        config_for_tokenizer("minimind-3v-moe", "tower", load_tokenizer(old), str(old))
