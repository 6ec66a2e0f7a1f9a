"""`minimind-v synth`: its options, and the data set written as jsonl with an image folder or as parquet."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from minimind_v.data.synth.draw import png_bytes
from minimind_v.data.synth.multi import MULTI_TYPES, MultiSample, make_multi
from minimind_v.data.synth.pairs import Pair, make_pair
from minimind_v.data.synth.questions import weighted_types
from minimind_v.data.synth.samples import Sample, make_sample
from minimind_v.data.synth.standin import StandinReport, write_standin
from minimind_v.errors import UserError
from minimind_v.options import flag_name


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
    kind: Literal["caption", "qa", "mixed", "pairs", "multi"] = "qa"
    """caption: one description per image (pretrain); qa: questions and answers (SFT); mixed: either per sample;
    pairs: preference pairs for DPO, a question with a chosen and a rejected answer; multi: one question over
    two images."""
    format: Literal["jsonl", "parquet"] = "jsonl"
    """jsonl with an image folder (the original MiniMind-V layout) or one parquet file with image bytes."""
    max_turns: int = 3
    """A QA sample has 1 to this many question-answer turns; only the first turn carries the image (pairs and
    multi ask one question)."""
    image_size: int = 48
    """Side of the square images in pixels; 48 is the tiny preset's input, so grid cells match its patches."""
    type_weights: str | None = None
    """Relative frequency of question types, e.g. left_of=3,above=3 (unnamed types weigh 1; 0 leaves one out);
    with --kind multi the types are more, both and change."""
    image_place: Literal["before", "after", "mixed"] = "before"
    """Where the image goes in the first user turn: before the question, after it (as in the original's real
    data and OpenAI's examples), or either, half and half (docs/experiments.md: what mixed costs the quickstart)."""
    like: Literal["minimind-v-pretrain", "minimind-v-sft"] | None = None
    """Instead, a stand-in of this original data set at its real sizes: OUT/<stage>_data.jsonl + <stage>_images/."""


STANDIN_FLAGS = ("out", "n", "seed", "like")
"""The options a --like stand-in takes; any other one set is refused."""


def write_dataset(opts: SynthOptions) -> Path:
    """Write the data set and return the path of the jsonl or parquet file."""
    if opts.like:
        return write_like(opts).path
    if opts.n < 1:
        raise UserError(f"--n {opts.n}: must be at least 1")
    if opts.max_turns < 1:
        raise UserError(f"--max-turns {opts.max_turns}: must be at least 1")
    if opts.image_size < 24:
        raise UserError(f"--image-size {opts.image_size}: must be at least 24 pixels")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = _samples(opts)
    if opts.format == "parquet":
        return _write_parquet(samples, out / f"{opts.split}.parquet")
    return _write_jsonl(samples, out / f"{opts.split}.jsonl", out / "images", opts.split)


def _samples(opts: SynthOptions) -> Iterator[Sample | Pair | MultiSample]:
    """The records of --kind, drawn lazily; bad --type-weights fail before the first one."""
    if opts.kind == "pairs":
        if opts.type_weights:
            raise UserError("--type-weights: --kind pairs asks the question its corruption calls for; leave it unset")
        return (make_pair(opts.seed, opts.split, i, opts.lang, opts.image_size, opts.image_place)
                for i in range(opts.n))
    if opts.kind == "multi":
        multi_types = weighted_types(opts.type_weights, MULTI_TYPES)
        return (make_multi(opts.seed, opts.split, i, opts.lang, opts.image_size, multi_types, opts.image_place)
                for i in range(opts.n))
    types = weighted_types(opts.type_weights)
    return (make_sample(opts.seed, opts.split, i, opts.lang, opts.kind, opts.max_turns, opts.image_size, types,
                        opts.image_place) for i in range(opts.n))


def _image_names(split: str, index: int, count: int) -> list[str]:
    if count == 1:
        return [f"{split}_{index:06d}.png"]
    return [f"{split}_{index:06d}_{k}.png" for k in range(count)]


def _write_jsonl(samples: Iterable[Sample | Pair | MultiSample], path: Path, image_dir: Path, split: str) -> Path:
    image_dir.mkdir(exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, sample in enumerate(samples):
            names = _image_names(split, i, len(sample.images))
            for name, image in zip(names, sample.images):
                (image_dir / name).write_bytes(png_bytes(image))
            record = {**sample.record(), "image": ", ".join(names)}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def _write_parquet(samples: Iterable[Sample | Pair | MultiSample], path: Path) -> Path:
    """One row per record: its fields (lists as JSON strings), with `image_bytes` (one PNG, or a list of them)
    right after `conversations`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, list] = {}
    for sample in samples:
        images = [png_bytes(image) for image in sample.images]
        for key, value in sample.record().items():
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            columns.setdefault(key, []).append(text)
            if key == "conversations":
                columns.setdefault("image_bytes", []).append(images[0] if len(images) == 1 else images)
    pq.write_table(pa.table(columns), path)
    return path


def write_like(opts: SynthOptions) -> StandinReport:
    """The --like stand-in; an option it has no use for, set to anything but its default, is refused."""
    for f in dataclasses.fields(opts):
        value = getattr(opts, f.name)
        if f.name not in STANDIN_FLAGS and value != f.default:
            raise UserError(f"{flag_name(f.name)} {value}: has no meaning with --like {opts.like}, which takes only "
                            "--out, --n and --seed")
    return write_standin(opts.like, opts.n, opts.seed, Path(opts.out))


def main(opts: SynthOptions) -> int:
    if opts.like:
        print(write_like(opts).summary(opts.like))
        return 0
    path = write_dataset(opts)
    print(f"wrote {opts.n} {opts.split} samples ({opts.kind}, {opts.lang}) to {path}")
    return 0
