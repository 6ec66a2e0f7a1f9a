"""The data path at real scale, piece by piece: the batch planner and the feature-cache build.

    .venv/bin/python scripts/bench_data_path.py planner [--n 595000] [--batch 256]
    .venv/bin/python scripts/bench_data_path.py cache --images DIR [--n 20000] [--world 2] [--dtype int8]

planner: one epoch's plan of N samples of pretrain-like lengths (mean ~243 tokens, rows of 640), per mode,
and what the schedule's step count costs (`BatchPlan.count`).
cache: builds a feature cache of the first N JPEGs of DIR (e.g. a `synth --like minimind-v-pretrain` stand-in)
with a fake encoder of no cost (a constant), so what is timed is the cache itself: reading, hashing, decoding,
writing and the index; with --world W, W gloo processes each build their share. Prints per-image cost, index files
and their lines, and each rank's count.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def planner(n: int, batch: int) -> None:
    from minimind_v.data.batching import BatchPlan

    lengths = np.clip(np.random.default_rng(0).normal(243, 40, n).astype(np.int64), 200, 640)
    for mode in ("random", "grouped", "packed"):
        plan = BatchPlan(lengths, batch, mode, 640, seed=0)
        began = time.perf_counter()
        count = plan.count(1)
        counted = time.perf_counter() - began
        began = time.perf_counter()
        batches = plan.batches(0)
        planned = time.perf_counter() - began
        print(json.dumps({"mode": mode, "samples": n, "batch": batch, "batches": len(batches), "count_epoch1": count,
                          "count_s": round(counted, 3), "plan_s": round(planned, 3)}))


def _build(rank: int, world: int, images: list[str], root: str, dtype: str, out: str) -> None:
    from minimind_v.data.feature_cache import FeatureCache
    from minimind_v.data.images import ImagePreprocessor

    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cache = FeatureCache(root, "fake-encoder", n_patches=196, dim=768, dtype=dtype)
    constant = torch.ones(196, 768)
    report = cache.build(images, ImagePreprocessor.for_image_size(224), lambda pixels: constant.expand(
        len(pixels), -1, -1), log=print, share=(rank, world), workers=2)
    if world > 1:
        dist.barrier()
    cache.reload()
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "encoded": report.encoded, "seconds": round(report.seconds, 2),
        "ms_per_image": round(1000 * report.seconds / max(report.encoded, 1), 3), "index_writes": report.index_writes,
        "cached_after_all": len(cache)}))


def cache(images_dir: Path, n: int, world: int, dtype: str) -> None:
    images = sorted(str(p) for p in images_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cache"
        began = time.perf_counter()
        if world > 1:
            torch.multiprocessing.spawn(_build, args=(world, images, str(root), dtype, tmp), nprocs=world, join=True)
        else:
            _build(0, 1, images, str(root), dtype, tmp)
        wall = time.perf_counter() - began
        for rank in range(world):
            print(Path(tmp, f"rank{rank}.json").read_text())
        indexes = list(root.glob("*/*/index-*.jsonl"))
        lines = sum(len(p.read_text().splitlines()) for p in indexes)
        size = sum(p.stat().st_size for p in root.glob("*/*/*"))
        print(json.dumps({"images": len(images), "world": world, "wall_s": round(wall, 1), "index_files": len(indexes),
                          "index_lines": lines, "cache_bytes": size}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["planner", "cache"])
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--images", type=Path)
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--dtype", default="int8")
    args = parser.parse_args()
    if args.what == "planner":
        planner(args.n or 595_000, args.batch)
    else:
        cache(args.images, args.n or 20_000, args.world, args.dtype)
