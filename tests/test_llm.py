"""MiniMindLM against a by-hand reference of UPSTREAM_FORMAT, Hugging Face Llama, and its own invariants."""

import math

import minimind_reference as reference
import pytest
import torch
import torch.nn.functional as F

from minimind_v.model.config import LMConfig
from minimind_v.model.llm import MiniMindLM, MoEFeedForward, rope_frequencies


def tiny_cfg(**overrides) -> LMConfig:
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    return LMConfig(**{**base, **overrides})


def make_model(seed: int = 0, **overrides) -> MiniMindLM:
    torch.manual_seed(seed)
    model = MiniMindLM(tiny_cfg(**overrides)).eval()
    with torch.no_grad():  # norms away from 1, so a mixed-up norm weight shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def original_names(model: MiniMindLM) -> dict[str, torch.Tensor]:
    """Our weights under the original's (= Hugging Face Llama's) names, renamed here by hand."""
    renames = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "attn": "self_attn",
               "router": "gate"}
    state = {}
    for key, value in model.state_dict().items():
        parts = [renames.get(part, part) for part in key.split(".")]
        state[("" if key == "lm_head.weight" else "model.") + ".".join(parts)] = value
    return state


@pytest.mark.parametrize("overrides", [{}, {"use_moe": True}, {"qk_norm": True}], ids=["dense", "moe", "qk_norm"])
def test_matches_reference(overrides):
    model = make_model(**overrides)
    ids = torch.randint(0, 97, (2, 11))
    cfg = model.cfg
    expected = reference.logits(original_names(model), cfg.num_hidden_layers, cfg.num_attention_heads,
                                cfg.num_key_value_heads, ids, use_moe=cfg.use_moe, qk_norm=cfg.qk_norm)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, expected, atol=1e-5)


def test_the_qk_norm_gain_only_sets_where_the_norm_weights_start():
    for attn in (block.attn for block in MiniMindLM(tiny_cfg(qk_norm=True, qk_norm_gain=2.0)).layers):
        assert torch.equal(attn.q_norm.weight, torch.full_like(attn.q_norm.weight, 2.0))
        assert torch.equal(attn.k_norm.weight, torch.full_like(attn.k_norm.weight, 2.0))
    # The same weights in both models give the same logits: the gain is a starting point, not a second scale.
    plain, gained = make_model(qk_norm=True), make_model(qk_norm=True, qk_norm_gain=2.0)
    gained.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        assert torch.equal(gained(ids).logits, plain(ids).logits)


def test_tied_embedding_is_one_parameter():
    model = make_model()
    assert model.lm_head.weight is model.embed_tokens.weight
    assert sum(p is model.embed_tokens.weight for p in model.parameters()) == 1


def test_matches_hugging_face_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = make_model()
    cfg = model.cfg
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True)).eval()
    hf.load_state_dict(original_names(model), strict=True)
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, hf(ids).logits, atol=1e-5)


def test_yarn_changes_frequencies_only_beyond_original_length():
    yarn = {"type": "yarn", "factor": 4, "original_max_position_embeddings": 32, "beta_fast": 4, "beta_slow": 1}
    d = tiny_cfg().head_dim
    plain = torch.tensor([1.0 / 1e6 ** (2 * i / d) for i in range(d // 2)])
    within = tiny_cfg(max_position_embeddings=32, rope_scaling=yarn)
    assert torch.allclose(rope_frequencies(within), plain)
    beyond = tiny_cfg(max_position_embeddings=128, rope_scaling=yarn)
    expected = plain.clone()
    for i in range(d // 2):  # wavelengths longer than the original length get 1/factor, the rest a ramp
        beta = 1 + 3 * i / (d // 2 - 1)
        long_wave = 2 * math.pi / plain[i] > 32
        first_long = next(j for j in range(d // 2) if 2 * math.pi / plain[j] > 32)
        expected[i] *= 1 / 4 if i >= first_long else (beta * 4 - beta + 1) / (beta * 4)
        assert long_wave == (i >= first_long)
    assert torch.allclose(rope_frequencies(beyond), expected)
    assert not torch.allclose(expected, plain)


@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
def test_kv_cache_equals_full_recompute(use_moe):
    model = make_model(use_moe=use_moe)
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :5], use_cache=True)
        steps = [out.logits]
        out = model(ids[:, 5:8], past_key_values=out.past_key_values, use_cache=True)  # a chunk after a prefix
        steps.append(out.logits)
        for t in range(8, 12):
            out = model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    assert out.past_key_values[0][0].shape == (2, 2, 12, 8)  # (B, kv_heads, T_total, head_dim)


def test_left_padding_matches_unpadded_rows_through_decoding():
    model = make_model()
    long, short = torch.randint(1, 97, (1, 9)), torch.randint(1, 97, (1, 5))
    batch = torch.cat([long, F.pad(short, (4, 0), value=0)])
    mask = torch.cat([torch.ones(1, 9), F.pad(torch.ones(1, 5), (4, 0))]).long()
    nxt = torch.randint(1, 97, (2, 1))
    with torch.no_grad():
        out = model(batch, attention_mask=mask, use_cache=True)
        step = model(nxt, attention_mask=F.pad(mask, (0, 1), value=1), past_key_values=out.past_key_values)
        for row, ids, pad in ((0, long, 0), (1, short, 4)):
            alone = model(torch.cat([ids, nxt[row:row + 1]], 1)).logits[0]
            assert torch.allclose(out.logits[row, pad:], alone[:-1], atol=1e-5)
            assert torch.allclose(step.logits[row, 0], alone[-1], atol=1e-5)


@pytest.mark.parametrize("explicit_positions", [True, False])
def test_packed_rows_equal_separate_rows(explicit_positions):
    model = make_model(use_moe=True)
    a, b = torch.randint(1, 97, (1, 6)), torch.randint(1, 97, (1, 4))
    packed = torch.cat([a, b, torch.zeros(1, 2, dtype=torch.long)], 1)
    segments = torch.tensor([[1] * 6 + [2] * 4 + [0] * 2])
    positions = torch.tensor([list(range(6)) + list(range(4)) + [0, 1]]) if explicit_positions else None
    with torch.no_grad():
        out = model(packed, segment_ids=segments, position_ids=positions).logits
        assert torch.allclose(out[0, :6], model(a).logits[0], atol=1e-5)
        assert torch.allclose(out[0, 6:10], model(b).logits[0], atol=1e-5)
        assert torch.isfinite(out).all()  # padding rows see only themselves, never NaN


def test_moe_routing_picks_top2_with_weights_summing_to_one():
    moe = make_model(use_moe=True).layers[0].mlp
    x = torch.randn(2, 7, 32)
    experts, weights, scores = moe.route(x)
    assert torch.allclose(scores.sum(-1), torch.ones(2, 7))
    best = scores.view(-1, 4).topk(2, dim=-1).indices
    assert torch.equal(experts.sort(-1).values, best.sort(-1).values)
    assert torch.allclose(weights.sum(-1), torch.ones(14))


@pytest.mark.parametrize("seq_aux", [True, False], ids=["per_sequence", "global"])
def test_moe_aux_loss_by_hand(seq_aux):
    moe = MoEFeedForward(tiny_cfg(use_moe=True, seq_aux=seq_aux))
    experts = torch.tensor([[0, 1], [0, 2]])  # two sequences of one token, k=2
    scores = torch.tensor([[[0.4, 0.3, 0.2, 0.1]], [[0.5, 0.1, 0.3, 0.1]]])
    if seq_aux:  # counts / (T*k/E = 0.5): (2, 2, 0, 0) and (2, 0, 2, 0), each against its own scores
        expected = 0.1 * ((2 * 0.4 + 2 * 0.3) + (2 * 0.5 + 2 * 0.3)) / 2
    else:  # picks share (0.5, 0.25, 0.25, 0) * E against the mean scores (0.45, 0.2, 0.25, 0.1)
        expected = 0.1 * (2 * 0.45 + 1 * 0.2 + 1 * 0.25 + 0 * 0.1)
    assert moe.balance_loss(experts, scores).item() == pytest.approx(expected)


def test_moe_aux_loss_only_in_training_and_added_to_loss():
    model = make_model(use_moe=True)
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        evaluated = model(ids, labels=ids)
        model.train()
        trained = model(ids, labels=ids)
    assert evaluated.aux_loss.item() == 0
    assert trained.aux_loss.item() > 0
    assert trained.loss.item() == pytest.approx(evaluated.loss.item() + trained.aux_loss.item(), abs=1e-5)


def test_every_expert_gets_a_gradient_even_when_unused():
    model = make_model(use_moe=True).train()
    with torch.no_grad():
        # positive inputs, expert 3's router row negative, the others positive: expert 3 never wins
        model.layers[0].mlp.router.weight.copy_(torch.tensor([1.0, 1.0, 1.0, -1.0])[:, None].expand(4, 32))
    x = torch.rand(1, 5, 32) + 0.1
    model.layers[0].mlp(x)[0].sum().backward()
    grad = model.layers[0].mlp.experts[3].gate_proj.weight.grad
    assert grad is not None and torch.count_nonzero(grad) == 0


def test_loss_at_supervised_positions_equals_full_logits_loss():
    model = make_model()
    ids = torch.randint(0, 97, (2, 10))
    labels = ids.clone()
    labels[0, :6], labels[1, :3] = -100, -100
    full = model(ids, labels=labels)
    lean = model(ids, labels=labels, logits_to_keep="none")
    manual = F.cross_entropy(full.logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert lean.logits is None
    assert full.num_loss_tokens.item() == lean.num_loss_tokens.item() == 4 + 7  # targets at 6..9 and 3..9
    assert torch.allclose(full.loss, manual, atol=1e-6) and torch.allclose(lean.loss, manual, atol=1e-6)
    g_full = torch.autograd.grad(full.loss, model.embed_tokens.weight)[0]
    g_lean = torch.autograd.grad(lean.loss, model.embed_tokens.weight)[0]
    assert torch.allclose(g_full, g_lean, atol=1e-6)


def test_zero_supervised_tokens_gives_finite_zero_loss_with_grad():
    model = make_model()
    ids = torch.randint(0, 97, (2, 6))
    out = model(ids, labels=torch.full_like(ids, -100), logits_to_keep="none")
    assert out.loss.item() == 0 and out.num_loss_tokens.item() == 0 and out.loss.requires_grad
    out.loss.backward()
    assert torch.isfinite(model.embed_tokens.weight.grad).all()


def test_last_logits_only_for_generation():
    model = make_model()
    ids = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        assert torch.allclose(model(ids, logits_to_keep=1).logits, model(ids).logits[:, -1:], atol=1e-6)
