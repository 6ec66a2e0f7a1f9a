"""The training forward and backward never wait for the device: what they would read back the host gives them.

On CPU nothing syncs, so the test counts the Python-level conversions and data-dependent shapes that would make
a GPU step wait (bool / int / float / item / tolist of a tensor, nonzero, boolean-mask indexing), and checks the
host-prepared path (train/step.host_prepared) gives the old path's loss and gradients.
"""

from __future__ import annotations

import pytest
import torch

from minimind_v.data.batching import Collator
from minimind_v.data.dataset import Sample
from minimind_v.model.config import LMConfig, VisionConfig, VLMConfig
from minimind_v.model.vlm import MiniMindVLM
from minimind_v.train.loop import model_inputs
from minimind_v.train.step import host_prepared

IMG, N_PATCH, PAD = 3, 4, 0


def tiny_vlm(use_moe: bool = False) -> MiniMindVLM:
    torch.manual_seed(0)
    cfg = VLMConfig(
        lm=LMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128, use_moe=use_moe),
        vision=VisionConfig(name_or_path="vision", hidden_size=16, image_size=16, num_patches=N_PATCH, freeze=True,
                            init={"model_type": "clip_vision_model", "hidden_size": 16, "intermediate_size": 32,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 16,
                                  "patch_size": 8, "num_channels": 3}),
        projector="mlp", image_token_id=IMG, image_token_len=N_PATCH)
    return MiniMindVLM(cfg).train()


def trainer_batch(pack_len: int | None = None) -> dict:
    """What the trainer's Collator gives for four samples of different lengths, two with an image each."""
    g = torch.Generator().manual_seed(0)
    samples = []
    for i, n_text in enumerate([5, 9, 3, 7]):
        text = torch.randint(4, 64, (n_text,), generator=g)
        with_image = i % 2 == 0
        ids = torch.cat([torch.tensor([1] + [IMG] * N_PATCH * with_image), text])
        labels = ids.clone()
        labels[: len(ids) - n_text // 2 - 1] = -100
        pixels = torch.randn(1, 3, 16, 16, generator=g) if with_image else None
        samples.append(Sample(ids, labels, pixels, [f"img{i}"] * with_image, f"s:{i}"))
    return model_inputs(Collator(PAD, pack_len=pack_len)(samples))


class SyncCounter:
    """Counts, while `on`, every call that on a GPU would wait for the device."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count, self.on = 0, False
        for name in ("__bool__", "__int__", "__float__", "item", "tolist", "nonzero", "masked_select"):
            self._wrap(monkeypatch, torch.Tensor, name, lambda *a, **k: True)
        self._wrap(monkeypatch, torch, "nonzero", lambda *a, **k: True)
        self._wrap(monkeypatch, torch, "masked_select", lambda *a, **k: True)
        self._wrap(monkeypatch, torch, "where", lambda *a, **k: len(a) + len(k) == 1)  # where(cond) is nonzero
        self._wrap(monkeypatch, torch.Tensor, "__getitem__", lambda t, index: _has_bool_index(index))
        self._wrap(monkeypatch, torch.Tensor, "__setitem__", lambda t, index, value: _has_bool_index(index))

    def _wrap(self, monkeypatch, owner, name, syncs) -> None:
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            if self.on and syncs(*args, **kwargs):
                self.count += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)

    def forward_backward(self, model: MiniMindVLM, batch: dict) -> int:
        self.count, self.on = 0, True
        try:
            out = model(**batch, logits_to_keep="none")
            out.loss.backward()
        finally:
            self.on = False
        return self.count


def _has_bool_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def test_the_host_prepared_training_step_makes_no_sync(monkeypatch):
    model, batch = tiny_vlm(), trainer_batch()
    counter = SyncCounter(monkeypatch)
    old = counter.forward_backward(model, batch)
    new = counter.forward_backward(model, host_prepared(batch, model))
    assert old > 0  # the counter sees today's reads (mask.all, position max, slot count, boolean masks)
    assert new == 0


def loss_and_grads(model: MiniMindVLM, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**batch, logits_to_keep="none")
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", ["padded", "packed", "features", "moe"])
def test_host_prepared_batch_gives_the_same_loss_and_gradients(case):
    model = tiny_vlm(use_moe=case == "moe")
    batch = trainer_batch(pack_len=32 if case == "packed" else None)
    if case == "features":
        batch["image_features"] = model.encode_images(batch.pop("pixel_values")).detach()
    old_loss, old_grads = loss_and_grads(model, batch)
    prepared = host_prepared(batch, model)
    assert ("attention_mask" in prepared) == (case == "moe")  # packed rows have segment_ids, no mask
    new_loss, new_grads = loss_and_grads(model, prepared)
    assert torch.allclose(old_loss, new_loss, atol=1e-5, rtol=0)
    assert old_grads.keys() == new_grads.keys() and old_grads
    for name, grad in old_grads.items():
        assert torch.allclose(grad, new_grads[name], atol=1e-5, rtol=1e-5), name


def test_host_prepared_checks_positions_and_keeps_left_padding_masked():
    model, batch = tiny_vlm(), trainer_batch()
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 128"):
        host_prepared(dict(batch, position_ids=batch["position_ids"] + 127), model)
    left = dict(batch, attention_mask=batch["attention_mask"].flip(1))  # left padding: causal alone is wrong
    assert "attention_mask" in host_prepared(left, model)


def test_wrong_image_slot_count_is_refused_without_reading_the_device():
    model, batch = tiny_vlm(), trainer_batch()
    prepared = host_prepared(batch, model)
    with pytest.raises(ValueError, match="image placeholder slots"):
        model(**dict(prepared, image_index=prepared["image_index"][:-1]))


def test_a_model_without_our_config_gets_its_batch_unchanged():
    batch = trainer_batch()
    assert host_prepared(batch, torch.nn.Linear(2, 2)) is batch


def test_supervised_index_with_full_logits_gives_the_same_loss():
    model, batch = tiny_vlm(), trainer_batch()
    prepared = host_prepared(batch, model)
    old, new = model(**batch), model(**prepared)  # full logits: the loss gathers from them
    assert torch.allclose(old.loss, new.loss, atol=1e-5, rtol=0)
    assert int(old.num_loss_tokens) == int(new.num_loss_tokens)
