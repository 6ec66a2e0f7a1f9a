"""The minimind-3v presets and the 2026 numerics, each against UPSTREAM_FORMAT's words (minimind_reference)."""

import dataclasses
import math

import minimind_reference as reference
import pytest
import torch

from minimind_v.model.config import SIGLIP2_B32_256, LMConfig
from minimind_v.model.llm import MiniMindLM, MoEFeedForward, RMSNorm, rope_frequencies, rope_tables
from minimind_v.model.projector import Projector
from minimind_v.presets import get_preset


def tiny_3v(**overrides) -> LMConfig:
    lm = get_preset("minimind-3v-moe").lm
    return dataclasses.replace(lm, **{"vocab_size": 97, "hidden_size": 32, "num_hidden_layers": 2,
                                      "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
                                      "max_position_embeddings": 64, **overrides})


def test_the_presets_are_the_documented_3v():
    dense, moe = get_preset("minimind-3v"), get_preset("minimind-3v-moe")
    lm = dense.lm
    assert (lm.hidden_size, lm.num_hidden_layers, lm.num_attention_heads, lm.num_key_value_heads) == (768, 8, 8, 4)
    assert (lm.head_dim, lm.ffn_size, lm.vocab_size) == (96, math.ceil(768 * math.pi / 64) * 64, 6400) == (96, 2432, 6400)
    assert (lm.rms_norm_eps, lm.rope_theta, lm.qk_norm, lm.numerics, lm.use_moe) == (1e-6, 1e6, True, "2026", False)
    assert (dense.projector, dense.image_token, dense.image_token_id, dense.image_token_len) == (
        "mlp", "<|image_pad|>", 12, 64)
    tower = dense.vision
    assert (tower.name_or_path, tower.image_size, tower.num_patches, tower.hidden_size, tower.freeze) == (
        SIGLIP2_B32_256, 256, 64, 768, True)
    assert dataclasses.replace(moe, lm=dense.lm) == dense
    m = moe.lm
    assert (m.use_moe, m.n_routed_experts, m.num_experts_per_tok, m.n_shared_experts, m.norm_topk_prob) == (
        True, 4, 1, 0, True)
    assert (m.aux_loss_alpha, m.seq_aux) == (5e-4, False)


def documented_parameter_count(moe: bool) -> int:
    """Parameters of UPSTREAM_FORMAT's 3v key list (the tied embedding once), projector included, tower not."""
    h, ffn, d, kv = 768, 2432, 96, 4
    ffns = (4 * 3 * ffn * h + 4 * h) if moe else 3 * ffn * h
    layer = 2 * h * h + 2 * kv * d * h + 2 * d + 2 * h + ffns
    projector = 2 * 768 + (768 * h + h) + (h * h + h)
    return 6400 * h + 8 * layer + h + projector


@pytest.mark.parametrize("name", ["minimind-3v", "minimind-3v-moe"])
def test_parameter_counts_are_the_documented_key_lists(name):
    cfg = get_preset(name)
    with torch.device("meta"):  # shapes only: no 200M random numbers on a test machine
        lm, projector = MiniMindLM(cfg.lm), Projector(cfg.projector, cfg.vision.hidden_size, cfg.lm.hidden_size)
    total = sum(p.numel() for p in [*lm.parameters(), *projector.parameters()])
    assert total == documented_parameter_count(cfg.lm.use_moe)
    assert round(total / 1e6) == (65 if name == "minimind-3v" else 200)  # "65M" and "200M-A65M"


@pytest.mark.parametrize("numerics", ["2025", "2026"])
def test_rmsnorm_order_of_operations_is_each_originals_to_the_bit(numerics):
    torch.manual_seed(0)
    x = (torch.randn(4, 7, 96) * 3).bfloat16()
    norm = MiniMindLM(tiny_3v(numerics=numerics, hidden_size=96, num_attention_heads=1, num_key_value_heads=1)).norm
    with torch.no_grad():
        norm.weight.copy_(torch.rand(96) + 0.5)
    norm = norm.bfloat16()
    expected = reference.rmsnorm(x, norm.weight, 1e-6, weight_first=numerics == "2026")
    other = reference.rmsnorm(x, norm.weight, 1e-6, weight_first=numerics != "2026")
    with torch.no_grad():
        got = norm(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected) and not torch.equal(got, other)


def test_the_default_rmsnorm_is_the_2025_formula_bit_for_bit():
    torch.manual_seed(1)
    x, w = torch.randn(3, 64).half(), (torch.rand(64) + 0.5).half()
    norm = RMSNorm(64, 1e-5).half()
    with torch.no_grad():
        norm.weight.copy_(w)
        xf = x.float()
        assert torch.equal(norm(x), w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).type_as(x))


@pytest.mark.parametrize("numerics", ["2025", "2026"])
def test_a_top1_gate_is_renormalised_only_in_2026(numerics):
    torch.manual_seed(0)
    moe = MoEFeedForward(tiny_3v(numerics=numerics)).eval()
    experts, weights, scores = moe.route(torch.randn(2, 9, 32))
    assert experts.shape == (18, 1) and len(moe.shared_experts) == 0
    top = scores.view(-1, 4).max(-1).values[:, None]
    assert torch.equal(weights, torch.ones_like(top) if numerics == "2026" else top)


def test_3v_balance_loss_is_over_all_tokens_of_the_batch():
    torch.manual_seed(0)
    moe = MoEFeedForward(tiny_3v()).train()
    x = torch.randn(3, 11, 32)
    _, aux = moe(x)
    with torch.no_grad():
        expected = reference.moe_balance_loss_2026(x.reshape(-1, 32) @ moe.router.weight.T, 5e-4)
    assert torch.allclose(aux, expected, rtol=1e-6, atol=0)
    assert moe.eval()(x)[1] == 0


def test_3v_layer_output_is_the_reference_moe():
    torch.manual_seed(0)
    cfg = tiny_3v()
    moe = MoEFeedForward(cfg).eval()
    x = torch.randn(2, 5, 32)
    state = {f"mlp.{k.replace('router', 'gate')}": v for k, v in moe.state_dict().items()}
    with torch.no_grad():
        assert torch.allclose(moe(x)[0], reference.moe(x, state, "mlp.", top_k=1, shared=False), atol=1e-6)


def test_3v_yarn_is_the_linear_ramp_with_attention_factor():
    scaling = {"type": "yarn", "factor": 16, "original_max_position_embeddings": 2048, "beta_fast": 32,
               "beta_slow": 1, "attention_factor": 0.75}
    cfg = tiny_3v(hidden_size=768, num_attention_heads=8, max_position_embeddings=32768, rope_scaling=scaling)
    plain = rope_frequencies(dataclasses.replace(cfg, rope_scaling=None))
    expected = plain * reference.yarn_2026_scale(96, 1e6, 2048, 16, 32, 1)
    assert torch.allclose(rope_frequencies(cfg), expected, rtol=1e-6)
    assert not torch.allclose(rope_frequencies(dataclasses.replace(cfg, numerics="2025")), expected)
    cos, sin = rope_tables(cfg)
    angles = 1000 * expected
    assert torch.allclose(cos[1000, :48], 0.75 * angles.cos(), atol=1e-5)
    assert torch.allclose(sin[1000, 48:], 0.75 * angles.sin(), atol=1e-5)


def test_3v_kv_cache_equals_full_recompute():
    torch.manual_seed(0)
    model = MiniMindLM(tiny_3v()).eval()
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :8], use_cache=True)
        steps = [out.logits]
        for t in range(8, 12):
            out = model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
