"""What `minimind-v bench` times: synthetic samples at the real lengths, or a data set's own, in batches with
the frozen tower's features computed once (what a feature cache holds in a real run)."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from minimind_v.constants import IGNORE_INDEX
from minimind_v.data.dataset import Sample as DataSample
from minimind_v.data.images import ImagePreprocessor
from minimind_v.data.tokenizer import load_tokenizer
from minimind_v.devices import now
from minimind_v.errors import UserError
from minimind_v.model.config import VLMConfig
from minimind_v.model.vlm import MiniMindVLM
from minimind_v.presets import get_preset
from minimind_v.train.build import open_data, resolve_start

# Text around the image in one sample, in tokens: (prompt lo, hi), (answer lo, hi). Pretrain is the
# original's caption data (196 image tokens + ~44 text), SFT its conversations (~300 tokens in all).
TEXT_LENGTHS = {"pretrain": ((8, 16), (24, 48)), "sft": ((20, 60), (40, 100))}


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    pixel_values: Tensor | None = None
    """(n_images, 3, H, W) of a data set's sample; None for a synthetic one (random pixels, one image)."""


@dataclass
class Batch:
    samples: list[Sample]
    pixels: Tensor | None  # (images, 3, H, W) in placeholder order; None when no sample has an image
    features: Tensor | None  # (images, n_patches, vision_dim) fp16, precomputed



@dataclass
class DataReport:
    """What reading a data set the way `train` does cost, and what its samples are like."""

    path: str
    records: int
    usable: int
    up_front_pass_s: float
    """The trainer's pass over every record (templating, tokenising, checking the image files) before step 1."""
    images_per_sample: float
    """Distinct images per usable sample: what a feature cache encodes."""


def bench_config(preset: str, tokenizer: str | None = None) -> VLMConfig:
    """The preset (with the vocabulary and placeholder id of `tokenizer`, as `train --from none` builds it), a
    tower that would come from the Hub replaced by a random one of the same shape."""
    cfg = get_preset(preset) if tokenizer is None else resolve_start("none", preset, tokenizer, None).cfg
    v = cfg.vision
    if v.init is None:
        # Only CLIP towers are named by the presets; ViT-B is CLIPVisionConfig's default width and depth.
        patch = v.image_size // math.isqrt(v.num_patches)
        v.init = {"model_type": "clip_vision_model", "hidden_size": v.hidden_size, "image_size": v.image_size,
                  "patch_size": patch}
    return cfg


def synthetic_samples(cfg: VLMConfig, stage: str, n: int, max_len: int, seed: int) -> list[Sample]:
    """`n` samples: prompt tokens, one image's placeholder run, more prompt, then the supervised answer."""
    rng = random.Random(seed)
    (p_lo, p_hi), (a_lo, a_hi) = TEXT_LENGTHS[stage]
    text_ids = [i for i in range(3, cfg.lm.vocab_size) if i != cfg.image_token_id]  # 0-2 are special tokens
    samples = []
    for _ in range(n):
        prompt = rng.randint(p_lo, p_hi)
        answer = min(rng.randint(a_lo, a_hi), max_len - prompt - cfg.image_token_len)
        if answer < 1:
            raise UserError(f"--max-seq-len {max_len} leaves no room for an answer after {cfg.image_token_len} "
                            "image tokens and the prompt")
        before = rng.randint(1, prompt - 1)
        ids = ([rng.choice(text_ids) for _ in range(before)] + [cfg.image_token_id] * cfg.image_token_len
               + [rng.choice(text_ids) for _ in range(prompt - before + answer)])
        labels = [IGNORE_INDEX] * (len(ids) - answer) + ids[-answer:]
        samples.append(Sample(ids, labels))
    return samples


def data_samples(preset: str, data: str, images: str | None, tokenizer_dir: str, n: int, max_len: int,
                 seed: int) -> tuple[VLMConfig, list[Sample], DataReport]:
    """`n` samples of `data` drawn at random (with repeats only when it holds fewer), read by the trainer's
    own dataset at the stage's length limit, images decoded and preprocessed; the up-front pass timed."""
    cfg = bench_config(preset, tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    preprocessor = ImagePreprocessor.for_image_size(cfg.vision.image_size)
    began = time.perf_counter()
    dataset = open_data(data, images, tokenizer, cfg, preprocessor, max_len, decode_images=True)
    pass_s = time.perf_counter() - began
    rng = random.Random(seed)
    order = list(range(len(dataset)))
    rng.shuffle(order)
    samples: list[Sample] = []
    for index in order * math.ceil(n / len(order)):
        if len(samples) == n:
            break
        sample = dataset[index]
        if isinstance(sample, DataSample):  # a record whose image turned out unreadable is left out, as train does
            samples.append(Sample(sample.input_ids.tolist(), sample.labels.tolist(), sample.pixel_values))
    if not samples:
        raise UserError(f"--data {data}: no sample could be read ({dataset[order[0]]})")
    # A feature cache encodes each distinct image once (the original's SFT data shows most images twice).
    images = len({ref if isinstance(ref, str) else hash(ref) for i in range(len(dataset))
                  for ref in dataset.images(i)}) / len(dataset)
    records = len(dataset) + len(dataset.bad_upfront)
    return cfg, samples, DataReport(data, records, len(dataset), round(pass_s, 3), round(images, 3))


def make_batches(model: MiniMindVLM, samples: list[Sample], batch_size: int,
                 device: torch.device) -> tuple[list[Batch], float]:
    """Group samples into batches with their pixels (random ones, one image each, for synthetic samples);
    returns the batches and the tower's seconds per image.

    The features are what a feature cache would hold: the frozen tower's output, stored in fp16.
    """
    size = model.cfg.vision.image_size
    batches, encode_s, images = [], 0.0, 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        pixels: Tensor | None
        if all(s.pixel_values is None for s in chunk):
            pixels = torch.randn(len(chunk), 3, size, size, device=device)
        else:
            given = [s.pixel_values for s in chunk if s.pixel_values is not None]
            pixels = torch.cat(given).to(device) if given else None
        features = None
        if pixels is not None:
            t0 = now(device)
            with torch.no_grad():
                features = model.encode_images(pixels).half()
            encode_s += now(device) - t0
            images += len(pixels)
        batches.append(Batch(chunk, pixels, features))
    return batches, encode_s / max(images, 1)
