"""torch.compile sees the training forward as one graph, and an epoch compiles at most one graph per padded width.

A counting backend stands in for inductor (the graphs are what is counted, not the kernels), so this runs on the
CPU in seconds; train_step is the trainer's own step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minimind_v import adapters
from minimind_v.data.batching import BatchPlan, Collator, bucket_widths
from minimind_v.data.dataset import Sample
from minimind_v.train.loop import model_inputs
from minimind_v.train.step import CROSS_ENTROPY, Precision, host_prepared, train_step
from test_no_sync import IMG, N_PATCH, PAD, tiny_vlm, trainer_batch


@pytest.mark.parametrize("case", ["pixels", "features", "lora"])
def test_dynamo_sees_the_training_forward_without_a_graph_break(case):
    model, batch = tiny_vlm(), trainer_batch()
    if case == "features":
        batch["image_features"] = model.encode_images(batch.pop("pixel_values")).detach()
    if case == "lora":
        adapters.inject(model, adapters.lora_config(4, 8, ["q_proj", "v_proj"], 0.0))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**host_prepared(batch, model), logits_to_keep="none")
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    assert explained.graph_count == 1


def samples(n: int, seed: int = 0, image_every: int = 1) -> list[Sample]:
    """Samples of 7 to 61 tokens, labels on their second half; an image in every one (as in pretraining) or in
    every `image_every`-th."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        n_text = int(torch.randint(2, 56, (1,), generator=g))
        with_image = i % image_every == 0
        ids = torch.cat([torch.tensor([1] + [IMG] * N_PATCH * with_image), torch.randint(4, 64, (n_text,), generator=g)])
        labels = ids.clone()
        labels[: len(ids) - n_text // 2 - 1] = -100
        pixels = torch.randn(1, 3, 16, 16, generator=g) if with_image else None
        out.append(Sample(ids, labels, pixels, [f"img{i}"] * with_image, f"s:{i}"))
    return out


class CountingBackend:
    """A torch.compile backend that runs each graph as traced and counts how many were compiled."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return gm.forward


def compiled_epoch(collate: Collator, data: list[Sample], batch_size: int,
                   tokens: int | None = None) -> tuple[int, set, list[float]]:
    """(graphs compiled, batch shapes seen, losses) over one grouped epoch of train_step on a tiny VLM compiled as
    the trainer compiles it (train/run.wrap: fullgraph, static shapes)."""
    torch._dynamo.reset()
    model = tiny_vlm()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    precision = Precision.choose("fp32", torch.device("cpu"))
    plan = BatchPlan(np.array([len(s.input_ids) for s in data]), batch_size, "grouped", seed=0, group_factor=2,
                     tokens=tokens, widths=collate.widths)
    shapes, losses = set(), []
    for indices in plan.batches(0):
        batch = model_inputs(collate([data[i] for i in indices]))
        with torch.no_grad():  # the feature cache's path (the default): the tower runs before the step
            batch["image_features"] = model.encode_images(batch.pop("pixel_values"))
        shapes.add(tuple(batch["input_ids"].shape))
        loss_sum, _ = train_step(compiled, [batch], optimizer, precision, 1.0, torch.device("cpu"))
        losses.append(float(loss_sum) / CROSS_ENTROPY.units(batch))
    return backend.graphs, shapes, losses


def test_an_epoch_compiles_at_most_one_graph_per_width():
    data = samples(40)
    widths = bucket_widths(np.array([len(s.input_ids) for s in data]), 3)
    graphs, shapes, _ = compiled_epoch(Collator(PAD, widths=widths, rows=4), data, batch_size=4)
    assert {width for _, width in shapes} <= set(widths) and {rows for rows, _ in shapes} == {4}
    assert graphs == len(shapes) <= len(widths)
    # The control: padding to each batch's longest row gives a shape, and a graph, for most batches.
    with torch._dynamo.config.patch(recompile_limit=64):
        loose_graphs, loose_shapes, _ = compiled_epoch(Collator(PAD), data, batch_size=4)
    assert loose_graphs == len(loose_shapes) > len(widths)


def test_batches_by_a_token_budget_compile_one_graph_per_width():
    data = samples(40)
    widths = bucket_widths(np.array([len(s.input_ids) for s in data]), 3)
    tokens = 3 * widths[-1]  # 3 rows of the widest, more of the narrower (at most 6)
    collate = Collator(PAD, widths=widths, rows=6, tokens=tokens)
    graphs, shapes, _ = compiled_epoch(collate, data, 6, tokens)
    assert all(rows == min(6, tokens // width) for rows, width in shapes), shapes
    assert len({rows for rows, _ in shapes}) > 1 and len(shapes) <= len(widths)
    # A width's row count is fixed; the images fed in are the samples' (the tail of a length group holds fewer).
    plan = BatchPlan(np.array([len(s.input_ids) for s in data]), 6, "grouped", seed=0, group_factor=2, tokens=tokens,
                     widths=widths)
    inputs = {(tuple(b["input_ids"].shape), b["pixel_values"].shape[0])
              for b in (collate([data[i] for i in indices]) for indices in plan.batches(0))}
    assert len(shapes) <= graphs <= len(inputs)


def test_padding_to_a_width_and_to_full_rows_changes_no_loss():
    data = samples(12, seed=1)
    widths = bucket_widths(np.array([len(s.input_ids) for s in data]), 2)
    model = tiny_vlm()
    for indices in ([0, 1, 2], [3, 4, 5, 6], [7]):
        picked = [data[i] for i in indices]
        tight = model_inputs(Collator(PAD)(picked))
        padded = model_inputs(Collator(PAD, widths=widths, rows=4)(picked))
        assert padded["input_ids"].shape[0] == 4 and padded["input_ids"].shape[1] in widths
        a = model(**host_prepared(tight, model), logits_to_keep="none").loss
        b = model(**host_prepared(padded, model), logits_to_keep="none").loss
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_bucket_widths_cover_every_length_in_a_few_rounded_widths():
    lengths = np.random.default_rng(0).integers(200, 1500, size=10_000)
    widths = bucket_widths(lengths, 8)
    assert len(widths) <= 8 and all(w % 8 == 0 for w in widths)
    assert widths[-1] >= lengths.max() and widths[0] >= np.quantile(lengths, 1 / 8)
    assert bucket_widths(np.array([7, 7, 7]), 4) == (8,)
    with pytest.raises(ValueError, match="at least 1"):
        bucket_widths(lengths, 0)
