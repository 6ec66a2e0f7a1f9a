"""`minimind-v synth`: its options, and the data set written as jsonl with an image folder or as parquet."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from minimind_v.data.synth.draw import png_bytes
from minimind_v.data.synth.questions import weighted_types
from minimind_v.data.synth.samples import Sample, make_sample
from minimind_v.errors import UserError


@dataclass
class SynthOptions:
    out: str
    """Directory to write into: OUT/<split>.jsonl + OUT/images/, or OUT/<split>.parquet."""
    n: int = 1000
    """Number of samples."""
    seed: int = 0
    """Random seed; the same seed writes the same bytes."""
    split: Literal["train", "test"] = "train"
    """Which half of the scene space to draw from; no scene appears in both, whatever the seeds."""
    lang: Literal["en", "zh", "mix"] = "en"
    """Language of questions and answers; mix draws one per sample."""
    kind: Literal["caption", "qa", "mixed"] = "qa"
    """caption: one description per image (pretrain); qa: questions and answers (SFT); mixed: either per sample."""
    format: Literal["jsonl", "parquet"] = "jsonl"
    """jsonl with an image folder (the original MiniMind-V layout) or one parquet file with image bytes."""
    max_turns: int = 3
    """A QA sample has 1 to this many question-answer turns; only the first turn carries the image."""
    image_size: int = 48
    """Side of the square images in pixels; 48 is the tiny preset's input, so grid cells match its patches."""
    type_weights: str | None = None
    """Relative frequency of question types, e.g. left_of=3,above=3 (unnamed types weigh 1; 0 leaves one out)."""
    image_place: Literal["before", "after", "mixed"] = "before"
    """Where the image goes in the first user turn: before the question, after it (as in the original's real
    data and OpenAI's examples), or either, half and half (docs/experiments.md: what mixed costs the quickstart)."""


def write_dataset(opts: SynthOptions) -> Path:
    """Write the data set and return the path of the jsonl or parquet file."""
    if opts.n < 1:
        raise UserError(f"--n {opts.n}: must be at least 1")
    if opts.max_turns < 1:
        raise UserError(f"--max-turns {opts.max_turns}: must be at least 1")
    if opts.image_size < 24:
        raise UserError(f"--image-size {opts.image_size}: must be at least 24 pixels")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    types = weighted_types(opts.type_weights)
    samples = (make_sample(opts.seed, opts.split, i, opts.lang, opts.kind, opts.max_turns, opts.image_size, types,
                           opts.image_place) for i in range(opts.n))
    if opts.format == "parquet":
        return _write_parquet(samples, out / f"{opts.split}.parquet")
    return _write_jsonl(samples, out / f"{opts.split}.jsonl", out / "images", opts.split)


def _write_jsonl(samples: Iterable[Sample], path: Path, image_dir: Path, split: str) -> Path:
    image_dir.mkdir(exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, sample in enumerate(samples):
            name = f"{split}_{i:06d}.png"
            (image_dir / name).write_bytes(png_bytes(sample.image))
            record = {**sample.record(), "image": name}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def _write_parquet(samples: Iterable[Sample], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, list] = {"conversations": [], "image_bytes": [], "type": [], "types": [], "lang": [],
                                "scene": []}
    for sample in samples:
        record = sample.record()
        columns["conversations"].append(json.dumps(sample.conversations, ensure_ascii=False))
        columns["image_bytes"].append(png_bytes(sample.image))
        columns["type"].append(record["type"])
        columns["types"].append(json.dumps(record["types"]))
        columns["lang"].append(sample.lang)
        columns["scene"].append(json.dumps(record["scene"]))
    pq.write_table(pa.table(columns), path)
    return path


def main(opts: SynthOptions) -> int:
    path = write_dataset(opts)
    print(f"wrote {opts.n} {opts.split} samples ({opts.kind}, {opts.lang}) to {path}")
    return 0
