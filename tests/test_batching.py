"""Batches: dynamic padding, packing equal in loss to the unpacked samples, reproducible batch plans."""

import numpy as np
import pytest
import torch

from minimind_v.data.batching import BatchPlan, Collator, first_fit_decreasing
from minimind_v.data.dataset import Sample
from minimind_v.data.formats import BadSample
from minimind_v.data.template import IGNORE_INDEX
from minimind_v.model.vlm import MiniMindVLM
from minimind_v.presets import get_preset


def _sample(length, n_images=0, image_len=4, seed=0, image_id=3, image_size=8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 200, (length,), generator=g)
    for k in range(n_images):
        ids[2 + k * image_len:2 + (k + 1) * image_len] = image_id
    labels = ids.clone()
    labels[:length // 2] = IGNORE_INDEX  # a prompt, then the answer
    pixels = torch.randn(n_images, 3, image_size, image_size, generator=g) if n_images else None
    return Sample(ids, labels, pixels, [f"img{seed}-{k}" for k in range(n_images)], f"f:{seed}")


def test_padding_to_the_longest_row():
    samples = [_sample(5, seed=1), _sample(9, n_images=1, seed=2), BadSample("bad_image", "x", "f:9")]
    batch = Collator(pad_id=0)(samples)
    assert batch["input_ids"].shape == (2, 9) and batch["num_samples"] == 2
    assert batch["input_ids"][0, 5:].eq(0).all() and batch["labels"][0, 5:].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"].sum(1).tolist() == [5, 9] and "segment_ids" not in batch
    assert torch.equal(batch["position_ids"][1], torch.arange(9))
    assert batch["pixel_values"].shape == (1, 3, 8, 8) and batch["images"] == ["img2-0"]
    assert [b.source for b in batch["bad"]] == ["f:9"]
    assert Collator(pad_id=0)([BadSample("too_long", "x")])["input_ids"] is None


def test_packing_layout():
    samples = [_sample(6, n_images=1, seed=1), _sample(3, seed=2), _sample(5, n_images=1, seed=3),
               _sample(4, n_images=1, seed=4)]
    batch = Collator(pad_id=0, pack_len=10)(samples)
    seg, pos = batch["segment_ids"], batch["position_ids"]
    assert seg.shape[1] <= 10 and "attention_mask" not in batch
    assert int((seg > 0).sum()) == 18 and seg.shape[0] == 2
    rows = []
    for r in range(seg.shape[0]):
        for k in range(1, int(seg[r].max()) + 1):
            where = (seg[r] == k).nonzero().flatten()
            assert torch.equal(pos[r, where], torch.arange(len(where)))
            assert batch["labels"][r, where[0]] == IGNORE_INDEX
            rows.append(batch["input_ids"][r, where])
    assert sorted(len(r) for r in rows) == [3, 4, 5, 6]
    # the images follow their placeholders: row by row, segment by segment
    owners = [s for s in batch["sources"] if s != "f:2"]
    assert batch["images"] == [f"img{o[2:]}-0" for o in owners]
    assert batch["pixel_values"].shape[0] == 3
    for k, owner in enumerate(owners):
        pixels = next(s.pixel_values for s in samples if s.source == owner)
        assert torch.equal(batch["pixel_values"][k], pixels[0])


def test_packed_loss_equals_unpacked_token_mean():
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    model = MiniMindVLM(cfg).eval()
    n, size = cfg.image_token_len, cfg.vision.image_size
    samples = [_sample(n + 12, 1, n, seed=1, image_id=cfg.image_token_id, image_size=size),
               _sample(20, 0, n, seed=2), _sample(n + 30, 1, n, seed=3, image_id=cfg.image_token_id, image_size=size),
               _sample(9, 0, n, seed=4)]
    with torch.no_grad():
        packed = Collator(0, pack_len=2 * n + 50)(samples)
        assert packed["input_ids"].shape[0] < len(samples)
        out = model(packed["input_ids"], pixel_values=packed["pixel_values"], segment_ids=packed["segment_ids"],
                    position_ids=packed["position_ids"], labels=packed["labels"])
        sums, count = 0.0, 0
        for s in samples:
            single = model(s.input_ids[None], pixel_values=s.pixel_values, labels=s.labels[None])
            sums += single.loss.double() * single.num_loss_tokens
            count += int(single.num_loss_tokens)
        padded = Collator(0)(samples)
        out_padded = model(padded["input_ids"], pixel_values=padded["pixel_values"],
                           attention_mask=padded["attention_mask"], labels=padded["labels"])
    assert int(out.num_loss_tokens) == count == int(out_padded.num_loss_tokens)
    torch.testing.assert_close(out.loss.double(), sums / count, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_padded.loss.double(), sums / count, atol=1e-5, rtol=1e-5)


def test_first_fit_decreasing():
    bins = first_fit_decreasing([5, 4, 3, 3, 2, 7], 8)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum([5, 4, 3, 3, 2, 7][i] for i in b) <= 8 for b in bins) and len(bins) == 4  # 7 | 5 3 | 4 3 | 2
    with pytest.raises(ValueError):
        first_fit_decreasing([9], 8)


@pytest.mark.parametrize("mode", ["random", "grouped", "packed"])
def test_batch_plans_cover_every_sample_once_and_reproduce(mode):
    lengths = np.random.default_rng(0).integers(5, 100, 503)
    plan = BatchPlan(lengths, batch_size=8, mode=mode, max_seq_len=128, seed=3)
    epoch0 = plan.batches(0)
    assert sorted(i for b in epoch0 for i in b) == list(range(503))
    assert epoch0 == BatchPlan(lengths, 8, mode, 128, seed=3).batches(0)
    assert epoch0 != plan.batches(1)
    if mode == "packed":
        assert all(len(first_fit_decreasing(lengths[b].tolist(), 128)) <= 9 for b in epoch0)
    if mode == "grouped":  # neighbours in a batch: far less spread than random batches
        spread = np.mean([np.ptp(lengths[b]) for b in epoch0])
        random_spread = np.mean([np.ptp(lengths[b]) for b in BatchPlan(lengths, 8, "random", seed=3).batches(0)])
        assert spread < random_spread / 4


def _first_fit_by_scanning(lengths, capacity):
    """The textbook first-fit decreasing, scanning the open bins: what the tree version must equal."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        slot = next((b for b, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            bins.append([])
            room.append(capacity)
            slot = len(bins) - 1
        bins[slot].append(i)
        room[slot] -= lengths[i]
    return bins


def test_first_fit_decreasing_equals_scanning_the_bins():
    rng = np.random.default_rng(0)
    for n, capacity in [(1, 10), (2, 10), (37, 64), (500, 640), (1000, 100)]:
        lengths = rng.integers(1, capacity + 1, n).tolist()
        assert first_fit_decreasing(lengths, capacity) == _first_fit_by_scanning(lengths, capacity)
    assert first_fit_decreasing([], 8) == []


@pytest.mark.parametrize("mode", ["random", "grouped", "packed"])
@pytest.mark.parametrize("drop_last", [False, True])
def test_the_count_of_an_epoch_equals_its_plan(mode, drop_last):
    lengths = np.random.default_rng(1).integers(5, 120, 1003)
    for batch_size in (1, 7, 16):
        plan = BatchPlan(lengths, batch_size, mode, 128, seed=2, drop_last=drop_last, group_factor=5)
        counts = [plan.count(e) for e in range(3)]
        assert counts == [len(BatchPlan(lengths, batch_size, mode, 128, seed=2, drop_last=drop_last,
                                        group_factor=5).batches(e)) for e in range(3)]
        if drop_last and mode != "packed":
            assert all(len(b) == batch_size for b in plan.batches(0))


@pytest.mark.parametrize("mode", ["random", "grouped"])
def test_batches_by_a_token_budget(mode):
    lengths = np.random.default_rng(4).integers(5, 200, 701)
    lengths[17] = 900  # longer than the budget: a batch of its own
    widths = (64, 128, 256, 1024)
    for bucketed in ((), widths):
        plan = BatchPlan(lengths, 32, mode, seed=5, tokens=600, widths=bucketed)
        batches = plan.batches(0)
        assert sorted(i for b in batches for i in b) == list(range(701)) and plan.count(0) == len(batches)
        assert batches == BatchPlan(lengths, 32, mode, seed=5, tokens=600, widths=bucketed).batches(0)

        def padded(b):
            longest = int(lengths[b].max())
            return next((w for w in bucketed if w >= longest), longest)
        assert all(len(b) * padded(b) <= 600 or len(b) == 1 for b in batches)
        assert [17] in batches and max(len(b) for b in batches) <= 32
    if mode == "grouped":  # short samples come many to a batch, long ones few; the budget is mostly used
        sizes = {len(b) for b in batches}
        assert min(sizes) < 4 and max(sizes) > 8
        assert np.mean([len(b) * padded(b) for b in batches]) > 0.6 * 600
    with pytest.raises(ValueError, match="own budget"):
        BatchPlan(lengths, 8, "packed", 128, tokens=600)
