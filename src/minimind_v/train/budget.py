"""Fitting training into a time budget by measuring, not guessing.

What a sample costs comes from the first samples of the data (through the trainer's own reader,
template and image preprocessing); what a step costs from the trainer's own optimizer and step on
the real model at that shape. The steps that fit are then the time left over the step's time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minimind_v.constants import IGNORE_INDEX
from minimind_v.model.config import VLMConfig

PLAN_SPEED = 1.1
"""A plan assumes steps 10% faster than the timed one: inside the trainer a step takes about the timed time,
and a machine's speed drifts by more than that from minute to minute. A plan too slow ends training early and
wastes the rest of the budget; one too fast costs little, as the trainer then decays the learning rate on the
clock and stops at its time cap (TrainConfig.max_minutes)."""


@dataclass
class Shape:
    """What a training sample costs, from the first samples of the data."""

    tokens: float
    """Mean length in tokens, chat template and image placeholders included."""
    supervised: float
    """Share of those tokens that are answer tokens (the only ones the output head runs on)."""
    setup_s: float
    """Seconds of the trainer's set-up per sample: templating and tokenising, decoding the image."""


def sample_shape(data: Path, tokenizer: Any, cfg: VLMConfig, n: int = 200) -> Shape:
    from minimind_v.data.formats import open_dataset
    from minimind_v.data.images import ImageFolder, ImagePreprocessor, load_image
    from minimind_v.data.template import encode_conversation

    began = time.perf_counter()
    reader = open_dataset(data)
    samples = [reader[i] for i in range(min(n, len(reader)))]
    encoded = [encode_conversation(tokenizer, s.conversations, cfg, len(s.images), 4096) for s in samples]
    preprocess = ImagePreprocessor.for_image_size(cfg.vision.image_size)
    folder = ImageFolder(reader.images_dir)
    for ref in (ref for s in samples for ref in s.images):
        preprocess.array(load_image(folder.resolve(ref)))
    tokens = sum(len(e.input_ids) for e in encoded)
    supervised = sum(sum(1 for label in e.labels if label != IGNORE_INDEX) for e in encoded)
    return Shape(tokens / len(encoded), supervised / max(tokens, 1), (time.perf_counter() - began) / len(samples))


def step_batch(cfg: VLMConfig, batch_size: int, seq_len: int, supervised: float) -> dict[str, torch.Tensor]:
    """A training batch of random tokens in this shape: one image's slots near the start, the last `supervised`
    share of each row's tokens labelled, random pixels."""
    seq_len = max(seq_len, cfg.image_token_len + 4)
    ids = torch.randint(4, cfg.lm.vocab_size, (batch_size, seq_len))
    ids[:, 2:2 + cfg.image_token_len] = cfg.image_token_id
    labels = ids.clone()
    labels[:, :seq_len - max(1, round(supervised * seq_len))] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels,
            "pixel_values": torch.randn(batch_size, 3, cfg.vision.image_size, cfg.vision.image_size)}


def time_one_step(cfg: VLMConfig, batch_size: int, seq_len: int, supervised: float) -> float:
    """Seconds for one training step (the trainer's optimizer and train_step) of the real model on a batch of
    this shape, `supervised` of each row's tokens labelled."""
    from minimind_v.model.vlm import MiniMindVLM
    from minimind_v.train.config import TrainConfig, for_stage
    from minimind_v.train.run import build_optimizer
    from minimind_v.train.step import Precision, train_step

    model = MiniMindVLM(cfg)
    model.train()
    optimizer = build_optimizer(model, for_stage(TrainConfig(stage="sft", model=cfg)))
    batch = step_batch(cfg, batch_size, seq_len, supervised)
    cpu = torch.device("cpu")
    precision = Precision.choose("fp32", cpu)
    train_step(model, [batch], optimizer, precision, 1.0, cpu)  # the first step allocates; time the next ones
    began = time.perf_counter()
    for _ in range(2):
        train_step(model, [batch], optimizer, precision, 1.0, cpu)
    return (time.perf_counter() - began) / 2


def fastest_threads(cfg: VLMConfig, batch_size: int, seq_len: int, supervised: float,
                    rounds: int = 3) -> tuple[int, float]:
    """Set torch's thread count to the faster of 1 and all cores, measured on the real step.

    On an idle machine all cores win; on a busy one (other jobs on the same cores) the threads of one
    step wait for each other and a single thread can be several times faster. The counts are timed in
    turn for a few rounds and each is judged by its fastest round, so that one moment of contention
    (another process starting) cannot make the slower count look faster.
    """
    timings: dict[int, list[float]] = {threads: [] for threads in sorted({1, torch.get_num_threads()})}
    for _ in range(rounds):
        for threads, seconds in timings.items():
            torch.set_num_threads(threads)
            seconds.append(time_one_step(cfg, batch_size, seq_len, supervised))
    fastest = {threads: min(seconds) for threads, seconds in timings.items()}
    best = min(fastest, key=fastest.__getitem__)
    torch.set_num_threads(best)
    return best, fastest[best]


def steps_for(seconds: float, seconds_per_step: float, setup_s: float) -> int:
    """Steps that fit in `seconds` after `setup_s` of set-up; never zero."""
    return max(1, int((seconds - setup_s) / seconds_per_step))
