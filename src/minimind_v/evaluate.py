"""`minimind-v eval`: exact-match accuracy of greedy answers on a question-answer data set.

Each sample is asked its first user turn (with any system turn before it); the first assistant
turn is the reference. A blank or missing reference is still answered (and written to
--predictions) but not scored, so a held-out set with its answers removed can be evaluated
elsewhere. Normalisation is deliberately trivial: surrounding whitespace and one trailing "." or
"。" are dropped from both sides; case, inner spaces and wording must match exactly.

Samples may carry a "type" (a question type, as `minimind-v synth` writes); the report gives exact
match per type, overall, and for short answers against long ones (descriptions). A type is long when
every reference it has ends a sentence ("." or "。"): descriptions do, one-to-four-word answers do
not. Data without types is grouped by each reference's length.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minimind_v.data.formats import BadSample, Reader, open_dataset
from minimind_v.errors import UserError

NORMALISATION = "strip surrounding whitespace and one trailing '.' or '。'; otherwise exact (case-sensitive)"
SHORT_WORDS = 4
"""An untyped reference of at most this many words (or 8 characters without spaces, for Chinese) is short."""
SENTENCE_ENDS = (".", "。")
UNTYPED = "untyped"


@dataclass
class EvalOptions:
    model: str
    """Model directory to evaluate."""
    data: str
    """Question-answer data: MiniMind-V or LLaVA jsonl/json, or parquet (e.g. written by `minimind-v synth`)."""
    adapter: str | None = None
    """LoRA adapter directory (peft format, e.g. a LoRA run's OUT/model/adapter) applied to the model; default: the
    model directory's own adapter/, when it has one."""
    images: str | None = None
    """Image folder of --data (default: images/ beside the data file, else its folder)."""
    limit: int | None = None
    """Evaluate only the first N samples."""
    predictions: str | None = None
    """Write one JSON object per line: {"index": line of the data file (0-based), "prediction": text}."""
    batch_size: int = 64
    """Prompts generated together."""
    max_new_tokens: int = 128
    """Longest answer generated."""
    device: str | None = None
    """cpu, cuda, ... (default: cuda when available)."""


@dataclass
class Item:
    """One evaluated sample."""

    index: int
    """0-based line (jsonl/json) or row (parquet) of the data file."""
    type: str
    reference: str | None
    """The first assistant turn; None when blank or missing (then not scored)."""
    messages: list[dict[str, str]] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)
    prediction: str | None = None
    error: str | None = None
    """Why the sample could not be asked (broken image, bad roles); it is then counted apart, never scored."""


def normalise(text: str) -> str:
    text = text.strip()
    return text[:-1].rstrip() if text.endswith((".", "。")) else text


def long_types(items: list[Item]) -> set[str]:
    """The types whose references, every one of them and at least one, end a sentence."""
    ends: dict[str, bool] = {}
    for it in items:
        if it.type != UNTYPED and it.reference is not None:
            ends[it.type] = ends.get(it.type, True) and it.reference.rstrip().endswith(SENTENCE_ENDS)
    return {t for t, sentence in ends.items() if sentence}


def is_long(item: Item, long: set[str]) -> bool:
    """A typed item by its type (`long`: long_types of its data), an untyped one by its reference's length."""
    if item.type != UNTYPED:
        return item.type in long
    if item.reference is None:
        return False
    words = item.reference.split()
    return len(words) > SHORT_WORDS or (len(words) == 1 and len(words[0]) > 8)


def score(items: list[Item]) -> dict[str, Any]:
    """The report: exact match overall, for short and long answers, and per question type.

    A sample that could not be asked is an error, not a wrong answer: it is counted in "errors" and scored
    nowhere, so that a broken image folder shows as errors instead of as a model that answers badly."""
    scored = [it for it in items if it.reference is not None and it.error is None]
    correct = {id(it): it.prediction is not None and normalise(it.prediction) == normalise(it.reference)
               for it in scored}

    def summary(group: list[Item]) -> dict[str, Any]:
        hits = sum(correct[id(it)] for it in group)
        return {"exact_match": round(hits / len(group), 4) if group else None, "correct": hits, "n": len(group)}

    types = sorted({it.type for it in scored})
    long = long_types(items)
    return {
        "samples": len(items), "scored": len(scored),
        "unscored": sum(it.reference is None and it.error is None for it in items),
        "errors": sum(it.error is not None for it in items),
        "exact_match": summary(scored)["exact_match"],
        "short": summary([it for it in scored if not is_long(it, long)]),
        "long": summary([it for it in scored if is_long(it, long)]),
        "by_type": {t: summary([it for it in scored if it.type == t]) for t in types},
        "normalisation": NORMALISATION,
    }


def read_items(reader: Reader, limit: int | None = None) -> list[Item]:
    """The first user turn of each sample (system turn kept), its reference and its images."""
    types = _types(reader)
    count = len(reader) if limit is None else min(limit, len(reader))
    items = []
    for i in range(count):
        index = _line_index(reader.source(i))
        qtype = types.get(index, UNTYPED)
        try:
            raw = reader[i]
        except BadSample as err:
            items.append(Item(index, qtype, None, error=str(err)))
            continue
        turns = raw.conversations
        first_user = next((k for k, t in enumerate(turns) if t["role"] == "user"), None)
        if first_user is None:
            items.append(Item(index, qtype, None, error=f"{raw.source}: no user turn"))
            continue
        answer = turns[first_user + 1]["content"] if first_user + 1 < len(turns) else ""
        reference = answer if answer.strip() else None
        items.append(Item(index, qtype, reference, turns[: first_user + 1], list(raw.images)))
    return items


def _line_index(source: str) -> int:
    """Sources read "file:line" (1-based) for json(l) and "file:row N" (0-based) for parquet."""
    tail = source.rpartition(":")[2]
    return int(tail[4:]) if tail.startswith("row ") else int(tail) - 1


def _types(reader: Reader) -> dict[int, str]:
    """Question type per line/row index, from a "type" field or column where the data has one."""
    path = Path(reader.path)
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        if "type" not in pq.ParquetFile(path).schema_arrow.names:
            return {}
        column = pq.read_table(path, columns=["type"]).column("type").to_pylist()
        return {i: t for i, t in enumerate(column) if isinstance(t, str)}
    types = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f):
            if '"type"' not in line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a JSON array, or a broken line the reader reports itself
            if isinstance(record, dict) and isinstance(record.get("type"), str):
                types[i] = record["type"]
    return types


def answer_all(engine: Any, items: list[Item], reader: Reader, batch_size: int, max_new_tokens: int) -> None:
    """Greedy answers for every askable item, in batches of similar expected length."""
    from minimind_v.data.images import ImageFolder, load_image
    from minimind_v.infer.engine import SamplingParams

    folder = ImageFolder(reader.images_dir or Path("."))
    ready: list[tuple[Item, list[int], list[Any]]] = []
    for item in items:
        if item.error is not None:
            continue
        try:
            images = [load_image(ref if isinstance(ref, bytes) else folder.resolve(ref))
                      for ref in item.images]
            prompt = engine.prompt(item.messages, len(images))  # the prompt chat and serve would run
        except (BadSample, UserError) as err:  # a broken image; roles, markers or length the engine refuses
            item.error = str(err)
            continue
        ready.append((item, prompt, images))
    # Long answers decode for many steps: batching them apart keeps short rows from waiting on them.
    long = long_types(items)
    ready.sort(key=lambda r: (is_long(r[0], long), len(r[1])))
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    for start in range(0, len(ready), batch_size):
        batch = ready[start:start + batch_size]
        completions = engine.generate([p for _, p, _ in batch], [imgs for _, _, imgs in batch], params)
        for (item, _, _), completion in zip(batch, completions):
            item.prediction = completion.text


def write_predictions(items: list[Item], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            row: dict[str, Any] = {"index": item.index, "prediction": item.prediction}
            if item.error is not None:
                row["error"] = item.error
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def evaluate(model: str | Path, data: str | Path, images: str | Path | None = None, limit: int | None = None,
             batch_size: int = 64, max_new_tokens: int = 128, device: str | None = None,
             engine: Any = None, adapter: str | Path | None = None) -> tuple[dict[str, Any], list[Item]]:
    """Load (or reuse) an engine, answer every sample, and return the report and the items."""
    from minimind_v.infer.engine import Engine

    reader = open_dataset(data, images)
    items = read_items(reader, limit)
    engine = engine if engine is not None else Engine.load(model, device, adapter)
    answer_all(engine, items, reader, batch_size, max_new_tokens)
    return {"model": str(model), "data": str(data), **score(items)}, items


def main(opts: EvalOptions) -> int:
    if opts.limit is not None and opts.limit < 1:
        raise UserError(f"--limit {opts.limit}: must be at least 1")
    if opts.batch_size < 1:
        raise UserError(f"--batch-size {opts.batch_size}: must be at least 1")
    report, items = evaluate(opts.model, opts.data, opts.images, opts.limit, opts.batch_size,
                             opts.max_new_tokens, opts.device, adapter=opts.adapter)
    if opts.predictions:
        write_predictions(items, opts.predictions)
    errors = [it.error for it in items if it.error is not None]
    if errors and len(errors) == len(items):
        raise UserError(f"{opts.data}: none of its {len(items)} sample(s) could be asked, e.g. {errors[0]}")
    if errors:
        print(f"{len(errors)} sample(s) could not be asked (not scored), e.g. {errors[0]}", file=sys.stderr)
    print(json.dumps(report, ensure_ascii=False, indent=2))
    return 0
