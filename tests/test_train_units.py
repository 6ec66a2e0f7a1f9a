"""The training loop's pieces on a tiny random model: schedule, optimizer groups, freezing, accumulation."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from minimind_v import adapters
from minimind_v.data.batching import BatchPlan
from minimind_v.model.config import LMConfig, VisionConfig, VLMConfig
from minimind_v.model.vlm import MiniMindVLM
from minimind_v.train import freezing, optim
from minimind_v.train.sampler import Slicing
from minimind_v.train.step import Precision, train_step

IMG = 3  # placeholder id
N_PATCH = 4


def tiny_vlm(dropout: float = 0.0) -> MiniMindVLM:
    torch.manual_seed(0)
    cfg = VLMConfig(
        lm=LMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128, dropout=dropout),
        vision=VisionConfig(name_or_path="vision", hidden_size=16, image_size=16, num_patches=N_PATCH, freeze=True,
                            init={"model_type": "clip_vision_model", "hidden_size": 16, "intermediate_size": 32,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 16,
                                  "patch_size": 8, "num_channels": 3}),
        projector="mlp", image_token_id=IMG, image_token_len=N_PATCH)
    return MiniMindVLM(cfg)


def batch(lengths: list[int], seed: int, with_images: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded samples: an image run, then text; the second half of each sample is supervised."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(4, 64, (n,), generator=g)
        if with_images:
            ids[row, 1:1 + N_PATCH] = IMG
        labels[row, n // 2:n] = ids[row, n // 2:n]
        mask[row, :n] = 1
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if with_images:
        out["pixel_values"] = torch.randn(len(lengths), 3, 16, 16, generator=g)
    return out


def concat(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    T = max(b["input_ids"].shape[1] for b in batches)
    pad = {"input_ids": 0, "labels": -100, "attention_mask": 0}
    out = {k: torch.cat([torch.nn.functional.pad(b[k], (0, T - b[k].shape[1]), value=v) for b in batches])
           for k, v in pad.items()}
    out["pixel_values"] = torch.cat([b["pixel_values"] for b in batches])
    return out


def test_warmup_reaches_peak_exactly_and_cosine_ends_at_floor():
    peak, warmup, total, ratio = 3e-4, 10, 100, 0.1
    lrs = [optim.lr_at(s, peak, warmup, total, ratio) for s in range(total)]
    assert lrs[warmup - 1] == peak and lrs[warmup] == peak
    assert lrs[0] == peak / warmup
    assert lrs[-1] == peak * ratio
    assert all(a <= b for a, b in zip(lrs[:warmup], lrs[1:warmup]))
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))
    assert min(lrs) >= peak * ratio * (1 - 1e-12)


def test_a_run_behind_its_clock_reads_the_schedule_further_on():
    # On schedule (the clock behind the steps): the step itself.
    assert optim.schedule_step(30, 0, 100, 0.2) == 30
    # Behind: 60% of the time gone at step 30 points to step 60; after a resume at step 40, to 40 + 0.6 * 60.
    assert optim.schedule_step(30, 0, 100, 0.6) == 60
    assert optim.schedule_step(45, 40, 100, 0.6) == 76
    # The clock never points past the last step, so the cap's last step reads the floor.
    assert optim.schedule_step(50, 0, 100, 1.7) == 99
    assert optim.lr_at(optim.schedule_step(50, 0, 100, 1.0), 3e-4, 10, 100, 0.1) == 3e-4 * 0.1


def test_no_weight_decay_on_norms_biases_embeddings_and_no_frozen_params():
    model = tiny_vlm()
    freezing.apply_policy(model, "llm", train_vision=False, uses_images=True)
    decay, plain = optim.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    undecayed = {names[id(p)] for p in plain["params"]}
    assert "lm.embed_tokens.weight" in undecayed
    assert any("attn_norm" in n for n in undecayed) and any(n.endswith(".bias") for n in undecayed)
    assert all(n.endswith("weight") and "norm" not in n and "embed" not in n for n in decayed)
    assert "lm.layers.0.attn.q_proj.weight" in decayed
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | undecayed == trainable and not any(n.startswith("vision.") for n in trainable)


@pytest.mark.parametrize("policy", freezing.POLICIES)
def test_frozen_weights_do_not_move(policy):
    model = tiny_vlm()
    lora = policy == "adapter"  # the policy of a LoRA run alone
    if lora:
        adapters.inject(model, adapters.lora_config(2, 4, ["q_proj"], 0.0, [1, 2]))
        with torch.no_grad():  # B starts at zero, so A would get no gradient in the first step
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.1)
    freezing.apply_policy(model, policy, train_vision=False, uses_images=True, lora=lora)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = optim.build_optimizer(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    for seed in range(2):
        train_step(model, [batch([12, 9], seed)], opt, Precision.choose("fp32", torch.device("cpu")), 1.0,
                   torch.device("cpu"))
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert moved == trainable  # every trainable weight moves, nothing else does
    expect = {"adapter": ("lm.embed_tokens.token_adapter.trainable_tokens_delta", "lm.layers.0.attn.q_proj.lora_",
                          "lm.layers.1.attn.q_proj.lora_", "lm.layers.2.attn.q_proj.lora_"),
              "projector": ("projector.",), "projector+ends": ("projector.", "lm.layers.0.", "lm.layers.2."),
              "llm": ("projector.", "lm."), "all": ("projector.", "lm.", "vision.")}[policy]
    assert trainable == {n for n in before if n.startswith(expect) and "post_layernorm" not in n}


def test_lora_plus_moves_the_b_matrices_that_many_times_as_far():
    def first_step(lora_plus: float) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = tiny_vlm()
        adapters.inject(model, adapters.lora_config(2, 4, ["q_proj", "v_proj"], 0.0, []))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.1)
        freezing.apply_policy(model, "adapter", train_vision=False, uses_images=True, lora=True)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        opt = optim.build_optimizer(model, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-12,
                                    lora_plus=lora_plus)
        optim.set_lr(opt, 1e-3)
        train_step(model, [batch([12, 9], 0)], opt, Precision.choose("fp32", torch.device("cpu")), 0.0,
                   torch.device("cpu"))
        return {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}

    plain, plus = first_step(1.0), first_step(4.0)
    assert any("lora_B" in n for n in plain) and any("lora_A" in n for n in plain)
    for name in plain:  # Adam's first step is lr times the gradient's sign: B four times as far, A alike
        ratio = 4.0 if "lora_B" in name else 1.0
        torch.testing.assert_close(plus[name], ratio * plain[name], rtol=1e-4, atol=1e-9)
        assert plain[name].abs().max() > 0


def test_lm_stage_freezes_the_parts_text_cannot_reach():
    model = tiny_vlm()
    freezing.apply_policy(model, "all", train_vision=True, uses_images=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("lm.") for n in trainable) and model.vision.frozen


def test_accumulation_equals_one_large_batch():
    micro = [batch([12, 7], 1), batch([9, 15], 2), batch([5, 10], 3)]
    models, results = [tiny_vlm(), tiny_vlm()], []
    for model, batches in zip(models, [micro, [concat(micro)]]):
        freezing.apply_policy(model, "llm", train_vision=False, uses_images=True)
        # Plain SGD: the update is the gradient itself (Adam's first step is about its sign only).
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        ce_sum, norm = train_step(model, batches, opt, Precision.choose("fp32", torch.device("cpu")), 0.5,
                                  torch.device("cpu"))
        results.append((ce_sum, norm))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(models[0].lm.layers[0].attn.q_proj.weight, tiny_vlm().lm.layers[0].attn.q_proj.weight)


def test_world_sizes_slice_the_same_global_order():
    plan_one = BatchPlan(np.arange(40) % 7 + 1, batch_size=4, seed=7)
    plan_two = BatchPlan(np.arange(40) % 7 + 1, batch_size=2, seed=7)
    one, two = Slicing(world_size=1, accumulation_steps=2), Slicing(world_size=2, accumulation_steps=2)
    big, small = plan_one.batches(3), plan_two.batches(3)
    assert sorted(i for b in big for i in b) == list(range(40)) and big != plan_one.batches(4)
    for step in range(one.steps_left(len(big), 0)):
        seen_one = [i for m in one.micro_batches(step * 2, 0) for i in big[m]]
        seen_two = [i for r in range(2) for m in two.micro_batches(step * 4, r) for i in small[m]]
        assert sorted(seen_one) == sorted(seen_two)
    # Resuming 1 process -> 2 at batch position p of the 2-process list is sample p * 2 of the order.
    order = [i for b in small for i in b]
    assert [i for m in two.micro_batches(6, 0) for i in small[m]] == [*order[12:14], *order[16:18]]
    assert one.steps_left(10, 8) == 1 and one.steps_left(10, 9) == 0


def test_tiny_model_overfits_one_batch():
    model = tiny_vlm()
    freezing.apply_policy(model, "llm", train_vision=False, uses_images=True)
    opt = optim.build_optimizer(model, lr=1e-2, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8)
    b = batch([16, 12], 5)
    n = int((b["labels"][:, 1:] != -100).sum())
    losses = [float(train_step(model, [b], opt, Precision.choose("fp32", torch.device("cpu")), 1.0,
                               torch.device("cpu"))[0]) / n for _ in range(60)]
    assert losses[0] > 3.0 and losses[-1] < 0.05


def test_dropout_rng_is_the_only_randomness_and_is_restorable():
    # The resume guarantee rests on this: same RNG state + same batch -> bit-identical step.
    from minimind_v.train.checkpoint import rng_state, set_rng_state

    model = tiny_vlm(dropout=0.3)
    freezing.apply_policy(model, "llm", train_vision=False, uses_images=True)
    opt = optim.build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    twin = copy.deepcopy(model)
    twin_opt = optim.build_optimizer(twin, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    state = rng_state()
    cpu = torch.device("cpu")
    train_step(model, [batch([12, 9], 0)], opt, Precision.choose("fp32", cpu), 1.0, cpu)
    set_rng_state(state)
    train_step(twin, [batch([12, 9], 0)], twin_opt, Precision.choose("fp32", cpu), 1.0, cpu)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_the_3v_recipe_sets_its_own_stage_defaults_and_has_no_text_stage():
    from minimind_v.errors import UserError
    from minimind_v.train.config import TrainConfig, for_stage

    sft = for_stage(TrainConfig(stage="sft", recipe="minimind-3v"))
    assert (sft.lr, sft.batch_size, sft.max_seq_len, sft.epochs, sft.freeze) == (5e-6, 4, 768, 2, "projector+ends")
    pre = for_stage(TrainConfig(stage="pretrain", recipe="minimind-3v", lr=1e-4))
    assert (pre.lr, pre.batch_size, pre.max_seq_len, pre.epochs, pre.freeze) == (1e-4, 16, 450, 2, "projector")
    assert math.isclose(for_stage(TrainConfig(stage="sft")).lr, 5e-5 * 2 ** 0.5)  # the 2025 recipe (5e-5 at 8, at 16)
    with pytest.raises(UserError, match="not a stage of --recipe minimind-3v"):
        for_stage(TrainConfig(stage="lm", recipe="minimind-3v"))


def test_the_default_rate_follows_the_square_root_rule_for_the_samples_per_step():
    from minimind_v.train.config import LoraSettings, TrainConfig, for_stage
    from minimind_v.train.stages import get_stage

    pre = get_stage("pretrain")
    base = pre.lr_batch
    for batch, accumulation in ((base, 1), (4 * base, 1), (base, 4), (2 * base, 2), (max(1, base // 4), 1)):
        cfg = for_stage(TrainConfig(stage="pretrain", batch_size=batch, accumulation_steps=accumulation))
        assert math.isclose(cfg.lr, pre.lr * math.sqrt(batch * accumulation / base), rel_tol=1e-12)
    assert for_stage(TrainConfig(stage="pretrain", batch_size=4 * base)).lr == 2 * pre.lr
    assert for_stage(TrainConfig(stage="pretrain", batch_size=base), processes=4).lr == 2 * pre.lr
    # 2 micro-batches on one process and 1 on each of 2 processes are the same step, so the same rate
    assert (for_stage(TrainConfig(stage="pretrain", batch_size=base, accumulation_steps=2)).lr
            == for_stage(TrainConfig(stage="pretrain", batch_size=base), processes=2).lr)
    assert for_stage(TrainConfig(stage="pretrain", batch_size=4 * base, lr=3e-4)).lr == 3e-4  # given: kept
    dpo = get_stage("dpo")
    lora = for_stage(TrainConfig(stage="dpo", batch_size=4 * dpo.lr_batch,
                                 lora=LoraSettings(lora_rank=8)))
    assert math.isclose(lora.lr, 2 * dpo.lora_lr)  # the LoRA rate scales alike
    default = for_stage(TrainConfig(stage="pretrain"))
    assert math.isclose(default.lr, pre.lr * math.sqrt(default.batch_size / base))


def test_a_knob_a_checkpoint_predates_counts_as_its_default_on_resume():
    from minimind_v.train.config import TrainConfig, for_stage, resume_conflicts

    now = json.loads(json.dumps(for_stage(TrainConfig(stage="sft")).to_dict()))
    old = json.loads(json.dumps(now))
    del old["recipe"], old["model"]["lm"]["qk_norm"]  # written before these fields existed
    assert resume_conflicts(old, now) == []
    old["model"]["lm"]["qk_norm"] = True
    assert resume_conflicts(old, now) == ["model.lm.qk_norm: True -> False"]


@pytest.mark.parametrize("dtype, tf32", [("fp32", True), ("fp32-strict", False), ("bf16", False)])
def test_fp32_on_cuda_multiplies_on_tf32_unless_strict(dtype, tf32, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    before = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        precision = Precision.choose(dtype, torch.device("cuda"))  # choosing needs no GPU
        assert precision.tf32 is tf32
        precision.set_backends()
        expected = "tf32" if tf32 else "ieee"
        assert torch.backends.cuda.matmul.fp32_precision == expected
        assert torch.backends.cudnn.conv.fp32_precision == expected
        assert Precision.choose(dtype, torch.device("cpu")).tf32 is False  # nothing to set on the CPU
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before
