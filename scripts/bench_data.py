"""Data-pipeline numbers on a caption-style set: padding waste and loader throughput.

    .venv/bin/python scripts/bench_data.py --n 512 --tokenizer DIR

Writes N caption samples (one 320x240 JPEG each, the original's "<image>\\n describe" prompt, a
caption of 5-40 words) to a temporary folder, then reports
- the share of real (non-pad) tokens per batch: pad-to-max_seq_len (what the original does),
  dynamic padding, length-grouped dynamic padding, and packing into rows of max_seq_len;
- loader samples/s with JPEG decode + CLIP 224 preprocessing, for num_workers 0 and 2.
The placeholder is 196 tokens (CLIP ViT-B/16), max_seq_len 640, batch 16: the original pretrain stage.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from minimind_v.data.batching import BatchPlan, Collator, first_fit_decreasing
from minimind_v.data.dataset import DataSettings, VLMDataset
from minimind_v.data.formats import open_dataset
from minimind_v.data.images import ImagePreprocessor
from minimind_v.data.tokenizer import load_tokenizer
from minimind_v.model.config import VLMConfig

WORDS = "a the red blue small large square circle dog cat on left right of near picture shows with and".split()


def write_captions(folder: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir()
    coarse = rng.integers(0, 256, (n, 12, 16, 3), dtype=np.uint8)  # smooth images compress like photos
    lines = []
    for i in range(n):
        Image.fromarray(coarse[i]).resize((320, 240), Image.Resampling.BICUBIC).save(folder / f"images/{i}.jpg",
                                                                                      quality=90)
        caption = " ".join(rng.choice(WORDS, int(rng.integers(5, 41))))
        lines.append(json.dumps({"conversations": [{"role": "user", "content": "<image>\nDescribe the picture."},
                                                   {"role": "assistant", "content": caption}],
                                 "image": f"{i}.jpg"}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"


def token_shares(dataset: VLMDataset, batch_size: int, max_len: int) -> dict[str, float]:
    lengths = dataset.lengths
    real = int(lengths.sum())
    out = {"pad_to_max": real / (len(lengths) * max_len)}
    for mode in ("random", "grouped"):
        batches = BatchPlan(lengths, batch_size, mode, seed=0).batches(0)
        out[f"dynamic_{mode}"] = real / sum(len(b) * int(lengths[b].max()) for b in batches)
    batches = BatchPlan(lengths, batch_size, "packed", max_len, seed=0).batches(0)
    rows = [row for b in batches for row in first_fit_decreasing(lengths[b].tolist(), max_len)]
    out["packed"] = real / (len(rows) * max_len)
    return out


def loader_rate(dataset: VLMDataset, batch_size: int, workers: int) -> float:
    plan = BatchPlan(dataset.lengths, batch_size, "random", seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=plan.batches(0), collate_fn=Collator(0),
                                         num_workers=workers, persistent_workers=workers > 0)
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    start, served = time.perf_counter(), 0
    for batch in iterator:
        served += batch["num_samples"]
    return served / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-seq-len", type=int, default=640)
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.tokenizer)
    image = VLMConfig(image_token_id=tokenizer.convert_tokens_to_ids("@"), image_token_len=196)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_captions(Path(tmp), args.n, seed=0)
        start = time.perf_counter()
        dataset = VLMDataset(open_dataset(data), tokenizer, image, ImagePreprocessor(),
                             DataSettings(max_seq_len=args.max_seq_len))
        scan = time.perf_counter() - start
        report = {"samples": len(dataset), "mean_length": float(dataset.lengths.mean()),
                  "upfront_pass_ms_per_sample": 1000 * scan / args.n,
                  "real_token_share": token_shares(dataset, args.batch_size, args.max_seq_len),
                  "loader_samples_per_s": {f"workers_{w}": loader_rate(dataset, args.batch_size, w) for w in (0, 2)}}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
